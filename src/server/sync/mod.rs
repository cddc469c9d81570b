//! Live state fan-out: what every node's sync stream sends, kept current from the datastore's
//! change log.
//!
//! Layout:
//! - this module: [`Snapshot`], everything the streams send from at one revision of the change
//!   log, with indexes so that "what may this node serve" costs what the node may serve, not
//!   every entry, and the wire forms of entries and policies;
//! - [`hub`]: the one task that follows the change log, applies each batch of changes to a copy
//!   of the snapshot (persistent maps: a copy shares everything it does not touch), publishes
//!   it, and wakes only the streams of the nodes a change concerns;
//! - [`stream`]: what one node's stream has sent and what it sends next: its full state, or a
//!   catch-up from the revision it already has, then deltas.

pub mod hub;
pub mod stream;

use std::collections::HashMap;
use std::sync::Arc;

use crate::proto::tessera::{
    Bundle, Entry, JwtRevocation, Policy, RevocationOrder, SyncUpdate, TaskEndOrder,
};
use crate::spiffe::TrustDomain;
use crate::store::{EntryRecord, NodeRecord, NodeStatus};

pub use hub::{Wakers, load_snapshot, run_hub};

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

impl NodeView {
    fn has_all(&self, selectors: &[String]) -> bool {
        selectors
            .iter()
            .all(|s| self.selectors.binary_search(s).is_ok())
    }
}

/// What a record of the in-memory change log concerns, for the streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touched {
    /// An entry, or its standing (dormant or not).
    Entry,
    /// A node's record.
    Node,
}

/// One record of the in-memory change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// What it concerns.
    pub touched: Touched,
    /// The entry or node id.
    pub key: String,
    /// When it was committed, Unix milliseconds.
    pub time_ms: i64,
}

/// Replaced versions of entries, by entry id, each with when it was replaced (Unix ms).
pub type EntryHistory = imbl::HashMap<String, Arc<Vec<(i64, Arc<Entry>)>>>;

/// Everything sync streams send from, at one revision of the change log. Cloning one is cheap
/// whatever its size: the maps are persistent and the sections shared.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Every change of the datastore's log up to this revision is applied.
    pub revision: i64,
    /// Every entry, by id.
    entries: imbl::HashMap<String, Arc<Entry>>,
    /// Entry ids under the one node selector they are indexed by ([`index_selector`]);
    /// entries without node selectors under "".
    entries_by_selector: imbl::HashMap<String, imbl::HashSet<String>>,
    /// Every node, by id.
    nodes: imbl::HashMap<String, NodeView>,
    /// Node ids under each of their selectors: which nodes an entry's change concerns.
    nodes_by_selector: imbl::HashMap<String, imbl::HashSet<String>>,
    /// The recent changes to entries and nodes, by revision: what a reconnecting node catches
    /// up from, and what a woken stream looks at.
    pub log: imbl::OrdMap<i64, Logged>,
    /// Every change after this revision is in `log`; a node behind it gets its full state.
    pub log_floor: i64,
    /// Versions of entries removed or changed in the last [`hub::HISTORY_KEEP`], by entry id, with
    /// when they stopped being current (Unix ms): an issuance reported late (after an outage)
    /// is judged against what the node was entitled to then, not only now.
    pub history: EntryHistory,
    /// DER roots of the trust domain.
    pub bundle: Arc<Vec<Vec<u8>>>,
    /// The CRLs every agent is given (see [`super::revocation::distributed`]).
    pub crls: Arc<Vec<Vec<u8>>>,
    /// The SVID revocations each node must sign into its CAs' CRLs, by node id.
    pub orders: Arc<HashMap<String, Vec<RevocationOrder>>>,
    /// Entries dormant after their inactivity timeout: no node is sent them.
    pub dormant: imbl::HashSet<String>,
    /// The tasks each node must end, by node id.
    pub task_ends: Arc<HashMap<String, Vec<TaskEndOrder>>>,
    /// The authorisation policy (version 0, empty, before any was set).
    pub policy: Arc<Policy>,
    /// The JWT-SVID signing keys of every replica, each a public JWK (JSON).
    pub jwt_keys: Arc<Vec<String>>,
    /// Every revoked JWT-SVID not yet expired: sent to every node.
    pub jwt_revocations: Arc<Vec<JwtRevocation>>,
}

/// The node selector an entry is indexed under: the one fewest nodes are likely to share (a
/// node id, then a label, then any other), or "" for an entry every node may serve. A node
/// lacking it cannot be entitled to the entry.
pub fn index_selector(node_selectors: &[String]) -> &str {
    let rank = |s: &String| {
        if s.starts_with("node:id:") {
            0
        } else if s.starts_with("node:label:") {
            1
        } else {
            2
        }
    };
    node_selectors
        .iter()
        .min_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)))
        .map_or("", String::as_str)
}

/// Nodes an entry change concerns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Concerned {
    /// Every node (an entry without node selectors, or a section every node gets).
    pub all: bool,
    /// These nodes.
    pub nodes: std::collections::HashSet<String>,
}

impl Snapshot {
    /// One entry.
    pub fn entry(&self, id: &str) -> Option<&Arc<Entry>> {
        self.entries.get(id)
    }

    /// One node.
    pub fn node(&self, id: &str) -> Option<&NodeView> {
        self.nodes.get(id)
    }

    /// Adds or replaces an entry, keeping the index.
    pub fn insert_entry(&mut self, entry: Arc<Entry>) {
        self.remove_entry(&entry.id);
        let key = index_selector(&entry.node_selectors).to_owned();
        self.entries_by_selector
            .entry(key)
            .or_default()
            .insert(entry.id.clone());
        self.entries.insert(entry.id.clone(), entry);
    }

    /// Removes an entry, keeping the index; returns it.
    pub fn remove_entry(&mut self, id: &str) -> Option<Arc<Entry>> {
        let old = self.entries.remove(id)?;
        let key = index_selector(&old.node_selectors);
        if let Some(ids) = self.entries_by_selector.get_mut(key) {
            ids.remove(id);
            if ids.is_empty() {
                self.entries_by_selector.remove(key);
            }
        }
        Some(old)
    }

    /// Adds or replaces a node, keeping the index.
    pub fn insert_node(&mut self, id: &str, view: NodeView) {
        self.remove_node(id);
        for selector in &view.selectors {
            self.nodes_by_selector
                .entry(selector.clone())
                .or_default()
                .insert(id.to_owned());
        }
        self.nodes.insert(id.to_owned(), view);
    }

    /// Removes a node, keeping the index.
    pub fn remove_node(&mut self, id: &str) -> Option<NodeView> {
        let old = self.nodes.remove(id)?;
        for selector in &old.selectors {
            if let Some(ids) = self.nodes_by_selector.get_mut(selector) {
                ids.remove(id);
                if ids.is_empty() {
                    self.nodes_by_selector.remove(selector);
                }
            }
        }
        Some(old)
    }

    /// Adds to `concerned` the nodes whose selectors include all of `node_selectors`.
    pub fn add_concerned(&self, node_selectors: &[String], concerned: &mut Concerned) {
        if node_selectors.is_empty() {
            concerned.all = true;
            return;
        }
        if concerned.all {
            return;
        }
        let rarest = node_selectors
            .iter()
            .map(|s| self.nodes_by_selector.get(s))
            .min_by_key(|ids| ids.map_or(0, |ids| ids.len()));
        let Some(Some(candidates)) = rarest else {
            return;
        };
        for id in candidates {
            if self
                .nodes
                .get(id)
                .is_some_and(|node| node.has_all(node_selectors))
            {
                concerned.nodes.insert(id.clone());
            }
        }
    }

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
            granted && node.has_all(&e.node_selectors)
        };
        self.entries.get(entry_id).is_some_and(|e| grants(e))
            || self.history.get(entry_id).is_some_and(|versions| {
                versions
                    .iter()
                    .any(|(replaced_ms, e)| *replaced_ms >= since_ms && grants(e))
            })
    }

    /// The entry `entry_id` when node `node_id` may serve it: it has all its node selectors
    /// and the entry is not dormant.
    pub fn entitled_entry(&self, node_id: &str, entry_id: &str) -> Option<&Arc<Entry>> {
        let node = self.nodes.get(node_id)?;
        self.entries
            .get(entry_id)
            .filter(|e| !self.dormant.contains(entry_id) && node.has_all(&e.node_selectors))
    }

    /// Entries that node `node_id` may serve: those whose node selectors it all has, not
    /// dormant. Looks only at the entries indexed under the node's selectors.
    pub fn entitled(&self, node_id: &str) -> HashMap<String, Arc<Entry>> {
        let Some(node) = self.nodes.get(node_id) else {
            return HashMap::new();
        };
        std::iter::once("")
            .chain(node.selectors.iter().map(String::as_str))
            .filter_map(|key| self.entries_by_selector.get(key))
            .flatten()
            .filter_map(|id| self.entries.get(id))
            .filter(|e| !self.dormant.contains(&e.id) && node.has_all(&e.node_selectors))
            .map(|e| (e.id.clone(), e.clone()))
            .collect()
    }
}

/// The message that takes a node from having `sent` to having `now`, or `None` when nothing
/// changed.
pub fn delta(
    sent: &HashMap<String, Arc<Entry>>,
    now: &HashMap<String, Arc<Entry>>,
) -> Option<SyncUpdate> {
    let mut upserted: Vec<Entry> = now
        .iter()
        .filter(|(id, e)| sent.get(*id).is_none_or(|old| !same_entry(old, e)))
        .map(|(_, e)| (**e).clone())
        .collect();
    upserted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut removed: Vec<String> = sent
        .keys()
        .filter(|id| !now.contains_key(*id))
        .cloned()
        .collect();
    removed.sort();
    if upserted.is_empty() && removed.is_empty() {
        return None;
    }
    Some(SyncUpdate {
        upserted,
        removed,
        ..SyncUpdate::default()
    })
}

/// Whether two versions of an entry are the same: the same allocation, or equal.
fn same_entry(a: &Arc<Entry>, b: &Arc<Entry>) -> bool {
    Arc::ptr_eq(a, b) || (a.revision == b.revision && a == b)
}

/// The full state for a node, the first message of its stream.
pub fn full(now: &HashMap<String, Arc<Entry>>, bundle: Bundle) -> SyncUpdate {
    let mut upserted: Vec<Entry> = now.values().map(|e| (**e).clone()).collect();
    upserted.sort_by(|a, b| a.id.cmp(&b.id));
    SyncUpdate {
        full: true,
        upserted,
        bundle: Some(bundle),
        ..SyncUpdate::default()
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

/// A node record as sync sees it, its selectors sorted.
pub fn node_view(record: &NodeRecord) -> NodeView {
    let mut selectors = record.selectors.clone();
    selectors.sort();
    selectors.dedup();
    NodeView {
        status: record.status,
        selectors,
        attested_at: record.attested_at,
    }
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
        roots: snapshot.bundle.to_vec(),
        jwt_keys: snapshot.jwt_keys.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, revision: i64, node_selectors: &[&str]) -> Arc<Entry> {
        Arc::new(Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://td/{id}"),
            revision,
            node_selectors: node_selectors.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    fn node(selectors: &[&str]) -> NodeView {
        let mut selectors: Vec<String> = selectors.iter().map(|s| s.to_string()).collect();
        selectors.sort();
        NodeView {
            status: NodeStatus::Active,
            selectors,
            attested_at: 0,
        }
    }

    fn entitled_ids(snapshot: &Snapshot, node_id: &str) -> Vec<String> {
        let mut ids: Vec<_> = snapshot.entitled(node_id).into_keys().collect();
        ids.sort();
        ids
    }

    #[test]
    fn nodes_get_only_entries_whose_node_selectors_they_have() {
        let mut snapshot = Snapshot::default();
        for e in [
            entry("all", 1, &[]),
            entry("n1", 1, &["node:id:n1"]),
            entry("prod", 1, &["node:label:prod", "node:attestation:x509pop"]),
            entry("prod-any", 1, &["node:label:prod"]),
        ] {
            snapshot.insert_entry(e);
        }
        snapshot.insert_node(
            "n1",
            node(&[
                "node:attestation:join_token",
                "node:id:n1",
                "node:label:prod",
            ]),
        );
        assert_eq!(entitled_ids(&snapshot, "n1"), ["all", "n1", "prod-any"]);
        assert!(snapshot.entitled("unknown").is_empty());
        assert!(snapshot.entitled_entry("n1", "n1").is_some());
        assert!(snapshot.entitled_entry("n1", "prod").is_none());

        // Re-pinned elsewhere: the index follows the entry.
        snapshot.insert_entry(entry("n1", 2, &["node:id:n2"]));
        snapshot.insert_entry(entry("prod", 2, &["node:label:prod"]));
        assert_eq!(entitled_ids(&snapshot, "n1"), ["all", "prod", "prod-any"]);
        snapshot.remove_entry("all");
        snapshot.dormant.insert("prod-any".into());
        assert_eq!(entitled_ids(&snapshot, "n1"), ["prod"]);
        assert!(snapshot.entitled_entry("n1", "prod-any").is_none());
    }

    #[test]
    fn an_entry_change_concerns_the_nodes_it_is_pinned_to() {
        let mut snapshot = Snapshot::default();
        snapshot.insert_node("a", node(&["node:id:a", "node:label:prod"]));
        snapshot.insert_node(
            "b",
            node(&["node:id:b", "node:label:prod", "node:label:eu"]),
        );
        snapshot.insert_node("c", node(&["node:id:c", "node:label:eu"]));
        let concerned = |snapshot: &Snapshot, selectors: &[&str]| {
            let selectors: Vec<String> = selectors.iter().map(|s| s.to_string()).collect();
            let mut concerned = Concerned::default();
            snapshot.add_concerned(&selectors, &mut concerned);
            let mut nodes: Vec<_> = concerned.nodes.into_iter().collect();
            nodes.sort();
            (concerned.all, nodes)
        };
        assert_eq!(
            concerned(&snapshot, &["node:label:prod"]),
            (false, vec!["a".into(), "b".into()])
        );
        assert_eq!(
            concerned(&snapshot, &["node:label:prod", "node:label:eu"]),
            (false, vec!["b".to_string()])
        );
        assert_eq!(concerned(&snapshot, &["node:label:none"]), (false, vec![]));
        assert_eq!(concerned(&snapshot, &[]), (true, vec![]));
        snapshot.remove_node("b");
        assert_eq!(
            concerned(&snapshot, &["node:label:prod"]),
            (false, vec!["a".into()])
        );
    }

    #[test]
    fn the_index_selector_is_the_rarest_kind() {
        let selectors = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(index_selector(&[]), "");
        assert_eq!(
            index_selector(&selectors(&[
                "node:attestation:x",
                "node:label:b",
                "node:label:a"
            ])),
            "node:label:a"
        );
        assert_eq!(
            index_selector(&selectors(&["node:label:a", "node:id:n9"])),
            "node:id:n9"
        );
    }

    #[test]
    fn issuances_are_judged_against_current_and_recently_replaced_entries() {
        let mut snapshot = Snapshot::default();
        snapshot.insert_node("n1", node(&["node:id:n1"]));
        snapshot.insert_entry(entry("b", 2, &["node:id:n2"]));
        let recent = crate::events::model::now_ms() - 1000;
        snapshot.history.insert(
            "a".into(),
            Arc::new(vec![(recent + 500, entry("a", 1, &[]))]),
        );
        snapshot.history.insert(
            "b".into(),
            Arc::new(vec![(recent + 500, entry("b", 1, &["node:id:n1"]))]),
        );
        // Deleted and re-pinned since: judged against the versions the node had.
        assert!(snapshot.may_have_issued("n1", "a", "spiffe://td/a", "", recent));
        assert!(snapshot.may_have_issued("n1", "b", "spiffe://td/b", "", recent));
        // Never granted, or granted under another entry, or before the window.
        assert!(!snapshot.may_have_issued("n1", "a", "spiffe://td/admin", "", recent));
        assert!(!snapshot.may_have_issued("n1", "b", "spiffe://td/a", "", recent));
        assert!(!snapshot.may_have_issued("n1", "a", "spiffe://td/a", "", i64::MAX));
        assert!(!snapshot.may_have_issued("n2", "b", "spiffe://td/b", "", recent));
        // A standing entry grants no task SVID.
        assert!(!snapshot.may_have_issued("n1", "b", "spiffe://td/b/task/t1", "t1", recent));
    }

    #[test]
    fn deltas_carry_changes_and_removals_only() {
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
        let update = delta(&sent, &now).unwrap();
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
        assert!(delta(&now, &now).is_none());
    }
}
