//! Live tasks kept in `state_dir/tasks.json`, so that a restarted agent goes on serving the tasks
//! whose process still runs and can revoke the SVIDs of those that ended while it was down; and
//! the processes of ended tasks that still run, which a restart must not let fall back to an
//! outer task's identity.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::TaskInfo;
use crate::attest::{CallerFacts, ProcessStamp};
use crate::ca::task::TaskClaims;
use crate::clock::unix_seconds;

/// The file's format version.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct SavedFile {
    version: u32,
    tasks: Vec<SavedTask>,
    /// Absent in files written before it was kept.
    #[serde(default)]
    closed: Vec<SavedClosed>,
}

/// What `tasks.json` keeps.
#[derive(Debug, Default)]
pub(super) struct Saved {
    /// The live tasks.
    pub tasks: Vec<SavedTask>,
    /// Ended tasks whose process still ran.
    pub closed: Vec<SavedClosed>,
}

/// An ended task whose process still ran when the file was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SavedClosed {
    pub task_id: String,
    pub root: ProcessStamp,
    pub boundary_ticks: u64,
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
    /// Who started it; absent in files written before it was kept.
    #[serde(default)]
    starter: Option<SavedStarter>,
}

/// The facts of a task's starter and, for a delegation, the parent's claims: what a policy
/// decided the start on, and decides again when it changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedStarter {
    pid: i32,
    uid: u32,
    gid: u32,
    exe_path: String,
    exe_sha256: Option<String>,
    systemd_unit: Option<String>,
    /// In their text form (`unix:uid:1000`).
    selectors: Vec<String>,
    lineage: Vec<ProcessStamp>,
    parent: Option<TaskClaims>,
}

/// Who started a task, as the registry keeps it.
pub(super) type Starter = (CallerFacts, Option<TaskClaims>);

impl SavedTask {
    pub(super) fn of(
        info: &TaskInfo,
        boundary_ticks: u64,
        serials: &[(String, SystemTime)],
        starter: Option<&Starter>,
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
            starter: starter.map(|(caller, parent)| SavedStarter {
                pid: caller.pid,
                uid: caller.uid,
                gid: caller.gid,
                exe_path: caller.exe_path.clone(),
                exe_sha256: caller.exe_sha256.clone(),
                systemd_unit: caller.systemd_unit.clone(),
                selectors: caller.selectors.iter().map(ToString::to_string).collect(),
                lineage: caller.lineage.clone(),
                parent: parent.clone(),
            }),
        }
    }

    /// Who started the task: `Ok(None)` when the file did not keep it, an error naming the
    /// selector when what it kept does not parse.
    pub(super) fn starter(&self) -> Result<Option<Starter>, String> {
        let Some(saved) = &self.starter else {
            return Ok(None);
        };
        let selectors = saved
            .selectors
            .iter()
            .map(|text| {
                text.parse()
                    .map_err(|e| format!("starter selector {text:?}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let caller = CallerFacts {
            pid: saved.pid,
            uid: saved.uid,
            gid: saved.gid,
            exe_path: saved.exe_path.clone(),
            exe_sha256: saved.exe_sha256.clone(),
            systemd_unit: saved.systemd_unit.clone(),
            selectors,
            lineage: saved.lineage.clone(),
        };
        Ok(Some((caller, saved.parent.clone())))
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
pub(super) fn read(path: &Path) -> Result<Saved, SavedError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Saved::default()),
        Err(e) => return Err(SavedError::Read(e)),
    };
    let file: SavedFile = serde_json::from_slice(&text).map_err(SavedError::Format)?;
    if file.version != VERSION {
        return Err(SavedError::Version(file.version));
    }
    Ok(Saved {
        tasks: file.tasks,
        closed: file.closed,
    })
}

/// Replaces what is saved with `saved` (owner-only: it names processes and purposes).
pub(super) fn write(path: &Path, saved: Saved) -> std::io::Result<()> {
    let file = SavedFile {
        version: VERSION,
        tasks: saved.tasks,
        closed: saved.closed,
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    crate::durable::write_atomically(path, &bytes, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::task::TaskLink;

    fn claims(task_id: &str) -> TaskClaims {
        TaskClaims {
            task_id: task_id.into(),
            entry_id: "coder".into(),
            owner: "team".into(),
            purpose: "fix issue 7".into(),
            chain: vec![TaskLink {
                task_id: task_id.into(),
                spiffe_id: format!("spiffe://example.org/coder/task/{task_id}"),
            }],
        }
    }

    fn info() -> TaskInfo {
        TaskInfo {
            claims: claims("t2"),
            spiffe_id: "spiffe://example.org/coder/task/t2".into(),
            root: ProcessStamp {
                pid: 42,
                start_ticks: 7,
            },
            started_ms: 1_000,
            deadline: 2_000,
            idle_timeout: Duration::from_secs(60),
            starter_uid: 1000,
            ended: None,
        }
    }

    fn starter() -> Starter {
        let caller = CallerFacts {
            pid: 41,
            uid: 1000,
            gid: 1000,
            exe_path: "/usr/bin/runtime".into(),
            exe_sha256: Some("ab".repeat(32)),
            systemd_unit: Some("runtime.service".into()),
            selectors: ["unix:uid:1000", "unix:path:/usr/bin/runtime"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect(),
            lineage: vec![
                ProcessStamp {
                    pid: 41,
                    start_ticks: 5,
                },
                ProcessStamp {
                    pid: 1,
                    start_ticks: 1,
                },
            ],
        };
        (caller, Some(claims("t1")))
    }

    #[test]
    fn the_starter_survives_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.json");
        let kept = starter();
        let closed = SavedClosed {
            task_id: "t3".into(),
            root: ProcessStamp {
                pid: 43,
                start_ticks: 9,
            },
            boundary_ticks: 8,
        };
        write(&path, one_task(Some(&kept), vec![closed.clone()])).unwrap();
        let read = read(&path).unwrap();
        let (caller, parent) = read.tasks[0].starter().unwrap().unwrap();
        assert_eq!(caller, kept.0);
        assert_eq!(parent.unwrap().task_id, "t1");
        assert_eq!(read.closed, [closed]);
    }

    fn one_task(starter: Option<&Starter>, closed: Vec<SavedClosed>) -> Saved {
        Saved {
            tasks: vec![SavedTask::of(&info(), 7, &[], starter)],
            closed,
        }
    }

    #[test]
    fn a_file_from_before_the_starter_and_closed_tasks_were_kept_restores_without_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.json");
        write(&path, one_task(Some(&starter()), Vec::new())).unwrap();
        let mut file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        file["tasks"][0].as_object_mut().unwrap().remove("starter");
        file.as_object_mut().unwrap().remove("closed");
        std::fs::write(&path, file.to_string()).unwrap();
        let read = read(&path).unwrap();
        assert!(read.tasks[0].starter().unwrap().is_none());
        assert_eq!(read.tasks[0].clone().into_parts().0.claims.task_id, "t2");
        assert!(read.closed.is_empty());
    }

    #[test]
    fn an_unreadable_starter_selector_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.json");
        write(&path, one_task(Some(&starter()), Vec::new())).unwrap();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("unix:uid:1000", "unix:colour:blue");
        std::fs::write(&path, text).unwrap();
        let error = read(&path).unwrap().tasks[0].starter().unwrap_err();
        assert!(error.contains("unix:colour:blue"), "{error}");
    }
}
