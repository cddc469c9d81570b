//! `tessera agent run|check`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::Failure;
use crate::agent::endpoint::EndpointError;
use crate::agent::{AgentConfig, AgentError, BuildOptions, build};
use crate::runtime::sdnotify;

#[derive(Subcommand, Debug)]
pub(super) enum AgentCommand {
    /// Serve the Workload API until SIGTERM.
    Run(ConfigArg),
    /// Check a configuration file and exit (0 when valid, 2 when not).
    Check(ConfigArg),
}

/// `--config FILE`, shared by `agent` and `server`.
#[derive(Args, Debug)]
pub(super) struct ConfigArg {
    /// The TOML configuration file.
    #[arg(long, short, value_name = "FILE")]
    pub(super) config: PathBuf,
}

pub(super) async fn run(command: AgentCommand) -> Result<(), Failure> {
    match command {
        AgentCommand::Check(ConfigArg { config }) => {
            let config = AgentConfig::load(&config).map_err(|e| Failure::usage(e.to_string()))?;
            let file = config
                .file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            match &config.server {
                Some(server) => println!(
                    "{file}: valid; trust domain {}, server mode with {}",
                    config.trust_domain, server.address
                ),
                None => println!(
                    "{file}: valid; trust domain {}, standalone with {} entries",
                    config.trust_domain,
                    config.entries.entries.len()
                ),
            }
            Ok(())
        }
        AgentCommand::Run(ConfigArg { config }) => {
            let config = AgentConfig::load(&config).map_err(|e| Failure::usage(e.to_string()))?;
            let handle = build(config, BuildOptions::default())
                .await
                .map_err(|e| match e {
                    // The operator's mistake, not a failure: another process serves the socket.
                    AgentError::Endpoint(EndpointError::InUse { .. }) => {
                        Failure::usage(e.to_string())
                    }
                    e => Failure::failed(e.to_string()),
                })?;
            sdnotify::notify("READY=1");
            // A background task that dies stops the process too, which then exits non-zero
            // with that task's error instead of serving half-alive.
            tokio::select! {
                _ = super::termination() => tracing::info!("stopping: draining open streams"),
                _ = handle.stopping() => {}
            }
            sdnotify::notify("STOPPING=1");
            handle
                .stop()
                .await
                .map_err(|e| Failure::failed(e.to_string()))
        }
    }
}
