//! Tasks in server mode, end to end with real processes: a chain of three tasks on one node,
//! ended by an operator through the server, a third level the server's rules do not allow
//! (ended as an anomaly), and a task whose process exits; in each case a
//! relying party on the other node stops accepting the tasks' certificates, and the server's
//! task inventory says how each task ended.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;

struct Cluster {
    dir: tempfile::TempDir,
    server: ServerProcess,
    a: AgentProcess,
    b: AgentProcess,
}

/// A server, two join-token agents, three task entries (coder may delegate to reviewer, which
/// may delegate to tester) and a standing `/verifier` for this test's uid on every node.
fn cluster() -> Cluster {
    cluster_with("")
}

/// As `cluster`, with `server_config` added to the server's configuration.
fn cluster_with(server_config: &str) -> Cluster {
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", server_config);
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let join = |name: &str| {
        AgentProcess::start(
            dir.path(),
            name,
            &server.address,
            &bundle,
            &format!("join_token = \"{}\"", server.join_token()),
        )
    };
    let (a, b) = (join("agent-a"), join("agent-b"));
    for (id, delegates) in [
        ("tester", None),
        ("reviewer", Some("tester")),
        ("coder", Some("reviewer")),
    ] {
        let path = format!("/{id}");
        let mut extra = vec!["--id", id, "--activation", "task"];
        if let Some(delegate) = delegates {
            extra.extend(["--delegate-to", delegate]);
        }
        server.create_entry(&path, &extra);
    }
    server.create_entry("/verifier", &[]);
    Cluster { dir, server, a, b }
}

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .unwrap()
}

/// `svid verify` of `cert` on `agent` until it answers `accepted` (exit 0) or refused (exit
/// 1), for at most 10 s; the last output.
fn verify_until(agent: &AgentProcess, cert: &Path, accepted: bool) -> Output {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = tessera(&[
            "svid",
            "verify",
            "--socket",
            &agent.uri(),
            "--cert",
            cert.to_str().unwrap(),
        ]);
        if out.status.code() == Some(if accepted { 0 } else { 1 }) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{} not {} within 10 s: {out:?}\n{}",
            cert.display(),
            if accepted { "accepted" } else { "refused" },
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The server's tasks (`task list --server --all`), polled until `done` holds, for at most
/// 10 s.
fn server_tasks_until(
    server: &ServerProcess,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = server.admin_json(&["task", "list", "--server", "--all"]);
        let tasks = listed.as_array().cloned().unwrap_or_default();
        if done(&tasks) {
            return tasks;
        }
        assert!(
            Instant::now() < deadline,
            "server tasks not as expected: {tasks:?}\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn task_run_args<'a>(uri: &'a str, entry: &'a str) -> Vec<&'a str> {
    vec![
        "task",
        "run",
        "--socket",
        uri,
        "--entry",
        entry,
        "--purpose",
        "cross-node test",
        "--",
    ]
}

/// A level of a chain, `level.sh OUT CMD...`: fetches its SVID from `agent` into OUT, then runs
/// the next level.
fn write_level_script(dir: &Path, agent: &AgentProcess) -> PathBuf {
    let level = dir.join("level.sh");
    std::fs::write(
        &level,
        format!(
            "#!/bin/sh\nout=$1\nshift\n{} svid fetch --socket {} --out \"$out\" >/dev/null || exit 3\nexec \"$@\"\n",
            env!("CARGO_BIN_EXE_tessera"),
            agent.uri()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&level, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    level
}

/// The three-level chain on `agent`: each level fetches its SVID into `dirs[n]`, the last then
/// sleeps.
fn spawn_chain(agent: &AgentProcess, level: &Path, dirs: &[PathBuf]) -> Child {
    let level = level.to_str().unwrap();
    let innermost = [level, dirs[2].to_str().unwrap(), "/bin/sleep", "60"];
    spawn_chain_to(agent, level, dirs, &innermost)
}

/// The chain with `innermost` as the third level's command.
fn spawn_chain_to(
    agent: &AgentProcess,
    level: &str,
    dirs: &[PathBuf],
    innermost: &[&str],
) -> Child {
    let bin = env!("CARGO_BIN_EXE_tessera");
    let uri = agent.uri();
    let d: Vec<&str> = dirs.iter().map(|d| d.to_str().unwrap()).collect();
    let mut args = task_run_args(&uri, "coder");
    args.extend([level, d[0], bin]);
    args.extend(task_run_args(&uri, "reviewer"));
    args.extend([level, d[1], bin]);
    args.extend(task_run_args(&uri, "tester"));
    args.extend(innermost);
    use std::os::unix::process::CommandExt;
    Command::new(bin)
        .args(&args)
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn an_operator_ends_a_task_chain_and_another_node_refuses_every_level() {
    let Cluster { dir, server, a, b } = cluster();
    let level = write_level_script(dir.path(), &a);
    let dirs: Vec<PathBuf> = (1..=3)
        .map(|n| dir.path().join(format!("level{n}")))
        .collect();
    let mut chain = spawn_chain(&a, &level, &dirs);
    until_chain_started(&a, &dirs);
    // Node b's relying party accepts every level while the tasks run.
    for d in &dirs {
        verify_until(&b, &d.join("svid.pem"), true);
    }
    let tasks = server_tasks_until(&server, |t| t.len() == 3);
    let root = tasks
        .iter()
        .find(|t| t["chain"].as_array().is_some_and(|c| c.len() == 1))
        .unwrap();
    let root_id = root["task_id"].as_str().unwrap().to_owned();
    assert_eq!(root["entry_id"], "coder");
    assert_eq!(root["owner"], "tests");
    assert_eq!(root["purpose"], "cross-node test");
    assert!(
        root["node_id"]
            .as_str()
            .is_some_and(|n| n.starts_with("jt-"))
    );
    assert_eq!(root["end_reason"], serde_json::Value::Null);

    // The operator ends the root task through the server.
    let ordered = server.admin_json(&[
        "task",
        "end",
        &root_id,
        "--server",
        "--reason",
        "the issue was fixed by hand",
    ]);
    assert_eq!(ordered.as_array().map(Vec::len), Some(3), "{ordered}");
    for d in &dirs {
        let refused = verify_until(&b, &d.join("svid.pem"), false);
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("revoked"),
            "{refused:?}"
        );
    }
    let tasks = server_tasks_until(&server, |t| t.iter().all(|t| !t["end_reason"].is_null()));
    let mut reasons: Vec<(usize, String)> = tasks
        .iter()
        .map(|t| {
            (
                t["chain"].as_array().unwrap().len(),
                t["end_reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            (1, "operator".to_owned()),
            (2, "parent_ended".to_owned()),
            (3, "parent_ended".to_owned())
        ]
    );
    // The inventory lists them with the chain.
    let inventory = server.admin_json(&["inventory"]);
    assert_eq!(
        inventory["tasks"].as_array().map(Vec::len),
        Some(3),
        "{inventory}"
    );
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(chain.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = chain.wait();
}

/// Waits until the chain's innermost level has its SVID.
fn until_chain_started(agent: &AgentProcess, dirs: &[PathBuf]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !dirs[2].join("svid.pem").exists() {
        assert!(
            Instant::now() < deadline,
            "the chain did not start\n{}",
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_task_the_server_finds_against_its_rules_is_ended_as_an_anomaly_on_every_node() {
    // The server allows two levels of delegation; agent a, left at its default, allows four.
    // The third level is started on a, and the server, checking the task_started event
    // against its own rules, orders it ended.
    let Cluster { dir, server, a, b } = cluster_with("max_task_depth = 2");
    let level = write_level_script(dir.path(), &a);
    let dirs: Vec<PathBuf> = (1..=3)
        .map(|n| dir.path().join(format!("level{n}")))
        .collect();
    // The third level fetches once as it starts (before or after the server's order, which
    // comes within milliseconds), and once more when told to, after the order.
    let bin = env!("CARGO_BIN_EXE_tessera");
    let (uri, d3) = (a.uri(), dirs[2].display());
    let third = format!(
        "mkdir -p {d3}/again; {bin} svid fetch --socket {uri} --out {d3} >/dev/null 2>{d3}/first.err; echo $? > {d3}/first
while [ ! -e {d3}/go ]; do sleep 0.02; done
{bin} svid fetch --socket {uri} --out {d3}/again >/dev/null 2>{d3}/second.err; echo $? > {d3}/second
exec sleep 60"
    );
    let mut chain = spawn_chain_to(
        &a,
        level.to_str().unwrap(),
        &dirs,
        &["/bin/sh", "-c", &third],
    );
    let tasks = server_tasks_until(&server, |t| {
        t.len() == 3 && t.iter().any(|t| !t["end_reason"].is_null())
    });
    let ended: Vec<_> = tasks
        .iter()
        .filter(|t| !t["end_reason"].is_null())
        .collect();
    assert_eq!(ended.len(), 1, "{tasks:?}");
    assert_eq!(ended[0]["end_reason"], "anomaly", "{tasks:?}");
    assert_eq!(ended[0]["chain"].as_array().map(Vec::len), Some(3));
    let task_id = ended[0]["task_id"].as_str().unwrap().to_owned();
    let spiffe_id = format!("spiffe://example.org/tester/task/{task_id}");

    let read = |name: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(text) = std::fs::read_to_string(dirs[2].join(name))
                && text.ends_with('\n')
            {
                return text.trim().to_owned();
            }
            assert!(Instant::now() < deadline, "no {name}\n{}", a.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Every process here runs as this test's uid, which the standing /verifier matches: outside
    // a task, that is what it gets.
    let verifier = "spiffe://example.org/verifier";
    assert_eq!(read("first"), "0", "{}", read("first.err"));
    match leaf_identity(&dirs[2]) {
        // It fetched before the order: node b refuses that certificate now.
        (_, Some(claims)) => {
            assert_eq!(claims.task_id, task_id);
            let refused = verify_until(&b, &dirs[2].join("svid.pem"), false);
            assert!(
                String::from_utf8_lossy(&refused.stderr).contains("revoked"),
                "{refused:?}"
            );
        }
        (spiffe_id, None) => assert_eq!(spiffe_id, verifier),
    }
    // After the order the third level has no task identity: not its own task's, and not the
    // reviewer's either, whose task's process started it.
    std::fs::write(dirs[2].join("go"), "").unwrap();
    assert_eq!(read("second"), "0", "{}", read("second.err"));
    assert_eq!(
        leaf_identity(&dirs[2].join("again")),
        (verifier.to_owned(), None)
    );
    // The two levels within the server's rules go on.
    for d in &dirs[..2] {
        verify_until(&b, &d.join("svid.pem"), true);
    }
    // The audit trail: the third level's issuance (minted as it started) carries its task and
    // chain, and its revocation says why.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = server.admin_json(&["events", "list", "--spiffe-id", &spiffe_id]);
        let events = events.as_array().cloned().unwrap_or_default();
        let of_kind = |kind: &str| events.iter().find(|e| e["kind"] == kind).cloned();
        if let (Some(issued), Some(revoked)) = (of_kind("svid_issued"), of_kind("svid_revoked")) {
            for event in [&issued, &revoked] {
                assert_eq!(event["task_id"], task_id.as_str(), "{event}");
                assert_eq!(event["chain"].as_array().map(Vec::len), Some(3), "{event}");
            }
            assert_eq!(issued["policy_version"], 0, "no policy: entries decided");
            assert_eq!(revoked["reason"], "task_ended", "{revoked}");
            assert_eq!(issued["serial"], revoked["serial"]);
            break;
        }
        assert!(Instant::now() < deadline, "{events:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(chain.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = chain.wait();
}

#[test]
fn a_task_whose_command_exits_is_refused_on_another_node() {
    let Cluster {
        dir, server, a, b, ..
    } = cluster();
    let out_dir = dir.path().join("once");
    let uri = a.uri();
    let mut args = task_run_args(&uri, "coder");
    let out = out_dir.to_str().unwrap();
    args.extend([
        env!("CARGO_BIN_EXE_tessera"),
        "svid",
        "fetch",
        "--socket",
        &uri,
        "--out",
        out,
    ]);
    // The first sync may still be on its way: retry until the entry is there.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ran = tessera(&args);
        if ran.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{ran:?}\n{}", a.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = verify_until(&b, &out_dir.join("svid.pem"), false);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("revoked"),
        "{refused:?}"
    );
    let tasks = server_tasks_until(&server, |t| {
        t.iter()
            .any(|t| t["end_reason"] == "process_exited" || t["end_reason"] == "ended")
    });
    assert_eq!(tasks.len(), 1, "{tasks:?}");
}

#[test]
fn a_task_survives_an_agent_restart_while_the_server_is_down() {
    let Cluster {
        dir,
        mut server,
        mut a,
        b,
    } = cluster();
    let out_dir = dir.path().join("survivor");
    let bin = env!("CARGO_BIN_EXE_tessera");
    let uri = a.uri();
    let script = format!(
        "{bin} svid fetch --socket {uri} --out {} >/dev/null && exec /bin/sleep 60",
        out_dir.display()
    );
    let mut args = task_run_args(&uri, "coder");
    args.extend(["/bin/sh", "-c", &script]);
    use std::os::unix::process::CommandExt;
    let spawn = |args: &[&str]| {
        Command::new(bin)
            .args(args)
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // Until the first sync has brought the entry, `task run` is refused and exits: run it again.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut runner = spawn(&args);
    while !out_dir.join("svid.pem").exists() {
        assert!(Instant::now() < deadline, "no task started\n{}", a.logs());
        if runner.try_wait().unwrap().is_some() {
            runner = spawn(&args);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tasks = server_tasks_until(&server, |t| t.len() == 1);
    let task_id = tasks[0]["task_id"].as_str().unwrap().to_owned();

    // The server goes away, then the agent restarts without it.
    server.kill();
    a.kill();
    a.spawn_again();
    a.wait_ready();
    let listed = tessera(&["task", "list", "--socket", &a.uri(), "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        listed[0]["task_id"],
        task_id.as_str(),
        "{listed}\n{}",
        a.logs()
    );
    assert_eq!(listed[0]["end_reason"], serde_json::Value::Null);
    verify_until(&a, &out_dir.join("svid.pem"), true);

    // Ended while the server is still away: refused on this node at once, and on the other
    // node once the server is back and the CRL has travelled.
    let ended = tessera(&["task", "end", "--socket", &a.uri(), &task_id]);
    assert!(ended.status.success(), "{ended:?}");
    verify_until(&a, &out_dir.join("svid.pem"), false);
    server.restart();
    verify_until(&b, &out_dir.join("svid.pem"), false);
    server_tasks_until(&server, |t| {
        t.first().is_some_and(|t| t["end_reason"] == "ended")
    });
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(runner.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = runner.wait();
}

#[test]
fn a_tasks_jwt_is_refused_on_another_node_once_the_task_ends() {
    // The directory holds the sockets: it must outlive the test.
    let Cluster {
        dir: _dir,
        server,
        a,
        b,
    } = cluster();
    let uri = a.uri();
    let mut args = task_run_args(&uri, "coder");
    args.extend([
        env!("CARGO_BIN_EXE_tessera"),
        "jwt",
        "fetch",
        "--socket",
        &uri,
        "--audience",
        "api",
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let token = loop {
        let ran = tessera(&args);
        if ran.status.success() {
            break String::from_utf8(ran.stdout).unwrap().trim().to_owned();
        }
        assert!(Instant::now() < deadline, "{ran:?}\n{}", a.logs());
        std::thread::sleep(Duration::from_millis(100));
    };
    // The command exited, so its task ended: node b refuses the task's token.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = tessera(&[
            "jwt",
            "validate",
            "--socket",
            &b.uri(),
            "--audience",
            "api",
            &token,
        ]);
        if out.status.code() == Some(1) {
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(why.contains("revoked"), "{why}");
            break;
        }
        assert!(out.status.success(), "{out:?}");
        assert!(Instant::now() < deadline, "still valid on b\n{}", b.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let listed = server.admin_json(&["jwt", "list"]);
    // The task's token (its process also matches the standing /verifier: a token of its own,
    // untouched).
    let token_record = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["task_id"] != "")
        .expect("the task's token in the inventory");
    assert_eq!(token_record["reason"], "task_ended", "{listed}");
    assert!(
        token_record["spiffe_id"]
            .as_str()
            .unwrap()
            .contains("/coder/task/"),
        "{listed}"
    );
    assert_eq!(token_record["entry_id"], "coder", "{listed}");
}
