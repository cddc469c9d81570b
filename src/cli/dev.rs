//! `tessera dev`: a server and an agent in one process, with throwaway state and an identity
//! for the calling user, so a newcomer sees the whole flow with one command.

use std::path::PathBuf;

use clap::Args;

use super::Failure;
use crate::agent::{AgentConfig, BuildOptions, build};
use crate::proto::tessera::admin_client::AdminClient;
use crate::proto::tessera::{CreateEntryRequest, CreateJoinTokenRequest, Entry, GetBundleRequest};
use crate::server::ServerConfig;

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

    let server_config = ServerConfig::parse(
        "tessera dev",
        &format!(
            "trust_domain = \"{DEV_TRUST_DOMAIN}\"\nbind_address = \"127.0.0.1:0\"\nadmin_socket = \"{admin}\"\nstate_dir = \"{state}\"\n",
            admin = dir.join("admin.sock").display(),
            state = dir.join("server").display(),
        ),
    )
    .map_err(|e| Failure::failed(e.to_string()))?;
    let server = crate::server::build(server_config)
        .await
        .map_err(|e| Failure::failed(format!("server: {e}")))?;

    let ttl = crate::config::parse_duration(&args.ttl)
        .map_err(|e| Failure::usage(format!("--ttl {:?}: {e}", args.ttl)))?;
    let mut admin = AdminClient::new(super::client::channel(&server.admin_socket).await?);
    let spiffe_id = format!("spiffe://{DEV_TRUST_DOMAIN}/user/{user_segment}");
    let entry = Entry {
        spiffe_id: spiffe_id.clone(),
        selectors: vec![format!("unix:uid:{uid}")],
        x509_ttl_seconds: ttl.as_secs() as i64,
        owner: user.clone(),
        purpose: "tessera dev: identity of the user who started it".into(),
        ..Default::default()
    };
    let created = admin
        .create_entry(CreateEntryRequest { entry: Some(entry) })
        .await
        .map_err(|status| Failure::usage(format!("--ttl {:?}: {}", args.ttl, status.message())))?
        .into_inner();
    let token = admin
        .create_join_token(CreateJoinTokenRequest {
            ttl_seconds: 600,
            labels: vec!["dev".into()],
        })
        .await
        .map_err(|status| super::client::admin_status_failure(status, &server.admin_socket))?
        .into_inner()
        .token;
    let bundle = admin
        .get_bundle(GetBundleRequest {})
        .await
        .map_err(|status| super::client::admin_status_failure(status, &server.admin_socket))?
        .into_inner();
    let bundle_path = dir.join("bundle.pem");
    std::fs::write(
        &bundle_path,
        crate::ca::to_pem("CERTIFICATE", &bundle.roots),
    )
    .map_err(|e| Failure::failed(format!("cannot write {}: {e}", bundle_path.display())))?;

    let socket = dir.join("agent.sock");
    let config_path = dir.join("agent.toml");
    let config_text = format!(
        r#"# Written by `tessera dev`: an agent in server mode, joined with a one-time token.
trust_domain = "{DEV_TRUST_DOMAIN}"
socket_path = "{socket}"
state_dir = "{state}"

[server]
address = "{address}"
trust_bundle_file = "{bundle}"
join_token = "{token}"
"#,
        socket = socket.display(),
        state = dir.join("agent").display(),
        address = server.node_address,
        bundle = bundle_path.display(),
    );
    std::fs::write(&config_path, config_text)
        .map_err(|e| Failure::failed(format!("cannot write {}: {e}", config_path.display())))?;
    let config = AgentConfig::load(&config_path).map_err(|e| Failure::usage(e.to_string()))?;

    let handle = build(config, BuildOptions::default())
        .await
        .map_err(|e| Failure::failed(format!("agent: {e}")))?;
    let admin_socket = server.admin_socket.display().to_string();
    println!("tessera dev: server and agent for trust domain {DEV_TRUST_DOMAIN} are up.");
    println!();
    println!("  Workload API:  {}", handle.socket_uri());
    println!("  admin socket:  {admin_socket}");
    println!(
        "  node API:      {} (agent joined with a one-time token)",
        server.node_address
    );
    println!(
        "  identity for uid {uid} ({user}): {spiffe_id} (entry {})",
        created.id
    );
    println!();
    println!("In another terminal:");
    println!("  export SPIFFE_ENDPOINT_SOCKET={}", handle.socket_uri());
    println!("  export TESSERA_ADMIN_SOCKET={admin_socket}");
    println!("  cargo run -q -- svid fetch --out /tmp/svid     # or: tessera svid fetch");
    println!("  cargo run -q -- svid watch                     # rotations, entry changes");
    println!("  cargo run -q -- entry list                     # the inventory");
    println!();
    println!("Ctrl-C stops both and removes their state.");
    super::termination().await;
    let agent = handle
        .stop()
        .await
        .map_err(|e| Failure::failed(e.to_string()));
    let server = server
        .stop()
        .await
        .map_err(|e| Failure::failed(e.to_string()));
    agent.and(server)
}
