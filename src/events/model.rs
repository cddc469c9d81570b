//! The event model shared by agent and server: ids, kind and reason names, the caller's facts,
//! the checks an ingested event must pass, and the JSON form. (The stored form and its
//! conversions are the datastore's: `store::wire`.)

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::attest::CallerFacts;
use crate::proto::tessera::{Caller, Event, EventKind, RevocationReason, TaskEndReason};

/// Most events one batch may carry.
pub const MAX_BATCH_EVENTS: usize = 1000;
/// Longest text field of an event (paths, ids, details).
const MAX_FIELD_LEN: usize = 4096;

/// A new event id: a UUIDv7 (time-ordered: ids made by one process sort in the order they were
/// made), lowercase with dashes.
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Whether `reason` takes a certificate out of use (it is listed in a CRL), rather than
/// replacing it with a newer one its holder may keep using until it expires.
pub fn takes_out_of_use(reason: RevocationReason) -> bool {
    !matches!(
        reason,
        RevocationReason::Superseded | RevocationReason::CaRotated | RevocationReason::Unspecified
    )
}

/// The id of the event recording that the certificate with `serial` was taken out of use:
/// derived from the serial (a UUIDv8), so that whoever records it (the agent that revoked it,
/// the server that ordered it, a retry) records it once.
pub fn revocation_event_id(serial: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("svid-revoked:{serial}").as_bytes(),
    );
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Uuid::new_v8(bytes).to_string()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Names of an enum's values as tessera stores and shows them: prost's generated names
/// (`EVENT_KIND_SVID_USED`) without the enum's prefix, in lowercase (`svid_used`). The proto
/// files are the one table of names; these are read from it once.
fn names_of<E: Copy + TryFrom<i32>>(
    prefix: &str,
    proto_name: fn(&E) -> &'static str,
) -> Vec<(E, String)> {
    // Enum values are small; a value the enum does not define is skipped.
    (0..=255)
        .filter_map(|n| E::try_from(n).ok())
        .map(|value| {
            let name = proto_name(&value);
            let short = name.strip_prefix(prefix).unwrap_or(name);
            (value, short.to_ascii_lowercase())
        })
        .collect()
}

static KINDS: LazyLock<Vec<(EventKind, String)>> =
    LazyLock::new(|| names_of("EVENT_KIND_", EventKind::as_str_name));

static REASONS: LazyLock<Vec<(RevocationReason, String)>> =
    LazyLock::new(|| names_of("REVOCATION_REASON_", RevocationReason::as_str_name));

/// The stored and displayed name of a kind (`svid_issued`, ...; `unspecified` for 0).
pub fn kind_name(kind: EventKind) -> &'static str {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("unspecified", |(_, name)| name.as_str())
}

/// Every kind name but `unspecified`, in the order of the proto, for messages and CLI help.
pub static KIND_NAMES: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    KINDS
        .iter()
        .filter(|(k, _)| *k != EventKind::Unspecified)
        .map(|(_, name)| name.as_str())
        .collect()
});

/// Parses a kind name; `None` for `unspecified` and for names this code does not know.
pub fn kind_from_name(name: &str) -> Option<EventKind> {
    KINDS
        .iter()
        .find(|(k, n)| *k != EventKind::Unspecified && n == name)
        .map(|(k, _)| *k)
}

static TASK_END_REASONS: LazyLock<Vec<(TaskEndReason, String)>> =
    LazyLock::new(|| names_of("TASK_END_REASON_", TaskEndReason::as_str_name));

/// The stored and displayed name of why a task ended (`process_exited`, `parent_ended`, ...).
pub fn task_end_reason_name(reason: TaskEndReason) -> &'static str {
    TASK_END_REASONS
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or("unspecified", |(_, name)| name.as_str())
}

/// Parses a task end reason's name; `Unspecified` for a name this code does not know.
pub fn task_end_reason_from_name(name: &str) -> TaskEndReason {
    TASK_END_REASONS
        .iter()
        .find(|(_, n)| n == name)
        .map_or(TaskEndReason::Unspecified, |(r, _)| *r)
}

/// The stored and displayed name of a revocation reason.
pub fn reason_name(reason: RevocationReason) -> &'static str {
    REASONS
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or("unspecified", |(_, name)| name.as_str())
}

/// Parses a revocation reason's name; `Unspecified` for a name this code does not know.
pub fn reason_from_name(name: &str) -> RevocationReason {
    REASONS
        .iter()
        .find(|(_, n)| n == name)
        .map_or(RevocationReason::Unspecified, |(r, _)| *r)
}

/// The caller's facts as events carry them.
pub fn caller_of(facts: &CallerFacts) -> Caller {
    Caller {
        pid: facts.pid,
        uid: facts.uid,
        gid: facts.gid,
        exe_path: facts.exe_path.clone(),
        exe_sha256: facts.exe_sha256.clone().unwrap_or_default(),
        unit: facts.systemd_unit.clone().unwrap_or_default(),
    }
}

/// Why an ingested event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {index} ({id:?}): {reason}")]
pub struct InvalidEvent {
    /// Position in its batch.
    pub index: usize,
    /// Its id as sent.
    pub id: String,
    /// What is wrong.
    pub reason: String,
}

/// Checks an event from a node: a well-formed id, a known kind, the fields its kind needs, and
/// no field longer than it could honestly be.
pub fn check_event(index: usize, event: &Event) -> Result<EventKind, InvalidEvent> {
    let invalid = |reason: String| InvalidEvent {
        index,
        id: event.id.chars().take(64).collect(),
        reason,
    };
    if !is_uuid(&event.id) {
        return Err(invalid(
            "id must be a lowercase UUID (8-4-4-4-12 hex digits)".into(),
        ));
    }
    let kind = EventKind::try_from(event.kind)
        .ok()
        .filter(|k| *k != EventKind::Unspecified)
        .ok_or_else(|| invalid(format!("unknown kind {}", event.kind)))?;
    let texts = [
        &event.trust_domain,
        &event.node_id,
        &event.entry_id,
        &event.spiffe_id,
        &event.serial,
        &event.detail,
        &event.jti,
    ];
    let caller_texts = event
        .caller
        .as_ref()
        .map(|c| [&c.exe_path, &c.exe_sha256, &c.unit]);
    if texts
        .iter()
        .copied()
        .chain(caller_texts.iter().flatten().copied())
        .any(|t| t.len() > MAX_FIELD_LEN)
    {
        return Err(invalid(format!(
            "a field is longer than {MAX_FIELD_LEN} bytes"
        )));
    }
    let needs_svid = matches!(
        kind,
        EventKind::SvidIssued | EventKind::SvidUsed | EventKind::SvidRevoked
    );
    if needs_svid && (event.serial.is_empty() || event.spiffe_id.is_empty()) {
        return Err(invalid(format!(
            "{} needs serial and spiffe_id",
            kind_name(kind)
        )));
    }
    if kind == EventKind::SvidUsed && event.count == 0 {
        return Err(invalid("svid_used needs a count of at least 1".into()));
    }
    let about_jwt = matches!(
        kind,
        EventKind::JwtIssued | EventKind::JwtUsed | EventKind::JwtRevoked
    );
    if about_jwt && (event.jti.is_empty() || event.spiffe_id.is_empty()) {
        return Err(invalid(format!(
            "{} needs jti and spiffe_id",
            kind_name(kind)
        )));
    }
    if kind == EventKind::JwtUsed && event.count == 0 {
        return Err(invalid("jwt_used needs a count of at least 1".into()));
    }
    if (!about_jwt && !event.jti.is_empty())
        || event.audience.len() > MAX_AUDIENCES
        || event
            .audience
            .iter()
            .any(|a| a.is_empty() || a.len() > MAX_FIELD_LEN || a.contains('\0'))
    {
        return Err(invalid(format!(
            "jti is for JWT events only, and an audience has at most {MAX_AUDIENCES} values of \
             1 to {MAX_FIELD_LEN} bytes"
        )));
    }
    if let Some(text) = texts
        .iter()
        .copied()
        .chain(caller_texts.iter().flatten().copied())
        .find(|t| t.contains('\0'))
    {
        return Err(invalid(format!(
            "a field holds a NUL character: {:?}",
            text.chars().take(64).collect::<String>()
        )));
    }
    if !event.serial.is_empty() && !is_serial(&event.serial) {
        return Err(invalid(format!(
            "serial {:?} is not an X.509 serial: 2 to {} lowercase hex digits",
            event.serial.chars().take(64).collect::<String>(),
            MAX_SERIAL_HEX
        )));
    }
    let now = now_ms();
    let latest_ms = now.saturating_add(MAX_CLOCK_AHEAD_MS);
    for (name, ms) in [
        ("time_ms", Some(event.time_ms)),
        ("first_ms", (event.first_ms != 0).then_some(event.first_ms)),
        ("last_ms", (event.last_ms != 0).then_some(event.last_ms)),
    ] {
        if let Some(ms) = ms
            && !(EARLIEST_EVENT_MS..=latest_ms).contains(&ms)
        {
            return Err(invalid(format!(
                "{name} = {ms} is not a time between 2020-01-01 and a day from now ({latest_ms})"
            )));
        }
    }
    if event.not_after != 0 && !(1..=LAST_PRINTABLE_SECOND).contains(&event.not_after) {
        return Err(invalid(format!(
            "not_after = {} is not a time between 1970 and 9999",
            event.not_after
        )));
    }
    check_task(kind, event).map_err(invalid)?;
    if event.policies.len() > MAX_POLICY_IDS
        || event
            .policies
            .iter()
            .any(|p| p.is_empty() || p.len() > MAX_FIELD_LEN || p.contains('\0'))
        || event.policy_version < 0
    {
        return Err(invalid(format!(
            "policies: at most {MAX_POLICY_IDS} ids of 1 to {MAX_FIELD_LEN} bytes, and a policy_version of 0 or more"
        )));
    }
    Ok(kind)
}

/// Most audience values one event may carry.
const MAX_AUDIENCES: usize = 32;

/// Most policy ids one event may name.
const MAX_POLICY_IDS: usize = 64;

/// Longest delegation chain an event may carry.
const MAX_CHAIN: usize = 32;

/// The task fields: required on task events, optional on SVID events (a task SVID's), absent
/// elsewhere; a task id is a UUID, and the chain ends with the task itself.
fn check_task(kind: EventKind, event: &Event) -> Result<(), String> {
    let task_kind = matches!(kind, EventKind::TaskStarted | EventKind::TaskEnded);
    if event.task_id.is_empty() {
        if task_kind {
            return Err(format!("{} needs task_id", kind_name(kind)));
        }
        return Ok(());
    }
    if !task_kind
        && !matches!(
            kind,
            EventKind::SvidIssued
                | EventKind::SvidUsed
                | EventKind::SvidRevoked
                | EventKind::JwtIssued
                | EventKind::JwtUsed
                | EventKind::JwtRevoked
        )
    {
        return Err(format!("{} carries no task", kind_name(kind)));
    }
    if !is_uuid(&event.task_id) {
        return Err("task_id must be a lowercase UUID".into());
    }
    if event.chain.is_empty() || event.chain.len() > MAX_CHAIN {
        return Err(format!("a task's chain has 1 to {MAX_CHAIN} links"));
    }
    if event.chain.last().map(|l| l.task_id.as_str()) != Some(event.task_id.as_str()) {
        return Err("a task's chain must end with the task itself".into());
    }
    for link in &event.chain {
        if !is_uuid(&link.task_id)
            || link.spiffe_id.len() > MAX_FIELD_LEN
            || link.spiffe_id.contains('\0')
        {
            return Err("a chain link needs a UUID task_id and a SPIFFE ID".into());
        }
    }
    if [&event.purpose, &event.owner]
        .iter()
        .any(|t| t.len() > MAX_FIELD_LEN || t.contains('\0'))
    {
        return Err(format!(
            "purpose and owner are text of at most {MAX_FIELD_LEN} bytes"
        ));
    }
    if task_kind && (event.entry_id.is_empty() || event.spiffe_id.is_empty()) {
        return Err(format!("{} needs entry_id and spiffe_id", kind_name(kind)));
    }
    Ok(())
}

/// Events from before this (2020-01-01, before tessera existed) are refused.
const EARLIEST_EVENT_MS: i64 = 1_577_836_800_000;
/// How far ahead of the server's clock an event's time may be.
const MAX_CLOCK_AHEAD_MS: i64 = 24 * 3600 * 1000;
/// The last second RFC 3339 can show (9999-12-31T23:59:59Z).
const LAST_PRINTABLE_SECOND: i64 = 253_402_300_799;
/// X.509 serials are at most 20 bytes.
const MAX_SERIAL_HEX: usize = 40;

/// True for a UUID as tessera writes them: lowercase hex in groups of 8-4-4-4-12.
fn is_uuid(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(b),
        })
}

/// True for a certificate serial as tessera writes them: whole bytes in lowercase hex.
fn is_serial(text: &str) -> bool {
    (2..=MAX_SERIAL_HEX).contains(&text.len())
        && text.len().is_multiple_of(2)
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Milliseconds since the epoch in RFC 3339, or `None` for an instant it cannot show (before
/// 1970 or after 9999): stored values are shown, never a reason to fail.
pub fn rfc3339_ms(ms: i64) -> Option<String> {
    let ms = u64::try_from(ms).ok()?;
    let last = u64::try_from(LAST_PRINTABLE_SECOND).ok()? * 1000 + 999;
    if ms > last {
        return None;
    }
    let at = UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms))?;
    Some(humantime::format_rfc3339_millis(at).to_string())
}

/// One time in JSON output, by the rule all of tessera's JSON follows (the CLI's and the audit
/// log's): `<name>` is RFC 3339 in UTC with milliseconds, `<name>_ms` is Unix milliseconds, both
/// `null` when the time is absent. A time RFC 3339 cannot show (before 1970, after 9999) keeps its
/// number and has a `null` string. Flatten it into a serialized struct
/// (`#[serde(flatten)]`) or `put` it into a JSON object.
#[derive(Debug, Clone, Copy)]
pub struct JsonTime {
    name: &'static str,
    ms: Option<i64>,
}

impl JsonTime {
    /// A time in Unix milliseconds, `None` when absent.
    pub fn from_ms(name: &'static str, ms: Option<i64>) -> Self {
        Self { name, ms }
    }

    /// A time in Unix seconds as the API stores it: 0 means never set.
    pub fn from_seconds(name: &'static str, seconds: i64) -> Self {
        let ms = (seconds != 0).then(|| seconds.saturating_mul(1000));
        Self { name, ms }
    }

    /// The RFC 3339 form, `None` when absent or not showable.
    fn text(&self) -> Option<String> {
        self.ms.and_then(rfc3339_ms)
    }

    /// Adds both fields to `object`; does nothing if it is not a JSON object.
    pub fn put(self, object: &mut serde_json::Value) {
        if let Some(map) = object.as_object_mut() {
            map.insert(self.name.to_owned(), self.text().into());
            map.insert(format!("{}_ms", self.name), self.ms.into());
        }
    }
}

impl serde::Serialize for JsonTime {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry(self.name, &self.text())?;
        map.serialize_entry(&format!("{}_ms", self.name), &self.ms)?;
        map.end()
    }
}

/// An event as one JSON object (the audit log's and the CLI's shape): kinds and reasons by
/// name, times in milliseconds and RFC 3339.
pub fn to_json(event: &Event, seq: Option<i64>, received_ms: Option<i64>) -> serde_json::Value {
    let kind = EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified);
    let mut value = serde_json::json!({
        "id": event.id,
        "kind": kind_name(kind),
        "trust_domain": event.trust_domain,
        "node_id": event.node_id,
        "entry_id": event.entry_id,
        "spiffe_id": event.spiffe_id,
        "serial": event.serial,
        "caller": event.caller.as_ref().map(|c| serde_json::json!({
            "pid": c.pid, "uid": c.uid, "gid": c.gid,
            "exe_path": c.exe_path, "exe_sha256": c.exe_sha256, "unit": c.unit,
        })),
        "detail": event.detail,
    });
    JsonTime::from_ms("time", Some(event.time_ms)).put(&mut value);
    JsonTime::from_seconds("not_after", event.not_after).put(&mut value);
    if matches!(kind, EventKind::SvidRevoked | EventKind::JwtRevoked) {
        value["reason"] = reason_name(event.reason()).into();
    }
    if !event.jti.is_empty() {
        value["jti"] = event.jti.clone().into();
    }
    if kind == EventKind::JwtIssued {
        value["audience"] = event.audience.clone().into();
    }
    // Refusals carry a count when the standalone recorder aggregated them.
    if matches!(kind, EventKind::SvidUsed | EventKind::JwtUsed)
        || (kind == EventKind::AttestationDenied && event.count > 0)
    {
        let set = |ms: i64| (ms != 0).then_some(ms);
        JsonTime::from_ms("first", set(event.first_ms)).put(&mut value);
        JsonTime::from_ms("last", set(event.last_ms)).put(&mut value);
        value["count"] = event.count.into();
    }
    if !event.task_id.is_empty() {
        value["task_id"] = event.task_id.clone().into();
        value["chain"] = event
            .chain
            .iter()
            .map(|l| serde_json::json!({ "task_id": l.task_id, "spiffe_id": l.spiffe_id }))
            .collect::<Vec<_>>()
            .into();
    }
    if matches!(kind, EventKind::TaskStarted | EventKind::TaskEnded) {
        value["purpose"] = event.purpose.clone().into();
        value["owner"] = event.owner.clone().into();
        value["task_pid"] = event.task_pid.into();
    }
    if kind == EventKind::TaskEnded {
        value["task_end_reason"] = task_end_reason_name(event.task_end_reason()).into();
    }
    if matches!(
        kind,
        EventKind::SvidIssued | EventKind::TaskStarted | EventKind::PolicyDenied
    ) {
        value["policy_version"] = event.policy_version.into();
    }
    if kind == EventKind::PolicyDenied {
        value["policies"] = event.policies.clone().into();
    }
    if let Some(seq) = seq {
        value["seq"] = seq.into();
    }
    if received_ms.is_some() {
        JsonTime::from_ms("received", received_ms).put(&mut value);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keeps_the_number_of_a_time_past_year_9999() {
        let event = Event {
            time_ms: i64::MAX,
            ..Default::default()
        };
        let json = to_json(&event, None, None);
        assert_eq!(json["time"], serde_json::Value::Null);
        assert_eq!(json["time_ms"], i64::MAX);
    }

    #[test]
    fn every_time_in_event_json_is_rfc3339_and_milliseconds() {
        let used = Event {
            id: new_event_id(),
            kind: EventKind::SvidUsed as i32,
            time_ms: 1_800_000_000_123,
            not_after: 1_800_003_600,
            first_ms: 1_800_000_000_000,
            last_ms: 1_800_000_000_100,
            count: 2,
            ..Default::default()
        };
        let json = to_json(&used, Some(7), Some(1_800_000_001_000));
        for (name, text, ms) in [
            ("time", "2027-01-15T08:00:00.123Z", 1_800_000_000_123_i64),
            ("not_after", "2027-01-15T09:00:00.000Z", 1_800_003_600_000),
            ("first", "2027-01-15T08:00:00.000Z", 1_800_000_000_000),
            ("last", "2027-01-15T08:00:00.100Z", 1_800_000_000_100),
            ("received", "2027-01-15T08:00:01.000Z", 1_800_000_001_000),
        ] {
            assert_eq!(json[name], text, "{json}");
            assert_eq!(json[format!("{name}_ms")], ms, "{json}");
        }
        let issued_without_expiry = Event {
            kind: EventKind::SvidIssued as i32,
            time_ms: 1_800_000_000_000,
            ..Default::default()
        };
        let json = to_json(&issued_without_expiry, None, None);
        assert_eq!(json["not_after"], serde_json::Value::Null, "{json}");
        assert_eq!(json["not_after_ms"], serde_json::Value::Null, "{json}");
    }

    #[test]
    fn ids_are_unique_time_ordered_uuid_v7() {
        let ids: Vec<String> = (0..100).map(|_| new_event_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let a = ids[0].clone();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "7");
        let event = Event {
            id: a,
            kind: EventKind::SvidIssued as i32,
            time_ms: now_ms(),
            serial: "ab".into(),
            spiffe_id: "spiffe://td/x".into(),
            ..Default::default()
        };
        assert_eq!(check_event(0, &event), Ok(EventKind::SvidIssued));
    }

    #[test]
    fn malformed_events_are_refused_with_the_reason() {
        let good = Event {
            id: new_event_id(),
            kind: EventKind::SvidUsed as i32,
            time_ms: now_ms(),
            serial: "ab".into(),
            spiffe_id: "spiffe://td/x".into(),
            count: 3,
            ..Default::default()
        };
        assert!(check_event(0, &good).is_ok());
        let cases = [
            (
                Event {
                    id: "x".into(),
                    ..good.clone()
                },
                "lowercase UUID",
            ),
            (
                Event {
                    kind: 99,
                    ..good.clone()
                },
                "unknown kind",
            ),
            (
                Event {
                    serial: String::new(),
                    ..good.clone()
                },
                "needs serial",
            ),
            (
                Event {
                    count: 0,
                    ..good.clone()
                },
                "count",
            ),
            (
                Event {
                    detail: "x".repeat(5000),
                    ..good.clone()
                },
                "longer than",
            ),
            (
                Event {
                    time_ms: 0,
                    ..good.clone()
                },
                "time_ms",
            ),
        ];
        for (event, want) in cases {
            let err = check_event(7, &event).unwrap_err().to_string();
            assert!(err.contains(want) && err.starts_with("event 7"), "{err}");
        }
    }

    #[test]
    fn events_outside_sane_bounds_are_refused() {
        let good = Event {
            id: new_event_id(),
            kind: EventKind::SvidIssued as i32,
            time_ms: now_ms(),
            serial: "0a1b".into(),
            spiffe_id: "spiffe://td/x".into(),
            not_after: 1_900_000_000,
            ..Default::default()
        };
        assert!(check_event(0, &good).is_ok());
        let cases = [
            (
                Event {
                    id: "0123456789abcdef0123456789abcdef----".into(),
                    ..good.clone()
                },
                "8-4-4-4-12",
            ),
            (
                Event {
                    time_ms: 253_402_300_800_000,
                    ..good.clone()
                },
                "time_ms = 253402300800000",
            ),
            (
                Event {
                    time_ms: 1,
                    ..good.clone()
                },
                "time_ms = 1 ",
            ),
            (
                Event {
                    not_after: i64::MAX,
                    ..good.clone()
                },
                "not_after",
            ),
            (
                Event {
                    serial: "../etc".into(),
                    ..good.clone()
                },
                "serial \"../etc\"",
            ),
            (
                Event {
                    serial: "ABCD".into(),
                    ..good.clone()
                },
                "lowercase hex",
            ),
            (
                Event {
                    detail: "a\0b".into(),
                    ..good.clone()
                },
                "NUL",
            ),
        ];
        for (event, want) in cases {
            let err = check_event(2, &event).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err}");
        }
    }

    #[test]
    fn json_never_panics_on_stored_times() {
        for ms in [253_402_300_800_000, i64::MAX, i64::MIN, -1] {
            let event = Event {
                id: new_event_id(),
                kind: EventKind::SvidIssued as i32,
                time_ms: ms,
                ..Default::default()
            };
            let json = to_json(&event, None, None);
            assert_eq!(json["time"], serde_json::Value::Null, "{ms}");
            assert_eq!(json["time_ms"], ms);
        }
        assert_eq!(
            rfc3339_ms(253_402_300_799_999).as_deref(),
            Some("9999-12-31T23:59:59.999Z")
        );
    }

    #[test]
    fn names_come_from_the_proto_and_round_trip() {
        assert_eq!(
            *KIND_NAMES,
            [
                "svid_issued",
                "svid_used",
                "svid_revoked",
                "attestation_denied",
                "node_attested",
                "node_evicted",
                "issuance_anomaly",
                "task_started",
                "task_ended",
                "policy_denied",
                "jwt_issued",
                "jwt_used",
                "jwt_revoked",
            ]
        );
        for name in KIND_NAMES.iter() {
            assert_eq!(kind_name(kind_from_name(name).unwrap()), *name);
        }
        assert_eq!(kind_name(EventKind::Unspecified), "unspecified");
        assert_eq!(kind_from_name("unspecified"), None);
        assert_eq!(kind_from_name("SVID_ISSUED"), None);
        assert_eq!(kind_from_name("EVENT_KIND_SVID_ISSUED"), None);
        let reasons = [
            (RevocationReason::EntryRemoved, "entry_removed"),
            (RevocationReason::EntryChanged, "entry_changed"),
            (
                RevocationReason::RegistrationExpired,
                "registration_expired",
            ),
            (RevocationReason::NodeEvicted, "node_evicted"),
            (RevocationReason::Superseded, "superseded"),
            (RevocationReason::CaRotated, "ca_rotated"),
            (RevocationReason::Operator, "operator"),
            (RevocationReason::Inactive, "inactive"),
            (RevocationReason::Anomaly, "anomaly"),
        ];
        for (reason, name) in reasons {
            assert_eq!(reason_name(reason), name);
            assert_eq!(reason_from_name(name), reason);
        }
        assert_eq!(
            reason_from_name("no such reason"),
            RevocationReason::Unspecified
        );
    }
}
