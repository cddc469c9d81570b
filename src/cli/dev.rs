//! `tessera dev`: an agent with throwaway state and an identity for the calling user, so a
//! newcomer sees the whole flow with one command.

use std::path::PathBuf;

use clap::Args;

use super::Failure;
use crate::agent::{AgentConfig, BuildOptions, build};

/// The trust domain `tessera dev` serves.
pub const DEV_TRUST_DOMAIN: &str = "tessera.dev";

#[derive(Args, Debug)]
pub(super) struct DevArgs {
    /// Lifetime of each X.509-SVID; short, so rotations are easy to watch.
    #[arg(long, default_value = "1m", value_name = "DURATION")]
    ttl: String,
    /// Directory for the socket, config and state (default: a fresh temporary directory,
    /// removed on exit).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub(super) async fn run(args: DevArgs) -> Result<(), Failure> {
    let uid = nix::unistd::geteuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{uid}"));
    let user_segment: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();

    let temp;
    let dir = match args.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Failure::failed(format!("cannot create {}: {e}", dir.display())))?;
            std::path::absolute(&dir)
                .map_err(|e| Failure::failed(format!("cannot resolve {}: {e}", dir.display())))?
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("tessera-dev-")
                .tempdir()
                .map_err(|e| {
                    Failure::failed(format!("cannot create a temporary directory: {e}"))
                })?;
            temp.path().to_path_buf()
        }
    };
    // Workloads of other users must be able to reach the socket.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));

    let socket = dir.join("agent.sock");
    let config_path = dir.join("agent.toml");
    let config_text = format!(
        r#"# Written by `tessera dev`. Edit the entries: the agent reloads them on save.
trust_domain = "{DEV_TRUST_DOMAIN}"
socket_path = "{socket}"
state_dir = "{state}"

[[entry]]
spiffe_id = "spiffe://{DEV_TRUST_DOMAIN}/user/{user_segment}"
selectors = ["unix:uid:{uid}"]
x509_ttl = "{ttl}"
owner = "{user}"
purpose = "tessera dev: identity of the user who started it"
"#,
        socket = socket.display(),
        state = dir.join("state").display(),
        ttl = args.ttl,
    );
    std::fs::write(&config_path, config_text)
        .map_err(|e| Failure::failed(format!("cannot write {}: {e}", config_path.display())))?;
    let config = AgentConfig::load(&config_path).map_err(|e| Failure::usage(e.to_string()))?;

    let handle = build(config, BuildOptions::default())
        .await
        .map_err(|e| Failure::failed(e.to_string()))?;
    println!("tessera dev: Workload API for trust domain {DEV_TRUST_DOMAIN} is up.");
    println!();
    println!("  socket:  {}", handle.socket_uri());
    println!(
        "  config:  {} (edit to add entries; reloaded on save)",
        config_path.display()
    );
    println!("  identity for uid {uid} ({user}): spiffe://{DEV_TRUST_DOMAIN}/user/{user_segment}");
    println!();
    println!("In another terminal:");
    println!("  export SPIFFE_ENDPOINT_SOCKET={}", handle.socket_uri());
    println!("  cargo run -q -- svid fetch --out /tmp/svid     # or: tessera svid fetch");
    println!("  cargo run -q -- svid watch                     # see rotations at half-life");
    println!();
    println!("Ctrl-C stops the agent and removes its state.");
    super::termination().await;
    handle
        .stop()
        .await
        .map_err(|e| Failure::failed(e.to_string()))
}
