//! What both backends do alike with events: checking a batch before anything is written,
//! setting aside repeats, and folding the newly stored events into inventory changes, at most
//! one per SVID, entry and node, each merged into the stored row by the same rules in SQL
//! ([`SVID_MERGE`], [`ENTRY_ACTIVITY_MERGE`], [`NODE_ACTIVITY_MERGE`]) as here in memory.
//!
//! The rules are order-independent where the order of arrival is not meaningful: an SVID's
//! issuance time is the earliest reported, its revocation the earliest (with its reason), its
//! last use the latest, its uses the sum. For the facts every event about an SVID repeats
//! (entry, SPIFFE ID, node, not-after) the first one known is kept.

use std::collections::{BTreeMap, HashSet};

use super::{
    CallerRecord, EntryActivity, EventFilter, EventRecord, JwtFilter, JwtRecord, MAX_EVENTS_LISTED,
    NodeActivity, StoreError, SvidRecord, TaskRecord, event_kind,
};
use crate::events::model::{KIND_NAMES, kind_from_name};
use crate::proto::tessera::EventKind;

/// The stored columns of an event, in the order both backends bind and read them.
pub(crate) const EVENT_COLUMNS: &str = "id, kind, time_ms, node_id, entry_id, spiffe_id, serial, \
    not_after, reason, caller_pid, caller_uid, caller_gid, caller_exe_path, caller_exe_sha256, \
    caller_unit, first_ms, last_ms, count, detail, received_ms, task, policy_version, policies, \
    jti, audience";

/// The stored columns of a JWT-SVID, likewise.
pub(crate) const JWT_COLUMNS: &str = "jti, entry_id, spiffe_id, node_id, task_id, audience, \
    issued_ms, expires_at, revoked_ms, reason, last_used_ms, uses";

/// How a JWT-SVID change merges into the stored row (`ON CONFLICT (jti) DO UPDATE SET`): as
/// [`merge_jwt`] does it in memory.
pub(crate) const JWT_MERGE: &str = "
    entry_id = CASE WHEN jwts.entry_id = '' THEN excluded.entry_id ELSE jwts.entry_id END,
    spiffe_id = CASE WHEN jwts.spiffe_id = '' THEN excluded.spiffe_id ELSE jwts.spiffe_id END,
    node_id = CASE WHEN jwts.node_id = '' THEN excluded.node_id ELSE jwts.node_id END,
    task_id = CASE WHEN jwts.task_id = '' THEN excluded.task_id ELSE jwts.task_id END,
    audience = CASE WHEN jwts.audience = '[]' THEN excluded.audience ELSE jwts.audience END,
    issued_ms = CASE WHEN jwts.issued_ms IS NULL OR excluded.issued_ms < jwts.issued_ms
        THEN excluded.issued_ms ELSE jwts.issued_ms END,
    expires_at = COALESCE(jwts.expires_at, excluded.expires_at),
    reason = CASE WHEN jwts.revoked_ms IS NULL OR excluded.revoked_ms < jwts.revoked_ms
        THEN COALESCE(excluded.reason, jwts.reason) ELSE jwts.reason END,
    revoked_ms = CASE WHEN jwts.revoked_ms IS NULL OR excluded.revoked_ms < jwts.revoked_ms
        THEN COALESCE(excluded.revoked_ms, jwts.revoked_ms) ELSE jwts.revoked_ms END,
    last_used_ms = CASE WHEN jwts.last_used_ms IS NULL
            OR excluded.last_used_ms > jwts.last_used_ms
        THEN excluded.last_used_ms ELSE jwts.last_used_ms END,
    uses = CASE WHEN jwts.uses > 9223372036854775807 - excluded.uses
        THEN 9223372036854775807 ELSE jwts.uses + excluded.uses END";

/// The stored columns of a task, likewise.
pub(crate) const TASK_COLUMNS: &str = "task_id, node_id, entry_id, spiffe_id, parent_id, chain, \
    purpose, owner, pid, starter_uid, started_ms, deadline, ended_ms, end_reason, end_ordered_ms, \
    end_order_reason, end_order_detail";

/// How a task folded from new events merges into the stored row (`ON CONFLICT (task_id) DO
/// UPDATE SET` in both backends): its start and end are each the first one stored; the facts
/// every task event repeats are kept as first stored.
pub(crate) const TASK_MERGE: &str = "started_ms = COALESCE(tasks.started_ms, excluded.started_ms), \
    starter_uid = COALESCE(tasks.starter_uid, excluded.starter_uid), \
    ended_ms = COALESCE(tasks.ended_ms, excluded.ended_ms), \
    end_reason = COALESCE(tasks.end_reason, excluded.end_reason)";

/// The stored columns of an SVID, likewise.
pub(crate) const SVID_COLUMNS: &str = "serial, entry_id, spiffe_id, node_id, issued_ms, \
    not_after, revoked_ms, reason, last_used_ms, uses";

/// A caller as its six nullable columns: all `NULL` when there is none.
pub(crate) type CallerColumns = (
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The columns that store `caller`.
pub(crate) fn caller_columns(caller: Option<&CallerRecord>) -> CallerColumns {
    match caller {
        None => (None, None, None, None, None, None),
        Some(c) => (
            Some(c.pid),
            Some(c.uid),
            Some(c.gid),
            Some(c.exe_path.clone()),
            Some(c.exe_sha256.clone()),
            Some(c.unit.clone()),
        ),
    }
}

/// The caller stored in its columns: none when all are `NULL`, `Corrupt` when only some are.
pub(crate) fn caller_from_columns(
    columns: CallerColumns,
) -> Result<Option<CallerRecord>, StoreError> {
    match columns {
        (None, None, None, None, None, None) => Ok(None),
        (Some(pid), Some(uid), Some(gid), Some(exe_path), Some(exe_sha256), Some(unit)) => {
            Ok(Some(CallerRecord {
                pid,
                uid,
                gid,
                exe_path,
                exe_sha256,
                unit,
            }))
        }
        _ => Err(StoreError::corrupt(
            "an event's caller columns are only partly set",
        )),
    }
}

/// Refuses a batch that holds an event the store cannot keep, naming the first such event.
pub(crate) fn check_batch(events: &[EventRecord]) -> Result<(), StoreError> {
    for (index, event) in events.iter().enumerate() {
        let refuse = |why: String| {
            Err(StoreError::invalid(format!(
                "event {index} (id {:?}) {why}; nothing in the batch was stored",
                event.id
            )))
        };
        if event.id.is_empty() {
            return refuse("has no id".to_owned());
        }
        if !event_kind::is_known(&event.kind) {
            return refuse(format!("has the unknown kind {:?}", event.kind));
        }
        if event_kind::is_svid(&event.kind) && event.serial.is_empty() {
            return refuse(format!("is {} without a serial", event.kind));
        }
        if event_kind::is_jwt(&event.kind) && event.jti.is_empty() {
            return refuse(format!("is {} without a jti", event.kind));
        }
        if event.count.is_some_and(|count| count < 0) {
            return refuse("has a negative count".to_owned());
        }
        // PostgreSQL's text cannot hold NUL; refused here so both backends agree.
        let caller_texts = event
            .caller
            .iter()
            .flat_map(|c| [&c.exe_path, &c.exe_sha256, &c.unit]);
        let texts = [
            &event.id,
            &event.node_id,
            &event.entry_id,
            &event.spiffe_id,
            &event.serial,
            &event.detail,
            &event.jti,
        ];
        if texts
            .into_iter()
            .chain(caller_texts)
            .chain(&event.audience)
            .any(|t| t.contains('\0'))
        {
            return refuse("holds a NUL character in a text field".to_owned());
        }
    }
    Ok(())
}

/// A record of the inventory that belongs to one node, which alone may report on it: an SVID
/// (the node whose CA issued it), a task (the node it runs on), a JWT-SVID (the node it was
/// signed for). A node reporting on another's could rewrite its history, end it, or revoke it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owned {
    /// By serial, in `svids`.
    Svid,
    /// By task id, in `tasks`.
    Task,
    /// By `jti`, in `jwts`.
    Jwt,
}

impl Owned {
    /// Every kind of owned record, in the order a batch is checked.
    pub(crate) const ALL: [Self; 3] = [Self::Jwt, Self::Task, Self::Svid];

    /// The table and key column to look the owning node up in (its column `node_id`).
    pub(crate) fn table_and_key(self) -> (&'static str, &'static str) {
        match self {
            Self::Svid => ("svids", "serial"),
            Self::Task => ("tasks", "task_id"),
            Self::Jwt => ("jwts", "jti"),
        }
    }

    /// The record `event` is about, if it is about one of this kind.
    fn key_of(self, event: &EventRecord) -> Option<&str> {
        match self {
            Self::Svid => event_kind::is_svid(&event.kind).then_some(event.serial.as_str()),
            Self::Task => (event.kind == event_kind::TASK_STARTED
                || event.kind == event_kind::TASK_ENDED)
                .then_some(event.task.as_ref()?.task_id.as_str()),
            Self::Jwt => event_kind::is_jwt(&event.kind).then_some(event.jti.as_str()),
        }
    }

    /// Whether `event` must come from the record's node. The server's own events (no node) may
    /// concern any record, and any node may report the use of any token (it validated it).
    fn owner_only(self, event: &EventRecord) -> bool {
        match self {
            Self::Svid => true,
            Self::Task => !event.node_id.is_empty(),
            Self::Jwt => !event.node_id.is_empty() && event.kind != event_kind::JWT_USED,
        }
    }

    /// The records of this kind a batch is about, to look up their nodes, sorted, once each.
    pub(crate) fn keys(self, events: &[EventRecord]) -> Vec<String> {
        let keys: std::collections::BTreeSet<&str> =
            events.iter().filter_map(|e| self.key_of(e)).collect();
        keys.into_iter().map(str::to_owned).collect()
    }

    /// Refuses a batch with an event about a record another node owns; `owners` maps the
    /// batch's stored records to their node.
    pub(crate) fn check(
        self,
        events: &[EventRecord],
        owners: &std::collections::HashMap<String, String>,
    ) -> Result<(), StoreError> {
        for (index, event) in events.iter().enumerate() {
            let Some(key) = self.key_of(event).filter(|_| self.owner_only(event)) else {
                continue;
            };
            if let Some(owner) = owners.get(key)
                && !owner.is_empty()
                && *owner != event.node_id
            {
                let whose = match self {
                    Self::Svid => format!("serial {key}, which node {owner:?} issued"),
                    Self::Task => format!("task {key}, which node {owner:?} runs"),
                    Self::Jwt => {
                        format!("JWT-SVID {key}, which was signed for node {owner:?}")
                    }
                };
                return Err(StoreError::invalid(format!(
                    "event {index} (id {:?}) is about {whose}, not {:?}; nothing in the batch \
                     was stored",
                    event.id, event.node_id
                )));
            }
        }
        Ok(())
    }
}

/// Refuses a filter naming an unknown kind: it could only ever match nothing.
pub(crate) fn check_filter(filter: &EventFilter) -> Result<(), StoreError> {
    match filter.kinds.iter().find(|k| !event_kind::is_known(k)) {
        Some(kind) => Err(StoreError::invalid(format!(
            "no events have the kind {kind:?}; the kinds are {}",
            KIND_NAMES.join(", ")
        ))),
        None => Ok(()),
    }
}

/// How many events a listing returns at most.
pub(crate) fn limit(filter: &EventFilter) -> i64 {
    let limit = match filter.limit {
        0 => MAX_EVENTS_LISTED,
        n => n.min(MAX_EVENTS_LISTED),
    };
    // At most MAX_EVENTS_LISTED, so it fits.
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// The batch without events whose id came earlier in it (the first of each id is kept, in
/// order), and how many were left out.
pub(crate) fn without_repeats(events: Vec<EventRecord>) -> (Vec<EventRecord>, usize) {
    let total = events.len();
    let mut seen = HashSet::with_capacity(total);
    let unique: Vec<EventRecord> = events
        .into_iter()
        .filter(|e| seen.insert(e.id.clone()))
        .collect();
    let repeats = total - unique.len();
    (unique, repeats)
}

/// Counts as stored in an answer; a batch is never anywhere near `u32::MAX` events.
pub(crate) fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// What newly stored events change in the inventory, one change per key, ordered by key (so
/// concurrent writers lock rows in the same order).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct InventoryChanges {
    /// Merged into the stored SVID with the same serial by [`SVID_MERGE`]; `uses` is an
    /// increment.
    pub svids: Vec<SvidRecord>,
    /// Merged into the stored activity by [`ENTRY_ACTIVITY_MERGE`].
    pub entries: Vec<EntryActivity>,
    /// Merged into the stored activity by [`NODE_ACTIVITY_MERGE`].
    pub nodes: Vec<NodeActivity>,
    /// Merged into the stored task by [`TASK_MERGE`].
    pub tasks: Vec<TaskRecord>,
    /// Merged into the stored JWT-SVID with the same `jti` by [`JWT_MERGE`]; `uses` is an
    /// increment.
    pub jwts: Vec<JwtRecord>,
    /// Whether a JWT-SVID not revoked before is revoked now (agents must be told).
    pub jwt_revoked: bool,
}

impl InventoryChanges {
    /// Folds `events`, each newly stored, into one change per SVID, entry and node.
    #[cfg(test)]
    pub(crate) fn of<'a>(events: impl IntoIterator<Item = &'a EventRecord>) -> Self {
        let events: Vec<&EventRecord> = events.into_iter().collect();
        // In the tests of the folding alone, every token is held by the node reporting it.
        let holders = events
            .iter()
            .map(|e| (e.jti.clone(), e.node_id.clone()))
            .collect();
        Self::of_known(events, &holders)
    }

    /// Like [`InventoryChanges::of`], with `holders` (the stored JWT-SVIDs' nodes, by `jti`):
    /// a node's report about a token the inventory does not hold (besides those issued in
    /// `events`), one the server never signed or that was pruned long ago, is kept as an event
    /// and changes nothing else; and a use counts as its entry's activity only when the
    /// token's own node (or the server) reports it.
    pub(crate) fn of_known<'a>(
        events: impl IntoIterator<Item = &'a EventRecord>,
        holders: &std::collections::HashMap<String, String>,
    ) -> Self {
        let mut issued_now: std::collections::HashMap<&str, &str> =
            std::collections::HashMap::new();
        let mut svids: BTreeMap<&str, SvidRecord> = BTreeMap::new();
        let mut entries: BTreeMap<&str, EntryActivity> = BTreeMap::new();
        let mut nodes: BTreeMap<&str, i64> = BTreeMap::new();
        let mut tasks: BTreeMap<&str, TaskRecord> = BTreeMap::new();
        let mut jwts: BTreeMap<&str, JwtRecord> = BTreeMap::new();
        let mut jwt_revoked = false;
        for event in events {
            let mut activity = None;
            if let Some(change) = jwt_change(event) {
                if change.issued_ms.is_some() {
                    issued_now.insert(&event.jti, &event.node_id);
                }
                let holder = issued_now
                    .get(event.jti.as_str())
                    .copied()
                    .or_else(|| holders.get(&event.jti).map(String::as_str));
                if !event.node_id.is_empty() && holder.is_none() {
                    continue;
                }
                jwt_revoked |= change.revoked_ms.is_some();
                // Tokens count as the use of their entry, as certificates do, when their own
                // node says so.
                if event.node_id.is_empty() || holder == Some(&event.node_id) {
                    activity = Some((change.issued_ms, change.last_used_ms));
                }
                match jwts.get_mut(event.jti.as_str()) {
                    Some(stored) => merge_jwt(stored, change),
                    None => {
                        jwts.insert(&event.jti, change);
                    }
                }
            } else {
                if let (Some(task), Some(change)) = (&event.task, task_change(event)) {
                    match tasks.get_mut(task.task_id.as_str()) {
                        Some(stored) => merge_task(stored, change),
                        None => {
                            tasks.insert(&task.task_id, change);
                        }
                    }
                }
                if let Some(change) = svid_change(event) {
                    activity = Some((change.issued_ms, change.last_used_ms));
                    match svids.get_mut(event.serial.as_str()) {
                        Some(stored) => merge_svid(stored, change),
                        None => {
                            svids.insert(&event.serial, change);
                        }
                    }
                }
            }
            if let Some((last_issued_ms, last_used_ms)) = activity
                && !event.entry_id.is_empty()
                && (last_issued_ms, last_used_ms) != (None, None)
            {
                let activity = EntryActivity {
                    entry_id: event.entry_id.clone(),
                    last_issued_ms,
                    last_used_ms,
                };
                match entries.get_mut(event.entry_id.as_str()) {
                    Some(stored) => merge_entry_activity(stored, activity),
                    None => {
                        entries.insert(&event.entry_id, activity);
                    }
                }
            }
            if !event.node_id.is_empty() {
                let last = nodes.entry(&event.node_id).or_insert(event.time_ms);
                *last = (*last).max(event.time_ms);
            }
        }
        Self {
            svids: svids.into_values().collect(),
            entries: entries.into_values().collect(),
            nodes: nodes
                .into_iter()
                .map(|(node_id, last_event_ms)| NodeActivity {
                    node_id: node_id.to_owned(),
                    last_event_ms,
                })
                .collect(),
            tasks: tasks.into_values().collect(),
            jwts: jwts.into_values().collect(),
            jwt_revoked,
        }
    }
}

/// What one event says about its JWT-SVID; `None` for events about none.
/// Only the issuance says what the token is (entry, subject, node, task, audience, expiry): a
/// use or a revocation, which other nodes report too, changes nothing of that.
fn jwt_change(event: &EventRecord) -> Option<JwtRecord> {
    let mut change = JwtRecord {
        jti: event.jti.clone(),
        ..JwtRecord::default()
    };
    match kind_from_name(&event.kind)? {
        EventKind::JwtIssued => {
            change.entry_id = event.entry_id.clone();
            change.spiffe_id = event.spiffe_id.clone();
            change.node_id = event.node_id.clone();
            change.task_id = event
                .task
                .as_ref()
                .map(|t| t.task_id.clone())
                .unwrap_or_default();
            change.audience = event.audience.clone();
            change.expires_at = event.not_after;
            change.issued_ms = Some(event.time_ms);
        }
        EventKind::JwtRevoked => {
            change.revoked_ms = Some(event.time_ms);
            change.reason = event.reason.clone();
        }
        EventKind::JwtUsed => {
            change.last_used_ms = Some(event.last_ms.unwrap_or(event.time_ms));
            change.uses = event.count.unwrap_or(1);
        }
        _ => return None,
    }
    Some(change)
}

/// `stored` with `change` merged in, as [`JWT_MERGE`] does it.
fn merge_jwt(stored: &mut JwtRecord, change: JwtRecord) {
    for (kept, new) in [
        (&mut stored.entry_id, change.entry_id),
        (&mut stored.spiffe_id, change.spiffe_id),
        (&mut stored.node_id, change.node_id),
        (&mut stored.task_id, change.task_id),
    ] {
        if kept.is_empty() {
            *kept = new;
        }
    }
    if stored.audience.is_empty() {
        stored.audience = change.audience;
    }
    stored.issued_ms = earliest(stored.issued_ms, change.issued_ms);
    stored.expires_at = stored.expires_at.or(change.expires_at);
    if earlier(change.revoked_ms, stored.revoked_ms) {
        stored.revoked_ms = change.revoked_ms;
        stored.reason = change.reason;
    }
    stored.last_used_ms = latest(stored.last_used_ms, change.last_used_ms);
    stored.uses = stored.uses.saturating_add(change.uses);
}

/// The query for [`super::Datastore::jwts`], with its parameters in order, each written by
/// `placeholder(n)`.
pub(crate) fn jwts_query(
    filter: &JwtFilter,
    placeholder: impl Fn(usize) -> String,
) -> (String, Vec<QueryValue>) {
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    for (column, value) in [
        ("entry_id", &filter.entry_id),
        ("node_id", &filter.node_id),
        ("task_id", &filter.task_id),
    ] {
        if let Some(value) = value {
            values.push(QueryValue::Text(value.clone()));
            conditions.push(format!("{column} = {}", placeholder(values.len())));
        }
    }
    if let Some(now) = filter.live_at {
        values.push(QueryValue::Int(now));
        conditions.push(format!(
            "revoked_ms IS NULL AND (expires_at IS NULL OR expires_at > {})",
            placeholder(values.len())
        ));
    }
    let limit = if filter.limit == 0 || filter.limit > MAX_EVENTS_LISTED {
        MAX_EVENTS_LISTED
    } else {
        filter.limit
    };
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    (
        format!(
            "SELECT {JWT_COLUMNS} FROM jwts {filter}
             ORDER BY issued_ms IS NULL, issued_ms DESC, jti LIMIT {limit}"
        ),
        values,
    )
}

/// A parameter of a query built here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QueryValue {
    Text(String),
    Int(i64),
}

/// What a task event says about its task; `None` for other events.
fn task_change(event: &EventRecord) -> Option<TaskRecord> {
    let started = event.kind == event_kind::TASK_STARTED;
    if !started && event.kind != event_kind::TASK_ENDED {
        return None;
    }
    let task = event.task.as_ref()?;
    let parent_id = task
        .chain
        .len()
        .checked_sub(2)
        .and_then(|i| task.chain.get(i))
        .map(|(id, _)| id.clone());
    Some(TaskRecord {
        task_id: task.task_id.clone(),
        node_id: event.node_id.clone(),
        entry_id: event.entry_id.clone(),
        spiffe_id: event.spiffe_id.clone(),
        parent_id,
        chain: task.chain.clone(),
        purpose: task.purpose.clone(),
        owner: task.owner.clone(),
        pid: task.pid,
        starter_uid: if started {
            event.caller.as_ref().map(|c| c.uid)
        } else {
            None
        },
        started_ms: started.then_some(event.time_ms),
        deadline: event.not_after.unwrap_or(0),
        ended_ms: (!started).then_some(event.time_ms),
        end_reason: if started {
            None
        } else {
            task.end_reason.clone()
        },
        ..TaskRecord::default()
    })
}

/// [`TASK_MERGE`] in memory.
fn merge_task(stored: &mut TaskRecord, change: TaskRecord) {
    stored.started_ms = stored.started_ms.or(change.started_ms);
    stored.starter_uid = stored.starter_uid.or(change.starter_uid);
    if stored.ended_ms.is_none() {
        stored.ended_ms = change.ended_ms;
        stored.end_reason = change.end_reason;
    }
}

/// What one event says about its SVID; `None` for events about no SVID.
fn svid_change(event: &EventRecord) -> Option<SvidRecord> {
    let mut change = SvidRecord {
        serial: event.serial.clone(),
        entry_id: event.entry_id.clone(),
        spiffe_id: event.spiffe_id.clone(),
        node_id: event.node_id.clone(),
        not_after: event.not_after,
        ..SvidRecord::default()
    };
    match kind_from_name(&event.kind)? {
        EventKind::SvidIssued => change.issued_ms = Some(event.time_ms),
        EventKind::SvidRevoked => {
            change.revoked_ms = Some(event.time_ms);
            change.reason = event.reason.clone();
        }
        EventKind::SvidUsed => {
            change.last_used_ms = Some(event.last_ms.unwrap_or(event.time_ms));
            change.uses = event.count.unwrap_or(1);
        }
        _ => return None,
    }
    Some(change)
}

/// `stored` with `change` merged in, as [`SVID_MERGE`] does it.
fn merge_svid(stored: &mut SvidRecord, change: SvidRecord) {
    let replaces = revocation_replaces(&change, stored);
    for (kept, new) in [
        (&mut stored.entry_id, change.entry_id),
        (&mut stored.spiffe_id, change.spiffe_id),
        (&mut stored.node_id, change.node_id),
    ] {
        if kept.is_empty() {
            *kept = new;
        }
    }
    stored.issued_ms = earliest(stored.issued_ms, change.issued_ms);
    stored.not_after = stored.not_after.or(change.not_after);
    if replaces {
        stored.revoked_ms = change.revoked_ms;
        stored.reason = change.reason;
    }
    stored.last_used_ms = latest(stored.last_used_ms, change.last_used_ms);
    stored.uses = stored.uses.saturating_add(change.uses);
}

/// `stored` with `change` merged in, as [`ENTRY_ACTIVITY_MERGE`] does it.
fn merge_entry_activity(stored: &mut EntryActivity, change: EntryActivity) {
    stored.last_issued_ms = latest(stored.last_issued_ms, change.last_issued_ms);
    stored.last_used_ms = latest(stored.last_used_ms, change.last_used_ms);
}

/// Whether the revocation `change` reports replaces the one `stored` has: the earliest counts,
/// but one that took the SVID out of use always wins over a rotation's (`superseded`,
/// `ca_rotated`), after which its holder could still use it. As [`SVID_MERGE`] decides.
fn revocation_replaces(change: &SvidRecord, stored: &SvidRecord) -> bool {
    let replaced_only =
        |reason: &Option<String>| matches!(reason.as_deref(), Some("superseded" | "ca_rotated"));
    match (change.revoked_ms, stored.revoked_ms) {
        (_, None) => change.revoked_ms.is_some(),
        (None, Some(_)) => false,
        (Some(new), Some(kept)) => {
            let (new_replaced, kept_replaced) =
                (replaced_only(&change.reason), replaced_only(&stored.reason));
            (kept_replaced && !new_replaced) || (new < kept && new_replaced == kept_replaced)
        }
    }
}

/// True when `new` is known and before `kept` (or `kept` is not known).
fn earlier(new: Option<i64>, kept: Option<i64>) -> bool {
    match (new, kept) {
        (Some(new), Some(kept)) => new < kept,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    if earlier(b, a) { b } else { a }
}

fn latest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// The query for the SVIDs of one entry and/or one node (a condition for each given, so that
/// their indexes serve it), with the parameters written by `placeholder(1)`, `placeholder(2)`:
/// the entry first.
pub(crate) fn svids_query(
    entry_id: bool,
    node_id: bool,
    placeholder: impl Fn(usize) -> String,
) -> String {
    let mut conditions = Vec::new();
    for (given, column) in [(entry_id, "entry_id"), (node_id, "node_id")] {
        if given {
            conditions.push(format!("{column} = {}", placeholder(conditions.len() + 1)));
        }
    }
    format!(
        "SELECT {SVID_COLUMNS} FROM svids {} {}
         ORDER BY issued_ms IS NULL, issued_ms, serial",
        if conditions.is_empty() { "" } else { "WHERE" },
        conditions.join(" AND ")
    )
}

/// The SQL of [`merge_svid`]: the `DO UPDATE SET` of an upsert into `svids` whose new row
/// (`excluded`) is a change. Every right-hand side sees the stored row as it was. The same text
/// serves SQLite and PostgreSQL.
pub(crate) const SVID_MERGE: &str = "
    entry_id = CASE WHEN svids.entry_id = '' THEN excluded.entry_id ELSE svids.entry_id END,
    spiffe_id = CASE WHEN svids.spiffe_id = '' THEN excluded.spiffe_id ELSE svids.spiffe_id END,
    node_id = CASE WHEN svids.node_id = '' THEN excluded.node_id ELSE svids.node_id END,
    issued_ms = CASE WHEN svids.issued_ms IS NULL OR excluded.issued_ms < svids.issued_ms
        THEN excluded.issued_ms ELSE svids.issued_ms END,
    not_after = COALESCE(svids.not_after, excluded.not_after),
    revoked_ms = CASE WHEN svids.revoked_ms IS NULL
            OR (excluded.revoked_ms IS NOT NULL
                AND ((COALESCE(svids.reason, '') IN ('superseded', 'ca_rotated')
                        AND COALESCE(excluded.reason, '') NOT IN ('superseded', 'ca_rotated'))
                    OR (excluded.revoked_ms < svids.revoked_ms
                        AND (COALESCE(svids.reason, '') IN ('superseded', 'ca_rotated'))
                            = (COALESCE(excluded.reason, '') IN ('superseded', 'ca_rotated')))))
        THEN excluded.revoked_ms ELSE svids.revoked_ms END,
    reason = CASE WHEN svids.revoked_ms IS NULL
            OR (excluded.revoked_ms IS NOT NULL
                AND ((COALESCE(svids.reason, '') IN ('superseded', 'ca_rotated')
                        AND COALESCE(excluded.reason, '') NOT IN ('superseded', 'ca_rotated'))
                    OR (excluded.revoked_ms < svids.revoked_ms
                        AND (COALESCE(svids.reason, '') IN ('superseded', 'ca_rotated'))
                            = (COALESCE(excluded.reason, '') IN ('superseded', 'ca_rotated')))))
        THEN excluded.reason ELSE svids.reason END,
    last_used_ms = CASE WHEN svids.last_used_ms IS NULL
            OR excluded.last_used_ms > svids.last_used_ms
        THEN excluded.last_used_ms ELSE svids.last_used_ms END,
    uses = CASE WHEN svids.uses > 9223372036854775807 - excluded.uses
        THEN 9223372036854775807 ELSE svids.uses + excluded.uses END";

/// The SQL of [`merge_entry_activity`], likewise for `entry_activity`.
pub(crate) const ENTRY_ACTIVITY_MERGE: &str = "
    last_issued_ms = CASE WHEN entry_activity.last_issued_ms IS NULL
            OR excluded.last_issued_ms > entry_activity.last_issued_ms
        THEN excluded.last_issued_ms ELSE entry_activity.last_issued_ms END,
    last_used_ms = CASE WHEN entry_activity.last_used_ms IS NULL
            OR excluded.last_used_ms > entry_activity.last_used_ms
        THEN excluded.last_used_ms ELSE entry_activity.last_used_ms END";

/// The SQL that merges a node's latest event into `node_activity`, likewise.
pub(crate) const NODE_ACTIVITY_MERGE: &str = "
    last_event_ms = CASE WHEN excluded.last_event_ms > node_activity.last_event_ms
        THEN excluded.last_event_ms ELSE node_activity.last_event_ms END";

/// `not_after` values (Unix seconds) below this are before the instant `ms` (Unix
/// milliseconds): `not_after * 1000 < ms` without the multiplication, which could overflow.
pub(crate) fn seconds_before(ms: i64) -> i64 {
    ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0)
}

/// How many events one pruning transaction deletes at most.
pub(crate) const PRUNE_CHUNK: i64 = 5_000;

/// Change log records older than this (Unix ms) are pruned: those past
/// [`super::CHANGE_LOG_KEEP`], or past the events' own horizon when that is shorter.
pub(super) fn change_log_horizon(events_older_than_ms: i64, now: i64) -> i64 {
    let keep = i64::try_from(super::CHANGE_LOG_KEEP.as_millis()).unwrap_or(i64::MAX);
    events_older_than_ms.max(now.saturating_mul(1000).saturating_sub(keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, kind: &str, serial: &str, time_ms: i64) -> EventRecord {
        EventRecord {
            id: id.to_owned(),
            kind: kind.to_owned(),
            time_ms,
            node_id: "n1".to_owned(),
            entry_id: "e1".to_owned(),
            spiffe_id: "spiffe://example.org/w".to_owned(),
            serial: serial.to_owned(),
            not_after: Some(2_000),
            ..EventRecord::default()
        }
    }

    #[test]
    fn batch_checks_name_the_event() {
        let good = event("a", event_kind::SVID_ISSUED, "01", 1);
        assert!(check_batch(std::slice::from_ref(&good)).is_ok());
        let cases = [
            (
                EventRecord {
                    id: String::new(),
                    ..good.clone()
                },
                "no id",
            ),
            (
                EventRecord {
                    kind: "svid_lost".to_owned(),
                    ..good.clone()
                },
                "svid_lost",
            ),
            (
                EventRecord {
                    serial: String::new(),
                    ..good.clone()
                },
                "without a serial",
            ),
            (
                EventRecord {
                    count: Some(-1),
                    ..good.clone()
                },
                "negative count",
            ),
        ];
        for (bad, why) in cases {
            let err = check_batch(&[good.clone(), bad]).unwrap_err();
            assert!(
                matches!(&err, StoreError::Invalid { reason, .. } if reason.contains("event 1") && reason.contains(why)),
                "{err}"
            );
        }
        // Events about no SVID need no serial.
        let denied = EventRecord {
            serial: String::new(),
            ..event("d", event_kind::ATTESTATION_DENIED, "", 1)
        };
        assert!(check_batch(&[denied]).is_ok());
    }

    #[test]
    fn repeats_within_a_batch_are_left_out() {
        let a = event("a", event_kind::SVID_USED, "01", 1);
        let b = event("b", event_kind::SVID_USED, "01", 2);
        let a_again = event("a", event_kind::SVID_USED, "01", 3);
        let (unique, repeats) = without_repeats(vec![a.clone(), b.clone(), a_again]);
        assert_eq!((unique, repeats), (vec![a, b], 1));
    }

    #[test]
    fn limits_are_capped() {
        let with = |limit| {
            limit_of(EventFilter {
                limit,
                ..EventFilter::default()
            })
        };
        fn limit_of(filter: EventFilter) -> i64 {
            limit(&filter)
        }
        assert_eq!(with(0), 10_000);
        assert_eq!(with(5), 5);
        assert_eq!(with(usize::MAX), 10_000);
    }

    #[test]
    fn changes_fold_per_svid_in_any_order() {
        let mut revoked = event("r", event_kind::SVID_REVOKED, "01", 50);
        revoked.reason = Some("entry_removed".to_owned());
        let mut revoked_later = event("r2", event_kind::SVID_REVOKED, "01", 60);
        revoked_later.reason = Some("superseded".to_owned());
        let mut used = event("u", event_kind::SVID_USED, "01", 40);
        used.last_ms = Some(45);
        used.count = Some(3);
        let mut used_again = event("u2", event_kind::SVID_USED, "01", 30);
        used_again.count = None; // one delivery, at time_ms
        let issued = EventRecord {
            node_id: String::new(),
            ..event("i", event_kind::SVID_ISSUED, "01", 10)
        };
        let other = event("o", event_kind::NODE_ATTESTED, "", 70);
        let expected = SvidRecord {
            serial: "01".to_owned(),
            entry_id: "e1".to_owned(),
            spiffe_id: "spiffe://example.org/w".to_owned(),
            node_id: "n1".to_owned(),
            issued_ms: Some(10),
            not_after: Some(2_000),
            revoked_ms: Some(50),
            reason: Some("entry_removed".to_owned()),
            last_used_ms: Some(45),
            uses: 4,
        };
        let forward = [
            &revoked_later,
            &issued,
            &used,
            &revoked,
            &used_again,
            &other,
        ];
        let mut backward = forward;
        backward.reverse();
        for order in [forward, backward] {
            let changes = InventoryChanges::of(order);
            assert_eq!(changes.svids, std::slice::from_ref(&expected));
            assert_eq!(
                changes.entries,
                [EntryActivity {
                    entry_id: "e1".to_owned(),
                    last_issued_ms: Some(10),
                    last_used_ms: Some(45),
                }]
            );
            assert_eq!(
                changes.nodes,
                [NodeActivity {
                    node_id: "n1".to_owned(),
                    last_event_ms: 70,
                }]
            );
        }
    }

    #[test]
    fn revocations_alone_touch_no_entry_activity() {
        let changes = InventoryChanges::of([&event("r", event_kind::SVID_REVOKED, "01", 5)]);
        assert_eq!(changes.svids.len(), 1);
        assert!(changes.entries.is_empty());
    }

    #[test]
    fn seconds_before_rounds_up() {
        assert_eq!(seconds_before(5_000), 5);
        assert_eq!(seconds_before(5_001), 6);
        assert_eq!(seconds_before(-1), 0);
        assert_eq!(seconds_before(-1_000), -1);
    }
}
