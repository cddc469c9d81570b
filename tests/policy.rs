//! Authorisation policies with real processes: a standalone agent's `policy_file` deciding who
//! may start tasks and be issued SVIDs, a policy changed under a live task and a live standing
//! SVID (both revoked, as a relying party sees), and the server's policy: refused with line and
//! column, versioned, tested, and synced to an agent that enforces it.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .unwrap()
}

async fn tessera_async(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Allows starting `coder` tasks only with a purpose that mentions an issue, and issuing every
/// identity except to `/denied` at night-independent times: a standing identity `/web` and the
/// task identities are permitted by `issue-all`, unless `no-web` (added later) forbids `/web`.
const POLICY: &str = r#"
@id("start-coder-for-issues")
permit(principal, action == Tessera::Action::"StartTask", resource)
when { resource.id == "coder" && context has requested_purpose && context.requested_purpose like "*issue*" };

@id("issue-all")
permit(principal, action == Tessera::Action::"Issue", resource);
"#;

fn entries(uid: &str) -> String {
    [
        entry(
            "/coder",
            &[uid],
            "5m",
            "id = \"coder\"\nactivation = \"task\"",
        ),
        entry("/web", &[uid], "5m", "id = \"web\""),
        entry("/verifier", &[uid], "5m", "id = \"verifier\""),
    ]
    .concat()
}

async fn verify(agent: &TestAgent, cert: &Path) -> Output {
    tessera_async(&[
        "svid",
        "verify",
        "--socket",
        &agent.uri(),
        "--cert",
        cert.to_str().unwrap(),
    ])
    .await
}

async fn until_refused(agent: &TestAgent, cert: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = verify(agent, cert).await;
        if out.status.code() == Some(1) {
            return text(&out);
        }
        assert!(
            Instant::now() < deadline,
            "{} still accepted: {}",
            cert.display(),
            text(&out)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A policy that no longer lets anyone start `coder` tasks.
const NO_CODER_TASKS: &str = r#"
@id("issue-all")
permit(principal, action == Tessera::Action::"Issue", resource);
"#;

/// Starts (or, with the same directory, restarts) a standalone agent with `POLICY` in its
/// `policy_file`, written there only if the file does not exist yet.
async fn standalone_agent(dir: tempfile::TempDir) -> TestAgent {
    let policy_file = dir.path().join("policy.cedar");
    if !policy_file.exists() {
        std::fs::write(&policy_file, POLICY).unwrap();
    }
    let extra = format!("policy_file = \"{}\"", policy_file.display());
    let config_path = dir.path().join("agent.toml");
    std::fs::write(
        &config_path,
        config_text(dir.path(), &entries(&my_uid_selector()), &extra),
    )
    .unwrap();
    let config = tessera::agent::AgentConfig::load(&config_path).unwrap();
    let handle = tessera::agent::build(config, Default::default())
        .await
        .unwrap();
    TestAgent {
        handle,
        dir,
        config_path,
    }
}

/// The arguments of `tessera task run` of a `coder` task for `purpose`, running `command`.
fn coder_run_args<'a>(uri: &'a str, purpose: &'a str, command: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "task",
        "run",
        "--socket",
        uri,
        "--entry",
        "coder",
        "--purpose",
        purpose,
        "--",
    ];
    args.extend_from_slice(command);
    args
}

/// `tessera task run` of a `coder` task for `purpose`, in its own process group, whose command
/// writes its SVID into `task_dir` and sleeps; returns once the SVID is there.
async fn coder_task(agent: &TestAgent, purpose: &str, task_dir: &Path) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let bin = env!("CARGO_BIN_EXE_tessera");
    let uri = agent.uri();
    let script = format!(
        "{bin} svid fetch --socket {uri} --out {} >/dev/null && exec /bin/sleep 60",
        task_dir.display()
    );
    let task = Command::new(bin)
        .process_group(0)
        .args(coder_run_args(&uri, purpose, &["/bin/sh", "-c", &script]))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !task_dir.join("svid.pem").exists() {
        assert!(Instant::now() < deadline, "the task did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task
}

fn kill_group(mut child: std::process::Child) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
}

/// The end reasons of the tasks `agent` lists, live ones as null.
async fn end_reasons(agent: &TestAgent) -> Vec<serde_json::Value> {
    let listed = tessera_async(&[
        "task",
        "list",
        "--all",
        "--socket",
        &agent.uri(),
        "--output",
        "json",
    ])
    .await;
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    listed.iter().map(|t| t["end_reason"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_policy_decides_and_a_change_revokes_what_it_no_longer_permits() {
    let agent = standalone_agent(world_dir()).await;
    let policy_file = agent.dir.path().join("policy.cedar");
    let uri = agent.uri();

    // The policy decides who starts tasks: a purpose without an issue is refused, and the
    // command never runs.
    let marker = agent.dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    let refused = tessera_async(&coder_run_args(
        &uri,
        "browse the web",
        &["/bin/sh", "-c", &touch],
    ))
    .await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("refused by policy version 1 (no permit applies)"),
        "{}",
        text(&refused)
    );
    assert!(!marker.exists());

    // Allowed: a task with an issue in its purpose, holding its SVID while it runs.
    let task_dir = agent.dir.path().join("task");
    let task = coder_task(&agent, "fix issue 7", &task_dir).await;
    let web_dir = agent.dir.path().join("web");
    let fetched = tessera_async(&[
        "svid",
        "fetch",
        "--socket",
        &uri,
        "--out",
        web_dir.to_str().unwrap(),
    ])
    .await;
    assert!(fetched.status.success(), "{}", text(&fetched));
    assert!(
        verify(&agent, &task_dir.join("svid.pem"))
            .await
            .status
            .success()
    );
    // This process's first identity is /web (then /verifier): keep /web's certificate apart.
    let web_pem = web_dir.join("svid.pem");
    assert!(text(&tessera_async(&["svid", "fetch", "--socket", &uri]).await).contains("/web"));

    // The policy changes: coder tasks are no longer allowed at all, and /web is forbidden.
    std::fs::write(
        &policy_file,
        r#"
@id("issue-all")
permit(principal, action == Tessera::Action::"Issue", resource);

@id("no-web")
forbid(principal, action == Tessera::Action::"Issue", resource)
when { resource.id == "web" };
"#,
    )
    .unwrap();
    until_refused(&agent, &task_dir.join("svid.pem")).await;
    until_refused(&agent, &web_pem).await;
    assert_eq!(end_reasons(&agent).await, ["policy_changed"]);
    // /web is no longer issued to this process; /verifier still is.
    let now = tessera_async(&["svid", "fetch", "--socket", &uri, "--output", "json"]).await;
    let ids = text(&now);
    assert!(!ids.contains("/web") && ids.contains("/verifier"), "{ids}");
    // The audit log has the refusals, with the version and the deciding policy.
    let audit = std::fs::read_to_string(agent.dir.path().join("state/audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"policy_denied\"") && l.contains("no-web")),
        "{audit}"
    );
    kill_group(task);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_restored_after_a_restart_is_checked_again_when_the_policy_changes() {
    let agent = standalone_agent(world_dir()).await;
    let task_dir = agent.dir.path().join("task");
    let task = coder_task(&agent, "fix issue 8", &task_dir).await;
    let cert = task_dir.join("svid.pem");

    // Restarted under the same policy, the agent goes on with the task.
    let TestAgent { handle, dir, .. } = agent;
    handle.stop().await.unwrap();
    let agent = standalone_agent(dir).await;
    assert_eq!(agent.handle.task_registry.live().len(), 1);
    assert!(verify(&agent, &cert).await.status.success());
    assert_eq!(end_reasons(&agent).await, [serde_json::Value::Null]);

    // Its starter was kept with it, so a policy that no longer lets that starter start it ends
    // it, and a relying party refuses its certificate.
    let policy_file = agent.dir.path().join("policy.cedar");
    std::fs::write(&policy_file, NO_CODER_TASKS).unwrap();
    until_refused(&agent, &cert).await;
    assert_eq!(end_reasons(&agent).await, ["policy_changed"]);
    assert!(agent.handle.task_registry.live().is_empty());
    kill_group(task);

    // A policy changed while the agent is down ends the task as the agent comes back.
    std::fs::write(&policy_file, POLICY).unwrap();
    let until_permitted = Instant::now() + Duration::from_secs(10);
    let second_dir = agent.dir.path().join("second");
    let task = loop {
        // The agent reads the restored policy file within its reload interval.
        let uri = agent.uri();
        let probe = tessera_async(&coder_run_args(&uri, "fix issue 9", &["/bin/true"])).await;
        if probe.status.success() {
            break coder_task(&agent, "fix issue 9", &second_dir).await;
        }
        assert!(Instant::now() < until_permitted, "{}", text(&probe));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let TestAgent { handle, dir, .. } = agent;
    handle.stop().await.unwrap();
    std::fs::write(&policy_file, NO_CODER_TASKS).unwrap();
    let agent = standalone_agent(dir).await;
    assert!(agent.handle.task_registry.live().is_empty());
    until_refused(&agent, &second_dir.join("svid.pem")).await;
    assert_eq!(end_reasons(&agent).await, ["policy_changed"]);
    kill_group(task);
}

#[test]
fn a_bad_policy_file_is_refused_with_line_and_column() {
    let dir = world_dir();
    let policy_file = dir.path().join("policy.cedar");
    std::fs::write(
        &policy_file,
        "permit(principal, action, resource)\nwhen { principal.uuid == 1 };\n",
    )
    .unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        config_text(
            dir.path(),
            "",
            &format!("policy_file = \"{}\"", policy_file.display()),
        ),
    )
    .unwrap();
    let out = tessera(&["agent", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let message = text(&out);
    assert!(
        message.contains(&format!("{}:2:", policy_file.display())) && message.contains("uuid"),
        "{message}"
    );
}

#[test]
fn the_servers_policy_is_versioned_tested_and_enforced_on_its_nodes() {
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let agent = AgentProcess::start(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &format!("join_token = \"{}\"", server.join_token()),
    );
    server.create_entry("/coder", &["--id", "coder", "--activation", "task"]);
    server.create_entry("/web", &["--id", "web"]);

    // A policy that does not check is refused with line and column; nothing is stored.
    let bad = dir.path().join("bad.cedar");
    std::fs::write(
        &bad,
        "permit(principal, action, resource);\nforbid(principal, action == Tessera::Action::\"Fly\", resource);\n",
    )
    .unwrap();
    let refused = server.admin(&["policy", "set", bad.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert!(text(&refused).contains(":2:"), "{}", text(&refused));
    let none = server.admin(&["policy", "show"]);
    assert!(text(&none).contains("no policy is set"), "{}", text(&none));

    let good = dir.path().join("good.cedar");
    std::fs::write(
        &good,
        r#"@id("issue-all") permit(principal, action == Tessera::Action::"Issue", resource);
@id("tasks-for-team-a") permit(principal, action == Tessera::Action::"StartTask", resource)
  when { resource.owner == "nobody" };
"#,
    )
    .unwrap();
    let set = server.admin_json(&["policy", "set", good.to_str().unwrap()]);
    assert_eq!(set["version"], 1, "{set}");
    let tested = server.admin_json(&[
        "policy",
        "test",
        "--principal",
        "uid=0",
        "--action",
        "Issue",
        "--resource",
        "web",
    ]);
    assert_eq!(tested["allowed"], true, "{tested}");
    assert_eq!(tested["determining"][0], "issue-all");
    let tested = server.admin_json(&[
        "policy",
        "test",
        "--principal",
        "uid=0",
        "--action",
        "StartTask",
        "--resource",
        "coder",
    ]);
    assert_eq!(tested["allowed"], false, "{tested}");

    // The node enforces it: standing identities are issued, coder tasks are refused (their
    // owner is "tests", not "nobody").
    let uri = agent.uri();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = tessera(&[
            "task",
            "run",
            "--socket",
            &uri,
            "--entry",
            "coder",
            "--purpose",
            "p",
            "--",
            "/bin/true",
        ]);
        if text(&out).contains("refused by policy version 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}\n{}",
            text(&out),
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let fetched = tessera(&["svid", "fetch", "--socket", &uri]);
    assert!(fetched.status.success(), "{}", text(&fetched));

    let cleared = server.admin_json(&["policy", "clear"]);
    assert_eq!(cleared["version"], 2, "{cleared}");
    let history = server.admin_json(&["policy", "history"]);
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history}");
    // Without a policy, entries decide: this uid matches coder's selectors.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = tessera(&[
            "task",
            "run",
            "--socket",
            &uri,
            "--entry",
            "coder",
            "--purpose",
            "p",
            "--",
            "/bin/true",
        ]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&out));
        std::thread::sleep(Duration::from_millis(100));
    }
    // The refusal reached the server's audit trail with its version.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = server.admin_json(&["events", "list", "--kind", "policy_denied"]);
        if events.as_array().is_some_and(|e| !e.is_empty()) {
            assert_eq!(events[0]["policy_version"], 1, "{events}");
            break;
        }
        assert!(Instant::now() < deadline, "no policy_denied event upstream");
        std::thread::sleep(Duration::from_millis(100));
    }
}
