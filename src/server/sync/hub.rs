//! The snapshot hub: one task per replica follows the datastore's change log (written by the
//! datastore itself, in commit order, for this replica's writes and every other's), applies
//! each batch of changes to a copy of the snapshot, publishes it, and wakes the streams of the
//! nodes the batch concerns. A batch costs what it touched: the changed entries and nodes are
//! read by id, a section (bundle, CRLs, orders, tasks, policy, JWT keys and revocations) is
//! read again only when the batch changed it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::{Concerned, Logged, Snapshot, Touched, entry_to_proto, node_view, policy_to_proto};
use crate::store::{CHANGE_LOG_KEEP, ChangeKind, ChangeRecord, Datastore, StoreError, unix_now};

/// How long replaced entry versions are remembered for the issuance check.
pub const HISTORY_KEEP: Duration = Duration::from_secs(24 * 3600);

/// At most this many change log records are read and applied at once.
const BATCH: usize = 10_000;

/// At most this many records are kept in the in-memory log (and read from the datastore's at
/// start): a node behind the oldest gets its full state.
pub const LOG_CAP: usize = 200_000;

/// How often replaced entry versions past [`HISTORY_KEEP`] are looked for and dropped.
const HISTORY_SWEEP: Duration = Duration::from_secs(3600);

/// The notifiers of the open streams by node id, each with the stream's number.
type StreamsByNode = HashMap<String, Vec<(u64, Arc<Notify>)>>;

/// The sync streams open on this replica, by node, each woken when a change concerns its node.
#[derive(Debug, Default)]
pub struct Wakers {
    /// The streams' notifiers.
    streams: Mutex<StreamsByNode>,
    /// The next stream's number.
    next: AtomicU64,
}

/// A stream's registration: woken through `notify`; unregistered when dropped.
pub struct Registration {
    wakers: Arc<Wakers>,
    node_id: String,
    id: u64,
    /// Holds a wake-up until the stream waits for it, so none is lost between two waits.
    pub notify: Arc<Notify>,
}

impl Wakers {
    /// Registers a stream of `node_id`.
    pub fn register(self: &Arc<Self>, node_id: &str) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.lock()
            .entry(node_id.to_owned())
            .or_default()
            .push((id, notify.clone()));
        Registration {
            wakers: self.clone(),
            node_id: node_id.to_owned(),
            id,
            notify,
        }
    }

    /// Wakes the streams of the concerned nodes, or every stream.
    pub fn wake(&self, concerned: &Concerned) {
        let streams = self.lock();
        if concerned.all {
            streams.values().flatten().for_each(|(_, n)| n.notify_one());
        } else {
            concerned
                .nodes
                .iter()
                .filter_map(|node| streams.get(node))
                .flatten()
                .for_each(|(_, n)| n.notify_one());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StreamsByNode> {
        // The map holds no invariant a panic could break half-way.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut streams = self.wakers.lock();
        if let Some(list) = streams.get_mut(&self.node_id) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                streams.remove(&self.node_id);
            }
        }
    }
}

/// Reads a whole snapshot from the datastore, at the change log's latest revision, with the
/// log's recent records.
pub async fn load_snapshot(store: &dyn Datastore) -> Result<Snapshot, StoreError> {
    // Read first: whatever is read after it is at least this new, and the changes after it
    // are applied again (applying one twice changes nothing).
    let revision = store.last_revision().await?;
    let mut snapshot = Snapshot {
        revision,
        log_floor: revision,
        ..Snapshot::default()
    };
    for entry in store.list_entries().await? {
        snapshot.insert_entry(Arc::new(entry_to_proto(&entry)));
    }
    for node in store.list_nodes().await? {
        snapshot.insert_node(&node.id, node_view(&node));
    }
    reload_standings(store, &mut snapshot).await?;
    for section in Section::ALL {
        reload(store, &mut snapshot, section).await?;
    }
    let recent = store.recent_changes(LOG_CAP).await?;
    if let Some(first) = recent.first() {
        snapshot.log_floor = snapshot.log_floor.min(first.revision - 1);
    }
    for record in recent.iter().filter(|r| r.revision <= revision) {
        log(&mut snapshot, record);
    }
    Ok(snapshot)
}

/// A part of the snapshot read again as a whole when it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Section {
    Bundle,
    JwtKeys,
    Crls,
    Orders,
    TaskEnds,
    Policy,
    JwtRevocations,
}

impl Section {
    /// The section a change of `kind` is in; none for entries, standings, nodes and kinds
    /// this version does not know.
    fn of(kind: &ChangeKind) -> Option<Section> {
        match kind {
            ChangeKind::Bundle => Some(Section::Bundle),
            ChangeKind::JwtKey => Some(Section::JwtKeys),
            ChangeKind::Crl => Some(Section::Crls),
            ChangeKind::Revocation => Some(Section::Orders),
            ChangeKind::Task => Some(Section::TaskEnds),
            ChangeKind::Policy => Some(Section::Policy),
            ChangeKind::JwtRevocation => Some(Section::JwtRevocations),
            ChangeKind::Entry
            | ChangeKind::Standing
            | ChangeKind::Node
            | ChangeKind::Unknown(_) => None,
        }
    }

    /// Whether each node gets its own part of the section (keyed by node), not all of it.
    fn per_node(self) -> bool {
        matches!(self, Section::Orders | Section::TaskEnds)
    }

    const ALL: [Section; 7] = [
        Section::Bundle,
        Section::JwtKeys,
        Section::Crls,
        Section::Orders,
        Section::TaskEnds,
        Section::Policy,
        Section::JwtRevocations,
    ];
}

async fn reload(
    store: &dyn Datastore,
    snapshot: &mut Snapshot,
    section: Section,
) -> Result<(), StoreError> {
    let now = unix_now();
    match section {
        Section::Bundle => {
            snapshot.bundle = Arc::new(
                store
                    .bundle(now)
                    .await?
                    .into_iter()
                    .map(|r| r.der)
                    .collect(),
            );
        }
        Section::JwtKeys => {
            snapshot.jwt_keys = Arc::new(
                store
                    .jwt_keys(now)
                    .await?
                    .into_iter()
                    .map(|k| k.jwk)
                    .collect(),
            );
        }
        Section::Crls => {
            snapshot.crls = Arc::new(super::super::revocation::distributed(
                &store.crls(now).await?,
                now,
            ));
        }
        Section::Orders => {
            snapshot.orders = Arc::new(super::super::revocation::orders_by_node(
                &store.revocations(now).await?,
            ));
        }
        Section::TaskEnds => {
            snapshot.task_ends = Arc::new(super::super::tasks::orders_by_node(
                &store.tasks(true).await?,
            ));
        }
        Section::Policy => {
            snapshot.policy = Arc::new(
                store
                    .policy()
                    .await?
                    .as_ref()
                    .map(policy_to_proto)
                    .unwrap_or_default(),
            );
        }
        Section::JwtRevocations => {
            let revoked =
                super::super::jwt::revocations_message(&store.jwt_revocations(now).await?);
            // Unchanged, the list keeps its allocation: streams tell a change by the pointer.
            if *snapshot.jwt_revocations != revoked {
                snapshot.jwt_revocations = Arc::new(revoked);
            }
        }
    }
    Ok(())
}

async fn reload_standings(
    store: &dyn Datastore,
    snapshot: &mut Snapshot,
) -> Result<(), StoreError> {
    snapshot.dormant = store
        .entry_standings()
        .await?
        .into_iter()
        .filter(|s| s.dormant_since_ms.is_some())
        .map(|s| s.entry_id)
        .collect();
    Ok(())
}

/// Adds a datastore record to the in-memory log when streams act on it, and drops the oldest
/// past [`LOG_CAP`] or [`crate::store::CHANGE_LOG_KEEP`].
fn log(snapshot: &mut Snapshot, record: &ChangeRecord) {
    let touched = match record.kind {
        ChangeKind::Entry | ChangeKind::Standing => Touched::Entry,
        ChangeKind::Node => Touched::Node,
        _ => return,
    };
    snapshot.log.insert(
        record.revision,
        Logged {
            touched,
            key: record.key.clone(),
            time_ms: record.time_ms,
        },
    );
    let horizon = record.time_ms - CHANGE_LOG_KEEP.as_millis() as i64;
    while let Some((revision, oldest)) = snapshot.log.get_min().map(|(r, l)| (*r, l.time_ms)) {
        if snapshot.log.len() <= LOG_CAP && oldest >= horizon {
            break;
        }
        snapshot.log.remove(&revision);
        snapshot.log_floor = snapshot.log_floor.max(revision);
    }
}

/// Why a batch could not be applied.
enum Apply {
    /// A kind of change this version does not know: read everything again.
    Unknown(String),
    /// The datastore failed; the batch is tried again.
    Store(StoreError),
}

impl From<StoreError> for Apply {
    fn from(e: StoreError) -> Self {
        Apply::Store(e)
    }
}

/// `current` with `batch` applied, and the nodes it concerns.
async fn apply(
    store: &dyn Datastore,
    current: &Snapshot,
    batch: &[ChangeRecord],
) -> Result<(Snapshot, Concerned), Apply> {
    let mut next = current.clone();
    let mut concerned = Concerned::default();
    let mut entry_ids = BTreeSet::new();
    let mut node_ids = BTreeSet::new();
    let mut sections = HashSet::new();
    let mut standings = false;
    for record in batch {
        match &record.kind {
            ChangeKind::Entry => {
                entry_ids.insert(record.key.clone());
            }
            ChangeKind::Standing => {
                standings = true;
                entry_ids.insert(record.key.clone());
            }
            ChangeKind::Node => {
                node_ids.insert(record.key.clone());
            }
            ChangeKind::Unknown(kind) => return Err(Apply::Unknown(kind.clone())),
            kind => {
                let Some(section) = Section::of(kind) else {
                    continue;
                };
                sections.insert(section);
                // Orders and task ends name the node they concern; the rest go to every node.
                if section.per_node() && !record.key.is_empty() {
                    concerned.nodes.insert(record.key.clone());
                } else {
                    concerned.all = true;
                }
            }
        }
    }
    if standings {
        reload_standings(store, &mut next).await?;
    }
    if !entry_ids.is_empty() {
        let ids: Vec<String> = entry_ids.into_iter().collect();
        let mut fetched: HashMap<String, _> = store
            .entries_by_id(&ids)
            .await?
            .into_iter()
            .map(|e| (e.id.clone(), Arc::new(entry_to_proto(&e))))
            .collect();
        let now_ms = crate::events::model::now_ms();
        for id in &ids {
            let old = next.entries.get(id).cloned();
            let new = fetched.remove(id);
            for version in old.iter().chain(new.iter()) {
                next.add_concerned(&version.node_selectors, &mut concerned);
            }
            match (old, new) {
                (Some(old), Some(new)) if super::same_entry(&old, &new) => {}
                (old, new) => {
                    if let Some(old) = old {
                        remember(&mut next, old, now_ms);
                    }
                    match new {
                        Some(new) => next.insert_entry(new),
                        None => {
                            next.remove_entry(id);
                        }
                    }
                }
            }
        }
    }
    if !node_ids.is_empty() {
        let ids: Vec<String> = node_ids.into_iter().collect();
        let mut fetched: HashMap<String, _> = store
            .nodes_by_id(&ids)
            .await?
            .into_iter()
            .map(|n| (n.id.clone(), node_view(&n)))
            .collect();
        for id in ids {
            match fetched.remove(&id) {
                Some(view) => next.insert_node(&id, view),
                None => {
                    next.remove_node(&id);
                }
            }
            concerned.nodes.insert(id);
        }
    }
    for section in sections {
        reload(store, &mut next, section).await?;
    }
    for record in batch {
        log(&mut next, record);
    }
    if let Some(last) = batch.last() {
        next.revision = last.revision;
    }
    Ok((next, concerned))
}

/// Keeps a replaced version of an entry for [`HISTORY_KEEP`].
fn remember(snapshot: &mut Snapshot, old: Arc<super::Entry>, now_ms: i64) {
    let horizon = now_ms - HISTORY_KEEP.as_millis() as i64;
    let mut versions: Vec<_> = snapshot
        .history
        .get(&old.id)
        .map(|v| v.iter().filter(|(at, _)| *at >= horizon).cloned().collect())
        .unwrap_or_default();
    let id = old.id.clone();
    versions.push((now_ms, old));
    snapshot.history.insert(id, Arc::new(versions));
}

/// Drops replaced versions past [`HISTORY_KEEP`] from every entry's history.
fn forget_old_history(snapshot: &mut Snapshot, now_ms: i64) {
    let horizon = now_ms - HISTORY_KEEP.as_millis() as i64;
    let stale: Vec<String> = snapshot
        .history
        .iter()
        .filter(|(_, versions)| versions.iter().any(|(at, _)| *at < horizon))
        .map(|(id, _)| id.clone())
        .collect();
    for id in stale {
        let kept: Vec<_> = snapshot.history[&id]
            .iter()
            .filter(|(at, _)| *at >= horizon)
            .cloned()
            .collect();
        if kept.is_empty() {
            snapshot.history.remove(&id);
        } else {
            snapshot.history.insert(id, Arc::new(kept));
        }
    }
}

/// Follows the change log and publishes a snapshot after every batch of changes, until `stop`.
/// A batch that cannot be read or applied keeps the previous snapshot and is tried again every
/// second until it succeeds.
pub async fn run_hub(
    store: Arc<dyn Datastore>,
    publish: watch::Sender<Arc<Snapshot>>,
    wakers: Arc<Wakers>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut changes = store.changes();
    let mut swept = tokio::time::Instant::now();
    loop {
        changes.borrow_and_update();
        loop {
            let current = publish.borrow().clone();
            let outcome = match store.changes_after(current.revision, BATCH).await {
                Ok(batch) if batch.is_empty() => break,
                Ok(batch) => apply(store.as_ref(), &current, &batch)
                    .await
                    .map(|applied| (applied, batch.len() == BATCH)),
                Err(e) => Err(Apply::Store(e)),
            };
            match outcome {
                Ok(((mut next, concerned), more)) => {
                    if swept.elapsed() >= HISTORY_SWEEP {
                        forget_old_history(&mut next, crate::events::model::now_ms());
                        swept = tokio::time::Instant::now();
                    }
                    publish.send_replace(Arc::new(next));
                    wakers.wake(&concerned);
                    if !more {
                        break;
                    }
                }
                Err(Apply::Unknown(kind)) => {
                    tracing::warn!(%kind, "the change log holds a change this version does not know; reading everything again");
                    match load_snapshot(store.as_ref()).await {
                        Ok(mut fresh) => {
                            fresh.history = current.history.clone();
                            publish.send_replace(Arc::new(fresh));
                            wakers.wake(&Concerned {
                                all: true,
                                ..Concerned::default()
                            });
                            break;
                        }
                        Err(e) => {
                            if !retry_later(&e, &mut stop).await {
                                return;
                            }
                        }
                    }
                }
                Err(Apply::Store(e)) => {
                    if !retry_later(&e, &mut stop).await {
                        return;
                    }
                }
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// Waits a second after a failure; false when `stop` came first.
async fn retry_later(
    error: &StoreError,
    stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    tracing::warn!(%error, "cannot follow the datastore's change log; retrying in 1s");
    tokio::select! {
        _ = stop.as_mut() => false,
        _ = tokio::time::sleep(Duration::from_secs(1)) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{EntryRecord, NodeRecord, NodeStatus};

    fn entry(id: &str, node_selectors: &[&str]) -> EntryRecord {
        EntryRecord {
            id: id.into(),
            spiffe_id: format!("spiffe://example.org/{id}"),
            selectors: vec!["unix:uid:1000".into()],
            node_selectors: node_selectors.iter().map(|s| s.to_string()).collect(),
            x509_ttl_seconds: 3600,
            activation: "standing".into(),
            ..EntryRecord::default()
        }
    }

    fn node(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            attestation: "join_token".into(),
            selectors: vec![format!("node:id:{id}")],
            status: NodeStatus::Active,
            attested_at: 1,
            last_seen: 1,
            svid_serial: "01".into(),
            svid_not_after: i64::MAX / 2,
            ca_serial: "02".into(),
            ca_not_after: i64::MAX / 2,
        }
    }

    async fn woken(registration: &Registration) -> bool {
        tokio::time::timeout(Duration::from_millis(300), registration.notify.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn changes_reach_the_snapshot_and_wake_only_the_nodes_they_concern() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Datastore> =
            Arc::new(SqliteStore::open(&dir.path().join("tessera.db")).unwrap());
        store.attest_node(node("n1")).await.unwrap();
        store.attest_node(node("n2")).await.unwrap();
        let pinned = store
            .create_entry(entry("pinned", &["node:id:n1"]), 1)
            .await
            .unwrap();
        let initial = load_snapshot(store.as_ref()).await.unwrap();
        assert_eq!(initial.revision, store.last_revision().await.unwrap());
        assert_eq!(
            initial.log.len(),
            3,
            "the recent records are kept for catch-up"
        );
        let (publish, mut snapshots) = watch::channel(Arc::new(initial));
        let wakers = Arc::new(Wakers::default());
        let (n1, n2) = (wakers.register("n1"), wakers.register("n2"));
        let stop = crate::runtime::Shutdown::new();
        let hub = tokio::spawn(run_hub(
            store.clone(),
            publish,
            wakers.clone(),
            stop.signalled(),
        ));

        let mut changed = pinned.clone();
        changed.x509_ttl_seconds = 60;
        store.update_entry(changed, 2).await.unwrap();
        assert!(woken(&n1).await, "the entry is pinned to n1");
        assert!(!woken(&n2).await, "n2 is not concerned");
        snapshots.changed().await.unwrap();
        let snapshot = snapshots.borrow_and_update().clone();
        assert_eq!(snapshot.entry("pinned").unwrap().x509_ttl_seconds, 60);
        assert_eq!(snapshot.revision, store.last_revision().await.unwrap());
        assert_eq!(
            snapshot.history["pinned"][0].1.x509_ttl_seconds, 3600,
            "the replaced version is remembered"
        );

        // An entry every node may serve wakes every node; so does a new root.
        store.create_entry(entry("everyone", &[]), 3).await.unwrap();
        assert!(woken(&n1).await && woken(&n2).await);
        // A node's own record wakes that node only.
        store
            .set_node_status("n2", NodeStatus::Evicted)
            .await
            .unwrap();
        assert!(woken(&n2).await && !woken(&n1).await);
        let snapshot = snapshots.borrow_and_update().clone();
        assert_eq!(snapshot.node("n2").unwrap().status, NodeStatus::Evicted);
        assert!(snapshot.entitled("n1").contains_key("everyone"));

        // A deleted entry leaves the snapshot but stays in the history.
        store.delete_entry("pinned").await.unwrap();
        assert!(woken(&n1).await);
        let snapshot = snapshots.borrow_and_update().clone();
        assert!(snapshot.entry("pinned").is_none());
        assert!(snapshot.may_have_issued("n1", "pinned", "spiffe://example.org/pinned", "", 0));
        drop(n2);

        // A change this version does not know (a newer replica's): everything is read again,
        // and the streams are told.
        let db = rusqlite::Connection::open(dir.path().join("tessera.db")).unwrap();
        db.execute(
            "INSERT INTO changes (kind, key, time_ms) VALUES ('from_the_future', 'x', 0)",
            [],
        )
        .unwrap();
        store.create_entry(entry("later", &[]), 4).await.unwrap();
        assert!(woken(&n1).await);
        let mut snapshot = snapshots.borrow_and_update().clone();
        for _ in 0..20 {
            if snapshot.entry("later").is_some() {
                break;
            }
            snapshots.changed().await.unwrap();
            snapshot = snapshots.borrow_and_update().clone();
        }
        assert!(snapshot.entry("later").is_some());
        assert_eq!(snapshot.revision, store.last_revision().await.unwrap());
        stop.trigger();
        hub.await.unwrap();
    }

    #[test]
    fn the_log_forgets_what_is_past_its_keep_and_says_so() {
        let mut snapshot = Snapshot::default();
        let record = |revision: i64, time_ms: i64| ChangeRecord {
            revision,
            kind: ChangeKind::Entry,
            key: format!("e{revision}"),
            time_ms,
        };
        let keep = CHANGE_LOG_KEEP.as_millis() as i64;
        log(&mut snapshot, &record(1, 1_000));
        log(&mut snapshot, &record(2, 2_000));
        // Sections are not logged: streams compare them as a whole.
        log(
            &mut snapshot,
            &ChangeRecord {
                kind: ChangeKind::Crl,
                ..record(3, 2_500)
            },
        );
        assert_eq!(snapshot.log.keys().copied().collect::<Vec<_>>(), [1, 2]);
        // A record past the keep of the newest is dropped, and the floor says what is gone.
        log(&mut snapshot, &record(4, 1_500 + keep));
        assert_eq!(snapshot.log.keys().copied().collect::<Vec<_>>(), [2, 4]);
        assert_eq!(snapshot.log_floor, 1);
    }
}
