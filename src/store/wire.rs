//! The stored form of an event against the wire's: `tessera.v1.Event` to [`EventRecord`] as the
//! server ingests it, and back as the admin API serves it. Kinds and reasons are stored by
//! their names in the event model.

use super::{CallerRecord, EventRecord, EventTask};
use crate::events::model::{
    kind_from_name, kind_name, reason_from_name, reason_name, task_end_reason_from_name,
    task_end_reason_name,
};
use crate::proto::tessera::{Caller, Event, EventKind, TaskLink};

/// An event as stored, reported by `node_id` and received at `received_ms`.
pub fn to_record(event: &Event, kind: EventKind, node_id: &str, received_ms: i64) -> EventRecord {
    let used = matches!(kind, EventKind::SvidUsed | EventKind::JwtUsed);
    EventRecord {
        id: event.id.clone(),
        kind: kind_name(kind).to_owned(),
        time_ms: event.time_ms,
        node_id: node_id.to_owned(),
        entry_id: event.entry_id.clone(),
        spiffe_id: event.spiffe_id.clone(),
        serial: event.serial.clone(),
        not_after: (event.not_after > 0).then_some(event.not_after),
        reason: matches!(kind, EventKind::SvidRevoked | EventKind::JwtRevoked)
            .then(|| reason_name(event.reason()).to_owned()),
        caller: event.caller.as_ref().map(|c| CallerRecord {
            pid: i64::from(c.pid),
            uid: i64::from(c.uid),
            gid: i64::from(c.gid),
            exe_path: c.exe_path.clone(),
            exe_sha256: c.exe_sha256.clone(),
            unit: c.unit.clone(),
        }),
        first_ms: used.then_some(event.first_ms),
        last_ms: used.then_some(event.last_ms),
        count: used.then_some(event.count.min(i64::MAX as u64) as i64),
        detail: event.detail.clone(),
        received_ms,
        task: (!event.task_id.is_empty()).then(|| EventTask {
            task_id: event.task_id.clone(),
            chain: event
                .chain
                .iter()
                .map(|l| (l.task_id.clone(), l.spiffe_id.clone()))
                .collect(),
            purpose: event.purpose.clone(),
            owner: event.owner.clone(),
            pid: i64::from(event.task_pid),
            end_reason: (kind == EventKind::TaskEnded)
                .then(|| task_end_reason_name(event.task_end_reason()).to_owned()),
        }),
        policy_version: matches!(
            kind,
            EventKind::SvidIssued | EventKind::TaskStarted | EventKind::PolicyDenied
        )
        .then_some(event.policy_version),
        policies: event.policies.clone(),
        jti: event.jti.clone(),
        audience: event.audience.clone(),
    }
}

/// A stored record as the wire carries it.
pub fn from_record(record: &EventRecord, trust_domain: &str) -> Event {
    let mut event = Event {
        id: record.id.clone(),
        kind: kind_from_name(&record.kind).unwrap_or(EventKind::Unspecified) as i32,
        time_ms: record.time_ms,
        trust_domain: trust_domain.to_owned(),
        node_id: record.node_id.clone(),
        entry_id: record.entry_id.clone(),
        spiffe_id: record.spiffe_id.clone(),
        serial: record.serial.clone(),
        not_after: record.not_after.unwrap_or(0),
        caller: record.caller.as_ref().map(|c| Caller {
            pid: c.pid as i32,
            uid: c.uid as u32,
            gid: c.gid as u32,
            exe_path: c.exe_path.clone(),
            exe_sha256: c.exe_sha256.clone(),
            unit: c.unit.clone(),
        }),
        reason: 0,
        first_ms: record.first_ms.unwrap_or(0),
        last_ms: record.last_ms.unwrap_or(0),
        count: record.count.unwrap_or(0).max(0) as u64,
        detail: record.detail.clone(),
        ..Event::default()
    };
    event.policy_version = record.policy_version.unwrap_or(0);
    event.policies = record.policies.clone();
    event.jti = record.jti.clone();
    event.audience = record.audience.clone();
    if let Some(task) = &record.task {
        event.task_id = task.task_id.clone();
        event.chain = task
            .chain
            .iter()
            .map(|(task_id, spiffe_id)| TaskLink {
                task_id: task_id.clone(),
                spiffe_id: spiffe_id.clone(),
            })
            .collect();
        event.purpose = task.purpose.clone();
        event.owner = task.owner.clone();
        event.task_pid = task.pid as i32;
        if let Some(reason) = &task.end_reason {
            event.set_task_end_reason(task_end_reason_from_name(reason));
        }
    }
    if let Some(reason) = &record.reason {
        event.set_reason(reason_from_name(reason));
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::model::{new_event_id, to_json};
    use crate::proto::tessera::RevocationReason;

    #[test]
    fn records_round_trip() {
        let mut event = Event {
            id: new_event_id(),
            kind: EventKind::SvidRevoked as i32,
            time_ms: 1_700_000_000_000,
            trust_domain: "td".into(),
            entry_id: "e".into(),
            spiffe_id: "spiffe://td/x".into(),
            serial: "ab".into(),
            not_after: 1_700_000_300,
            caller: Some(Caller {
                pid: 4,
                uid: 1000,
                gid: 100,
                exe_path: "/bin/x".into(),
                exe_sha256: "00".into(),
                unit: "x.service".into(),
            }),
            ..Default::default()
        };
        event.set_reason(RevocationReason::EntryRemoved);
        let record = to_record(&event, EventKind::SvidRevoked, "n1", 5);
        assert_eq!(record.reason.as_deref(), Some("entry_removed"));
        let back = from_record(&record, "td");
        assert_eq!(
            Event {
                node_id: String::new(),
                ..back.clone()
            },
            event
        );
        assert_eq!(back.node_id, "n1");
        assert_eq!(to_json(&back, Some(3), None)["reason"], "entry_removed");
    }
}
