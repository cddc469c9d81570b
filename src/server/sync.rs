//! Live state fan-out: one task reloads entries, nodes and the bundle whenever the datastore
//! reports a change (from this replica or another), and publishes a [`Snapshot`]; each agent's
//! sync stream diffs the snapshots against what it last sent and pushes only the difference.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::proto::tessera::{
    Bundle, Entry, JwtRevocation, Policy, RevocationOrder, SyncUpdate, TaskEndOrder,
};
use crate::spiffe::TrustDomain;
use crate::store::{Datastore, EntryRecord, NodeRecord, NodeStatus, StoreError, unix_now};

/// What one node is, as far as sync cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Standing.
    pub status: NodeStatus,
    /// Node selectors, sorted.
    pub selectors: Vec<String>,
    /// Unix seconds of its last attestation.
    pub attested_at: i64,
}

/// Everything sync streams send from, at one instant.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every entry, by id.
    pub entries: HashMap<String, Arc<Entry>>,
    /// DER roots of the trust domain.
    pub bundle: Vec<Vec<u8>>,
    /// Every node, by id.
    pub nodes: HashMap<String, NodeView>,
    /// Versions of entries removed or changed in the last [`HISTORY_KEEP`], by entry id, with
    /// when they stopped being current (Unix ms): an issuance reported late (after an outage)
    /// is judged against what the node was entitled to then, not only now.
    pub history: Arc<EntryHistory>,
    /// The CRLs every agent is given (see [`super::revocation::distributed`]).
    pub crls: Vec<Vec<u8>>,
    /// The SVID revocations each node must sign into its CAs' CRLs, by node id.
    pub orders: HashMap<String, Vec<RevocationOrder>>,
    /// Entries dormant after their inactivity timeout: no node is sent them.
    pub dormant: std::collections::HashSet<String>,
    /// The tasks each node must end, by node id.
    pub task_ends: HashMap<String, Vec<TaskEndOrder>>,
    /// The authorisation policy (version 0, empty, before any was set).
    pub policy: Policy,
    /// The JWT-SVID signing keys of every replica, each a public JWK (JSON).
    pub jwt_keys: Vec<String>,
    /// Every revoked JWT-SVID not yet expired: sent to every node. The same allocation as the
    /// previous snapshot's while the list is unchanged.
    pub jwt_revocations: Arc<Vec<JwtRevocation>>,
}

/// Replaced versions of entries, by entry id, each with when it was replaced (Unix ms).
pub type EntryHistory = HashMap<String, Vec<(i64, Arc<Entry>)>>;

/// How long replaced entry versions are remembered for the issuance check.
pub const HISTORY_KEEP: Duration = Duration::from_secs(24 * 3600);

impl Snapshot {
    /// Whether node `node_id` may have issued `spiffe_id` for `entry_id`: the entry, now or in
    /// a version replaced since `since_ms`, grants that ID to nodes the node is one of.
    /// A task SVID (`task_id` not empty) is granted by a task entry as its SPIFFE ID with
    /// `/task/<task_id>` appended; a task entry grants nothing outside a task.
    pub fn may_have_issued(
        &self,
        node_id: &str,
        entry_id: &str,
        spiffe_id: &str,
        task_id: &str,
        since_ms: i64,
    ) -> bool {
        let Some(node) = self.nodes.get(node_id) else {
            return false;
        };
        let grants = |e: &Entry| {
            let is_task = e.activation == "task";
            let granted = if task_id.is_empty() {
                !is_task && e.spiffe_id == spiffe_id
            } else {
                is_task
                    && spiffe_id
                        .strip_prefix(e.spiffe_id.as_str())
                        .and_then(|rest| rest.strip_prefix("/task/"))
                        == Some(task_id)
            };
            granted && e.node_selectors.iter().all(|s| node.selectors.contains(s))
        };
        self.entries.get(entry_id).is_some_and(|e| grants(e))
            || self.history.get(entry_id).is_some_and(|versions| {
                versions
                    .iter()
                    .any(|(replaced_ms, e)| *replaced_ms >= since_ms && grants(e))
            })
    }

    /// Entries that node `node_id` may serve: those whose node selectors it all has.
    pub fn entitled(&self, node_id: &str) -> HashMap<String, Arc<Entry>> {
        let Some(node) = self.nodes.get(node_id) else {
            return HashMap::new();
        };
        self.entries
            .iter()
            .filter(|(id, _)| !self.dormant.contains(*id))
            .filter(|(_, e)| e.node_selectors.iter().all(|s| node.selectors.contains(s)))
            .map(|(id, e)| (id.clone(), e.clone()))
            .collect()
    }
}

/// The message that takes a node from having `sent` to having `now`, or `None` when nothing
/// changed. The bundle is included when it changed.
pub fn delta(
    sent: &HashMap<String, Arc<Entry>>,
    now: &HashMap<String, Arc<Entry>>,
    bundle_changed: Option<&Bundle>,
) -> Option<SyncUpdate> {
    let mut upserted: Vec<Entry> = now
        .iter()
        .filter(|(id, e)| {
            sent.get(*id)
                .is_none_or(|old| old.revision != e.revision || old != *e)
        })
        .map(|(_, e)| (**e).clone())
        .collect();
    upserted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut removed: Vec<String> = sent
        .keys()
        .filter(|id| !now.contains_key(*id))
        .cloned()
        .collect();
    removed.sort();
    if upserted.is_empty() && removed.is_empty() && bundle_changed.is_none() {
        return None;
    }
    Some(SyncUpdate {
        full: false,
        upserted,
        removed,
        bundle: bundle_changed.cloned(),
        crls: None,
        revocations: None,
        task_ends: None,
        policy: None,
        node_labels: Vec::new(),
        jwt_revocations: None,
    })
}

/// The full state for a node, the first message of its stream.
pub fn full(now: &HashMap<String, Arc<Entry>>, bundle: Bundle) -> SyncUpdate {
    let mut upserted: Vec<Entry> = now.values().map(|e| (**e).clone()).collect();
    upserted.sort_by(|a, b| a.id.cmp(&b.id));
    SyncUpdate {
        full: true,
        upserted,
        removed: Vec::new(),
        bundle: Some(bundle),
        crls: None,
        revocations: None,
        task_ends: None,
        policy: None,
        node_labels: Vec::new(),
        jwt_revocations: None,
    }
}

/// An entry record as the wire carries it.
pub fn entry_to_proto(record: &EntryRecord) -> Entry {
    Entry {
        id: record.id.clone(),
        spiffe_id: record.spiffe_id.clone(),
        selectors: record.selectors.clone(),
        node_selectors: record.node_selectors.clone(),
        x509_ttl_seconds: record.x509_ttl_seconds,
        owner: record.owner.clone(),
        purpose: record.purpose.clone(),
        expires_at: record.expires_at,
        inactivity_timeout_seconds: record.inactivity_timeout_seconds,
        jwt_ttl_seconds: record.jwt_ttl_seconds,
        hint: record.hint.clone().unwrap_or_default(),
        dns_names: record.dns_names.clone(),
        revision: record.revision,
        created_at: record.created_at,
        updated_at: record.updated_at,
        activation: record.activation.clone(),
        delegates_to: record.delegates_to.clone(),
        labels: record.labels.clone(),
    }
}

fn node_view(record: &NodeRecord) -> NodeView {
    NodeView {
        status: record.status,
        selectors: record.selectors.clone(),
        attested_at: record.attested_at,
    }
}

/// The history for `next`: `previous`'s history without versions older than [`HISTORY_KEEP`],
/// plus every entry of `previous` that `next` removed or changed.
fn remember_replaced(previous: &Snapshot, next: &Snapshot) -> EntryHistory {
    let now = crate::events::model::now_ms();
    let horizon = now - HISTORY_KEEP.as_millis() as i64;
    let mut history: EntryHistory = previous
        .history
        .iter()
        .map(|(id, versions)| {
            let kept = versions
                .iter()
                .filter(|(at, _)| *at >= horizon)
                .cloned()
                .collect();
            (id.clone(), kept)
        })
        .filter(|(_, versions): &(String, Vec<_>)| !versions.is_empty())
        .collect();
    for (id, old) in &previous.entries {
        if next
            .entries
            .get(id)
            .is_none_or(|new| new.revision != old.revision)
        {
            history
                .entry(id.clone())
                .or_default()
                .push((now, old.clone()));
        }
    }
    history
}

/// Reads a whole snapshot from the datastore.
pub async fn load_snapshot(store: &dyn Datastore) -> Result<Snapshot, StoreError> {
    let entries = store.list_entries().await?;
    let nodes = store.list_nodes().await?;
    let bundle = store.bundle(unix_now()).await?;
    let crls = store.crls(unix_now()).await?;
    let revocations = store.revocations(unix_now()).await?;
    let standings = store.entry_standings().await?;
    let tasks = store.tasks(true).await?;
    let policy = store.policy().await?;
    let jwt_keys = store.jwt_keys(unix_now()).await?;
    let jwt_revocations = store.jwt_revocations(unix_now()).await?;
    Ok(Snapshot {
        jwt_keys: jwt_keys.into_iter().map(|k| k.jwk).collect(),
        jwt_revocations: Arc::new(super::jwt::revocations_message(&jwt_revocations)),
        policy: policy.as_ref().map(policy_to_proto).unwrap_or_default(),
        task_ends: super::tasks::orders_by_node(&tasks),
        dormant: standings
            .into_iter()
            .filter(|s| s.dormant_since_ms.is_some())
            .map(|s| s.entry_id)
            .collect(),
        crls: super::revocation::distributed(&crls, unix_now()),
        orders: super::revocation::orders_by_node(&revocations),
        entries: entries
            .iter()
            .map(|e| (e.id.clone(), Arc::new(entry_to_proto(e))))
            .collect(),
        bundle: bundle.into_iter().map(|r| r.der).collect(),
        nodes: nodes.iter().map(|n| (n.id.clone(), node_view(n))).collect(),
        history: Arc::default(),
    })
}

/// A policy version as the wire carries it.
pub fn policy_to_proto(record: &crate::store::PolicyRecord) -> Policy {
    Policy {
        version: record.version,
        text: record.text.clone(),
        sha256: record.sha256.clone(),
        set_ms: record.set_ms,
    }
}

/// The bundle message of a snapshot.
pub fn bundle_message(trust_domain: &TrustDomain, snapshot: &Snapshot) -> Bundle {
    Bundle {
        trust_domain: trust_domain.name().to_owned(),
        roots: snapshot.bundle.clone(),
        jwt_keys: snapshot.jwt_keys.clone(),
    }
}

/// Reloads the snapshot after every datastore change and publishes it, until `stop`. A reload
/// that fails keeps the previous snapshot and is retried every second until it succeeds. A
/// full reload per change is O(entries); see ARCHITECTURE.md for when that stops being cheap.
pub async fn run_hub(
    store: Arc<dyn Datastore>,
    publish: watch::Sender<Arc<Snapshot>>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut changes = store.changes();
    loop {
        changes.borrow_and_update();
        loop {
            match load_snapshot(store.as_ref()).await {
                Ok(mut snapshot) => {
                    let previous = publish.borrow().clone();
                    snapshot.history = Arc::new(remember_replaced(&previous, &snapshot));
                    // Unchanged revocations keep their allocation: streams tell a change by
                    // the pointer, once per reload rather than once per node.
                    if snapshot.jwt_revocations == previous.jwt_revocations {
                        snapshot.jwt_revocations = previous.jwt_revocations.clone();
                    }
                    publish.send_replace(Arc::new(snapshot));
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload entries from the datastore; retrying in 1s");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, revision: i64, node_selectors: &[&str]) -> Arc<Entry> {
        Arc::new(Entry {
            id: id.into(),
            revision,
            node_selectors: node_selectors.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn nodes_get_only_entries_whose_node_selectors_they_have() {
        let mut snapshot = Snapshot::default();
        for e in [
            entry("all", 1, &[]),
            entry("n1", 1, &["node:id:n1"]),
            entry("prod", 1, &["node:label:prod", "node:attestation:x509pop"]),
        ] {
            snapshot.entries.insert(e.id.clone(), e);
        }
        snapshot.nodes.insert(
            "n1".into(),
            NodeView {
                status: NodeStatus::Active,
                selectors: vec![
                    "node:attestation:join_token".into(),
                    "node:id:n1".into(),
                    "node:label:prod".into(),
                ],
                attested_at: 0,
            },
        );
        let mut ids: Vec<_> = snapshot.entitled("n1").into_keys().collect();
        ids.sort();
        assert_eq!(ids, ["all", "n1"]);
        assert!(snapshot.entitled("unknown").is_empty());
    }

    #[test]
    fn issuances_are_judged_against_current_and_recently_replaced_entries() {
        let node = NodeView {
            status: NodeStatus::Active,
            selectors: vec!["node:id:n1".into()],
            attested_at: 0,
        };
        let granted = |id: &str, spiffe_id: &str, revision: i64, selectors: &[&str]| {
            let mut e = (*entry(id, revision, selectors)).clone();
            e.spiffe_id = spiffe_id.into();
            Arc::new(e)
        };
        let mut before = Snapshot::default();
        before.nodes.insert("n1".into(), node.clone());
        before
            .entries
            .insert("a".into(), granted("a", "spiffe://td/a", 1, &[]));
        before.entries.insert(
            "b".into(),
            granted("b", "spiffe://td/b", 1, &["node:id:n1"]),
        );
        let mut after = Snapshot::default();
        after.nodes.insert("n1".into(), node);
        after.entries.insert(
            "b".into(),
            granted("b", "spiffe://td/b", 2, &["node:id:n2"]),
        );
        after.history = Arc::new(remember_replaced(&before, &after));
        let recent = crate::events::model::now_ms() - 1000;
        // Deleted and re-pinned since: judged against the versions the node had.
        assert!(after.may_have_issued("n1", "a", "spiffe://td/a", "", recent));
        assert!(after.may_have_issued("n1", "b", "spiffe://td/b", "", recent));
        // Never granted, or granted under another entry, or before the window.
        assert!(!after.may_have_issued("n1", "a", "spiffe://td/admin", "", recent));
        assert!(!after.may_have_issued("n1", "b", "spiffe://td/a", "", recent));
        assert!(!after.may_have_issued("n1", "a", "spiffe://td/a", "", i64::MAX));
        assert!(!after.may_have_issued("n2", "b", "spiffe://td/b", "", recent));
        // A standing entry grants no task SVID.
        assert!(!after.may_have_issued("n1", "b", "spiffe://td/b/task/t1", "t1", recent));
    }

    #[test]
    fn deltas_carry_changes_removals_and_bundle_only() {
        let sent: HashMap<_, _> = [
            ("a".to_string(), entry("a", 1, &[])),
            ("b".to_string(), entry("b", 1, &[])),
        ]
        .into();
        let now: HashMap<_, _> = [
            ("a".to_string(), entry("a", 2, &[])),
            ("c".to_string(), entry("c", 1, &[])),
        ]
        .into();
        let update = delta(&sent, &now, None).unwrap();
        assert!(!update.full);
        assert_eq!(
            update
                .upserted
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(update.removed, ["b"]);
        assert!(delta(&now, &now, None).is_none());
        let bundle = Bundle::default();
        assert!(delta(&now, &now, Some(&bundle)).unwrap().bundle.is_some());
    }
}
