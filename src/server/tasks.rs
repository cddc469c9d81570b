//! Tasks on the server: the rules agents enforce, checked again from the events they report
//! (a task entry the node may serve, the task's SPIFFE ID, delegation allowed by the parent's
//! entry, a lifetime within the parent's, the depth), and the ends it orders (an operator's
//! `tessera task end`, an anomaly), which reach the node on its sync stream.

use std::collections::HashMap;

use super::State;
use super::sync::Snapshot;
use crate::events::model::{task_end_reason_from_name, task_end_reason_name};
use crate::proto::tessera::{Event, TaskEndOrder, TaskEndReason};
use crate::store::{StoreError, TaskRecord};

/// What the server knows of a task while it checks a batch: its entry and deadline.
#[derive(Debug, Clone)]
pub struct KnownTask {
    /// The task entry.
    pub entry_id: String,
    /// Unix seconds.
    pub deadline: i64,
    /// Unix milliseconds, if it has ended.
    pub ended_ms: Option<i64>,
}

impl From<&TaskRecord> for KnownTask {
    fn from(task: &TaskRecord) -> Self {
        Self {
            entry_id: task.entry_id.clone(),
            deadline: task.deadline,
            ended_ms: task.ended_ms,
        }
    }
}

/// Why a `task_started` event from `node_id` breaks the rules, or `None` when it keeps them.
/// `parent` is the task it names as its parent, as the server knows it.
pub fn task_start_problem(
    snapshot: &Snapshot,
    node_id: &str,
    event: &Event,
    parent: Option<&KnownTask>,
    max_depth: u32,
) -> Option<String> {
    let Some(entry) = snapshot.entitled_entry(node_id, &event.entry_id) else {
        return Some(format!(
            "task {} runs under entry {:?}, which node {node_id} may not serve",
            event.task_id, event.entry_id
        ));
    };
    if entry.activation != "task" {
        return Some(format!(
            "task {} runs under entry {}, which is not a task entry",
            event.task_id, entry.id
        ));
    }
    let expected = format!("{}/task/{}", entry.spiffe_id, event.task_id);
    if event.spiffe_id != expected {
        return Some(format!(
            "task {} claims the SPIFFE ID {}, not {expected}",
            event.task_id, event.spiffe_id
        ));
    }
    let depth = event.chain.len() as u32;
    if depth > max_depth {
        return Some(format!(
            "task {} is delegated {depth} levels deep; max_task_depth is {max_depth}",
            event.task_id
        ));
    }
    if depth < 2 {
        return None;
    }
    let parent_id = &event.chain[event.chain.len() - 2].task_id;
    let Some(parent) = parent else {
        return Some(format!(
            "task {} names parent {parent_id}, which the server never saw start",
            event.task_id
        ));
    };
    let delegates = snapshot
        .entry(&parent.entry_id)
        .is_some_and(|p| p.delegates_to.contains(&event.entry_id));
    if !delegates {
        return Some(format!(
            "task {} (entry {}) was delegated from task {parent_id} (entry {}), whose entry may \
             not delegate to it",
            event.task_id, event.entry_id, parent.entry_id
        ));
    }
    if event.not_after > parent.deadline {
        return Some(format!(
            "task {} ends at {} after its parent {parent_id} (at {})",
            event.task_id, event.not_after, parent.deadline
        ));
    }
    if parent.ended_ms.is_some_and(|ended| ended < event.time_ms) {
        return Some(format!(
            "task {} started after its parent {parent_id} had ended",
            event.task_id
        ));
    }
    None
}

/// The outstanding end orders of every node: tasks ordered ended that have not ended yet.
pub fn orders_by_node(tasks: &[TaskRecord]) -> HashMap<String, Vec<TaskEndOrder>> {
    let mut orders: HashMap<String, Vec<TaskEndOrder>> = HashMap::new();
    for task in tasks.iter().filter(|t| t.ended_ms.is_none()) {
        let (Some(ordered_ms), Some(reason)) = (task.end_ordered_ms, &task.end_order_reason) else {
            continue;
        };
        let mut order = TaskEndOrder {
            task_id: task.task_id.clone(),
            detail: task.end_order_detail.clone(),
            ordered_ms,
            ..TaskEndOrder::default()
        };
        order.set_reason(task_end_reason_from_name(reason));
        orders.entry(task.node_id.clone()).or_default().push(order);
    }
    orders
}

impl State {
    /// Orders task `task_id` (and every live task delegated from it) ended for `reason`.
    /// Returns the tasks newly ordered.
    pub async fn order_task_end(
        &self,
        task_id: &str,
        reason: TaskEndReason,
        detail: &str,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let ordered = self
            .store
            .order_task_end(
                task_id,
                task_end_reason_name(reason),
                detail,
                crate::events::model::now_ms(),
            )
            .await?;
        for task in &ordered {
            tracing::info!(target: "tessera::audit", task = %task.task_id, node = %task.node_id, reason = task_end_reason_name(reason), detail, "task end ordered");
        }
        Ok(ordered)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::proto::tessera::{Entry, TaskLink};
    use crate::server::sync::NodeView;
    use crate::store::NodeStatus;

    fn snapshot() -> Snapshot {
        let mut snapshot = Snapshot::default();
        let task_entry = |id: &str, delegates: &[&str], nodes: &[&str]| Entry {
            id: id.into(),
            spiffe_id: format!("spiffe://td/{id}"),
            activation: "task".into(),
            delegates_to: delegates.iter().map(|d| d.to_string()).collect(),
            node_selectors: nodes.iter().map(|n| n.to_string()).collect(),
            revision: 1,
            ..Entry::default()
        };
        for e in [
            task_entry("coder", &["reviewer"], &[]),
            task_entry("reviewer", &[], &[]),
            task_entry("elsewhere", &[], &["node:id:n2"]),
            Entry {
                activation: "standing".into(),
                ..task_entry("web", &[], &[])
            },
        ] {
            snapshot.insert_entry(Arc::new(e));
        }
        snapshot.insert_node(
            "n1",
            NodeView {
                status: NodeStatus::Active,
                selectors: vec!["node:id:n1".into()],
                attested_at: 0,
            },
        );
        snapshot
    }

    const P: &str = "00000000-0000-7000-8000-000000000001";
    const C: &str = "00000000-0000-7000-8000-000000000002";

    fn started(entry: &str, chain: &[&str], not_after: i64) -> Event {
        let task_id = chain.last().unwrap().to_string();
        Event {
            entry_id: entry.into(),
            spiffe_id: format!("spiffe://td/{entry}/task/{task_id}"),
            chain: chain
                .iter()
                .map(|t| TaskLink {
                    task_id: t.to_string(),
                    spiffe_id: String::new(),
                })
                .collect(),
            task_id,
            not_after,
            time_ms: 2_000_000,
            ..Event::default()
        }
    }

    #[test]
    fn delegation_is_checked_again_from_the_events() {
        let snapshot = snapshot();
        let parent = KnownTask {
            entry_id: "coder".into(),
            deadline: 1000,
            ended_ms: None,
        };
        let check = |event: &Event, parent: Option<&KnownTask>, depth| {
            task_start_problem(&snapshot, "n1", event, parent, depth)
        };
        assert_eq!(check(&started("coder", &[P], 900), None, 4), None);
        assert_eq!(
            check(&started("reviewer", &[P, C], 900), Some(&parent), 4),
            None
        );
        for (event, parent, depth, problem) in [
            (started("elsewhere", &[P], 900), None, 4, "may not serve"),
            (started("web", &[P], 900), None, 4, "not a task entry"),
            (started("nosuch", &[P], 900), None, 4, "may not serve"),
            (
                started("reviewer", &[P, C], 900),
                None,
                4,
                "never saw start",
            ),
            (
                started("reviewer", &[P, C], 1001),
                Some(&parent),
                4,
                "after its parent",
            ),
            (
                started("reviewer", &[P, C], 900),
                Some(&parent),
                1,
                "levels deep",
            ),
            (
                started("coder", &[P, C], 900),
                Some(&parent),
                4,
                "may not delegate",
            ),
        ] {
            let found = check(&event, parent, depth).unwrap_or_default();
            assert!(found.contains(problem), "{problem}: {found}");
        }
        let mut forged = started("coder", &[P], 900);
        forged.spiffe_id = "spiffe://td/admin".into();
        assert!(
            check(&forged, None, 4)
                .unwrap()
                .contains("claims the SPIFFE ID")
        );
        let ended = KnownTask {
            ended_ms: Some(1_000_000),
            ..parent.clone()
        };
        assert!(
            check(&started("reviewer", &[P, C], 900), Some(&ended), 4)
                .unwrap()
                .contains("had ended")
        );
    }
}
