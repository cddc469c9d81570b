//! A crash at any point leaves state an agent can start from: node credentials left apart by a
//! crash between two renames are found at start (x509pop attests again; a join token says what
//! to do), and every state file replaced by a rename is made durable by an fsync of its
//! directory, as `strace` shows the real processes doing.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;

/// Writes a fresh private key over `path`: what a crash between writing a new key and its new
/// certificate leaves (the new key beside the old certificate).
fn replace_key(path: &Path) {
    let key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(path, key.serialize_pem()).unwrap();
}

async fn fetch_identity(agent: &AgentProcess, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = async {
            let mut client = tessera::cli::client::connect(&agent.uri()).await.ok()?;
            let mut stream = client
                .fetch_x509svid(tessera::proto::workload::X509svidRequest {})
                .await
                .ok()?
                .into_inner();
            let message = stream.message().await.ok()??;
            message
                .svids
                .iter()
                .any(|s| s.spiffe_id == id)
                .then_some(())
        }
        .await;
        if found.is_some() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {id} from the agent:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_join_token_node_with_credentials_left_apart_says_what_to_do() {
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let id = format!("spiffe://{TRUST_DOMAIN}/joined");
    server.create_entry("/joined", &[]);
    let mut agent = AgentProcess::start(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &format!("join_token = \"{}\"", server.join_token()),
    );
    fetch_identity(&agent, &id).await;
    agent.kill();

    let upstream = agent.state_dir.join("upstream");
    replace_key(&upstream.join("node_svid_key.pem"));
    agent.spawn_again();
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status}");
    let log = agent.logs();
    for expected in [
        "node_svid_key.pem does not match the public key in node_svid.pem".to_owned(),
        "create a new token".to_owned(),
        "server.join_token".to_owned(),
        upstream.join("node_svid.pem").display().to_string(),
        upstream.join("node_ca_key.pem").display().to_string(),
        upstream.join("node_id").display().to_string(),
    ] {
        assert!(log.contains(&expected), "{expected:?} not in:\n{log}");
    }

    // Doing what it says works: the files removed and a new token, the node joins again.
    for name in [
        "node_svid.pem",
        "node_svid_key.pem",
        "node_ca.pem",
        "node_ca_key.pem",
        "node_id",
    ] {
        std::fs::remove_file(upstream.join(name)).unwrap();
    }
    let config = std::fs::read_to_string(&agent.config_path).unwrap();
    let old_token = config
        .lines()
        .find_map(|l| l.strip_prefix("join_token = "))
        .unwrap()
        .to_owned();
    let config = config.replace(&old_token, &format!("\"{}\"", server.join_token()));
    std::fs::write(&agent.config_path, config).unwrap();
    agent.spawn_again();
    agent.wait_ready();
    fetch_identity(&agent, &id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_x509pop_node_with_credentials_left_apart_attests_again() {
    let dir = world_dir();
    let (ca_bundle, cert, key) = x509pop_files(dir.path(), "pop", "node-1");
    let server = ServerProcess::start(
        dir.path(),
        "server",
        &format!("[x509pop]\nca_bundle_file = \"{}\"\n", ca_bundle.display()),
    );
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let id = format!("spiffe://{TRUST_DOMAIN}/popped");
    server.create_entry("/popped", &[]);
    let mut agent = AgentProcess::start(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &x509pop_attestation(&cert, &key),
    );
    fetch_identity(&agent, &id).await;
    agent.kill();

    let upstream = agent.state_dir.join("upstream");
    let old_ca = std::fs::read(upstream.join("node_ca.pem")).unwrap();
    replace_key(&upstream.join("node_ca_key.pem"));
    agent.spawn_again();
    agent.wait_ready();
    fetch_identity(&agent, &id).await;
    let log = agent.logs();
    assert!(
        log.contains("node_ca_key.pem does not match the public key in node_ca.pem")
            && log.contains("attesting again with x509pop"),
        "{log}"
    );
    assert_ne!(
        std::fs::read(upstream.join("node_ca.pem")).unwrap(),
        old_ca,
        "a new node CA was granted"
    );
}

/// The calls each thread made, from `strace -ff -o <prefix>` (one file per thread, so no call
/// is split by another thread's).
fn traced_threads(prefix: &Path) -> Vec<Vec<String>> {
    let name = prefix.file_name().unwrap().to_str().unwrap().to_owned();
    std::fs::read_dir(prefix.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(&name))
                .is_some_and(|rest| rest.starts_with('.'))
        })
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| l.trim().to_owned())
                .collect()
        })
        .collect()
}

/// The string arguments of a traced call.
fn quoted_args(text: &str) -> Vec<String> {
    text.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Every successful rename a thread made, and whether it then opened the target's directory
/// and fsynced it before its next rename: (target path, synced).
fn renames_and_dir_syncs(calls: &[String]) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        if !call.starts_with("rename") || !call.ends_with("= 0") {
            continue;
        }
        let Some(target) = quoted_args(call).pop() else {
            continue;
        };
        let target = PathBuf::from(target);
        let dir = target.parent().unwrap().display().to_string();
        let mut dir_fds: HashSet<String> = HashSet::new();
        let mut synced = false;
        for later in &calls[i + 1..] {
            if later.starts_with("rename") {
                break;
            }
            if later.starts_with("openat(")
                && quoted_args(later).first() == Some(&dir)
                && let Some(fd) = later.rsplit("= ").next()
            {
                dir_fds.insert(fd.trim().to_owned());
            }
            if let Some(rest) = later.strip_prefix("fsync(")
                && let Some((fd, result)) = rest.split_once(')')
                && dir_fds.contains(fd)
                && result.trim().ends_with("= 0")
            {
                synced = true;
                break;
            }
        }
        out.push((target, synced));
    }
    out
}

fn strace(prefix: &Path) -> Command {
    let mut command = Command::new("strace");
    command
        .args(["-ff", "-qq", "-o"])
        .arg(prefix)
        .args(["-e", "trace=openat,rename,renameat,renameat2,fsync"])
        .arg(TESSERA);
    command
}

fn spawn_traced(prefix: &Path, args: &[&str], log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    strace(prefix)
        .args(args)
        .env("TESSERA_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("strace runs (it is part of the test set-up)")
}

fn wait_socket(socket: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "exited with {status}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{} not served", socket.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the traced agent with SIGTERM (an orderly stop) and waits for strace to finish.
fn terminate(strace: &mut Child) {
    let children = format!("/proc/{0}/task/{0}/children", strace.id());
    let traced: Vec<i32> = std::fs::read_to_string(children)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect();
    for pid in traced {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = strace.wait();
}

fn assert_all_synced(prefix: &Path, must_include: &[&str], what: &str) {
    let renames: Vec<(PathBuf, bool)> = traced_threads(prefix)
        .iter()
        .flat_map(|calls| renames_and_dir_syncs(calls))
        .collect();
    for name in must_include {
        assert!(
            renames
                .iter()
                .any(|(path, _)| path.file_name().is_some_and(|n| n == *name)),
            "{what}: no rename of {name} traced: {renames:?}"
        );
    }
    let unsynced: Vec<&PathBuf> = renames
        .iter()
        .filter(|(_, synced)| !synced)
        .map(|(path, _)| path)
        .collect();
    assert!(
        unsynced.is_empty(),
        "{what}: renamed without an fsync of the directory: {unsynced:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_state_file_rename_is_followed_by_a_directory_fsync() {
    let dir = world_dir();

    // Standalone: the agent's own CA and bundle.
    let standalone = dir.path().join("standalone");
    std::fs::create_dir(&standalone).unwrap();
    let config = standalone.join("agent.toml");
    std::fs::write(
        &config,
        config_text(
            &standalone,
            &entry("/traced", &[&my_uid_selector()], "5m", ""),
            "",
        ),
    )
    .unwrap();
    let trace = dir.path().join("standalone.trace");
    let log = dir.path().join("standalone.log");
    let mut child = spawn_traced(
        &trace,
        &["agent", "run", "--config", &config.display().to_string()],
        &log,
    );
    wait_socket(&standalone.join("agent.sock"), &mut child, &log);
    // `svid fetch --out` replaces its files the same way.
    let out_dir = dir.path().join("fetched");
    std::fs::create_dir(&out_dir).unwrap();
    let fetch_trace = dir.path().join("fetch.trace");
    let socket_uri = format!("unix://{}", standalone.join("agent.sock").display());
    let status = strace(&fetch_trace)
        .args(["svid", "fetch", "--socket", &socket_uri, "--out"])
        .arg(&out_dir)
        .status()
        .unwrap();
    assert!(status.success());
    terminate(&mut child);
    assert_all_synced(
        &trace,
        &["ca_key.pem", "ca_cert.pem", "bundle.pem"],
        "standalone agent",
    );
    assert_all_synced(
        &fetch_trace,
        &["svid.pem", "svid_key.pem", "bundle.pem"],
        "svid fetch --out",
    );

    // Server mode: the node's credentials, bundle and entries, and the event spool's cursor.
    let server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    server.create_entry("/traced", &[]);
    let node = dir.path().join("node");
    let node_config = dir.path().join("node.toml");
    std::fs::write(
        &node_config,
        format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\nsocket_path = \"{}\"\nstate_dir = \"{}\"\n\n[server]\naddress = \"{}\"\ntrust_bundle_file = \"{}\"\njoin_token = \"{}\"\n",
            node.join("agent.sock").display(),
            node.display(),
            server.address,
            bundle.display(),
            server.join_token(),
        ),
    )
    .unwrap();
    let node_trace = dir.path().join("node.trace");
    let node_log = dir.path().join("node.log");
    let mut child = spawn_traced(
        &node_trace,
        &[
            "agent",
            "run",
            "--config",
            &node_config.display().to_string(),
        ],
        &node_log,
    );
    wait_socket(&node.join("agent.sock"), &mut child, &node_log);
    // A fetch records an issuance; once the server has it, the spool's cursor moves.
    let mut client =
        tessera::cli::client::connect(&format!("unix://{}", node.join("agent.sock").display()))
            .await
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let served = match client
            .fetch_x509svid(tessera::proto::workload::X509svidRequest {})
            .await
        {
            Ok(response) => response.into_inner().message().await.ok().flatten(),
            Err(_) => None,
        };
        if served.is_some_and(|m| !m.svids.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "no identity from the node");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while !node.join("spool/acked").exists() {
        assert!(
            Instant::now() < deadline,
            "no acknowledgement:\n{}",
            std::fs::read_to_string(&node_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    terminate(&mut child);
    assert_all_synced(
        &node_trace,
        &[
            "node_svid_key.pem",
            "node_svid.pem",
            "node_ca_key.pem",
            "node_ca.pem",
            "bundle.pem",
            "node_id",
            "entries.json",
            "acked",
        ],
        "server-mode agent",
    );
}
