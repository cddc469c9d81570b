//! Task credentials with real processes. `task_start`: a standalone agent, a task started for a
//! process the harness has just started, until that process holds the task's SVID; and the
//! whole `tessera task run` command around such a process. `task_cascade`: a server and three
//! agents in server mode, a chain of three delegated tasks on agent 0 ended by an operator
//! through the server, until relying parties on agents 1 and 2 hold CRLs listing all three
//! task SVIDs.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::chart::{Chart, Distribution};
use super::cluster::{Server, TRUST_DOMAIN as CLUSTER_DOMAIN, failed};
use super::scenarios::{TRUST_DOMAIN, agent_config_with, start_agent, uid_selector};
use super::{BenchError, Plan, ScenarioResult, io_err, tessera_binary};
use tessera::ca::crl::parse_crl;
use tessera::proto::tessera::tasks_client::TasksClient;
use tessera::proto::tessera::{
    CreateEntryRequest, EndTaskOrderRequest, Entry, ListTasksRequest, StartTaskRequest,
};
use tessera::proto::workload::X509svidRequest;

/// The longest any one step may take before a scenario gives up.
pub(super) const STEP: Duration = Duration::from_secs(30);
/// The task entry of `task_start`.
const WORKER: &str = "worker";
/// The target of `task_start`, in microseconds.
const START_TARGET_US: f64 = 2_000.0;
/// The target of `task_cascade`, in microseconds.
const CASCADE_TARGET_US: f64 = 1_000_000.0;

pub(super) type TasksApi = TasksClient<
    InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

/// The Workload API's header, which the Tasks service asks for too.
fn workload_header(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(request)
}

pub(super) async fn tasks_client(socket: &Path) -> Result<TasksApi, BenchError> {
    let channel = tessera::cli::client::channel(socket)
        .await
        .map_err(|f| BenchError::Failed(format!("connecting to the agent: {}", f.message)))?;
    Ok(TasksClient::with_interceptor(
        channel,
        workload_header as fn(_) -> _,
    ))
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine.
pub fn monotonic_ns() -> Result<u64, BenchError> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_err(|e| BenchError::Failed(format!("clock_gettime(CLOCK_MONOTONIC): {e}")))?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

/// The hidden `task-probe` command: with `wait`, first writes one byte to standard output (it
/// is up and waiting) and reads one byte from standard input (the go); with `connect_first`, it
/// connects to the agent at `socket` before it says it is up, otherwise after the go. Then it
/// takes its first FetchX509SVID message and returns the SPIFFE ID it holds and the
/// CLOCK_MONOTONIC nanoseconds at which it held it.
pub async fn task_probe(
    socket: &Path,
    wait: bool,
    connect_first: bool,
) -> Result<(String, u64), BenchError> {
    let connect = || async {
        tessera::cli::client::connect(&format!("unix://{}", socket.display()))
            .await
            .map_err(|f| BenchError::Failed(format!("connecting: {}", f.message)))
    };
    let mut connected = None;
    if connect_first {
        connected = Some(connect().await?);
    }
    if wait {
        let mut out = std::io::stdout();
        out.write_all(b"r")
            .and_then(|()| out.flush())
            .map_err(io_err("saying the probe is up"))?;
        let mut go = [0u8; 1];
        std::io::stdin()
            .read_exact(&mut go)
            .map_err(io_err("waiting for the go byte on standard input"))?;
    }
    let mut client = match connected {
        Some(client) => client,
        None => connect().await?,
    };
    let message = super::scenarios::first_message(&mut client).await?;
    let held = monotonic_ns()?;
    let spiffe_id = message
        .svids
        .first()
        .map(|svid| svid.spiffe_id.clone())
        .ok_or_else(|| BenchError::Failed("the first message holds no SVID".into()))?;
    Ok((spiffe_id, held))
}

/// A probe's line: `<SPIFFE ID> <monotonic ns>`.
fn parse_probe(stdout: &[u8], stderr: &[u8]) -> Result<(String, u64), BenchError> {
    let text = String::from_utf8_lossy(stdout);
    let mut words = text.split_whitespace();
    match (words.next(), words.next().and_then(|w| w.parse().ok())) {
        (Some(id), Some(ns)) => Ok((id.to_owned(), ns)),
        _ => Err(BenchError::Failed(format!(
            "the probe said {:?}: {}",
            text.trim(),
            String::from_utf8_lossy(stderr).trim()
        ))),
    }
}

/// Waits for `child` to exit, for at most `limit` (then kills it); its exit status, standard
/// output and error, and the moment it was reaped.
async fn finish(
    child: Child,
    limit: Duration,
) -> Result<(std::process::Output, Instant), BenchError> {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let waiter = tokio::task::spawn_blocking(move || {
        let output = child.wait_with_output();
        (output, Instant::now())
    });
    match tokio::time::timeout(limit, waiter).await {
        Ok(Ok((output, at))) => Ok((output.map_err(io_err("waiting for a process"))?, at)),
        Ok(Err(e)) => Err(BenchError::Failed(format!("waiting for a process: {e}"))),
        Err(_) => {
            // Not reaped yet, so the pid is still this child's.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            Err(BenchError::Failed(format!(
                "a process did not exit within {limit:?}"
            )))
        }
    }
}

/// Scenario 9: a task started for a process the harness just started, until the process holds
/// its SVID; and `tessera task run` around such a process, spawn to exit.
pub async fn task_start(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    let (config, socket) = agent_config_with(
        dir,
        &[(
            format!("/{WORKER}"),
            vec![uid_selector()],
            "1h".into(),
            format!("id = \"{WORKER}\"\nactivation = \"task\"\n"),
        )],
    )?;
    let _agent = start_agent(&config, &socket)?;
    let exe = std::env::current_exe().map_err(io_err("locating tessera-bench"))?;
    let socket_arg = socket.display().to_string();
    let mut tasks = tasks_client(&socket).await?;
    let entry_id = format!("spiffe://{TRUST_DOMAIN}/{WORKER}/task/");

    // A few unmeasured rounds first, as the other latency scenarios warm up. Rounds take turns:
    // a probe connected before the go, one that connects after it, and a baseline round with
    // a ListTasks call where StartTask would be, so that all three meet the same conditions.
    let warm_up = 6;
    let (mut connected, mut unconnected, mut calls, mut bare) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 * plan.task_starts + warm_up {
        let (connect_first, baseline) = match round % 3 {
            0 => (true, false),
            1 => (false, false),
            _ => (true, true),
        };
        let (held, call) =
            start_round(&mut tasks, &exe, &socket_arg, connect_first, baseline).await?;
        if round >= warm_up {
            match (connect_first, baseline) {
                (_, true) => bare.push(call),
                (true, false) => {
                    connected.push(held);
                    calls.push(call);
                }
                (false, false) => unconnected.push(held),
            }
        }
    }

    let tessera = tessera_binary();
    let (mut runs, mut run_held) = (Vec::new(), Vec::new());
    for round in 0..plan.task_runs + 1 {
        let mut command = tessera_harness::command(tessera);
        command
            .args(["task", "run", "--socket"])
            .arg(format!("unix://{socket_arg}"))
            .args(["--entry", WORKER, "--purpose", "task run benchmark", "--"])
            .arg(&exe)
            .args(["task-probe", "--socket", &socket_arg])
            .env("TESSERA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let spawned_ns = monotonic_ns()?;
        let child = command
            .spawn()
            .map_err(io_err("starting tessera task run"))?;
        let (output, exited) = finish(child, STEP).await?;
        if !output.status.success() {
            return Err(BenchError::Failed(format!(
                "tessera task run failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let (spiffe_id, held) = parse_probe(&output.stdout, &output.stderr)?;
        if !spiffe_id.starts_with(&entry_id) {
            return Err(BenchError::Failed(format!(
                "the command of tessera task run held {spiffe_id}, not a task SVID of {WORKER}"
            )));
        }
        // The first run pays for loading the binaries.
        if round > 0 {
            runs.push(exited.saturating_duration_since(spawned));
            run_held.push(Duration::from_nanos(held.saturating_sub(spawned_ns)));
        }
    }

    // What starting any process costs here, and starting `tessera` alone: the floor under the
    // two process starts in `tessera task run`'s series.
    let mut process_starts = spawn_to_exit(Path::new("/bin/true"), &[], plan.task_runs).await?;
    let mut cli_starts = spawn_to_exit(tessera, &["--version"], plan.task_runs).await?;

    let started = Distribution::of("StartTask to SVID held", &mut connected);
    let unconnected = Distribution::of(
        "StartTask to SVID held, probe connecting after the go",
        &mut unconnected,
    );
    let runs = Distribution::of("tessera task run, spawn to exit", &mut runs);
    let run_held = Distribution::of("tessera task run, spawn to SVID held", &mut run_held);
    let calls = Distribution::of("StartTask call", &mut calls);
    let bare = Distribution::of("ListTasks call", &mut bare);
    let process_starts = Distribution::of("/bin/true, spawn to exit", &mut process_starts);
    let cli_starts = Distribution::of("tessera --version, spawn to exit", &mut cli_starts);
    let p50 = started.at(0.5);
    Ok(ScenarioResult {
        name: "task_start".into(),
        description: format!(
            "A standalone agent with a task entry for this uid. {} rounds: the harness starts a probe process, which connects to the agent, says it is up on its standard output and waits on its standard input; the harness takes CLOCK_MONOTONIC, calls StartTask for the probe's pid (as its parent, on a connection already open) and writes the go byte; the probe calls FetchX509SVID and reads CLOCK_MONOTONIC once it holds the SVID, whose SPIFFE ID is checked to be the task's. {} rounds, taking turns with those, have the probe connect only after the go, and {} have a ListTasks call (attestation with ancestry and an answer, no task) where StartTask would be, timed as a baseline. Then {} runs of `tessera task run --entry {WORKER} -- <probe>` timed from spawn to the probe holding its SVID and to exit, and as many starts of `/bin/true` and of `tessera --version`, spawn to exit, as baselines.",
            started.samples, unconnected.samples, bare.samples, runs.samples
        ),
        target: "tessera task run to the task process holding its SVID: p50 under 2 ms (StartTask to SVID held)".into(),
        met: p50 < START_TARGET_US,
        figures: vec![
            ("StartTask to SVID held p50 (µs)".into(), p50),
            ("StartTask to SVID held p90 (µs)".into(), started.at(0.9)),
            ("StartTask to SVID held p99 (µs)".into(), started.at(0.99)),
            ("of which the StartTask call p50 (µs)".into(), calls.at(0.5)),
            (
                "baseline: a ListTasks call in its place p50 (µs)".into(),
                bare.at(0.5),
            ),
            (
                "probe connecting after the go p50 (µs)".into(),
                unconnected.at(0.5),
            ),
            (
                "probe connecting after the go p99 (µs)".into(),
                unconnected.at(0.99),
            ),
            (
                "task run spawn to the command holding its SVID p50 (µs)".into(),
                run_held.at(0.5),
            ),
            (
                "task run spawn to the command holding its SVID p99 (µs)".into(),
                run_held.at(0.99),
            ),
            ("task run spawn to exit p50 (µs)".into(), runs.at(0.5)),
            ("task run spawn to exit p90 (µs)".into(), runs.at(0.9)),
            ("task run spawn to exit p99 (µs)".into(), runs.at(0.99)),
            (
                "baseline: /bin/true spawn to exit p50 (µs)".into(),
                process_starts.at(0.5),
            ),
            (
                "baseline: tessera --version spawn to exit p50 (µs)".into(),
                cli_starts.at(0.5),
            ),
        ],
        note: "The target is judged on the first series, StartTask to SVID held: the agent pinning the process and starting the task (which starts minting the task's SVID in the background), the go byte, the probe's FetchX509SVID with attestation (task membership through the process's ancestry) and the SVID; the StartTask call alone (t0 to its answer) is given beside it, with a ListTasks call at the same moment (attestation with ancestry and an answer, no task) for what any call costs there. As in first_fetch, a new process's connection setup is left out of the judged series: it is the client's own cost, the same for a standing identity; the series with the probe connecting after the go shows it. The `tessera task run` series is the whole command from its spawn: starting `tessera` (compare its --version baseline), its connection and StartTask, the fork of the command's process held before its exec, the release, the probe's exec and start-up, its connection and FetchX509SVID; `spawn to exit` adds the probe's exit, the task's end (EndTask) and the CLI's exit. It holds two process starts, so it cannot come below twice the /bin/true baseline on any machine.".into(),
        seconds: 0.0,
        charts: vec![Chart::Cdf {
            file: "task_start.png".into(),
            title: "StartTask to the task process holding its SVID; tessera task run".into(),
            series: vec![started, unconnected, run_held, runs],
        }],
    })
}

/// One stream message from a relying party on agent 1 or 2.
pub(super) struct Update {
    /// 1 or 2.
    pub agent: usize,
    /// When it arrived.
    pub at: Instant,
    /// The CRLs it carried.
    pub crls: Vec<Vec<u8>>,
}

/// Whether `crls` list every one of `serials`.
pub(super) fn list_all(crls: &[Vec<u8>], serials: &[String]) -> bool {
    let parsed: Vec<_> = crls.iter().filter_map(|der| parse_crl(der).ok()).collect();
    serials
        .iter()
        .all(|serial| parsed.iter().any(|info| info.find(serial).is_some()))
}

/// The serial (lowercase hex) and the task id of the leaf in `dir/svid.pem`, once it has been
/// written whole.
pub(super) fn written_svid(dir: &Path) -> Option<(String, String)> {
    let text = std::fs::read(dir.join("svid.pem")).ok()?;
    let leaf = pem::parse_many(&text).ok()?.into_iter().next()?;
    let (_, cert) = X509Certificate::from_der(leaf.contents()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let task = san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => {
            uri.rsplit_once("/task/").map(|(_, id)| id.to_owned())
        }
        _ => None,
    })?;
    Some((hex::encode(cert.raw_serial()), task))
}

/// The three levels' arguments: `tessera task run ... -- LEVEL DIR` three times, innermost
/// sleeping.
fn chain_args(uri: &str, level: &Path, dirs: &[PathBuf]) -> Vec<String> {
    let tessera = tessera_binary().display().to_string();
    let mut args = Vec::new();
    for (n, (entry, out)) in ["coder", "reviewer", "tester"].iter().zip(dirs).enumerate() {
        if n > 0 {
            args.push(tessera.clone());
        }
        args.extend(
            [
                "task",
                "run",
                "--socket",
                uri,
                "--entry",
                entry,
                "--purpose",
                "task cascade benchmark",
                "--",
            ]
            .map(String::from),
        );
        args.push(level.display().to_string());
        args.push(out.display().to_string());
    }
    args.extend(["/bin/sleep".into(), "600".into()]);
    args
}

/// Kills a chain's process group and reaps its leader.
fn kill_chain(chain: &mut Child) {
    let group = nix::unistd::Pid::from_raw(chain.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = chain.wait();
}

/// A chain's process group, killed when dropped (on every way out of a round).
pub(super) struct Chain(pub Child);

impl Drop for Chain {
    fn drop(&mut self) {
        kill_chain(&mut self.0);
    }
}

/// A task entry for this uid, made through the admin API.
pub(super) async fn create_task_entry(
    server: &mut Server,
    id: &str,
    delegates_to: Option<&str>,
    purpose: &str,
) -> Result<(), BenchError> {
    server
        .admin
        .create_entry(CreateEntryRequest {
            entry: Some(Entry {
                id: id.into(),
                spiffe_id: format!("spiffe://{CLUSTER_DOMAIN}/{id}"),
                selectors: vec![uid_selector()],
                x509_ttl_seconds: 600,
                owner: "bench".into(),
                purpose: purpose.into(),
                activation: "task".into(),
                delegates_to: delegates_to.map(String::from).into_iter().collect(),
                ..Default::default()
            }),
        })
        .await
        .map_err(failed("creating a task entry"))?;
    Ok(())
}

/// Three agents of `server` in server mode and a relying party on each: a FetchX509SVID stream
/// of the standing `/relying-party` identity (an entry made here for this uid). Tasks run on
/// agent 0; the streams on agents 1 and 2 report every message with the CRLs it carries.
pub(super) struct RelyingParties {
    /// The agents' processes, killed on drop.
    pub agents: Vec<tessera_harness::Process>,
    /// Agent 0's Workload API socket.
    pub socket: PathBuf,
    /// The messages of agents 1 and 2's streams.
    pub updates: mpsc::UnboundedReceiver<Update>,
}

impl RelyingParties {
    pub async fn start(server: &mut Server, dir: &Path) -> Result<Self, BenchError> {
        server
            .admin
            .create_entry(CreateEntryRequest {
                entry: Some(Entry {
                    spiffe_id: format!("spiffe://{CLUSTER_DOMAIN}/relying-party"),
                    selectors: vec![uid_selector()],
                    x509_ttl_seconds: 600,
                    owner: "bench".into(),
                    purpose: "task benchmarks: the relying parties".into(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(failed("creating the relying parties' entry"))?;
        let mut agents = Vec::new();
        let mut sockets = Vec::new();
        let (tx, updates) = mpsc::unbounded_channel();
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        for index in 0..3 {
            let files = server
                .agent_config(dir, &format!("agent-{index}"), "")
                .await?;
            agents.push(files.start()?);
            let mut client =
                tessera::cli::client::connect(&format!("unix://{}", files.socket.display()))
                    .await
                    .map_err(|f| BenchError::Failed(f.message))?;
            sockets.push(files.socket);
            let mut stream = client
                .fetch_x509svid(X509svidRequest {})
                .await
                .map_err(failed("opening a workload stream"))?
                .into_inner();
            let (tx, ready_tx) = (tx.clone(), ready_tx.clone());
            tokio::spawn(async move {
                let mut first = true;
                while let Some(Ok(message)) = stream.next().await {
                    let at = Instant::now();
                    if std::mem::take(&mut first) && ready_tx.send(index).is_err() {
                        return;
                    }
                    // Agent 0's stream only tells that its agent has the entries.
                    if index > 0
                        && tx
                            .send(Update {
                                agent: index,
                                at,
                                crls: message.crl,
                            })
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
        drop((tx, ready_tx));
        for _ in 0..3 {
            tokio::time::timeout(STEP, ready.recv())
                .await
                .map_err(|_| BenchError::Failed(format!("an agent sent no SVID within {STEP:?}")))?
                .ok_or_else(|| BenchError::Failed("a workload stream ended".into()))?;
        }
        let socket = sockets.swap_remove(0);
        Ok(Self {
            agents,
            socket,
            updates,
        })
    }
}

/// Scenario 10: a chain of three delegated tasks on agent 0 ended by an operator through the
/// server, until relying parties on agents 1 and 2 hold CRLs listing the three task SVIDs.
pub async fn task_cascade(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    let mut server = Server::start(dir, "").await?;
    for (id, delegates) in [
        ("tester", None),
        ("reviewer", Some("tester")),
        ("coder", Some("reviewer")),
    ] {
        create_task_entry(&mut server, id, delegates, "task cascade benchmark").await?;
    }
    let RelyingParties {
        agents: _agents,
        socket,
        mut updates,
    } = RelyingParties::start(&mut server, dir).await?;

    let level = dir.join("level.sh");
    let uri = format!("unix://{}", socket.display());
    std::fs::write(
        &level,
        format!(
            "#!/bin/sh\nout=$1\nshift\n{} svid fetch --socket {uri} --out \"$out\" >/dev/null || exit 3\nexec \"$@\"\n",
            tessera_binary().display()
        ),
    )
    .map_err(io_err("writing the level script"))?;
    std::fs::set_permissions(&level, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(io_err("chmod of the level script"))?;

    let (mut last, mut per_agent) = (Vec::new(), [Vec::new(), Vec::new()]);
    for round in 0..plan.cascade_rounds {
        let round_dir = dir.join(format!("round-{round}"));
        let dirs: Vec<PathBuf> = (1..=3)
            .map(|n| round_dir.join(format!("level{n}")))
            .collect();
        let mut command = tessera_harness::command(tessera_binary());
        command
            .args(chain_args(&uri, &level, &dirs))
            .env("TESSERA_LOG", "warn")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut chain = Chain(command.spawn().map_err(io_err("starting the task chain"))?);

        // Every level has written its SVID, and the server lists the three tasks live.
        let deadline = Instant::now() + STEP;
        let held = loop {
            let held: Vec<_> = dirs.iter().filter_map(|d| written_svid(d)).collect();
            if held.len() == 3 {
                break held;
            }
            if let Ok(Some(status)) = chain.0.try_wait() {
                let mut why = String::new();
                if let Some(mut err) = chain.0.stderr.take() {
                    let _ = err.read_to_string(&mut why);
                }
                return Err(BenchError::Failed(format!(
                    "the task chain exited ({status}) before its three levels held their SVIDs: {}",
                    why.trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!(
                    "the task chain's three levels did not hold their SVIDs within {STEP:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let serials: Vec<String> = held.iter().map(|(serial, _)| serial.clone()).collect();
        let root = held[0].1.clone();
        let deadline = Instant::now() + STEP;
        loop {
            let listed = server
                .admin
                .list_tasks(ListTasksRequest {
                    include_ended: false,
                })
                .await
                .map_err(failed("listing the server's tasks"))?
                .into_inner()
                .tasks;
            let live = |id: &str| listed.iter().any(|t| t.task_id == id && t.ended_ms == 0);
            if held.iter().all(|(_, task)| live(task)) {
                break;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!(
                    "the server did not list the chain's three tasks within {STEP:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let started = Instant::now();
        let ended = server
            .admin
            .end_task(EndTaskOrderRequest {
                task_id: root.clone(),
                reason: "benchmark".into(),
            })
            .await
            .map_err(failed("ending the root task"))?
            .into_inner()
            .tasks;
        if ended.len() != 3 {
            return Err(BenchError::Failed(format!(
                "EndTask of {root} ended {} tasks, not the chain's three",
                ended.len()
            )));
        }
        let mut seen: [Option<Instant>; 2] = [None, None];
        while seen.iter().any(Option::is_none) {
            let update = tokio::time::timeout(STEP, updates.recv())
                .await
                .map_err(|_| {
                    BenchError::Failed(format!(
                        "agents 1 and 2 did not list the chain's serials within {STEP:?}"
                    ))
                })?
                .ok_or_else(|| BenchError::Failed("a workload stream ended".into()))?;
            let slot = &mut seen[update.agent - 1];
            if slot.is_none() && update.at >= started && list_all(&update.crls, &serials) {
                *slot = Some(update.at);
            }
        }
        for (samples, at) in per_agent.iter_mut().zip(seen.into_iter().flatten()) {
            samples.push(at.saturating_duration_since(started));
        }
        last.push(
            seen.into_iter()
                .flatten()
                .max()
                .unwrap_or(started)
                .saturating_duration_since(started),
        );
        drop(chain);
        let _ = std::fs::remove_dir_all(&round_dir);
    }

    let last = Distribution::of("last of agents 1 and 2", &mut last);
    let [mut first, mut second] = per_agent;
    let agent_1 = Distribution::of("agent 1", &mut first);
    let agent_2 = Distribution::of("agent 2", &mut second);
    let p99 = last.at(0.99);
    Ok(ScenarioResult {
        name: "task_cascade".into(),
        description: format!(
            "A server and three agents in server mode. {} rounds: on agent 0, a chain of three delegated tasks with real processes (`tessera task run --entry coder` of a script that fetches its SVID and runs `tessera task run --entry reviewer`, and so on to `tester`, which sleeps); once the three SVIDs are written and the server lists the three tasks, the root is ended through the admin API's EndTask, until FetchX509SVID streams on agents 1 and 2 have each sent a message whose CRLs list all three serials.",
            last.samples
        ),
        target: "p99 under 1 s".into(),
        met: p99 < CASCADE_TARGET_US,
        figures: vec![
            ("p50 (µs)".into(), last.at(0.5)),
            ("p90 (µs)".into(), last.at(0.9)),
            ("p99 (µs)".into(), p99),
            ("agent 1 p50 (µs)".into(), agent_1.at(0.5)),
            ("agent 1 p99 (µs)".into(), agent_1.at(0.99)),
            ("agent 2 p50 (µs)".into(), agent_2.at(0.5)),
            ("agent 2 p99 (µs)".into(), agent_2.at(0.99)),
        ],
        note: "The clock starts just before the admin API's EndTask of the root task and stops at the later of the two relying parties' messages. It includes the order's sync push to agent 0, the end of the task and its two descendants there, the revocation of their three SVIDs in agent 0's CRL, its PublishCrls call, the server's store and the sync push of the CRL set to agents 1 and 2, and their workload stream messages. The chain's processes are killed after each round; agent 0's CRL grows by three entries a round.".into(),
        seconds: 0.0,
        charts: vec![Chart::Cdf {
            file: "task_cascade.png".into(),
            title: "Operator's EndTask of a three-task chain to CRLs on two other agents".into(),
            series: vec![last, agent_1, agent_2],
        }],
    })
}

/// One round of `task_start`: a probe started and up, a task started for it, the go; how long
/// from StartTask until the probe held its SVID, and the StartTask call alone. With `baseline`,
/// a ListTasks call in StartTask's place, timed, and no task.
async fn start_round(
    tasks: &mut TasksApi,
    exe: &Path,
    socket_arg: &str,
    connect_first: bool,
    baseline: bool,
) -> Result<(Duration, Duration), BenchError> {
    let mut command = tessera_harness::command(exe);
    command.args(["task-probe", "--socket", socket_arg, "--wait"]);
    if connect_first {
        command.arg("--connect-first");
    }
    let mut probe = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err("starting a probe"))?;
    let pid = probe.id() as i32;
    // The probe's own start-up (exec, loading, its runtime) is the workload's cost, not the
    // task's: the clock starts once the probe says it is waiting.
    let mut up = probe
        .stdout
        .take()
        .ok_or_else(|| BenchError::Failed("the probe has no standard output".into()))?;
    let (up, said) = tokio::task::spawn_blocking(move || {
        let mut byte = [0u8; 1];
        let said = up.read_exact(&mut byte).map(|()| byte[0]);
        (up, said)
    })
    .await
    .map_err(|e| BenchError::Failed(format!("waiting for the probe: {e}")))?;
    if !matches!(said, Ok(b'r')) {
        let _ = probe.kill();
        let output = probe.wait_with_output();
        return Err(BenchError::Failed(format!(
            "the probe did not say it was up ({said:?}): {}",
            output.map_or_else(
                |e| e.to_string(),
                |o| String::from_utf8_lossy(&o.stderr).trim().to_owned()
            )
        )));
    }
    probe.stdout = Some(up);
    let mut go = probe
        .stdin
        .take()
        .ok_or_else(|| BenchError::Failed("the probe has no standard input".into()))?;
    if baseline {
        // The same moment, a call that only attests and answers: what a call costs here.
        let t0 = monotonic_ns()?;
        let listed = tasks
            .list_tasks(ListTasksRequest {
                include_ended: false,
            })
            .await;
        let call = Duration::from_nanos(monotonic_ns()?.saturating_sub(t0));
        drop(go);
        let _ = probe.kill();
        let _ = probe.wait();
        listed.map_err(failed("ListTasks"))?;
        return Ok((call, call));
    }
    let t0 = monotonic_ns()?;
    let task = tasks
        .start_task(StartTaskRequest {
            entry: WORKER.into(),
            purpose: "task start benchmark".into(),
            pid,
            ..Default::default()
        })
        .await;
    let task = match task {
        Ok(response) => response.into_inner().task,
        Err(status) => {
            drop(go);
            let _ = probe.kill();
            let _ = probe.wait();
            return Err(failed("StartTask")(status));
        }
    }
    .ok_or_else(|| BenchError::Failed("StartTask described no task".into()))?;
    let call = Duration::from_nanos(monotonic_ns()?.saturating_sub(t0));
    go.write_all(b"g")
        .map_err(io_err("writing the go byte to the probe"))?;
    drop(go);
    let (output, _) = finish(probe, STEP).await?;
    let (spiffe_id, held) = parse_probe(&output.stdout, &output.stderr)?;
    if spiffe_id != task.spiffe_id {
        return Err(BenchError::Failed(format!(
            "the probe held {spiffe_id}, not its task's {}",
            task.spiffe_id
        )));
    }
    Ok((Duration::from_nanos(held.saturating_sub(t0)), call))
}

/// `rounds` runs of `program args`, each timed from spawn to exit, after one unmeasured run
/// that pays for loading the binary.
async fn spawn_to_exit(
    program: &Path,
    args: &[&str],
    rounds: usize,
) -> Result<Vec<Duration>, BenchError> {
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds + 1 {
        let mut command = std::process::Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let child = command
            .spawn()
            .map_err(io_err(format!("starting {}", program.display())))?;
        let (output, exited) = finish(child, STEP).await?;
        if !output.status.success() {
            return Err(BenchError::Failed(format!(
                "{} failed ({}): {}",
                program.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        if round > 0 {
            times.push(exited.saturating_duration_since(spawned));
        }
    }
    Ok(times)
}
