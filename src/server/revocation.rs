//! Revocation on the server: orders to the issuers (an SVID is listed by its node's CA, a node
//! CA by the root that granted it), the CRL each replica's root signs, the CRLs nodes publish
//! (checked against the CA the server granted), and which CRLs go to every agent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::State;
use crate::ca::crl::{
    CRL_LIFETIME, CrlError, Revoked, check_crl, parse_crl, sign_crl, subject_der,
};
use crate::entry::MAX_X509_TTL;
use crate::events::model::{now_ms, reason_from_name, reason_name};
use crate::proto::tessera::{Event, EventKind, RevocationOrder, RevocationReason};
use crate::store::wire::to_record;
use crate::store::{CrlRecord, RevocationRecord, StoreError, SvidRecord, unix_now, unix_seconds};

/// Node CRLs that list nothing are sent to every agent only while there are at most this many
/// of them: a strict verifier (OpenSSL `-crl_check_all`, Envoy once any CRL is configured)
/// needs a CRL for every CA of a chain, but beyond this the Workload API message would grow
/// with the number of nodes. Root CRLs and CRLs that list something are always sent.
pub const EMPTY_NODE_CRLS_SENT_UP_TO: usize = 64;

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

/// The CRLs every agent is given: every root's, every node CRL that lists something, and the
/// node CRLs that list nothing while there are at most [`EMPTY_NODE_CRLS_SENT_UP_TO`] of them.
/// An empty CRL past its nextUpdate is left out (it revokes nothing, and a strict verifier
/// would refuse the whole chain for it); one that lists something is kept, stale or not.
pub fn distributed(crls: &[CrlRecord], now: i64) -> Vec<Vec<u8>> {
    let is_root = |c: &CrlRecord| c.publisher.starts_with("server:");
    let empty_nodes = crls
        .iter()
        .filter(|c| !is_root(c) && c.revoked == 0 && c.next_update > now)
        .count();
    crls.iter()
        .filter(|c| {
            is_root(c)
                || c.revoked > 0
                || (c.next_update > now && empty_nodes <= EMPTY_NODE_CRLS_SENT_UP_TO)
        })
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

/// The id of the event that records the revocation of `serial`: derived from it, so that
/// recording it again (a retried call, a second operator) stores nothing new.
fn revocation_event_id(serial: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("svid-revoked:{serial}").as_bytes(),
    );
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Uuid::new_v8(bytes).to_string()
}

/// The hex key a CRL of the CA `ca_der` is stored under: its subject name.
fn issuer_key(ca_der: &[u8]) -> Option<String> {
    subject_der(ca_der).map(hex::encode)
}

impl State {
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
        let events = svids
            .iter()
            .filter(|svid| svid.revoked_ms.is_none())
            .map(|svid| {
                let event = Event {
                    id: revocation_event_id(&svid.serial),
                    kind: EventKind::SvidRevoked as i32,
                    time_ms: now,
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
                to_record(&event, EventKind::SvidRevoked, &svid.node_id, now)
            })
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
        let cas = self.store.node_cas(Some(node_id), unix_now()).await?;
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
            .filter(|s| s.revoked_ms.is_none() && s.not_after.is_none_or(|at| at > unix_now()))
            .collect();
        // Their CA is revoked: no order to the node (it is gone), only the record.
        let events: Vec<_> = live
            .iter()
            .map(|svid| {
                let event = Event {
                    id: revocation_event_id(&svid.serial),
                    kind: EventKind::SvidRevoked as i32,
                    time_ms: now,
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
                to_record(&event, EventKind::SvidRevoked, node_id, now)
            })
            .collect();
        if !events.is_empty() {
            self.store.store_events(events).await?;
        }
        Ok(revoked.len())
    }

    /// Checks the CRLs node `node_id` published against the CAs the server granted it, and
    /// stores those newer than what is stored. Returns how many were stored.
    pub async fn publish_node_crls(
        &self,
        node_id: &str,
        ders: Vec<Vec<u8>>,
    ) -> Result<u32, PublishError> {
        if ders.len() > MAX_CRLS_PER_PUBLISH {
            return Err(PublishError::TooMany(ders.len()));
        }
        let cas = self.store.node_cas(Some(node_id), unix_now()).await?;
        let mut stored = 0;
        for (index, der) in ders.into_iter().enumerate() {
            let refused = |reason: String| PublishError::Refused { index, reason };
            let info = parse_crl(&der).map_err(|e| refused(e.to_string()))?;
            let ca = cas
                .iter()
                .find(|ca| subject_der(&ca.der).is_some_and(|s| s == info.issuer_der))
                .ok_or_else(|| {
                    refused(format!(
                        "its issuer {} is not a CA granted to node {node_id}, or that CA has expired",
                        info.issuer
                    ))
                })?;
            check_crl(&der, &ca.der).map_err(|e: CrlError| refused(e.to_string()))?;
            let number = i64::try_from(info.number)
                .map_err(|_| refused("its CRL number is larger than tessera issues".to_owned()))?;
            let record = CrlRecord {
                issuer: hex::encode(&info.issuer_der),
                publisher: node_id.to_owned(),
                number,
                next_update: unix_seconds(info.next_update),
                until: ca.not_after,
                revoked: info.revoked.len() as i64,
                der,
            };
            if self.store.put_crl(record).await? {
                stored += 1;
            }
        }
        Ok(stored)
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
