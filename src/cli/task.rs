//! `tessera task run|start|end|list`: task credentials from the agent's workload socket.
//!
//! `task run` starts a task for a command and ends it when the command exits, passing its exit
//! status through. The command's process must exist before the agent can pin it, and must not
//! run before its task does: `task run` forks the process and holds it before its exec
//! ([`HeldCommand`]), asks the agent for the task with its pid, and only then releases it.

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;

use super::client::{channel, socket_path, status_failure};
use super::held::{Ended, HeldCommand};
use super::table::{Table, fields, time_or};
use super::{Failure, Output};
use crate::events::model::{JsonTime, task_end_reason_name};
use crate::proto::tessera::tasks_client::TasksClient;
use crate::proto::tessera::{
    EndTaskOrderRequest, EndTaskRequest, ListTasksRequest, StartTaskRequest, Task,
};

#[derive(Args, Debug)]
pub(super) struct TaskArgs {
    #[command(subcommand)]
    command: TaskCommand,
}

#[derive(Subcommand, Debug)]
enum TaskCommand {
    /// Run CMD as a task: it and every process it starts get the task's identity from the
    /// Workload API; the task ends when CMD exits, with CMD's exit status. Inside a task this
    /// starts a child task (delegation).
    Run(RunArgs),
    /// Start a task for a process a runtime manages itself (yours: --pid, a process you or
    /// your parent started; else this command itself, which is rarely what you want).
    Start(StartArgs),
    /// End a task and every task delegated from it; their SVIDs are revoked.
    End(EndArgs),
    /// List the tasks you may end (your user's; all for root).
    List(ListArgs),
}

#[derive(Args, Debug)]
struct SocketArgs {
    /// Workload API address (unix:///path); defaults to $SPIFFE_ENDPOINT_SOCKET.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", value_name = "URI")]
    socket: Option<String>,
}

#[derive(Args, Debug)]
struct TaskFlags {
    /// The task entry: its id or its SPIFFE ID.
    #[arg(long, value_name = "ENTRY")]
    entry: String,
    /// What the task is for, in a sentence.
    #[arg(long)]
    purpose: String,
    /// The task's lifetime, e.g. 10m (default: the agent's tasks.default_ttl; inside a task,
    /// at most what the parent has left).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// End the task after this long without its identity being used, e.g. 5m (default and
    /// maximum: the agent's tasks.idle_timeout).
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<String>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    task: TaskFlags,
    /// The command and its arguments, after `--`.
    #[arg(required = true, last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Args, Debug)]
struct StartArgs {
    #[command(flatten)]
    socket: SocketArgs,
    #[command(flatten)]
    task: TaskFlags,
    /// The task's process: one this command's parent started (or this command itself when
    /// omitted).
    #[arg(long)]
    pid: Option<i32>,
}

#[derive(Args, Debug)]
struct EndArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// The task's id.
    #[arg(value_name = "TASK_ID")]
    task_id: String,
    /// Order the end through the admin socket (the server's, or a standalone agent's) instead
    /// of asking the local agent as a workload.
    #[arg(long)]
    server: bool,
    /// Why (with --server; recorded with the order).
    #[arg(long, requires = "server")]
    reason: Option<String>,
    #[command(flatten)]
    admin: super::admin::AdminArgs,
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    socket: SocketArgs,
    /// Include ended tasks.
    #[arg(long)]
    all: bool,
    /// List every node's tasks from the admin socket (the server's, or a standalone agent's)
    /// instead of the local agent's tasks you may end.
    #[arg(long)]
    server: bool,
    #[command(flatten)]
    admin: super::admin::AdminArgs,
}

/// Runs the task command.
pub(super) async fn run(args: TaskArgs, output: Output) -> Result<(), Failure> {
    match args.command {
        TaskCommand::Run(args) => run_command(args).await,
        TaskCommand::Start(args) => {
            let mut client = connect(&args.socket).await?;
            let request = start_request(&args.task, args.pid.unwrap_or(0))?;
            let task = start(&mut client, request).await?;
            print_task(output, &task)
        }
        TaskCommand::End(args) if args.server => {
            let reason = args.reason.clone().ok_or_else(|| {
                Failure::usage("--server needs --reason: say why the task is ended")
            })?;
            let mut admin = super::admin::Admin::connect(&args.admin).await?;
            let ended = admin
                .client
                .end_task(EndTaskOrderRequest {
                    task_id: args.task_id.clone(),
                    reason,
                })
                .await
                .map_err(|s| admin.lookup_failure(s, "task", &args.task_id))?
                .into_inner()
                .tasks;
            if ended.is_empty() {
                eprintln!(
                    "task {} has ended already, or its end was ordered before",
                    args.task_id
                );
            }
            print_tasks(output, &ended)
        }
        TaskCommand::List(args) if args.server => {
            let mut admin = super::admin::Admin::connect(&args.admin).await?;
            let tasks = admin
                .client
                .list_tasks(ListTasksRequest {
                    include_ended: args.all,
                })
                .await
                .map_err(|s| admin.failure(s))?
                .into_inner()
                .tasks;
            print_tasks(output, &tasks)
        }
        TaskCommand::End(args) => {
            let mut client = connect(&args.socket).await?;
            let response = client
                .end_task(EndTaskRequest {
                    task_id: args.task_id,
                })
                .await
                .map_err(status_failure)?;
            match response.into_inner().task {
                Some(task) => print_task(output, &task),
                None => Ok(()),
            }
        }
        TaskCommand::List(args) => {
            let mut client = connect(&args.socket).await?;
            let tasks = client
                .list_tasks(ListTasksRequest {
                    include_ended: args.all,
                })
                .await
                .map_err(status_failure)?
                .into_inner()
                .tasks;
            print_tasks(output, &tasks)
        }
    }
}

type Client = TasksClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

async fn connect(args: &SocketArgs) -> Result<Client, Failure> {
    let address = args.socket.as_deref().ok_or_else(|| {
        Failure::usage(
            "no Workload API socket: pass --socket unix:///path/to/agent.sock or set \
             SPIFFE_ENDPOINT_SOCKET",
        )
    })?;
    let channel = channel(&socket_path(address)?).await?;
    Ok(TasksClient::with_interceptor(
        channel,
        super::client::add_security_header as fn(_) -> _,
    ))
}

fn duration_flag(flag: &str, value: Option<&str>) -> Result<i64, Failure> {
    match value {
        None => Ok(0),
        Some(text) => {
            let duration = crate::config::parse_duration(text).map_err(|reason| {
                Failure::usage(format!("{flag} {text:?}: {reason}; write e.g. 10m"))
            })?;
            if duration < Duration::from_secs(1) {
                return Err(Failure::usage(format!(
                    "{flag} {text:?}: must be at least 1s"
                )));
            }
            Ok(duration.as_secs() as i64)
        }
    }
}

fn start_request(flags: &TaskFlags, pid: i32) -> Result<StartTaskRequest, Failure> {
    if flags.purpose.trim().is_empty() {
        return Err(Failure::usage(
            "--purpose is empty: say in a sentence what the task is for",
        ));
    }
    Ok(StartTaskRequest {
        entry: flags.entry.clone(),
        purpose: flags.purpose.clone(),
        ttl_seconds: duration_flag("--ttl", flags.ttl.as_deref())?,
        pid,
        idle_timeout_seconds: duration_flag("--idle-timeout", flags.idle_timeout.as_deref())?,
    })
}

async fn start(client: &mut Client, request: StartTaskRequest) -> Result<Task, Failure> {
    let response = client.start_task(request).await.map_err(|status| {
        let message = status.message().to_owned();
        match status.code() {
            tonic::Code::InvalidArgument => Failure::usage(format!("the agent refused: {message}")),
            tonic::Code::NotFound
            | tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition => {
                Failure::failed(format!("the agent refused the task: {message}"))
            }
            _ => status_failure(status),
        }
    })?;
    response
        .into_inner()
        .task
        .ok_or_else(|| Failure::failed("the agent started a task but did not describe it"))
}

/// `task run`: the held process, the task, the release, then the command's exit status.
async fn run_command(args: RunArgs) -> Result<(), Failure> {
    let request = start_request(&args.task, 0)?;
    let mut client = connect(&args.socket).await?;
    let mut held = HeldCommand::fork(&args.command)?;
    let pid = held.pid();
    // On failure, dropping `held` unreleased makes its process exit without running anything.
    let task = start(&mut client, StartTaskRequest { pid, ..request }).await?;
    tracing::debug!(task = %task.task_id, spiffe_id = %task.spiffe_id, pid, "task started");
    // Caught from before the release, so that a signal the command could already have had
    // reaches it instead of ending this process.
    let signals = termination_signals();
    held.release()?;
    let ended = wait_forwarding_signals(held, signals).await;
    // The agent sees the exit through its pidfd; ending explicitly as well covers an agent
    // whose watcher lagged. Already ended is fine.
    let _ = client
        .end_task(EndTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await;
    let code = match ended? {
        Ended::Exited(code) => code.clamp(0, 255) as u8,
        Ended::Killed(signal) => (128 + signal as i32).clamp(0, 255) as u8,
    };
    if code == 0 {
        Ok(())
    } else {
        Err(Failure::exit(code))
    }
}

/// Waits for `held`, passing on to it what `streams` catch.
async fn wait_forwarding_signals(
    held: HeldCommand,
    mut streams: Signals,
) -> Result<Ended, Failure> {
    let pid = nix::unistd::Pid::from_raw(held.pid());
    let waiter = tokio::task::spawn_blocking(move || {
        let mut held = held;
        held.wait()
    });
    tokio::pin!(waiter);
    loop {
        let next_signal = futures_signal(&mut streams);
        tokio::select! {
            done = &mut waiter => {
                return done
                    .map_err(|e| Failure::failed(format!("waiting for the command: {e}")))?;
            }
            Some(forward) = next_signal => {
                let _ = nix::sys::signal::kill(pid, forward);
            }
        }
    }
}

/// The signals `task run` passes on, each with the signal it sends the command.
type Signals = Vec<(tokio::signal::unix::Signal, nix::sys::signal::Signal)>;

/// Catches SIGINT, SIGTERM, SIGHUP and SIGQUIT (those that can be caught here).
fn termination_signals() -> Signals {
    use tokio::signal::unix::{SignalKind, signal};
    [
        (SignalKind::interrupt(), nix::sys::signal::Signal::SIGINT),
        (SignalKind::terminate(), nix::sys::signal::Signal::SIGTERM),
        (SignalKind::hangup(), nix::sys::signal::Signal::SIGHUP),
        (SignalKind::quit(), nix::sys::signal::Signal::SIGQUIT),
    ]
    .into_iter()
    .filter_map(|(kind, forward)| signal(kind).ok().map(|stream| (stream, forward)))
    .collect()
}

/// The next signal any of `streams` receives.
async fn futures_signal(
    streams: &mut [(tokio::signal::unix::Signal, nix::sys::signal::Signal)],
) -> Option<nix::sys::signal::Signal> {
    if streams.is_empty() {
        return std::future::pending().await;
    }
    let waits = streams.iter_mut().map(|(stream, forward)| {
        let forward = *forward;
        Box::pin(async move { stream.recv().await.map(|()| forward) })
    });
    futures_select_all(waits).await
}

/// The first of `futures` to finish.
async fn futures_select_all<F, T>(futures: impl Iterator<Item = std::pin::Pin<Box<F>>>) -> T
where
    F: std::future::Future<Output = T> + ?Sized,
{
    let mut futures: Vec<_> = futures.collect();
    std::future::poll_fn(move |cx| {
        for future in futures.iter_mut() {
            if let std::task::Poll::Ready(value) = future.as_mut().poll(cx) {
                return std::task::Poll::Ready(value);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// A task's JSON form.
#[derive(Serialize)]
pub(super) struct TaskView<'a> {
    task_id: &'a str,
    entry_id: &'a str,
    spiffe_id: &'a str,
    owner: &'a str,
    purpose: &'a str,
    chain: Vec<&'a str>,
    pid: i32,
    node_id: Option<&'a str>,
    #[serde(flatten)]
    started: JsonTime,
    #[serde(flatten)]
    deadline: JsonTime,
    #[serde(flatten)]
    ended: JsonTime,
    end_reason: Option<&'static str>,
    idle_timeout_seconds: i64,
    starter_uid: u32,
}

/// A task as JSON shows it.
pub(super) fn view(task: &Task) -> TaskView<'_> {
    TaskView {
        task_id: &task.task_id,
        entry_id: &task.entry_id,
        spiffe_id: &task.spiffe_id,
        owner: &task.owner,
        purpose: &task.purpose,
        chain: task.chain.iter().map(|l| l.task_id.as_str()).collect(),
        pid: task.pid,
        node_id: Some(task.node_id.as_str()).filter(|n| !n.is_empty()),
        started: JsonTime::from_ms("started_at", Some(task.started_ms)),
        deadline: JsonTime::from_seconds("deadline", task.deadline),
        ended: JsonTime::from_ms("ended_at", (task.ended_ms != 0).then_some(task.ended_ms)),
        end_reason: (task.ended_ms != 0).then(|| task_end_reason_name(task.end_reason())),
        idle_timeout_seconds: task.idle_timeout_seconds,
        starter_uid: task.starter_uid,
    }
}

/// Prints one task.
pub(super) fn print_task(output: Output, task: &Task) -> Result<(), Failure> {
    match output {
        Output::Json => super::admin::print_json(&view(task)),
        Output::Text => {
            let v = view(task);
            let one = |value: String| vec![value];
            let mut rows = vec![
                ("task id", one(v.task_id.to_owned())),
                ("spiffe id", one(v.spiffe_id.to_owned())),
                ("entry", one(v.entry_id.to_owned())),
                ("owner", one(v.owner.to_owned())),
                ("purpose", one(v.purpose.to_owned())),
                ("chain", v.chain.iter().map(|c| (*c).to_owned()).collect()),
                ("pid", one(v.pid.to_string())),
                ("deadline", one(time_or(task.deadline, "-"))),
            ];
            if let Some(node) = v.node_id {
                rows.push(("node", one(node.to_owned())));
            }
            if let Some(reason) = v.end_reason {
                rows.push(("ended", one(reason.to_owned())));
            }
            super::admin::print_text(&fields(&rows))
        }
    }
}

/// Prints tasks as a table or a JSON array.
pub(super) fn print_tasks(output: Output, tasks: &[Task]) -> Result<(), Failure> {
    match output {
        Output::Json => super::admin::print_json(&tasks.iter().map(view).collect::<Vec<_>>()),
        Output::Text if tasks.is_empty() => {
            eprintln!("no tasks");
            Ok(())
        }
        Output::Text => super::admin::print_text(&task_table(tasks)),
    }
}

/// Tasks as a table: id, SPIFFE ID, depth, process and node, owner, purpose, deadline, state.
pub(super) fn task_table(tasks: &[Task]) -> String {
    let mut table = Table::new(&[
        "TASK",
        "SPIFFE ID",
        "DEPTH",
        "PID",
        "NODE",
        "OWNER",
        "PURPOSE",
        "DEADLINE",
        "ENDED",
    ]);
    for task in tasks {
        table.row(vec![
            task.task_id.clone(),
            task.spiffe_id.clone(),
            task.chain.len().to_string(),
            task.pid.to_string(),
            Some(task.node_id.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "-".into()),
            task.owner.clone(),
            task.purpose.clone(),
            time_or(task.deadline, "-"),
            if task.ended_ms == 0 {
                "live".into()
            } else {
                task_end_reason_name(task.end_reason()).into()
            },
        ]);
    }
    table.render()
}
