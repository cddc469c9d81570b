//! Scenario 5, revocation propagation: an entry deleted at the server, to the last of three
//! agents' workload streams dropping it. A real server and three agents in server mode, each
//! with one open FetchX509SVID stream; the clock starts when the admin API's DeleteEntry is
//! sent and stops when the third stream has sent a message without the identity.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::chart::{Chart, Distribution};
use super::cluster::{Server, TRUST_DOMAIN, failed};
use super::{BenchError, Plan, ScenarioResult};
use tessera::proto::tessera::{CreateEntryRequest, Entry, EntryRequest};
use tessera::proto::workload::X509svidRequest;

const AGENTS: usize = 3;

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
    let mut server = Server::start(dir, "").await?;
    // An identity every workload keeps, so that streams stay open across deletions.
    server
        .admin
        .create_entry(CreateEntryRequest {
            entry: Some(entry("/keep")),
        })
        .await
        .map_err(failed("creating the kept entry"))?;

    let mut agents = Vec::new();
    let (tx, mut updates) = mpsc::channel(64);
    for index in 0..AGENTS {
        let files = server
            .agent_config(dir, &format!("agent-{index}"), "")
            .await?;
        agents.push(files.start()?);
        let socket = files.socket;
        let mut client = tessera::cli::client::connect(&format!("unix://{}", socket.display()))
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
        let created = server
            .admin
            .create_entry(CreateEntryRequest {
                entry: Some(entry(&path)),
            })
            .await
            .map_err(failed("creating an entry"))?
            .into_inner();
        until_all(&mut updates, |ids| ids.contains(&id)).await?;
        let started = Instant::now();
        server
            .admin
            .delete_entry(EntryRequest { id: created.id })
            .await
            .map_err(failed("deleting an entry"))?;
        let last = until_all(&mut updates, |ids| !ids.contains(&id)).await?;
        samples.push(last.saturating_duration_since(started));
    }
    let propagation = Distribution::of("DeleteEntry to the last of 3 streams", &mut samples);
    let (p50, p99) = (propagation.at(0.5), propagation.at(0.99));
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
        seconds: 0.0,
        charts: vec![Chart::Cdf {
            file: "revocation_propagation.png".into(),
            title: format!("Revocation propagation to {AGENTS} agents' workload streams"),
            series: vec![propagation],
        }],
    })
}
