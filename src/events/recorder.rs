//! The agent's side of events: one [`Recorder`] per agent turns what happens to credentials
//! into events and hands them to a [`EventLog`]: the durable spool in server mode (uploaded by
//! the server link), a JSON-lines audit log in standalone mode.
//!
//! Issuance and revocation events are critical: when one cannot be written, the recorder says
//! so, and issuance does not proceed. Deliveries are aggregated per SVID and caller over a short
//! window, so that a busy workload produces one `svid_used` event per window, not one per call.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use super::model::{caller_of, kind_name, new_event_id, now_ms};
use crate::attest::CallerFacts;
use crate::ca::X509Svid;
use crate::clock::unix_seconds;
use crate::entry::RegistrationEntry;
use crate::proto::tessera::{Event, EventKind, RevocationReason};

/// An event could not be recorded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot record the {kind} event: {reason}")]
pub struct RecordError {
    /// The event's kind.
    pub kind: &'static str,
    /// Why (full spool, disk error...).
    pub reason: String,
}

/// Somewhere events are kept durably.
pub trait EventLog: Send + Sync {
    /// Writes one event. `critical` events (issuance, revocation) must never be dropped; others
    /// may be refused when space runs short.
    fn append(&self, critical: bool, event: &Event) -> Result<(), String>;
    /// Makes everything appended so far durable.
    fn sync(&self) -> Result<(), String>;
}

/// Events as JSON lines in a file (standalone mode's audit log). Lines are written whole at
/// once and synced to disk by [`EventLog::sync`] (called on an interval by the recorder's
/// flusher).
pub struct AuditLog {
    /// The file, opened for appending; one writer at a time.
    file: Mutex<File>,
    /// A second handle on the same file, for fsync without holding up writers.
    sync_handle: File,
    /// Its path, for messages.
    path: PathBuf,
}

impl AuditLog {
    /// Opens (creating, 0600) the audit log at `path`.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            sync_handle: file.try_clone()?,
            file: Mutex::new(file),
            path: path.to_path_buf(),
        })
    }
}

impl EventLog for AuditLog {
    fn append(&self, _critical: bool, event: &Event) -> Result<(), String> {
        let mut line = super::model::to_json(event, None, None).to_string();
        line.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(line.as_bytes())
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    fn sync(&self) -> Result<(), String> {
        // An fsync can take milliseconds; appends (on the issuance path) must not wait for it.
        self.sync_handle
            .sync_data()
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

/// Deliveries of one SVID to one caller, being counted.
struct Uses {
    event: Event,
    first_ms: i64,
    last_ms: i64,
    count: u64,
}

#[derive(Hash, PartialEq, Eq)]
struct UseKey {
    serial: String,
    pid: i32,
    uid: u32,
    gid: u32,
    exe_path: String,
}

/// Turns credential happenings into events. One per agent, shared by the cache, the Workload
/// API service and the server link.
pub struct Recorder {
    /// The trust domain every event names.
    trust_domain: String,
    /// This node's id; empty until a standalone agent or a not-yet-attested node has one.
    node_id: RwLock<String>,
    /// Where events go.
    log: Box<dyn EventLog>,
    /// Deliveries counted since their window opened.
    uses: Mutex<HashMap<UseKey, Uses>>,
    /// How long deliveries are counted before they are reported.
    use_window: Duration,
    /// Events written, by kind number.
    recorded: [AtomicU64; KINDS],
    /// Events that could not be written, by kind number.
    failed: [AtomicU64; KINDS],
}

/// Kind numbers run from 0 (unspecified) to 7.
const KINDS: usize = 8;

/// What the recorder has counted, for metrics.
pub struct Counters {
    /// Events written, by kind name.
    pub recorded: Vec<(&'static str, u64)>,
    /// Events that could not be written, by kind name.
    pub failed: Vec<(&'static str, u64)>,
}

impl Recorder {
    /// A recorder writing to `log`, counting deliveries over 10 s windows.
    pub fn new(trust_domain: &str, node_id: &str, log: Box<dyn EventLog>) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            node_id: RwLock::new(node_id.to_owned()),
            log,
            uses: Mutex::new(HashMap::new()),
            use_window: Duration::from_secs(10),
            recorded: Default::default(),
            failed: Default::default(),
        }
    }

    /// Writes `event`, counting the outcome.
    fn write(&self, critical: bool, event: &Event) -> Result<(), String> {
        let kind = (event.kind.max(0) as usize).min(KINDS - 1);
        let result = self.log.append(critical, event);
        let counter = if result.is_ok() {
            &self.recorded
        } else {
            &self.failed
        };
        counter[kind].fetch_add(1, Ordering::Relaxed);
        result
    }

    /// The counts so far, for metrics.
    pub fn counters(&self) -> Counters {
        let named = |counts: &[AtomicU64; KINDS]| {
            (1..KINDS)
                .filter_map(|k| {
                    let kind = EventKind::try_from(k as i32).ok()?;
                    Some((kind_name(kind), counts[k].load(Ordering::Relaxed)))
                })
                .collect()
        };
        Counters {
            recorded: named(&self.recorded),
            failed: named(&self.failed),
        }
    }

    /// Counts deliveries over `window` instead.
    pub fn with_use_window(mut self, window: Duration) -> Self {
        self.use_window = window;
        self
    }

    /// Sets the node id events carry (after attestation).
    pub fn set_node_id(&self, node_id: &str) {
        *self.node_id.write().unwrap_or_else(|e| e.into_inner()) = node_id.to_owned();
    }

    fn event(&self, kind: EventKind) -> Event {
        Event {
            id: new_event_id(),
            kind: kind as i32,
            time_ms: now_ms(),
            trust_domain: self.trust_domain.clone(),
            node_id: self
                .node_id
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            ..Default::default()
        }
    }

    fn svid_event(&self, kind: EventKind, entry: &RegistrationEntry, svid: &X509Svid) -> Event {
        Event {
            entry_id: entry.id.clone(),
            spiffe_id: svid.spiffe_id.to_string(),
            serial: svid.serial_hex.clone(),
            not_after: unix_seconds(svid.not_after),
            ..self.event(kind)
        }
    }

    /// Records an issuance; the SVID must not be handed out when this fails.
    pub fn issued(
        &self,
        entry: &RegistrationEntry,
        svid: &X509Svid,
        caller: Option<&CallerFacts>,
    ) -> Result<(), RecordError> {
        let mut event = self.svid_event(EventKind::SvidIssued, entry, svid);
        event.caller = caller.map(caller_of);
        self.write(true, &event).map_err(|reason| RecordError {
            kind: kind_name(EventKind::SvidIssued),
            reason,
        })
    }

    /// Records that `svid` of `entry` is no longer served, for `reason`. A failure is logged:
    /// the revocation itself has already happened.
    pub fn revoked(&self, entry: &RegistrationEntry, svid: &X509Svid, reason: RevocationReason) {
        let mut event = self.svid_event(EventKind::SvidRevoked, entry, svid);
        event.set_reason(reason);
        if let Err(e) = self.write(true, &event) {
            tracing::error!(serial = %svid.serial_hex, error = %e, "cannot record a revocation event");
        }
    }

    /// Counts one delivery of `svid` to `caller`.
    pub fn used(&self, entry: &RegistrationEntry, svid: &X509Svid, caller: &CallerFacts) {
        let now = now_ms();
        let key = UseKey {
            serial: svid.serial_hex.clone(),
            pid: caller.pid,
            uid: caller.uid,
            gid: caller.gid,
            exe_path: caller.exe_path.clone(),
        };
        let mut uses = self.uses.lock().unwrap_or_else(|e| e.into_inner());
        let counted = uses.entry(key).or_insert_with(|| {
            let mut event = self.svid_event(EventKind::SvidUsed, entry, svid);
            event.caller = Some(caller_of(caller));
            Uses {
                event,
                first_ms: now,
                last_ms: now,
                count: 0,
            }
        });
        counted.last_ms = now;
        counted.count += 1;
    }

    /// Records a caller that was refused an identity.
    pub fn denied(&self, caller: Option<&CallerFacts>, detail: &str) {
        let mut event = self.event(EventKind::AttestationDenied);
        event.caller = caller.map(caller_of);
        event.detail = detail.to_owned();
        if let Err(e) = self.write(false, &event) {
            tracing::debug!(error = %e, "attestation-denied event dropped");
        }
    }

    /// Reports every delivery count whose window is over (all of them with `all`).
    pub fn flush_uses(&self, all: bool) {
        let cutoff = now_ms() - self.use_window.as_millis() as i64;
        let due: Vec<Uses> = {
            let mut uses = self.uses.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<UseKey> = uses
                .iter()
                .filter(|(_, u)| all || u.first_ms <= cutoff)
                .map(|(k, _)| UseKey {
                    serial: k.serial.clone(),
                    pid: k.pid,
                    uid: k.uid,
                    gid: k.gid,
                    exe_path: k.exe_path.clone(),
                })
                .collect();
            keys.iter().filter_map(|k| uses.remove(k)).collect()
        };
        for counted in due {
            let mut event = counted.event;
            event.first_ms = counted.first_ms;
            event.last_ms = counted.last_ms;
            event.count = counted.count;
            event.time_ms = counted.last_ms;
            if let Err(e) = self.write(false, &event) {
                tracing::warn!(serial = %event.serial, count = event.count, error = %e, "svid_used event dropped");
            }
        }
    }

    /// Makes recorded events durable.
    pub fn sync(&self) {
        if let Err(e) = self.log.sync() {
            tracing::warn!(error = %e, "cannot sync recorded events to disk");
        }
    }

    /// Flushes delivery counts and syncs on an interval until `stop`; then flushes everything.
    pub async fn run_flusher(
        self: std::sync::Arc<Self>,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = ticker.tick() => {}
            }
            self.flush_uses(false);
            // fsync may wait on the disk: not on a runtime worker.
            let recorder = self.clone();
            let _ = tokio::task::spawn_blocking(move || recorder.sync()).await;
        }
        self.flush_uses(true);
        let recorder = self.clone();
        let _ = tokio::task::spawn_blocking(move || recorder.sync()).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    /// A recorder keeping events in memory, and its log.
    pub(crate) fn memory_recorder() -> (Arc<Recorder>, Arc<MemoryLog>) {
        let log = Arc::new(MemoryLog::default());
        (
            Arc::new(Recorder::new("td", "n1", Box::new(log.clone()))),
            log,
        )
    }

    /// Keeps events in memory; refuses non-critical ones when `full`.
    #[derive(Default)]
    pub(crate) struct MemoryLog {
        pub events: Mutex<Vec<(bool, Event)>>,
        pub full: std::sync::atomic::AtomicBool,
    }

    impl EventLog for Arc<MemoryLog> {
        fn append(&self, critical: bool, event: &Event) -> Result<(), String> {
            if self.full.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("full".into());
            }
            self.events.lock().unwrap().push((critical, event.clone()));
            Ok(())
        }
        fn sync(&self) -> Result<(), String> {
            Ok(())
        }
    }

    fn svid() -> (RegistrationEntry, X509Svid) {
        let entry = crate::entry::tests::entry("e1", "spiffe://td/w", &["unix:uid:1"]);
        let td = crate::spiffe::TrustDomain::new("td").unwrap();
        let (ca, _, _) = crate::ca::generate_root(
            &td,
            Duration::from_secs(3600),
            std::time::SystemTime::now(),
            0,
            "t",
        )
        .unwrap();
        let svid = crate::ca::mint_x509_svid(
            &ca,
            &crate::ca::LeafRequest {
                spiffe_id: &entry.spiffe_id,
                ttl: Duration::from_secs(60),
                dns_names: &[],
                not_after_cap: None,
            },
            std::time::SystemTime::now(),
        )
        .unwrap();
        (entry, svid)
    }

    fn caller(pid: i32) -> CallerFacts {
        CallerFacts {
            pid,
            uid: 1,
            gid: 1,
            exe_path: "/bin/w".into(),
            exe_sha256: None,
            systemd_unit: Some("w.service".into()),
            selectors: Default::default(),
        }
    }

    #[test]
    fn uses_are_aggregated_per_svid_and_caller() {
        let log = Arc::new(MemoryLog::default());
        let recorder = Recorder::new("td", "n1", Box::new(log.clone()));
        let (entry, svid) = svid();
        for _ in 0..5 {
            recorder.used(&entry, &svid, &caller(10));
        }
        recorder.used(&entry, &svid, &caller(11));
        recorder.flush_uses(false);
        assert!(log.events.lock().unwrap().is_empty(), "window still open");
        recorder.flush_uses(true);
        let events = log.events.lock().unwrap();
        let mut counts: Vec<(i32, u64)> = events
            .iter()
            .map(|(critical, e)| {
                assert!(!critical);
                assert_eq!(e.kind, EventKind::SvidUsed as i32);
                assert_eq!(e.serial, svid.serial_hex);
                assert_eq!(e.node_id, "n1");
                assert!(e.first_ms <= e.last_ms);
                let c = e.caller.as_ref().unwrap();
                assert_eq!(c.unit, "w.service");
                (c.pid, e.count)
            })
            .collect();
        counts.sort();
        assert_eq!(counts, [(10, 5), (11, 1)]);
    }

    #[test]
    fn issuance_fails_when_its_event_cannot_be_written() {
        let log = Arc::new(MemoryLog::default());
        let recorder = Recorder::new("td", "", Box::new(log.clone()));
        let (entry, svid) = svid();
        recorder.issued(&entry, &svid, Some(&caller(3))).unwrap();
        recorder.revoked(&entry, &svid, RevocationReason::EntryRemoved);
        {
            let events = log.events.lock().unwrap();
            assert!(events.iter().all(|(critical, _)| *critical));
            assert_eq!(events[1].1.reason(), RevocationReason::EntryRemoved);
            assert_eq!(events[0].1.caller.as_ref().unwrap().pid, 3);
        }
        log.full.store(true, std::sync::atomic::Ordering::Relaxed);
        let err = recorder.issued(&entry, &svid, None).unwrap_err();
        assert!(err.to_string().contains("svid_issued"), "{err}");
    }

    #[test]
    fn the_audit_log_holds_one_json_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let recorder = Recorder::new("td", "standalone", Box::new(AuditLog::open(&path).unwrap()));
        let (entry, svid) = svid();
        recorder.issued(&entry, &svid, Some(&caller(9))).unwrap();
        recorder.denied(Some(&caller(8)), "no identity issued");
        recorder.sync();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["kind"], "svid_issued");
        assert_eq!(lines[0]["caller"]["pid"], 9);
        assert_eq!(lines[1]["kind"], "attestation_denied");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
