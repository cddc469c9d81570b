//! `tessera-bench`: measures the agent as workloads meet it (the real `tessera` binary, a real
//! socket) and writes a report. Every compared figure is measured side by side with its baseline
//! in the same run and reported as a ratio, because shared machines are noisy.
//!
//! Scenarios: fetch latency against a bare tonic round trip; first fetch by a new process
//! (attestation + mint), executable hash cached and not; mint throughput against a raw
//! rcgen + aws-lc-rs loop and cfssl; concurrent streams at scale with RSS, CPU and late
//! rotations, through the Workload API and through Envoy's SDS; revocation propagation through a server to three agents; an operator's SVID
//! revocation to relying parties on other nodes (CRLs on their Workload API streams); event
//! ingest from an agent's spool to the server's datastore; CRL sizes under the server's
//! distribution rule; a task started for a new process until it holds its task SVID, and
//! `tessera task run` around it; an operator's end of a chain of three delegated tasks to CRLs
//! on two other agents. Charts (PNG) are drawn beside the report.
//!
//! A workspace member of its own, so that the `tessera` binary every node runs carries none of
//! the plotting and PNG crates. The agents and servers measured are `tessera` processes: the
//! binary named by `--tessera` (or `TESSERA_BIN`), by default the `tessera` beside this one (as
//! `cargo build --workspace` leaves them). The transport floor, the first-fetch probes and the
//! task probes are this binary's own hidden `floor`, `probe` and `task-probe` commands.

mod callers;
mod cfssl;
mod chart;
mod cluster;
mod crl_size;
mod fleet;
mod identities;
mod ingest;
mod jwt;
mod plot;
mod policy;
mod relying_party;
mod report;
mod revocation;
mod scenarios;
mod sds;
mod task_ends;
mod tasks;

use report::{Report, ScenarioResult};
use scenarios::{floor_server, probe, run_all};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tessera_harness::Process;

/// Measure tessera against its baselines and write a report.
#[derive(Parser, Debug)]
#[command(name = "tessera-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Run every scenario and write report.md, report.json and PNG charts.
    Run(RunArgs),
    /// (internal) One timed FetchX509SVID from a fresh process; prints microseconds.
    #[command(hide = true)]
    Probe(SocketArg),
    /// (internal) A bare tonic server on a Unix socket: the transport floor.
    #[command(hide = true)]
    Floor(SocketArg),
    /// (internal) FetchX509SVID from a fresh process, optionally after a go byte on standard
    /// input; prints the SPIFFE ID held and CLOCK_MONOTONIC nanoseconds when it was held.
    #[command(hide = true)]
    TaskProbe(TaskProbeArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Small numbers: every scenario in seconds (what the test suite runs).
    #[arg(long)]
    quick: bool,
    /// Where to write the report (default: bench/reports/<date>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Run only this scenario (repeat for several; default: all of them).
    #[arg(long, value_name = "NAME")]
    scenario: Vec<Scenario>,
    /// The `tessera` binary to measure (default: the one beside this binary).
    #[arg(long, value_name = "PATH", env = "TESSERA_BIN")]
    tessera: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct TaskProbeArgs {
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Say it is up (one byte on standard output), then read one byte from standard input,
    /// before asking for its SVID.
    #[arg(long)]
    wait: bool,
    /// Connect before saying it is up rather than after the go.
    #[arg(long)]
    connect_first: bool,
}

#[derive(Args, Debug)]
struct SocketArg {
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tessera-bench: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera-bench: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(command: BenchCommand) -> Result<(), BenchError> {
    match command {
        BenchCommand::Probe(SocketArg { socket }) => {
            let elapsed = probe(&socket).await?;
            println!("{:.1}", elapsed.as_secs_f64() * 1e6);
            Ok(())
        }
        BenchCommand::Floor(SocketArg { socket }) => floor_server(&socket).await,
        BenchCommand::TaskProbe(TaskProbeArgs {
            socket,
            wait,
            connect_first,
        }) => {
            let (spiffe_id, held) = tasks::task_probe(&socket, wait, connect_first).await?;
            println!("{spiffe_id} {held}");
            Ok(())
        }
        BenchCommand::Run(args) => {
            let tessera = match args.tessera {
                Some(path) => path,
                None => std::env::current_exe()
                    .map_err(io_err("locating tessera-bench"))?
                    .with_file_name("tessera"),
            };
            if !tessera.is_file() {
                return Err(BenchError::Failed(format!(
                    "no tessera binary at {}: build it beside tessera-bench (cargo build --workspace) or name it with --tessera or TESSERA_BIN",
                    tessera.display()
                )));
            }
            let _ = TESSERA.set(tessera);
            let (plan, mode) = if args.quick {
                (Plan::QUICK, "quick")
            } else {
                (Plan::FULL, "full")
            };
            let out = args.out.unwrap_or_else(|| {
                let today =
                    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
                PathBuf::from("bench/reports").join(&today[..10])
            });
            let work = tempfile::Builder::new()
                .prefix("tessera-bench-")
                .tempdir()
                .map_err(io_err("creating a work directory"))?;
            let selected = if args.scenario.is_empty() {
                Scenario::ALL.to_vec()
            } else {
                args.scenario
            };
            let mut report = run_all(plan, mode, work.path(), &selected).await?;
            report.write(&out)?;
            print!("{}", report.markdown());
            println!("\nreport written to {}", out.display());
            Ok(())
        }
    }
}

/// The `tessera` binary a run measures, set once by `run` before any scenario starts.
static TESSERA: OnceLock<PathBuf> = OnceLock::new();

/// The `tessera` binary the agents and servers of a run are started from.
fn tessera_binary() -> &'static Path {
    TESSERA
        .get()
        .map(PathBuf::as_path)
        .unwrap_or(Path::new("tessera"))
}

/// The scenarios, by the names the command line and the report use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Scenario {
    /// FetchX509SVID for a minted identity, against a bare tonic round trip.
    FetchLatency,
    /// A new process's first fetch: attestation and mint.
    FirstFetch,
    /// Mints per second against raw signing and cfssl.
    MintThroughput,
    /// Thousands of concurrent streams through a rotation.
    StreamsAtScale,
    /// Up to 100,000 streams of 5,000 callers with two identities each, through a rotation.
    StreamsManyIdentities,
    /// Thousands of concurrent Envoy SDS streams through a rotation.
    SdsStreams,
    /// Entry deletion at the server to three agents' workload streams.
    RevocationPropagation,
    /// An operator's SVID revocation to CRLs on two other agents' workload streams.
    RevocationToRelyingParty,
    /// Events from an agent's spool to the server's datastore.
    EventIngest,
    /// CRL bytes per Workload API message by number of node CAs; a long CRL's sign and parse.
    CrlSize,
    /// StartTask for a process just started until it holds the task's SVID; `tessera task run`.
    TaskStart,
    /// An operator's end of a three-task chain to CRLs on two other agents' workload streams.
    TaskCascade,
    /// Every task end trigger to CRLs on two other agents' workload streams.
    TaskEnds,
    /// What a 100-rule Cedar policy adds to a cached FetchX509SVID; the decision alone.
    PolicyCost,
    /// Cached FetchJWTSVID against cached FetchX509SVID; ValidateJWTSVID; a new audience.
    JwtFetch,
    /// JWT-SVIDs signed by a server: a new audience, and revocation by `jti` to refusal on
    /// another node.
    JwtServer,
    /// One server against thousands of simulated nodes: attestation, sync, entry changes,
    /// event upload, a restart.
    Fleet,
}

impl Scenario {
    /// Every scenario, in the order a run takes them.
    pub const ALL: [Scenario; 17] = [
        Scenario::FetchLatency,
        Scenario::FirstFetch,
        Scenario::MintThroughput,
        Scenario::StreamsAtScale,
        Scenario::StreamsManyIdentities,
        Scenario::SdsStreams,
        Scenario::RevocationPropagation,
        Scenario::RevocationToRelyingParty,
        Scenario::EventIngest,
        Scenario::CrlSize,
        Scenario::TaskStart,
        Scenario::TaskCascade,
        Scenario::TaskEnds,
        Scenario::PolicyCost,
        Scenario::JwtFetch,
        Scenario::JwtServer,
        Scenario::Fleet,
    ];

    /// The name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::FetchLatency => "fetch_latency",
            Scenario::FirstFetch => "first_fetch",
            Scenario::MintThroughput => "mint_throughput",
            Scenario::StreamsAtScale => "streams_at_scale",
            Scenario::StreamsManyIdentities => "streams_many_identities",
            Scenario::SdsStreams => "sds_streams",
            Scenario::RevocationPropagation => "revocation_propagation",
            Scenario::RevocationToRelyingParty => "revocation_to_relying_party",
            Scenario::EventIngest => "event_ingest",
            Scenario::CrlSize => "crl_size",
            Scenario::TaskStart => "task_start",
            Scenario::TaskCascade => "task_cascade",
            Scenario::TaskEnds => "task_ends",
            Scenario::PolicyCost => "policy_cost",
            Scenario::JwtFetch => "jwt_fetch",
            Scenario::JwtServer => "jwt_server",
            Scenario::Fleet => "fleet",
        }
    }
}

/// Sizes of a run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Round trips per latency series.
    pub round_trips: usize,
    /// New processes per first-fetch series.
    pub new_processes: usize,
    /// Mints per throughput series.
    pub mints: usize,
    /// Concurrent stream counts, and the TTL used to force a rotation.
    pub stream_levels: &'static [usize],
    /// SVID lifetime in the streams scenario.
    pub stream_ttl: Duration,
    /// Callers, each a uid and gid of its own, at each step of the many-identities scenario.
    pub identity_levels: &'static [usize],
    /// Streams each caller holds on its connection.
    pub streams_per_caller: usize,
    /// Identities each caller is entitled to (1: by uid; 2: by uid and by gid).
    pub identities_per_caller: usize,
    /// SVID lifetime in the many-identities scenario.
    pub identity_ttl: Duration,
    /// Events uploaded by one agent in the ingest scenario.
    pub ingest_events: usize,
    /// Entries deleted in the revocation scenario.
    pub revocation_rounds: usize,
    /// SVIDs revoked in the relying-party scenario.
    pub relying_party_rounds: usize,
    /// Node CAs whose CRLs are sized.
    pub crl_node_cas: usize,
    /// Serials in the long CRL.
    pub crl_serials: usize,
    /// Times the long CRL is signed and parsed (the median is reported).
    pub crl_repeats: usize,
    /// Tasks started for a waiting probe in the task-start scenario.
    pub task_starts: usize,
    /// `tessera task run` commands timed in the task-start scenario.
    pub task_runs: usize,
    /// Task chains ended in the cascade scenario.
    pub cascade_rounds: usize,
    /// Rounds of every end trigger in the task-ends scenario.
    pub task_end_rounds: usize,
    /// Simulated nodes connected at each step of the fleet scenario (cumulative).
    pub fleet_levels: &'static [usize],
    /// Entries pinned to labels in the fleet scenario.
    pub fleet_entries: usize,
    /// Changes of a label-pinned entry per fleet step.
    pub fleet_changes: usize,
    /// Changes of the entry every node serves per fleet step.
    pub fleet_everyone_changes: usize,
    /// Events each node uploads at the first fleet step.
    pub fleet_events_per_node: usize,
    /// How long the fleet's server is watched idle for its CPU per node.
    pub fleet_idle: Duration,
}

impl Plan {
    /// Seconds, for the test suite: every scenario runs, on small numbers.
    pub const QUICK: Plan = Plan {
        round_trips: 200,
        new_processes: 6,
        mints: 100,
        stream_levels: &[100, 300],
        stream_ttl: Duration::from_secs(4),
        identity_levels: &[50, 100],
        streams_per_caller: 10,
        identities_per_caller: 2,
        identity_ttl: Duration::from_secs(6),
        ingest_events: 2_000,
        revocation_rounds: 5,
        relying_party_rounds: 10,
        crl_node_cas: 100,
        crl_serials: 1_000,
        crl_repeats: 3,
        task_starts: 5,
        task_runs: 3,
        cascade_rounds: 3,
        task_end_rounds: 1,
        fleet_levels: &[100, 200],
        fleet_entries: 2_000,
        fleet_changes: 5,
        fleet_everyone_changes: 2,
        fleet_events_per_node: 20,
        fleet_idle: Duration::from_secs(1),
    };
    /// The full run behind the committed report (a few minutes).
    pub const FULL: Plan = Plan {
        round_trips: 5000,
        new_processes: 60,
        mints: 3000,
        stream_levels: &[1000, 5000, 10000],
        stream_ttl: Duration::from_secs(30),
        identity_levels: &[500, 2_500, 5_000],
        streams_per_caller: 20,
        identities_per_caller: 2,
        identity_ttl: Duration::from_secs(120),
        ingest_events: 100_000,
        revocation_rounds: 200,
        relying_party_rounds: 200,
        crl_node_cas: 1_000,
        crl_serials: 10_000,
        crl_repeats: 7,
        task_starts: 200,
        task_runs: 50,
        cascade_rounds: 50,
        task_end_rounds: 30,
        fleet_levels: &[1_000, 5_000, 10_000],
        fleet_entries: 100_000,
        fleet_changes: 50,
        fleet_everyone_changes: 3,
        fleet_events_per_node: 500,
        fleet_idle: Duration::from_secs(5),
    };
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Starting or talking to a child process failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A child process did not start, or not in time.
    #[error(transparent)]
    Process(#[from] tessera_harness::Error),
    /// A measurement could not be taken.
    #[error("{0}")]
    Failed(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// Starts `tessera <args>` and waits until `socket` accepts connections.
fn start_tessera(args: &[&str], socket: &Path) -> Result<Process, BenchError> {
    start_serving(tessera_binary(), args, socket)
}

/// Starts `tessera <args>` with its output appended to `log`, filtered by `filter` (warnings,
/// plus the info line a caller waits for), and waits until `socket` accepts connections. For
/// processes that bind port 0 and say in their log which port they got.
fn start_tessera_logged(
    args: &[&str],
    socket: &Path,
    log: &Path,
    filter: &str,
) -> Result<Process, BenchError> {
    let program = tessera_binary();
    let mut command = tessera_harness::command(program);
    command.args(args).env("TESSERA_LOG", filter);
    let name = format!("{} {}", program.display(), args.join(" "));
    let mut process = Process::spawn_logged(&mut command, name, log)?;
    process.wait_for_socket(socket, Duration::from_secs(30))?;
    Ok(process)
}

/// Waits until `process` logs `marker` followed by a socket address: the address it bound.
fn logged_address(process: &mut Process, marker: &str) -> Result<SocketAddr, BenchError> {
    let word = process.wait_for_logged(marker, Duration::from_secs(30))?;
    word.parse().map_err(|e| {
        BenchError::Failed(format!(
            "{marker}{word:?} in the log does not end in an address: {e}"
        ))
    })
}

/// Starts this binary with `args` (the floor server) and waits until `socket` accepts
/// connections.
fn start_own(args: &[&str], socket: &Path) -> Result<Process, BenchError> {
    let exe = std::env::current_exe().map_err(io_err("locating tessera-bench"))?;
    start_serving(&exe, args, socket)
}

/// Starts `program <args>` (killed if the harness dies, its output discarded and its errors
/// passed through) and waits until `socket` accepts connections.
fn start_serving(program: &Path, args: &[&str], socket: &Path) -> Result<Process, BenchError> {
    let mut command = tessera_harness::command(program);
    command
        .args(args)
        .env("TESSERA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let name = format!("{} {}", program.display(), args.join(" "));
    let mut process = Process::spawn(&mut command, name)?;
    process.wait_for_socket(socket, Duration::from_secs(30))?;
    Ok(process)
}

#[cfg(test)]
mod tests {
    use super::Scenario;
    use clap::ValueEnum;

    #[test]
    fn command_line_names_are_the_report_names_in_run_order() {
        let from_clap: Vec<String> = Scenario::value_variants()
            .iter()
            .filter_map(|s| s.to_possible_value())
            .map(|v| v.get_name().to_owned())
            .collect();
        let ours: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(from_clap, ours);
    }
}
