//! One agent serving many identities at once: thousands of callers, each its own user and group
//! with entries of its own (one selecting its uid, and with two identities per caller one more
//! selecting its gid), each holding several FetchX509SVID streams on its one connection, through
//! a rotation of every identity.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hyper_util::rt::TokioIo;
use tokio::sync::Barrier;
use tonic::transport::{Channel, Endpoint};

use super::callers::{Callers, raise_descriptor_limit};
use super::chart::Chart;
use super::scenarios::{
    RotationTally, TRUST_DOMAIN, agent_config_with, spawn_watch, start_agent, uid_selector,
};
use super::{BenchError, Plan, ScenarioResult};
use tessera::proto::workload::X509svidRequest;

/// The first caller's uid and gid; caller `i` runs as `FIRST_CALLER_UID + i`, above the ranges
/// distributions give to people and services.
const FIRST_CALLER_UID: u32 = 2_000_000;
/// The RSS target at the largest level: 600 MB.
const RSS_LIMIT_MIB: f64 = 600e6 / (1024.0 * 1024.0);
/// Descriptors the agent and this process need: two per connection at the agent, one per
/// connection here, and room for everything else.
const DESCRIPTORS: u64 = 65_536;

/// What one stream saw: its SPIFFE IDs, then whether the next message came before the first
/// SVID expired (`None`: none came).
type StreamOutcome = Result<(Vec<String>, Option<bool>), BenchError>;

/// The SPIFFE IDs caller `caller` is entitled to: by its uid, and with two identities per caller
/// by its gid too.
fn identities_of(caller: usize, per_caller: usize) -> Vec<(String, String)> {
    let id = FIRST_CALLER_UID + caller as u32;
    let mut identities = vec![(format!("/caller/{caller}/uid"), format!("unix:uid:{id}"))];
    if per_caller > 1 {
        identities.push((format!("/caller/{caller}/gid"), format!("unix:gid:{id}")));
    }
    identities
}

/// For each of the plan's caller counts: an agent with the plan's identities per caller (entries
/// selecting the caller's uid and gid), that many callers each opening the plan's streams per
/// caller on its own connection, then the agent's RSS and CPU and what every stream saw of its
/// rotation.
pub async fn streams_many_identities(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    let distinct = nix::unistd::geteuid().is_root();
    let descriptors = raise_descriptor_limit(DESCRIPTORS);
    let per_caller = plan.streams_per_caller;
    let identities_per_caller = if distinct {
        plan.identities_per_caller
    } else {
        1
    };
    let ttl = plan.identity_ttl;
    let mut figures = Vec::new();
    let mut notes = Vec::new();
    let mut met = true;
    let (mut rss_open_line, mut rss_peak_line) = (Vec::new(), Vec::new());
    for &callers in plan.identity_levels {
        let streams = callers * per_caller;
        let level_dir = dir.join(callers.to_string());
        let ttl_text = format!("{}s", ttl.as_secs());
        let entries: Vec<(String, Vec<String>, String, String)> = if distinct {
            (0..callers)
                .flat_map(|i| identities_of(i, identities_per_caller))
                .map(|(path, selector)| (path, vec![selector], ttl_text.clone(), String::new()))
                .collect()
        } else {
            vec![(
                "/caller/0/uid".into(),
                vec![uid_selector()],
                ttl_text,
                String::new(),
            )]
        };
        let (config, socket) = agent_config_with(&level_dir, &entries)?;
        let agent = start_agent(&config, &socket)?;
        let (rss_idle, _) = agent.rss_kib();
        let cpu_before = agent.cpu_time();

        let started = Instant::now();
        let mut forked: Callers = {
            let socket = socket.clone();
            let first_uid = distinct.then_some(FIRST_CALLER_UID);
            tokio::task::spawn_blocking(move || Callers::connect(&socket, callers, first_uid))
                .await
                .map_err(|e| BenchError::Failed(format!("forking callers: {e}")))??
        };
        let fork_time = started.elapsed();
        let mut connections = Vec::with_capacity(callers);
        for connection in std::mem::take(&mut forked.connections) {
            connections.push(channel_over(connection).await?);
        }
        let opened = Arc::new(Barrier::new(streams + 1));
        let mut tasks = Vec::with_capacity(streams);
        for (i, channel) in connections.iter().enumerate() {
            for _ in 0..per_caller {
                let client = tessera::cli::client::workload_client(channel.clone());
                let owner = if distinct { i } else { 0 };
                let mut expected: Vec<String> = identities_of(owner, identities_per_caller)
                    .into_iter()
                    .map(|(path, _)| format!("spiffe://{TRUST_DOMAIN}{path}"))
                    .collect();
                expected.sort_unstable();
                let barrier = opened.clone();
                tasks.push(spawn_watch(opened.clone(), async move {
                    watch_own_rotation(client, &expected, &barrier, ttl).await
                }));
            }
        }
        opened.wait().await;
        let open_time = started.elapsed();
        let (rss_open, _) = agent.rss_kib();
        let mut tally = RotationTally::default();
        let mut identities = std::collections::HashSet::new();
        for task in tasks {
            tally.count(match task.await {
                Ok(Ok((ids, seen))) => {
                    identities.extend(ids);
                    Ok(seen)
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            });
        }
        let (rss_now, rss_peak) = agent.rss_kib();
        let cpu = agent.cpu_time().saturating_sub(cpu_before);
        drop(connections);
        drop(forked);
        drop(agent);

        let rss_peak_mib = rss_peak as f64 / 1024.0;
        let last = Some(&callers) == plan.identity_levels.last();
        // Without root every caller is this user, so all share one identity.
        let due = if distinct {
            callers * identities_per_caller
        } else {
            1
        };
        met &= tally.all_on_time()
            && identities.len() == due
            && (!last || rss_peak_mib < RSS_LIMIT_MIB);
        rss_open_line.push((streams as f64, rss_open as f64 / 1024.0));
        rss_peak_line.push((streams as f64, rss_peak_mib));
        let label = format!("{streams} streams, {due} identities");
        notes.extend(tally.failure_note(&label));
        figures.extend([
            (
                format!("{label}: time to fork the callers (ms)"),
                fork_time.as_secs_f64() * 1e3,
            ),
            (
                format!("{label}: time to open all (ms)"),
                open_time.as_secs_f64() * 1e3,
            ),
            (
                format!("{label}: distinct identities served"),
                identities.len() as f64,
            ),
            (
                format!("{label}: agent RSS idle (MiB)"),
                rss_idle as f64 / 1024.0,
            ),
            (
                format!("{label}: agent RSS all open (MiB)"),
                rss_open as f64 / 1024.0,
            ),
            (
                format!("{label}: agent RSS per stream open (KiB)"),
                rss_open.saturating_sub(rss_idle) as f64 / streams as f64,
            ),
            (
                format!("{label}: agent RSS after rotation (MiB)"),
                rss_now as f64 / 1024.0,
            ),
            (format!("{label}: agent RSS peak (MiB)"), rss_peak_mib),
            (format!("{label}: agent CPU (s)"), cpu.as_secs_f64()),
        ]);
        figures.extend(tally.figures(&label));
    }
    if !distinct {
        notes.push(
            "not run as root: every caller ran as this user, so they shared one identity".into(),
        );
    }
    if descriptors < DESCRIPTORS {
        notes.push(format!(
            "the descriptor limit could be raised to {descriptors} only, not {DESCRIPTORS}: the agent takes two per connection"
        ));
    }
    let ttl_s = ttl.as_secs();
    Ok(ScenarioResult {
        name: "streams_many_identities".into(),
        description: format!(
            "Callers forked from the harness, each running as a user and group of its own with {identities_per_caller} entries of its own (by uid, and by gid), each holding {per_caller} FetchX509SVID streams on the one connection it made, SVID TTL {ttl_s}s: every stream must get its caller's identities and no other, then the next SVIDs before the ones it holds expire. RSS and CPU are the agent process's own (/proc)."
        ),
        target:
            "100,000 streams of 10,000 identities under 600 MB RSS, zero late or missed rotations"
                .into(),
        met,
        figures,
        note: notes.join("; "),
        seconds: 0.0,
        charts: vec![Chart::Lines {
            file: "identities_rss.png".into(),
            title: format!(
                "Agent RSS against streams, {per_caller} per caller, {identities_per_caller} identities per caller (TTL {ttl_s}s)"
            ),
            x_label: "concurrent streams".into(),
            y_label: "agent RSS (MiB)".into(),
            series: vec![
                ("all streams open".into(), rss_open_line),
                ("peak, through the rotation".into(), rss_peak_line),
            ],
            limit: Some(("target: 600 MB (572.2 MiB)".into(), RSS_LIMIT_MIB)),
        }],
    })
}

/// A gRPC channel over a connection a caller made, so that every call on it is the caller's.
async fn channel_over(connection: UnixStream) -> Result<Channel, BenchError> {
    connection
        .set_nonblocking(true)
        .map_err(|e| BenchError::Failed(format!("a caller's connection: {e}")))?;
    let slot = Arc::new(Mutex::new(Some(connection)));
    // The URI is required by tonic but unused: the connector hands over the caller's
    // connection, once; a reconnection fails, as the caller's connection is gone.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let taken = slot.lock().ok().and_then(|mut slot| slot.take());
            async move {
                let connection = taken.ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "the caller's connection was closed",
                    )
                })?;
                tokio::net::UnixStream::from_std(connection).map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| BenchError::Failed(format!("HTTP/2 over a caller's connection: {e}")))
}

/// Opens one stream, checks it serves exactly `expected` (sorted), waits for every other stream
/// to open, then for the next message, at most the TTL and 10 s.
async fn watch_own_rotation(
    mut client: tessera::cli::client::WorkloadClient,
    expected: &[String],
    opened: &Barrier,
    ttl: Duration,
) -> StreamOutcome {
    let failed = |what: &str, status: tonic::Status| {
        BenchError::Failed(format!("{what}: {:?} {}", status.code(), status.message()))
    };
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(|s| failed("FetchX509SVID", s))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(|s| failed("stream", s))?
        .ok_or_else(|| BenchError::Failed("stream ended".into()))?;
    let mut ids: Vec<String> = first.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    ids.sort_unstable();
    if ids != expected {
        return Err(BenchError::Failed(format!(
            "served {ids:?} where {expected:?} was due"
        )));
    }
    let mut not_after = i64::MAX;
    for svid in &first.svids {
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.x509_svid)
            .map_err(|e| BenchError::Failed(e.to_string()))?;
        not_after = not_after.min(leaf.validity().not_after.timestamp());
    }
    opened.wait().await;
    let seen = match tokio::time::timeout(ttl + Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(_))) => {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64;
            Some(now < not_after)
        }
        _ => None,
    };
    Ok((ids, seen))
}
