//! A standalone agent's admin socket: the operator's revocations (`tessera svid revoke` and
//! `tessera entry revoke --admin-socket <this socket>`) and task ends (`tessera task end
//! --admin-socket`) on the same `tessera.v1.Admin` service the server serves, so one CLI
//! reaches both. Every other call is the server's and answers `Unimplemented`, saying so.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::cache::{IdentityCache, RevokedSvid, SerialRevocation};
use super::tasks::TaskRegistry;
use super::tasks::service::to_proto;
use crate::proto::tessera::admin_server::Admin;
use crate::proto::tessera::{
    Bundle, CreateEntryRequest, CreateJoinTokenRequest, EndTaskOrderRequest, Entry, EntryRequest,
    EventFilter, GetBundleRequest, GetInventoryRequest, Inventory, JoinToken, JwtInfo,
    ListEntriesRequest, ListEntriesResponse, ListEventsResponse, ListJwtsRequest, ListJwtsResponse,
    ListNodesRequest, ListNodesResponse, ListTasksRequest, ListTasksResponse, NodeInfo,
    NodeRequest, RevocationReason, RevokeEntryRequest, RevokeJwtRequest, RevokeJwtResponse,
    RevokeResponse, RevokeSvidRequest, StoredEvent, SvidInfo, TaskEndReason, UpdateEntryRequest,
};
use crate::proto::tessera::{
    GetPolicyRequest, ListPolicyVersionsRequest, ListPolicyVersionsResponse, Policy,
    SetPolicyRequest, TestPolicyRequest, TestPolicyResponse,
};

/// Longest reason an operator may give, in bytes (as on the server).
const MAX_REASON_LEN: usize = 1024;

/// The admin service of a standalone agent.
pub struct AgentAdmin {
    /// The identity cache whose SVIDs are revoked.
    cache: Arc<IdentityCache>,
    /// The agent's tasks, which an operator may end.
    tasks: Arc<TaskRegistry>,
    /// The agent's JWT-SVID signer, whose tokens an operator may revoke.
    jwt: Arc<super::jwt::JwtAuthority>,
}

impl AgentAdmin {
    /// Revokes through `cache` and `jwt`, ends tasks through `tasks`.
    pub fn new(
        cache: Arc<IdentityCache>,
        tasks: Arc<TaskRegistry>,
        jwt: Arc<super::jwt::JwtAuthority>,
    ) -> Self {
        Self { cache, tasks, jwt }
    }
}

/// The answer to the policy calls: a standalone agent's policy is its `policy_file`.
fn standalone_policy() -> Status {
    Status::unimplemented(
        "a standalone agent's policy is its policy_file (reloaded like its entries); policy \
         versions and tests are the server's",
    )
}

/// The answer to every call only a server serves.
fn servers_only(call: &str) -> Status {
    Status::unimplemented(format!(
        "{call} is the server's; a standalone agent's admin socket takes `tessera svid revoke` \
         and `tessera entry revoke` (entries are in its configuration file)"
    ))
}

fn checked_reason(reason: &str) -> Result<&str, Status> {
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > MAX_REASON_LEN || reason.contains(['\n', '\0']) {
        return Err(Status::invalid_argument(format!(
            "reason = {reason:?}: say why, in one line of at most {MAX_REASON_LEN} bytes"
        )));
    }
    Ok(reason)
}

fn svid_info(revoked: &RevokedSvid) -> SvidInfo {
    SvidInfo {
        serial: revoked.serial.clone(),
        entry_id: revoked.entry_id.clone(),
        spiffe_id: revoked.spiffe_id.clone(),
        not_after: crate::clock::unix_seconds(revoked.not_after),
        revoked_ms: Some(crate::events::model::now_ms()),
        reason: "operator".into(),
        ..Default::default()
    }
}

fn audit(action: &'static str, subject: &str) {
    tracing::info!(target: "tessera::audit", action, subject, "admin change");
}

type TailStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<StoredEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Admin for AgentAdmin {
    async fn revoke_jwt(
        &self,
        request: Request<RevokeJwtRequest>,
    ) -> Result<Response<RevokeJwtResponse>, Status> {
        let request = request.into_inner();
        let reason = checked_reason(&request.reason)?;
        let revoked = self
            .jwt
            .revoke_jti(&request.jti, reason)
            .map_err(|e| Status::not_found(e.to_string()))?;
        tracing::info!(target: "tessera::audit", jti = %request.jti, %reason, "JWT-SVID revoked by an operator");
        Ok(Response::new(RevokeJwtResponse {
            jwt: Some(JwtInfo {
                jti: request.jti,
                reason: "operator".into(),
                ..Default::default()
            }),
            already_revoked: !revoked,
        }))
    }

    async fn list_jwts(
        &self,
        _request: Request<ListJwtsRequest>,
    ) -> Result<Response<ListJwtsResponse>, Status> {
        Err(servers_only("ListJwts (the JWT-SVID inventory)"))
    }

    async fn set_policy(
        &self,
        _request: Request<SetPolicyRequest>,
    ) -> Result<Response<Policy>, Status> {
        Err(standalone_policy())
    }

    async fn get_policy(
        &self,
        _request: Request<GetPolicyRequest>,
    ) -> Result<Response<Policy>, Status> {
        Err(standalone_policy())
    }

    async fn list_policy_versions(
        &self,
        _request: Request<ListPolicyVersionsRequest>,
    ) -> Result<Response<ListPolicyVersionsResponse>, Status> {
        Err(standalone_policy())
    }

    async fn test_policy(
        &self,
        _request: Request<TestPolicyRequest>,
    ) -> Result<Response<TestPolicyResponse>, Status> {
        Err(standalone_policy())
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let tasks = self
            .tasks
            .list_all(request.into_inner().include_ended)
            .iter()
            .map(|t| to_proto(t, ""))
            .collect();
        Ok(Response::new(ListTasksResponse { tasks }))
    }

    async fn end_task(
        &self,
        request: Request<EndTaskOrderRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let request = request.into_inner();
        let reason = checked_reason(&request.reason)?;
        let ended = self
            .tasks
            .end(&request.task_id, TaskEndReason::Operator, reason)
            .ok_or_else(|| Status::not_found(format!("no live task {:?}", request.task_id)))?;
        audit("task end", &request.task_id);
        Ok(Response::new(ListTasksResponse {
            tasks: vec![to_proto(&ended, "")],
        }))
    }

    async fn revoke_svid(
        &self,
        request: Request<RevokeSvidRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let request = request.into_inner();
        let reason = checked_reason(&request.reason)?;
        let serial = request.serial.trim().to_ascii_lowercase();
        match self.cache.revoke_known_serial(&serial, reason) {
            SerialRevocation::Revoked(revoked) => {
                audit("SVID revoked", &serial);
                Ok(Response::new(RevokeResponse {
                    revoked: vec![svid_info(&revoked)],
                    already_revoked: Vec::new(),
                }))
            }
            SerialRevocation::AlreadyRevoked => Ok(Response::new(RevokeResponse {
                revoked: Vec::new(),
                already_revoked: vec![serial],
            })),
            SerialRevocation::Unknown => Err(Status::not_found(format!(
                "no live SVID with serial {serial:?} was served by this agent since it started \
                 (serials are lowercase hex, as `tessera svid fetch` shows them)"
            ))),
        }
    }

    async fn revoke_entry(
        &self,
        request: Request<RevokeEntryRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let request = request.into_inner();
        let reason = checked_reason(&request.reason)?;
        if self.cache.entries().get(&request.id).is_none() {
            return Err(Status::not_found(format!(
                "no entry with id {:?}",
                request.id
            )));
        }
        let revoked = self
            .cache
            .revoke_entry(&request.id, RevocationReason::Operator, reason);
        for svid in &revoked {
            audit("SVID revoked", &svid.serial);
        }
        Ok(Response::new(RevokeResponse {
            revoked: revoked.iter().map(svid_info).collect(),
            already_revoked: Vec::new(),
        }))
    }

    async fn create_entry(
        &self,
        _: Request<CreateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        Err(servers_only("entry create"))
    }

    async fn update_entry(
        &self,
        _: Request<UpdateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        Err(servers_only("entry update"))
    }

    async fn delete_entry(&self, _: Request<EntryRequest>) -> Result<Response<Entry>, Status> {
        Err(servers_only("entry delete"))
    }

    async fn get_entry(&self, _: Request<EntryRequest>) -> Result<Response<Entry>, Status> {
        Err(servers_only("entry show"))
    }

    async fn list_entries(
        &self,
        _: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        Err(servers_only("entry list"))
    }

    async fn activate_entry(&self, _: Request<EntryRequest>) -> Result<Response<Entry>, Status> {
        Err(servers_only("entry activate"))
    }

    async fn create_join_token(
        &self,
        _: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<JoinToken>, Status> {
        Err(servers_only("token create"))
    }

    async fn list_nodes(
        &self,
        _: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        Err(servers_only("node list"))
    }

    async fn get_node(&self, _: Request<NodeRequest>) -> Result<Response<NodeInfo>, Status> {
        Err(servers_only("node show"))
    }

    async fn evict_node(&self, _: Request<NodeRequest>) -> Result<Response<NodeInfo>, Status> {
        Err(servers_only("node evict"))
    }

    async fn ban_node(&self, _: Request<NodeRequest>) -> Result<Response<NodeInfo>, Status> {
        Err(servers_only("node ban"))
    }

    async fn get_bundle(&self, _: Request<GetBundleRequest>) -> Result<Response<Bundle>, Status> {
        Err(servers_only("bundle show"))
    }

    async fn list_events(
        &self,
        _: Request<EventFilter>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        Err(servers_only("events list"))
    }

    type TailEventsStream = TailStream;

    async fn tail_events(
        &self,
        _: Request<EventFilter>,
    ) -> Result<Response<Self::TailEventsStream>, Status> {
        Err(servers_only("events tail"))
    }

    async fn get_inventory(
        &self,
        _: Request<GetInventoryRequest>,
    ) -> Result<Response<Inventory>, Status> {
        Err(servers_only("inventory"))
    }
}
