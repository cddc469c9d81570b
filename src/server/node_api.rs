//! The node API: attestation (join token, x509pop), renewal of node credentials, and the sync
//! stream. Every refusal is logged on the `tessera::audit` target and mapped to a gRPC status in
//! one place, [`NodeApiError::into_status`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use x509_parser::prelude::*;

use super::State;
use super::config::OnAnomaly;
use super::revocation::PublishError;
use super::sync::Snapshot;
use super::sync::stream::NodeSync;
use super::tasks::{KnownTask, task_start_problem};
use crate::ca::BACKDATE;
use crate::ca::node::{
    CsrError, node_id_of, node_spiffe_id, sign_node_ca, sign_node_svid, x509pop_message,
};
use crate::events::model::{MAX_BATCH_EVENTS, check_event, kind_name, new_event_id, now_ms};
use crate::proto::tessera::node_server::Node;
use crate::proto::tessera::{
    AttestRequest, AttestResponse, Bundle, Csrs, Event, EventAck, EventBatch, EventKind,
    MintJwtSvidRequest, MintJwtSvidResponse, NodeCredentials, PublishCrlsRequest,
    PublishCrlsResponse, RenewRequest, SyncRequest, SyncUpdate, X509PopChallenge, attest_request,
    attest_response,
};
use crate::proto::tessera::{RevocationReason, TaskEndReason};
use crate::store::wire::to_record;
use crate::store::{
    NodeCaRecord, NodeCredentialsRecord, NodeRecord, NodeStatus, StoreError, SvidRecord,
    TokenRefusal, canonical, unix_now, unix_seconds,
};
use crate::tls::TlsPeer;

/// How long an attesting node gets for each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// A node's last contact ("last seen") is written at most this often: an open sync stream and
/// every event batch count as contact, and a node with many of them would otherwise write to the
/// store for each.
pub(crate) const CONTACT_INTERVAL: Duration = Duration::from_secs(30);

/// When each node's contact was last written to the store.
#[derive(Debug, Default)]
pub struct Contacts {
    written: std::sync::Mutex<HashMap<String, tokio::time::Instant>>,
}

impl State {
    /// Records that `node_id` was in contact now, unless that was written less than
    /// [`CONTACT_INTERVAL`] ago.
    async fn record_contact(&self, node_id: &str) {
        let now = tokio::time::Instant::now();
        {
            // A poisoned map still holds valid instants: a panic cannot leave one half-written.
            let mut written = self
                .contacts
                .written
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(at) = written.get(node_id)
                && now.duration_since(*at) < CONTACT_INTERVAL
            {
                return;
            }
            written.insert(node_id.to_owned(), now);
        }
        if let Err(e) = self.store.touch_node(node_id, unix_now()).await {
            tracing::debug!(error = %e, node = %node_id, "cannot record the node's last contact");
        }
    }
}

/// Why a node API call was refused. Mapped to a status in [`NodeApiError::into_status`].
#[derive(Debug, thiserror::Error)]
pub enum NodeApiError {
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// A CSR cannot be signed.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The node's credentials (token, certificate, proof) do not hold.
    #[error("{0}")]
    NotAuthenticated(String),
    /// The node is evicted or banned, or asks for what it may not have.
    #[error("{0}")]
    Forbidden(String),
    /// The attestation method is not enabled.
    #[error("{0}")]
    NotEnabled(String),
    /// The datastore failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing failed.
    #[error("signing: {0}")]
    Signing(#[source] crate::ca::CaError),
    /// The system's random generator failed.
    #[error("no randomness for {0}")]
    Randomness(&'static str),
    /// The server is draining; the node should reconnect, to another replica if there is one.
    #[error("server is shutting down")]
    ShuttingDown,
    /// A CRL the node published was refused.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// JWT-SVID signing failed.
    #[error("{0}")]
    Jwt(String),
}

impl NodeApiError {
    /// The status the caller sees. Details of internal failures stay in the log.
    pub fn into_status(self) -> Status {
        match self {
            Self::BadRequest(m) => Status::invalid_argument(m),
            Self::Csr(CsrError::Signing(e)) => Self::Signing(e).into_status(),
            Self::Csr(e) => Status::invalid_argument(e.to_string()),
            Self::NotAuthenticated(m) => Status::unauthenticated(m),
            Self::Forbidden(m) => Status::permission_denied(m),
            Self::NotEnabled(m) => Status::failed_precondition(m),
            Self::Store(e @ StoreError::Unavailable { .. }) => {
                tracing::warn!(error = %e, "node API call failed: datastore unavailable");
                Status::unavailable("datastore unavailable; retry later")
            }
            Self::Store(StoreError::TokenRefused(r)) => {
                Status::unauthenticated(format!("join token refused: {r}"))
            }
            Self::Store(StoreError::NodeNotActive { id, status }) => {
                Status::permission_denied(format!("node {id} is {status}"))
            }
            Self::Store(StoreError::NotFound { id, .. }) => {
                Status::permission_denied(format!("node {id} is not attested"))
            }
            Self::Store(e @ StoreError::Invalid { .. }) => Status::invalid_argument(e.to_string()),
            Self::Store(e) => {
                tracing::error!(error = %e, "node API call failed");
                Status::internal("internal error")
            }
            Self::Signing(e) => {
                tracing::error!(error = %e, "node API call failed");
                Status::internal("internal error")
            }
            Self::Randomness(what) => {
                tracing::error!(what, "node API call failed: the random generator failed");
                Status::internal("internal error")
            }
            Self::ShuttingDown => Status::unavailable("server is shutting down"),
            Self::Publish(PublishError::Store(e)) => Self::Store(e).into_status(),
            Self::Publish(e) => Status::invalid_argument(e.to_string()),
            Self::Jwt(e) => {
                tracing::error!(error = %e, "node API call failed");
                Status::internal("internal error")
            }
        }
    }
}

/// Logs a refusal on the audit target and converts it.
fn refuse(call: &'static str, peer: &str, error: NodeApiError) -> Status {
    tracing::warn!(target: "tessera::audit", call, peer, error = %error, "node API request refused");
    error.into_status()
}

/// The node API service.
pub struct NodeService {
    state: Arc<State>,
}

impl NodeService {
    /// A service over the server's shared state.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

fn peer_of<T>(request: &Request<T>) -> (String, Option<Vec<u8>>) {
    match request.extensions().get::<TlsPeer>() {
        Some(peer) => (peer.remote.to_string(), peer.client_leaf.clone()),
        None => ("unknown".into(), None),
    }
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

impl State {
    /// Signs both credentials for `node_id`, and records the node CA before it is handed out
    /// (so that an eviction can always revoke it).
    async fn grant(
        &self,
        node_id: &str,
        csrs: &Csrs,
    ) -> Result<(NodeCredentials, NodeCredentialsRecord), NodeApiError> {
        let now = SystemTime::now();
        let td = &self.config.trust_domain;
        let spiffe_id = node_spiffe_id(td, node_id).map_err(NodeApiError::Signing)?;
        let svid = sign_node_svid(
            &self.root,
            &spiffe_id,
            &csrs.node_svid,
            self.config.node_svid_ttl,
            now,
        )?;
        let ca = sign_node_ca(
            &self.root,
            td,
            node_id,
            &csrs.ca,
            self.config.node_ca_ttl,
            now,
        )?;
        self.store
            .record_node_ca(NodeCaRecord {
                serial: ca.serial_hex.clone(),
                node_id: node_id.to_owned(),
                server_id: self.server_id.clone(),
                der: ca.der.clone(),
                not_after: unix_seconds(ca.not_after),
            })
            .await?;
        let record = NodeCredentialsRecord {
            svid_serial: svid.serial_hex,
            svid_not_after: unix_seconds(svid.not_after),
            ca_serial: ca.serial_hex,
            ca_not_after: unix_seconds(ca.not_after),
        };
        let credentials = NodeCredentials {
            node_id: node_id.to_owned(),
            spiffe_id: spiffe_id.to_string(),
            node_svid: svid.der,
            ca_cert: ca.der,
            bundle: None,
        };
        Ok((credentials, record))
    }

    async fn bundle(&self) -> Result<Bundle, NodeApiError> {
        let roots = self.store.bundle(unix_now()).await?;
        let jwt_keys = self.store.jwt_keys(unix_now()).await?;
        Ok(Bundle {
            trust_domain: self.config.trust_domain.name().to_owned(),
            roots: roots.into_iter().map(|r| r.der).collect(),
            jwt_keys: jwt_keys.into_iter().map(|k| k.jwk).collect(),
        })
    }

    /// The record of a node attested now with `granted` credentials.
    fn attested_record(
        node_id: &str,
        attestation: &str,
        mut selectors: Vec<String>,
        granted: &NodeCredentialsRecord,
    ) -> NodeRecord {
        selectors.push(format!("node:id:{node_id}"));
        selectors.push(format!("node:attestation:{attestation}"));
        let now = unix_now();
        NodeRecord {
            id: node_id.to_owned(),
            attestation: attestation.to_owned(),
            selectors: canonical(selectors),
            status: NodeStatus::Active,
            attested_at: now,
            last_seen: now,
            svid_serial: granted.svid_serial.clone(),
            svid_not_after: granted.svid_not_after,
            ca_serial: granted.ca_serial.clone(),
            ca_not_after: granted.ca_not_after,
        }
    }

    /// Completes an attestation the store has recorded: the bundle, the event, the audit line.
    async fn attested(
        &self,
        mut credentials: NodeCredentials,
        node: &NodeRecord,
    ) -> Result<NodeCredentials, NodeApiError> {
        credentials.bundle = Some(self.bundle().await?);
        self.record(self.server_event(
            EventKind::NodeAttested,
            &node.id,
            format!("attested by {}", node.attestation),
        ))
        .await;
        tracing::info!(
            target: "tessera::audit",
            node = %node.id,
            attestation = %node.attestation,
            svid_serial = %node.svid_serial,
            ca_serial = %node.ca_serial,
            "node attested"
        );
        Ok(credentials)
    }

    async fn attest_join_token(
        &self,
        token: &str,
        csrs: &Csrs,
    ) -> Result<NodeCredentials, NodeApiError> {
        if token.is_empty() || token.len() > 256 {
            return Err(StoreError::TokenRefused(TokenRefusal::Unknown).into());
        }
        let mut id = [0u8; 8];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| NodeApiError::Randomness("a node id"))?;
        let node_id = format!("jt-{}", hex::encode(id));
        // Refuse bad CSRs before the one-time token is spent; the token is spent in the same
        // transaction that records the node, so a crash cannot burn it for nothing.
        let (credentials, granted) = self.grant(&node_id, csrs).await?;
        let digest = hex::encode(sha256(token.as_bytes()));
        let node = Self::attested_record(&node_id, "join_token", Vec::new(), &granted);
        let node = self.store.join_node(&digest, node, unix_now()).await?;
        self.attested(credentials, &node).await
    }

    /// Verifies an x509pop certificate chain against the configured CAs; returns the node id and
    /// selectors it earns.
    fn check_x509pop_chain(
        &self,
        chain: &[Vec<u8>],
    ) -> Result<(String, Vec<String>), NodeApiError> {
        let Some(verifier) = &self.x509pop else {
            return Err(NodeApiError::NotEnabled(
                "x509pop attestation is not enabled on this server (x509pop.ca_bundle_file)".into(),
            ));
        };
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(NodeApiError::BadRequest(
                "x509pop: empty certificate chain".into(),
            ));
        };
        let leaf_der = CertificateDer::from(leaf.as_slice());
        let intermediates: Vec<_> = intermediates
            .iter()
            .map(|d| CertificateDer::from(d.as_slice()))
            .collect();
        verifier
            .verify_client_cert(&leaf_der, &intermediates, UnixTime::now())
            .map_err(|e| {
                NodeApiError::NotAuthenticated(format!("x509pop certificate refused: {e}"))
            })?;
        let node_id = format!("x509pop-{}", &hex::encode(sha256(leaf))[..20]);
        let mut selectors = Vec::new();
        if let Ok((_, cert)) = X509Certificate::from_der(leaf) {
            for cn in cert.subject().iter_common_name() {
                if let Ok(cn) = cn.as_str() {
                    selectors.push(format!("x509pop:subject:cn:{cn}"));
                }
            }
        }
        Ok((node_id, selectors))
    }
}

/// Verifies `signature` over `message` with the public key of the DER certificate `leaf`.
pub fn verify_proof(leaf: &[u8], message: &[u8], signature: &[u8]) -> Result<(), NodeApiError> {
    use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
    let refused = |why: &str| {
        NodeApiError::NotAuthenticated(format!("x509pop proof of possession refused: {why}"))
    };
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|_| refused("unreadable certificate"))?;
    let spki = cert.public_key();
    let key = spki.subject_public_key.data.as_ref();
    let oid = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let algorithm: &'static dyn VerificationAlgorithm = match (oid.as_str(), curve.as_deref()) {
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => &signature::ECDSA_P256_SHA256_ASN1,
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => &signature::ECDSA_P384_SHA384_ASN1,
        ("1.3.101.112", _) => &signature::ED25519,
        ("1.2.840.113549.1.1.1", _) => &signature::RSA_PKCS1_2048_8192_SHA256,
        _ => {
            return Err(refused(
                "unsupported key type (P-256, P-384, Ed25519 or RSA)",
            ));
        }
    };
    UnparsedPublicKey::new(algorithm, key)
        .verify(message, signature)
        .map_err(|_| refused("the signature does not verify with the certificate's key"))
}

/// An id for the anomaly found in event `source_id`: derived from it, so that a retried batch
/// records the anomaly once.
fn anomaly_id(source_id: &str) -> String {
    let digest = sha256(format!("issuance-anomaly:{source_id}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // Version 8: a custom, name-derived UUID.
    uuid::Uuid::new_v8(bytes).to_string()
}

impl State {
    /// Records an event the server itself produced (node attested, evicted...).
    pub async fn record(&self, event: Event) {
        let kind = EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified);
        let record = to_record(&event, kind, &event.node_id, now_ms());
        if let Err(e) = self.store.store_events(vec![record]).await {
            tracing::error!(error = %e, kind = kind_name(kind), "cannot store a server event");
        }
    }

    /// A new server event of `kind` about node `node_id`.
    pub fn server_event(&self, kind: EventKind, node_id: &str, detail: String) -> Event {
        Event {
            id: new_event_id(),
            kind: kind as i32,
            time_ms: now_ms(),
            trust_domain: self.config.trust_domain.name().to_owned(),
            node_id: node_id.to_owned(),
            detail,
            ..Default::default()
        }
    }

    /// Checks and stores one batch from `node_id`; issuances of identities the node may not
    /// serve are stored with an issuance anomaly beside them.
    async fn ingest(&self, node_id: &str, batch: EventBatch) -> Result<EventAck, NodeApiError> {
        let refused = |error: String| EventAck {
            sequence: batch.sequence,
            error,
            ..Default::default()
        };
        if batch.events.len() > MAX_BATCH_EVENTS {
            return Ok(refused(format!(
                "batch {} has {} events; at most {MAX_BATCH_EVENTS} are accepted",
                batch.sequence,
                batch.events.len()
            )));
        }
        let received = now_ms();
        let snapshot = self.snapshots.borrow().clone();
        let mut records = Vec::with_capacity(batch.events.len());
        let mut anomalous = Vec::new();
        let mut anomalous_tasks: Vec<(String, String)> = Vec::new();
        let mut batch_tasks: HashMap<String, KnownTask> = HashMap::new();
        for (index, event) in batch.events.iter().enumerate() {
            let kind = match check_event(index, event) {
                Ok(kind) => kind,
                Err(e) => return Ok(refused(format!("batch {}: {e}", batch.sequence))),
            };
            if kind == EventKind::JwtIssued {
                // The server signs JWT-SVIDs and records their issuance itself: such a report
                // is dropped (the rest of the batch is stored).
                tracing::warn!(target: "tessera::audit", node = node_id, jti = %event.jti, "a node reported signing a JWT-SVID; dropped");
                continue;
            }
            records.push(to_record(event, kind, node_id, received));
            if kind == EventKind::TaskStarted {
                let parent = match event.chain.len().checked_sub(2) {
                    None => None,
                    Some(at) => {
                        let parent_id = &event.chain[at].task_id;
                        match batch_tasks.get(parent_id) {
                            Some(known) => Some(known.clone()),
                            None => self
                                .store
                                .task(parent_id)
                                .await?
                                .as_ref()
                                .map(KnownTask::from),
                        }
                    }
                };
                batch_tasks.insert(
                    event.task_id.clone(),
                    KnownTask {
                        entry_id: event.entry_id.clone(),
                        deadline: event.not_after,
                        ended_ms: None,
                    },
                );
                if let Some(problem) = task_start_problem(
                    &snapshot,
                    node_id,
                    event,
                    parent.as_ref(),
                    self.config.max_task_depth,
                ) {
                    tracing::warn!(target: "tessera::audit", node = node_id, task = %event.task_id, %problem, "task anomaly");
                    let mut anomaly = self.server_event(
                        EventKind::IssuanceAnomaly,
                        node_id,
                        format!("task anomaly: {problem}"),
                    );
                    anomaly.id = anomaly_id(&event.id);
                    anomaly.spiffe_id = event.spiffe_id.clone();
                    anomaly.entry_id = event.entry_id.clone();
                    anomaly.time_ms = received;
                    records.push(to_record(
                        &anomaly,
                        EventKind::IssuanceAnomaly,
                        node_id,
                        received,
                    ));
                    anomalous_tasks.push((event.task_id.clone(), problem));
                }
            }
            // Judged against what the node could serve when it issued (entries replaced since
            // are remembered), so an issuance reported late after an outage is not an anomaly.
            if kind == EventKind::SvidIssued
                && !snapshot.may_have_issued(
                    node_id,
                    &event.entry_id,
                    &event.spiffe_id,
                    &event.task_id,
                    event.time_ms,
                )
            {
                let detail = format!(
                    "node {node_id} reported issuing {} (serial {}, entry {:?}), which no entry it may serve grants",
                    event.spiffe_id, event.serial, event.entry_id
                );
                tracing::warn!(target: "tessera::audit", node = node_id, spiffe_id = %event.spiffe_id, serial = %event.serial, "issuance anomaly");
                let mut anomaly = self.server_event(EventKind::IssuanceAnomaly, node_id, detail);
                anomaly.id = anomaly_id(&event.id);
                anomaly.spiffe_id = event.spiffe_id.clone();
                anomaly.serial = event.serial.clone();
                anomaly.entry_id = event.entry_id.clone();
                anomaly.not_after = event.not_after;
                anomaly.time_ms = received;
                records.push(to_record(
                    &anomaly,
                    EventKind::IssuanceAnomaly,
                    node_id,
                    received,
                ));
                anomalous.push(SvidRecord {
                    serial: event.serial.clone(),
                    entry_id: event.entry_id.clone(),
                    spiffe_id: event.spiffe_id.clone(),
                    node_id: node_id.to_owned(),
                    issued_ms: Some(event.time_ms),
                    not_after: Some(event.not_after),
                    revoked_ms: None,
                    reason: None,
                    last_used_ms: None,
                    uses: 0,
                });
            }
        }
        let ended_tasks: Vec<&str> = batch
            .events
            .iter()
            .filter(|e| e.kind == EventKind::TaskEnded as i32)
            .map(|e| e.task_id.as_str())
            .collect();
        let stored = self.store.store_events(records).await;
        if stored.is_ok() {
            for task_id in ended_tasks {
                // Only this node's tokens: a node ends its own tasks.
                self.revoke_jwts(
                    crate::store::JwtFilter {
                        task_id: Some(task_id.to_owned()),
                        node_id: Some(node_id.to_owned()),
                        ..Default::default()
                    },
                    RevocationReason::TaskEnded,
                    "the task ended",
                )
                .await?;
            }
        }
        if stored.is_ok() && !anomalous.is_empty() {
            self.answer_anomalies(node_id, &anomalous).await?;
        }
        if stored.is_ok() && !anomalous_tasks.is_empty() {
            self.answer_task_anomalies(node_id, &anomalous_tasks)
                .await?;
        }
        match stored {
            Ok(count) => Ok(EventAck {
                sequence: batch.sequence,
                stored: count.stored,
                duplicates: count.duplicates,
                error: String::new(),
            }),
            Err(StoreError::Invalid { reason, .. }) => {
                Ok(refused(format!("batch {}: {reason}", batch.sequence)))
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl State {
    /// Does what `on_anomaly` says about tasks node `node_id` should not have started: with
    /// `revoke` or `evict` they are ordered ended (their SVIDs revoked by the node), and with
    /// `evict` the node is evicted as for an issuance anomaly.
    async fn answer_task_anomalies(
        &self,
        node_id: &str,
        tasks: &[(String, String)],
    ) -> Result<(), NodeApiError> {
        if self.config.on_anomaly == OnAnomaly::Record {
            return Ok(());
        }
        for (task_id, problem) in tasks {
            self.order_task_end(task_id, TaskEndReason::Anomaly, problem)
                .await?;
        }
        if self.config.on_anomaly == OnAnomaly::Evict {
            self.answer_anomalies(node_id, &[]).await?;
        }
        Ok(())
    }

    /// Does what `on_anomaly` says about SVIDs node `node_id` should not have issued.
    async fn answer_anomalies(
        &self,
        node_id: &str,
        anomalous: &[SvidRecord],
    ) -> Result<(), NodeApiError> {
        let detail = "issuance anomaly: no entry the node may serve grants this identity";
        match self.config.on_anomaly {
            OnAnomaly::Record => {}
            OnAnomaly::Revoke => {
                self.revoke_svids(anomalous, RevocationReason::Anomaly, detail)
                    .await?;
            }
            OnAnomaly::Evict => {
                self.revoke_svids(anomalous, RevocationReason::Anomaly, detail)
                    .await?;
                match self
                    .store
                    .set_node_status(node_id, NodeStatus::Evicted)
                    .await
                {
                    Ok(_) | Err(StoreError::NodeNotActive { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                self.revoke_node(node_id, RevocationReason::NodeEvicted, detail)
                    .await?;
                tracing::warn!(target: "tessera::audit", node = node_id, "node evicted for an issuance anomaly");
                self.record(self.server_event(
                    EventKind::NodeEvicted,
                    node_id,
                    "evicted for an issuance anomaly".into(),
                ))
                .await;
            }
        }
        Ok(())
    }
}

type AttestStream = Pin<Box<dyn Stream<Item = Result<AttestResponse, Status>> + Send>>;
type ReportStream = Pin<Box<dyn Stream<Item = Result<EventAck, Status>> + Send>>;
type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncUpdate, Status>> + Send>>;

async fn next_step(requests: &mut Streaming<AttestRequest>) -> Result<AttestRequest, NodeApiError> {
    match tokio::time::timeout(STEP_TIMEOUT, requests.next()).await {
        Err(_) => Err(NodeApiError::BadRequest(
            "attestation step timed out".into(),
        )),
        Ok(None) => Err(NodeApiError::BadRequest(
            "attestation stream ended early".into(),
        )),
        Ok(Some(Err(status))) => Err(NodeApiError::BadRequest(format!(
            "attestation stream failed: {}",
            status.message()
        ))),
        Ok(Some(Ok(request))) => Ok(request),
    }
}

async fn attest(
    state: Arc<State>,
    mut requests: Streaming<AttestRequest>,
    responses: mpsc::Sender<Result<AttestResponse, Status>>,
) -> Result<NodeCredentials, NodeApiError> {
    let first = next_step(&mut requests).await?;
    let csrs = first.csrs.ok_or_else(|| {
        NodeApiError::BadRequest("the first attestation step must carry csrs".into())
    })?;
    match first.step {
        Some(attest_request::Step::JoinToken(token)) => {
            state.attest_join_token(&token.token, &csrs).await
        }
        Some(attest_request::Step::X509pop(pop)) => {
            let (node_id, selectors) = state.check_x509pop_chain(&pop.cert_chain)?;
            let mut nonce = vec![0u8; 32];
            aws_lc_rs::rand::fill(&mut nonce)
                .map_err(|_| NodeApiError::Randomness("an x509pop nonce"))?;
            let challenge = AttestResponse {
                step: Some(attest_response::Step::Challenge(X509PopChallenge {
                    nonce: nonce.clone(),
                })),
            };
            if responses.send(Ok(challenge)).await.is_err() {
                return Err(NodeApiError::BadRequest("node went away".into()));
            }
            let proof = match next_step(&mut requests).await?.step {
                Some(attest_request::Step::X509popProof(proof)) => proof,
                _ => {
                    return Err(NodeApiError::BadRequest(
                        "expected the x509pop proof as the second step".into(),
                    ));
                }
            };
            verify_proof(
                &pop.cert_chain[0],
                &x509pop_message(&nonce, &csrs.node_svid, &csrs.ca),
                &proof.signature,
            )?;
            let (credentials, granted) = state.grant(&node_id, &csrs).await?;
            let node = State::attested_record(&node_id, "x509pop", selectors, &granted);
            let node = state.store.attest_node(node).await?;
            state.attested(credentials, &node).await
        }
        Some(attest_request::Step::X509popProof(_)) | None => Err(NodeApiError::BadRequest(
            "the first attestation step must be join_token or x509pop".into(),
        )),
    }
}

impl State {
    /// The node behind a verified client certificate, if it is an active node whose SVID was
    /// issued since its last attestation.
    async fn authenticated_node(&self, leaf: Option<Vec<u8>>) -> Result<NodeRecord, NodeApiError> {
        self.authenticated(leaf, false).await
    }

    /// Like [`authenticated_node`](Self::authenticated_node), but an evicted node (not a
    /// banned one) passes too: what it recorded before it was evicted, the revocations of its
    /// eviction included, still belongs in the audit trail.
    async fn authenticated_reporter(
        &self,
        leaf: Option<Vec<u8>>,
    ) -> Result<NodeRecord, NodeApiError> {
        self.authenticated(leaf, true).await
    }

    async fn authenticated(
        &self,
        leaf: Option<Vec<u8>>,
        evicted_may_report: bool,
    ) -> Result<NodeRecord, NodeApiError> {
        let leaf = leaf.ok_or_else(|| {
            NodeApiError::NotAuthenticated(
                "a node SVID is required as TLS client certificate".into(),
            )
        })?;
        let uris = crate::ca::node::uri_sans_of(&leaf);
        let node_id = match uris.as_slice() {
            [uri] => node_id_of(&self.config.trust_domain, uri).map(str::to_owned),
            _ => None,
        }
        .ok_or_else(|| {
            NodeApiError::NotAuthenticated("the client certificate is not a node SVID".into())
        })?;
        let node =
            self.store.get_node(&node_id).await?.ok_or_else(|| {
                NodeApiError::Forbidden(format!("node {node_id} is not attested"))
            })?;
        let may_report = evicted_may_report && node.status == NodeStatus::Evicted;
        if node.status != NodeStatus::Active && !may_report {
            return Err(NodeApiError::Forbidden(format!(
                "node {node_id} is {}",
                node.status
            )));
        }
        let (_, cert) = X509Certificate::from_der(&leaf).map_err(|_| {
            NodeApiError::NotAuthenticated("the client certificate does not parse".into())
        })?;
        // Node SVIDs are signed by a root itself. A certificate signed by a node's intermediate
        // (which can sign any ID of the trust domain) must never pass for another node.
        let roots = self.snapshots.borrow().bundle.clone();
        let signed_by_root = roots.iter().any(|root| {
            X509Certificate::from_der(root)
                .is_ok_and(|(_, root)| cert.verify_signature(Some(root.public_key())).is_ok())
        });
        if !signed_by_root {
            return Err(NodeApiError::NotAuthenticated(format!(
                "node {node_id}: the client certificate is not a node SVID signed by a root of the trust domain"
            )));
        }
        {
            // SVIDs are back-dated by BACKDATE; one from before the latest attestation belongs
            // to an earlier life of the node (before an eviction) and is refused.
            let issued = cert.validity().not_before.timestamp() + BACKDATE.as_secs() as i64;
            if issued < node.attested_at - 1 {
                return Err(NodeApiError::Forbidden(format!(
                    "node {node_id}: this node SVID predates the node's latest attestation"
                )));
            }
        }
        Ok(node)
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    type AttestStream = AttestStream;
    type SyncStream = SyncStream;
    type ReportEventsStream = ReportStream;

    async fn report_events(
        &self,
        request: Request<Streaming<EventBatch>>,
    ) -> Result<Response<Self::ReportEventsStream>, Status> {
        let (peer, leaf) = peer_of(&request);
        let node = self
            .state
            .authenticated_reporter(leaf)
            .await
            .map_err(|e| refuse("ReportEvents", &peer, e))?;
        let mut batches = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let state = self.state.clone();
        tokio::spawn(async move {
            // One batch at a time, in order: acks arrive in the order batches were sent.
            while let Some(batch) = batches.next().await {
                let batch = match batch {
                    Ok(batch) => batch,
                    Err(status) => {
                        tracing::warn!(node = %node.id, error = %status, "event stream from node broken");
                        return;
                    }
                };
                state.record_contact(&node.id).await;
                let message = match state.ingest(&node.id, batch).await {
                    Ok(ack) => {
                        if !ack.error.is_empty() {
                            tracing::warn!(target: "tessera::audit", node = %node.id, error = %ack.error, "event batch refused");
                        }
                        Ok(ack)
                    }
                    Err(e) => Err(refuse("ReportEvents", &peer, e)),
                };
                let failed = message.is_err();
                if tx.send(message).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn attest(
        &self,
        request: Request<Streaming<AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let (peer, _) = peer_of(&request);
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(2);
        let state = self.state.clone();
        tokio::spawn(async move {
            let message = match attest(state, requests, tx.clone()).await {
                Ok(credentials) => Ok(AttestResponse {
                    step: Some(attest_response::Step::Credentials(credentials)),
                }),
                Err(e) => Err(refuse("Attest", &peer, e)),
            };
            let _ = tx.send(message).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<NodeCredentials>, Status> {
        let (peer, leaf) = peer_of(&request);
        let result = async {
            let node = self.state.authenticated_node(leaf).await?;
            let csrs = request
                .into_inner()
                .csrs
                .ok_or_else(|| NodeApiError::BadRequest("csrs are required".into()))?;
            let (mut credentials, granted) = self.state.grant(&node.id, &csrs).await?;
            self.state
                .store
                .renew_node(&node.id, granted.clone(), unix_now())
                .await?;
            credentials.bundle = Some(self.state.bundle().await?);
            tracing::info!(
                target: "tessera::audit",
                node = %node.id,
                svid_serial = %granted.svid_serial,
                ca_serial = %granted.ca_serial,
                "node credentials renewed"
            );
            Ok::<_, NodeApiError>(credentials)
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e| refuse("Renew", &peer, e))
    }

    async fn publish_crls(
        &self,
        request: Request<PublishCrlsRequest>,
    ) -> Result<Response<PublishCrlsResponse>, Status> {
        let (peer, leaf) = peer_of(&request);
        let result = async {
            let node = self.state.authenticated_node(leaf).await?;
            let crls = request.into_inner().crls;
            let (stored, refused) = self.state.publish_node_crls(&node.id, crls).await?;
            for reason in &refused {
                tracing::warn!(target: "tessera::audit", node = %node.id, %reason, "node CRL refused");
            }
            Ok::<_, NodeApiError>(PublishCrlsResponse {
                stored,
                refused: refused.iter().map(ToString::to_string).collect(),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e| refuse("PublishCrls", &peer, e))
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<MintJwtSvidRequest>,
    ) -> Result<Response<MintJwtSvidResponse>, Status> {
        let (peer, leaf) = peer_of(&request);
        let node = self
            .state
            .authenticated_node(leaf)
            .await
            .map_err(|e| refuse("MintJwtSvid", &peer, e))?;
        self.state
            .mint_jwt(&node.id, request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| refuse("MintJwtSvid", &peer, e))
    }

    async fn sync(
        &self,
        request: Request<SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let (peer, leaf) = peer_of(&request);
        let node = self
            .state
            .authenticated_node(leaf)
            .await
            .map_err(|e| refuse("Sync", &peer, e))?;
        self.state.record_contact(&node.id).await;
        let since_revision = request.get_ref().since_revision;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(stream_updates(
            self.state.clone(),
            node.id,
            node.attested_at,
            since_revision,
            self.state.snapshots.clone(),
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Sends the node its full state (or what changed since `since_revision`), then a delta after
/// every change that concerns it. Ends with PermissionDenied when the node is evicted or
/// banned.
async fn stream_updates(
    state: Arc<State>,
    node_id: String,
    attested_at: i64,
    since_revision: i64,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    tx: mpsc::Sender<Result<SyncUpdate, Status>>,
) {
    // Registered before the first look, so no change published after it goes unnoticed.
    let registration = state.wakers.register(&node_id);
    let mut sync = NodeSync::new(node_id.clone(), since_revision);
    let shutdown = state.shutdown.clone();
    // An open stream is contact too, however long nothing changes.
    let mut contact = tokio::time::interval_at(
        tokio::time::Instant::now() + CONTACT_INTERVAL,
        CONTACT_INTERVAL,
    );
    contact.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let snapshot = snapshots.borrow().clone();
        let standing = snapshot.node(&node_id).map(|n| (n.status, n.attested_at));
        match standing {
            Some((NodeStatus::Active, at)) if at == attested_at => {}
            Some((status, _)) if status != NodeStatus::Active => {
                tracing::info!(target: "tessera::audit", node = %node_id, %status, "sync stream ended: node no longer active");
                let _ = tx
                    .send(Err(NodeApiError::Store(StoreError::NodeNotActive {
                        id: node_id.clone(),
                        status,
                    })
                    .into_status()))
                    .await;
                return;
            }
            Some(_) => {
                // Attested again since this stream began: this stream's credentials are old.
                let _ = tx
                    .send(Err(NodeApiError::Forbidden(format!(
                        "node {node_id} attested again; reconnect with the new node SVID"
                    ))
                    .into_status()))
                    .await;
                return;
            }
            // Not in the snapshot yet (attested a moment ago): its record wakes this stream.
            None if !sync.started() => {}
            None => {
                let _ = tx
                    .send(Err(NodeApiError::Forbidden(format!(
                        "node {node_id} is not attested"
                    ))
                    .into_status()))
                    .await;
                return;
            }
        }
        if standing.is_some()
            && let Some((update, start)) = sync.next(&snapshot, &state.config.trust_domain)
        {
            if let Some(start) = start {
                tracing::debug!(node = %node_id, ?start, revision = update.revision, "sync stream started");
            }
            drop(snapshot);
            if tx.send(Ok(update)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = registration.notify.notified() => {}
            _ = contact.tick() => state.record_contact(&node_id).await,
            _ = tx.closed() => return,
            _ = shutdown.signalled() => {
                let _ = tx.send(Err(NodeApiError::ShuttingDown.into_status())).await;
                return;
            }
        }
    }
}

/// Why the x509pop verifier cannot be built from its CA bundle file. Not a call's error: the
/// server refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum X509PopBundleError {
    /// The file cannot be read or holds no PEM certificate (the error names the file).
    #[error(transparent)]
    Read(#[from] crate::ca::CaError),
    /// The file's certificates give rustls no usable trust anchor or verifier.
    #[error("{}: {source}", path.display())]
    Roots {
        /// The bundle file.
        path: std::path::PathBuf,
        /// What rustls refused.
        #[source]
        source: crate::tls::TlsError,
    },
}

/// Builds the x509pop verifier from the configured CA bundle file.
pub fn x509pop_verifier(
    path: &std::path::Path,
) -> Result<Arc<dyn ClientCertVerifier>, X509PopBundleError> {
    let roots = crate::ca::load_pem_certs(path)?;
    let roots_error = |source| X509PopBundleError::Roots {
        path: path.to_path_buf(),
        source,
    };
    let store = crate::tls::root_store(&roots).map_err(roots_error)?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        crate::tls::provider(),
    )
    .build()
    .map_err(|e| roots_error(crate::tls::TlsError::Verifier(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::node::key_and_csr;
    use crate::proto::tessera::Caller;
    use crate::server::testing;
    use crate::store::JoinTokenRecord;

    fn csrs() -> Csrs {
        let (_, node_svid) = key_and_csr().unwrap();
        let (_, ca) = key_and_csr().unwrap();
        Csrs { node_svid, ca }
    }

    async fn token(state: &State, token: &str, labels: &[&str]) {
        state
            .store
            .create_join_token(JoinTokenRecord {
                digest: hex::encode(sha256(token.as_bytes())),
                expires_at: unix_now() + 600,
                labels: labels.iter().map(|l| l.to_string()).collect(),
                created_at: unix_now(),
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_join_token_admits_one_node_with_its_labels() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        token(&state, "secret-1", &["rack-7"]).await;
        let credentials = state.attest_join_token("secret-1", &csrs()).await.unwrap();
        assert!(credentials.node_id.starts_with("jt-"));
        assert_eq!(credentials.bundle.unwrap().roots.len(), 1);
        let node = state
            .store
            .get_node(&credentials.node_id)
            .await
            .unwrap()
            .unwrap();
        assert!(
            node.selectors.contains(&"node:label:rack-7".to_owned())
                && node
                    .selectors
                    .contains(&"node:attestation:join_token".to_owned()),
            "{:?}",
            node.selectors
        );
        let again = state
            .attest_join_token("secret-1", &csrs())
            .await
            .unwrap_err()
            .into_status();
        assert_eq!(again.code(), tonic::Code::Unauthenticated);
        assert!(again.message().contains("already used"), "{again:?}");
    }

    #[tokio::test]
    async fn a_bad_csr_leaves_the_token_unspent() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        token(&state, "secret-2", &[]).await;
        let bad = Csrs {
            node_svid: b"not a CSR".to_vec(),
            ..csrs()
        };
        let refused = state
            .attest_join_token("secret-2", &bad)
            .await
            .unwrap_err()
            .into_status();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        state.attest_join_token("secret-2", &csrs()).await.unwrap();
    }

    #[test]
    fn an_unusable_x509pop_bundle_says_which_file_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = x509pop_verifier(&missing).err().unwrap();
        assert!(matches!(err, X509PopBundleError::Read(_)), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");

        // A CERTIFICATE block that is not DER: PEM reads it, rustls keeps nothing of it.
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = x509pop_verifier(&junk).err().unwrap();
        assert!(
            matches!(
                &err,
                X509PopBundleError::Roots {
                    source: crate::tls::TlsError::NoRoots,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("junk.pem"), "{err}");
    }

    #[test]
    fn internal_failures_are_logged_not_shown() {
        let corrupt = NodeApiError::Store(StoreError::corrupt("row 7: secret detail"));
        let status = corrupt.into_status();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "internal error");
        let down = NodeApiError::Store(StoreError::unavailable("host db:5432 refused"));
        let status = down.into_status();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(!status.message().contains("db:5432"));
    }

    fn issued(serial: &str) -> Event {
        Event {
            id: new_event_id(),
            kind: EventKind::SvidIssued as i32,
            time_ms: now_ms(),
            trust_domain: "example.org".into(),
            entry_id: "e1".into(),
            spiffe_id: "spiffe://example.org/w".into(),
            serial: serial.into(),
            not_after: unix_now() + 300,
            caller: Some(Caller::default()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_anomalous_issuance_is_revoked_and_with_evict_its_node_is_evicted() {
        for (setting, evicted) in [("", false), ("on_anomaly = \"evict\"", true)] {
            let dir = tempfile::tempdir().unwrap();
            let state = testing::state_with(dir.path(), setting).await;
            let now = unix_now();
            state
                .store
                .attest_node(NodeRecord {
                    id: "node-a".into(),
                    attestation: "join_token".into(),
                    selectors: Vec::new(),
                    status: NodeStatus::Active,
                    attested_at: now,
                    last_seen: now,
                    svid_serial: "01".into(),
                    svid_not_after: now + 3600,
                    ca_serial: "0c0a".into(),
                    ca_not_after: now + 3600,
                })
                .await
                .unwrap();
            state
                .store
                .record_node_ca(NodeCaRecord {
                    serial: "0c0a".into(),
                    node_id: "node-a".into(),
                    server_id: "s1".into(),
                    der: Vec::new(),
                    not_after: now + 3600,
                })
                .await
                .unwrap();
            let ack = state
                .ingest(
                    "node-a",
                    EventBatch {
                        sequence: 1,
                        events: vec![issued("0a0b")],
                    },
                )
                .await
                .unwrap();
            assert!(ack.error.is_empty(), "{ack:?}");
            let orders = state.store.revocations(unix_now()).await.unwrap();
            let leaf = orders.iter().find(|o| o.serial == "0a0b").unwrap();
            assert_eq!(leaf.reason, "anomaly", "{setting}");
            let svid = state.store.svid("0a0b").await.unwrap().unwrap();
            assert_eq!(svid.reason.as_deref(), Some("anomaly"));
            let node = state.store.get_node("node-a").await.unwrap().unwrap();
            let ca_revoked = orders.iter().any(|o| o.serial == "0c0a");
            assert_eq!(
                (node.status == NodeStatus::Evicted, ca_revoked),
                (evicted, evicted),
                "{setting}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state_with(dir.path(), "on_anomaly = \"record\"").await;
        state
            .ingest(
                "node-a",
                EventBatch {
                    sequence: 1,
                    events: vec![issued("0a0b")],
                },
            )
            .await
            .unwrap();
        assert!(
            state
                .store
                .revocations(unix_now())
                .await
                .unwrap()
                .is_empty()
        );
        let bad = crate::server::config::ServerConfig::parse(
            "server.toml",
            "trust_domain = \"example.org\"\non_anomaly = \"panic\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("on_anomaly") && bad.contains("\"panic\"") && bad.contains("evict"),
            "{bad}"
        );
    }

    #[tokio::test]
    async fn batches_the_store_refuses_are_acknowledged_with_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let first = state
            .ingest(
                "node-a",
                EventBatch {
                    sequence: 1,
                    events: vec![issued("0a0b")],
                },
            )
            .await
            .unwrap();
        assert_eq!(
            (first.stored, first.error.as_str()),
            (2, ""),
            "and its anomaly"
        );
        // Another node reporting on node-a's SVID: refused, answered, never a stream error
        // the node would retry for ever.
        let mut revoked = issued("0a0b");
        revoked.kind = EventKind::SvidRevoked as i32;
        let ack = state
            .ingest(
                "node-b",
                EventBatch {
                    sequence: 9,
                    events: vec![revoked],
                },
            )
            .await
            .unwrap();
        assert_eq!(ack.sequence, 9);
        assert!(ack.error.contains("serial 0a0b"), "{ack:?}");
        // An event from the year 10000 never reaches the store.
        let mut late = issued("0c");
        late.time_ms = 253_402_300_800_000;
        let ack = state
            .ingest(
                "node-a",
                EventBatch {
                    sequence: 10,
                    events: vec![late],
                },
            )
            .await
            .unwrap();
        assert!(ack.error.contains("time_ms"), "{ack:?}");
        // A node never reports signing a JWT-SVID (the server signs and records them): such a
        // report is dropped, the rest of its batch stored.
        let mut forged = issued("0d");
        forged.kind = EventKind::JwtIssued as i32;
        forged.serial.clear();
        forged.jti = "forged".into();
        let ack = state
            .ingest(
                "node-a",
                EventBatch {
                    sequence: 11,
                    events: vec![forged, issued("0e")],
                },
            )
            .await
            .unwrap();
        assert_eq!(ack.error, "", "{ack:?}");
        assert!(ack.stored >= 1, "{ack:?}");
        assert!(state.store.jwt("forged").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_sync_stream_of_an_evicted_node_ends_through_the_one_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        token(&state, "secret-3", &[]).await;
        let node_id = state
            .attest_join_token("secret-3", &csrs())
            .await
            .unwrap()
            .node_id;
        let node = state.store.get_node(&node_id).await.unwrap().unwrap();
        state
            .store
            .set_node_status(&node_id, NodeStatus::Evicted)
            .await
            .unwrap();
        let snapshot = crate::server::sync::load_snapshot(state.store.as_ref())
            .await
            .unwrap();
        let (_keep, snapshots) = watch::channel(Arc::new(snapshot));
        let (tx, mut rx) = mpsc::channel(4);
        stream_updates(
            state.clone(),
            node_id.clone(),
            node.attested_at,
            0,
            snapshots,
            tx,
        )
        .await;
        let status = rx.recv().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), format!("node {node_id} is evicted"));
    }

    #[tokio::test(start_paused = true)]
    async fn contact_is_recorded_while_a_sync_stream_is_open_at_most_once_an_interval() {
        const LONG_AGO: i64 = 1_000;
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        token(&state, "secret-4", &[]).await;
        let node_id = state
            .attest_join_token("secret-4", &csrs())
            .await
            .unwrap()
            .node_id;
        let last_seen = || async {
            let node = state.store.get_node(&node_id).await.unwrap().unwrap();
            node.last_seen
        };

        // An event batch or a stream opening records contact, then not again within the interval.
        state.store.touch_node(&node_id, LONG_AGO).await.unwrap();
        state.record_contact(&node_id).await;
        assert!(last_seen().await > LONG_AGO);
        state.store.touch_node(&node_id, LONG_AGO).await.unwrap();
        state.record_contact(&node_id).await;
        assert_eq!(
            last_seen().await,
            LONG_AGO,
            "written twice within the interval"
        );

        // A sync stream that stays open with nothing to send still records contact.
        let node = state.store.get_node(&node_id).await.unwrap().unwrap();
        let snapshot = crate::server::sync::load_snapshot(state.store.as_ref())
            .await
            .unwrap();
        let (_keep, snapshots) = watch::channel(Arc::new(snapshot));
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(stream_updates(
            state.clone(),
            node_id.clone(),
            node.attested_at,
            0,
            snapshots,
            tx,
        ));
        assert!(rx.recv().await.unwrap().is_ok(), "the full state first");
        let deadline = tokio::time::Instant::now() + 3 * CONTACT_INTERVAL;
        while last_seen().await == LONG_AGO {
            assert!(
                tokio::time::Instant::now() < deadline,
                "an open sync stream never recorded contact"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(last_seen().await > LONG_AGO);
    }
}
