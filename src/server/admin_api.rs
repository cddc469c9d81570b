//! The admin API: registration entries, join tokens, nodes and the bundle, for the CLI on the
//! server's root-only socket. Entries are checked here, naming the field at fault; store errors
//! map to gRPC status in one place, [`store_status`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};

use super::State;
use super::sync::entry_to_proto;
use crate::entry::{EntryFields, FieldError, check_node_selector};
use crate::proto::tessera::admin_server::Admin;
use crate::proto::tessera::{
    Bundle, CreateEntryRequest, CreateJoinTokenRequest, Entry, EntryRequest, EventFilter,
    GetBundleRequest, GetInventoryRequest, IdentityInventory, Inventory, JoinToken,
    ListEntriesRequest, ListEntriesResponse, ListEventsResponse, ListNodesRequest,
    ListNodesResponse, NodeInfo, NodeInventory, NodeRequest, StoredEvent, SvidInfo,
    UpdateEntryRequest,
};
use crate::store::{
    EntryRecord, JoinTokenRecord, NodeRecord, NodeStatus, StoreError, SvidRecord, canonical,
    unix_now,
};

/// Longest lifetime of a join token.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
const MAX_LABEL_LEN: usize = 256;

/// The status for a datastore error. Unexpected failures are logged, never shown.
pub fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::Unavailable(e) => {
            tracing::warn!(error = %e, "admin call failed: datastore unavailable");
            Status::unavailable("datastore unavailable; retry once it is back")
        }
        StoreError::NotFound { kind, id } => Status::not_found(format!("no {kind} with id {id:?}")),
        e @ StoreError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        e @ StoreError::RevisionConflict { .. } => Status::aborted(e.to_string()),
        e @ StoreError::NodeNotActive { .. } => Status::failed_precondition(e.to_string()),
        e @ StoreError::TokenRefused(_) => Status::failed_precondition(e.to_string()),
        e @ StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
        e @ StoreError::Corrupt(_) => {
            tracing::error!(error = %e, "admin call failed");
            Status::internal("internal error")
        }
    }
}

fn field_status(error: FieldError) -> Status {
    Status::invalid_argument(format!("entry.{error}"))
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
    fn check(&self, entry: Entry) -> Result<EntryRecord, Status> {
        let config = &self.state.config;
        let x509_ttl = u64::try_from(entry.x509_ttl_seconds)
            .map(Duration::from_secs)
            .map_err(|_| {
                field_status(FieldError::new(
                    "x509_ttl_seconds",
                    entry.x509_ttl_seconds.to_string(),
                    "must be positive",
                ))
            })?;
        let now = unix_now();
        let expires_at = match entry.expires_at {
            Some(at) if at <= now => {
                return Err(field_status(FieldError::new(
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
            return Err(field_status(FieldError::new(
                "inactivity_timeout_seconds",
                timeout.to_string(),
                "must be at least 60 seconds",
            )));
        }
        for (i, selector) in entry.node_selectors.iter().enumerate() {
            check_node_selector(selector).map_err(|reason| {
                field_status(FieldError::new(
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
            owner: entry.owner,
            purpose: entry.purpose,
            expires_at,
            hint: Some(entry.hint).filter(|h| !h.is_empty()),
            dns_names: entry.dns_names,
        };
        let checked = fields
            .check(&config.trust_domain, config.max_x509_ttl)
            .map_err(field_status)?;
        let path = checked.spiffe_id.path();
        if path == "/tessera" || path.starts_with("/tessera/") {
            return Err(field_status(FieldError::new(
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
            hint: checked.hint,
            dns_names: checked.dns_names,
            revision: entry.revision,
            created_at: 0,
            updated_at: 0,
        })
    }
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

fn store_filter(filter: EventFilter) -> Result<crate::store::EventFilter, Status> {
    for (i, kind) in filter.kinds.iter().enumerate() {
        if crate::events::model::kind_from_name(kind).is_none() {
            return Err(Status::invalid_argument(format!(
                "kinds[{i}] = {kind:?}: not an event kind; known: {}",
                crate::events::model::KIND_NAMES.join(", ")
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
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let record = self.check(entry)?;
        let stored = self
            .state
            .store
            .create_entry(record, unix_now())
            .await
            .map_err(store_status)?;
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
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        if entry.id.is_empty() {
            return Err(Status::invalid_argument(
                "entry.id is required for an update",
            ));
        }
        let record = self.check(entry)?;
        let stored = self
            .state
            .store
            .update_entry(record, unix_now())
            .await
            .map_err(store_status)?;
        audit("entry updated", &stored.id);
        Ok(Response::new(entry_to_proto(&stored)))
    }

    async fn delete_entry(
        &self,
        request: Request<EntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        let id = request.into_inner().id;
        let removed = self
            .state
            .store
            .delete_entry(&id)
            .await
            .map_err(store_status)?;
        audit("entry deleted", &removed.id);
        Ok(Response::new(entry_to_proto(&removed)))
    }

    async fn get_entry(&self, request: Request<EntryRequest>) -> Result<Response<Entry>, Status> {
        let id = request.into_inner().id;
        match self
            .state
            .store
            .get_entry(&id)
            .await
            .map_err(store_status)?
        {
            Some(entry) => Ok(Response::new(entry_to_proto(&entry))),
            None => Err(Status::not_found(format!("no entry with id {id:?}"))),
        }
    }

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        let filter = request.into_inner();
        let entries = self
            .state
            .store
            .list_entries()
            .await
            .map_err(store_status)?;
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
                Status::invalid_argument(format!(
                    "ttl_seconds = {}: must be between 1 second and 7 days",
                    request.ttl_seconds
                ))
            })?;
        for (i, label) in request.labels.iter().enumerate() {
            let ok = !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && label.chars().all(|c| !c.is_control() && !c.is_whitespace());
            if !ok {
                return Err(Status::invalid_argument(format!(
                    "labels[{i}] = {label:?}: must be 1 to {MAX_LABEL_LEN} characters without spaces"
                )));
            }
        }
        let mut secret = [0u8; 24];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| Status::internal("no randomness"))?;
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
            .map_err(store_status)?;
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
        let nodes = self.state.store.list_nodes().await.map_err(store_status)?;
        Ok(Response::new(ListNodesResponse {
            nodes: nodes
                .into_iter()
                .map(|n| node_info(&self.state, n))
                .collect(),
        }))
    }

    async fn get_node(&self, request: Request<NodeRequest>) -> Result<Response<NodeInfo>, Status> {
        let id = request.into_inner().id;
        match self.state.store.get_node(&id).await.map_err(store_status)? {
            Some(node) => Ok(Response::new(node_info(&self.state, node))),
            None => Err(Status::not_found(format!("no node with id {id:?}"))),
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
            .map_err(store_status)?;
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
            .map_err(store_status)?;
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
        let filter = store_filter(request.into_inner())?;
        let events = self
            .state
            .store
            .list_events(filter)
            .await
            .map_err(store_status)?;
        let td = self.state.config.trust_domain.name();
        Ok(Response::new(ListEventsResponse {
            events: events.iter().map(|e| stored_event(e, td)).collect(),
        }))
    }

    async fn tail_events(
        &self,
        request: Request<EventFilter>,
    ) -> Result<Response<Self::TailEventsStream>, Status> {
        let mut filter = store_filter(request.into_inner())?;
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut appended = state.store.events_appended();
            let mut shutdown = state.shutdown.clone();
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
                        let _ = tx.send(Err(store_status(e))).await;
                        return;
                    }
                }
                tokio::select! {
                    changed = appended.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                    _ = shutdown.wait_for(|stop| *stop) => return,
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
        let entries = store.list_entries().await.map_err(store_status)?;
        let nodes = store.list_nodes().await.map_err(store_status)?;
        let svids = store.svids(None, None).await.map_err(store_status)?;
        let activity: std::collections::HashMap<String, (Option<i64>, Option<i64>)> = store
            .entry_activity()
            .await
            .map_err(store_status)?
            .into_iter()
            .map(|a| (a.entry_id.clone(), (a.last_issued_ms, a.last_used_ms)))
            .collect();
        let now = unix_now();
        let now_ms = now * 1000;
        let live: Vec<&SvidRecord> = svids
            .iter()
            .filter(|s| s.revoked_ms.is_none() && s.not_after.is_some_and(|t| t > now))
            .collect();
        let identities = entries
            .iter()
            .map(|entry| {
                let (last_issued_ms, last_used_ms) =
                    activity.get(&entry.id).copied().unwrap_or((None, None));
                let unused_past_timeout = entry.inactivity_timeout_seconds.is_some_and(|t| {
                    let since = last_used_ms.unwrap_or(entry.created_at * 1000);
                    now_ms - since > t * 1000
                });
                IdentityInventory {
                    entry: Some(entry_to_proto(entry)),
                    live_svids: live
                        .iter()
                        .filter(|s| s.entry_id == entry.id)
                        .map(|s| svid_info(s))
                        .collect(),
                    last_issued_ms,
                    last_used_ms,
                    registration_expired: entry.expires_at.is_some_and(|at| at <= now),
                    unused_past_timeout,
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
                let last_contact_ms = node.last_seen * 1000;
                NodeInventory {
                    node: Some(node_info(&self.state, node)),
                    live_serials,
                    last_contact_ms,
                }
            })
            .collect();
        Ok(Response::new(Inventory { identities, nodes }))
    }

    async fn get_bundle(
        &self,
        _request: Request<GetBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        let roots = self
            .state
            .store
            .bundle(unix_now())
            .await
            .map_err(store_status)?;
        Ok(Response::new(Bundle {
            trust_domain: self.state.config.trust_domain.name().to_owned(),
            roots: roots.into_iter().map(|r| r.der).collect(),
        }))
    }
}
