//! Task credentials with real processes on a standalone agent: `tessera task run` as another
//! user, a chain of three delegated tasks ended from the top, delegation refused outside its
//! rules, a recycled pid, a task process's exit seen through its pidfd, the deadline, the idle
//! timeout, an entry change and an agent restart. Every end is checked where it matters: a
//! relying party (`tessera svid verify`, with the CRLs of the Workload API) refuses the task's
//! certificate. These tests need root to start processes as other uids.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;
use tessera::agent::{AgentConfig, BuildOptions};
use tessera::ca::task::TaskClaims;

/// Starts tasks under `coder` (and may delegate to `reviewer`, which may delegate to `tester`).
const UID_RUNNER: u32 = 2201;
/// Matches no task entry.
const UID_STRANGER: u32 = 2202;

/// The entries: three task entries forming a delegation chain, and a standing identity for
/// this process (the relying party).
fn entries() -> String {
    let task = |path: &str, id: &str, selector: &str, delegates: &str| {
        entry(
            path,
            &[selector],
            "5m",
            &format!("id = \"{id}\"\nactivation = \"task\"\ndelegates_to = [{delegates}]"),
        )
    };
    [
        task(
            "/coder",
            "coder",
            &format!("unix:uid:{UID_RUNNER}"),
            "\"reviewer\"",
        ),
        task("/reviewer", "reviewer", "unix:uid:9", "\"tester\""),
        task("/tester", "tester", "unix:uid:9", ""),
        entry("/verifier", &[&my_uid_selector()], "5m", ""),
    ]
    .concat()
}

/// A directory `uid` may write to.
fn out_dir(parent: &Path, name: &str, uid: u32) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir(&dir).unwrap();
    nix::unistd::chown(&dir, Some(uid.into()), Some(uid.into())).unwrap();
    dir
}

/// `program args` as `uid`, started (not waited for), in a process group of its own.
fn spawn_as(uid: u32, program: &Path, args: &[&str]) -> Child {
    Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir("/")
        .uid(uid)
        .gid(uid)
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs `program args` as `uid` to completion, off the runtime the agent runs on.
async fn run(uid: u32, program: &Path, args: &[&str]) -> Output {
    let program = program.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_as(uid, &program, &args)
    })
    .await
    .unwrap()
}

/// `tessera svid verify` of `cert` by this process (the standing `/verifier`): Ok when the
/// certificate is accepted, Err with the reason when refused.
async fn verify(tessera: &Path, agent: &TestAgent, cert: &Path) -> Result<(), String> {
    let out = run(
        nix::unistd::geteuid().as_raw(),
        tessera,
        &[
            "svid",
            "verify",
            "--socket",
            &agent.uri(),
            "--cert",
            cert.to_str().unwrap(),
        ],
    )
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// Polls until a relying party refuses `cert` as revoked.
async fn until_revoked(tessera: &Path, agent: &TestAgent, cert: &Path) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match verify(tessera, agent, cert).await {
            Err(reason) if reason.contains("revoked") => return reason,
            outcome => assert!(
                tokio::time::Instant::now() < deadline,
                "{} still not refused as revoked: {outcome:?}",
                cert.display()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn task_args<'a>(agent_uri: &'a str, entry: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "task",
        "run",
        "--socket",
        agent_uri,
        "--entry",
        entry,
        "--purpose",
        "tests",
    ];
    args.extend_from_slice(extra);
    args
}

/// The SPIFFE ID of the task SVID in `dir/svid.pem`, and its claims.
fn leaf_claims(dir: &Path) -> (String, TaskClaims) {
    let (uri, claims) = leaf_identity(dir);
    (uri, claims.expect("a task SVID carries the task extension"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_run_as_another_user_holds_its_identity_only_while_it_runs() {
    if !require_root("a_task_run_as_another_user_holds_its_identity_only_while_it_runs") {
        return;
    }
    let agent = start_agent(&entries()).await;
    let tessera = agent.tessera_copy("tessera");
    let uri = agent.uri();
    let bin = tessera.to_str().unwrap();

    // A task entry issues nothing outside a task, even to a caller that matches it.
    let outside = run(UID_RUNNER, &tessera, &["svid", "fetch", "--socket", &uri]).await;
    assert_eq!(outside.status.code(), Some(1), "{outside:?}");
    assert!(String::from_utf8_lossy(&outside.stderr).contains("PermissionDenied"));

    let out = out_dir(agent.dir.path(), "run", UID_RUNNER);
    let mut args = task_args(&uri, "coder", &["--ttl", "10m", "--"]);
    let out_arg = out.to_str().unwrap();
    args.extend([bin, "svid", "fetch", "--socket", &uri, "--out", out_arg]);
    let ran = run(UID_RUNNER, &tessera, &args).await;
    assert!(ran.status.success(), "{ran:?}");
    let (spiffe_id, claims) = leaf_claims(&out);
    assert!(
        spiffe_id.starts_with("spiffe://example.org/coder/task/"),
        "{spiffe_id}"
    );
    assert_eq!(
        spiffe_id,
        format!("spiffe://example.org/coder/task/{}", claims.task_id)
    );
    assert_eq!(claims.entry_id, "coder");
    assert_eq!(claims.owner, "tests");
    assert_eq!(claims.purpose, "tests");
    assert_eq!(claims.chain.len(), 1);

    // The command has exited, so its task has ended: relying parties refuse the certificate.
    let reason = until_revoked(&tessera, &agent, &out.join("svid.pem")).await;
    assert!(reason.contains("revoked"), "{reason}");
    let ended = agent.handle.task_registry.live();
    assert!(ended.is_empty(), "{ended:?}");

    // The command's exit status is passed through.
    let mut args = task_args(&uri, "coder", &["--"]);
    args.extend(["/bin/sh", "-c", "exit 7"]);
    let seven = run(UID_RUNNER, &tessera, &args).await;
    assert_eq!(seven.status.code(), Some(7), "{seven:?}");

    // A command that cannot be found is named, exits as a shell's would, and starts no task.
    let tasks_before = ended_reasons(&tessera, &uri).await.len();
    let mut args = task_args(&uri, "coder", &["--"]);
    args.push("no-such-command-for-tessera");
    let missing = run(UID_RUNNER, &tessera, &args).await;
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(127), "{stderr}");
    assert!(
        stderr
            .contains("cannot run no-such-command-for-tessera: not found in PATH (/usr/bin:/bin)"),
        "{stderr}"
    );
    assert_eq!(ended_reasons(&tessera, &uri).await.len(), tasks_before);
    assert!(agent.handle.task_registry.live().is_empty());

    // Refusals name what is wrong; the command never runs.
    for (uid, entry, expect, code) in [
        (UID_STRANGER, "coder", "selectors of entry coder", 1),
        (UID_RUNNER, "nosuch", "no entry \"nosuch\"", 1),
        (
            UID_RUNNER,
            "spiffe://example.org/verifier",
            "is a standing entry",
            1,
        ),
        (UID_RUNNER, "reviewer", "selectors of entry reviewer", 1),
    ] {
        let marker = agent.dir.path().join(format!("ran-{uid}-{entry}"));
        let mut args = task_args(&uri, entry, &["--"]);
        let touch = format!("touch {}", marker.display());
        args.extend(["/bin/sh", "-c", &touch]);
        let refused = run(uid, &tessera, &args).await;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(code), "{entry}: {stderr}");
        assert!(stderr.contains(expect), "{entry}: {stderr}");
        assert!(
            !marker.exists(),
            "{entry}: the command ran although its task was refused"
        );
    }
    let mut args = task_args(&uri, "coder", &["--ttl", "1 fortnight", "--"]);
    args.push("/bin/true");
    let bad = run(UID_RUNNER, &tessera, &args).await;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--ttl \"1 fortnight\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn ending_the_root_of_a_three_level_chain_revokes_every_level() {
    if !require_root("ending_the_root_of_a_three_level_chain_revokes_every_level") {
        return;
    }
    let agent = start_agent(&entries()).await;
    let tessera = agent.tessera_copy("tessera");
    let uri = agent.uri();
    let bin = tessera.to_str().unwrap();
    let level = agent.dir.path().join("level.sh");
    // Each level fetches its SVID into a directory, then runs the next level.
    std::fs::write(
        &level,
        format!("#!/bin/sh\nout=$1\nshift\n{bin} svid fetch --socket {uri} --out \"$out\" >/dev/null || exit 3\nexec \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&level, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dirs: Vec<PathBuf> = (1..=3)
        .map(|n| out_dir(agent.dir.path(), &format!("level{n}"), UID_RUNNER))
        .collect();
    let level = level.to_str().unwrap();
    let d: Vec<&str> = dirs.iter().map(|d| d.to_str().unwrap()).collect();
    let mut args = task_args(&uri, "coder", &["--"]);
    args.extend([level, d[0], bin]);
    args.extend(task_args(&uri, "reviewer", &["--"]));
    args.extend([level, d[1], bin]);
    args.extend(task_args(&uri, "tester", &["--"]));
    args.extend([level, d[2], "/bin/sleep", "60"]);
    let mut chain = spawn_as(UID_RUNNER, &tessera, &args);

    let live = eventually(Duration::from_secs(10), || {
        let live = agent.handle.task_registry.live();
        (live.len() == 3 && dirs[2].join("svid.pem").exists()).then_some(live)
    })
    .await;
    let root = live
        .iter()
        .find(|t| t.claims.chain.len() == 1)
        .unwrap()
        .claims
        .clone();
    let (_, innermost) = leaf_claims(&dirs[2]);
    assert_eq!(innermost.chain.len(), 3);
    assert_eq!(innermost.chain[0].task_id, root.task_id);
    assert_eq!(innermost.entry_id, "tester");
    assert!(
        innermost.chain[1]
            .spiffe_id
            .starts_with("spiffe://example.org/reviewer/task/")
    );
    for dir in &dirs {
        assert_eq!(
            verify(&tessera, &agent, &dir.join("svid.pem")).await,
            Ok(())
        );
    }

    // A stranger may not end them: refused, named, and every level still accepted.
    let refused = run(
        UID_STRANGER,
        &tessera,
        &["task", "end", "--socket", &uri, &root.task_id],
    )
    .await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "task {} was started by another user",
            root.task_id
        )),
        "{stderr}"
    );
    assert_eq!(agent.handle.task_registry.live().len(), 3);
    assert_eq!(
        verify(&tessera, &agent, &dirs[0].join("svid.pem")).await,
        Ok(())
    );

    // The runner ends the root task; both descendants end with it.
    let ended = run(
        UID_RUNNER,
        &tessera,
        &[
            "task",
            "end",
            "--socket",
            &uri,
            &root.task_id,
            "--output",
            "json",
        ],
    )
    .await;
    assert!(ended.status.success(), "{ended:?}");
    for dir in &dirs {
        until_revoked(&tessera, &agent, &dir.join("svid.pem")).await;
    }
    let listed = run(
        UID_RUNNER,
        &tessera,
        &[
            "task", "list", "--all", "--socket", &uri, "--output", "json",
        ],
    )
    .await;
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let reasons: Vec<(usize, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["chain"].as_array().unwrap().len(),
                t["end_reason"].as_str().unwrap_or("live"),
            )
        })
        .collect();
    assert!(reasons.contains(&(1, "ended")), "{reasons:?}");
    assert!(reasons.contains(&(2, "parent_ended")), "{reasons:?}");
    assert!(reasons.contains(&(3, "parent_ended")), "{reasons:?}");

    // Nor see them.
    let stranger = run(
        UID_STRANGER,
        &tessera,
        &[
            "task", "list", "--all", "--socket", &uri, "--output", "json",
        ],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&stranger.stdout).trim(), "[]");
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(chain.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = chain.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn delegation_keeps_to_the_parents_entry_lifetime_and_depth() {
    if !require_root("delegation_keeps_to_the_parents_entry_lifetime_and_depth") {
        return;
    }
    let agent = start_agent_with(
        &entries(),
        "[tasks]\nmax_depth = 2",
        BuildOptions::default(),
    )
    .await;
    let tessera = agent.tessera_copy("tessera");
    let uri = agent.uri();
    let bin = tessera.display().to_string();
    let out = out_dir(agent.dir.path(), "attempts", UID_RUNNER);
    let nested = |entry: &str, flags: &str| {
        format!("{bin} task run --socket {uri} --entry {entry} --purpose sub-agent {flags} --")
    };
    // Inside a coder task of one minute, each attempt leaves its exit status, its stderr and,
    // if its command ran, a marker.
    let attempt =
        |name: &str, command: String| format!("{command} 2> {name}.err; echo $? > {name}.status");
    let script = [
        "set -u".to_owned(),
        format!("cd {}", out.display()),
        // coder may delegate only to reviewer.
        attempt("tester", format!("{} touch ran-tester", nested("tester", ""))),
        // No longer than the parent has left.
        attempt("long", format!("{} touch ran-long", nested("reviewer", "--ttl 10m"))),
        // Without --ttl, the child gets what the parent has left, and a third level is one
        // deeper than max_depth = 2.
        attempt(
            "deep",
            format!(
                "{} /bin/sh -c '{bin} svid fetch --socket {uri} --out {} >/dev/null && {} touch ran-deep'",
                nested("reviewer", ""),
                out.display(),
                nested("tester", ""),
            ),
        ),
    ]
    .join("\n");
    let mut args = task_args(&uri, "coder", &["--ttl", "1m", "--"]);
    args.extend(["/bin/sh", "-c", &script]);
    let ran = run(UID_RUNNER, &tessera, &args).await;
    assert!(ran.status.success(), "{ran:?}");

    let result = |name: &str| {
        let status = std::fs::read_to_string(out.join(format!("{name}.status"))).unwrap();
        let stderr = std::fs::read_to_string(out.join(format!("{name}.err"))).unwrap();
        let ran = out.join(format!("ran-{name}")).exists();
        (status.trim().parse::<i32>().unwrap(), stderr, ran)
    };
    let (status, stderr, ran) = result("tester");
    assert_eq!((status, ran), (1, false), "{stderr}");
    assert!(
        stderr.contains(
            "may not delegate to entry tester; add it to the delegates_to of entry coder"
        ),
        "{stderr}"
    );
    let (status, stderr, ran) = result("long");
    assert_eq!(
        (status, ran),
        (2, false),
        "a --ttl the agent refuses is a usage error: {stderr}"
    );
    assert!(
        stderr.contains("ttl 10m is longer than")
            && stderr.contains("the parent task's remaining lifetime"),
        "{stderr}"
    );
    let (status, stderr, ran) = result("deep");
    assert_eq!((status, ran), (1, false), "{stderr}");
    assert!(
        stderr.contains("a task at depth 3 is deeper than tasks.max_depth = 2"),
        "{stderr}"
    );
    // The reviewer at depth 2 ran, and its SVID ends with its parent's minute, not its entry's
    // five.
    let (spiffe_id, claims) = leaf_claims(&out);
    assert!(
        spiffe_id.starts_with("spiffe://example.org/reviewer/task/"),
        "{spiffe_id}"
    );
    assert_eq!(claims.chain.len(), 2);
    let lifetime = leaf_lifetime(&out);
    assert!(
        lifetime <= 60 + 10 + 1,
        "back-dated 10 s, at most 60 s to live: {lifetime}"
    );
    until_no_live_task(&agent, Duration::from_secs(5)).await;
    let reasons = ended_reasons(&tessera, &uri).await;
    assert_eq!(
        reasons.len(),
        2,
        "only the coder and the one reviewer started: {reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sub_agent_whose_task_ends_keeps_no_task_identity() {
    if !require_root("a_sub_agent_whose_task_ends_keeps_no_task_identity") {
        return;
    }
    let agent = start_agent(&entries()).await;
    let tessera = agent.tessera_copy("tessera");
    let uri = agent.uri();
    let bin = tessera.display();
    let (coder, reviewer) = (
        out_dir(agent.dir.path(), "coder", UID_RUNNER),
        out_dir(agent.dir.path(), "reviewer", UID_RUNNER),
    );
    // The sub-agent fetches its SVID, then in each of two rounds waits to be told and asks
    // again.
    let sub_agent = agent.dir.path().join("sub-agent.sh");
    let r = reviewer.display();
    std::fs::write(
        &sub_agent,
        format!(
            "#!/bin/sh\n{bin} svid fetch --socket {uri} --out {r} >/dev/null || exit 3\nfor round in 1 2; do\n  while [ ! -e {r}/go$round ]; do sleep 0.02; done\n  mkdir {r}/again$round\n  {bin} svid fetch --socket {uri} --out {r}/again$round 2> {r}/again$round.err\n  echo $? > {r}/again$round.status\ndone\nexec sleep 60\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &sub_agent,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // The agent fetches its own SVID and runs the sub-agent as a delegated task.
    let script = format!(
        "{bin} svid fetch --socket {uri} --out {} >/dev/null || exit 3; exec {bin} task run --socket {uri} --entry reviewer --purpose review -- {}",
        coder.display(),
        sub_agent.display()
    );
    let mut args = task_args(&uri, "coder", &["--"]);
    args.extend(["/bin/sh", "-c", &script]);
    let mut runner = spawn_as(UID_RUNNER, &tessera, &args);
    let live = eventually(Duration::from_secs(10), || {
        let live = agent.handle.task_registry.live();
        (live.len() == 2 && reviewer.join("svid.pem").exists()).then_some(live)
    })
    .await;
    let sub_task = live
        .iter()
        .find(|t| t.claims.chain.len() == 2)
        .unwrap()
        .claims
        .task_id
        .clone();
    // In round N the sub-agent's process, which the agent's task started, asks for an
    // identity: it must get none, neither its ended task's nor the agent's task's.
    let round_gets_nothing = |round: u32| {
        let reviewer = reviewer.clone();
        async move {
            std::fs::write(reviewer.join(format!("go{round}")), "").unwrap();
            let status = eventually(Duration::from_secs(10), || {
                std::fs::read_to_string(reviewer.join(format!("again{round}.status")))
                    .ok()
                    .filter(|s| s.ends_with('\n'))
            })
            .await;
            let stderr =
                std::fs::read_to_string(reviewer.join(format!("again{round}.err"))).unwrap();
            assert_eq!(status.trim(), "1", "round {round}: {stderr}");
            assert!(
                stderr.contains("PermissionDenied"),
                "round {round}: {stderr}"
            );
        }
    };

    // The runner ends the sub-agent's task. Its certificate is refused; the agent's is not.
    let ended = run(
        UID_RUNNER,
        &tessera,
        &["task", "end", "--socket", &uri, &sub_task],
    )
    .await;
    assert!(ended.status.success(), "{ended:?}");
    until_revoked(&tessera, &agent, &reviewer.join("svid.pem")).await;
    assert_eq!(
        verify(&tessera, &agent, &coder.join("svid.pem")).await,
        Ok(())
    );
    round_gets_nothing(1).await;
    assert_eq!(agent.handle.task_registry.live().len(), 1);

    // Nor after a restart of the agent.
    let TestAgent {
        handle,
        dir,
        config_path,
    } = agent;
    handle.stop().await.unwrap();
    let config = AgentConfig::load(&config_path).unwrap();
    let handle = tessera::agent::build(config, BuildOptions::default())
        .await
        .unwrap();
    let agent = TestAgent {
        handle,
        dir,
        config_path,
    };
    assert_eq!(agent.handle.task_registry.live().len(), 1);
    round_gets_nothing(2).await;
    assert_eq!(
        verify(&tessera, &agent, &coder.join("svid.pem")).await,
        Ok(())
    );
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(runner.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = runner.wait();
}

/// Starts `/bin/sh -c SCRIPT` as `uid` with exactly pid `pid`, by setting the kernel's last-pid
/// counter just below it (root only), and waits for it.
fn run_at_pid(pid: u32, uid: u32, script: &str) -> Output {
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let child = Command::new("/bin/sh")
            .args(["-c", script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .uid(uid)
            .gid(uid)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let got = child.id();
        let output = child.wait_with_output().unwrap();
        if got == pid {
            return output;
        }
    }
    panic!("could not get pid {pid}");
}

#[tokio::test(flavor = "multi_thread")]
async fn task_run_passes_termination_signals_on_to_its_command() {
    if !require_root("task_run_passes_termination_signals_on_to_its_command") {
        return;
    }
    let agent = start_agent(&entries()).await;
    let tessera = agent.tessera_copy("tessera");
    let uri = agent.uri();
    for (signal, code) in [
        (nix::sys::signal::Signal::SIGTERM, 42),
        (nix::sys::signal::Signal::SIGINT, 43),
    ] {
        let dir = out_dir(agent.dir.path(), &format!("signal-{code}"), UID_RUNNER);
        let ready = dir.join("ready");
        // The command says it is ready once its trap is set, and exits with `code` on the signal.
        let script = format!(
            "trap 'exit {code}' {}; touch {}; while :; do sleep 0.05; done",
            &signal.as_str()[3..],
            ready.display()
        );
        let mut args = task_args(&uri, "coder", &["--"]);
        args.extend(["/bin/sh", "-c", &script]);
        let mut runner = spawn_as(UID_RUNNER, &tessera, &args);
        eventually(Duration::from_secs(10), || ready.exists().then_some(())).await;
        // Only the CLI is signalled, as a service manager signals its main process.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(runner.id() as i32), signal).unwrap();
        let status = tokio::task::spawn_blocking(move || runner.wait().unwrap())
            .await
            .unwrap();
        assert_eq!(status.code(), Some(code), "{signal}");
        eventually(Duration::from_secs(5), || {
            agent.handle.task_registry.live().is_empty().then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_inherits_the_pid_of_an_ended_task_gets_nothing() {
    if !require_root("a_process_that_inherits_the_pid_of_an_ended_task_gets_nothing") {
        return;
    }
    let agent = start_agent(&entries()).await;
    let tessera = agent.tessera_copy("tessera");
    let uri = agent.uri();
    let mut args = task_args(&uri, "coder", &["--"]);
    args.extend(["/bin/sleep", "60"]);
    let mut runner = spawn_as(UID_RUNNER, &tessera, &args);
    let task = eventually(Duration::from_secs(10), || {
        agent.handle.task_registry.live().into_iter().next()
    })
    .await;
    let pid = task.root.pid as u32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || runner.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(
        status.code(),
        Some(137),
        "task run passes the signal on as 128+9"
    );
    until_no_live_task(&agent, Duration::from_secs(5)).await;

    // The same user's next process gets the task's pid and asks for an identity.
    let script = format!("exec {} svid fetch --socket {uri}", tessera.display());
    let out = tokio::task::spawn_blocking(move || run_at_pid(pid, UID_RUNNER, &script))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("PermissionDenied"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deadlines_idleness_and_entry_changes_end_tasks() {
    if !require_root("deadlines_idleness_and_entry_changes_end_tasks") {
        return;
    }
    let agent = start_agent(&entries()).await;
    let tessera = agent.tessera_copy("tessera");
    let uri = agent.uri();
    let bin = tessera.to_str().unwrap();
    let fetch_then_sleep = |dir: &Path| {
        format!(
            "{bin} svid fetch --socket {uri} --out {} >/dev/null && exec /bin/sleep 60",
            dir.display()
        )
    };

    // The deadline.
    let expiring = out_dir(agent.dir.path(), "expiring", UID_RUNNER);
    let script = fetch_then_sleep(&expiring);
    let mut args = task_args(&uri, "coder", &["--ttl", "2s", "--"]);
    args.extend(["/bin/sh", "-c", &script]);
    let mut first = spawn_as(UID_RUNNER, &tessera, &args);
    eventually(Duration::from_secs(10), || {
        expiring.join("svid.pem").exists().then_some(())
    })
    .await;
    // The SVID lives no longer than its task: both end at the deadline.
    let lifetime = leaf_lifetime(&expiring);
    assert!(
        lifetime <= 2 + 10 + 1,
        "back-dated 10 s, 2 s to live: {lifetime}"
    );
    until_no_live_task(&agent, Duration::from_secs(10)).await;
    // Refused as revoked or as expired, whichever the relying party checks first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while verify(&tessera, &agent, &expiring.join("svid.pem"))
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "an expired task's SVID still accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reasons = ended_reasons(&tessera, &uri).await;
    assert_eq!(reasons, ["expired"]);

    // Idleness: a task whose processes fetch its identity once and then never use it again.
    let idle = out_dir(agent.dir.path(), "idle", UID_RUNNER);
    let script = fetch_then_sleep(&idle);
    let mut args = task_args(&uri, "coder", &["--idle-timeout", "1s", "--"]);
    args.extend(["/bin/sh", "-c", &script]);
    let mut second = spawn_as(UID_RUNNER, &tessera, &args);
    eventually(Duration::from_secs(10), || {
        idle.join("svid.pem").exists().then_some(())
    })
    .await;
    until_revoked(&tessera, &agent, &idle.join("svid.pem")).await;
    assert!(agent.handle.task_registry.live().is_empty());
    assert_eq!(ended_reasons(&tessera, &uri).await, ["expired", "idle"]);

    // An entry change that no longer permits the task: `coder` becomes standing.
    let changed = out_dir(agent.dir.path(), "changed", UID_RUNNER);
    let script = fetch_then_sleep(&changed);
    let mut args = task_args(&uri, "coder", &["--"]);
    args.extend(["/bin/sh", "-c", &script]);
    let mut third = spawn_as(UID_RUNNER, &tessera, &args);
    eventually(Duration::from_secs(10), || {
        changed.join("svid.pem").exists().then_some(())
    })
    .await;
    agent.rewrite_entries(
        &entries()
            .replace(
                "id = \"coder\"\nactivation = \"task\"",
                "id = \"coder\"\nactivation = \"standing\"",
            )
            .replace("delegates_to = [\"reviewer\"]", ""),
    );
    until_revoked(&tessera, &agent, &changed.join("svid.pem")).await;
    assert_eq!(
        ended_reasons(&tessera, &uri).await,
        ["expired", "idle", "entry_changed"]
    );
    for child in [&mut first, &mut second, &mut third] {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait();
    }
}

/// Waits, for at most `limit`, until the agent has no live task.
async fn until_no_live_task(agent: &TestAgent, limit: Duration) {
    eventually(limit, || {
        agent.handle.task_registry.live().is_empty().then_some(())
    })
    .await;
}

/// End reasons of the ended tasks, oldest first, as `task list --all` shows them to root.
async fn ended_reasons(tessera: &Path, uri: &str) -> Vec<String> {
    let out = run(
        nix::unistd::geteuid().as_raw(),
        tessera,
        &["task", "list", "--all", "--socket", uri, "--output", "json"],
    )
    .await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["end_reason"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_keeps_live_tasks_and_revokes_those_that_ended_meanwhile() {
    if !require_root("a_restarted_agent_keeps_live_tasks_and_revokes_those_that_ended_meanwhile") {
        return;
    }
    let agent = start_agent(&entries()).await;
    let tessera = agent.tessera_copy("tessera");
    let uri = agent.uri();
    let bin = tessera.to_str().unwrap();
    let mut children = Vec::new();
    let mut dirs = Vec::new();
    for name in ["survivor", "casualty"] {
        let dir = out_dir(agent.dir.path(), name, UID_RUNNER);
        let script = format!(
            "{bin} svid fetch --socket {uri} --out {} >/dev/null && exec /bin/sleep 60",
            dir.display()
        );
        let mut args = task_args(&uri, "coder", &["--"]);
        args.extend(["/bin/sh", "-c", &script]);
        children.push(spawn_as(UID_RUNNER, &tessera, &args));
        dirs.push(dir);
    }
    let live = eventually(Duration::from_secs(10), || {
        let live = agent.handle.task_registry.live();
        (live.len() == 2 && dirs.iter().all(|d| d.join("svid.pem").exists())).then_some(live)
    })
    .await;
    let (_, survivor) = leaf_claims(&dirs[0]);
    let (_, casualty) = leaf_claims(&dirs[1]);
    let casualty_pid = live
        .iter()
        .find(|t| t.claims.task_id == casualty.task_id)
        .unwrap()
        .root
        .pid;

    // Stop the agent; while it is down, the casualty's process exits.
    let TestAgent {
        handle,
        dir,
        config_path,
    } = agent;
    handle.stop().await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(casualty_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut casualty_runner = children.remove(1);
    tokio::task::spawn_blocking(move || casualty_runner.wait().unwrap())
        .await
        .unwrap();

    let config = AgentConfig::load(&config_path).unwrap();
    let handle = tessera::agent::build(config, BuildOptions::default())
        .await
        .unwrap();
    let agent = TestAgent {
        handle,
        dir,
        config_path,
    };
    let live: Vec<String> = agent
        .handle
        .task_registry
        .live()
        .into_iter()
        .map(|t| t.claims.task_id)
        .collect();
    assert_eq!(live, std::slice::from_ref(&survivor.task_id));
    // The casualty's certificate, minted before the restart, is in the CRL now.
    until_revoked(&tessera, &agent, &dirs[1].join("svid.pem")).await;
    assert_eq!(
        verify(&tessera, &agent, &dirs[0].join("svid.pem")).await,
        Ok(())
    );
    assert_eq!(ended_reasons(&tessera, &uri).await, ["process_exited"]);
    for child in &mut children {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_may_be_started_for_a_process_the_starters_parent_started() {
    if !require_root("a_task_may_be_started_for_a_process_the_starters_parent_started") {
        return;
    }
    // No task is live, so attestation reads no ancestry beyond the parent: that is enough.
    let agent = start_agent(&entries()).await;
    let tessera = agent.tessera_copy("tessera");
    let uri = agent.uri();
    let dir = out_dir(agent.dir.path(), "sibling", UID_RUNNER);
    // The sibling first starts a helper, then waits until its task has started, fetches the
    // task's SVID and sleeps; the shell that started it leaves without ending the task. The
    // helper, started before the task, is not the task's: it asks too, and gets nothing.
    // Start times are whole clock ticks, so the task starts a few ticks after the helper (one
    // started in the same tick as the task counts as the task's).
    let early = out_dir(agent.dir.path(), "early", UID_RUNNER);
    let script = format!(
        "( ( while [ ! -e {d}/go ]; do sleep 0.02; done; {t} svid fetch --socket {uri} --out {e} 2> {e}/err; echo $? > {e}/status ) & while [ ! -e {d}/go ]; do sleep 0.02; done; {t} svid fetch --socket {uri} --out {d}; exec sleep 60 ) >/dev/null 2>&1 & sibling=$!
sleep 0.1
{t} task start --socket {uri} --entry coder --purpose tests --pid $sibling || {{ kill $sibling; exit 1; }}
echo $sibling > {d}/pid; touch {d}/go",
        d = dir.display(),
        e = early.display(),
        t = tessera.display(),
    );
    let out = run(UID_RUNNER, Path::new("/bin/sh"), &["-c", &script]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = dir.join("svid.pem");
    eventually(Duration::from_secs(10), || cert.exists().then_some(())).await;
    assert_eq!(verify(&tessera, &agent, &cert).await, Ok(()));
    let status = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(early.join("status"))
            .ok()
            .filter(|s| s.ends_with('\n'))
    })
    .await;
    let stderr = std::fs::read_to_string(early.join("err")).unwrap();
    assert_eq!(status.trim(), "1", "{stderr}");
    assert!(stderr.contains("PermissionDenied"), "{stderr}");

    // Its process exits: the agent learns it from the pidfd, and relying parties refuse the
    // certificate.
    let pid: i32 = std::fs::read_to_string(dir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    until_revoked(&tessera, &agent, &cert).await;
    assert_eq!(ended_reasons(&tessera, &uri).await, ["process_exited"]);
    assert!(agent.handle.task_registry.live().is_empty());
}
