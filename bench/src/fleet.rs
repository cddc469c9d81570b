//! Scenario `fleet`: one server against thousands of simulated nodes.
//!
//! Each simulated node does upstream what an agent does, without a Workload API: it attests
//! with its own join token and real CSRs (a fresh TLS connection), connects with the node SVID
//! it was granted, keeps a sync stream open (reconnecting with the agent's jittered backoff
//! and asking to catch up from the revision it holds), and uploads events. The nodes join in
//! steps (the plan's levels); at each step the run measures the attestation rate, the time
//! until every new node holds its full entry set, the server's memory and CPU per connected
//! node, one entry's change to every node entitled to it (an entry pinned to a label some
//! nodes share, and one every node serves), and a server restart (SIGKILL, then start) until
//! every node is synced again. At the first step every node uploads events at once.
//!
//! Entries are pinned to labels: `entries / ENTRIES_PER_NODE` groups of `ENTRIES_PER_NODE`
//! entries each, node `i` joining with label `g<i mod groups>`; so each node may serve
//! `ENTRIES_PER_NODE` entries plus one every node serves, whatever the number of nodes.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, watch};
use tonic::transport::Channel;

use super::chart::{Chart, Distribution};
use super::cluster::{Server, TRUST_DOMAIN, failed};
use super::{BenchError, Plan, ScenarioResult};
use tessera::events::model::{new_event_id, now_ms};
use tessera::proto::tessera::GetBundleRequest;
use tessera::proto::tessera::node_client::NodeClient;
use tessera::proto::tessera::{
    AttestRequest, CreateEntryRequest, CreateJoinTokenRequest, Csrs, Entry, EntryRequest, Event,
    EventBatch, EventKind, JoinTokenAttestation, SyncRequest, UpdateEntryRequest, attest_request,
    attest_response,
};

/// Entries each node may serve, besides the one every node serves.
const ENTRIES_PER_NODE: usize = 50;
/// Attestations in flight at once.
const ATTESTING_AT_ONCE: usize = 64;
/// Entries created at once through the admin API.
const CREATING_AT_ONCE: usize = 16;
/// The p99 target of one entry change reaching every entitled node, at the largest step.
const CHANGE_TARGET: Duration = Duration::from_secs(1);
/// The target of a restart until every node is synced again.
const RESTART_TARGET: Duration = Duration::from_secs(30);
/// Events per batch in the upload.
const EVENTS_PER_BATCH: usize = 500;
/// The agent's reconnect backoff: first pause ceiling and longest.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long any phase may take before the run gives up.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

/// What a simulated node's stream saw.
#[derive(Debug)]
struct Seen {
    node: usize,
    at: Instant,
    /// The first message of its stream.
    first: bool,
    full: bool,
    /// Entries the node holds after the message.
    holds: usize,
    /// Entries the message upserted.
    upserted: Vec<String>,
}

/// A stream that ended for good (refused): the node would have to attest again.
#[derive(Debug)]
struct Refused {
    node: usize,
    status: tonic::Status,
}

enum Report {
    Seen(Seen),
    Refused(Refused),
}

/// A node as the run knows it.
struct SimNode {
    /// Its TLS channel with its node SVID.
    channel: Channel,
    node_id: String,
    group: usize,
}

fn group_label(group: usize) -> String {
    format!("g{group}")
}

fn entry_path(index: usize) -> String {
    format!("/fleet/e{index}")
}

/// The loopback address node `index` connects from: nodes are machines of their own, and the
/// server bounds handshakes per source address.
fn source_address(index: usize) -> std::net::Ipv4Addr {
    let index = index as u32;
    std::net::Ipv4Addr::new(
        127,
        1 + (index / 62_500) as u8,
        (index / 250 % 250) as u8,
        (index % 250 + 1) as u8,
    )
}

/// A TLS channel to the node API on `port` from `source`, connecting when first used and
/// again after a failure.
fn node_channel(
    port: u16,
    source: std::net::Ipv4Addr,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
) -> Result<Channel, BenchError> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .map_err(|e| BenchError::Failed(format!("node API endpoint: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let connector = tokio_rustls::TlsConnector::from(tls);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(std::net::SocketAddr::new(source.into(), 0))?;
                let tcp = socket
                    .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                    .await?;
                tcp.set_nodelay(true)?;
                // Only SNI: the verifier checks the server's SPIFFE ID.
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from("tessera-server")
                    .map_err(std::io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })),
    )
}

/// A jittered pause between half of `ceiling` and `ceiling`.
fn jittered(ceiling: Duration) -> Duration {
    let mut byte = [0u8; 2];
    let _ = aws_lc_rs::rand::fill(&mut byte);
    let unit = f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX);
    ceiling / 2 + (ceiling / 2).mul_f64(unit)
}

/// Attests node `index` with a join token for its group's label; its TLS channel.
async fn attest(
    port: u16,
    mut admin: tessera::proto::tessera::admin_client::AdminClient<Channel>,
    roots: &[Vec<u8>],
    index: usize,
    groups: usize,
) -> Result<SimNode, BenchError> {
    let group = index % groups;
    let token = admin
        .create_join_token(CreateJoinTokenRequest {
            ttl_seconds: 600,
            labels: vec![group_label(group)],
        })
        .await
        .map_err(failed("creating a join token"))?
        .into_inner()
        .token;
    let td = tessera::spiffe::TrustDomain::new(TRUST_DOMAIN)
        .map_err(|e| BenchError::Failed(format!("trust domain: {e}")))?;
    let server_id = tessera::ca::node::server_spiffe_id(&td);
    let source = source_address(index);
    let csr = |what: &str| {
        tessera::ca::node::key_and_csr()
            .map_err(|e| BenchError::Failed(format!("making the {what} CSR: {e}")))
    };
    let (svid_key, svid_csr) = csr("node SVID")?;
    let (_ca_key, ca_csr) = csr("node CA")?;
    let tls = tessera::tls::client_config(roots, &server_id, None)
        .map_err(|e| BenchError::Failed(format!("client TLS: {e}")))?;
    let request = AttestRequest {
        step: Some(attest_request::Step::JoinToken(JoinTokenAttestation {
            token,
        })),
        csrs: Some(Csrs {
            node_svid: svid_csr,
            ca: ca_csr,
        }),
    };
    // As an agent does: a failure to reach the server is tried again after a pause.
    let mut ceiling = BACKOFF_MIN;
    let mut attempts = 0;
    let mut responses = loop {
        let channel = node_channel(port, source, tls.clone())?;
        match NodeClient::new(channel)
            .attest(tokio_stream::iter([request.clone()]))
            .await
        {
            Ok(response) => break response.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable && attempts < 10 => {
                attempts += 1;
                tokio::time::sleep(jittered(ceiling)).await;
                ceiling = (ceiling * 2).min(BACKOFF_MAX);
            }
            Err(status) => return Err(failed("Attest")(status)),
        }
    };
    let granted = match responses.message().await.map_err(failed("Attest"))? {
        Some(message) => match message.step {
            Some(attest_response::Step::Credentials(granted)) => granted,
            other => {
                return Err(BenchError::Failed(format!(
                    "Attest answered {other:?}, not credentials"
                )));
            }
        },
        None => return Err(BenchError::Failed("Attest ended without an answer".into())),
    };
    let key = svid_key.serialize_der();
    let chain = [granted.node_svid];
    let tls = tessera::tls::client_config(roots, &server_id, Some((&chain, &key)))
        .map_err(|e| BenchError::Failed(format!("node TLS: {e}")))?;
    let channel = node_channel(port, source, tls)?;
    Ok(SimNode {
        channel,
        node_id: granted.node_id,
        group,
    })
}

/// Keeps node `node`'s sync stream open until `stop`: reconnects with jittered backoff, asking
/// to catch up from the revision it holds, and reports every message.
async fn keep_synced(
    node: usize,
    channel: Channel,
    reports: mpsc::UnboundedSender<Report>,
    mut stop: watch::Receiver<bool>,
) {
    let mut holds: HashSet<String> = HashSet::new();
    let mut revision = 0;
    let mut ceiling = BACKOFF_MIN;
    loop {
        let mut client = NodeClient::new(channel.clone());
        let opened = tokio::select! {
            _ = stop.changed() => return,
            opened = client.sync(SyncRequest { since_revision: revision }) => opened,
        };
        match opened {
            Ok(response) => {
                let mut stream = response.into_inner();
                let mut first = true;
                loop {
                    let message = tokio::select! {
                        _ = stop.changed() => return,
                        message = stream.message() => message,
                    };
                    let update = match message {
                        Ok(Some(update)) => update,
                        Err(status) if refused(&status) => {
                            let _ = reports.send(Report::Refused(Refused { node, status }));
                            return;
                        }
                        Ok(None) | Err(_) => break,
                    };
                    ceiling = BACKOFF_MIN;
                    if update.full {
                        holds.clear();
                    }
                    for id in &update.removed {
                        holds.remove(id);
                    }
                    let upserted: Vec<String> =
                        update.upserted.iter().map(|e| e.id.clone()).collect();
                    holds.extend(upserted.iter().cloned());
                    revision = update.revision;
                    let _ = reports.send(Report::Seen(Seen {
                        node,
                        at: Instant::now(),
                        first,
                        full: update.full,
                        holds: holds.len(),
                        upserted: if update.full { Vec::new() } else { upserted },
                    }));
                    first = false;
                }
            }
            Err(status) if refused(&status) => {
                let _ = reports.send(Report::Refused(Refused { node, status }));
                return;
            }
            Err(_) => {}
        }
        let pause = jittered(ceiling);
        ceiling = (ceiling * 2).min(BACKOFF_MAX);
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Whether a status means the node's credentials are no longer accepted.
fn refused(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
    )
}

/// Reads reports until `done` says the phase is over; fails on a refusal or after
/// [`PHASE_LIMIT`].
async fn until(
    reports: &mut mpsc::UnboundedReceiver<Report>,
    what: &str,
    mut done: impl FnMut(&Seen) -> bool,
) -> Result<(), BenchError> {
    let deadline = tokio::time::Instant::now() + PHASE_LIMIT;
    loop {
        let report = tokio::time::timeout_at(deadline, reports.recv())
            .await
            .map_err(|_| BenchError::Failed(format!("{what}: not done within {PHASE_LIMIT:?}")))?
            .ok_or_else(|| BenchError::Failed(format!("{what}: every node stopped")))?;
        match report {
            Report::Seen(seen) => {
                if done(&seen) {
                    return Ok(());
                }
            }
            Report::Refused(Refused { node, status }) => {
                return Err(BenchError::Failed(format!(
                    "{what}: node {node}'s stream was refused: {:?} {}",
                    status.code(),
                    status.message()
                )));
            }
        }
    }
}

/// Changes an entry (its TTL) and times its arrival at each of the `nodes` entitled to it.
async fn time_change(
    server: &mut Server,
    reports: &mut mpsc::UnboundedReceiver<Report>,
    entry_id: &str,
    nodes: &HashSet<usize>,
    samples: &mut Vec<Duration>,
) -> Result<Duration, BenchError> {
    let mut entry = server
        .admin
        .get_entry(EntryRequest {
            id: entry_id.to_owned(),
        })
        .await
        .map_err(failed("reading an entry"))?
        .into_inner();
    entry.x509_ttl_seconds = if entry.x509_ttl_seconds == 600 {
        900
    } else {
        600
    };
    let started = Instant::now();
    server
        .admin
        .update_entry(UpdateEntryRequest { entry: Some(entry) })
        .await
        .map_err(failed("updating an entry"))?;
    let mut waiting = nodes.clone();
    let mut last = started;
    until(reports, "an entry change", |seen| {
        if seen.at >= started
            && seen.upserted.iter().any(|id| id == entry_id)
            && waiting.remove(&seen.node)
        {
            samples.push(seen.at - started);
            last = last.max(seen.at);
        }
        waiting.is_empty()
    })
    .await?;
    Ok(last - started)
}

/// Every node uploads `per_node` events at once; events per second until the last is acked.
async fn upload_events(nodes: &[SimNode], per_node: usize) -> Result<f64, BenchError> {
    let started = Instant::now();
    let mut uploads = tokio::task::JoinSet::new();
    for (index, node) in nodes.iter().enumerate() {
        let (channel, node_id) = (node.channel.clone(), node.node_id.clone());
        uploads.spawn(async move {
            let now = now_ms();
            let batches: Vec<EventBatch> = (0..per_node)
                .collect::<Vec<_>>()
                .chunks(EVENTS_PER_BATCH)
                .enumerate()
                .map(|(sequence, chunk)| EventBatch {
                    sequence: sequence as u64 + 1,
                    events: chunk
                        .iter()
                        .map(|i| Event {
                            id: new_event_id(),
                            kind: EventKind::SvidUsed as i32,
                            time_ms: now,
                            trust_domain: TRUST_DOMAIN.into(),
                            node_id: node_id.clone(),
                            entry_id: format!("fleet-{}", i % 50),
                            spiffe_id: format!("spiffe://{TRUST_DOMAIN}/fleet/{}", i % 50),
                            serial: format!("{index:016x}{i:016x}"),
                            not_after: now / 1000 + 3600,
                            first_ms: now,
                            last_ms: now,
                            count: 1,
                            ..Default::default()
                        })
                        .collect(),
                })
                .collect();
            let expected = batches.len();
            let mut acks = NodeClient::new(channel)
                .report_events(tokio_stream::iter(batches))
                .await?
                .into_inner();
            let mut stored = 0;
            for _ in 0..expected {
                match acks.message().await? {
                    Some(ack) if ack.error.is_empty() => stored += ack.stored as usize,
                    Some(ack) => return Err(tonic::Status::internal(ack.error)),
                    None => return Err(tonic::Status::internal("the ack stream ended early")),
                }
            }
            Ok(stored)
        });
    }
    let mut stored = 0;
    while let Some(joined) = uploads.join_next().await {
        stored += joined
            .map_err(|e| BenchError::Failed(format!("an upload panicked: {e}")))?
            .map_err(failed("ReportEvents"))?;
    }
    let expected = nodes.len() * per_node;
    if stored != expected {
        return Err(BenchError::Failed(format!(
            "{stored} events stored of {expected} uploaded"
        )));
    }
    Ok(expected as f64 / started.elapsed().as_secs_f64())
}

/// Creates the entries: `count` pinned to the groups' labels, and one every node serves.
/// Returns the id of the one every node serves, and the ids of the first entry of each group.
async fn create_entries(
    server: &Server,
    count: usize,
    groups: usize,
) -> Result<(String, Vec<String>), BenchError> {
    let uid = super::scenarios::uid_selector();
    let entry = |path: String, node_selectors: Vec<String>| Entry {
        spiffe_id: format!("spiffe://{TRUST_DOMAIN}{path}"),
        selectors: vec![uid.clone()],
        node_selectors,
        x509_ttl_seconds: 600,
        owner: "bench".into(),
        purpose: "fleet benchmark".into(),
        ..Default::default()
    };
    let everyone = server
        .admin
        .clone()
        .create_entry(CreateEntryRequest {
            entry: Some(entry("/fleet/everyone".into(), Vec::new())),
        })
        .await
        .map_err(failed("creating an entry"))?
        .into_inner()
        .id;
    let permits = Arc::new(Semaphore::new(CREATING_AT_ONCE));
    let mut creating = tokio::task::JoinSet::new();
    for index in 0..count {
        let request = CreateEntryRequest {
            entry: Some(entry(
                entry_path(index),
                vec![format!("node:label:{}", group_label(index % groups))],
            )),
        };
        let (mut admin, permits) = (server.admin.clone(), permits.clone());
        creating.spawn(async move {
            let _permit = permits.acquire_owned().await;
            admin
                .create_entry(request)
                .await
                .map(|created| (index, created.into_inner().id))
        });
    }
    let mut firsts = vec![String::new(); groups.min(count)];
    while let Some(joined) = creating.join_next().await {
        let (index, id) = joined
            .map_err(|e| BenchError::Failed(format!("a creation panicked: {e}")))?
            .map_err(failed("creating an entry"))?;
        if let Some(slot) = firsts.get_mut(index) {
            *slot = id;
        }
    }
    Ok((everyone, firsts))
}

/// What one step measured.
#[derive(Debug, Default)]
struct Step {
    nodes: usize,
    attest_per_second: f64,
    full_set_seconds: f64,
    rss_mib: f64,
    rss_per_node_kib: f64,
    idle_cpu_per_node_us: f64,
    pinned: Option<Distribution>,
    everyone: Option<Distribution>,
    restart_seconds: f64,
    restart_caught_up: usize,
    restart_full: usize,
}

/// One datastore's run: its label and what each step measured.
struct Run {
    label: &'static str,
    steps: Vec<Step>,
    /// The replicas' RSS with the entries and no node.
    baseline_rss_mib: f64,
    creation_rate: f64,
    /// Nodes uploading at once, and the events per second stored.
    ingest: (usize, f64),
}

/// The fleet scenario: on SQLite, then on PostgreSQL with two replicas sharing the database
/// and splitting the nodes between them (when `TESSERA_TEST_POSTGRES` names a server).
pub async fn fleet(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    let started_at = Instant::now();
    let mut runs = vec![fleet_on(plan, &dir.join("sqlite"), "", 1, "SQLite").await?];
    let mut note = "node count steps are cumulative: the nodes of a step stay connected into the next; every step ends with a restart of every replica that every node rides out without attesting again".to_owned();
    match super::ingest::postgres_database().await {
        Some(connection) => {
            let datastore =
                format!("[datastore]\nkind = \"postgres\"\nconnection = \"{connection}\"");
            let run = fleet_on(
                plan,
                &dir.join("postgres"),
                &datastore,
                2,
                "PostgreSQL, 2 replicas",
            )
            .await;
            tessera_harness::postgres::drop_scratch_database(&connection).await;
            runs.push(run?);
        }
        None => note.push_str("; PostgreSQL not measured: TESSERA_TEST_POSTGRES is not set"),
    }
    Ok(result(
        &runs,
        plan.fleet_entries,
        note,
        started_at.elapsed(),
    ))
}

/// The sum of `f` over the replicas' processes.
fn over_replicas<T: std::iter::Sum<T>>(servers: &[Server], f: impl Fn(&Server) -> T) -> T {
    servers.iter().map(f).sum()
}

/// The fleet on `replicas` servers sharing `datastore` (empty: each its own SQLite; so one).
async fn fleet_on(
    plan: Plan,
    dir: &Path,
    datastore: &str,
    replicas: usize,
    label: &'static str,
) -> Result<Run, BenchError> {
    let levels = plan.fleet_levels;
    let entries = plan.fleet_entries;
    let groups = (entries / ENTRIES_PER_NODE).max(1);
    let mut servers = Vec::new();
    for replica in 0..replicas {
        servers.push(Server::start(&dir.join(format!("r{replica}")), datastore).await?);
    }
    // Every replica's root, now that all have published theirs.
    let roots = servers[0]
        .admin
        .get_bundle(GetBundleRequest {})
        .await
        .map_err(failed("reading the bundle"))?
        .into_inner()
        .roots;
    let creating = Instant::now();
    let (everyone, group_entries) = create_entries(&servers[0], entries, groups).await?;
    let creation_rate = (entries + 1) as f64 / creating.elapsed().as_secs_f64();
    // What a node costs is measured above the servers holding the entries and no node.
    tokio::time::sleep(plan.fleet_idle).await;
    let baseline_rss = over_replicas(&servers, |s| s.process().rss_kib().0);

    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let (stop_tx, stop) = watch::channel(false);
    let mut nodes: Vec<SimNode> = Vec::new();
    let mut steps = Vec::new();
    let mut ingest_rate = None;
    for &level in levels {
        let mut step = Step {
            nodes: level,
            ..Step::default()
        };
        // Attestation, ATTESTING_AT_ONCE at a time, each over a connection of its own.
        let attesting = Instant::now();
        let permits = Arc::new(Semaphore::new(ATTESTING_AT_ONCE));
        let mut joining = tokio::task::JoinSet::new();
        for index in nodes.len()..level {
            // Tokens from the first replica; nodes split between the replicas.
            let (permits, admin, roots, port) = (
                permits.clone(),
                servers[0].admin.clone(),
                roots.clone(),
                servers[index % servers.len()].port,
            );
            joining.spawn(async move {
                let _permit = permits.acquire_owned().await;
                attest(port, admin, &roots, index, groups)
                    .await
                    .map(|node| (index, node))
            });
        }
        let mut joined = Vec::new();
        while let Some(result) = joining.join_next().await {
            joined.push(
                result
                    .map_err(|e| BenchError::Failed(format!("an attestation panicked: {e}")))??,
            );
        }
        let added = joined.len();
        step.attest_per_second = added as f64 / attesting.elapsed().as_secs_f64();
        joined.sort_by_key(|(index, _)| *index);
        let first_new = nodes.len();
        nodes.extend(joined.into_iter().map(|(_, node)| node));

        // Every new node opens its stream; the step ends when each holds its full set.
        let syncing = Instant::now();
        for (index, node) in nodes.iter().enumerate().skip(first_new) {
            tokio::spawn(keep_synced(
                index,
                node.channel.clone(),
                reports_tx.clone(),
                stop.clone(),
            ));
        }
        let mut waiting: HashSet<usize> = (first_new..level).collect();
        until(&mut reports, "the initial sync", |seen| {
            if seen.holds == ENTRIES_PER_NODE + 1 {
                waiting.remove(&seen.node);
            }
            waiting.is_empty()
        })
        .await?;
        step.full_set_seconds = syncing.elapsed().as_secs_f64();

        // Idle: what the connected nodes cost.
        tokio::time::sleep(plan.fleet_idle / 2).await;
        let cpu_before: Duration = over_replicas(&servers, |s| s.process().cpu_time());
        let idle = Instant::now();
        tokio::time::sleep(plan.fleet_idle).await;
        let cpu = over_replicas(&servers, |s| s.process().cpu_time()).saturating_sub(cpu_before);
        step.idle_cpu_per_node_us =
            cpu.as_secs_f64() / idle.elapsed().as_secs_f64() / level as f64 * 1e6;
        let rss = over_replicas(&servers, |s| s.process().rss_kib().0);
        step.rss_mib = rss as f64 / 1024.0;
        step.rss_per_node_kib = rss.saturating_sub(baseline_rss) as f64 / level as f64;

        if ingest_rate.is_none() {
            ingest_rate = Some(upload_events(&nodes, plan.fleet_events_per_node).await?);
        }

        // One entry's change: pinned to a group, then one every node serves.
        let mut pinned = Vec::new();
        for round in 0..plan.fleet_changes {
            let group = round % groups.min(level);
            let members: HashSet<usize> = nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.group == group)
                .map(|(i, _)| i)
                .collect();
            let entry_id = group_entries[group].clone();
            time_change(
                &mut servers[0],
                &mut reports,
                &entry_id,
                &members,
                &mut pinned,
            )
            .await?;
        }
        step.pinned = Some(Distribution::of(&format!("{level} nodes"), &mut pinned));
        let all: HashSet<usize> = (0..level).collect();
        let mut everyone_samples = Vec::new();
        for _ in 0..plan.fleet_everyone_changes {
            time_change(
                &mut servers[0],
                &mut reports,
                &everyone,
                &all,
                &mut everyone_samples,
            )
            .await?;
        }
        step.everyone = Some(Distribution::of(
            &format!("{level} nodes"),
            &mut everyone_samples,
        ));

        // A restart: every node reconnects by itself and is synced again. A first message
        // after the kill is a new stream's.
        let restarting = Instant::now();
        for server in &mut servers {
            server.restart().await?;
        }
        let mut waiting: HashSet<usize> = (0..level).collect();
        let (mut caught_up, mut full) = (0, 0);
        until(&mut reports, "the resync after a restart", |seen| {
            if seen.first && seen.at > restarting && waiting.remove(&seen.node) {
                if seen.full {
                    full += 1;
                } else {
                    caught_up += 1;
                }
            }
            waiting.is_empty()
        })
        .await?;
        step.restart_seconds = restarting.elapsed().as_secs_f64();
        step.restart_caught_up = caught_up;
        step.restart_full = full;
        steps.push(step);
    }
    let _ = stop_tx.send(true);
    Ok(Run {
        label,
        steps,
        baseline_rss_mib: baseline_rss as f64 / 1024.0,
        creation_rate,
        ingest: (
            levels.first().copied().unwrap_or(0),
            ingest_rate.unwrap_or(0.0),
        ),
    })
}

/// One figure of a step, drawn against the number of nodes.
type StepFigure<'a> = dyn Fn(&Step) -> f64 + 'a;

/// The report of the runs: figures per run and step, charts against the number of nodes (a
/// line per run), and the targets judged at each run's largest step.
fn result(runs: &[Run], entries: usize, note: String, elapsed: Duration) -> ScenarioResult {
    let ms = |d: &Option<Distribution>, q: f64| d.as_ref().map_or(0.0, |d| d.at(q) / 1000.0);
    let mut figures = Vec::new();
    for run in runs {
        let l = run.label;
        figures.extend([
            (
                format!("{l}: entries created/s (admin API, 16 at once)"),
                run.creation_rate,
            ),
            (
                format!("{l}: server RSS MiB with the entries, no node"),
                run.baseline_rss_mib,
            ),
            (
                format!(
                    "{l}: events/s stored, {} nodes uploading at once",
                    run.ingest.0
                ),
                run.ingest.1,
            ),
        ]);
        for step in &run.steps {
            let n = format!("{l}, {} nodes", step.nodes);
            figures.extend([
                (format!("{n}: attestations/s"), step.attest_per_second),
                (
                    format!("{n}: s until every new node holds its entries"),
                    step.full_set_seconds,
                ),
                (format!("{n}: server RSS MiB"), step.rss_mib),
                (
                    format!("{n}: server RSS KiB per node"),
                    step.rss_per_node_kib,
                ),
                (
                    format!("{n}: server idle CPU µs/s per node"),
                    step.idle_cpu_per_node_us,
                ),
                (
                    format!("{n}: pinned entry change p50 ms"),
                    ms(&step.pinned, 0.5),
                ),
                (
                    format!("{n}: pinned entry change p99 ms"),
                    ms(&step.pinned, 0.99),
                ),
                (
                    format!("{n}: entry every node serves, change p50 ms"),
                    ms(&step.everyone, 0.5),
                ),
                (
                    format!("{n}: entry every node serves, change p99 ms"),
                    ms(&step.everyone, 0.99),
                ),
                (
                    format!("{n}: restart until all synced, s"),
                    step.restart_seconds,
                ),
                (
                    format!("{n}: after the restart, caught up"),
                    step.restart_caught_up as f64,
                ),
                (
                    format!("{n}: after the restart, sent everything"),
                    step.restart_full as f64,
                ),
            ]);
        }
    }
    let limit_ms = CHANGE_TARGET.as_secs_f64() * 1000.0;
    let met = runs.iter().all(|run| {
        run.steps.last().is_some_and(|last| {
            ms(&last.pinned, 0.99) < limit_ms
                && ms(&last.everyone, 0.99) < limit_ms
                && last.restart_seconds < RESTART_TARGET.as_secs_f64()
        })
    });
    let lines = |what: &[(&str, &StepFigure<'_>)]| -> Vec<(String, Vec<(f64, f64)>)> {
        runs.iter()
            .flat_map(|run| {
                what.iter().map(move |(name, f)| {
                    (
                        format!("{}: {name}", run.label),
                        run.steps.iter().map(|s| (s.nodes as f64, f(s))).collect(),
                    )
                })
            })
            .collect()
    };
    let charts = vec![
        Chart::Lines {
            file: "fleet_change.png".into(),
            title: "One entry change to every entitled node's sync stream".into(),
            x_label: "connected nodes".into(),
            y_label: "ms".into(),
            series: lines(&[
                ("pinned, p99", &|s| ms(&s.pinned, 0.99)),
                ("every node, p50", &|s| ms(&s.everyone, 0.5)),
                ("every node, p99", &|s| ms(&s.everyone, 0.99)),
            ]),
            limit: Some(("target p99".into(), limit_ms)),
        },
        Chart::Lines {
            file: "fleet_sync.png".into(),
            title: "Until every node is synced: a restart, and new nodes joining".into(),
            x_label: "connected nodes".into(),
            y_label: "s".into(),
            series: lines(&[
                ("restart", &|s| s.restart_seconds),
                ("joining", &|s| s.full_set_seconds),
            ]),
            limit: Some(("restart target".into(), RESTART_TARGET.as_secs_f64())),
        },
        Chart::Lines {
            file: "fleet_attest.png".into(),
            title: "Join-token attestations per second (64 at once, a connection each)".into(),
            x_label: "connected nodes".into(),
            y_label: "attestations/s".into(),
            series: lines(&[("attestations/s", &|s| s.attest_per_second)]),
            limit: None,
        },
        Chart::Lines {
            file: "fleet_cost.png".into(),
            title: "What a connected node costs the servers".into(),
            x_label: "connected nodes".into(),
            y_label: "KiB RSS, µs CPU per s".into(),
            series: lines(&[
                ("RSS KiB per node", &|s| s.rss_per_node_kib),
                ("idle CPU µs/s per node", &|s| s.idle_cpu_per_node_us),
            ]),
            limit: None,
        },
    ];
    let largest = runs
        .iter()
        .filter_map(|r| r.steps.last())
        .map(|s| s.nodes)
        .max()
        .unwrap_or(0);
    ScenarioResult {
        name: "fleet".into(),
        description: format!(
            "Servers and up to {largest} simulated nodes in one process: join-token attestation with real CSRs, TLS with the node SVID, the sync stream (reconnecting with the agent's jittered backoff, catching up from its revision) and event upload. {entries} entries pinned to labels ({ENTRIES_PER_NODE} per node) and one every node serves. One server on SQLite; two replicas on one PostgreSQL database, each node connected to one of them, every change made through the first."
        ),
        target: format!(
            "at the largest step of each datastore, one entry change to every entitled node p99 under {} ms, and a restart until every node is synced under {} s",
            CHANGE_TARGET.as_millis(),
            RESTART_TARGET.as_secs()
        ),
        met,
        figures,
        note,
        seconds: elapsed.as_secs_f64(),
        charts,
    }
}
