//! The real `tessera` binary as an operator runs it: configuration errors, systemd readiness,
//! reload on SIGHUP, draining on SIGTERM, and `tessera dev`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use tessera_harness::Process;

const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

fn tessera(args: &[&str]) -> std::process::Output {
    Command::new(TESSERA).args(args).output().unwrap()
}

/// Lines of a child's stdout, read on a thread so the test can wait with a deadline.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// `tessera <args>` as set up by `setup`, killed when dropped (or when this test dies).
fn spawn(args: &[&str], setup: impl FnOnce(&mut Command) -> &mut Command) -> Process {
    let mut command = tessera_harness::command(TESSERA);
    command.args(args);
    Process::spawn(setup(&mut command), format!("tessera {}", args.join(" "))).unwrap()
}

#[test]
fn bad_configurations_are_refused_with_exit_2_naming_file_and_key() {
    let dir = world_dir();
    let file = dir.path().join("agent.toml");
    let shown = file.display().to_string();
    let good_entry = entry("/w", &["unix:uid:1000"], "5m", "");
    let cases = [
        (
            config_text(
                dir.path(),
                &good_entry.replace("unix:uid:1000", "unix:color:blue"),
                "",
            ),
            "entry[0].selectors[0] = \"unix:color:blue\": unknown selector",
        ),
        (
            config_text(
                dir.path(),
                &good_entry.replace("spiffe://example.org/w", "spiffe://example.org/W/../x"),
                "",
            ),
            "entry[0].spiffe_id",
        ),
        (
            config_text(
                dir.path(),
                &good_entry.replace("\"5m\"", "\"5 minutes-ish\""),
                "",
            ),
            "entry[0].x509_ttl = \"5 minutes-ish\": not a duration",
        ),
        (
            config_text(dir.path(), &good_entry, "").replace("example.org\"\n", "EXAMPLE.org\"\n"),
            "trust_domain = \"EXAMPLE.org\"",
        ),
        (
            config_text(dir.path(), &good_entry, "bogus_key = 1"),
            "unknown field `bogus_key`",
        ),
        (
            "trust_domain = \n".to_string(),
            "TOML parse error at line 1",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&file, &text).unwrap();
        for verb in ["run", "check"] {
            let out = tessera(&["agent", verb, "--config", &shown]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "agent {verb}: {stderr}");
            assert!(
                stderr.contains(&shown) && stderr.contains(want),
                "agent {verb}: want {want:?} in {stderr}"
            );
        }
    }
    let out = tessera(&["agent", "run", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml: cannot read"));

    let out = tessera(&["svid", "fetch", "--socket", "tcp://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcp://127.0.0.1:1"));
    assert_eq!(
        tessera(&["agent", "run", "--no-such-flag"]).status.code(),
        Some(2)
    );

    std::fs::write(&file, config_text(dir.path(), &good_entry, "")).unwrap();
    let out = tessera(&["agent", "check", "--config", &shown]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("valid; trust domain example.org, standalone with 1 entries")
    );
}

fn fetch_ids(uri: &str) -> Vec<String> {
    let out = tessera(&["svid", "fetch", "--socket", uri, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["svids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn agent_notifies_systemd_reloads_on_sighup_and_drains_on_sigterm() {
    let dir = world_dir();
    let config = dir.path().join("agent.toml");
    let socket = dir.path().join("agent.sock");
    let uri = format!("unix://{}", socket.display());
    let uid = my_uid_selector();
    std::fs::write(
        &config,
        config_text(dir.path(), &entry("/before", &[&uid], "5m", ""), ""),
    )
    .unwrap();

    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let config_arg = config.display().to_string();
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = spawn(&["agent", "run", "--config", &config_arg], |c| {
        c.env("NOTIFY_SOCKET", &notify_path)
            .env("TESSERA_LOG", "info,tessera::agent::entries=debug")
            .stderr(log)
    });
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // READY means the socket accepts: no retry needed.
    assert_eq!(fetch_ids(&uri), ["spiffe://example.org/before"]);

    // A change the file poll cannot see (same size, same mtime): only SIGHUP picks it up.
    let modified = std::fs::metadata(&config).unwrap().modified().unwrap();
    std::fs::write(
        &config,
        config_text(dir.path(), &entry("/after_", &[&uid], "5m", ""), ""),
    )
    .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&config)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    // Two checks logged after the write: at least one of them began after it.
    let checks = || {
        std::fs::read_to_string(&log_path)
            .unwrap()
            .matches("entry file unchanged")
            .count()
    };
    let seen = checks();
    let deadline = Instant::now() + Duration::from_secs(10);
    while checks() < seen + 2 {
        assert!(
            Instant::now() < deadline,
            "the file poll never ran: {}",
            std::fs::read_to_string(&log_path).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        fetch_ids(&uri),
        ["spiffe://example.org/before"],
        "no reload without SIGHUP"
    );
    agent.signal(libc::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fetch_ids(&uri) != ["spiffe://example.org/after_"] {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the entries"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut watcher = spawn(&["svid", "watch", "--socket", &uri], |c| {
        c.stdout(Stdio::piped()).stderr(Stdio::piped())
    });
    let lines = lines_of(watcher.child_mut());
    lines
        .recv_timeout(Duration::from_secs(10))
        .expect("watch prints the first update");

    agent.signal(libc::SIGTERM).unwrap();
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(agent.wait_exit(Duration::from_secs(10)).unwrap().success());
    assert!(!socket.exists(), "socket removed on shutdown");
    let status = watcher.wait_exit(Duration::from_secs(5)).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(watcher.child_mut().stderr.as_mut().unwrap(), &mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("Unavailable") && stderr.contains("agent is shutting down"),
        "{stderr}"
    );
}

/// `tessera svid fetch --out dir`, which must succeed; its stdout.
fn fetch_into(uri: &str, dir: &Path) -> String {
    let out = tessera(&[
        "svid",
        "fetch",
        "--socket",
        uri,
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl verify` of a leaf (as a TLS client certificate) against `ca`, which must pass.
fn openssl_verify(ca: &Path, leaf: &Path) {
    let verify = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(ca)
        .arg(leaf)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[test]
fn svid_fetch_writes_pem_files_openssl_accepts() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let agent = runtime.block_on(start_agent(&entry(
        "/files",
        &[&my_uid_selector()],
        "5m",
        "",
    )));
    let out_dir = agent.dir.path().join("out");
    let stdout = fetch_into(&agent.uri(), &out_dir);
    assert!(
        stdout.starts_with("spiffe://example.org/files  serial "),
        "{stdout}"
    );
    // The remaining lifetime, for a person deciding whether the files are still good.
    assert!(
        stdout.contains(" (in 4m ") || stdout.contains(" (in 5m)"),
        "{stdout}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out_dir.join("svid_key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    openssl_verify(&out_dir.join("bundle.pem"), &out_dir.join("svid.pem"));
    // The key file holds the leaf's key.
    let key_pub = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(out_dir.join("svid_key.pem"))
        .output()
        .unwrap();
    let cert_pub = Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(out_dir.join("svid.pem"))
        .output()
        .unwrap();
    assert!(key_pub.status.success());
    assert_eq!(key_pub.stdout, cert_pub.stdout);
    runtime.block_on(agent.handle.stop()).unwrap();
}

#[test]
fn svid_commands_without_a_socket_name_the_variable() {
    let out = Command::new(TESSERA)
        .args(["svid", "fetch"])
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--socket"), "{stderr}");
    assert!(stderr.contains("SPIFFE_ENDPOINT_SOCKET"), "{stderr}");
}

#[test]
fn tessera_dev_serves_the_calling_user() {
    let dir = world_dir();
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    let first = run_dev(dir.path(), "30s");
    assert_eq!(
        fetch_ids(&first.uri),
        [format!("spiffe://tessera.dev/user/{user}")]
    );
    // The server is there too: its inventory holds the entry, owned by the user.
    let entries = admin_json(&first.admin, &["entry", "list"]);
    assert_eq!(entries[0]["owner"], user.as_str(), "{entries}");
    assert_eq!(entries[0]["x509_ttl_seconds"], 30, "{entries}");
    let nodes = admin_json(&first.admin, &["node", "list"]);
    assert_eq!(nodes[0]["attestation"], "join_token", "{nodes}");
    let bundle = admin_json(&first.admin, &["bundle", "show"]);
    // JWT-SVIDs signed by the dev server, and WIT-SVIDs (on in dev mode).
    let jwt = tessera(&["jwt", "fetch", "--socket", &first.uri, "--audience", "api"]);
    assert!(jwt.status.success(), "{jwt:?}");
    let valid = tessera(&[
        "jwt",
        "validate",
        "--socket",
        &first.uri,
        "--audience",
        "api",
        String::from_utf8_lossy(&jwt.stdout).trim(),
    ]);
    assert!(valid.status.success(), "{valid:?}");
    let wit = tessera(&["--output", "json", "wit", "fetch", "--socket", &first.uri]);
    assert!(wit.status.success(), "{wit:?}");
    first.stop();

    // The same directory again: the same root and entry, the TTL brought up to date.
    let second = run_dev(dir.path(), "2h");
    assert_eq!(
        fetch_ids(&second.uri),
        [format!("spiffe://tessera.dev/user/{user}")]
    );
    let resumed = admin_json(&second.admin, &["entry", "list"]);
    assert_eq!(resumed.as_array().unwrap().len(), 1, "{resumed}");
    assert_eq!(resumed[0]["id"], entries[0]["id"], "{resumed}");
    assert_eq!(resumed[0]["x509_ttl_seconds"], 7200, "{resumed}");
    assert_eq!(admin_json(&second.admin, &["bundle", "show"]), bundle);
    second.stop();
}

/// A running `tessera dev` and the sockets its banner printed.
struct Dev {
    process: Process,
    uri: String,
    admin: String,
    /// The rest of its standard output, read until it exits.
    _output: mpsc::Receiver<String>,
}

impl Dev {
    /// SIGTERM, a clean exit, and the workload socket gone.
    fn stop(mut self) {
        self.process.signal(libc::SIGTERM).unwrap();
        assert!(
            self.process
                .wait_exit(Duration::from_secs(10))
                .unwrap()
                .success()
        );
        assert!(!Path::new(&self.uri["unix://".len()..]).exists());
    }
}

/// Starts `tessera dev --dir DIR --ttl TTL` and reads its banner up to the admin socket line.
fn run_dev(dir: &Path, ttl: &str) -> Dev {
    let dir_arg = dir.display().to_string();
    let mut process = spawn(&["dev", "--ttl", ttl, "--dir", &dir_arg], |c| {
        c.stdout(Stdio::piped()).stderr(Stdio::null())
    });
    let lines = lines_of(process.child_mut());
    let mut uri = None;
    let admin = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("dev prints its sockets");
        if let Some(found) = line.trim().strip_prefix("Workload API:") {
            uri = Some(found.trim().to_owned());
        }
        if let Some(found) = line.trim().strip_prefix("admin socket:") {
            break found.trim().to_owned();
        }
    };
    let uri = uri.expect("the Workload API socket is printed before the admin socket");
    Dev {
        process,
        uri,
        admin,
        _output: lines,
    }
}

/// `tessera <args> --output json --admin-socket <admin>`, asserting success; the parsed output.
fn admin_json(admin: &str, args: &[&str]) -> serde_json::Value {
    let mut argv = args.to_vec();
    argv.extend(["--output", "json", "--admin-socket", admin]);
    let out = tessera(&argv);
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn deploy_files_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tessera(&[
        "agent",
        "check",
        "--config",
        root.join("deploy/agent.example.toml").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = tessera(&[
        "server",
        "check",
        "--config",
        root.join("deploy/server.example.toml").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // systemd checks the units offline; point them at the binary under test.
    let agent_unit = std::fs::read_to_string(root.join("deploy/tessera-agent.service")).unwrap();
    assert!(
        agent_unit.contains("Type=notify")
            && agent_unit.contains("ExecReload=/bin/kill -HUP $MAINPID")
    );
    let server_unit = std::fs::read_to_string(root.join("deploy/tessera-server.service")).unwrap();
    assert!(server_unit.contains("Type=notify") && server_unit.contains("server run"));
    let svid_unit = std::fs::read_to_string(root.join("deploy/tessera-svid@.service")).unwrap();
    assert!(svid_unit.contains("svid watch") && svid_unit.contains("%i"));
    let dir = tempfile::tempdir().unwrap();
    for (name, unit) in [
        ("tessera-agent.service", agent_unit),
        ("tessera-server.service", server_unit),
        // A template is checked as one of its instances.
        ("tessera-svid@nginx.service", svid_unit),
    ] {
        let unit_path = dir.path().join(name);
        std::fs::write(&unit_path, unit.replace("/usr/local/bin/tessera", TESSERA)).unwrap();
        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit_path)
            .output()
            .expect("systemd-analyze is installed (scripts/test.sh installs systemd)");
        assert!(
            verify.status.success() && verify.stderr.is_empty(),
            "{name}: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
}

#[test]
fn an_operators_ca_signs_the_svids() {
    let dir = world_dir();
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca-key.pem"));
    // An operator's CA, made the way an operator would: with openssl.
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-days", "30", "-subj", "/O=Example Ops/CN=example.org root"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .args(["-addext", "subjectAltName=URI:spiffe://example.org"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let extra = format!(
        "[ca]\ncert_file = \"{}\"\nkey_file = \"{}\"",
        cert.display(),
        key.display()
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        config_text(
            dir.path(),
            &entry("/ops", &[&my_uid_selector()], "5m", ""),
            &extra,
        ),
    )
    .unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let handle = runtime
        .block_on(tessera::agent::build(
            tessera::agent::AgentConfig::load(&config).unwrap(),
            Default::default(),
        ))
        .unwrap();
    let out_dir = dir.path().join("out");
    fetch_into(&handle.socket_uri(), &out_dir);
    let ders = |path: &Path| -> Vec<Vec<u8>> {
        pem::parse_many(std::fs::read(path).unwrap())
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents())
            .collect()
    };
    assert_eq!(
        ders(&out_dir.join("bundle.pem")),
        ders(&cert),
        "the bundle is the operator's CA"
    );
    assert!(
        !std::fs::read(out_dir.join("svid.pem"))
            .unwrap()
            .contains(&b'\r'),
        "LF line endings"
    );
    openssl_verify(&cert, &out_dir.join("svid.pem"));
    runtime.block_on(handle.stop()).unwrap();
    assert!(
        !dir.path().join("state").join("ca_key.pem").exists(),
        "no CA generated beside the operator's"
    );
}
