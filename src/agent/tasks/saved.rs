//! Live tasks kept in `state_dir/tasks.json`, so that a restarted agent goes on serving the tasks
//! whose process still runs and can revoke the SVIDs of those that ended while it was down.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::TaskInfo;
use crate::attest::ProcessStamp;
use crate::ca::task::TaskClaims;
use crate::clock::unix_seconds;

/// The file's format version.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct SavedFile {
    version: u32,
    tasks: Vec<SavedTask>,
}

/// One live task as kept on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct SavedTask {
    claims: TaskClaims,
    spiffe_id: String,
    root: ProcessStamp,
    boundary_ticks: u64,
    started_ms: i64,
    deadline: i64,
    idle_timeout_seconds: u64,
    starter_uid: u32,
    /// Serial (lowercase hex) and not-after (Unix seconds) of every unexpired SVID minted for it.
    serials: Vec<(String, i64)>,
}

impl SavedTask {
    pub(super) fn of(
        info: &TaskInfo,
        boundary_ticks: u64,
        serials: &[(String, SystemTime)],
    ) -> Self {
        Self {
            claims: info.claims.clone(),
            spiffe_id: info.spiffe_id.clone(),
            root: info.root,
            boundary_ticks,
            started_ms: info.started_ms,
            deadline: info.deadline,
            idle_timeout_seconds: info.idle_timeout.as_secs(),
            starter_uid: info.starter_uid,
            serials: serials
                .iter()
                .map(|(serial, at)| (serial.clone(), unix_seconds(*at)))
                .collect(),
        }
    }

    /// The task, its boundary tick and its serials.
    pub(super) fn into_parts(self) -> (TaskInfo, u64, Vec<(String, SystemTime)>) {
        let info = TaskInfo {
            claims: self.claims,
            spiffe_id: self.spiffe_id,
            root: self.root,
            started_ms: self.started_ms,
            deadline: self.deadline,
            idle_timeout: Duration::from_secs(self.idle_timeout_seconds),
            starter_uid: self.starter_uid,
            ended: None,
        };
        let serials = self
            .serials
            .into_iter()
            .map(|(serial, at)| {
                (
                    serial,
                    SystemTime::UNIX_EPOCH + Duration::from_secs(at.max(0) as u64),
                )
            })
            .collect();
        (info, self.boundary_ticks, serials)
    }
}

/// Why the saved tasks could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum SavedError {
    /// The file could not be read.
    #[error("read: {0}")]
    Read(#[source] std::io::Error),
    /// It is not the JSON this code writes.
    #[error("not a tasks file: {0}")]
    Format(#[source] serde_json::Error),
    /// A version this code does not read.
    #[error("version {0}; this build reads version {VERSION}")]
    Version(u32),
}

/// The saved tasks; none when the file does not exist.
pub(super) fn read(path: &Path) -> Result<Vec<SavedTask>, SavedError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SavedError::Read(e)),
    };
    let file: SavedFile = serde_json::from_slice(&text).map_err(SavedError::Format)?;
    if file.version != VERSION {
        return Err(SavedError::Version(file.version));
    }
    Ok(file.tasks)
}

/// Replaces the saved tasks with `tasks` (owner-only: it names processes and purposes).
pub(super) fn write(path: &Path, tasks: &[SavedTask]) -> std::io::Result<()> {
    let file = SavedFile {
        version: VERSION,
        tasks: tasks.to_vec(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    crate::durable::write_atomically(path, &bytes, 0o600)
}
