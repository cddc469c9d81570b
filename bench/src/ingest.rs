//! Scenario 6, event ingest: events from one agent's spool to durable storage on the server,
//! on SQLite and (when a PostgreSQL server is named by `TESSERA_TEST_POSTGRES`) on PostgreSQL.
//!
//! A real server and a real agent in server mode: the agent attests, stops, finds its spool
//! filled with `svid_used` events, and starts again; the clock runs from that start until the
//! server has stored every event. The set stored is checked against the set produced.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use super::cluster::{Server, TRUST_DOMAIN, failed};
use super::{BenchError, Plan, ScenarioResult, io_err};
use tessera::events::model::{new_event_id, now_ms};
use tessera::events::{Spool, SpoolConfig, append_event};
use tessera::proto::tessera::{Event, EventFilter, EventKind};

/// The rate the issue asks of SQLite.
const TARGET_EVENTS_PER_SECOND: f64 = 20_000.0;

/// One backend's run: events per second, and how long it took. The clock runs from the agent's
/// start until its spool has no event the server has not acknowledged (an acknowledgement
/// follows the datastore's commit); the set stored is checked afterwards, off the clock, so
/// that reading it back does not compete with the writes being measured.
async fn ingest_once(
    dir: &Path,
    events: usize,
    datastore: &str,
) -> Result<(f64, Duration), BenchError> {
    let mut server = Server::start(dir, datastore).await?;
    let agent = server
        .agent_config(dir, "agent", "metrics_address = \"127.0.0.1:0\"\n")
        .await?;
    // Attest once, then stop, so that the spool can be filled while nothing drains it.
    drop(agent.start()?);
    let node_id = std::fs::read_to_string(agent.state.join("upstream/node_id"))
        .map_err(io_err("reading the node id"))?;
    let produced = fill_spool(&agent.state.join("spool"), &node_id, events)?;

    let started = Instant::now();
    // The address is read from the log while the agent already drains; the clock keeps running.
    let (_agent, metrics) = agent.start_with_metrics()?;
    let deadline = started + Duration::from_secs(600);
    loop {
        match pending_records(metrics).await {
            Some(0) => break,
            _ if Instant::now() > deadline => {
                return Err(BenchError::Failed(format!(
                    "the agent's spool still held unacknowledged events after 10 minutes (metrics on {metrics})"
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let elapsed = started.elapsed();
    let stored = stored_ids(&mut server, events).await?;
    if stored != produced {
        return Err(BenchError::Failed(format!(
            "the events stored differ from those produced: {} stored, {} produced, {} in common",
            stored.len(),
            produced.len(),
            stored.intersection(&produced).count()
        )));
    }
    Ok((events as f64 / elapsed.as_secs_f64(), elapsed))
}

/// `tessera_spool_pending_records` from the agent's metrics endpoint; `None` while it is not up.
async fn pending_records(metrics: std::net::SocketAddr) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(metrics).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("tessera_spool_pending_records "))
        .and_then(|value| value.trim().parse().ok())
}

/// The ids of every `svid_used` event the server stored; fails on an id stored twice.
async fn stored_ids(server: &mut Server, expected: usize) -> Result<HashSet<String>, BenchError> {
    let mut stored = HashSet::with_capacity(expected);
    let mut after_seq = 0;
    loop {
        let page = server
            .admin
            .list_events(EventFilter {
                kinds: vec!["svid_used".into()],
                after_seq,
                limit: 10_000,
                ..Default::default()
            })
            .await
            .map_err(failed("listing events"))?
            .into_inner()
            .events;
        let Some(last) = page.last() else {
            return Ok(stored);
        };
        after_seq = last.seq;
        for event in page {
            if let Some(event) = event.event
                && !stored.insert(event.id.clone())
            {
                return Err(BenchError::Failed(format!(
                    "event {} stored twice",
                    event.id
                )));
            }
        }
    }
}

/// Appends `count` delivery events to the agent's spool; returns their ids.
fn fill_spool(dir: &Path, node_id: &str, count: usize) -> Result<HashSet<String>, BenchError> {
    let (spool, _) = Spool::open(dir, SpoolConfig::default())
        .map_err(|e| BenchError::Failed(format!("opening the spool: {e}")))?;
    let mut ids = HashSet::with_capacity(count);
    let now = now_ms();
    for i in 0..count {
        let event = Event {
            id: new_event_id(),
            kind: EventKind::SvidUsed as i32,
            time_ms: now,
            trust_domain: TRUST_DOMAIN.into(),
            node_id: node_id.to_owned(),
            entry_id: format!("bench-{}", i % 100),
            spiffe_id: format!("spiffe://{TRUST_DOMAIN}/bench/{}", i % 100),
            serial: format!("{:032x}", i % 1000),
            not_after: now / 1000 + 3600,
            first_ms: now,
            last_ms: now,
            count: 1,
            ..Default::default()
        };
        append_event(&spool, &event)
            .map_err(|e| BenchError::Failed(format!("filling the spool: {e}")))?;
        ids.insert(event.id);
    }
    spool
        .sync()
        .map_err(|e| BenchError::Failed(format!("syncing the spool: {e}")))?;
    Ok(ids)
}

/// 6. Event ingest on SQLite and, when available, PostgreSQL.
pub async fn event_ingest(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    let events = plan.ingest_events;
    let (sqlite_rate, sqlite_time) = ingest_once(&dir.join("sqlite"), events, "").await?;
    let mut figures = vec![
        ("SQLite: events/s".to_owned(), sqlite_rate),
        ("SQLite: seconds".to_owned(), sqlite_time.as_secs_f64()),
    ];
    let mut notes = vec![format!(
        "{events} events, all stored exactly once on each backend"
    )];
    match postgres_database().await {
        Some(connection) => {
            let datastore =
                format!("[datastore]\nkind = \"postgres\"\nconnection = \"{connection}\"");
            let (rate, time) = ingest_once(&dir.join("postgres"), events, &datastore).await?;
            figures.push(("PostgreSQL: events/s".to_owned(), rate));
            figures.push(("PostgreSQL: seconds".to_owned(), time.as_secs_f64()));
            tessera_harness::postgres::drop_scratch_database(&connection).await;
        }
        None => notes.push("PostgreSQL not measured: TESSERA_TEST_POSTGRES is not set".into()),
    }
    Ok(ScenarioResult {
        name: "event_ingest".into(),
        description: "Events from one agent's spool to the server's durable store: a real agent (server mode) finds its spool filled and uploads it in acknowledged batches; the clock runs from the agent's start until the server has stored the last event.".into(),
        target: format!("at least {TARGET_EVENTS_PER_SECOND:.0} events/s on SQLite"),
        met: sqlite_rate >= TARGET_EVENTS_PER_SECOND,
        figures,
        note: notes.join("; "),
        seconds: 0.0,
        charts: Vec::new(),
    })
}

pub async fn postgres_database() -> Option<String> {
    std::env::var_os("TESSERA_TEST_POSTGRES")?;
    tessera_harness::postgres::scratch_database_from_env().await
}
