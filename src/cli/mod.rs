//! The `tessera` command line. Usage errors exit with code 2, failures with 1.
//!
//! Workload and agent verbs: `agent`, `svid`, `jwt`, `task`, `dev`. Operator verbs talk to the
//! server's admin API over its root-only Unix socket (`--admin-socket`, default
//! `/run/tessera-server/admin.sock`, or `TESSERA_ADMIN_SOCKET`): `entry`, `token`, `node` and
//! `bundle`.
//!
//! Operator verbs print text for people (aligned tables for lists, `key: value` blocks for one
//! record) or, with `--output json`, one line of JSON: an object for one record, an array for a
//! list. JSON field names are the API's, in snake_case. Every time `t`, here and in the audit
//! log, appears twice (`events::model::JsonTime`): `t` in RFC 3339 (UTC, with milliseconds) and
//! `t_ms` in Unix milliseconds, both `null` when unset (a time RFC 3339 cannot show keeps its
//! number and has a `null` string). Durations are integers named `*_seconds`, `null` when unset. Absent optional strings (an entry's hint) are
//! `null`; empty lists are `[]` (empty `node_selectors`: every node).
//!
//! Exit codes of operator verbs: 2 for a flag the CLI or the server refuses (InvalidArgument),
//! 1 for everything else: no such record, a record in a state that forbids the change, a
//! concurrent update (run again), an unreachable server.

mod admin;
mod agent;
mod bundle;
pub mod client;
mod dev;
mod entry;
mod events;
mod held;
mod jwt;
mod node;
mod policy;
mod revoke;
mod server;
mod svid;
mod table;
mod task;
mod token;
mod wit;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Workload identity for autonomous software.
#[derive(Parser, Debug)]
#[command(name = "tessera", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `tessera=debug` (overrides TESSERA_LOG).
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Output of commands that print results: text for people, json for scripts. Accepted
    /// anywhere on the command line.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Output format for commands that print results.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Lines for people.
    Text,
    /// JSON for scripts.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run or check the node agent.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Run or check the trust domain's server.
    #[command(subcommand)]
    Server(server::ServerCommand),
    /// Fetch or watch X.509-SVIDs from a Workload API socket.
    #[command(subcommand)]
    Svid(svid::SvidCommand),
    /// Fetch, validate or print the bundle of JWT-SVIDs from a Workload API socket.
    #[command(subcommand)]
    Jwt(jwt::JwtCommand),
    /// Fetch WIT-SVIDs (bound to a key, presented with proof of possession) or their bundle.
    #[command(subcommand)]
    Wit(wit::WitCommand),
    /// Run a server and an agent with throwaway state and an identity for the calling user.
    Dev(dev::DevArgs),
    /// Create, list, show, update or delete registration entries on the server.
    Entry(Box<entry::EntryArgs>),
    /// Create join tokens with which new nodes attest to the server.
    Token(token::TokenArgs),
    /// List, show, evict or ban the nodes attested to the server.
    Node(node::NodeArgs),
    /// Print the trust domain's root certificates from the server.
    Bundle(bundle::BundleArgs),
    /// The audit trail: credential events stored by the server.
    Events(events::EventsArgs),
    /// Per identity: owner, purpose, expiry, live SVIDs, last issuance and use; per node:
    /// last contact and SVIDs held.
    Inventory(events::InventoryArgs),
    /// Task credentials from the agent: run a command as a task, start, end and list tasks.
    Task(task::TaskArgs),
    /// The authorisation policy (Cedar) on the server: set, clear, show, history, test.
    Policy(policy::PolicyArgs),
}

/// A failure with the exit code it deserves.
#[derive(Debug)]
pub struct Failure {
    /// 2 for usage errors, 1 for failures.
    pub code: u8,
    /// What went wrong, for stderr.
    pub message: String,
}

impl Failure {
    /// The user asked for something impossible: exit code 2.
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }

    /// The command could not do its job: exit code 1.
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            code: 1,
            message: message.into(),
        }
    }

    /// Exit with `code` and say nothing: a command run for the user has already said it
    /// (`task run` passes its command's exit status through).
    pub fn exit(code: u8) -> Self {
        Self {
            code,
            message: String::new(),
        }
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.log_level.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tessera: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Agent(command) => agent::run(command).await,
            Command::Server(command) => server::run(command).await,
            Command::Svid(command) => svid::run(command, cli.output).await,
            Command::Jwt(command) => jwt::run(command, cli.output).await,
            Command::Wit(command) => wit::run(command, cli.output).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Entry(args) => entry::run(*args, cli.output).await,
            Command::Token(args) => token::run(args, cli.output).await,
            Command::Node(args) => node::run(args, cli.output).await,
            Command::Bundle(args) => bundle::run(args, cli.output).await,
            Command::Events(args) => events::run(args, cli.output).await,
            Command::Inventory(args) => events::inventory(args, cli.output).await,
            Command::Task(args) => task::run(args, cli.output).await,
            Command::Policy(args) => policy::run(args, cli.output).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if !failure.message.is_empty() {
                eprintln!("tessera: {}", failure.message);
            }
            ExitCode::from(failure.code)
        }
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_env("TESSERA_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // Colour codes only for a person at a terminal: never in a journal, a file or a pipe.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Waits for SIGTERM or SIGINT.
pub(crate) async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::debug!("SIGTERM received"),
        _ = int.recv() => tracing::debug!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn every_command_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn output_is_accepted_anywhere_on_the_line() {
        for argv in [
            &["tessera", "--output", "json", "svid", "fetch"][..],
            &["tessera", "svid", "--output", "json", "fetch"],
            &["tessera", "svid", "fetch", "--output", "json"],
            &["tessera", "--output", "json", "entry", "list"],
            &["tessera", "entry", "--output", "json", "list"],
            &["tessera", "entry", "list", "--output", "json"],
            &["tessera", "events", "list", "--output", "json"],
            &["tessera", "inventory", "--output", "json"],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(cli.output, Output::Json, "{argv:?}");
        }
        let cli = Cli::try_parse_from(["tessera", "node", "list"]).unwrap();
        assert_eq!(cli.output, Output::Text);
    }
}
