//! One node's sync stream: what it has sent, and the next message from a newer snapshot.
//!
//! The first message is the node's full state, or, when the node says which revision it
//! already has and the in-memory log still reaches back to it, only the entries changed since
//! (a catch-up: what a server restart or a dropped connection costs a node). Later messages
//! carry the entries changed since the last one: those the log names, checked one by one
//! against what the node holds, or, when the stream is far behind or its own node changed, the
//! difference between everything it may serve and what it holds.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::{Snapshot, Touched, bundle_message, delta, full};
use crate::proto::tessera::{
    CrlSet, Entry, JwtRevocation, JwtRevocations, RevocationOrder, RevocationOrders, SyncUpdate,
    TaskEndOrder, TaskEndOrders,
};
use crate::spiffe::TrustDomain;

/// A stream further behind the snapshot than this many revisions compares everything its node
/// may serve instead of walking the log.
const WALK_AT_MOST: i64 = 1024;

/// The roots and JWT keys of a snapshot.
type SentBundle = (Arc<Vec<Vec<u8>>>, Arc<Vec<String>>);

/// What one stream has sent its node.
#[derive(Debug)]
pub struct NodeSync {
    node_id: String,
    /// The revision the node said it holds, until the first message is sent.
    since: Option<i64>,
    /// Whether the first message went out.
    started: bool,
    /// The entries the node holds.
    sent: HashMap<String, Arc<Entry>>,
    /// The snapshot revision the node is at.
    revision: i64,
    /// The roots and JWT keys sent, compared by allocation.
    bundle: Option<SentBundle>,
    crls: Option<Arc<Vec<Vec<u8>>>>,
    orders: Option<Vec<RevocationOrder>>,
    task_ends: Option<Vec<TaskEndOrder>>,
    policy: Option<i64>,
    jwt_revocations: Option<Arc<Vec<JwtRevocation>>>,
}

/// How the first message of a stream was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Everything the node may serve.
    Full,
    /// Only what changed since the revision the node had.
    CaughtUp,
}

impl NodeSync {
    /// A stream for `node_id`, which holds the state of revision `since` (0: nothing).
    pub fn new(node_id: String, since: i64) -> Self {
        Self {
            node_id,
            since: (since > 0).then_some(since),
            started: false,
            sent: HashMap::new(),
            revision: 0,
            bundle: None,
            crls: None,
            orders: None,
            task_ends: None,
            policy: None,
            jwt_revocations: None,
        }
    }

    /// Whether the first message went out.
    pub fn started(&self) -> bool {
        self.started
    }

    /// The message that brings the node to `snapshot`, or `None` when nothing it holds
    /// changed; the first message also says how it was made. The node must be in the snapshot.
    pub fn next(
        &mut self,
        snapshot: &Snapshot,
        trust_domain: &TrustDomain,
    ) -> Option<(SyncUpdate, Option<Start>)> {
        let now_entitled;
        let (mut update, start) = if !self.started {
            now_entitled = snapshot.entitled(&self.node_id);
            match self.catch_up(snapshot, &now_entitled) {
                Some(update) => (update, Some(Start::CaughtUp)),
                None => (
                    full(&now_entitled, bundle_message(trust_domain, snapshot)),
                    Some(Start::Full),
                ),
            }
        } else {
            let (update, entitled) = self.entry_delta(snapshot);
            now_entitled = entitled;
            (update.unwrap_or_default(), None)
        };
        let bundle_changed = self.bundle.as_ref().is_none_or(|(roots, keys)| {
            !Arc::ptr_eq(roots, &snapshot.bundle) || !Arc::ptr_eq(keys, &snapshot.jwt_keys)
        });
        if bundle_changed && update.bundle.is_none() {
            update.bundle = Some(bundle_message(trust_domain, snapshot));
        }
        if self
            .crls
            .as_ref()
            .is_none_or(|sent| !Arc::ptr_eq(sent, &snapshot.crls))
        {
            update.crls = Some(CrlSet {
                crls: snapshot.crls.to_vec(),
            });
        }
        let orders = snapshot
            .orders
            .get(&self.node_id)
            .cloned()
            .unwrap_or_default();
        if self.orders.as_ref() != Some(&orders) {
            update.revocations = Some(RevocationOrders {
                orders: orders.clone(),
            });
        }
        let task_ends = snapshot
            .task_ends
            .get(&self.node_id)
            .cloned()
            .unwrap_or_default();
        if self.task_ends.as_ref() != Some(&task_ends) {
            update.task_ends = Some(TaskEndOrders {
                orders: task_ends.clone(),
            });
        }
        if self.policy != Some(snapshot.policy.version) {
            update.policy = Some((*snapshot.policy).clone());
        }
        if self
            .jwt_revocations
            .as_ref()
            .is_none_or(|sent| !Arc::ptr_eq(sent, &snapshot.jwt_revocations))
        {
            update.jwt_revocations = Some(JwtRevocations {
                revoked: (*snapshot.jwt_revocations).clone(),
            });
        }
        if update.full {
            update.node_labels = snapshot
                .node(&self.node_id)
                .map(|n| {
                    n.selectors
                        .iter()
                        .filter_map(|s| s.strip_prefix("node:label:"))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
        }
        self.revision = snapshot.revision;
        let says_something = !self.started
            || !update.upserted.is_empty()
            || !update.removed.is_empty()
            || update.bundle.is_some()
            || update.crls.is_some()
            || update.revocations.is_some()
            || update.task_ends.is_some()
            || update.policy.is_some()
            || update.jwt_revocations.is_some();
        self.started = true;
        self.sent = now_entitled;
        self.bundle = Some((snapshot.bundle.clone(), snapshot.jwt_keys.clone()));
        self.crls = Some(snapshot.crls.clone());
        self.orders = Some(orders);
        self.task_ends = Some(task_ends);
        self.policy = Some(snapshot.policy.version);
        self.jwt_revocations = Some(snapshot.jwt_revocations.clone());
        if !says_something {
            return None;
        }
        update.revision = snapshot.revision;
        Some((update, start))
    }

    /// The first message when the node holds revision `since` and the log reaches back to it:
    /// the entries changed since then, upserted when the node may serve them and removed when
    /// not. `None` when a full message is due, or costs less.
    fn catch_up(
        &self,
        snapshot: &Snapshot,
        entitled: &HashMap<String, Arc<Entry>>,
    ) -> Option<SyncUpdate> {
        let since = self.since?;
        if since < snapshot.log_floor || since > snapshot.revision {
            return None;
        }
        let changed = self.changed_since(snapshot, since, entitled.len().max(16))?;
        let mut update = SyncUpdate::default();
        for id in changed {
            match entitled.get(id) {
                Some(entry) => update.upserted.push((**entry).clone()),
                None => update.removed.push(id.to_owned()),
            }
        }
        Some(update)
    }

    /// The entry ids the log names after `since` (in id order), or `None` when the node's own
    /// record changed or more than `at_most` records would have to be walked.
    fn changed_since<'s>(
        &self,
        snapshot: &'s Snapshot,
        since: i64,
        at_most: usize,
    ) -> Option<BTreeSet<&'s str>> {
        let mut ids = BTreeSet::new();
        for (walked, (_, logged)) in snapshot.log.range(since + 1..).enumerate() {
            if walked >= at_most {
                return None;
            }
            match logged.touched {
                Touched::Entry => {
                    ids.insert(logged.key.as_str());
                }
                Touched::Node if logged.key == self.node_id => return None,
                Touched::Node => {}
            }
        }
        Some(ids)
    }

    /// The entries to upsert and remove since the last message, and what the node may serve.
    fn entry_delta(
        &self,
        snapshot: &Snapshot,
    ) -> (Option<SyncUpdate>, HashMap<String, Arc<Entry>>) {
        let walkable = self.revision >= snapshot.log_floor
            && snapshot.revision - self.revision <= WALK_AT_MOST;
        let changed = walkable
            .then(|| self.changed_since(snapshot, self.revision, WALK_AT_MOST as usize))
            .flatten();
        let Some(changed) = changed else {
            let now = snapshot.entitled(&self.node_id);
            return (delta(&self.sent, &now), now);
        };
        let mut now = self.sent.clone();
        let mut update = SyncUpdate::default();
        for id in changed {
            let want = snapshot.entitled_entry(&self.node_id, id);
            let have = self.sent.get(id);
            match (have, want) {
                (Some(have), Some(want)) if super::same_entry(have, want) => {}
                (_, Some(want)) => {
                    update.upserted.push((**want).clone());
                    now.insert(id.to_owned(), want.clone());
                }
                (Some(_), None) => {
                    update.removed.push(id.to_owned());
                    now.remove(id);
                }
                (None, None) => {}
            }
        }
        let changed = !update.upserted.is_empty() || !update.removed.is_empty();
        (changed.then_some(update), now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::sync::{Logged, NodeView};
    use crate::store::NodeStatus;

    fn entry(id: &str, revision: i64, node_selectors: &[&str]) -> Arc<Entry> {
        Arc::new(Entry {
            id: id.into(),
            revision,
            node_selectors: node_selectors.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    fn trust_domain() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    /// Nodes n1 and n2, entries "shared" (every node), "one" (n1) and "two" (n2), at revision 10.
    fn snapshot() -> Snapshot {
        let mut snapshot = Snapshot {
            revision: 10,
            log_floor: 5,
            ..Snapshot::default()
        };
        for id in ["n1", "n2"] {
            snapshot.insert_node(
                id,
                NodeView {
                    status: NodeStatus::Active,
                    selectors: vec![format!("node:id:{id}")],
                    attested_at: 0,
                },
            );
        }
        snapshot.insert_entry(entry("shared", 1, &[]));
        snapshot.insert_entry(entry("one", 1, &["node:id:n1"]));
        snapshot.insert_entry(entry("two", 1, &["node:id:n2"]));
        snapshot
    }

    /// `snapshot` with `entry` stored (or `id` deleted) at the next revision.
    fn change(snapshot: &Snapshot, id: &str, entry: Option<Arc<Entry>>) -> Snapshot {
        let mut next = snapshot.clone();
        next.revision += 1;
        match entry {
            Some(e) => next.insert_entry(e),
            None => {
                next.remove_entry(id);
            }
        }
        next.log.insert(
            next.revision,
            Logged {
                touched: Touched::Entry,
                key: id.into(),
                time_ms: 0,
            },
        );
        next
    }

    fn ids(entries: &[Entry]) -> Vec<&str> {
        entries.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn full_state_first_then_only_what_changed_for_the_node() {
        let td = trust_domain();
        let first = snapshot();
        let mut sync = NodeSync::new("n1".into(), 0);
        let (update, start) = sync.next(&first, &td).unwrap();
        assert_eq!(start, Some(Start::Full));
        assert!(update.full);
        assert_eq!(update.revision, 10);
        assert_eq!(ids(&update.upserted), ["one", "shared"]);
        assert!(update.bundle.is_some() && update.crls.is_some() && update.policy.is_some());
        assert!(sync.next(&first, &td).is_none(), "nothing changed");

        // Another node's entry: nothing for n1.
        let second = change(&first, "two", Some(entry("two", 2, &["node:id:n2"])));
        assert!(sync.next(&second, &td).is_none());
        // Its own: that entry alone, no sections.
        let third = change(&second, "one", Some(entry("one", 2, &["node:id:n1"])));
        let (update, start) = sync.next(&third, &td).unwrap();
        assert_eq!((start, update.full, update.revision), (None, false, 12));
        assert_eq!(ids(&update.upserted), ["one"]);
        assert!(update.bundle.is_none() && update.crls.is_none() && update.policy.is_none());
        // Re-pinned away from it: removed.
        let fourth = change(&third, "one", Some(entry("one", 3, &["node:id:n2"])));
        let (update, _) = sync.next(&fourth, &td).unwrap();
        assert_eq!(update.removed, ["one"]);
        // A section every node gets.
        let mut fifth = fourth.clone();
        fifth.crls = Arc::new(vec![vec![1]]);
        let (update, _) = sync.next(&fifth, &td).unwrap();
        assert!(update.upserted.is_empty() && update.crls.is_some());
    }

    #[test]
    fn far_behind_or_past_the_log_compares_everything() {
        let td = trust_domain();
        let first = snapshot();
        let mut sync = NodeSync::new("n1".into(), 0);
        sync.next(&first, &td).unwrap();
        // Changed, but the log no longer names it.
        let mut next = change(&first, "one", Some(entry("one", 2, &["node:id:n1"])));
        next.log = imbl::OrdMap::new();
        next.log_floor = next.revision;
        let (update, _) = sync.next(&next, &td).unwrap();
        assert_eq!(ids(&update.upserted), ["one"]);
        assert!(update.removed.is_empty());
    }

    #[test]
    fn a_reconnecting_node_catches_up_from_its_revision() {
        let td = trust_domain();
        let first = snapshot();
        let second = change(&first, "shared", None);
        let third = change(&second, "two", Some(entry("two", 2, &["node:id:n1"])));

        let mut sync = NodeSync::new("n1".into(), 10);
        let (update, start) = sync.next(&third, &td).unwrap();
        assert_eq!(start, Some(Start::CaughtUp));
        assert!(!update.full);
        assert_eq!(ids(&update.upserted), ["two"]);
        assert_eq!(update.removed, ["shared"]);
        assert!(update.bundle.is_some(), "sections are sent in full");
        // From then on, deltas against everything it holds.
        let fourth = change(&third, "one", None);
        let (update, _) = sync.next(&fourth, &td).unwrap();
        assert_eq!(update.removed, ["one"]);

        // Behind the log, ahead of the server (another database), or its node changed: full.
        for since in [2, 99] {
            let mut sync = NodeSync::new("n1".into(), since);
            assert_eq!(sync.next(&third, &td).unwrap().1, Some(Start::Full));
        }
        let mut changed_node = third.clone();
        changed_node.revision += 1;
        changed_node.log.insert(
            changed_node.revision,
            Logged {
                touched: Touched::Node,
                key: "n1".into(),
                time_ms: 0,
            },
        );
        let mut sync = NodeSync::new("n1".into(), 10);
        assert_eq!(sync.next(&changed_node, &td).unwrap().1, Some(Start::Full));
    }
}
