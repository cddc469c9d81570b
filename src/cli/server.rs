//! `tessera server run|check`.

use clap::Subcommand;

use super::Failure;
use super::agent::ConfigArg;
use crate::runtime::sdnotify;
use crate::runtime::socket::BindError;
use crate::server::{ServerConfig, ServerError, build};

#[derive(Subcommand, Debug)]
pub(super) enum ServerCommand {
    /// Serve the node and admin APIs until SIGTERM.
    Run(ConfigArg),
    /// Check a configuration file and exit (0 when valid, 2 when not).
    Check(ConfigArg),
}

pub(super) async fn run(command: ServerCommand) -> Result<(), Failure> {
    match command {
        ServerCommand::Check(ConfigArg { config: path }) => {
            let config = ServerConfig::load(&path).map_err(|e| Failure::usage(e.to_string()))?;
            println!(
                "{}: valid; trust domain {}, node API on {}, admin socket {}",
                path.display(),
                config.trust_domain,
                config.bind_address,
                config.admin_socket.display()
            );
            Ok(())
        }
        ServerCommand::Run(ConfigArg { config }) => {
            let config = ServerConfig::load(&config).map_err(|e| Failure::usage(e.to_string()))?;
            let handle = build(config).await.map_err(|e| match e {
                // Another server answers on the admin socket: the operator's mistake.
                ServerError::Admin(BindError::InUse { .. }) => Failure::usage(e.to_string()),
                e => Failure::failed(e.to_string()),
            })?;
            sdnotify::notify("READY=1");
            // A background task that dies stops the process too, which then exits non-zero
            // with that task's error instead of serving half-alive.
            tokio::select! {
                _ = super::termination() => tracing::info!("stopping"),
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
