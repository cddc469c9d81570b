//! `tessera dev`: a server and an agent in one process, with throwaway state and an identity
//! for the calling user, so a newcomer sees the whole flow with one command.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::Failure;
use crate::agent::{AgentConfig, BuildOptions, build};
use crate::entry::{MAX_X509_TTL, MIN_X509_TTL};
use crate::proto::tessera::admin_client::AdminClient;
use crate::proto::tessera::{
    CreateEntryRequest, CreateJoinTokenRequest, Entry, GetBundleRequest, ListEntriesRequest,
    UpdateEntryRequest,
};
use crate::server::ServerConfig;

/// The trust domain `tessera dev` serves.
pub const DEV_TRUST_DOMAIN: &str = "tessera.dev";

#[derive(Args, Debug)]
pub(super) struct DevArgs {
    /// Lifetime of each X.509-SVID of your identity: long enough that the files `svid fetch`
    /// writes are still valid while you try them; `svid watch` shows a rotation at about half
    /// of it.
    #[arg(long, default_value = "30m", value_name = "DURATION")]
    ttl: String,
    /// Directory for the sockets, configuration and state, kept on exit so that a later
    /// `tessera dev --dir DIR` resumes with the same root, entries and audit trail (default: a
    /// fresh temporary directory, removed on exit).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub(super) async fn run(args: DevArgs) -> Result<(), Failure> {
    let ttl = crate::config::parse_duration(&args.ttl)
        .map_err(|e| Failure::usage(format!("--ttl {:?}: {e}", args.ttl)))?;
    if !(MIN_X509_TTL..=MAX_X509_TTL).contains(&ttl) || ttl.subsec_nanos() != 0 {
        return Err(Failure::usage(format!(
            "--ttl {:?}: must be whole seconds from {} to {}, e.g. 30m",
            args.ttl,
            humantime::format_duration(MIN_X509_TTL),
            humantime::format_duration(MAX_X509_TTL),
        )));
    }
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

    let kept = args.dir.is_some();
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
            "trust_domain = \"{DEV_TRUST_DOMAIN}\"\nbind_address = \"127.0.0.1:0\"\nadmin_socket = \"{admin}\"\nstate_dir = \"{state}\"\nmax_x509_ttl = \"{max_ttl}s\"\n",
            admin = dir.join("admin.sock").display(),
            state = dir.join("server").display(),
            // The server's ceiling must admit the identity asked for (1h is its default).
            max_ttl = ttl.max(Duration::from_secs(3600)).as_secs(),
        ),
    )
    .map_err(|e| Failure::failed(e.to_string()))?;
    let server = crate::server::build(server_config)
        .await
        .map_err(|e| Failure::failed(format!("server: {e}")))?;

    let mut admin = AdminClient::new(super::client::channel(&server.admin_socket).await?);
    let spiffe_id = format!("spiffe://{DEV_TRUST_DOMAIN}/user/{user_segment}");
    let entry = Entry {
        spiffe_id: spiffe_id.clone(),
        selectors: vec![format!("unix:uid:{uid}")],
        x509_ttl_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        owner: user.clone(),
        purpose: "tessera dev: identity of the user who started it".into(),
        ..Default::default()
    };
    let created = ensure_entry(&mut admin, entry, &server.admin_socket).await?;
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

# WIT-SVIDs (an Incubating SPIFFE profile) are served in dev mode.
[wit]
enabled = true

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
    // One write, whose failure is ignored: a reader that goes away (a closed pipe, a closed
    // terminal) must not take the server and agent down with it.
    let mut banner = format!(
        "tessera dev: server and agent for trust domain {DEV_TRUST_DOMAIN} are up.\n\n  Workload API:  {}\n  admin socket:  {admin_socket}\n  node API:      {} (agent joined with a one-time token)\n  identity for uid {uid} ({user}): {spiffe_id} (entry {})\n\nIn another terminal:\n{}\n",
        handle.socket_uri(),
        server.node_address,
        created.id,
        next_steps(&handle.socket_uri(), &admin_socket, uid.as_raw())
    );
    if kept {
        banner.push_str(&format!(
            "Ctrl-C stops both. {} keeps the server's root, entries and audit trail (server/) \
             and the agent's node credentials and spool (agent/); `tessera dev --dir {}` again \
             resumes with them.\n",
            dir.display(),
            dir.display()
        ));
    } else {
        banner.push_str("Ctrl-C stops both and removes their state.\n");
    }
    let mut stdout = std::io::stdout();
    let _ = stdout
        .write_all(banner.as_bytes())
        .and_then(|()| stdout.flush());
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

/// Registers the calling user's identity, or on a resumed `--dir`, finds the one registered by
/// an earlier run (same SPIFFE ID and selectors) and brings its TTL up to date.
async fn ensure_entry(
    admin: &mut AdminClient<tonic::transport::Channel>,
    entry: Entry,
    socket: &Path,
) -> Result<Entry, Failure> {
    let failure = |status: tonic::Status| super::client::admin_status_failure(status, socket);
    match admin
        .create_entry(CreateEntryRequest {
            entry: Some(entry.clone()),
        })
        .await
    {
        Ok(created) => return Ok(created.into_inner()),
        Err(status) if status.code() == tonic::Code::AlreadyExists => {}
        Err(status) => return Err(failure(status)),
    }
    let existing = admin
        .list_entries(ListEntriesRequest {
            spiffe_id: entry.spiffe_id.clone(),
            owner: String::new(),
        })
        .await
        .map_err(failure)?
        .into_inner()
        .entries
        .into_iter()
        .find(|e| e.selectors == entry.selectors)
        .ok_or_else(|| {
            Failure::failed(format!(
                "{} is registered, but not for {}; remove the directory or the entry",
                entry.spiffe_id,
                entry.selectors.join(", ")
            ))
        })?;
    if existing.x509_ttl_seconds == entry.x509_ttl_seconds {
        return Ok(existing);
    }
    let updated = Entry {
        x509_ttl_seconds: entry.x509_ttl_seconds,
        ..existing
    };
    admin
        .update_entry(UpdateEntryRequest {
            entry: Some(updated),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(failure)
}

/// What to try next; the README's quick start lists the same commands in the same order.
fn next_steps(workload_socket: &str, admin_socket: &str, uid: u32) -> String {
    format!(
        "  export SPIFFE_ENDPOINT_SOCKET={workload_socket}
  export TESSERA_ADMIN_SOCKET={admin_socket}
  cargo run -q -- svid fetch --out /tmp/svid      # your identity as PEM files, and how long it lives
  openssl verify -CAfile /tmp/svid/bundle.pem -untrusted /tmp/svid/svid.pem /tmp/svid/svid.pem
  cargo run -q -- entry list                      # the registered identities
  cargo run -q -- svid watch                      # every rotation and change, until Ctrl-C
  cargo run -q -- jwt fetch --audience api.example.com   # a JWT-SVID, signed by the server
  cargo run -q -- --output json wit fetch         # a WIT-SVID and the key it is bound to
  cargo run -q -- entry create --spiffe-id spiffe://{DEV_TRUST_DOMAIN}/tool --selector unix:uid:{uid} \\
      --all-nodes --owner you --purpose trying-it --x509-ttl 1m   # seen by `svid watch` at once
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The banner and the README's quick start must not drift apart.
    #[test]
    fn readme_lists_the_banners_next_steps() {
        let readme = include_str!("../../README.md");
        let steps = next_steps(
            "unix:///tmp/tessera-dev-XXXX/agent.sock",
            "/tmp/tessera-dev-XXXX/admin.sock",
            0,
        )
        .replace("unix:uid:0", "unix:uid:$(id -u)");
        let steps: Vec<&str> = steps.lines().map(str::trim).collect();
        let readme_lines: Vec<&str> = readme.lines().map(str::trim).collect();
        let start = readme_lines
            .iter()
            .position(|l| *l == steps[0])
            .expect("README quotes the banner's first step");
        assert_eq!(
            readme_lines[start..start + steps.len()],
            steps[..],
            "README and banner list different next steps"
        );
    }
}
