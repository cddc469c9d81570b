//! The agent's side of events: one [`Recorder`] per agent turns what happens to credentials
//! into events and hands them to a [`EventLog`]: the durable spool in server mode (uploaded by
//! the server link), a JSON-lines audit log in standalone mode.
//!
//! Issuance and revocation events are critical: when the spool cannot take one, the recorder
//! says so, and issuance does not proceed. Deliveries are aggregated per SVID and caller over a
//! short window, so that a busy workload produces one `svid_used` event per window, not one per
//! call. With the audit log, refusals are aggregated the same way per caller: any local user can
//! cause them at will.
//!
//! The standalone audit log is bounded: it is rotated at a size and only so many rotated files
//! are kept. A write it cannot make (a full disk) is logged and counted, and issuance goes on: a
//! local audit trail that cannot be written must not stop every workload.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::model::{
    caller_of, kind_name, new_event_id, now_ms, revocation_event_id, takes_out_of_use,
};
use super::spool::SpoolError;
use crate::attest::CallerFacts;
use crate::ca::X509Svid;
use crate::ca::task::TaskClaims;
use crate::clock::unix_seconds;
use crate::entry::RegistrationEntry;
use crate::proto::tessera::{Event, EventKind, RevocationReason, TaskEndReason, TaskLink};

/// An event could not be recorded.
#[derive(Debug, thiserror::Error)]
#[error("cannot record the {kind} event: {source}")]
pub struct RecordError {
    /// The event's kind.
    pub kind: &'static str,
    /// Why (full spool, disk error...).
    #[source]
    pub source: LogError,
}

/// Why an [`EventLog`] could not take or keep events.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The spool refused the event (full, too large) or a file operation on it failed.
    #[error("{0}")]
    Spool(#[source] SpoolError),
    /// The standalone audit log could not be opened, written or synced.
    #[error("audit log {}: cannot {op}: {source}", path.display())]
    Audit {
        /// What was being done: `open`, `write`, `fsync`.
        op: &'static str,
        /// The log file.
        path: PathBuf,
        /// The error from the system.
        #[source]
        source: std::io::Error,
    },
}

/// Somewhere events are kept durably.
pub trait EventLog: Send + Sync {
    /// Writes one event. `critical` events (issuance, revocation) must never be dropped; others
    /// may be refused when space runs short.
    fn append(&self, critical: bool, event: &Event) -> Result<(), LogError>;
    /// Makes everything appended so far durable.
    fn sync(&self) -> Result<(), LogError>;
    /// Whether an issuance must be refused when its event cannot be written (the spool, which
    /// the server's inventory depends on); the standalone audit log says no.
    fn required(&self) -> bool {
        true
    }
}

/// How the standalone audit log is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditLimits {
    /// The log is rotated when a line would take it past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.jsonl.1` the newest); older ones are deleted.
    pub keep: u32,
}

impl Default for AuditLimits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            keep: 4,
        }
    }
}

/// Events as JSON lines in a file (standalone mode's audit log). Lines are written whole at
/// once and synced to disk by [`EventLog::sync`] (called on an interval by the recorder's
/// flusher). The file is rotated at [`AuditLimits::max_bytes`]: `audit.jsonl` becomes
/// `audit.jsonl.1`, that one `.2`, and so on up to [`AuditLimits::keep`].
pub struct AuditLog {
    /// The file being written, one writer at a time.
    current: Mutex<AuditFile>,
    /// A handle on the current file for fsync without holding up writers; replaced at rotation.
    sync_handle: Mutex<Arc<File>>,
    /// Its path, for messages.
    path: PathBuf,
    limits: AuditLimits,
    /// Whether the last write failed, so that a full disk is logged once, not once per event.
    failing: AtomicBool,
    /// Writes that failed since open.
    failed_writes: AtomicU64,
}

struct AuditFile {
    file: Arc<File>,
    /// Bytes of whole lines: where the next line goes, and what a failed write is cut back to.
    len: u64,
}

impl AuditLog {
    /// Opens (creating, 0600) the audit log at `path`, with the default limits.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::open_with(path, AuditLimits::default())
    }

    /// Opens (creating, 0600) the audit log at `path`, bounded by `limits`.
    pub fn open_with(path: &Path, limits: AuditLimits) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = Arc::new(open_append(path)?);
        let len = file.metadata()?.len();
        Ok(Self {
            sync_handle: Mutex::new(file.clone()),
            current: Mutex::new(AuditFile { file, len }),
            path: path.to_path_buf(),
            limits,
            failing: AtomicBool::new(false),
            failed_writes: AtomicU64::new(0),
        })
    }

    /// Writes that failed since open.
    pub fn failed_writes(&self) -> u64 {
        self.failed_writes.load(Ordering::Relaxed)
    }

    /// The path of rotated file `n` (1 is the newest).
    pub fn rotated_path(&self, n: u32) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{n}"));
        self.path.with_file_name(name)
    }

    /// Moves the current file to `.1` (shifting older ones up and deleting the oldest), and
    /// starts a new one.
    fn rotate(&self, current: &mut AuditFile) -> std::io::Result<()> {
        // Whatever was written to the old file stays durable under its new name.
        current.file.sync_data()?;
        if self.limits.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            match std::fs::remove_file(self.rotated_path(self.limits.keep)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            for n in (1..self.limits.keep).rev() {
                match std::fs::rename(self.rotated_path(n), self.rotated_path(n + 1)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            std::fs::rename(&self.path, self.rotated_path(1))?;
        }
        let file = Arc::new(open_append(&self.path)?);
        crate::durable::sync_parent(&self.path)?;
        *self.sync_handle.lock().unwrap_or_else(|e| e.into_inner()) = file.clone();
        *current = AuditFile { file, len: 0 };
        Ok(())
    }

    fn write_line(&self, line: &[u8]) -> std::io::Result<()> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.len > 0 && current.len + line.len() as u64 > self.limits.max_bytes {
            self.rotate(&mut current)?;
        }
        if let Err(e) = (&*current.file).write_all(line) {
            // Part of the line may be in the file: cut it off, so the next line starts whole.
            let _ = current.file.set_len(current.len);
            return Err(e);
        }
        current.len += line.len() as u64;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl EventLog for AuditLog {
    fn append(&self, _critical: bool, event: &Event) -> Result<(), LogError> {
        let mut line = super::model::to_json(event, None, None).to_string();
        line.push('\n');
        match self.write_line(line.as_bytes()) {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!(file = %self.path.display(), failed_writes = self.failed_writes(),
                        "the audit log can be written again");
                }
                Ok(())
            }
            Err(e) => {
                self.failed_writes.fetch_add(1, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(file = %self.path.display(), error = %e,
                        "cannot write the audit log; events go unrecorded (counted in tessera_events_not_recorded_total) until it can be written again, identities are still issued");
                }
                Err(LogError::Audit {
                    op: "write",
                    path: self.path.clone(),
                    source: e,
                })
            }
        }
    }

    fn sync(&self) -> Result<(), LogError> {
        // An fsync can take milliseconds; appends (on the issuance path) must not wait for it.
        let file = self
            .sync_handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        file.sync_data().map_err(|source| LogError::Audit {
            op: "fsync",
            path: self.path.clone(),
            source,
        })
    }

    fn required(&self) -> bool {
        false
    }
}

/// Deliveries of one SVID to one caller, being counted.
struct Uses {
    event: Event,
    first_ms: i64,
    last_ms: i64,
    count: u64,
    /// When the window opened, on the monotonic clock: a wall-clock step neither holds a
    /// window open for hours nor closes every window at once.
    opened: tokio::time::Instant,
}

#[derive(Hash, PartialEq, Eq)]
struct UseKey {
    /// What was used: an SVID's serial, or a token's use and `jti`.
    serial: String,
    pid: i32,
    uid: u32,
    gid: u32,
    exe_path: String,
}

/// Refusals of one caller, for one reason, being counted.
#[derive(Hash, PartialEq, Eq, Clone)]
struct DenialKey {
    /// pid, uid, gid and executable path; `None` when the caller could not be identified.
    caller: Option<(i32, u32, u32, String)>,
    detail: String,
}

/// What the events about one JWT-SVID say about it.
#[derive(Debug, Clone, Copy)]
pub struct JwtFacts<'a> {
    /// Its `jti`.
    pub jti: &'a str,
    /// Its `sub`.
    pub spiffe_id: &'a str,
    /// The entry it was signed for (a task's derived entry: the task entry, from `task`).
    pub entry_id: &'a str,
    /// Its `exp`, Unix seconds.
    pub expires_at: i64,
    /// For a task's token, the task.
    pub task: Option<&'a crate::ca::task::TaskClaims>,
}

/// Most callers whose refusals are counted apart in one window; beyond it, further callers are
/// counted together per uid and gid (pid 0, no executable), so that many short-lived processes
/// cannot grow the table either.
const MAX_DENIAL_KEYS: usize = 1024;

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
    /// How long deliveries (and refusals, when aggregated) are counted before they are
    /// reported.
    use_window: Duration,
    /// Refusals counted since their window opened; `None`: each refusal is its own event.
    denials: Option<Mutex<HashMap<DenialKey, Uses>>>,
    /// Events written, by kind number.
    recorded: [AtomicU64; KINDS],
    /// Events that could not be written, by kind number.
    failed: [AtomicU64; KINDS],
    /// The version of the policy in force (0: none), carried by issuance and task events.
    policy_version: AtomicU64,
}

/// Kind numbers run from 0 (unspecified) to 13 (`jwt_revoked`).
const KINDS: usize = 14;

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
            denials: None,
            recorded: Default::default(),
            failed: Default::default(),
            policy_version: AtomicU64::new(0),
        }
    }

    /// Writes `event`, counting the outcome.
    fn write(&self, critical: bool, event: &Event) -> Result<(), LogError> {
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

    /// Counts refusals per caller and reason over the use window, reported as one
    /// `attestation_denied` event with a count, first and last time (as deliveries are), instead
    /// of one event per refusal.
    pub fn with_aggregated_denials(mut self) -> Self {
        self.denials = Some(Mutex::new(HashMap::new()));
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
        let mut event = Event {
            entry_id: entry.id.clone(),
            spiffe_id: svid.spiffe_id.to_string(),
            serial: svid.serial_hex.clone(),
            not_after: unix_seconds(svid.not_after),
            ..self.event(kind)
        };
        // A task SVID is accounted to its task entry and its task.
        if let Some(task) = &entry.task {
            event.entry_id = task.entry_id.clone();
            event.task_id = task.task_id.clone();
            event.chain = chain_of(task);
        }
        event
    }

    fn jwt_event(&self, kind: EventKind, token: &JwtFacts<'_>) -> Event {
        let mut event = Event {
            entry_id: token.entry_id.to_owned(),
            spiffe_id: token.spiffe_id.to_owned(),
            jti: token.jti.to_owned(),
            not_after: token.expires_at,
            ..self.event(kind)
        };
        if let Some(task) = token.task {
            event.entry_id = task.entry_id.clone();
            event.task_id = task.task_id.clone();
            event.chain = chain_of(task);
        }
        event
    }

    /// Records the signing of a JWT-SVID (a standalone agent's; a server records its own); the
    /// token must not be handed out when this fails.
    pub fn jwt_issued(
        &self,
        token: &JwtFacts<'_>,
        audience: &[String],
        caller: Option<&CallerFacts>,
    ) -> Result<(), RecordError> {
        let mut event = self.jwt_event(EventKind::JwtIssued, token);
        event.audience = audience.to_vec();
        event.caller = caller.map(caller_of);
        event.policy_version = self.policy_version();
        self.write_or_refuse(&event)
    }

    /// Records that a JWT-SVID is revoked, for `reason`.
    pub fn jwt_revoked(&self, token: &JwtFacts<'_>, reason: RevocationReason, detail: &str) {
        let mut event = self.jwt_event(EventKind::JwtRevoked, token);
        event.set_reason(reason);
        event.detail = detail.to_owned();
        if let Err(e) = self.write(true, &event) {
            tracing::error!(jti = %token.jti, error = %e, "cannot record a JWT revocation event");
        }
    }

    /// Counts one use of a JWT-SVID by `caller`: `fetched` (handed to it) or `validated` (for
    /// it, by ValidateJWTSVID).
    pub fn jwt_used(&self, token: &JwtFacts<'_>, caller: &CallerFacts, how: &'static str) {
        self.count_use(format!("{how} {}", token.jti), caller, || {
            let mut event = self.jwt_event(EventKind::JwtUsed, token);
            event.detail = how.to_owned();
            event
        });
    }

    /// Records the start of a task; the task must not begin when this fails.
    pub fn task_started(
        &self,
        task: &TaskEvent<'_>,
        starter: &CallerFacts,
    ) -> Result<(), RecordError> {
        let mut event = self.task_event(EventKind::TaskStarted, task);
        event.caller = Some(caller_of(starter));
        event.policy_version = self.policy_version();
        self.write_or_refuse(&event)
    }

    /// Records the end of a task for `reason`. A failure is logged: the task has ended anyway.
    pub fn task_ended(&self, task: &TaskEvent<'_>, reason: TaskEndReason, detail: &str) {
        let mut event = self.task_event(EventKind::TaskEnded, task);
        event.set_task_end_reason(reason);
        event.detail = detail.to_owned();
        if let Err(e) = self.write(true, &event) {
            tracing::error!(task = %task.claims.task_id, error = %e, "cannot record a task's end");
        }
    }

    fn task_event(&self, kind: EventKind, task: &TaskEvent<'_>) -> Event {
        Event {
            entry_id: task.claims.entry_id.clone(),
            spiffe_id: task.spiffe_id.to_owned(),
            not_after: task.deadline,
            task_id: task.claims.task_id.clone(),
            chain: chain_of(task.claims),
            purpose: task.claims.purpose.clone(),
            owner: task.claims.owner.clone(),
            task_pid: task.pid,
            ..self.event(kind)
        }
    }

    /// Sets the policy version issuances and task starts are recorded with.
    pub fn set_policy_version(&self, version: u64) {
        self.policy_version.store(version, Ordering::Release);
    }

    fn policy_version(&self) -> i64 {
        i64::try_from(self.policy_version.load(Ordering::Acquire)).unwrap_or(i64::MAX)
    }

    /// Records a policy refusal of `action` on `entry_id` for `caller` (droppable, like other
    /// refusals: any local process can cause them).
    pub fn policy_denied(
        &self,
        caller: &CallerFacts,
        action: &str,
        entry_id: &str,
        version: u64,
        determining: &[String],
    ) {
        let mut event = self.event(EventKind::PolicyDenied);
        event.caller = Some(caller_of(caller));
        event.entry_id = entry_id.to_owned();
        event.detail = format!("{action} refused by policy version {version}");
        event.policy_version = i64::try_from(version).unwrap_or(i64::MAX);
        event.policies = determining.to_vec();
        if let Err(e) = self.write(false, &event) {
            tracing::debug!(error = %e, "policy-denied event dropped");
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
        event.policy_version = self.policy_version();
        self.write_or_refuse(&event)
    }

    /// Writes `event`, which what it records must not happen without: an error when the log
    /// is required and the write failed. Otherwise a failure is logged and counted by the log
    /// and in `failed`, and what it records goes on.
    fn write_or_refuse(&self, event: &Event) -> Result<(), RecordError> {
        match self.write(true, event) {
            Ok(()) => Ok(()),
            Err(_) if !self.log.required() => Ok(()),
            Err(source) => Err(RecordError {
                kind: kind_name(event.kind()),
                source,
            }),
        }
    }

    /// Records that `svid` of `entry` is no longer served, for `reason`. A failure is logged:
    /// the revocation itself has already happened.
    pub fn revoked(&self, entry: &RegistrationEntry, svid: &X509Svid, reason: RevocationReason) {
        self.revoked_for(entry, svid, reason, "");
    }

    /// Records a revocation with `detail`, whoever asked for it in their words.
    pub fn revoked_for(
        &self,
        entry: &RegistrationEntry,
        svid: &X509Svid,
        reason: RevocationReason,
        detail: &str,
    ) {
        let mut event = self.svid_event(EventKind::SvidRevoked, entry, svid);
        event.set_reason(reason);
        event.detail = detail.to_owned();
        if takes_out_of_use(reason) {
            event.id = revocation_event_id(&svid.serial_hex);
        }
        if let Err(e) = self.write(true, &event) {
            tracing::error!(serial = %svid.serial_hex, error = %e, "cannot record a revocation event");
        }
    }

    /// Counts one delivery of `svid` to `caller`.
    pub fn used(&self, entry: &RegistrationEntry, svid: &X509Svid, caller: &CallerFacts) {
        self.count_use(svid.serial_hex.clone(), caller, || {
            self.svid_event(EventKind::SvidUsed, entry, svid)
        });
    }

    /// Counts one use of `what` by `caller` in its window; the window's event, made by `event`
    /// when it opens, is reported when it closes.
    fn count_use(&self, what: String, caller: &CallerFacts, event: impl FnOnce() -> Event) {
        let now = now_ms();
        let key = UseKey {
            serial: what,
            pid: caller.pid,
            uid: caller.uid,
            gid: caller.gid,
            exe_path: caller.exe_path.clone(),
        };
        let mut uses = self.uses.lock().unwrap_or_else(|e| e.into_inner());
        let counted = uses.entry(key).or_insert_with(|| {
            let mut event = event();
            event.caller = Some(caller_of(caller));
            Uses {
                event,
                first_ms: now,
                last_ms: now,
                count: 0,
                opened: tokio::time::Instant::now(),
            }
        });
        counted.last_ms = now;
        counted.count += 1;
    }

    /// Records a caller that was refused an identity (counted, when refusals are aggregated).
    pub fn denied(&self, caller: Option<&CallerFacts>, detail: &str) {
        let Some(denials) = &self.denials else {
            let mut event = self.event(EventKind::AttestationDenied);
            event.caller = caller.map(caller_of);
            event.detail = detail.to_owned();
            if let Err(e) = self.write(false, &event) {
                tracing::debug!(error = %e, "attestation-denied event dropped");
            }
            return;
        };
        let now = now_ms();
        let mut key = DenialKey {
            caller: caller.map(|c| (c.pid, c.uid, c.gid, c.exe_path.clone())),
            detail: detail.to_owned(),
        };
        let mut denials = denials.lock().unwrap_or_else(|e| e.into_inner());
        if denials.len() >= MAX_DENIAL_KEYS
            && !denials.contains_key(&key)
            && let Some((_, uid, gid, _)) = key.caller
        {
            key.caller = Some((0, uid, gid, String::new()));
        }
        let counted = denials.entry(key).or_insert_with_key(|key| {
            let mut event = self.event(EventKind::AttestationDenied);
            event.caller = caller.map(caller_of);
            if let (Some(caller), Some((0, ..))) = (&mut event.caller, &key.caller) {
                // Counted together with other callers of the same user: no one pid or path.
                caller.pid = 0;
                caller.exe_path.clear();
                caller.exe_sha256.clear();
                caller.unit.clear();
            }
            event.detail = detail.to_owned();
            Uses {
                event,
                first_ms: now,
                last_ms: now,
                count: 0,
                opened: tokio::time::Instant::now(),
            }
        });
        counted.last_ms = now;
        counted.count += 1;
    }

    /// Reports every delivery count whose window is over (all of them with `all`).
    pub fn flush_uses(&self, all: bool) {
        let now = tokio::time::Instant::now();
        let due: Vec<Uses> = {
            let mut uses = self.uses.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<UseKey> = uses
                .iter()
                .filter(|(_, u)| all || now.duration_since(u.opened) >= self.use_window)
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
        let denied: Vec<Uses> = match &self.denials {
            None => Vec::new(),
            Some(denials) => {
                let mut denials = denials.lock().unwrap_or_else(|e| e.into_inner());
                let keys: Vec<DenialKey> = denials
                    .iter()
                    .filter(|(_, d)| all || now.duration_since(d.opened) >= self.use_window)
                    .map(|(k, _)| k.clone())
                    .collect();
                keys.iter().filter_map(|k| denials.remove(k)).collect()
            }
        };
        for counted in due.into_iter().chain(denied) {
            let mut event = counted.event;
            event.first_ms = counted.first_ms;
            event.last_ms = counted.last_ms;
            event.count = counted.count;
            event.time_ms = counted.last_ms;
            if let Err(e) = self.write(false, &event) {
                tracing::warn!(kind = event.kind, serial = %event.serial, count = event.count, error = %e, "aggregated event dropped");
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

/// A task as its start and end events describe it.
#[derive(Debug, Clone, Copy)]
pub struct TaskEvent<'a> {
    /// The task's claims, as its SVIDs carry them.
    pub claims: &'a TaskClaims,
    /// The task's SPIFFE ID.
    pub spiffe_id: &'a str,
    /// Its deadline, Unix seconds.
    pub deadline: i64,
    /// Its process.
    pub pid: i32,
}

fn chain_of(task: &TaskClaims) -> Vec<TaskLink> {
    task.chain
        .iter()
        .map(|link| TaskLink {
            task_id: link.task_id.clone(),
            spiffe_id: link.spiffe_id.clone(),
        })
        .collect()
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
        fn append(&self, critical: bool, event: &Event) -> Result<(), LogError> {
            if self.full.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(LogError::Spool(SpoolError::Full {
                    dropped_class: crate::events::Class::Critical,
                    dir: PathBuf::from("memory"),
                    used: 0,
                    limit: 0,
                }));
            }
            self.events.lock().unwrap().push((critical, event.clone()));
            Ok(())
        }
        fn sync(&self) -> Result<(), LogError> {
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
                task: None,
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
            lineage: Vec::new(),
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

    #[tokio::test(start_paused = true)]
    async fn the_use_window_runs_on_the_monotonic_clock() {
        let log = Arc::new(MemoryLog::default());
        let recorder = Recorder::new("td", "n1", Box::new(log.clone()))
            .with_use_window(Duration::from_secs(10));
        let (entry, svid) = svid();
        recorder.used(&entry, &svid, &caller(10));
        tokio::time::advance(Duration::from_secs(9)).await;
        recorder.flush_uses(false);
        assert!(log.events.lock().unwrap().is_empty(), "window still open");
        // Only monotonic time moves here; the wall clock barely does.
        tokio::time::advance(Duration::from_secs(1)).await;
        recorder.flush_uses(false);
        let events = log.events.lock().unwrap();
        assert_eq!(
            events.len(),
            1,
            "the window closed after 10 s of monotonic time"
        );
        assert_eq!(events[0].1.count, 1);
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
        let source = std::error::Error::source(&err).expect("no source");
        assert!(source.is::<LogError>(), "{source:?}");
    }

    #[test]
    fn refusals_are_aggregated_per_caller_in_a_bounded_table() {
        let log = Arc::new(MemoryLog::default());
        let recorder = Recorder::new("td", "n1", Box::new(log.clone())).with_aggregated_denials();
        for _ in 0..500 {
            recorder.denied(Some(&caller(10)), "no identity issued");
        }
        for _ in 0..3 {
            recorder.denied(Some(&caller(11)), "no identity issued");
        }
        recorder.denied(None, "no peer");
        recorder.denied(None, "no peer");
        recorder.flush_uses(false);
        assert!(log.events.lock().unwrap().is_empty(), "window still open");
        recorder.flush_uses(true);
        let counts = |events: &[(bool, Event)]| {
            let mut counts: Vec<(Option<i32>, u64)> = events
                .iter()
                .map(|(critical, e)| {
                    assert!(!critical);
                    assert_eq!(e.kind, EventKind::AttestationDenied as i32);
                    assert!(e.first_ms <= e.last_ms && e.last_ms == e.time_ms);
                    (e.caller.as_ref().map(|c| c.pid), e.count)
                })
                .collect();
            counts.sort();
            counts
        };
        assert_eq!(
            counts(&log.events.lock().unwrap()),
            [(None, 2), (Some(10), 500), (Some(11), 3)]
        );

        // Callers beyond the table's bound are counted together per user.
        log.events.lock().unwrap().clear();
        let extra = 50;
        for pid in 0..(MAX_DENIAL_KEYS + extra) as i32 {
            recorder.denied(Some(&caller(1000 + pid)), "no identity issued");
        }
        recorder.flush_uses(true);
        let events = log.events.lock().unwrap();
        assert_eq!(events.len(), MAX_DENIAL_KEYS + 1);
        let together: Vec<&Event> = events
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.caller.as_ref().unwrap().pid == 0)
            .collect();
        assert_eq!(together.len(), 1);
        assert_eq!(together[0].count, extra as u64);
        assert_eq!(together[0].caller.as_ref().unwrap().uid, 1);
        assert!(together[0].caller.as_ref().unwrap().exe_path.is_empty());
    }

    #[test]
    fn without_aggregation_each_refusal_is_an_event() {
        let (recorder, log) = memory_recorder();
        recorder.denied(Some(&caller(10)), "no identity issued");
        recorder.denied(Some(&caller(10)), "no identity issued");
        assert_eq!(log.events.lock().unwrap().len(), 2);
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn the_audit_log_is_rotated_at_its_size_and_keeps_so_many_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let limits = AuditLimits {
            max_bytes: 4096,
            keep: 2,
        };
        let log = AuditLog::open_with(&path, limits).unwrap();
        let recorder = Recorder::new("td", "standalone", Box::new(log));
        let (entry, svid) = svid();
        for pid in 0..200 {
            recorder.issued(&entry, &svid, Some(&caller(pid))).unwrap();
        }
        recorder.sync();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]);
        let mut pids = Vec::new();
        for name in names.iter().rev() {
            let file = dir.path().join(name);
            assert!(std::fs::metadata(&file).unwrap().len() <= limits.max_bytes);
            pids.extend(
                lines(&file)
                    .iter()
                    .map(|l| l["caller"]["pid"].as_i64().unwrap()),
            );
        }
        // The newest events, in order, and nothing older than the kept files hold.
        assert!(pids.len() < 200);
        let newest: Vec<i64> = (200 - pids.len() as i64..200).collect();
        assert_eq!(pids, newest);

        // Reopened, the log goes on from the size it has.
        let log = AuditLog::open_with(&path, limits).unwrap();
        let before = lines(&path).len();
        let recorder = Recorder::new("td", "standalone", Box::new(log));
        recorder.issued(&entry, &svid, Some(&caller(7))).unwrap();
        let after = lines(&path).len();
        assert!(after == before + 1 || after == 1, "{before} then {after}");
        assert!(std::fs::metadata(&path).unwrap().len() <= limits.max_bytes);
    }

    #[test]
    fn a_full_disk_is_counted_and_never_refuses_an_issuance() {
        // /dev/full answers every write with ENOSPC, as a full file system does.
        let log = AuditLog::open(Path::new("/dev/full")).unwrap();
        let line = Event::default();
        match log.append(true, &line) {
            Err(LogError::Audit {
                op: "write",
                source,
                ..
            }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
            }
            other => panic!("{other:?}"),
        }
        let recorder = Recorder::new("td", "standalone", Box::new(log));
        let (entry, svid) = svid();
        for pid in 0..3 {
            recorder.issued(&entry, &svid, Some(&caller(pid))).unwrap();
        }
        recorder.denied(Some(&caller(4)), "no identity issued");
        let failed = recorder.counters().failed;
        assert!(failed.contains(&("svid_issued", 3)), "{failed:?}");
        assert!(failed.contains(&("attestation_denied", 1)), "{failed:?}");
        assert!(recorder.counters().recorded.iter().all(|(_, n)| *n == 0));
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
