//! Task credentials: identities that exist only for one task of one process tree.
//!
//! A task entry issues nothing by itself. A workload allowed to (one matching the entry's
//! selectors, or a process inside a task whose entry may delegate to it) starts a task for one
//! process: itself, or a process it has just started. The registry pins that process with a
//! pidfd and derives, for the task, an entry of its own (`task:<id>`) whose SPIFFE ID is the task
//! entry's with `/task/<task id>` appended and whose SVIDs carry the task claims extension
//! (`ca::task`). The identity cache serves and rotates it like any entry; the Workload API gives
//! it to the task's process and to every process that process starts afterwards (found by the
//! caller's ancestry, `CallerFacts::lineage`), and to no one else.
//!
//! The registry is the only writer of the cache's entry set: it publishes the entries of the
//! source (file or server) plus one derived entry per live task. A task ends on its process's
//! exit (the pidfd turns readable), an explicit end, its deadline, idleness, the end of the task
//! it was delegated from, or a change of its entry; its SVIDs, those it replaced included, are
//! then revoked into the CRL at once, before the entry leaves the set.

mod process;
mod saved;
pub mod service;

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

pub use process::PinError;
use process::{PinnedProcess, boot_ticks_now, is_alive, pin};
use saved::SavedTask;

use super::cache::IdentityCache;
use super::config::TaskLimits;
use super::policy::{Asked, PolicyGate, Verdict};
use crate::attest::{CallerFacts, ProcessStamp};
use crate::ca::task::{TaskClaims, TaskLink};
use crate::clock::unix_seconds;
use crate::entry::{Activation, EntrySet, FieldError, MAX_PURPOSE_LEN, RegistrationEntry};
use crate::events::recorder::{RecordError, TaskEvent};
use crate::policy::Action;
use crate::proto::tessera::{RevocationReason, TaskEndReason};
use crate::spiffe::SpiffeId;

/// Ended tasks remembered for listings.
const ENDED_KEPT: usize = 1024;
/// The loop that ends expired and idle tasks looks at the clock at least this often.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Why a task could not be started or ended. Mapped to a gRPC status in one place,
/// `service::into_status`.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No entry has this id or SPIFFE ID.
    #[error("no entry {0:?}; name a task entry by its id or SPIFFE ID (`tessera entry list`)")]
    UnknownEntry(String),
    /// The entry is standing: its identity needs no task.
    #[error("entry {0} is a standing entry; tasks run under entries with activation = \"task\"")]
    StandingEntry(String),
    /// The entry's registration has expired.
    #[error("entry {0} has expired; nothing is issued under it")]
    EntryExpired(String),
    /// The caller does not show the entry's selectors (and runs in no task that may delegate).
    #[error("the caller does not show the selectors of entry {0}, so it may not start its tasks")]
    NotPermitted(String),
    /// The caller's task may not delegate to this entry.
    #[error(
        "task {parent} (entry {parent_entry}) may not delegate to entry {entry}; add it to the \
         delegates_to of entry {parent_entry}"
    )]
    DelegationRefused {
        /// The caller's task.
        parent: String,
        /// Its entry.
        parent_entry: String,
        /// The entry asked for.
        entry: String,
    },
    /// Delegation would go deeper than `tasks.max_depth`.
    #[error("a task at depth {depth} is deeper than tasks.max_depth = {max}")]
    TooDeep {
        /// The depth the new task would have (a root task has 1).
        depth: u32,
        /// The configured limit.
        max: u32,
    },
    /// The lifetime asked for is longer than allowed.
    #[error("ttl {asked} is longer than {allowed} ({why})")]
    TtlTooLong {
        /// What was asked for.
        asked: String,
        /// What is allowed.
        allowed: String,
        /// Which limit: `tasks.max_ttl`, or the parent task's remaining lifetime.
        why: String,
    },
    /// A field of the request is malformed.
    #[error("{0}")]
    Field(#[from] FieldError),
    /// The process the task is for cannot be given one.
    #[error("process {pid}: {reason}")]
    Target {
        /// The pid asked for.
        pid: i32,
        /// Why not.
        reason: String,
    },
    /// The process could not be pinned.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// No live task has this id (or the caller may not see it).
    #[error("no live task {0}")]
    UnknownTask(String),
    /// The caller may not end this task.
    #[error(
        "task {0} was started by another user; only that user, root, or a process of the task \
         or of a task it was delegated from may end it"
    )]
    NotYours(String),
    /// The task's start could not be recorded, so it does not begin.
    #[error("cannot record the task's start: {0}")]
    Record(#[from] RecordError),
    /// The authorisation policy refused.
    #[error(
        "{action} under entry {entry} refused by policy version {version}{}",
        refusal_detail(determining)
    )]
    PolicyDenied {
        /// `StartTask` or `Delegate`.
        action: &'static str,
        /// The entry asked for.
        entry: String,
        /// The policy version that decided.
        version: u64,
        /// The forbids that matched (none: no permit applied).
        determining: Vec<String>,
    },
}

fn refusal_detail(determining: &[String]) -> String {
    if determining.is_empty() {
        " (no permit applies)".to_owned()
    } else {
        format!(" (forbidden by {})", determining.join(", "))
    }
}

/// A request to start a task, as the Tasks service received it.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// The task entry's id or SPIFFE ID.
    pub entry: String,
    /// What the task is for.
    pub purpose: String,
    /// Requested lifetime; `None`: `tasks.default_ttl` (capped by the parent's remaining life).
    pub ttl: Option<Duration>,
    /// The task's process; `None`: the caller.
    pub pid: Option<i32>,
    /// Requested idle timeout; `None`: `tasks.idle_timeout`.
    pub idle_timeout: Option<Duration>,
}

/// A task as listings show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// What its SVIDs carry.
    pub claims: TaskClaims,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Its process.
    pub root: ProcessStamp,
    /// Unix milliseconds.
    pub started_ms: i64,
    /// Unix seconds.
    pub deadline: i64,
    /// How long it may go unused.
    pub idle_timeout: Duration,
    /// The starter's effective uid.
    pub starter_uid: u32,
    /// Unix milliseconds and why, once ended.
    pub ended: Option<(i64, TaskEndReason)>,
}

impl TaskInfo {
    fn event(&self) -> TaskEvent<'_> {
        TaskEvent {
            claims: &self.claims,
            spiffe_id: &self.spiffe_id,
            deadline: self.deadline,
            pid: self.root.pid,
        }
    }

    /// The tasks this one was delegated from, nearest last (the chain without this task).
    fn ancestors(&self) -> impl Iterator<Item = &str> {
        let own = self.claims.chain.len().saturating_sub(1);
        self.claims.chain[..own].iter().map(|l| l.task_id.as_str())
    }
}

/// The id of the entry derived for task `task_id`.
pub fn task_entry_id(task_id: &str) -> String {
    format!("task:{task_id}")
}

/// One live task.
struct Live {
    info: TaskInfo,
    /// The task entry as it was when the task started (or last re-derived).
    entry: Arc<RegistrationEntry>,
    /// The entry derived for the task, in the cache's set.
    derived: Arc<RegistrationEntry>,
    /// Processes that started before this tick are not the task's (unless they are its root).
    boundary_ticks: u64,
    /// Readable once the task's process exits.
    pidfd: Arc<OwnedFd>,
    /// The task waiting on the pidfd; aborted when the task ends otherwise.
    watcher: Option<tokio::task::AbortHandle>,
    /// Last time one of its processes was given its identity.
    last_used: Instant,
    /// SVID serials from before a restart, which the cache does not know.
    earlier_serials: Vec<(String, SystemTime)>,
    /// Who started it and, for a delegation, the parent's claims: what a policy change is
    /// checked against again. Kept across restarts in the saved tasks; unknown only for a task
    /// saved by a version that did not keep it.
    started_by: Option<saved::Starter>,
}

struct State {
    /// Entries from the source (file or server), as last published.
    base: Arc<EntrySet>,
    live: HashMap<String, Live>,
    /// Task id by the stamp of its process.
    roots: HashMap<ProcessStamp, String>,
    /// Ended tasks whose process still runs, by its stamp; dropped once it exits.
    closed: HashMap<ProcessStamp, Closed>,
    /// The latest ended tasks, newest last.
    ended: VecDeque<TaskInfo>,
}

/// A task that ended while its process still runs. That process, and those it started since
/// the task began, get no task identity at all: not the ended task's and not that of a task
/// it was delegated from, whose wider credential a sub-agent must not inherit when its own
/// ends.
struct Closed {
    task_id: String,
    /// As the task's `Live::boundary_ticks`.
    boundary_ticks: u64,
    /// Readable once the process exits.
    pidfd: Arc<OwnedFd>,
}

/// Every task of one agent.
pub struct TaskRegistry {
    state: Mutex<State>,
    /// The identities; the registry publishes its entry set.
    cache: Arc<IdentityCache>,
    limits: TaskLimits,
    /// Where live tasks are kept across restarts.
    path: PathBuf,
    /// Task ids whose process exited, from the pidfd watchers.
    exits: mpsc::UnboundedSender<String>,
    /// Taken by [`run`](Self::run).
    exits_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// Wakes the loop when deadlines changed.
    wake: Notify,
    /// Wakes the saver.
    dirty: Notify,
    /// Counts changes to the live set, for tests and the saver.
    changes: watch::Sender<u64>,
    /// The start tick of the oldest live task's process (`u64::MAX` with none), set with each
    /// publish: where attestation may stop walking a caller's ancestry.
    oldest_root: AtomicU64,
    /// The authorisation policy.
    gate: PolicyGate,
}

impl TaskRegistry {
    /// A registry over `cache`, whose entry set it takes as the source's first; live tasks
    /// saved in `state_dir/tasks.json` are restored (those whose process has gone are ended,
    /// their SVIDs revoked).
    pub fn new(
        cache: Arc<IdentityCache>,
        limits: TaskLimits,
        state_dir: &std::path::Path,
        gate: PolicyGate,
    ) -> Arc<Self> {
        let (exits, exits_rx) = mpsc::unbounded_channel();
        let registry = Arc::new(Self {
            state: Mutex::new(State {
                base: cache.entries(),
                live: HashMap::new(),
                roots: HashMap::new(),
                closed: HashMap::new(),
                ended: VecDeque::new(),
            }),
            cache,
            limits,
            path: state_dir.join("tasks.json"),
            exits,
            exits_rx: Mutex::new(Some(exits_rx)),
            wake: Notify::new(),
            dirty: Notify::new(),
            changes: watch::channel(0).0,
            oldest_root: AtomicU64::new(u64::MAX),
            gate,
        });
        registry.restore();
        registry
    }

    /// Changes whenever a task starts or ends.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The task whose identity a caller with `lineage` gets: the innermost live task whose
    /// process is the caller or an ancestor of it, such that every process between them started
    /// after the task began. Counts as a use of the task.
    pub fn task_of(&self, lineage: &[ProcessStamp]) -> Option<Arc<RegistrationEntry>> {
        if lineage.is_empty() {
            return None;
        }
        let mut state = self.lock();
        let id = member_task(&state, lineage)?.to_owned();
        let live = state.live.get_mut(&id)?;
        live.last_used = Instant::now();
        Some(live.derived.clone())
    }

    /// Starts a task for `caller`.
    pub fn start(
        &self,
        caller: &CallerFacts,
        request: StartRequest,
    ) -> Result<TaskInfo, TaskError> {
        let now = SystemTime::now();
        check_purpose(&request.purpose)?;
        let (target, boundary_ticks) = self.target(caller, request.pid)?;
        let mut state = self.lock();
        let entry = find_entry(&state.base, &request.entry)?;
        if entry.activation != Activation::Task {
            return Err(TaskError::StandingEntry(entry.id.clone()));
        }
        if entry.is_expired(now) {
            return Err(TaskError::EntryExpired(entry.id.clone()));
        }
        let parent = member_task(&state, &caller.lineage).and_then(|id| state.live.get(id));
        let parent_claims = parent.map(|p| p.info.claims.clone());
        let verdict = self.policy_verdict(caller, &entry, parent_claims.as_ref(), &request);
        if let Verdict::Denied(decision) = &verdict {
            let action = if parent.is_some() {
                Action::Delegate
            } else {
                Action::StartTask
            };
            self.cache.recorder().policy_denied(
                caller,
                action.name(),
                &entry.id,
                decision.version,
                &decision.determining,
            );
            return Err(TaskError::PolicyDenied {
                action: action.name(),
                entry: entry.id.clone(),
                version: decision.version,
                determining: decision.determining.clone(),
            });
        }
        // With a policy set, the policy decides who may start and delegate; without one, the
        // entries' own rules do.
        let by_entries = verdict == Verdict::NoPolicy;
        let (chain, depth, parent_deadline) = match parent {
            Some(parent) => {
                let parent_entry = state
                    .base
                    .get(&parent.info.claims.entry_id)
                    .cloned()
                    .unwrap_or_else(|| parent.entry.clone());
                if by_entries && !parent_entry.delegates_to.contains(&entry.id) {
                    return Err(TaskError::DelegationRefused {
                        parent: parent.info.claims.task_id.clone(),
                        parent_entry: parent_entry.id.clone(),
                        entry: entry.id.clone(),
                    });
                }
                let depth = parent.info.claims.chain.len() as u32 + 1;
                (
                    parent.info.claims.chain.clone(),
                    depth,
                    Some(parent.info.deadline),
                )
            }
            None => {
                if by_entries && !entry.may_be_started_by(&caller.selectors, now) {
                    return Err(TaskError::NotPermitted(entry.id.clone()));
                }
                (Vec::new(), 1, None)
            }
        };
        if depth > self.limits.max_depth {
            return Err(TaskError::TooDeep {
                depth,
                max: self.limits.max_depth,
            });
        }
        let deadline = self.deadline(now, request.ttl, parent_deadline, entry.expires_at)?;
        if let Some(other) = state.roots.get(&target.stamp) {
            return Err(TaskError::Target {
                pid: target.stamp.pid,
                reason: format!("already runs task {other}; a process runs one task at a time"),
            });
        }
        let task_id = crate::events::model::new_event_id();
        let spiffe_id = task_spiffe_id(&entry.spiffe_id, &task_id)?;
        let mut chain = chain;
        chain.push(TaskLink {
            task_id: task_id.clone(),
            spiffe_id: spiffe_id.to_string(),
        });
        let info = TaskInfo {
            claims: TaskClaims {
                task_id: task_id.clone(),
                entry_id: entry.id.clone(),
                owner: entry.owner.clone(),
                purpose: request.purpose,
                chain,
            },
            spiffe_id: spiffe_id.to_string(),
            root: target.stamp,
            started_ms: crate::events::model::now_ms(),
            deadline: unix_seconds(deadline),
            idle_timeout: request
                .idle_timeout
                .map_or(self.limits.idle_timeout, |asked| {
                    asked.min(self.limits.idle_timeout)
                }),
            starter_uid: caller.uid,
            ended: None,
        };
        // No event, no task.
        self.cache.recorder().task_started(&info.event(), caller)?;
        tracing::info!(task = %task_id, entry = %entry.id, spiffe_id = %spiffe_id, pid = target.stamp.pid, depth, deadline = %humantime::format_rfc3339(deadline), "task started");
        let mut live = self
            .make_live(
                info.clone(),
                entry,
                boundary_ticks,
                target.pidfd,
                Vec::new(),
            )
            .ok_or_else(|| FieldError::new("spiffe_id", &info.spiffe_id, "not a SPIFFE ID"))?;
        live.started_by = Some((caller.clone(), parent_claims));
        state.closed.remove(&target.stamp);
        state.roots.insert(target.stamp, task_id.clone());
        state.live.insert(task_id, live);
        self.publish(&state);
        drop(state);
        self.changed();
        Ok(info)
    }

    /// The start tick of the oldest live task's own process, `u64::MAX` with no task live: no
    /// process that started earlier is a task's (see [`FactNeeds::lineage_since`]).
    ///
    /// [`FactNeeds::lineage_since`]: crate::attest::FactNeeds::lineage_since
    pub fn oldest_root_ticks(&self) -> u64 {
        self.oldest_root.load(Ordering::Acquire)
    }

    /// Mints the SVID of task `task_id` in the background unless it has one, so that the task's
    /// process, which asks as soon as it runs, finds it ready; the issuance is recorded with
    /// `starter` as its caller. Needs a Tokio runtime.
    pub fn prepare_svid(&self, task_id: &str, starter: &CallerFacts) {
        let cache = self.cache.clone();
        let entry_id = task_entry_id(task_id);
        let starter = starter.clone();
        drop(tokio::task::spawn_blocking(move || {
            cache.prepare(&entry_id, Some(&starter));
        }));
    }

    /// Ends task `task_id` for `caller` (explicitly), with every task delegated from it.
    pub fn end_for(&self, caller: &CallerFacts, task_id: &str) -> Result<TaskInfo, TaskError> {
        {
            let state = self.lock();
            let live = state
                .live
                .get(task_id)
                .ok_or_else(|| TaskError::UnknownTask(task_id.to_owned()))?;
            if !may_manage(&state, caller, &live.info) {
                return Err(TaskError::NotYours(task_id.to_owned()));
            }
        }
        self.end(task_id, TaskEndReason::Ended, "")
            .ok_or_else(|| TaskError::UnknownTask(task_id.to_owned()))
    }

    /// Ends task `task_id` for `reason`, and every task delegated from it (`parent_ended`).
    /// Returns the task as ended, `None` when it was not live.
    pub fn end(&self, task_id: &str, reason: TaskEndReason, detail: &str) -> Option<TaskInfo> {
        let mut state = self.lock();
        let ended = self.end_locked(&mut state, &[(task_id.to_owned(), reason)], detail);
        if ended.is_empty() {
            return None;
        }
        self.publish(&state);
        drop(state);
        self.changed();
        ended.into_iter().find(|t| t.claims.task_id == task_id)
    }

    /// Ends every live task for `reason` (the node was evicted).
    pub fn end_all(&self, reason: TaskEndReason) {
        let mut state = self.lock();
        let all: Vec<(String, TaskEndReason)> =
            state.live.keys().map(|id| (id.clone(), reason)).collect();
        let ended = self.end_locked(&mut state, &all, "");
        self.publish(&state);
        drop(state);
        if !ended.is_empty() {
            self.changed();
        }
    }

    /// The tasks `caller` may manage: started by its user, or run by it or by a task it runs
    /// in; all of them for root. Live ones first, then (with `include_ended`) the latest ended.
    pub fn list_for(&self, caller: &CallerFacts, include_ended: bool) -> Vec<TaskInfo> {
        let state = self.lock();
        let mut out: Vec<TaskInfo> = state
            .live
            .values()
            .filter(|l| may_manage(&state, caller, &l.info))
            .map(|l| l.info.clone())
            .collect();
        out.sort_by_key(|t| t.started_ms);
        if include_ended {
            out.extend(
                state
                    .ended
                    .iter()
                    .filter(|t| caller.uid == 0 || t.starter_uid == caller.uid)
                    .cloned(),
            );
        }
        out
    }

    /// Every live task, and with `include_ended` the latest ended ones (for the operator).
    pub fn list_all(&self, include_ended: bool) -> Vec<TaskInfo> {
        let mut out = self.live();
        if include_ended {
            out.extend(self.lock().ended.iter().cloned());
        }
        out
    }

    /// Every live task.
    pub fn live(&self) -> Vec<TaskInfo> {
        let state = self.lock();
        let mut out: Vec<TaskInfo> = state.live.values().map(|l| l.info.clone()).collect();
        out.sort_by_key(|t| t.started_ms);
        out
    }

    /// Installs a new entry set from the source: tasks whose entry is gone or no longer permits
    /// them (removed, made standing, changed in who may hold it, or the delegation withdrawn)
    /// end with `entry_changed`; the others follow their entry's new version.
    pub fn set_base(&self, base: Arc<EntrySet>) {
        let mut state = self.lock();
        state.base = base.clone();
        let mut ending = Vec::new();
        for live in state.live.values() {
            let now_entry = base.get(&live.info.claims.entry_id);
            let permitted = now_entry.is_some_and(|e| {
                e.activation == Activation::Task && !e.revokes_holders_of(&live.entry)
            });
            let delegated = match live.info.ancestors().last() {
                None => true,
                Some(parent) => state.live.get(parent).is_none_or(|p| {
                    base.get(&p.info.claims.entry_id)
                        .is_some_and(|pe| pe.delegates_to.contains(&live.info.claims.entry_id))
                }),
            };
            if !permitted || !delegated {
                ending.push((
                    live.info.claims.task_id.clone(),
                    TaskEndReason::EntryChanged,
                ));
            }
        }
        let detail = "its entry no longer permits it";
        let ended = self.end_locked(&mut state, &ending, detail);
        let rederive: Vec<(String, Arc<RegistrationEntry>)> = state
            .live
            .iter()
            .filter_map(|(id, live)| {
                base.get(&live.info.claims.entry_id)
                    .filter(|e| e.as_ref() != live.entry.as_ref())
                    .map(|e| (id.clone(), e.clone()))
            })
            .collect();
        for (id, entry) in rederive {
            if let Some(live) = state.live.get_mut(&id)
                && let Some(derived) = derive_entry(&entry, &live.info)
            {
                live.derived = derived;
                live.entry = entry;
            }
        }
        self.publish(&state);
        drop(state);
        if !ended.is_empty() {
            self.changed();
        }
    }

    /// Ends expired, idle and exited tasks; returns when to look again.
    pub fn sweep(&self, now: SystemTime) -> Duration {
        let mut ending = Vec::new();
        let mut next = MAX_SLEEP;
        {
            let mut state = self.lock();
            state.closed.retain(|_, closed| is_alive(&closed.pidfd));
            let now_unix = unix_seconds(now);
            for live in state.live.values() {
                let id = &live.info.claims.task_id;
                if live.info.deadline <= now_unix {
                    ending.push((id.clone(), TaskEndReason::Expired));
                } else if !is_alive(&live.pidfd) {
                    ending.push((id.clone(), TaskEndReason::ProcessExited));
                } else if self.cache.in_demand(&live.derived.id) {
                    continue;
                } else if live.last_used.elapsed() >= live.info.idle_timeout {
                    ending.push((id.clone(), TaskEndReason::Idle));
                } else {
                    let idle_in = live.info.idle_timeout - live.last_used.elapsed();
                    let due_in = Duration::from_secs((live.info.deadline - now_unix).max(0) as u64);
                    next = next.min(idle_in).min(due_in);
                }
            }
        }
        for (id, reason) in ending {
            self.end(&id, reason, "");
        }
        next
    }

    /// Ends tasks whose process exits, whose deadline passes or which go idle, and follows the
    /// source's entry changes, until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        mut source: watch::Receiver<Arc<EntrySet>>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let Some(mut exits) = self
            .exits_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let saver = tokio::spawn(self.clone().run_saver());
        self.set_base(source.borrow_and_update().clone());
        loop {
            let next = self.sweep(SystemTime::now());
            tokio::select! {
                _ = &mut shutdown => break,
                changed = source.changed() => {
                    if changed.is_err() { break; }
                    let base = source.borrow_and_update().clone();
                    self.set_base(base);
                }
                Some(task_id) = exits.recv() => {
                    self.end(&task_id, TaskEndReason::ProcessExited, "");
                }
                _ = tokio::time::sleep(next) => {}
                _ = self.wake.notified() => {}
            }
        }
        saver.abort();
        let registry = self.clone();
        let _ = tokio::task::spawn_blocking(move || registry.save()).await;
    }

    /// Writes the live tasks to disk shortly after each change and each rotation (which may
    /// have minted a serial a restart must still be able to revoke).
    async fn run_saver(self: Arc<Self>) {
        let mut changes = self.cache.subscribe();
        let mut rotations = self.cache.rotations();
        loop {
            tokio::select! {
                _ = self.dirty.notified() => {}
                changed = changes.changed() => {
                    if changed.is_err() { return; }
                    if self.lock().live.is_empty() && !self.path.exists() {
                        continue;
                    }
                }
                changed = rotations.changed() => {
                    if changed.is_err() { return; }
                    if self.lock().live.is_empty() && !self.path.exists() {
                        continue;
                    }
                }
            }
            // Coalesce a burst of changes into one write.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let registry = self.clone();
            let _ = tokio::task::spawn_blocking(move || registry.save()).await;
        }
    }

    fn save(&self) {
        let saved = {
            let state = self.lock();
            let tasks = state
                .live
                .values()
                .map(|live| {
                    let mut serials = self.cache.svids_of(&live.derived.id);
                    serials.extend(live.earlier_serials.iter().cloned());
                    SavedTask::of(
                        &live.info,
                        live.boundary_ticks,
                        &serials,
                        live.started_by.as_ref(),
                    )
                })
                .collect();
            let closed = state
                .closed
                .iter()
                .map(|(root, closed)| saved::SavedClosed {
                    task_id: closed.task_id.clone(),
                    root: *root,
                    boundary_ticks: closed.boundary_ticks,
                })
                .collect();
            saved::Saved { tasks, closed }
        };
        if let Err(e) = saved::write(&self.path, saved) {
            tracing::error!(file = %self.path.display(), error = %e, "cannot save the live tasks; a restart would forget them and end them unrevoked");
        }
    }

    /// Restores saved tasks: those whose process still runs go on; the others end (their
    /// SVIDs from before the restart revoked by serial).
    fn restore(&self) {
        let saved = match saved::read(&self.path) {
            Ok(saved) => saved,
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "cannot read the saved tasks; none restored");
                return;
            }
        };
        let now = unix_seconds(SystemTime::now());
        let mut state = self.lock();
        for closed in saved.closed {
            close_if_running(
                &mut state,
                closed.task_id,
                closed.root,
                closed.boundary_ticks,
            );
        }
        for task in saved.tasks {
            let starter = task.starter();
            let (info, boundary_ticks, serials) = task.into_parts();
            let entry = state.base.get(&info.claims.entry_id).cloned();
            let outcome = match (&entry, pin(info.root.pid, Some(info.root))) {
                _ if info.deadline <= now => Err(TaskEndReason::Expired),
                (_, Err(_)) => Err(TaskEndReason::ProcessExited),
                (None, _) => Err(TaskEndReason::EntryChanged),
                (Some(e), _) if e.activation != Activation::Task => {
                    Err(TaskEndReason::EntryChanged)
                }
                (Some(e), Ok(target)) => Ok((e.clone(), target)),
            };
            match outcome {
                Ok((entry, target)) => {
                    let id = info.claims.task_id.clone();
                    let Some(mut live) = self.make_live(
                        info.clone(),
                        entry,
                        boundary_ticks,
                        target.pidfd,
                        serials.clone(),
                    ) else {
                        tracing::warn!(task = %id, "saved task has a malformed SPIFFE ID; ended");
                        self.finish(&info, TaskEndReason::EntryChanged, "", &serials);
                        remember(&mut state, info, TaskEndReason::EntryChanged);
                        continue;
                    };
                    match starter {
                        Ok(Some(starter)) => live.started_by = Some(starter),
                        Ok(None) => {
                            tracing::warn!(task = %id, "saved task does not say who started it (written by an earlier version); a policy change is not checked against it")
                        }
                        Err(e) => {
                            tracing::warn!(task = %id, error = %e, "saved task's starter is unreadable; a policy change is not checked against it")
                        }
                    }
                    tracing::info!(task = %id, pid = live.info.root.pid, "task restored");
                    state.roots.insert(live.info.root, id.clone());
                    state.live.insert(id, live);
                }
                Err(reason) => {
                    tracing::info!(task = %info.claims.task_id, reason = ?reason, "saved task ended while the agent was down");
                    close_if_running(
                        &mut state,
                        info.claims.task_id.clone(),
                        info.root,
                        boundary_ticks,
                    );
                    self.finish(&info, reason, "", &serials);
                    remember(&mut state, info, reason);
                }
            }
        }
        self.publish(&state);
        drop(state);
        self.changed();
    }

    fn make_live(
        &self,
        info: TaskInfo,
        entry: Arc<RegistrationEntry>,
        boundary_ticks: u64,
        pidfd: OwnedFd,
        earlier_serials: Vec<(String, SystemTime)>,
    ) -> Option<Live> {
        let derived = derive_entry(&entry, &info)?;
        let pidfd = Arc::new(pidfd);
        let watcher = self.watch_exit(&info.claims.task_id, &pidfd);
        Some(Live {
            derived,
            entry,
            info,
            boundary_ticks,
            pidfd,
            watcher,
            last_used: Instant::now(),
            earlier_serials,
            started_by: None,
        })
    }

    /// The policy's word on starting `request` under `entry` for `caller`, inside
    /// `parent` (a delegation) or not.
    fn policy_verdict(
        &self,
        caller: &CallerFacts,
        entry: &RegistrationEntry,
        parent: Option<&TaskClaims>,
        request: &StartRequest,
    ) -> Verdict {
        let (action, depth) = match parent {
            Some(parent) => (Action::Delegate, parent.chain.len() as u32),
            None => (Action::StartTask, 0),
        };
        self.gate.decide(
            action,
            caller,
            entry,
            Asked {
                task: parent,
                ttl: request.ttl,
                purpose: Some(&request.purpose),
                depth,
            },
        )
    }

    /// Ends the tasks the policy in force no longer permits (reason `policy_changed`), each
    /// checked again as it was started: the starter's facts, the entry, the parent.
    pub fn recheck_policy(&self) {
        let refused: Vec<String> = {
            let state = self.lock();
            state
                .live
                .values()
                .filter_map(|live| {
                    let (caller, parent) = live.started_by.as_ref()?;
                    let request = StartRequest {
                        entry: live.entry.id.clone(),
                        purpose: live.info.claims.purpose.clone(),
                        ttl: None,
                        pid: None,
                        idle_timeout: None,
                    };
                    let verdict =
                        self.policy_verdict(caller, &live.entry, parent.as_ref(), &request);
                    matches!(verdict, Verdict::Denied(_)).then(|| live.info.claims.task_id.clone())
                })
                .collect()
        };
        for task_id in refused {
            self.end(
                &task_id,
                TaskEndReason::PolicyChanged,
                "the policy no longer permits it",
            );
        }
    }

    /// Sends `task_id` on the exit channel when the process behind `pidfd` exits.
    fn watch_exit(&self, task_id: &str, pidfd: &OwnedFd) -> Option<tokio::task::AbortHandle> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let fd = pidfd.try_clone().ok()?;
        let exits = self.exits.clone();
        let task_id = task_id.to_owned();
        let handle = runtime.spawn(async move {
            process::exited(fd).await;
            let _ = exits.send(task_id);
        });
        Some(handle.abort_handle())
    }

    /// Takes the given tasks and all their live descendants out, revokes their SVIDs and
    /// records their end; the caller publishes the entry set afterwards.
    fn end_locked(
        &self,
        state: &mut State,
        tasks: &[(String, TaskEndReason)],
        detail: &str,
    ) -> Vec<TaskInfo> {
        let mut order: Vec<(String, TaskEndReason)> = Vec::new();
        for (id, reason) in tasks {
            if state.live.contains_key(id) && !order.iter().any(|(o, _)| o == id) {
                order.push((id.clone(), *reason));
            }
        }
        // Descendants: any live task whose chain passes through one being ended.
        let mut i = 0;
        while i < order.len() {
            let parent = order[i].0.clone();
            let mut children: Vec<&Live> = state
                .live
                .values()
                .filter(|l| l.info.ancestors().any(|a| a == parent))
                .filter(|l| !order.iter().any(|(o, _)| *o == l.info.claims.task_id))
                .collect();
            children.sort_by_key(|l| l.info.claims.chain.len());
            for child in children {
                order.push((
                    child.info.claims.task_id.clone(),
                    TaskEndReason::ParentEnded,
                ));
            }
            i += 1;
        }
        let mut ended = Vec::with_capacity(order.len());
        for (id, reason) in order {
            let Some(live) = state.live.remove(&id) else {
                continue;
            };
            state.roots.remove(&live.info.root);
            if let Some(watcher) = &live.watcher {
                watcher.abort();
            }
            if is_alive(&live.pidfd) {
                state.closed.insert(
                    live.info.root,
                    Closed {
                        task_id: id.clone(),
                        boundary_ticks: live.boundary_ticks,
                        pidfd: live.pidfd.clone(),
                    },
                );
            }
            let revoked = self.cache.revoke_entry(
                &live.derived.id,
                RevocationReason::TaskEnded,
                crate::events::model::task_end_reason_name(reason),
            );
            self.finish(&live.info, reason, detail, &live.earlier_serials);
            tracing::info!(task = %id, reason = crate::events::model::task_end_reason_name(reason), revoked = revoked.len(), "task ended");
            let info = remember(state, live.info, reason);
            ended.push(info);
        }
        ended
    }

    /// Revokes serials from before a restart and records the end.
    fn finish(
        &self,
        info: &TaskInfo,
        reason: TaskEndReason,
        detail: &str,
        earlier_serials: &[(String, SystemTime)],
    ) {
        let now = SystemTime::now();
        for (serial, not_after) in earlier_serials.iter().filter(|(_, at)| *at > now) {
            self.cache.revocations().revoke_anywhere(
                serial,
                *not_after,
                RevocationReason::TaskEnded,
            );
        }
        self.cache
            .recorder()
            .task_ended(&info.event(), reason, detail);
    }

    /// Publishes the source's entries plus one derived entry per live task to the cache. Done
    /// under the registry's lock, so that two changes never publish out of order.
    fn publish(&self, state: &State) {
        let mut derived: Vec<&Live> = state.live.values().collect();
        derived.sort_by_key(|l| l.info.started_ms);
        let entries: Vec<Arc<RegistrationEntry>> = state
            .base
            .entries
            .iter()
            .cloned()
            .chain(derived.into_iter().map(|l| l.derived.clone()))
            .collect();
        let oldest = state.roots.keys().map(|stamp| stamp.start_ticks).min();
        self.oldest_root
            .store(oldest.unwrap_or(u64::MAX), Ordering::Release);
        self.cache
            .set_entries(Arc::new(EntrySet::from_shared(entries)));
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
        self.wake.notify_one();
        self.dirty.notify_one();
    }

    /// The process a task is for, pinned, and the tick from which its descendants count.
    fn target(
        &self,
        caller: &CallerFacts,
        pid: Option<i32>,
    ) -> Result<(PinnedProcess, u64), TaskError> {
        let own = caller.lineage.first().copied().ok_or(TaskError::Target {
            pid: caller.pid,
            reason: "the caller's process could not be pinned".into(),
        })?;
        match pid {
            None => {
                let target = pin(caller.pid, Some(own))?;
                Ok((target, boot_ticks_now()))
            }
            Some(pid) => {
                let target = pin(pid, None)?;
                let parent = caller.lineage.get(1).map(|p| p.pid);
                if target.parent != caller.pid && Some(target.parent) != parent {
                    return Err(TaskError::Target {
                        pid,
                        reason: format!(
                            "is a child of process {}, not of the caller ({}) or of the caller's parent; \
                             a task is started for the caller, a process it started, or one its parent started",
                            target.parent, caller.pid
                        ),
                    });
                }
                if target.stamp.start_ticks < own.start_ticks && target.parent == caller.pid {
                    return Err(TaskError::Target {
                        pid,
                        reason: "started before the caller".into(),
                    });
                }
                if caller.uid != 0 && target.uid != caller.uid {
                    return Err(TaskError::Target {
                        pid,
                        reason: format!(
                            "runs as uid {}, not as the caller's uid {}",
                            target.uid, caller.uid
                        ),
                    });
                }
                // Only what it starts from now on is the task's, not what it started before.
                Ok((target, boot_ticks_now()))
            }
        }
    }

    fn deadline(
        &self,
        now: SystemTime,
        asked: Option<Duration>,
        parent_deadline: Option<i64>,
        entry_expiry: Option<SystemTime>,
    ) -> Result<SystemTime, TaskError> {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        if let Some(asked) = asked {
            if asked > self.limits.max_ttl {
                return Err(TaskError::TtlTooLong {
                    asked: show(asked),
                    allowed: show(self.limits.max_ttl),
                    why: "tasks.max_ttl".into(),
                });
            }
            if asked < Duration::from_secs(1) {
                return Err(TaskError::Field(FieldError::new(
                    "ttl",
                    show(asked),
                    "must be at least 1s",
                )));
            }
        }
        let mut deadline = now + asked.unwrap_or(self.limits.default_ttl);
        if let Some(parent) = parent_deadline {
            let parent_at = SystemTime::UNIX_EPOCH + Duration::from_secs(parent.max(0) as u64);
            if deadline > parent_at {
                if let Some(asked) = asked {
                    return Err(TaskError::TtlTooLong {
                        asked: show(asked),
                        allowed: show(parent_at.duration_since(now).unwrap_or_default()),
                        why: "the parent task's remaining lifetime".into(),
                    });
                }
                deadline = parent_at;
            }
        }
        if let Some(expiry) = entry_expiry {
            deadline = deadline.min(expiry);
        }
        Ok(deadline)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The live task a caller with `lineage` runs in (see [`TaskRegistry::task_of`]); `None` also
/// when the innermost task it ran in has ended (see [`Closed`]).
fn member_task<'a>(state: &'a State, lineage: &[ProcessStamp]) -> Option<&'a str> {
    // Processes between the caller and a task's process must have started since the task
    // began; one from before is not the task's (it may be an outer task's).
    let started_since =
        |depth: usize, boundary: u64| lineage[..depth].iter().all(|p| p.start_ticks >= boundary);
    for (depth, stamp) in lineage.iter().enumerate() {
        if let Some(live) = state.roots.get(stamp).and_then(|id| state.live.get(id)) {
            if started_since(depth, live.boundary_ticks) && is_alive(&live.pidfd) {
                return Some(&live.info.claims.task_id);
            }
        } else if let Some(closed) = state.closed.get(stamp)
            && started_since(depth, closed.boundary_ticks)
            && is_alive(&closed.pidfd)
        {
            return None;
        }
    }
    None
}

/// Records ended task `task_id` as closed if its very process (same pid, same start) still
/// runs.
fn close_if_running(state: &mut State, task_id: String, root: ProcessStamp, boundary_ticks: u64) {
    if let Ok(process) = pin(root.pid, Some(root)) {
        state.closed.insert(
            root,
            Closed {
                task_id,
                boundary_ticks,
                pidfd: Arc::new(process.pidfd),
            },
        );
    }
}

/// Whether `caller` may end or list `task`: root, the starter's user, or a process of the task
/// or of a task it was delegated from.
fn may_manage(state: &State, caller: &CallerFacts, task: &TaskInfo) -> bool {
    if caller.uid == 0 || caller.uid == task.starter_uid {
        return true;
    }
    member_task(state, &caller.lineage)
        .is_some_and(|own| own == task.claims.task_id || task.ancestors().any(|a| a == own))
}

fn remember(state: &mut State, mut info: TaskInfo, reason: TaskEndReason) -> TaskInfo {
    info.ended = Some((crate::events::model::now_ms(), reason));
    if state.ended.len() >= ENDED_KEPT {
        state.ended.pop_front();
    }
    state.ended.push_back(info.clone());
    info
}

fn find_entry(base: &EntrySet, name: &str) -> Result<Arc<RegistrationEntry>, TaskError> {
    base.get(name)
        .or_else(|| base.entries.iter().find(|e| e.spiffe_id.as_str() == name))
        .filter(|e| e.task.is_none())
        .cloned()
        .ok_or_else(|| TaskError::UnknownEntry(name.to_owned()))
}

fn check_purpose(purpose: &str) -> Result<(), TaskError> {
    if purpose.trim().is_empty() {
        return Err(FieldError::new(
            "purpose",
            purpose,
            "is required: say in a sentence what the task is for",
        )
        .into());
    }
    crate::entry::check_free_text("purpose", purpose, MAX_PURPOSE_LEN)?;
    Ok(())
}

/// The SPIFFE ID of task `task_id` of an entry granting `entry_id`.
fn task_spiffe_id(entry_id: &SpiffeId, task_id: &str) -> Result<SpiffeId, TaskError> {
    let text = format!("{entry_id}/task/{task_id}");
    SpiffeId::parse_workload(&text)
        .map_err(|e| FieldError::new("spiffe_id", &text, format!("not a SPIFFE ID: {e}")).into())
}

/// The entry the cache serves for one task of `entry`; `None` when the task's SPIFFE ID does
/// not parse (only a damaged saved task can have such a one).
fn derive_entry(entry: &RegistrationEntry, info: &TaskInfo) -> Option<Arc<RegistrationEntry>> {
    let deadline = SystemTime::UNIX_EPOCH + Duration::from_secs(info.deadline.max(0) as u64);
    Some(Arc::new(RegistrationEntry {
        id: task_entry_id(&info.claims.task_id),
        spiffe_id: SpiffeId::parse_workload(&info.spiffe_id).ok()?,
        selectors: Default::default(),
        x509_ttl: entry.x509_ttl,
        jwt_ttl: entry.jwt_ttl,
        owner: entry.owner.clone(),
        purpose: info.claims.purpose.clone(),
        expires_at: Some(entry.expires_at.map_or(deadline, |e| e.min(deadline))),
        hint: entry.hint.clone(),
        dns_names: entry.dns_names.clone(),
        activation: Activation::Task,
        delegates_to: entry.delegates_to.clone(),
        labels: entry.labels.clone(),
        task: Some(Arc::new(info.claims.clone())),
    }))
}
