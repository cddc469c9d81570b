//! Revocation on the server: orders to the issuers (an SVID is listed by its node's CA, a node
//! CA by the root that granted it), the CRL each replica's root signs, the CRLs nodes publish
//! (checked against the CA the server granted), and which CRLs go to every agent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::State;
use crate::ca::crl::{
    self, CRL_LIFETIME, CrlError, CrlStanding, Revoked, check_crl, parse_crl, sign_crl, subject_der,
};
use crate::entry::MAX_X509_TTL;
use crate::events::model::{now_ms, reason_from_name, reason_name, revocation_event_id};
use crate::proto::tessera::{Event, EventKind, RevocationOrder, RevocationReason};
use crate::store::wire::to_record;
use crate::store::{CrlRecord, RevocationRecord, StoreError, SvidRecord, unix_now, unix_seconds};

/// How many CRLs one PublishCrls call may carry (a node holds two or three CAs at a time).
pub const MAX_CRLS_PER_PUBLISH: usize = 16;

/// Why a CRL a node published was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Too many CRLs in one call.
    #[error("{0} CRLs in one call; at most {MAX_CRLS_PER_PUBLISH}")]
    TooMany(usize),
    /// A CRL does not parse or does not check against the node's CAs.
    #[error("CRL {index}: {reason}")]
    Refused {
        /// Its position in the call, from 0.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The CRLs every agent is given, by the rule of [`crate::ca::crl::distributed`]: a CRL is a
/// root's when a replica published it.
pub fn distributed(crls: &[CrlRecord], now: i64) -> Vec<Vec<u8>> {
    crl::distributed(crls, |c| CrlStanding {
        root: c.publisher.starts_with("server:"),
        lists_any: c.revoked > 0,
        current: c.next_update > now,
    })
    .into_iter()
    .map(|c| c.der.clone())
    .collect()
}

/// The SVID revocations each node must sign, by node id.
pub fn orders_by_node(records: &[RevocationRecord]) -> HashMap<String, Vec<RevocationOrder>> {
    let mut orders: HashMap<String, Vec<RevocationOrder>> = HashMap::new();
    for r in records.iter().filter(|r| r.root_server_id.is_none()) {
        orders
            .entry(r.node_id.clone())
            .or_default()
            .push(RevocationOrder {
                serial: r.serial.clone(),
                not_after: r.not_after,
                reason: reason_from_name(&r.reason) as i32,
                detail: r.detail.clone(),
                revoked_ms: r.revoked_ms,
            });
    }
    orders
}

/// The record of a CRL node `node_id` published, if it names one of the node's `cas` and
/// verifies with its key; otherwise why not.
fn checked_crl(
    node_id: &str,
    cas: &[crate::store::NodeCaRecord],
    der: Vec<u8>,
) -> Result<CrlRecord, String> {
    let info = parse_crl(&der).map_err(|e| e.to_string())?;
    let ca = cas
        .iter()
        .find(|ca| subject_der(&ca.der).is_some_and(|s| s == info.issuer_der))
        .ok_or_else(|| {
            format!(
                "its issuer {} is not a CA granted to node {node_id}, or that CA has expired",
                info.issuer
            )
        })?;
    check_crl(&der, &ca.der).map_err(|e: CrlError| e.to_string())?;
    let number = i64::try_from(info.number)
        .map_err(|_| "its CRL number is larger than tessera issues".to_owned())?;
    Ok(CrlRecord {
        issuer: hex::encode(&info.issuer_der),
        publisher: node_id.to_owned(),
        number,
        next_update: unix_seconds(info.next_update),
        until: ca.not_after,
        revoked: info.revoked.len() as i64,
        der,
    })
}

/// The hex key a CRL of the CA `ca_der` is stored under: its subject name.
fn issuer_key(ca_der: &[u8]) -> Option<String> {
    subject_der(ca_der).map(hex::encode)
}

impl State {
    /// The `svid_revoked` event of `svid`, at `now_ms`, with its id derived from the serial.
    fn revocation_record(
        &self,
        svid: &SvidRecord,
        reason: RevocationReason,
        detail: &str,
        now_ms: i64,
    ) -> crate::store::EventRecord {
        let event = Event {
            id: revocation_event_id(&svid.serial),
            kind: EventKind::SvidRevoked as i32,
            time_ms: now_ms,
            trust_domain: self.config.trust_domain.name().to_owned(),
            node_id: svid.node_id.clone(),
            entry_id: svid.entry_id.clone(),
            spiffe_id: svid.spiffe_id.clone(),
            serial: svid.serial.clone(),
            not_after: svid.not_after.unwrap_or_default(),
            reason: reason as i32,
            detail: detail.to_owned(),
            ..Default::default()
        };
        to_record(&event, EventKind::SvidRevoked, &svid.node_id, now_ms)
    }

    /// Revokes `svids` for `reason`: an order to each node whose CA signed one, and an
    /// `svid_revoked` event for each, both idempotent. Returns the serials this call revoked
    /// and those revoked before.
    pub async fn revoke_svids(
        &self,
        svids: &[SvidRecord],
        reason: RevocationReason,
        detail: &str,
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let now = now_ms();
        // An SVID whose expiry no event gave is ordered for the longest lifetime any has.
        let fallback_not_after = unix_now() + MAX_X509_TTL.as_secs() as i64;
        let records = svids
            .iter()
            .map(|svid| RevocationRecord {
                serial: svid.serial.clone(),
                node_id: svid.node_id.clone(),
                root_server_id: None,
                not_after: svid.not_after.unwrap_or(fallback_not_after),
                reason: reason_name(reason).to_owned(),
                detail: detail.to_owned(),
                revoked_ms: now,
            })
            .collect();
        let revoked = self.store.revoke(records).await?;
        // An SVID only superseded (a rotation) is still in use: this takes it out of use.
        let out_of_use = |svid: &SvidRecord| {
            svid.revoked_ms.is_some()
                && !matches!(svid.reason.as_deref(), Some("superseded" | "ca_rotated"))
        };
        let events = svids
            .iter()
            .filter(|svid| !out_of_use(svid))
            .map(|svid| self.revocation_record(svid, reason, detail, now))
            .collect::<Vec<_>>();
        if !events.is_empty() {
            self.store.store_events(events).await?;
        }
        let already = svids
            .iter()
            .map(|s| s.serial.clone())
            .filter(|serial| !revoked.contains(serial))
            .collect();
        Ok((revoked, already))
    }

    /// Revokes every unexpired CA granted to `node_id` in the CRL of the root that granted it,
    /// and records every live SVID of the node as revoked for `reason`. Returns how many CAs
    /// were newly revoked.
    pub async fn revoke_node(
        &self,
        node_id: &str,
        reason: RevocationReason,
        detail: &str,
    ) -> Result<usize, StoreError> {
        let now = now_ms();
        let now_s = unix_now();
        let cas = self.store.node_cas(Some(node_id), now_s).await?;
        let records = cas
            .iter()
            .map(|ca| RevocationRecord {
                serial: ca.serial.clone(),
                node_id: node_id.to_owned(),
                root_server_id: Some(ca.server_id.clone()),
                not_after: ca.not_after,
                reason: reason_name(reason).to_owned(),
                detail: detail.to_owned(),
                revoked_ms: now,
            })
            .collect();
        let revoked = self.store.revoke(records).await?;
        let live: Vec<SvidRecord> = self
            .store
            .svids(None, Some(node_id))
            .await?
            .into_iter()
            .filter(|s| s.may_be_live(now_s))
            .collect();
        // Their CA is revoked: no order to the node (it is gone), only the record.
        let events: Vec<_> = live
            .iter()
            .map(|svid| self.revocation_record(svid, reason, detail, now))
            .collect();
        if !events.is_empty() {
            self.store.store_events(events).await?;
        }
        self.revoke_jwts(
            crate::store::JwtFilter {
                node_id: Some(node_id.to_owned()),
                ..Default::default()
            },
            reason,
            detail,
        )
        .await?;
        Ok(revoked.len())
    }

    /// Checks the CRLs node `node_id` published against the CAs the server granted it, and
    /// stores those newer than what is stored. Returns how many were stored and why each
    /// refused one was: one bad CRL (say, of a CA from the node's earlier life) does not keep
    /// the others out.
    pub async fn publish_node_crls(
        &self,
        node_id: &str,
        ders: Vec<Vec<u8>>,
    ) -> Result<(u32, Vec<PublishError>), PublishError> {
        if ders.len() > MAX_CRLS_PER_PUBLISH {
            return Err(PublishError::TooMany(ders.len()));
        }
        let cas = self.store.node_cas(Some(node_id), unix_now()).await?;
        let mut stored = 0;
        let mut refused = Vec::new();
        for (index, der) in ders.into_iter().enumerate() {
            let record = match checked_crl(node_id, &cas, der) {
                Ok(record) => record,
                Err(reason) => {
                    refused.push(PublishError::Refused { index, reason });
                    continue;
                }
            };
            if self.store.put_crl(record).await? {
                stored += 1;
            }
        }
        Ok((stored, refused))
    }

    /// Signs this replica's root CRL (the node CAs it granted that were revoked) when what it
    /// lists changed or half of its life has passed, and stores it. Returns the next time one
    /// is due.
    async fn sign_root_crl(
        &self,
        last: &mut Option<(Vec<String>, SystemTime)>,
    ) -> Result<SystemTime, RootCrlError> {
        let now = SystemTime::now();
        let mine = self.server_id.as_str();
        let records: Vec<RevocationRecord> = self
            .store
            .revocations(unix_seconds(now))
            .await?
            .into_iter()
            .filter(|r| r.root_server_id.as_deref() == Some(mine))
            .collect();
        let serials: Vec<String> = records.iter().map(|r| r.serial.clone()).collect();
        if let Some((listed, signed_at)) = last
            && *listed == serials
            && now < *signed_at + CRL_LIFETIME / 2
        {
            return Ok(*signed_at + CRL_LIFETIME / 2);
        }
        let key = issuer_key(&self.root.certificate).ok_or(RootCrlError::RootName)?;
        let stored_number = self
            .store
            .crls(unix_seconds(now))
            .await?
            .into_iter()
            .find(|c| c.issuer == key)
            .map_or(0, |c| c.number);
        let millis = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
        let number = (stored_number + 1).max(millis);
        let entries: Vec<Revoked> = records
            .iter()
            .filter_map(|r| {
                Some(Revoked {
                    serial: hex::decode(&r.serial).ok()?,
                    revoked_at: SystemTime::UNIX_EPOCH
                        + Duration::from_millis(r.revoked_ms.max(0) as u64),
                    reason: reason_from_name(&r.reason),
                })
            })
            .collect();
        let der = sign_crl(&self.root, number as u64, now, &entries)?;
        self.store
            .put_crl(CrlRecord {
                issuer: key,
                publisher: format!("server:{mine}"),
                number,
                next_update: unix_seconds(now + CRL_LIFETIME),
                until: unix_seconds(self.root.not_after),
                revoked: entries.len() as i64,
                der,
            })
            .await?;
        *last = Some((serials, now));
        Ok(now + CRL_LIFETIME / 2)
    }
}

impl State {
    /// Makes dormant every entry unused for longer than its inactivity timeout at `now_ms`
    /// (counted from its last use, its activation or its creation, whichever is latest),
    /// revoking its live SVIDs first, for reason `inactive`. Returns the entries made dormant.
    pub async fn sweep_inactive(&self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        let entries = self.store.list_entries().await?;
        if entries
            .iter()
            .all(|e| e.inactivity_timeout_seconds.is_none())
        {
            return Ok(Vec::new());
        }
        let activity: HashMap<String, Option<i64>> = self
            .store
            .entry_activity()
            .await?
            .into_iter()
            .map(|a| (a.entry_id, a.last_used_ms))
            .collect();
        let standings: HashMap<String, crate::store::EntryStanding> = self
            .store
            .entry_standings()
            .await?
            .into_iter()
            .map(|s| (s.entry_id.clone(), s))
            .collect();
        let mut dormant = Vec::new();
        for entry in &entries {
            let Some(timeout) = entry.inactivity_timeout_seconds else {
                continue;
            };
            let standing = standings.get(&entry.id);
            if standing.is_some_and(|s| s.dormant_since_ms.is_some()) {
                continue;
            }
            let since = [
                activity.get(&entry.id).copied().flatten(),
                standing.and_then(|s| s.activated_ms),
                Some(entry.created_at.saturating_mul(1000)),
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0);
            if now_ms.saturating_sub(since) <= timeout.saturating_mul(1000) {
                continue;
            }
            let live: Vec<SvidRecord> = self
                .store
                .svids(Some(&entry.id), None)
                .await?
                .into_iter()
                .filter(|s| s.may_be_live(now_ms / 1000))
                .collect();
            let detail = format!(
                "unused for longer than its inactivity timeout of {}",
                humantime::format_duration(Duration::from_secs(timeout.max(0) as u64))
            );
            // Revoked before the entry leaves the nodes, so they list the SVIDs for this reason.
            self.revoke_svids(&live, RevocationReason::Inactive, &detail)
                .await?;
            if self.store.set_entry_dormant(&entry.id, now_ms).await? {
                tracing::info!(target: "tessera::audit", entry = %entry.id, revoked = live.len(), "entry dormant after its inactivity timeout");
                dormant.push(entry.id.clone());
            }
        }
        Ok(dormant)
    }
}

/// How often entries are checked against their inactivity timeouts (at least 60 s each).
const INACTIVITY_SWEEP: Duration = Duration::from_secs(5);

/// Sweeps entries for inactivity every few seconds until `stop`.
pub async fn run_inactivity(state: Arc<State>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        if let Err(e) = state.sweep_inactive(now_ms()).await {
            tracing::warn!(error = %e, "cannot check entries for inactivity; retrying");
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(INACTIVITY_SWEEP) => {}
        }
    }
}

/// Why the root CRL could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum RootCrlError {
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error("signing the root CRL: {0}")]
    Signing(#[from] crate::ca::CaError),
    /// The root certificate's name could not be read.
    #[error("the root certificate's subject does not parse")]
    RootName,
}

/// Keeps this replica's root CRL current: signed at start, after every datastore change that
/// touches what it lists, and at half of its life; until `stop`.
pub async fn run_root_crl(state: Arc<State>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let mut changes = state.store.changes();
    let mut last = None;
    loop {
        changes.borrow_and_update();
        let next = match state.sign_root_crl(&mut last).await {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sign the root CRL; retrying in 1s");
                SystemTime::now() + Duration::from_secs(1)
            }
        };
        let wait = next
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .min(Duration::from_secs(60));
        tokio::select! {
            _ = &mut stop => return,
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::crl::EMPTY_NODE_CRLS_SENT_UP_TO;
    use crate::proto::tessera::EventKind;
    use crate::server::sync::load_snapshot;
    use crate::server::testing;
    use crate::store::{EntryRecord, EventRecord};

    fn entry(timeout: Option<i64>) -> EntryRecord {
        EntryRecord {
            id: "e1".into(),
            spiffe_id: "spiffe://example.org/idle".into(),
            selectors: vec!["unix:uid:1".into()],
            x509_ttl_seconds: 3600,
            owner: "tests".into(),
            purpose: "inactivity".into(),
            inactivity_timeout_seconds: timeout,
            jwt_ttl_seconds: None,
            node_selectors: Vec::new(),
            expires_at: None,
            hint: None,
            dns_names: Vec::new(),
            revision: 0,
            created_at: 0,
            updated_at: 0,
            activation: "standing".into(),
            delegates_to: Vec::new(),
            labels: Vec::new(),
        }
    }

    fn issued(serial: &str, now_ms: i64) -> EventRecord {
        let event = Event {
            id: crate::events::model::new_event_id(),
            kind: EventKind::SvidIssued as i32,
            time_ms: now_ms,
            trust_domain: "example.org".into(),
            node_id: "n1".into(),
            entry_id: "e1".into(),
            spiffe_id: "spiffe://example.org/idle".into(),
            serial: serial.into(),
            not_after: now_ms / 1000 + 3600,
            ..Default::default()
        };
        to_record(&event, EventKind::SvidIssued, "n1", now_ms)
    }

    #[tokio::test]
    async fn an_unused_entry_goes_dormant_with_its_svids_revoked_until_activated() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let created = state
            .store
            .create_entry(entry(Some(60)), unix_now())
            .await
            .unwrap();
        let start = created.created_at * 1000;
        state
            .store
            .store_events(vec![issued("0a01", start)])
            .await
            .unwrap();

        assert!(
            state
                .sweep_inactive(start + 59_000)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(state.sweep_inactive(start + 61_000).await.unwrap(), ["e1"]);
        let orders = state.store.revocations(unix_now()).await.unwrap();
        assert_eq!(orders.len(), 1);
        assert_eq!(
            (orders[0].serial.as_str(), orders[0].reason.as_str()),
            ("0a01", "inactive")
        );
        let snapshot = load_snapshot(state.store.as_ref()).await.unwrap();
        assert!(snapshot.dormant.contains("e1"));
        // Dormant once: a later sweep changes nothing.
        assert!(
            state
                .sweep_inactive(start + 120_000)
                .await
                .unwrap()
                .is_empty()
        );

        // Activated, it is served again and idle time counts from then.
        assert!(
            state
                .store
                .activate_entry("e1", start + 130_000)
                .await
                .unwrap()
        );
        let snapshot = load_snapshot(state.store.as_ref()).await.unwrap();
        assert!(!snapshot.dormant.contains("e1"));
        assert!(
            state
                .sweep_inactive(start + 180_000)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(state.sweep_inactive(start + 191_000).await.unwrap(), ["e1"]);
    }

    #[tokio::test]
    async fn entries_without_a_timeout_never_go_dormant() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        state
            .store
            .create_entry(entry(None), unix_now())
            .await
            .unwrap();
        let far = now_ms() + 365 * 24 * 3600 * 1000;
        assert!(state.sweep_inactive(far).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_node_crl_is_stored_only_when_its_ca_was_granted_to_that_node_and_it_checks() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let td = crate::spiffe::TrustDomain::new("example.org").unwrap();
        let make_ca = |name: &str| {
            crate::ca::generate_root(&td, Duration::from_secs(3600), SystemTime::now(), 0, name)
                .unwrap()
                .0
        };
        let (granted, forger) = (make_ca("node CA"), make_ca("forger"));
        state
            .store
            .record_node_ca(crate::store::NodeCaRecord {
                serial: "0c".into(),
                node_id: "n1".into(),
                server_id: "s1".into(),
                der: granted.certificate.clone(),
                not_after: unix_seconds(granted.not_after),
            })
            .await
            .unwrap();
        let now = SystemTime::now();
        let good = sign_crl(&granted, 7, now, &[]).unwrap();
        let publish = |node: &'static str, ders: Vec<Vec<u8>>| {
            let state = state.clone();
            async move {
                let (stored, refused) = state.publish_node_crls(node, ders).await.unwrap();
                let refused: Vec<String> = refused.iter().map(|e| e.to_string()).collect();
                (stored, refused)
            }
        };
        assert_eq!(publish("n1", vec![good.clone()]).await, (1, vec![]));
        assert_eq!(
            publish("n1", vec![good.clone()]).await,
            (0, vec![]),
            "not newer"
        );
        let (_, other_node) = publish("n2", vec![good]).await;
        assert!(
            other_node[0].contains("not a CA granted to node n2"),
            "{other_node:?}"
        );
        // A forged CRL and garbage are refused one by one; a good one beside them is taken.
        let forged = sign_crl(&forger, 8, now, &[]).unwrap();
        let newer = sign_crl(&granted, 9, now, &[]).unwrap();
        let (stored, refused) = publish("n1", vec![forged, b"not a CRL".to_vec(), newer]).await;
        assert_eq!(stored, 1);
        assert!(refused[0].starts_with("CRL 0:"), "{refused:?}");
        assert!(
            refused[1].starts_with("CRL 1:")
                && refused[1].contains("not a DER certificate revocation list"),
            "{refused:?}"
        );
        let many = vec![Vec::new(); MAX_CRLS_PER_PUBLISH + 1];
        assert!(matches!(
            state.publish_node_crls("n1", many).await,
            Err(PublishError::TooMany(_))
        ));
        assert_eq!(state.store.crls(unix_now()).await.unwrap()[0].number, 9);
    }

    #[test]
    fn empty_node_crls_are_sent_only_while_few() {
        let crl = |publisher: &str, revoked: i64, next_update: i64| CrlRecord {
            issuer: format!("{publisher}-{revoked}"),
            publisher: publisher.into(),
            number: 1,
            next_update,
            until: i64::MAX,
            revoked,
            der: publisher.as_bytes().to_vec(),
        };
        let now = 1_000;
        let mut crls = vec![
            crl("server:s1", 0, now + 10),
            crl("n-listing", 3, now - 10),
            crl("n-stale-empty", 0, now - 10),
        ];
        crls.extend((0..EMPTY_NODE_CRLS_SENT_UP_TO).map(|i| crl(&format!("n{i}"), 0, now + 10)));
        assert_eq!(
            distributed(&crls, now).len(),
            2 + EMPTY_NODE_CRLS_SENT_UP_TO
        );
        crls.push(crl("one-too-many", 0, now + 10));
        let sent = distributed(&crls, now);
        assert_eq!(sent, [b"server:s1".to_vec(), b"n-listing".to_vec()]);
    }
}
