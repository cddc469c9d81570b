//! Tasks in server mode, end to end with real processes: a chain of three tasks on one node,
//! ended by an operator through the server, and a task whose process exits; in each case a
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
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
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

/// The three-level chain on `agent`: each level fetches its SVID into `dirs[n]`, the last then
/// sleeps.
fn spawn_chain(agent: &AgentProcess, level: &Path, dirs: &[PathBuf]) -> Child {
    let bin = env!("CARGO_BIN_EXE_tessera");
    let uri = agent.uri();
    let level = level.to_str().unwrap();
    let d: Vec<&str> = dirs.iter().map(|d| d.to_str().unwrap()).collect();
    let mut args = task_run_args(&uri, "coder");
    args.extend([level, d[0], bin]);
    args.extend(task_run_args(&uri, "reviewer"));
    args.extend([level, d[1], bin]);
    args.extend(task_run_args(&uri, "tester"));
    args.extend([level, d[2], "/bin/sleep", "60"]);
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
    let level = dir.path().join("level.sh");
    std::fs::write(
        &level,
        format!(
            "#!/bin/sh\nout=$1\nshift\n{} svid fetch --socket {} --out \"$out\" >/dev/null || exit 3\nexec \"$@\"\n",
            env!("CARGO_BIN_EXE_tessera"),
            a.uri()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&level, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dirs: Vec<PathBuf> = (1..=3)
        .map(|n| dir.path().join(format!("level{n}")))
        .collect();
    let mut chain = spawn_chain(&a, &level, &dirs);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !dirs[2].join("svid.pem").exists() {
        assert!(
            Instant::now() < deadline,
            "the chain did not start\n{}",
            a.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
