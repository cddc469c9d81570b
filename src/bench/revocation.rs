//! Scenario 5, revocation propagation: an entry deleted at the server, to the last of three
//! agents' workload streams dropping it. A real server and three agents in server mode, each
//! with one open FetchX509SVID stream; the clock starts when the admin API's DeleteEntry is
//! sent and stops when the third stream has sent a message without the identity.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::{BenchError, ChildProcess, Plan, ScenarioResult, io_err, percentiles};
use crate::proto::tessera::admin_client::AdminClient;
use crate::proto::tessera::{
    CreateEntryRequest, CreateJoinTokenRequest, Entry, EntryRequest, GetBundleRequest,
};
use crate::proto::workload::X509svidRequest;

const TRUST_DOMAIN: &str = "bench.tessera";
const AGENTS: usize = 3;

fn failed(what: &str) -> impl FnOnce(tonic::Status) -> BenchError + '_ {
    move |s| BenchError::Failed(format!("{what}: {:?} {}", s.code(), s.message()))
}

fn entry(path: &str) -> Entry {
    Entry {
        spiffe_id: format!("spiffe://{TRUST_DOMAIN}{path}"),
        selectors: vec![format!("unix:uid:{}", nix::unistd::geteuid())],
        x509_ttl_seconds: 600,
        owner: "bench".into(),
        purpose: "revocation benchmark".into(),
        ..Default::default()
    }
}

/// Waits on `updates` (one per stream message: agent index, SPIFFE IDs) until every agent's
/// latest message satisfies `done`; returns when the last one did.
async fn until_all(
    updates: &mut mpsc::Receiver<(usize, Instant, Vec<String>)>,
    done: impl Fn(&[String]) -> bool,
) -> Result<Instant, BenchError> {
    let mut finished = [None; AGENTS];
    while finished.iter().any(Option::is_none) {
        let (agent, at, ids) = tokio::time::timeout(Duration::from_secs(10), updates.recv())
            .await
            .map_err(|_| BenchError::Failed("no stream update within 10 s".into()))?
            .ok_or_else(|| BenchError::Failed("a workload stream ended".into()))?;
        finished[agent] = done(&ids).then_some(at);
    }
    Ok(finished
        .into_iter()
        .flatten()
        .max()
        .unwrap_or_else(Instant::now))
}

/// 5. Revocation propagation with three agents.
pub async fn revocation_propagation(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(io_err("finding a free port"))?
        .port();
    let admin_socket = dir.join("admin.sock");
    let server_config = dir.join("server.toml");
    std::fs::write(
        &server_config,
        format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\nbind_address = \"127.0.0.1:{port}\"\nadmin_socket = \"{}\"\nstate_dir = \"{}\"\n",
            admin_socket.display(),
            dir.join("server").display()
        ),
    )
    .map_err(io_err("writing the server configuration"))?;
    let config = server_config.display().to_string();
    let _server = ChildProcess::start(&["server", "run", "--config", &config], &admin_socket)?;
    let channel = crate::cli::client::channel(&admin_socket)
        .await
        .map_err(|f| BenchError::Failed(f.message))?;
    let mut admin = AdminClient::new(channel);
    let bundle = admin
        .get_bundle(GetBundleRequest {})
        .await
        .map_err(failed("reading the bundle"))?
        .into_inner();
    let bundle_path = dir.join("bundle.pem");
    std::fs::write(
        &bundle_path,
        crate::ca::to_pem("CERTIFICATE", &bundle.roots),
    )
    .map_err(io_err("writing the bundle"))?;
    // An identity every workload keeps, so that streams stay open across deletions.
    admin
        .create_entry(CreateEntryRequest {
            entry: Some(entry("/keep")),
        })
        .await
        .map_err(failed("creating the kept entry"))?;

    let mut agents = Vec::new();
    let (tx, mut updates) = mpsc::channel(64);
    for index in 0..AGENTS {
        let token = admin
            .create_join_token(CreateJoinTokenRequest {
                ttl_seconds: 600,
                labels: vec![],
            })
            .await
            .map_err(failed("creating a join token"))?
            .into_inner()
            .token;
        let socket = dir.join(format!("agent-{index}.sock"));
        let agent_config = dir.join(format!("agent-{index}.toml"));
        std::fs::write(
            &agent_config,
            format!(
                "trust_domain = \"{TRUST_DOMAIN}\"\nsocket_path = \"{}\"\nstate_dir = \"{}\"\n\n[server]\naddress = \"127.0.0.1:{port}\"\ntrust_bundle_file = \"{}\"\njoin_token = \"{token}\"\n",
                socket.display(),
                dir.join(format!("agent-{index}")).display(),
                bundle_path.display()
            ),
        )
        .map_err(io_err("writing an agent configuration"))?;
        let config = agent_config.display().to_string();
        agents.push(ChildProcess::start(
            &["agent", "run", "--config", &config],
            &socket,
        )?);
        let mut client = crate::cli::client::connect(&format!("unix://{}", socket.display()))
            .await
            .map_err(|f| BenchError::Failed(f.message))?;
        let mut stream = client
            .fetch_x509svid(X509svidRequest {})
            .await
            .map_err(failed("opening a workload stream"))?
            .into_inner();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let ids = message.svids.iter().map(|s| s.spiffe_id.clone()).collect();
                if tx.send((index, Instant::now(), ids)).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);

    let mut samples = Vec::with_capacity(plan.revocation_rounds);
    for round in 0..plan.revocation_rounds {
        let path = format!("/revoked-{round}");
        let id = format!("spiffe://{TRUST_DOMAIN}{path}");
        let created = admin
            .create_entry(CreateEntryRequest {
                entry: Some(entry(&path)),
            })
            .await
            .map_err(failed("creating an entry"))?
            .into_inner();
        until_all(&mut updates, |ids| ids.contains(&id)).await?;
        let started = Instant::now();
        admin
            .delete_entry(EntryRequest { id: created.id })
            .await
            .map_err(failed("deleting an entry"))?;
        let last = until_all(&mut updates, |ids| !ids.contains(&id)).await?;
        samples.push(last.saturating_duration_since(started));
    }
    let (p50, p99) = percentiles(&mut samples);
    Ok(ScenarioResult {
        name: "revocation_propagation".into(),
        description: format!(
            "An entry deleted through the admin API (in-process client on the admin socket) until the last of {AGENTS} agents' FetchX509SVID streams has sent a message without it; {} rounds, each agent in server mode on its own connection to one server (SQLite).",
            plan.revocation_rounds
        ),
        target: "p99 under 1 s".into(),
        met: p99 < 1_000_000.0,
        figures: vec![
            ("p50 (µs)".into(), p50),
            ("p99 (µs)".into(), p99),
        ],
        note: "The clock starts when DeleteEntry is sent and includes the datastore commit, the snapshot reload, the sync push, the agent's cache update and the workload stream message.".into(),
    })
}
