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
        EventKind::SvidUsed | EventKind::AttestationDenied => Class::Droppable,
        EventKind::Unspecified
        | EventKind::SvidIssued
        | EventKind::SvidRevoked
        | EventKind::NodeAttested
        | EventKind::NodeEvicted
        | EventKind::IssuanceAnomaly => Class::Critical,
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
    fn append(&self, _critical: bool, event: &Event) -> Result<(), String> {
        append_event(&self.0, event)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn sync(&self) -> Result<(), String> {
        self.0.sync().map_err(|e| e.to_string())
    }
}

/// Opens the agent's spool in `dir`, saying in the log what a crash cost, if anything.
pub fn open_spool(dir: &std::path::Path) -> Result<std::sync::Arc<Spool>, String> {
    let (spool, recovery) = Spool::open(dir, SpoolConfig::default()).map_err(|e| e.to_string())?;
    if !recovery.is_clean() {
        tracing::warn!(
            spool = %dir.display(),
            lost_bytes = recovery.lost_bytes(),
            "event spool was damaged (a crash cut it short); the good records are kept and will be sent, what was lost is: {recovery}"
        );
    }
    Ok(std::sync::Arc::new(spool))
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
    fn unknown_kinds_are_critical() {
        let event = Event {
            kind: 99,
            ..Event::default()
        };
        assert_eq!(class_of(event.kind()), Class::Critical);
    }
}
