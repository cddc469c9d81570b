//! Attestation with real processes: clients started as other uids, from other executables, and
//! py-spiffe, each getting exactly the identities its kernel-verified facts entitle it to; and
//! the pid-reuse defence, with the pid really recycled. These tests need root to start processes as other uids.

mod common;

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tessera::agent::BuildOptions;
use tessera::attest::PinMode;
use tessera::proto::workload::X509svidRequest;

const UID_A: u32 = 2101;
const UID_B: u32 = 2102;
const UID_NOBODY_MATCHES: u32 = 2103;
const UID_PYTHON: u32 = 2104;
const UID_HASHED: u32 = 2105;
const UID_RELAY: u32 = 2107;

fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &bytes,
    ))
}

/// `tessera svid fetch --output json` as `uid`; the SPIFFE IDs on success, stderr on failure.
fn fetch_ids(binary: &Path, uid: u32, uri: &str) -> Result<Vec<String>, String> {
    let out = run_as(
        uid,
        binary,
        &["svid", "fetch", "--socket", uri, "--output", "json"],
    );
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Ok(json["svids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
        .collect())
}

#[tokio::test]
async fn uids_and_executables_get_their_own_identities() {
    if !require_root("uids_and_executables_get_their_own_identities") {
        return;
    }
    let dir = world_dir();
    let exe_b = dir.path().join("client-b");
    let entries = [
        entry("/uid-a", &[&format!("unix:uid:{UID_A}")], "5m", ""),
        entry(
            "/uid-b",
            &[&format!("unix:uid:{UID_B}"), &format!("unix:gid:{UID_B}")],
            "5m",
            "",
        ),
        entry(
            "/uid-a/client-b",
            &[
                &format!("unix:uid:{UID_A}"),
                &format!("unix:path:{}", exe_b.display()),
            ],
            "5m",
            "",
        ),
    ]
    .concat();
    let agent = start_agent(&entries).await;
    let client_a = agent.tessera_copy("client-a");
    std::fs::copy(&client_a, &exe_b).unwrap();
    std::fs::set_permissions(&exe_b, std::fs::Permissions::from_mode(0o755)).unwrap();
    let uri = agent.uri();

    let (a, b, a_from_b, nobody) = tokio::task::spawn_blocking(move || {
        (
            fetch_ids(&client_a, UID_A, &uri),
            fetch_ids(&client_a, UID_B, &uri),
            fetch_ids(&exe_b, UID_A, &uri),
            fetch_ids(&client_a, UID_NOBODY_MATCHES, &uri),
        )
    })
    .await
    .unwrap();
    assert_eq!(a.unwrap(), ["spiffe://example.org/uid-a"]);
    assert_eq!(b.unwrap(), ["spiffe://example.org/uid-b"]);
    assert_eq!(
        a_from_b.unwrap(),
        [
            "spiffe://example.org/uid-a",
            "spiffe://example.org/uid-a/client-b"
        ]
    );
    let denied = nobody.unwrap_err();
    assert!(
        denied.contains("PermissionDenied") && denied.contains("no identity issued"),
        "{denied}"
    );
}

#[tokio::test]
async fn sha256_selector_follows_the_executables_content() {
    if !require_root("sha256_selector_follows_the_executables_content") {
        return;
    }
    let digest = sha256_file(Path::new(env!("CARGO_BIN_EXE_tessera")));
    let agent = start_agent(&entry(
        "/hashed",
        &[
            &format!("unix:uid:{UID_HASHED}"),
            &format!("unix:sha256:{digest}"),
        ],
        "5m",
        "",
    ))
    .await;
    let genuine = agent.tessera_copy("genuine");
    let tampered = agent.tessera_copy("tampered");
    let mut bytes = std::fs::read(&tampered).unwrap();
    bytes.extend_from_slice(b"tampered");
    std::fs::write(&tampered, bytes).unwrap();
    let uri = agent.uri();
    let (ok, refused) = tokio::task::spawn_blocking(move || {
        (
            fetch_ids(&genuine, UID_HASHED, &uri),
            fetch_ids(&tampered, UID_HASHED, &uri),
        )
    })
    .await
    .unwrap();
    assert_eq!(ok.unwrap(), ["spiffe://example.org/hashed"]);
    assert!(refused.unwrap_err().contains("PermissionDenied"));
}

#[tokio::test]
async fn py_spiffe_fetches_svids_and_bundles_unmodified() {
    if !require_root("py_spiffe_fetches_svids_and_bundles_unmodified") {
        return;
    }
    let Some(python) = python() else { return };
    // Select on the interpreter's own hash: /proc/<pid>/exe of a venv python is the real binary.
    let interpreter = std::fs::canonicalize(&python).unwrap();
    let digest = sha256_file(&interpreter);
    let agent = start_agent(&entry(
        "/python-agent",
        &[
            &format!("unix:uid:{UID_PYTHON}"),
            &format!("unix:sha256:{digest}"),
        ],
        "5m",
        "hint = \"py\"",
    ))
    .await;
    let script = include_str!("python/fetch.py");
    let uri = agent.uri();
    let (served, denied) = tokio::task::spawn_blocking(move || {
        let run = |uid| {
            let out = run_as(uid, &python, &["-c", script, &uri]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        };
        (run(UID_PYTHON), run(UID_NOBODY_MATCHES))
    })
    .await
    .unwrap();

    assert_eq!(
        served["spiffe_id"], "spiffe://example.org/python-agent",
        "{served}"
    );
    assert_eq!(served["chain_len"], 1);
    assert_eq!(served["trust_domains"], serde_json::json!(["example.org"]));
    assert_eq!(served["authorities"], 1);
    let leaf = hex::decode(served["leaf_der_hex"].as_str().unwrap()).unwrap();
    check_x509_svid(
        &[leaf],
        &agent.handle.cache.ca().bundle,
        "spiffe://example.org/python-agent",
    );

    assert_eq!(denied["code"], "PERMISSION_DENIED", "{denied}");
}

/// Starts the relay as `UID_RELAY`; returns its socket once the relaying child listens.
fn start_relay(
    python: &Path,
    agent_socket: &Path,
    dir: &Path,
    mode: &str,
) -> (std::path::PathBuf, std::process::Child) {
    let relay_dir = dir.join(format!("relay-{mode}"));
    std::fs::create_dir(&relay_dir).unwrap();
    nix::unistd::chown(&relay_dir, Some(UID_RELAY.into()), Some(UID_RELAY.into())).unwrap();
    let relay = relay_dir.join("relay.sock");
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(python)
        .args(["-c", include_str!("python/relay.py")])
        .arg(agent_socket)
        .arg(&relay)
        .arg(mode)
        .uid(UID_RELAY)
        .gid(UID_RELAY)
        .env_clear()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    if mode == "exit" {
        // Reap the process that connected: its pid is now free for anyone.
        assert!(child.wait().unwrap().success());
    }
    (relay, child)
}

/// Starts a process as `uid` that gets exactly `pid`, by setting the kernel's last-pid counter
/// just below it (root only). Retries when some other fork takes the pid first.
fn recycle_pid(pid: u32, uid: u32) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut child = Command::new("/bin/sleep")
            .arg("60")
            .uid(uid)
            .gid(uid)
            .spawn()
            .unwrap();
        if child.id() == pid {
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not recycle pid {pid}");
}

fn effective_uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[tokio::test]
async fn a_recycled_pid_lends_no_identity() {
    if !require_root("a_recycled_pid_lends_no_identity") {
        return;
    }
    let Some(python) = python() else { return };
    for pin_mode in [PinMode::Pidfd, PinMode::ProcStartTime] {
        // The same user's other program has an identity of its own: the one an attacker wants.
        let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
        let entries = [
            entry("/relayed", &[&format!("unix:uid:{UID_RELAY}")], "5m", ""),
            entry(
                "/victim",
                &[
                    &format!("unix:uid:{UID_RELAY}"),
                    &format!("unix:path:{}", sleep.display()),
                ],
                "5m",
                "",
            ),
        ]
        .concat();
        let agent = start_agent_with(&entries, "", BuildOptions { pin_mode }).await;
        for mode in ["stay", "exit"] {
            let (python, socket, dir) = (
                python.clone(),
                agent.socket().to_path_buf(),
                agent.dir.path().to_path_buf(),
            );
            let (relay, mut child, mut impostor) = tokio::task::spawn_blocking(move || {
                let (relay, child) = start_relay(&python, &socket, &dir, mode);
                // The process that connected is gone; its pid now belongs to the same user's
                // /bin/sleep, which has an identity of its own. Reading /proc by pid would
                // hand that identity to whoever holds the old connection.
                let impostor = (mode == "exit").then(|| {
                    let impostor = recycle_pid(child.id(), UID_RELAY);
                    assert_eq!(effective_uid_of(child.id()), Some(UID_RELAY));
                    impostor
                });
                (relay, child, impostor)
            })
            .await
            .unwrap();
            let channel = tessera::cli::client::channel(&relay).await.unwrap();
            let mut client = tessera::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::with_interceptor(
                channel,
                |mut r: tonic::Request<()>| {
                    r.metadata_mut().insert("workload.spiffe.io", "true".parse().unwrap());
                    Ok(r)
                },
            );
            let result = tokio::time::timeout(
                Duration::from_secs(10),
                client.fetch_x509svid(X509svidRequest {}),
            )
            .await
            .unwrap();
            match mode {
                "stay" => {
                    let mut stream = result
                        .unwrap_or_else(|s| panic!("{pin_mode:?}: live peer refused: {s:?}"))
                        .into_inner();
                    let message = stream.message().await.unwrap().unwrap();
                    assert_eq!(message.svids[0].spiffe_id, "spiffe://example.org/relayed");
                }
                _ => {
                    let status = result.expect_err("a recycled pid must lend no identity");
                    assert_eq!(
                        status.code(),
                        tonic::Code::Unavailable,
                        "{pin_mode:?}: {status:?}"
                    );
                    assert_eq!(status.message(), "workload attestation failed");
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            if let Some(impostor) = impostor.as_mut() {
                let _ = impostor.kill();
                let _ = impostor.wait();
            }
        }
    }
}
