//! Scenario 6, revocation to relying parties: an operator revokes one SVID that a node issued,
//! and relying parties on two other nodes learn of it. A real server and three agents in server
//! mode; a workload on agent 0 holds the SVID, and a FetchX509SVID stream on each of agents 1
//! and 2 stands for a relying party there. The clock starts when the admin API's RevokeSvid
//! returns (when `tessera svid revoke` would exit) and stops when a stream's message carries a
//! CRL listing the serial: the node's agent signs it, publishes it to the server, and the
//! server passes it on to every agent.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::chart::{Chart, Distribution};
use super::cluster::{Server, TRUST_DOMAIN, failed};
use super::{BenchError, Plan, ScenarioResult};
use tessera::ca::crl::parse_crl;
use tessera::proto::tessera::{CreateEntryRequest, Entry, RevokeSvidRequest};
use tessera::proto::workload::X509svidRequest;

const AGENTS: usize = 3;
/// The longest any one step may take before the scenario gives up.
const STEP: Duration = Duration::from_secs(10);

/// One stream message, as it arrived.
struct Update {
    agent: usize,
    at: Instant,
    /// The serial of the first SVID, lowercase hex; none in a message with only CRLs.
    serial: Option<String>,
    crls: Vec<Vec<u8>>,
}

fn leaf_serial(chain: &[u8]) -> Option<String> {
    let (_, leaf) = X509Certificate::from_der(chain).ok()?;
    Some(hex::encode(leaf.raw_serial()))
}

fn lists(crls: &[Vec<u8>], serial: &str) -> bool {
    crls.iter()
        .filter_map(|der| parse_crl(der).ok())
        .any(|info| info.find(serial).is_some())
}

async fn next(updates: &mut mpsc::UnboundedReceiver<Update>) -> Result<Update, BenchError> {
    tokio::time::timeout(STEP, updates.recv())
        .await
        .map_err(|_| BenchError::Failed(format!("no stream message within {STEP:?}")))?
        .ok_or_else(|| BenchError::Failed("a workload stream ended".into()))
}

/// 6. Operator revocation to relying parties on two other nodes.
pub async fn revocation_to_relying_party(
    plan: Plan,
    dir: &Path,
) -> Result<ScenarioResult, BenchError> {
    let mut server = Server::start(dir, "").await?;
    server
        .admin
        .create_entry(CreateEntryRequest {
            entry: Some(Entry {
                spiffe_id: format!("spiffe://{TRUST_DOMAIN}/svc"),
                selectors: vec![format!("unix:uid:{}", nix::unistd::geteuid())],
                x509_ttl_seconds: 600,
                owner: "bench".into(),
                purpose: "revocation to relying party benchmark".into(),
                ..Default::default()
            }),
        })
        .await
        .map_err(failed("creating the entry"))?;

    let mut agents = Vec::new();
    // Unbounded, so that a reader is never held back and every arrival time is when it arrived.
    let (tx, mut updates) = mpsc::unbounded_channel();
    for index in 0..AGENTS {
        let files = server
            .agent_config(dir, &format!("agent-{index}"), "")
            .await?;
        agents.push(files.start()?);
        let mut client =
            tessera::cli::client::connect(&format!("unix://{}", files.socket.display()))
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
                let at = Instant::now();
                let serial = message
                    .svids
                    .first()
                    .and_then(|svid| leaf_serial(&svid.x509_svid));
                let update = Update {
                    agent: index,
                    at,
                    serial,
                    crls: message.crl,
                };
                if tx.send(update).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);

    let mut revoked: HashSet<String> = HashSet::new();
    let mut held: Option<String> = None;
    let (mut last, mut per_agent) = (Vec::new(), [Vec::new(), Vec::new()]);
    for _ in 0..plan.relying_party_rounds {
        // The workload's current SVID: the fresh one it got after the last revocation.
        let deadline = Instant::now() + STEP;
        let serial = loop {
            if let Some(serial) = held.as_ref().filter(|s| !revoked.contains(*s)) {
                break serial.clone();
            }
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!(
                    "agent 0 sent no fresh SVID within {STEP:?}"
                )));
            }
            let update = next(&mut updates).await?;
            if update.agent == 0 && update.serial.is_some() {
                held = update.serial;
            }
        };

        // The server knows the serial once agent 0's issuance event has arrived; until then
        // RevokeSvid says NotFound. That wait is not what is measured.
        let deadline = Instant::now() + STEP;
        let started = loop {
            let call = server
                .admin
                .revoke_svid(RevokeSvidRequest {
                    serial: serial.clone(),
                    reason: "benchmark".into(),
                })
                .await;
            match call {
                Ok(response) => {
                    let started = Instant::now();
                    let response = response.into_inner();
                    if !response.revoked.iter().any(|r| r.serial == serial) {
                        return Err(BenchError::Failed(format!(
                            "RevokeSvid did not revoke {serial}: {response:?}"
                        )));
                    }
                    break started;
                }
                Err(status)
                    if status.code() == tonic::Code::NotFound && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(status) => return Err(failed("revoking the SVID")(status)),
            }
        };
        revoked.insert(serial.clone());

        let mut seen: [Option<Instant>; 2] = [None, None];
        while seen.iter().any(Option::is_none) {
            let update = next(&mut updates).await?;
            match update.agent {
                0 => {
                    if update.serial.is_some() {
                        held = update.serial;
                    }
                }
                agent => {
                    let slot = &mut seen[agent - 1];
                    if slot.is_none() && lists(&update.crls, &serial) {
                        *slot = Some(update.at);
                    }
                }
            }
        }
        for (samples, at) in per_agent.iter_mut().zip(seen.into_iter().flatten()) {
            samples.push(at.saturating_duration_since(started));
        }
        last.push(
            seen.into_iter()
                .flatten()
                .max()
                .unwrap_or(started)
                .saturating_duration_since(started),
        );
    }

    let last = Distribution::of("last of agents 1 and 2", &mut last);
    let [mut first, mut second] = per_agent;
    let agent_1 = Distribution::of("agent 1", &mut first);
    let agent_2 = Distribution::of("agent 2", &mut second);
    let (p50, p99, max) = (last.at(0.5), last.at(0.99), last.at(1.0));
    Ok(ScenarioResult {
        name: "revocation_to_relying_party".into(),
        description: format!(
            "An SVID a workload holds on agent 0 revoked through the admin API's RevokeSvid (in-process client on the admin socket) until FetchX509SVID streams on agents 1 and 2 have each sent a message whose CRLs list its serial; {} rounds, a fresh SVID each, three agents in server mode on one server (SQLite).",
            plan.relying_party_rounds
        ),
        target: "p99 under 1 s".into(),
        met: p99 < 1_000_000.0,
        figures: vec![
            ("p50 (µs)".into(), p50),
            ("p99 (µs)".into(), p99),
            ("max (µs)".into(), max),
            ("agent 1 p50 (µs)".into(), agent_1.at(0.5)),
            ("agent 1 p99 (µs)".into(), agent_1.at(0.99)),
            ("agent 2 p50 (µs)".into(), agent_2.at(0.5)),
            ("agent 2 p99 (µs)".into(), agent_2.at(0.99)),
        ],
        note: "The clock starts when RevokeSvid returns, after the revocation is stored; the wait for the SVID's issuance to reach the server's inventory is not counted. It includes the revocation order's sync push to agent 0, its CRL signing and PublishCrls call, the server's check and store, the sync push of the CRL set to agents 1 and 2, and their workload stream messages. Agent 0's CRL grows by one entry a round.".into(),
        seconds: 0.0,
        charts: vec![Chart::Cdf {
            file: "revocation_to_relying_party.png".into(),
            title: "RevokeSvid to CRLs on two other agents' workload streams".into(),
            series: vec![last, agent_1, agent_2],
        }],
    })
}
