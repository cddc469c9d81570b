//! Credential events (SVID issued, delivered, revoked, attestation denied, ...): the model
//! shared by agent and server ([`model`]), the agent's [`recorder`], and its durable spool.
//!
//! Every event goes first into the [`spool`], a directory of append-only files that survives
//! crashes and restarts; an uploader reads what the server has not yet acknowledged, sends it and
//! moves the spool's cursor when the server confirms. The spool stores opaque bytes; the helpers
//! here put [`Event`] messages in and take them out, and decide which kinds may be dropped when
//! the spool is full.

pub mod model;
pub mod recorder;
pub mod spool;

use prost::Message;

use crate::proto::tessera::{Event, EventKind};
pub use spool::{Class, Spool, SpoolConfig, SpoolError};

/// Whether events of `kind` may be dropped when the spool is full.
///
/// Issuance and revocation are critical: the agent must not hand out or withdraw a credential
/// without a record of it, so when even the critical reserve is used up the caller refuses the
/// operation instead. Deliveries and denials are droppable: they come in bulk, and any local
/// process can cause denials, so they must never crowd out an issuance. A kind this code does not
/// know (an unknown number decodes as `Unspecified`) is kept, as critical.
pub fn class_of(kind: EventKind) -> Class {
    match kind {
        EventKind::SvidUsed
        | EventKind::JwtUsed
        | EventKind::AttestationDenied
        | EventKind::PolicyDenied => Class::Droppable,
        EventKind::Unspecified
        | EventKind::SvidIssued
        | EventKind::SvidRevoked
        | EventKind::NodeAttested
        | EventKind::NodeEvicted
        | EventKind::IssuanceAnomaly
        | EventKind::TaskStarted
        | EventKind::TaskEnded
        | EventKind::JwtIssued
        | EventKind::JwtRevoked => Class::Critical,
    }
}

/// Appends `event` to the spool with its kind's [`class_of`]; returns its sequence number.
pub fn append_event(spool: &Spool, event: &Event) -> Result<u64, SpoolError> {
    spool.append(class_of(event.kind()), &event.encode_to_vec())
}

/// Decodes a payload written by [`append_event`].
pub fn decode_event(payload: &[u8]) -> Result<Event, prost::DecodeError> {
    Event::decode(payload)
}

/// The spool as the recorder's log (server mode).
pub struct SpoolLog(pub std::sync::Arc<Spool>);

impl recorder::EventLog for SpoolLog {
    fn append(&self, _critical: bool, event: &Event) -> Result<(), recorder::LogError> {
        append_event(&self.0, event)
            .map(|_| ())
            .map_err(recorder::LogError::Spool)
    }

    fn sync(&self) -> Result<(), recorder::LogError> {
        self.0.sync().map_err(recorder::LogError::Spool)
    }
}

/// Opens the agent's spool in `dir`, saying in the log what a crash or damage cost, if
/// anything: how many records were lost and, where their damaged headers still tell, of which
/// kinds.
pub fn open_spool(dir: &std::path::Path) -> Result<std::sync::Arc<Spool>, SpoolError> {
    let (spool, recovery) = Spool::open(dir, SpoolConfig::default())?;
    if !recovery.is_clean() {
        tracing::warn!(
            spool = %dir.display(),
            lost_records = recovery.lost_records(),
            lost_kinds = %lost_kinds(&recovery),
            lost_bytes = recovery.lost_bytes(),
            kept_after_damage = recovery.recovered_after_damage,
            "event spool was damaged (a crash cut it short, or the disk changed it); every intact record is kept and will be sent; what was lost: {recovery}"
        );
    }
    Ok(std::sync::Arc::new(spool))
}

/// The kinds of the records lost to damage, counted, as far as their damaged payloads still
/// decode: e.g. `svid_issued: 1, unknown: 2`.
pub fn lost_kinds(recovery: &spool::Recovery) -> String {
    let mut counts: std::collections::BTreeMap<&str, u64> = Default::default();
    for damaged in &recovery.damaged {
        let lost = damaged.lost_records.unwrap_or(1);
        let known = damaged.lost_record.as_ref().and_then(|record| {
            let event = decode_event(&record.payload).ok()?;
            let kind = EventKind::try_from(event.kind).ok()?;
            (kind != EventKind::Unspecified).then(|| model::kind_name(kind))
        });
        match known {
            Some(kind) if lost == 1 => *counts.entry(kind).or_default() += 1,
            _ => *counts.entry("unknown").or_default() += lost,
        }
    }
    counts
        .iter()
        .map(|(kind, count)| format!("{kind}: {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_the_spool_with_their_class() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), SpoolConfig::default()).unwrap();
        let issued = Event {
            id: "0190a6b2-0000-7000-8000-000000000001".into(),
            kind: EventKind::SvidIssued.into(),
            spiffe_id: "spiffe://example.org/web".into(),
            serial: "0a1b".into(),
            ..Event::default()
        };
        let used = Event {
            id: "0190a6b2-0000-7000-8000-000000000002".into(),
            kind: EventKind::SvidUsed.into(),
            count: 3,
            ..Event::default()
        };
        let first = append_event(&spool, &issued).unwrap();
        let second = append_event(&spool, &used).unwrap();
        let records = spool.read_unacked(0, 10, 1 << 20).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].0, first);
        assert_eq!(records[0].1, Class::Critical);
        assert_eq!(decode_event(&records[0].2).unwrap(), issued);
        assert_eq!(records[1].0, second);
        assert_eq!(records[1].1, Class::Droppable);
        assert_eq!(decode_event(&records[1].2).unwrap(), used);
    }

    #[test]
    fn the_kinds_of_records_lost_to_damage_are_named_where_they_can_be_known() {
        let dir = tempfile::tempdir().unwrap();
        let event = |kind: EventKind, serial: &str| Event {
            id: new_id(),
            kind: kind.into(),
            spiffe_id: "spiffe://example.org/web".into(),
            serial: serial.into(),
            ..Event::default()
        };
        let (spool, _) = Spool::open(dir.path(), SpoolConfig::default()).unwrap();
        let mut payloads = Vec::new();
        for (kind, serial) in [
            (EventKind::SvidUsed, "01"),
            (EventKind::SvidIssued, "0a0b0c0d"),
            (EventKind::SvidUsed, "02"),
            (EventKind::SvidRevoked, "0e0f"),
            (EventKind::SvidUsed, "03"),
        ] {
            let event = event(kind, serial);
            append_event(&spool, &event).unwrap();
            payloads.push(event.encode_to_vec());
        }
        drop(spool);
        let segment = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "log"))
            .unwrap();
        let mut bytes = std::fs::read(&segment).unwrap();
        let start_of = |index: usize| -> usize {
            payloads[..index]
                .iter()
                .map(|p| spool::HEADER_LEN + p.len())
                .sum()
        };
        // A character of the issuance's serial: the payload still decodes.
        let issued = start_of(1) + spool::HEADER_LEN;
        let at = issued + find(&payloads[1], b"0a0b") + 1;
        bytes[at] ^= 0x01;
        // The revocation's header: its length no longer tells where it ends.
        bytes[start_of(3) + 2] ^= 0x10;
        std::fs::write(&segment, &bytes).unwrap();

        let (spool, recovery) = Spool::open(dir.path(), SpoolConfig::default()).unwrap();
        assert_eq!(recovery.lost_records(), 2, "{recovery}");
        assert_eq!(lost_kinds(&recovery), "svid_issued: 1, unknown: 1");
        let kept: Vec<u64> = spool
            .read_unacked(0, 10, 1 << 20)
            .unwrap()
            .iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(kept, [1, 3, 5]);
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    }

    fn new_id() -> String {
        model::new_event_id()
    }

    #[test]
    fn unknown_kinds_are_critical() {
        let event = Event {
            kind: 99,
            ..Event::default()
        };
        assert_eq!(class_of(event.kind()), Class::Critical);
    }
}
