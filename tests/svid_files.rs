//! `tessera svid watch --out`: PEM files kept current through rotations, swapped in whole, with
//! a command run after each write; and its refusals of bad options.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use common::*;

/// A `tessera svid watch` child, killed when dropped.
struct Watch(Child);

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn watch(agent: &TestAgent, args: &[&str]) -> Watch {
    Watch(
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["svid", "watch", "--socket", &agent.uri()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// The serial of the certificate in `cert` and whether `key` is its private key; `None` when a
/// file is missing (the set being swapped under the reader).
fn read_pair(cert: &Path, key: &Path) -> Option<(String, bool)> {
    let cert = std::fs::read(cert).ok()?;
    let key = std::fs::read(key).ok()?;
    let chain = tessera::ca::certificates_from_pem(&cert).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let key = pem::parse(&key).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key.contents()).unwrap();
    let matches = leaf.public_key().subject_public_key.data.as_ref() == pair.public_key().as_ref();
    Some((hex::encode(leaf.tbs_certificate.raw_serial()), matches))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn versions(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("..") && name != "..data" && p.is_dir()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_keeps_a_matching_set_current_through_rotations_and_runs_the_command() {
    let agent = start_agent(&entry("/files", &[&my_uid_selector()], "4s", "")).await;
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("tls");
    let hook_log = out.path().join("hook.log");
    let hook = format!("echo ran >> {}", hook_log.display());
    let _watch = watch(
        &agent,
        &[
            "--out",
            dir.to_str().unwrap(),
            "--exec",
            &hook,
            "--cert-mode",
            "0640",
        ],
    );

    // A reader that resolves ..data once per read, as a careful server does, must never see a
    // certificate beside another update's key.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (dir, stop) = (dir.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut serials, mut reads, mut mismatches) = (Vec::new(), 0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                if let Ok(version) = std::fs::read_link(dir.join("..data")) {
                    let version = dir.join(version);
                    if let Some((serial, matches)) =
                        read_pair(&version.join("svid.pem"), &version.join("svid_key.pem"))
                    {
                        reads += 1;
                        mismatches += u32::from(!matches);
                        if serials.last() != Some(&serial) {
                            serials.push(serial);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (serials, reads, mismatches)
        })
    };
    // Three SVIDs: the first and two rotations (a 4 s TTL renews at about half-life).
    eventually(Duration::from_secs(30), || {
        // Through the names in DIR: a read that straddles a swap may pair two updates; such a
        // read is simply taken again (the reader above checks the exact way).
        let (serial, matches) = read_pair(&dir.join("svid.pem"), &dir.join("svid_key.pem"))?;
        if !matches {
            return None;
        }
        let ran = std::fs::read_to_string(&hook_log).unwrap_or_default();
        (ran.lines().count() >= 3).then_some(serial)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (serials, reads, mismatches) = reader.join().unwrap();
    assert!(serials.len() >= 3, "rotations seen: {serials:?}");
    assert!(reads > 10, "{reads} reads");
    assert_eq!(mismatches, 0, "a certificate beside another update's key");

    for name in ["svid.pem", "svid_key.pem", "bundle.pem", "crl.pem"] {
        let link = std::fs::read_link(dir.join(name)).unwrap();
        assert_eq!(link, Path::new("..data").join(name));
    }
    assert_eq!(mode(&dir.join("svid_key.pem")), 0o600);
    assert_eq!(mode(&dir.join("svid.pem")), 0o640, "--cert-mode");
    assert_eq!(mode(&dir.join("bundle.pem")), 0o640);
    let bundle = std::fs::read(dir.join("bundle.pem")).unwrap();
    assert!(
        !tessera::ca::certificates_from_pem(bundle)
            .unwrap()
            .is_empty()
    );
    // Earlier updates' directories are gone (one more may be being swapped in).
    assert!(versions(&dir).len() <= 2, "{:?}", versions(&dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_not_sent_leaves_the_files_as_they_were() {
    let agent = start_agent(&entry("/files", &[&my_uid_selector()], "1h", "")).await;
    let out = tempfile::tempdir().unwrap();
    let before = out.path().join("svid.pem");
    std::fs::write(&before, "previous").unwrap();
    let mut watch = watch(
        &agent,
        &[
            "--out",
            out.path().to_str().unwrap(),
            "--spiffe-id",
            "spiffe://example.org/someone-else",
        ],
    );
    let mut stderr = watch.0.stderr.take().unwrap();
    let reading = tokio::task::spawn_blocking(move || {
        let mut said = String::new();
        let mut buf = [0u8; 512];
        while !said.contains("left as they were") {
            match std::io::Read::read(&mut stderr, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => said.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        said
    });
    // The child is killed when the test ends, which ends the read if nothing came.
    let said = tokio::time::timeout(Duration::from_secs(20), reading)
        .await
        .expect("the watcher says why it wrote nothing within 20 s")
        .unwrap();
    assert!(
        said.contains("no SVID for spiffe://example.org/someone-else"),
        "{said}"
    );
    assert!(said.contains("/files"), "names what it sent: {said}");
    assert_eq!(std::fs::read_to_string(&before).unwrap(), "previous");
    assert!(!out.path().join("..data").exists());
}

#[test]
fn bad_options_exit_2_naming_the_value() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["svid", "watch", "--socket", "unix:///nonexistent.sock"])
            .args(args)
            .output()
            .unwrap()
    };
    for (args, says) in [
        (
            &["--out", "/tmp/x", "--key-mode", "0999"][..],
            "--key-mode 0999",
        ),
        (
            &["--out", "/tmp/x", "--owner", "no-such-user-here"][..],
            "--owner no-such-user-here",
        ),
        (
            &["--out", "/tmp/x", "--group", "no-such-group-here"][..],
            "--group no-such-group-here",
        ),
        (
            &["--out", "/tmp/x", "--spiffe-id", "https://x"][..],
            "--spiffe-id https://x",
        ),
        (&["--exec", "true"][..], "--out"),
    ] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_block_has_the_agent_keep_an_entrys_files_current() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("tls");
    let hook_log = out.path().join("hook.log");
    let output = format!(
        "[[output]]\nspiffe_id = \"spiffe://{TRUST_DOMAIN}/service\"\ndir = \"{}\"\nexec = \"echo ran >> {}\"\nkey_mode = \"0640\"\n",
        dir.display(),
        hook_log.display()
    );
    // The entry selects a uid no process here has: the agent writes it for the service itself.
    let _agent = start_agent_with(
        &entry("/service", &["unix:uid:4242"], "4s", ""),
        &output,
        Default::default(),
    )
    .await;
    let mut serials = Vec::new();
    eventually(Duration::from_secs(30), || {
        let version = dir.join(std::fs::read_link(dir.join("..data")).ok()?);
        let (serial, matches) =
            read_pair(&version.join("svid.pem"), &version.join("svid_key.pem"))?;
        assert!(matches, "an update's certificate and key match");
        if serials.last() != Some(&serial) {
            serials.push(serial);
        }
        let ran = std::fs::read_to_string(&hook_log).unwrap_or_default();
        (serials.len() >= 2 && ran.lines().count() >= 2).then_some(())
    })
    .await;
    assert_eq!(mode(&dir.join("svid_key.pem")), 0o640);
    let chain =
        tessera::ca::certificates_from_pem(std::fs::read(dir.join("svid.pem")).unwrap()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let uri = format!("spiffe://{TRUST_DOMAIN}/service");
    assert!(
        leaf.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == uri)),
        "the entry's SVID"
    );
}
