//! `tessera bench`: the agent measured against its baselines, with a report.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::Failure;
use crate::bench::{Plan, Scenario, floor_server, probe, run_all};

#[derive(Subcommand, Debug)]
pub(super) enum BenchCommand {
    /// Run every scenario and write report.md, report.json and PNG charts.
    Run(RunArgs),
    /// (internal) One timed FetchX509SVID from a fresh process; prints microseconds.
    #[command(hide = true)]
    Probe(SocketArg),
    /// (internal) A bare tonic server on a Unix socket: the transport floor.
    #[command(hide = true)]
    Floor(SocketArg),
}

#[derive(Args, Debug)]
pub(super) struct RunArgs {
    /// Small numbers: every scenario in seconds (what the test suite runs).
    #[arg(long)]
    quick: bool,
    /// Where to write the report (default: bench/reports/<date>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Run only this scenario (repeat for several; default: all of them).
    #[arg(long, value_name = "NAME")]
    scenario: Vec<Scenario>,
}

#[derive(Args, Debug)]
pub(super) struct SocketArg {
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
}

pub(super) async fn run(command: BenchCommand) -> Result<(), Failure> {
    let failed = |e: crate::bench::BenchError| Failure::failed(e.to_string());
    match command {
        BenchCommand::Probe(SocketArg { socket }) => {
            let elapsed = probe(&socket).await.map_err(failed)?;
            println!("{:.1}", elapsed.as_secs_f64() * 1e6);
            Ok(())
        }
        BenchCommand::Floor(SocketArg { socket }) => floor_server(&socket).await.map_err(failed),
        BenchCommand::Run(args) => {
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
                .map_err(|e| Failure::failed(format!("cannot create a work directory: {e}")))?;
            let selected = if args.scenario.is_empty() {
                Scenario::ALL.to_vec()
            } else {
                args.scenario
            };
            let mut report = run_all(plan, mode, work.path(), &selected)
                .await
                .map_err(failed)?;
            report.write(&out).map_err(failed)?;
            print!("{}", report.markdown());
            println!("\nreport written to {}", out.display());
            Ok(())
        }
    }
}
