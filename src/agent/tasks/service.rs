//! `tessera.v1.Tasks` on the workload socket: start, end and list tasks. Callers are attested as
//! Workload API callers are, with their ancestry, so that a caller inside a task is seen there.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{StartRequest, TaskError, TaskInfo, TaskRegistry};
use crate::agent::workload::{ServeError, WorkloadService};
use crate::proto::tessera::tasks_server::Tasks;
use crate::proto::tessera::{
    EndTaskRequest, EndTaskResponse, ListTasksRequest, ListTasksResponse, StartTaskRequest,
    StartTaskResponse, Task, TaskLink,
};

/// The Tasks service. Cheap to clone.
#[derive(Clone)]
pub struct TasksService {
    /// Attests callers exactly as the Workload API does.
    workload: WorkloadService,
    /// The agent's tasks.
    registry: Arc<TaskRegistry>,
    /// The node's id, shown in listings; empty for a standalone agent.
    node_id: String,
}

impl TasksService {
    /// A service over `registry`, attesting through `workload`.
    pub fn new(workload: WorkloadService, registry: Arc<TaskRegistry>, node_id: String) -> Self {
        Self {
            workload,
            registry,
            node_id,
        }
    }

    fn task(&self, info: &TaskInfo) -> Task {
        to_proto(info, &self.node_id)
    }
}

/// A task as the wire carries it.
pub fn to_proto(info: &TaskInfo, node_id: &str) -> Task {
    let (ended_ms, end_reason) = info.ended.map_or((0, 0), |(at, r)| (at, r as i32));
    Task {
        task_id: info.claims.task_id.clone(),
        entry_id: info.claims.entry_id.clone(),
        spiffe_id: info.spiffe_id.clone(),
        purpose: info.claims.purpose.clone(),
        owner: info.claims.owner.clone(),
        chain: info
            .claims
            .chain
            .iter()
            .map(|l| TaskLink {
                task_id: l.task_id.clone(),
                spiffe_id: l.spiffe_id.clone(),
            })
            .collect(),
        pid: info.root.pid,
        started_ms: info.started_ms,
        deadline: info.deadline,
        ended_ms,
        end_reason,
        node_id: node_id.to_owned(),
        idle_timeout_seconds: info.idle_timeout.as_secs() as i64,
        starter_uid: info.starter_uid,
    }
}

/// The status a caller sees for `error`.
fn into_status(error: TaskError) -> Status {
    match &error {
        TaskError::UnknownEntry(_) | TaskError::UnknownTask(_) => {
            Status::not_found(error.to_string())
        }
        TaskError::StandingEntry(_) | TaskError::EntryExpired(_) | TaskError::TooDeep { .. } => {
            Status::failed_precondition(error.to_string())
        }
        TaskError::NotPermitted(_)
        | TaskError::DelegationRefused { .. }
        | TaskError::PolicyDenied { .. }
        | TaskError::NotYours(_) => Status::permission_denied(error.to_string()),
        // A lifetime longer than allowed is a bad `--ttl`, refused as the flag it came from.
        TaskError::Field(_)
        | TaskError::TtlTooLong { .. }
        | TaskError::Target { .. }
        | TaskError::Pin(super::PinError::NoProcess(_) | super::PinError::Changed(_)) => {
            Status::invalid_argument(error.to_string())
        }
        TaskError::Pin(_) | TaskError::Record(_) => {
            tracing::error!(error = %error, "Tasks call failed");
            Status::unavailable("could not start the task; retry later")
        }
    }
}

fn seconds(value: i64, field: &str) -> Result<Option<Duration>, Status> {
    match value {
        0 => Ok(None),
        v if v < 0 => Err(Status::invalid_argument(format!(
            "{field} = {v}: must be a positive number of seconds, or 0 for the agent's default"
        ))),
        v => Ok(Some(Duration::from_secs(v as u64))),
    }
}

#[tonic::async_trait]
impl Tasks for TasksService {
    async fn start_task(
        &self,
        request: Request<StartTaskRequest>,
    ) -> Result<Response<StartTaskResponse>, Status> {
        let facts = self
            .workload
            .attest_with_lineage(&request)
            .await
            .map_err(ServeError::into_status)?;
        let body = request.into_inner();
        let start = StartRequest {
            entry: body.entry,
            purpose: body.purpose,
            ttl: seconds(body.ttl_seconds, "ttl_seconds")?,
            pid: match body.pid {
                0 => None,
                pid if pid < 0 => {
                    return Err(Status::invalid_argument(format!(
                        "pid = {pid}: name a process id, or 0 for the caller"
                    )));
                }
                pid => Some(pid),
            },
            idle_timeout: seconds(body.idle_timeout_seconds, "idle_timeout_seconds")?,
        };
        let info = self.registry.start(&facts, start).map_err(into_status)?;
        self.registry.prepare_svid(&info.claims.task_id, &facts);
        Ok(Response::new(StartTaskResponse {
            task: Some(self.task(&info)),
        }))
    }

    async fn end_task(
        &self,
        request: Request<EndTaskRequest>,
    ) -> Result<Response<EndTaskResponse>, Status> {
        let facts = self
            .workload
            .attest_with_lineage(&request)
            .await
            .map_err(ServeError::into_status)?;
        let info = self
            .registry
            .end_for(&facts, &request.get_ref().task_id)
            .map_err(into_status)?;
        Ok(Response::new(EndTaskResponse {
            task: Some(self.task(&info)),
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let facts = self
            .workload
            .attest_with_lineage(&request)
            .await
            .map_err(ServeError::into_status)?;
        let tasks = self
            .registry
            .list_for(&facts, request.get_ref().include_ended)
            .iter()
            .map(|t| self.task(t))
            .collect();
        Ok(Response::new(ListTasksResponse { tasks }))
    }
}
