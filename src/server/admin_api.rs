//! The admin API: registration entries, join tokens, nodes and the bundle, for the CLI on the
//! server's root-only socket. Entries are checked here, naming the field at fault; every error
//! becomes a gRPC status in one place, [`AdminApiError::into_status`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};

use super::State;
use super::sync::entry_to_proto;
use super::sync::policy_to_proto;
use crate::entry::{EntryFields, FieldError, check_node_selector};
use crate::policy::PolicySet;
use crate::proto::tessera::admin_server::Admin;
use crate::proto::tessera::{
    Bundle, CreateEntryRequest, CreateJoinTokenRequest, EndTaskOrderRequest, Entry, EntryRequest,
    EventFilter, GetBundleRequest, GetInventoryRequest, GetPolicyRequest, IdentityInventory,
    Inventory, JoinToken, JwtInfo, ListEntriesRequest, ListEntriesResponse, ListEventsResponse,
    ListJwtsRequest, ListJwtsResponse, ListNodesRequest, ListNodesResponse,
    ListPolicyVersionsRequest, ListPolicyVersionsResponse, ListTasksRequest, ListTasksResponse,
    NodeInfo, NodeInventory, NodeRequest, Policy, RevocationReason, RevokeEntryRequest,
    RevokeJwtRequest, RevokeJwtResponse, RevokeResponse, RevokeSvidRequest, SetPolicyRequest,
    StoredEvent, SvidInfo, Task, TaskEndReason, TaskLink, TestPolicyRequest, TestPolicyResponse,
    UpdateEntryRequest,
};

/// The longest policy text accepted, in bytes.
const MAX_POLICY_BYTES: usize = 1 << 20;
use crate::store::{
    EntryRecord, EventOrder, JoinTokenRecord, JwtFilter, NodeRecord, NodeStatus, StoreError,
    SvidRecord, canonical, unix_now,
};

/// Longest lifetime of a join token.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_LABEL_LEN: usize = 256;

/// Why an admin call failed. Mapped to a status in [`AdminApiError::into_status`].
#[derive(Debug, thiserror::Error)]
pub enum AdminApiError {
    /// A field of the entry in the request cannot be accepted.
    #[error("entry.{0}")]
    EntryField(#[source] FieldError),
    /// A field of the request (not of an entry) cannot be accepted.
    #[error(transparent)]
    Field(FieldError),
    /// A part the call needs is missing.
    #[error("{0} is required")]
    Missing(&'static str),
    /// The record asked for does not exist.
    #[error("no {kind} with id {id:?}")]
    NotFound {
        /// `entry` or `node`.
        kind: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The datastore failed or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The system's random generator failed.
    #[error("no randomness for {0}")]
    Randomness(&'static str),
    /// No node reported issuing an SVID with this serial.
    #[error(
        "no SVID with serial {0:?} was reported by any node (serials are lowercase hex, as `tessera inventory` shows them)"
    )]
    UnknownSerial(String),
    /// The credential expired: there is nothing left to act on.
    #[error("{0}")]
    Expired(String),
}

impl AdminApiError {
    /// The status the caller sees. Internal failures are logged, never shown.
    pub fn into_status(self) -> Status {
        match self {
            e @ (Self::EntryField(_) | Self::Field(_) | Self::Missing(_)) => {
                Status::invalid_argument(e.to_string())
            }
            e @ (Self::NotFound { .. } | Self::UnknownSerial(_)) => {
                Status::not_found(e.to_string())
            }
            e @ Self::Expired(_) => Status::failed_precondition(e.to_string()),
            Self::Store(e @ StoreError::Unavailable { .. }) => {
                tracing::warn!(error = %e, "admin call failed: datastore unavailable");
                Status::unavailable("datastore unavailable; retry once it is back")
            }
            Self::Store(StoreError::NotFound { kind, id }) => {
                Self::NotFound { kind, id }.into_status()
            }
            Self::Store(e @ StoreError::AlreadyExists(_)) => Status::already_exists(e.to_string()),
            Self::Store(e @ StoreError::RevisionConflict { .. }) => Status::aborted(e.to_string()),
            Self::Store(e @ (StoreError::NodeNotActive { .. } | StoreError::TokenRefused(_))) => {
                Status::failed_precondition(e.to_string())
            }
            Self::Store(e @ StoreError::Invalid { .. }) => Status::invalid_argument(e.to_string()),
            e @ (Self::Store(StoreError::Corrupt { .. }) | Self::Randomness(_)) => {
                tracing::error!(error = %e, "admin call failed");
                Status::internal("internal error")
            }
        }
    }
}

/// The status for any error of an admin call.
fn status(error: impl Into<AdminApiError>) -> Status {
    error.into().into_status()
}

/// The admin service.
pub struct AdminService {
    state: Arc<State>,
}

impl AdminService {
    /// A service over the server's shared state.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    /// Checks an entry as given and returns the record to store.
    fn check(&self, entry: Entry) -> Result<EntryRecord, AdminApiError> {
        let config = &self.state.config;
        let x509_ttl = u64::try_from(entry.x509_ttl_seconds)
            .map(Duration::from_secs)
            .map_err(|_| {
                AdminApiError::EntryField(FieldError::new(
                    "x509_ttl_seconds",
                    entry.x509_ttl_seconds.to_string(),
                    "must be positive",
                ))
            })?;
        let now = unix_now();
        let expires_at = match entry.expires_at {
            Some(at) if at <= now => {
                return Err(AdminApiError::EntryField(FieldError::new(
                    "expires_at",
                    humantime::format_rfc3339_seconds(at_time(at)).to_string(),
                    "is not in the future; an expired registration grants nothing",
                )));
            }
            Some(at) => Some(at_time(at)),
            None => None,
        };
        if let Some(timeout) = entry.inactivity_timeout_seconds
            && timeout < 60
        {
            return Err(AdminApiError::EntryField(FieldError::new(
                "inactivity_timeout_seconds",
                timeout.to_string(),
                "must be at least 60 seconds",
            )));
        }
        let jwt_ttl = match entry.jwt_ttl_seconds {
            None => None,
            Some(seconds) => {
                let ttl = u64::try_from(seconds).map(Duration::from_secs).ok();
                match ttl.filter(|ttl| *ttl <= config.jwt.max_ttl) {
                    Some(ttl) => Some(ttl),
                    None => {
                        return Err(AdminApiError::EntryField(FieldError::new(
                            "jwt_ttl_seconds",
                            seconds.to_string(),
                            format!(
                                "must be positive and at most the server's jwt.max_ttl ({})",
                                humantime::format_duration(config.jwt.max_ttl)
                            ),
                        )));
                    }
                }
            }
        };
        for (i, selector) in entry.node_selectors.iter().enumerate() {
            check_node_selector(selector).map_err(|reason| {
                AdminApiError::EntryField(FieldError::new(
                    format!("node_selectors[{i}]"),
                    selector,
                    reason,
                ))
            })?;
        }
        let fields = EntryFields {
            id: Some(entry.id).filter(|id| !id.is_empty()),
            spiffe_id: entry.spiffe_id,
            selectors: entry.selectors,
            x509_ttl,
            jwt_ttl,
            owner: entry.owner,
            purpose: entry.purpose,
            expires_at,
            hint: Some(entry.hint).filter(|h| !h.is_empty()),
            dns_names: entry.dns_names,
            activation: Some(entry.activation),
            delegates_to: entry.delegates_to,
            labels: entry.labels,
        };
        let checked = fields
            .check(&config.trust_domain, config.max_x509_ttl)
            .map_err(AdminApiError::EntryField)?;
        let path = checked.spiffe_id.path();
        if path == "/tessera" || path.starts_with("/tessera/") {
            return Err(AdminApiError::EntryField(FieldError::new(
                "spiffe_id",
                checked.spiffe_id.as_str(),
                "paths under /tessera/ are reserved for tessera's own identities (nodes, servers)",
            )));
        }
        Ok(EntryRecord {
            id: checked.id,
            spiffe_id: checked.spiffe_id.to_string(),
            selectors: canonical(checked.selectors.iter().map(|s| s.to_string()).collect()),
            node_selectors: canonical(entry.node_selectors),
            x509_ttl_seconds: entry.x509_ttl_seconds,
            owner: checked.owner,
            purpose: checked.purpose,
            expires_at: entry.expires_at,
            inactivity_timeout_seconds: entry.inactivity_timeout_seconds,
            jwt_ttl_seconds: entry.jwt_ttl_seconds,
            hint: checked.hint,
            dns_names: checked.dns_names,
            revision: entry.revision,
            created_at: 0,
            updated_at: 0,
            activation: checked.activation.name().to_owned(),
            delegates_to: checked.delegates_to,
            labels: checked.labels,
        })
    }
}

/// A task of the inventory as the wire carries it.
fn task_to_proto(task: &crate::store::TaskRecord) -> Task {
    let mut out = Task {
        task_id: task.task_id.clone(),
        entry_id: task.entry_id.clone(),
        spiffe_id: task.spiffe_id.clone(),
        purpose: task.purpose.clone(),
        owner: task.owner.clone(),
        chain: task
            .chain
            .iter()
            .map(|(task_id, spiffe_id)| TaskLink {
                task_id: task_id.clone(),
                spiffe_id: spiffe_id.clone(),
            })
            .collect(),
        pid: i32::try_from(task.pid).unwrap_or_default(),
        started_ms: task.started_ms.unwrap_or(0),
        deadline: task.deadline,
        ended_ms: task.ended_ms.unwrap_or(0),
        node_id: task.node_id.clone(),
        starter_uid: task
            .starter_uid
            .and_then(|uid| u32::try_from(uid).ok())
            .unwrap_or_default(),
        ..Task::default()
    };
    if let Some(reason) = &task.end_reason {
        out.set_end_reason(crate::events::model::task_end_reason_from_name(reason));
    }
    out
}

fn at_time(unix: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64)
}

fn node_info(state: &State, node: NodeRecord) -> NodeInfo {
    let spiffe_id = crate::ca::node::node_spiffe_id(&state.config.trust_domain, &node.id)
        .map(|id| id.to_string())
        .unwrap_or_default();
    NodeInfo {
        id: node.id,
        spiffe_id,
        attestation: node.attestation,
        selectors: node.selectors,
        status: node.status.as_str().to_owned(),
        attested_at: node.attested_at,
        last_seen: node.last_seen,
        svid_serial: node.svid_serial,
        svid_not_after: node.svid_not_after,
        ca_serial: node.ca_serial,
        ca_not_after: node.ca_not_after,
    }
}

/// Most events one list call returns.
const MAX_LIST: usize = 10_000;

fn store_filter(filter: EventFilter) -> Result<crate::store::EventFilter, AdminApiError> {
    for (i, kind) in filter.kinds.iter().enumerate() {
        if crate::events::model::kind_from_name(kind).is_none() {
            return Err(AdminApiError::Field(FieldError::new(
                format!("kinds[{i}]"),
                kind,
                format!(
                    "not an event kind; known: {}",
                    crate::events::model::KIND_NAMES.join(", ")
                ),
            )));
        }
    }
    let text = |s: String| Some(s).filter(|s| !s.is_empty());
    let limit = match filter.limit {
        0 => 1000,
        n => (n as usize).min(MAX_LIST),
    };
    Ok(crate::store::EventFilter {
        since_ms: (filter.since_ms > 0).then_some(filter.since_ms),
        until_ms: (filter.until_ms > 0).then_some(filter.until_ms),
        kinds: filter.kinds,
        spiffe_id: text(filter.spiffe_id),
        entry_id: text(filter.entry_id),
        node_id: text(filter.node_id),
        serial: text(filter.serial),
        after_seq: (filter.after_seq > 0).then_some(filter.after_seq),
        limit,
        order: if filter.by_event_time {
            EventOrder::EventTime
        } else {
            EventOrder::Arrival
        },
    })
}

fn stored_event(event: &crate::store::StoredEvent, trust_domain: &str) -> StoredEvent {
    StoredEvent {
        seq: event.seq,
        received_ms: event.event.received_ms,
        event: Some(crate::store::wire::from_record(&event.event, trust_domain)),
    }
}

fn svid_info(svid: &SvidRecord) -> SvidInfo {
    SvidInfo {
        serial: svid.serial.clone(),
        entry_id: svid.entry_id.clone(),
        spiffe_id: svid.spiffe_id.clone(),
        node_id: svid.node_id.clone(),
        issued_ms: svid.issued_ms.unwrap_or(0),
        not_after: svid.not_after.unwrap_or(0),
        revoked_ms: svid.revoked_ms,
        reason: svid.reason.clone().unwrap_or_default(),
        last_used_ms: svid.last_used_ms,
        uses: svid.uses,
    }
}

/// The operator's reason for a revocation: required, one line of reasonable length.
fn check_revocation_reason(reason: &str) -> Result<String, AdminApiError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > MAX_REASON_LEN || reason.contains(['\n', '\0']) {
        return Err(AdminApiError::Field(FieldError::new(
            "reason",
            reason,
            format!("say why, in one line of at most {MAX_REASON_LEN} bytes"),
        )));
    }
    Ok(reason.to_owned())
}

/// Longest reason an operator may give for a revocation, in bytes.
const MAX_REASON_LEN: usize = 1024;

impl AdminService {
    /// Revokes `svids` for an operator's `reason` and answers what changed.
    async fn revoke(
        &self,
        svids: Vec<SvidRecord>,
        reason: String,
    ) -> Result<Response<RevokeResponse>, Status> {
        let (revoked, already) = self
            .state
            .revoke_svids(&svids, RevocationReason::Operator, &reason)
            .await
            .map_err(status)?;
        for serial in &revoked {
            audit("SVID revoked", serial);
        }
        Ok(Response::new(RevokeResponse {
            revoked: svids
                .iter()
                .filter(|s| revoked.contains(&s.serial))
                .map(svid_info)
                .collect(),
            already_revoked: already,
        }))
    }
}

fn audit(action: &'static str, subject: &str) {
    tracing::info!(target: "tessera::audit", action, subject, "admin change");
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_entry(
        &self,
        request: Request<CreateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        let entry = request
            .into_inner()
            .entry
            .ok_or(AdminApiError::Missing("entry"))
            .map_err(status)?;
        let record = self.check(entry).map_err(status)?;
        let stored = self
            .state
            .store
            .create_entry(record, unix_now())
            .await
            .map_err(status)?;
        audit("entry created", &stored.id);
        Ok(Response::new(entry_to_proto(&stored)))
    }

    async fn update_entry(
        &self,
        request: Request<UpdateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        let entry = request
            .into_inner()
            .entry
            .ok_or(AdminApiError::Missing("entry"))
            .map_err(status)?;
        if entry.id.is_empty() {
            return Err(status(AdminApiError::Missing("entry.id (of an update)")));
        }
        let record = self.check(entry).map_err(status)?;
        let stored = self
            .state
            .store
            .update_entry(record, unix_now())
            .await
            .map_err(status)?;
        audit("entry updated", &stored.id);
        Ok(Response::new(entry_to_proto(&stored)))
    }

    async fn revoke_svid(
        &self,
        request: Request<RevokeSvidRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let request = request.into_inner();
        let reason = check_revocation_reason(&request.reason).map_err(status)?;
        let serial = request.serial.trim().to_ascii_lowercase();
        if serial.is_empty()
            || serial.len() > 40
            || !serial.len().is_multiple_of(2)
            || hex::decode(&serial).is_err()
        {
            return Err(status(AdminApiError::Field(FieldError::new(
                "serial",
                &request.serial,
                "a certificate serial is lowercase hex of whole bytes, at most 20 of them",
            ))));
        }
        let svid = self
            .state
            .store
            .svid(&serial)
            .await
            .map_err(status)?
            .ok_or_else(|| status(AdminApiError::UnknownSerial(serial.clone())))?;
        self.revoke(vec![svid], reason).await
    }

    async fn revoke_entry(
        &self,
        request: Request<RevokeEntryRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let request = request.into_inner();
        let reason = check_revocation_reason(&request.reason).map_err(status)?;
        let entry = self
            .state
            .store
            .get_entry(&request.id)
            .await
            .map_err(status)?;
        let svids = self
            .state
            .store
            .svids(Some(&request.id), None)
            .await
            .map_err(status)?;
        if entry.is_none() && svids.is_empty() {
            return Err(status(AdminApiError::NotFound {
                kind: "entry",
                id: request.id,
            }));
        }
        let now = unix_now();
        let live = svids.into_iter().filter(|s| s.may_be_live(now)).collect();
        self.state
            .revoke_jwts(
                JwtFilter {
                    entry_id: Some(request.id.clone()),
                    ..Default::default()
                },
                RevocationReason::Operator,
                &reason,
            )
            .await
            .map_err(status)?;
        self.revoke(live, reason).await
    }

    async fn revoke_jwt(
        &self,
        request: Request<RevokeJwtRequest>,
    ) -> Result<Response<RevokeJwtResponse>, Status> {
        let request = request.into_inner();
        let reason = check_revocation_reason(&request.reason).map_err(status)?;
        let jwt = self
            .state
            .store
            .jwt(&request.jti)
            .await
            .map_err(status)?
            .ok_or_else(|| {
                status(AdminApiError::NotFound {
                    kind: "JWT-SVID",
                    id: request.jti.clone(),
                })
            })?;
        if jwt.revoked_ms.is_some() {
            return Ok(Response::new(RevokeJwtResponse {
                jwt: Some(jwt_info(&jwt)),
                already_revoked: true,
            }));
        }
        if !jwt.may_be_live(unix_now()) {
            return Err(status(AdminApiError::Expired(format!(
                "JWT-SVID {} expired at {} (Unix seconds); there is nothing to revoke",
                jwt.jti,
                jwt.expires_at.unwrap_or(0)
            ))));
        }
        let event = self
            .state
            .jwt_revoked_event(&jwt, RevocationReason::Operator, &reason);
        let received = crate::events::model::now_ms();
        self.state
            .store
            .store_events(vec![crate::store::wire::to_record(
                &event,
                crate::proto::tessera::EventKind::JwtRevoked,
                "",
                received,
            )])
            .await
            .map_err(status)?;
        audit("JWT-SVID revoked", &jwt.jti);
        let revoked = crate::store::JwtRecord {
            revoked_ms: Some(event.time_ms),
            reason: Some("operator".into()),
            ..jwt
        };
        Ok(Response::new(RevokeJwtResponse {
            jwt: Some(jwt_info(&revoked)),
            already_revoked: false,
        }))
    }

    async fn list_jwts(
        &self,
        request: Request<ListJwtsRequest>,
    ) -> Result<Response<ListJwtsResponse>, Status> {
        let request = request.into_inner();
        let text = |s: String| (!s.is_empty()).then_some(s);
        let jwts = self
            .state
            .store
            .jwts(JwtFilter {
                entry_id: text(request.entry_id),
                node_id: text(request.node_id),
                task_id: None,
                live_at: request.live_only.then(unix_now),
                limit: if request.limit == 0 {
                    1000
                } else {
                    request.limit as usize
                },
            })
            .await
            .map_err(status)?;
        Ok(Response::new(ListJwtsResponse {
            jwts: jwts.iter().map(jwt_info).collect(),
        }))
    }

    async fn activate_entry(
        &self,
        request: Request<EntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        let id = request.into_inner().id;
        let entry = self
            .state
            .store
            .get_entry(&id)
            .await
            .map_err(status)?
            .ok_or_else(|| {
                status(AdminApiError::NotFound {
                    kind: "entry",
                    id: id.clone(),
                })
            })?;
        let was_dormant = self
            .state
            .store
            .activate_entry(&id, crate::events::model::now_ms())
            .await
            .map_err(status)?;
        audit(
            if was_dormant {
                "entry activated"
            } else {
                "entry activity clock reset"
            },
            &id,
        );
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn delete_entry(
        &self,
        request: Request<EntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        let id = request.into_inner().id;
        let removed = self.state.store.delete_entry(&id).await.map_err(status)?;
        audit("entry deleted", &removed.id);
        // X.509-SVIDs go when agents drop the entry; JWT-SVIDs are refused everywhere.
        self.state
            .revoke_jwts(
                JwtFilter {
                    entry_id: Some(removed.id.clone()),
                    ..Default::default()
                },
                RevocationReason::EntryRemoved,
                "entry deleted",
            )
            .await
            .map_err(status)?;
        Ok(Response::new(entry_to_proto(&removed)))
    }

    async fn get_entry(&self, request: Request<EntryRequest>) -> Result<Response<Entry>, Status> {
        let id = request.into_inner().id;
        match self.state.store.get_entry(&id).await.map_err(status)? {
            Some(entry) => Ok(Response::new(entry_to_proto(&entry))),
            None => Err(status(AdminApiError::NotFound { kind: "entry", id })),
        }
    }

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        let filter = request.into_inner();
        let entries = self.state.store.list_entries().await.map_err(status)?;
        let entries = entries
            .iter()
            .filter(|e| filter.spiffe_id.is_empty() || e.spiffe_id == filter.spiffe_id)
            .filter(|e| filter.owner.is_empty() || e.owner == filter.owner)
            .map(entry_to_proto)
            .collect();
        Ok(Response::new(ListEntriesResponse { entries }))
    }

    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<JoinToken>, Status> {
        let request = request.into_inner();
        let ttl = u64::try_from(request.ttl_seconds)
            .ok()
            .map(Duration::from_secs)
            .filter(|ttl| (Duration::from_secs(1)..=MAX_TOKEN_TTL).contains(ttl))
            .ok_or_else(|| {
                status(AdminApiError::Field(FieldError::new(
                    "ttl_seconds",
                    request.ttl_seconds.to_string(),
                    "must be between 1 second and 7 days",
                )))
            })?;
        for (i, label) in request.labels.iter().enumerate() {
            let ok = !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && label.chars().all(|c| !c.is_control() && !c.is_whitespace());
            if !ok {
                return Err(status(AdminApiError::Field(FieldError::new(
                    format!("labels[{i}]"),
                    label,
                    format!("must be 1 to {MAX_LABEL_LEN} characters without spaces"),
                ))));
            }
        }
        let mut secret = [0u8; 24];
        aws_lc_rs::rand::fill(&mut secret)
            .map_err(|_| status(AdminApiError::Randomness("a join token")))?;
        let token = hex::encode(secret);
        let digest = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            token.as_bytes(),
        ));
        let now = unix_now();
        let expires_at = now + ttl.as_secs() as i64;
        let labels = canonical(request.labels);
        self.state
            .store
            .create_join_token(JoinTokenRecord {
                digest: digest.clone(),
                expires_at,
                labels: labels.clone(),
                created_at: now,
            })
            .await
            .map_err(status)?;
        audit("join token created", &digest[..16]);
        Ok(Response::new(JoinToken {
            token,
            expires_at,
            labels,
        }))
    }

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let nodes = self.state.store.list_nodes().await.map_err(status)?;
        Ok(Response::new(ListNodesResponse {
            nodes: nodes
                .into_iter()
                .map(|n| node_info(&self.state, n))
                .collect(),
        }))
    }

    async fn get_node(&self, request: Request<NodeRequest>) -> Result<Response<NodeInfo>, Status> {
        let id = request.into_inner().id;
        match self.state.store.get_node(&id).await.map_err(status)? {
            Some(node) => Ok(Response::new(node_info(&self.state, node))),
            None => Err(status(AdminApiError::NotFound { kind: "node", id })),
        }
    }

    async fn evict_node(
        &self,
        request: Request<NodeRequest>,
    ) -> Result<Response<NodeInfo>, Status> {
        let id = request.into_inner().id;
        let node = self
            .state
            .store
            .set_node_status(&id, NodeStatus::Evicted)
            .await
            .map_err(status)?;
        self.state
            .revoke_node(
                &id,
                RevocationReason::NodeEvicted,
                "node evicted by an operator",
            )
            .await
            .map_err(status)?;
        audit("node evicted", &id);
        self.state
            .record(self.state.server_event(
                crate::proto::tessera::EventKind::NodeEvicted,
                &id,
                "evicted by an operator".into(),
            ))
            .await;
        Ok(Response::new(node_info(&self.state, node)))
    }

    async fn ban_node(&self, request: Request<NodeRequest>) -> Result<Response<NodeInfo>, Status> {
        let id = request.into_inner().id;
        let node = self
            .state
            .store
            .set_node_status(&id, NodeStatus::Banned)
            .await
            .map_err(status)?;
        self.state
            .revoke_node(
                &id,
                RevocationReason::NodeEvicted,
                "node banned by an operator",
            )
            .await
            .map_err(status)?;
        audit("node banned", &id);
        self.state
            .record(self.state.server_event(
                crate::proto::tessera::EventKind::NodeEvicted,
                &id,
                "banned by an operator".into(),
            ))
            .await;
        Ok(Response::new(node_info(&self.state, node)))
    }

    type TailEventsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<StoredEvent, Status>> + Send>>;

    async fn list_events(
        &self,
        request: Request<EventFilter>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let filter = store_filter(request.into_inner()).map_err(status)?;
        let events = self.state.store.list_events(filter).await.map_err(status)?;
        let td = self.state.config.trust_domain.name();
        Ok(Response::new(ListEventsResponse {
            events: events.iter().map(|e| stored_event(e, td)).collect(),
        }))
    }

    async fn tail_events(
        &self,
        request: Request<EventFilter>,
    ) -> Result<Response<Self::TailEventsStream>, Status> {
        let mut filter = store_filter(request.into_inner()).map_err(status)?;
        // Tailing resumes after the last seq sent, which only arrival order makes complete.
        filter.order = EventOrder::Arrival;
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut appended = state.store.events_appended();
            let shutdown = state.shutdown.clone();
            let td = state.config.trust_domain.name().to_owned();
            loop {
                appended.borrow_and_update();
                match state.store.list_events(filter.clone()).await {
                    Ok(events) => {
                        for event in &events {
                            filter.after_seq = Some(event.seq);
                            if tx.send(Ok(stored_event(event, &td))).await.is_err() {
                                return;
                            }
                        }
                        if events.len() >= filter.limit {
                            continue;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                }
                tokio::select! {
                    changed = appended.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = shutdown.signalled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_inventory(
        &self,
        _request: Request<GetInventoryRequest>,
    ) -> Result<Response<Inventory>, Status> {
        let store = &self.state.store;
        let entries = store.list_entries().await.map_err(status)?;
        let nodes = store.list_nodes().await.map_err(status)?;
        let svids = store.svids(None, None).await.map_err(status)?;
        let activity: std::collections::HashMap<String, (Option<i64>, Option<i64>)> = store
            .entry_activity()
            .await
            .map_err(status)?
            .into_iter()
            .map(|a| (a.entry_id.clone(), (a.last_issued_ms, a.last_used_ms)))
            .collect();
        let last_events: std::collections::HashMap<String, i64> = store
            .node_activity()
            .await
            .map_err(status)?
            .into_iter()
            .map(|a| (a.node_id, a.last_event_ms))
            .collect();
        let now = unix_now();
        // Stored values are whatever a node or an old version wrote: arithmetic on them
        // saturates rather than panics.
        let now_ms = now.saturating_mul(1000);
        let live: Vec<&SvidRecord> = svids
            .iter()
            .filter(|s| s.revoked_ms.is_none() && s.not_after.is_some_and(|t| t > now))
            .collect();
        // Taken out of use, not merely replaced by a rotation (whose SVID its holder may use).
        let revoked: Vec<&SvidRecord> = svids
            .iter()
            .filter(|s| {
                s.revoked_ms.is_some()
                    && !matches!(s.reason.as_deref(), Some("superseded" | "ca_rotated"))
                    && s.not_after.is_some_and(|t| t > now)
            })
            .collect();
        let dormant: std::collections::HashSet<String> = store
            .entry_standings()
            .await
            .map_err(status)?
            .into_iter()
            .filter(|s| s.dormant_since_ms.is_some())
            .map(|s| s.entry_id)
            .collect();
        let identities = entries
            .iter()
            .map(|entry| {
                let (last_issued_ms, last_used_ms) =
                    activity.get(&entry.id).copied().unwrap_or((None, None));
                let unused_past_timeout = entry.inactivity_timeout_seconds.is_some_and(|t| {
                    let since = last_used_ms.unwrap_or(entry.created_at.saturating_mul(1000));
                    now_ms.saturating_sub(since) > t.saturating_mul(1000)
                });
                IdentityInventory {
                    entry: Some(entry_to_proto(entry)),
                    live_svids: live
                        .iter()
                        .filter(|s| s.entry_id == entry.id)
                        .map(|s| svid_info(s))
                        .collect(),
                    revoked_svids: revoked
                        .iter()
                        .filter(|s| s.entry_id == entry.id)
                        .map(|s| svid_info(s))
                        .collect(),
                    last_issued_ms,
                    last_used_ms,
                    registration_expired: entry.expires_at.is_some_and(|at| at <= now),
                    unused_past_timeout,
                    dormant: dormant.contains(&entry.id),
                }
            })
            .collect();
        let nodes = nodes
            .into_iter()
            .map(|node| {
                let live_serials = live
                    .iter()
                    .filter(|s| s.node_id == node.id)
                    .map(|s| s.serial.clone())
                    .collect();
                let revoked_serials = revoked
                    .iter()
                    .filter(|s| s.node_id == node.id)
                    .map(|s| s.serial.clone())
                    .collect();
                // The later of the server's own record of the node's calls and the time of the
                // latest event it reported, which a node cannot push past the present.
                let last_event_ms = last_events.get(&node.id).copied().unwrap_or(0).min(now_ms);
                let last_contact_ms = node.last_seen.saturating_mul(1000).max(last_event_ms);
                NodeInventory {
                    node: Some(node_info(&self.state, node)),
                    live_serials,
                    revoked_serials,
                    last_contact_ms,
                }
            })
            .collect();
        let day_ago_ms = now_ms.saturating_sub(24 * 3600 * 1000);
        let tasks = store
            .tasks(false)
            .await
            .map_err(status)?
            .iter()
            .filter(|t| t.ended_ms.is_none_or(|ended| ended >= day_ago_ms))
            .map(task_to_proto)
            .collect();
        Ok(Response::new(Inventory {
            identities,
            nodes,
            tasks,
        }))
    }

    async fn set_policy(
        &self,
        request: Request<SetPolicyRequest>,
    ) -> Result<Response<Policy>, Status> {
        let text = request.into_inner().text;
        let current = self.state.store.policy().await.map_err(status)?;
        let next_version = current.map_or(1, |c| c.version + 1);
        if !text.trim().is_empty() {
            if text.len() > MAX_POLICY_BYTES {
                return Err(Status::invalid_argument(format!(
                    "the policy is {} bytes; at most {MAX_POLICY_BYTES} are accepted",
                    text.len()
                )));
            }
            // Refused as a whole, with where: the version in force stays.
            PolicySet::parse(&text, next_version as u64, "policy")
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let text = if text.trim().is_empty() {
            String::new()
        } else {
            text
        };
        let stored = self
            .state
            .store
            .set_policy(&text, crate::events::model::now_ms())
            .await
            .map_err(status)?;
        audit("policy set", &stored.version.to_string());
        Ok(Response::new(policy_to_proto(&stored)))
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<Policy>, Status> {
        let version = request.into_inner().version;
        let found = if version == 0 {
            self.state.store.policy().await.map_err(status)?
        } else {
            self.state
                .store
                .policy_history()
                .await
                .map_err(status)?
                .into_iter()
                .find(|p| p.version == version)
        };
        match found {
            Some(policy) => Ok(Response::new(policy_to_proto(&policy))),
            None if version == 0 => Ok(Response::new(Policy::default())),
            None => Err(Status::not_found(format!("no policy version {version}"))),
        }
    }

    async fn list_policy_versions(
        &self,
        _request: Request<ListPolicyVersionsRequest>,
    ) -> Result<Response<ListPolicyVersionsResponse>, Status> {
        let versions = self
            .state
            .store
            .policy_history()
            .await
            .map_err(status)?
            .iter()
            .map(policy_to_proto)
            .collect();
        Ok(Response::new(ListPolicyVersionsResponse { versions }))
    }

    async fn test_policy(
        &self,
        request: Request<TestPolicyRequest>,
    ) -> Result<Response<TestPolicyResponse>, Status> {
        let request = request.into_inner();
        let policy = match &request.text {
            Some(text) => PolicySet::parse(text, 0, "policy")
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            None => {
                let current = self.state.store.policy().await.map_err(status)?;
                match current.filter(|p| !p.text.is_empty()) {
                    Some(p) => PolicySet::parse(&p.text, p.version as u64, "policy")
                        .map_err(|e| Status::internal(format!("the stored policy: {e}")))?,
                    None => {
                        return Err(Status::failed_precondition(
                            "no policy is set (entries alone decide); give one with --file",
                        ));
                    }
                }
            }
        };
        let entry = self
            .state
            .store
            .get_entry(&request.resource)
            .await
            .map_err(status)?
            .ok_or_else(|| Status::not_found(format!("no entry with id {:?}", request.resource)))?;
        let decision = super::policy::decide_from_pairs(
            &policy,
            &request.principal,
            &request.action,
            &entry,
            &request.context,
        )
        .map_err(Status::invalid_argument)?;
        Ok(Response::new(TestPolicyResponse {
            allowed: decision.allowed,
            version: decision.version as i64,
            determining: decision.determining,
            errors: decision.errors,
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let live_only = !request.into_inner().include_ended;
        let tasks = self
            .state
            .store
            .tasks(live_only)
            .await
            .map_err(status)?
            .iter()
            .map(task_to_proto)
            .collect();
        Ok(Response::new(ListTasksResponse { tasks }))
    }

    async fn end_task(
        &self,
        request: Request<EndTaskOrderRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let request = request.into_inner();
        let reason = check_revocation_reason(&request.reason).map_err(status)?;
        let ordered = self
            .state
            .order_task_end(&request.task_id, TaskEndReason::Operator, &reason)
            .await
            .map_err(status)?;
        Ok(Response::new(ListTasksResponse {
            tasks: ordered.iter().map(task_to_proto).collect(),
        }))
    }

    async fn get_bundle(
        &self,
        _request: Request<GetBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        let roots = self.state.store.bundle(unix_now()).await.map_err(status)?;
        let jwt_keys = self
            .state
            .store
            .jwt_keys(unix_now())
            .await
            .map_err(status)?;
        Ok(Response::new(Bundle {
            trust_domain: self.state.config.trust_domain.name().to_owned(),
            roots: roots.into_iter().map(|r| r.der).collect(),
            jwt_keys: jwt_keys.into_iter().map(|k| k.jwk).collect(),
        }))
    }
}

/// A JWT-SVID of the inventory as the admin API shows it.
fn jwt_info(jwt: &crate::store::JwtRecord) -> JwtInfo {
    JwtInfo {
        jti: jwt.jti.clone(),
        entry_id: jwt.entry_id.clone(),
        spiffe_id: jwt.spiffe_id.clone(),
        node_id: jwt.node_id.clone(),
        task_id: jwt.task_id.clone(),
        audience: jwt.audience.clone(),
        issued_ms: jwt.issued_ms.unwrap_or(0),
        expires_at: jwt.expires_at.unwrap_or(0),
        revoked_ms: jwt.revoked_ms.unwrap_or(0),
        reason: jwt.reason.clone().unwrap_or_default(),
        last_used_ms: jwt.last_used_ms.unwrap_or(0),
        uses: u64::try_from(jwt.uses).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::testing;

    fn entry() -> Entry {
        Entry {
            spiffe_id: "spiffe://example.org/billing".into(),
            selectors: vec!["unix:uid:1001".into()],
            x509_ttl_seconds: 300,
            owner: "team-billing".into(),
            purpose: "charges cards".into(),
            ..Default::default()
        }
    }

    async fn create(service: &AdminService, entry: Entry) -> Result<Entry, Status> {
        service
            .create_entry(Request::new(CreateEntryRequest { entry: Some(entry) }))
            .await
            .map(Response::into_inner)
    }

    #[tokio::test]
    async fn entries_are_checked_field_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let service = AdminService::new(testing::state(dir.path()).await);
        let created = create(&service, entry()).await.unwrap();
        assert_eq!(created.revision, 1);

        let cases = [
            (
                Entry {
                    owner: "ops\u{7}".into(),
                    ..entry()
                },
                "entry.owner = \"ops\\u{7}\"",
            ),
            (
                Entry {
                    purpose: "p".repeat(2000),
                    ..entry()
                },
                "entry.purpose = ",
            ),
            (
                Entry {
                    selectors: vec!["unix:uid:1".into(), "unix:uid:2".into()],
                    ..entry()
                },
                "entry.selectors[1] = \"unix:uid:2\"",
            ),
            (
                Entry {
                    selectors: vec!["unix:path:/opt/../bin/x".into()],
                    ..entry()
                },
                "entry.selectors[0]",
            ),
            (
                Entry {
                    spiffe_id: "spiffe://example.org/tessera/node/x".into(),
                    ..entry()
                },
                "entry.spiffe_id",
            ),
        ];
        for (entry, want) in cases {
            let status = create(&service, entry).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().starts_with(want), "{want}: {status:?}");
        }
        let missing = service
            .create_entry(Request::new(CreateEntryRequest { entry: None }))
            .await
            .unwrap_err();
        assert_eq!(missing.message(), "entry is required");
    }

    #[tokio::test]
    async fn store_errors_map_to_their_status() {
        let dir = tempfile::tempdir().unwrap();
        let service = AdminService::new(testing::state(dir.path()).await);
        let absent = service
            .get_entry(Request::new(EntryRequest { id: "nope".into() }))
            .await
            .unwrap_err();
        assert_eq!(absent.code(), tonic::Code::NotFound);
        assert_eq!(absent.message(), "no entry with id \"nope\"");
        let absent = service
            .evict_node(Request::new(NodeRequest { id: "n9".into() }))
            .await
            .unwrap_err();
        assert_eq!(absent.code(), tonic::Code::NotFound);
        create(&service, entry()).await.unwrap();
        let twice = create(&service, entry()).await.unwrap_err();
        assert_eq!(twice.code(), tonic::Code::AlreadyExists);

        let corrupt = AdminApiError::from(StoreError::corrupt("row 3: key material"));
        let status = corrupt.into_status();
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::Internal, "internal error")
        );
        let down = status_of(StoreError::unavailable("db.internal refused"));
        assert_eq!(down.code(), tonic::Code::Unavailable);
        assert!(!down.message().contains("db.internal"));
    }

    fn status_of(error: StoreError) -> Status {
        status(error)
    }

    #[tokio::test]
    async fn join_tokens_are_checked_and_never_shown_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let service = AdminService::new(testing::state(dir.path()).await);
        let bad = service
            .create_join_token(Request::new(CreateJoinTokenRequest {
                ttl_seconds: 0,
                labels: vec![],
            }))
            .await
            .unwrap_err();
        assert!(bad.message().starts_with("ttl_seconds = \"0\""), "{bad:?}");
        let token = service
            .create_join_token(Request::new(CreateJoinTokenRequest {
                ttl_seconds: 60,
                labels: vec!["rack-1".into()],
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(token.token.len(), 48);
        let shown = format!("{token:?}");
        assert!(
            !shown.contains(&token.token) && shown.contains("rack-1"),
            "{shown}"
        );
        let attestation = crate::proto::tessera::JoinTokenAttestation {
            token: token.token.clone(),
        };
        assert!(!format!("{attestation:?}").contains(&token.token));
    }

    #[tokio::test]
    async fn inventory_never_panics_on_stored_values() {
        let dir = tempfile::tempdir().unwrap();
        let state = testing::state(dir.path()).await;
        let service = AdminService::new(state.clone());
        let mut created = entry();
        created.inactivity_timeout_seconds = Some(i64::MAX);
        create(&service, created).await.unwrap();
        state
            .store
            .attest_node(NodeRecord {
                id: "n1".into(),
                attestation: "join_token".into(),
                selectors: vec!["node:id:n1".into()],
                status: NodeStatus::Active,
                attested_at: 1,
                last_seen: i64::MAX,
                svid_serial: "01".into(),
                svid_not_after: i64::MAX,
                ca_serial: "02".into(),
                ca_not_after: i64::MAX,
            })
            .await
            .unwrap();
        let inventory = service
            .get_inventory(Request::new(GetInventoryRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(inventory.nodes[0].last_contact_ms, i64::MAX);
        assert!(!inventory.identities[0].unused_past_timeout);
    }
}
