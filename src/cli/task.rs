//! `tessera task run|start|end|list`: task credentials from the agent's workload socket.
//!
//! `task run` starts a task for a command and ends it when the command exits, passing its exit
//! status through. The command's process must exist before the agent can pin it, and must not
//! run before its task does: `task run` starts this same binary as a gate (`task __gate`), which
//! waits on a pipe, asks the agent for the task with the gate's pid, and only then lets the gate
//! execute the command, in the same process.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;

use super::client::{channel, socket_path, status_failure};
use super::table::{Table, fields, time_or};
use super::{Failure, Output};
use crate::events::model::{JsonTime, task_end_reason_name};
use crate::proto::tessera::tasks_client::TasksClient;
use crate::proto::tessera::{
    EndTaskOrderRequest, EndTaskRequest, ListTasksRequest, StartTaskRequest, Task,
};

/// The variable naming the gate's descriptor; removed before the command runs.
const GATE_FD_VAR: &str = "TESSERA_TASK_GATE_FD";
/// The hidden subcommand of the gate.
const GATE_COMMAND: &str = "__gate";
/// Exit code of a gate that was never released (its task did not start).
const GATE_NOT_RELEASED: u8 = 125;
/// Exit code when the command could not be executed.
const COMMAND_NOT_RUN: u8 = 127;

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
    #[command(name = GATE_COMMAND, hide = true)]
    Gate {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
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
        TaskCommand::Gate { .. } => Err(Failure::usage(
            "task __gate is started by `tessera task run`, not by hand",
        )),
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

/// `task run`: the gate, the task, the release, then the command's exit status.
async fn run_command(args: RunArgs) -> Result<(), Failure> {
    let request = start_request(&args.task, 0)?;
    let mut client = connect(&args.socket).await?;
    let (gate_read, gate_write) = nix::unistd::pipe()
        .map_err(|e| Failure::failed(format!("cannot make the gate's pipe: {e}")))?;
    // Only the gate holds the read end across exec; the write end stays here.
    nix::fcntl::fcntl(
        &gate_write,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| Failure::failed(format!("cannot set up the gate's pipe: {e}")))?;
    let exe = std::env::current_exe()
        .map_err(|e| Failure::failed(format!("cannot find this program to start the gate: {e}")))?;
    let mut child = std::process::Command::new(exe)
        .arg("task")
        .arg(GATE_COMMAND)
        .arg("--")
        .args(&args.command)
        .env(GATE_FD_VAR, gate_read.as_raw_fd().to_string())
        .spawn()
        .map_err(|e| Failure::failed(format!("cannot start the gate for the command: {e}")))?;
    drop(gate_read);
    let pid = child.id() as i32;
    let task = match start(&mut client, StartTaskRequest { pid, ..request }).await {
        Ok(task) => task,
        Err(failure) => {
            // Closing the pipe unreleased makes the gate exit without running the command.
            drop(gate_write);
            let _ = child.wait();
            return Err(failure);
        }
    };
    tracing::debug!(task = %task.task_id, spiffe_id = %task.spiffe_id, pid, "task started");
    let mut gate = std::fs::File::from(gate_write);
    if let Err(e) = gate.write_all(b"1") {
        let _ = child.kill();
        let _ = child.wait();
        return Err(Failure::failed(format!("cannot release the command: {e}")));
    }
    drop(gate);
    let status = wait_forwarding_signals(child).await?;
    // The agent sees the exit through its pidfd; ending explicitly as well covers an agent
    // whose watcher lagged. Already ended is fine.
    let _ = client
        .end_task(EndTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
        (None, None) => 1,
    };
    if code == 0 {
        Ok(())
    } else {
        Err(Failure::exit(code))
    }
}

/// Waits for `child`, passing SIGINT, SIGTERM, SIGHUP and SIGQUIT on to it.
async fn wait_forwarding_signals(
    mut child: std::process::Child,
) -> Result<std::process::ExitStatus, Failure> {
    use tokio::signal::unix::{SignalKind, signal};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let waiter = tokio::task::spawn_blocking(move || child.wait());
    tokio::pin!(waiter);
    let kinds = [
        (SignalKind::interrupt(), nix::sys::signal::Signal::SIGINT),
        (SignalKind::terminate(), nix::sys::signal::Signal::SIGTERM),
        (SignalKind::hangup(), nix::sys::signal::Signal::SIGHUP),
        (SignalKind::quit(), nix::sys::signal::Signal::SIGQUIT),
    ];
    let mut streams = Vec::new();
    for (kind, forward) in kinds {
        if let Ok(stream) = signal(kind) {
            streams.push((stream, forward));
        }
    }
    loop {
        let next_signal = futures_signal(&mut streams);
        tokio::select! {
            done = &mut waiter => {
                return done
                    .map_err(|e| Failure::failed(format!("waiting for the command: {e}")))?
                    .map_err(|e| Failure::failed(format!("waiting for the command: {e}")));
            }
            Some(forward) = next_signal => {
                let _ = nix::sys::signal::kill(pid, forward);
            }
        }
    }
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

/// In the gate process (`tessera task __gate -- CMD`): waits for the release, then executes
/// CMD in this process. Returns `None` when this process is not a gate. Runs before anything
/// else of the CLI, so that the gate costs one exec and a read.
pub(super) fn gate_if_asked() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != "task" || args.next()? != GATE_COMMAND {
        return None;
    }
    let command: Vec<OsString> = args.skip_while(|a| a == "--").collect();
    let fd: i32 = match std::env::var(GATE_FD_VAR).ok().and_then(|v| v.parse().ok()) {
        Some(fd) if fd > 2 => fd,
        _ => {
            eprintln!("tessera: task __gate is started by `tessera task run`, not by hand");
            return Some(ExitCode::from(2));
        }
    };
    // SAFETY of ownership: the descriptor was inherited for this purpose and nothing else in
    // this process knows it.
    let gate = owned_fd(fd);
    let mut byte = [0u8; 1];
    let released = std::fs::File::from(gate)
        .read(&mut byte)
        .is_ok_and(|n| n == 1);
    if !released {
        return Some(ExitCode::from(GATE_NOT_RELEASED));
    }
    let Some((program, rest)) = command.split_first() else {
        return Some(ExitCode::from(2));
    };
    let error = std::process::Command::new(program)
        .args(rest)
        .env_remove(GATE_FD_VAR)
        .exec();
    eprintln!("tessera: cannot run {}: {error}", program.to_string_lossy());
    Some(ExitCode::from(COMMAND_NOT_RUN))
}

#[allow(unsafe_code)]
fn owned_fd(fd: i32) -> OwnedFd {
    // SAFETY: `fd` is the gate's pipe, inherited from `task run` and named in GATE_FD_VAR; no
    // other owner exists in this freshly executed process.
    unsafe { OwnedFd::from_raw_fd(fd) }
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
