//! Scenario `task_ends`: every way a task ends, each timed from its trigger until relying
//! parties on two other nodes hold CRLs that list the task's SVID. A server and three agents
//! in server mode; the tasks run on agent 0 for a process the harness starts, which fetches
//! the task's SVID with `tessera svid fetch` and sleeps.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use super::chart::{Chart, Distribution};
use super::cluster::{Server, failed};
use super::tasks::{
    Chain, RelyingParties, STEP, TasksApi, Update, create_task_entry, list_all, tasks_client,
    written_svid,
};
use super::{BenchError, Plan, ScenarioResult, io_err, tessera_binary};
use tessera::ca::crl::parse_crl;
use tessera::proto::tessera::{
    EndTaskOrderRequest, EndTaskRequest, EntryRequest, ListTasksRequest, SetPolicyRequest,
    StartTaskRequest,
};

/// The target, in microseconds: every trigger's p99.
const TARGET_US: f64 = 1_000_000.0;

/// The policy in force throughout: everything is permitted, so that the policy round's own
/// refusal is the only one.
const PERMIT_ALL: &str = "@id(\"all\") permit(principal, action, resource);\n";

/// How a task is made to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The task's process is killed; the agent's pidfd watcher sees it.
    ProcessExit,
    /// The starter calls the Tasks service's EndTask.
    EndTask,
    /// The operator orders the end through the server (`tessera task end --server`).
    Operator,
    /// The task's lifetime (2 s) runs out. Its SVID expires then too (its notAfter is at most
    /// the deadline), so this one is measured as the SVID's notAfter after the deadline.
    Deadline,
    /// The task goes unused for its idle timeout (1 s) after its one fetch.
    Idle,
    /// The task's entry is deleted on the server.
    EntryRemoved,
    /// A new policy refuses the task (its purpose).
    PolicyChanged,
    /// The task delegates to a sub-task deeper than the server's `max_task_depth` (1): the
    /// server orders the sub-task ended as an anomaly.
    Anomaly,
}

impl Trigger {
    const ALL: [Trigger; 8] = [
        Trigger::ProcessExit,
        Trigger::EndTask,
        Trigger::Operator,
        Trigger::Deadline,
        Trigger::Idle,
        Trigger::EntryRemoved,
        Trigger::PolicyChanged,
        Trigger::Anomaly,
    ];

    fn name(self) -> &'static str {
        match self {
            Trigger::ProcessExit => "process exit",
            Trigger::EndTask => "EndTask",
            Trigger::Operator => "operator, through the server",
            Trigger::Deadline => "deadline (SVID expiry after it)",
            Trigger::Idle => "idle timeout",
            Trigger::EntryRemoved => "entry removed",
            Trigger::PolicyChanged => "policy change",
            Trigger::Anomaly => "anomaly, found by the server",
        }
    }
}

/// Scenario 11: each end trigger, from the trigger to CRLs on two other agents.
pub async fn task_ends(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    let mut server = Server::start(dir, "max_task_depth = 1").await?;
    for (id, delegates) in [("reviewer", None), ("coder", Some("reviewer"))] {
        create_task_entry(&mut server, id, delegates, "task end benchmark").await?;
    }
    server
        .admin
        .set_policy(SetPolicyRequest {
            text: PERMIT_ALL.into(),
        })
        .await
        .map_err(failed("setting the policy"))?;
    let RelyingParties {
        agents: _agents,
        socket,
        mut updates,
    } = RelyingParties::start(&mut server, dir).await?;
    let mut tasks = tasks_client(&socket).await?;
    let mut bench = Bench {
        server,
        tasks: &mut tasks,
        updates: &mut updates,
        uri: format!("unix://{}", socket.display()),
        dir,
        latest: Default::default(),
    };

    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); Trigger::ALL.len()];
    let started = Instant::now();
    // Round-robin, so that the machine's drift falls on every trigger alike.
    for round in 0..plan.task_end_rounds {
        for (trigger, samples) in Trigger::ALL.into_iter().zip(&mut samples) {
            let latency = bench.round(trigger, round).await.map_err(|e| {
                BenchError::Failed(format!("round {round}, {}: {e}", trigger.name()))
            })?;
            samples.push(latency);
        }
    }
    let seconds = started.elapsed().as_secs_f64();

    let mut series: Vec<Distribution> = Trigger::ALL
        .into_iter()
        .zip(&mut samples)
        .map(|(trigger, samples)| Distribution::of(trigger.name(), samples))
        .collect();
    let worst = series.iter().map(|d| d.at(0.99)).fold(0.0, f64::max);
    let mut figures = Vec::new();
    for distribution in &series {
        figures.push((
            format!("{} p50 (µs)", distribution.name),
            distribution.at(0.5),
        ));
        figures.push((
            format!("{} p99 (µs)", distribution.name),
            distribution.at(0.99),
        ));
    }
    // The deadline's figure is not a latency (it is 0 when the SVID expires with its task).
    series.retain(|d| d.name != Trigger::Deadline.name());
    series.sort_by(|a, b| a.at(0.5).total_cmp(&b.at(0.5)));
    Ok(ScenarioResult {
        name: "task_ends".into(),
        description: format!(
            "A server (max_task_depth = 1, a policy permitting everything) and three agents in server mode; relying parties hold FetchX509SVID streams on agents 1 and 2. {} rounds, each taking every trigger in turn: on agent 0, the harness starts a process and a task for it through the Tasks service (entry coder); the process fetches the task's SVID with `tessera svid fetch` and sleeps; then the trigger, until both relying parties' streams have carried CRLs listing that SVID. For the anomaly, the process runs `tessera task run --entry reviewer` instead, a delegation the agent allows and the server does not, and the clock stops at the first serial listed that was not listed before.",
            plan.task_end_rounds
        ),
        target: "each end trigger revokes the task's SVIDs through CRLs within 1 s (p99)".into(),
        met: worst < TARGET_US,
        figures,
        note: "Where each clock starts: process exit, just before the kill; EndTask, entry removed and policy change, just before the call; operator, just before the admin API's EndTask; deadline: no clock, the SVID's notAfter less the task's deadline (0 when it expires at or before it; a CRL does not list an expired certificate, and relying parties refuse it from its notAfter on); idle timeout, one second after the task's SVID was written to disk (just after the agent counted the fetch as a use, so the figure is low by the write); anomaly, at the sub-task's start as the agent stamped it. Each stops at the later of the two relying parties' messages. The ends detected on agent 0 (exit, EndTask, deadline, idle) then cost one CRL publication and the server's push; those the server decides (operator, entry removed, policy change, anomaly) add the server's decision and its sync to agent 0 first, and the anomaly also the upload of the sub-task's start event.".into(),
        seconds,
        charts: vec![Chart::Cdf {
            file: "task_ends.png".into(),
            title: "Each task end trigger to CRLs on two other agents (deadline: see figures)".into(),
            series,
        }],
    })
}

/// What every round uses.
struct Bench<'a> {
    server: Server,
    /// The Tasks service on agent 0.
    tasks: &'a mut TasksApi,
    /// The relying parties' messages.
    updates: &'a mut tokio::sync::mpsc::UnboundedReceiver<Update>,
    /// Agent 0's Workload API.
    uri: String,
    dir: &'a Path,
    /// The serials the latest message of each relying party listed.
    latest: [HashSet<String>; 2],
}

impl Bench<'_> {
    /// One round of `trigger`: the time from it until both relying parties list the SVID.
    async fn round(&mut self, trigger: Trigger, round: usize) -> Result<Duration, BenchError> {
        let round_dir = self.dir.join(format!("round-{round}-{trigger:?}"));
        std::fs::create_dir_all(&round_dir).map_err(io_err("creating a round's directory"))?;
        let out = round_dir.join("svid");
        let entry = if trigger == Trigger::EntryRemoved {
            let id = format!("doomed-{round}");
            create_task_entry(&mut self.server, &id, None, "task end benchmark").await?;
            id
        } else {
            "coder".to_owned()
        };
        let tessera = tessera_binary().display().to_string();
        let uri = &self.uri;
        let fetch = format!(
            "{tessera} svid fetch --socket {uri} --out {} >/dev/null 2>&1",
            out.display()
        );
        let script = if trigger == Trigger::Anomaly {
            format!(
                "read go; exec {tessera} task run --socket {uri} --entry reviewer --purpose sub-task -- /bin/sh -c '{fetch}; exec sleep 600'"
            )
        } else {
            format!("read go; {fetch} || exit 3; exec sleep 600")
        };
        let mut command = std::process::Command::new("/bin/sh");
        command
            .args(["-c", &script])
            .env("TESSERA_LOG", "warn")
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut holder = Chain(
            command
                .spawn()
                .map_err(io_err("starting a task's process"))?,
        );
        let purpose = format!("task end benchmark, round {round}, {}", trigger.name());
        let task = self
            .start_task(StartTaskRequest {
                entry,
                purpose: purpose.clone(),
                pid: holder.0.id() as i32,
                ttl_seconds: if trigger == Trigger::Deadline { 2 } else { 0 },
                idle_timeout_seconds: if trigger == Trigger::Idle { 1 } else { 0 },
            })
            .await?;
        holder
            .0
            .stdin
            .take()
            .ok_or_else(|| BenchError::Failed("the task's process has no standard input".into()))?
            .write_all(b"go\n")
            .map_err(io_err("telling the task's process to go"))?;

        let latency = if trigger == Trigger::Anomaly {
            self.anomaly(&task.task_id).await?
        } else if trigger == Trigger::Deadline {
            // The SVID expires with its task, and a CRL does not list what has expired: relying
            // parties refuse it from its notAfter on, with nothing to propagate.
            let not_after = wait_for(STEP, "the task's SVID written", || not_after(&out)).await?;
            Duration::from_secs(u64::try_from(not_after - task.deadline).unwrap_or(0))
        } else {
            let (serial, _) =
                wait_for(STEP, "the task's SVID written", || written_svid(&out)).await?;
            let started = self.fire(trigger, &task, &out, &purpose).await?;
            self.until_listed(started, |_, crls| {
                list_all(crls, std::slice::from_ref(&serial))
            })
            .await?
        };
        drop(holder);
        self.until_ended(&task.task_id).await?;
        Ok(latency)
    }

    /// StartTask on agent 0, asked again while the server's entries are still on their way.
    async fn start_task(
        &mut self,
        request: StartTaskRequest,
    ) -> Result<tessera::proto::tessera::Task, BenchError> {
        let deadline = Instant::now() + STEP;
        loop {
            match self.tasks.start_task(request.clone()).await {
                Ok(response) => {
                    return response
                        .into_inner()
                        .task
                        .ok_or_else(|| BenchError::Failed("StartTask described no task".into()));
                }
                Err(status)
                    if status.code() == tonic::Code::NotFound && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(status) => return Err(failed("StartTask")(status)),
            }
        }
    }

    /// Sets `trigger` off for `task` (whose SVID is in `out`); the instant its clock starts.
    async fn fire(
        &mut self,
        trigger: Trigger,
        task: &tessera::proto::tessera::Task,
        out: &Path,
        purpose: &str,
    ) -> Result<Instant, BenchError> {
        let started = Instant::now();
        match trigger {
            Trigger::ProcessExit => {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(task.pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .map_err(|e| BenchError::Failed(format!("killing the task's process: {e}")))?;
            }
            Trigger::EndTask => {
                self.tasks
                    .end_task(EndTaskRequest {
                        task_id: task.task_id.clone(),
                    })
                    .await
                    .map_err(failed("EndTask"))?;
            }
            Trigger::Operator => {
                self.server
                    .admin
                    .end_task(EndTaskOrderRequest {
                        task_id: task.task_id.clone(),
                        reason: "benchmark".into(),
                    })
                    .await
                    .map_err(failed("the server's EndTask"))?;
            }
            Trigger::Deadline | Trigger::Anomaly => {
                return Err(BenchError::Failed(format!(
                    "{} is not set off by the harness",
                    trigger.name()
                )));
            }
            Trigger::Idle => {
                let used = std::fs::metadata(out.join("svid.pem"))
                    .and_then(|m| m.modified())
                    .map_err(io_err("reading when the SVID was written"))?;
                return Ok(instant_of(used + Duration::from_secs(1)));
            }
            Trigger::EntryRemoved => {
                self.server
                    .admin
                    .delete_entry(EntryRequest {
                        id: task.entry_id.clone(),
                    })
                    .await
                    .map_err(failed("deleting the task's entry"))?;
            }
            Trigger::PolicyChanged => {
                let text = format!(
                    "{PERMIT_ALL}@id(\"this-round\") forbid(principal, action, resource) when {{ context has requested_purpose && context.requested_purpose == {purpose:?} }};\n"
                );
                self.server
                    .admin
                    .set_policy(SetPolicyRequest { text })
                    .await
                    .map_err(failed("setting the policy"))?;
            }
        }
        Ok(started)
    }

    /// The anomaly round: the sub-task of `root` starts on its own; from its start (as agent 0
    /// stamped it) until both relying parties list a serial they did not list before.
    async fn anomaly(&mut self, root: &str) -> Result<Duration, BenchError> {
        // What the relying parties list now. Earlier rounds' ends have all reached them (each
        // round waits for its tasks to end on the server, and then for the CRLs to settle).
        while let Ok(update) = self.updates.try_recv() {
            self.latest[update.agent - 1] = listed(&update.crls);
        }
        let before = self.latest.clone();
        let deadline = Instant::now() + STEP;
        let sub_started_ms = loop {
            let listed = self.server_tasks().await?;
            if let Some(sub) = listed
                .iter()
                .find(|t| t.chain.len() == 2 && t.chain[0].task_id == root)
            {
                break sub.started_ms;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!(
                    "the server did not list the sub-task of {root} within {STEP:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let started = instant_of(
            SystemTime::UNIX_EPOCH
                + Duration::from_millis(u64::try_from(sub_started_ms).unwrap_or(0)),
        );
        self.until_listed(started, |agent, crls| {
            listed(crls).difference(&before[agent - 1]).next().is_some()
        })
        .await
    }

    /// Waits until both relying parties have received a message, at or after `started`, whose
    /// CRLs `done` accepts; from `started` to the later of the two.
    async fn until_listed(
        &mut self,
        started: Instant,
        done: impl Fn(usize, &[Vec<u8>]) -> bool,
    ) -> Result<Duration, BenchError> {
        let mut seen: [Option<Instant>; 2] = [None, None];
        while seen.iter().any(Option::is_none) {
            let update = tokio::time::timeout(STEP, self.updates.recv())
                .await
                .map_err(|_| {
                    BenchError::Failed(format!(
                        "agents 1 and 2 did not list the task's SVID within {STEP:?}"
                    ))
                })?
                .ok_or_else(|| BenchError::Failed("a workload stream ended".into()))?;
            let slot = &mut seen[update.agent - 1];
            if slot.is_none() && done(update.agent, &update.crls) {
                *slot = Some(update.at);
            }
            self.latest[update.agent - 1] = listed(&update.crls);
        }
        let last = seen.into_iter().flatten().max().unwrap_or(started);
        Ok(last.saturating_duration_since(started))
    }

    /// Every task the server knows, live and ended.
    async fn server_tasks(&mut self) -> Result<Vec<tessera::proto::tessera::Task>, BenchError> {
        Ok(self
            .server
            .admin
            .list_tasks(ListTasksRequest {
                include_ended: true,
            })
            .await
            .map_err(failed("listing the server's tasks"))?
            .into_inner()
            .tasks)
    }

    /// Waits until the server lists `root` and every task delegated from it as ended, then
    /// lets the CRLs settle, so that the next round starts from quiet.
    async fn until_ended(&mut self, root: &str) -> Result<(), BenchError> {
        let deadline = Instant::now() + STEP;
        loop {
            let listed = self.server_tasks().await?;
            let ours: Vec<_> = listed
                .iter()
                .filter(|t| t.chain.first().is_some_and(|l| l.task_id == root))
                .collect();
            if !ours.is_empty() && ours.iter().all(|t| t.ended_ms != 0) {
                break;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!(
                    "the server did not list task {root} ended within {STEP:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }
}

/// The notAfter (Unix seconds) of the leaf in `dir/svid.pem`, once it has been written whole.
fn not_after(dir: &Path) -> Option<i64> {
    let text = std::fs::read(dir.join("svid.pem")).ok()?;
    let leaf = pem::parse_many(&text).ok()?.into_iter().next()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.contents()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The serials (lowercase hex) that `crls` list.
fn listed(crls: &[Vec<u8>]) -> HashSet<String> {
    crls.iter()
        .filter_map(|der| parse_crl(der).ok())
        .flat_map(|info| info.revoked.into_iter().map(|r| r.serial_hex))
        .collect()
}

/// The monotonic instant of wall-clock time `at` (earlier or later than now).
fn instant_of(at: SystemTime) -> Instant {
    let now = (Instant::now(), SystemTime::now());
    match at.duration_since(now.1) {
        Ok(ahead) => now.0 + ahead,
        Err(behind) => now.0.checked_sub(behind.duration()).unwrap_or(now.0),
    }
}

/// Polls `check` every 5 ms until it gives a value, for at most `limit`.
async fn wait_for<T>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, BenchError> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(BenchError::Failed(format!("{what}: not within {limit:?}")));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
