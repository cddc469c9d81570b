//! Reading a pinned process's facts from /proc and turning them into selectors.

use std::os::fd::BorrowedFd;

use nix::fcntl::readlinkat;

use super::hash::{ExeHashCache, HashError};
use super::names::NameCache;
use super::peer::{PeerCredentials, exe_identity, open_entry, read_proc_file, read_proc_path};
use super::{
    AttestError, CallerFacts, FactNeeds, ProcessStamp, Selector, SelectorKind, SelectorSet,
};

/// Supplementary groups beyond this many get a `unix:supplementary_gid` selector but no name.
const MAX_NAMED_GROUPS: usize = 64;

/// Ids from the `Uid:`, `Gid:` and `Groups:` lines of `/proc/<pid>/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StatusIds {
    euid: u32,
    egid: u32,
    groups: Vec<u32>,
}

pub(super) fn read_facts(
    peer: &PeerCredentials,
    needs: FactNeeds,
    hashes: &ExeHashCache,
    names: &NameCache,
    may_block: bool,
) -> Result<CallerFacts, AttestError> {
    let pid = peer.pid;
    let dir = peer.open_verified_proc_dir()?;
    let dir = dir.fd();

    let status = read_entry(pid, dir, "status")?;
    let ids = parse_status(&status).ok_or_else(|| AttestError::ProcFormat {
        pid,
        entry: "status",
        detail: "no Uid/Gid lines".into(),
    })?;
    if ids.euid != peer.uid || ids.egid != peer.gid {
        return Err(AttestError::CredentialsChanged {
            pid,
            peer_uid: peer.uid,
            peer_gid: peer.gid,
            uid: ids.euid,
            gid: ids.egid,
        });
    }

    let exe_path = readlinkat(dir, "exe")
        .map_err(|e| AttestError::Proc {
            pid,
            entry: "exe",
            source: e.into(),
        })?
        .to_string_lossy()
        .into_owned();
    // Facts are the program's that connected, or none: a process that has executed another
    // program since (keeping the connection, or handing it to a child) is refused.
    if exe_identity(pid, dir)? != peer.exe {
        return Err(AttestError::ProgramChanged { pid, exe: exe_path });
    }
    let exe_sha256 = if needs.exe_sha256 {
        // Even an fstat of the executable can wait on its file system (a hung NFS mount):
        // only the blocking path may touch it.
        if !may_block {
            return Err(AttestError::WouldBlock);
        }
        // Hash through /proc/<pid>/exe itself: the path may not exist in the agent's mount
        // namespace, or may name a different file there.
        let exe = open_entry(pid, dir, "exe")?;
        let hash_error = |e| match e {
            HashError::TooLarge { size, limit } => AttestError::ExeTooLarge { pid, size, limit },
            HashError::Io(source) => AttestError::Proc {
                pid,
                entry: "exe",
                source,
            },
        };
        Some(hashes.digest(exe).map_err(hash_error)?)
    } else {
        None
    };
    let systemd_unit = systemd_unit_of(&read_entry(pid, dir, "cgroup")?);
    // The caller's own stamp always (a task's own process is known by it); its ancestors only
    // while some task is live.
    let stat = read_entry(pid, dir, "stat")?;
    let (own, parent) = parse_stat(&stat).ok_or_else(|| AttestError::ProcFormat {
        pid,
        entry: "stat",
        detail: "no parent pid or start time".into(),
    })?;
    let mut lineage = vec![ProcessStamp {
        pid,
        start_ticks: own,
    }];
    if needs.lineage {
        lineage.extend(ancestry_of(parent, own, needs.lineage_since));
    }

    // Everything above was read through a directory proven to be the caller's; a final check
    // makes sure the process did not exit while we read (reads would fail, but be explicit).
    peer.ensure_alive()?;

    let would_block = |_| AttestError::WouldBlock;
    let user = names.user(ids.euid, may_block).map_err(would_block)?;
    let group = names.group(ids.egid, may_block).map_err(would_block)?;
    let mut supplementary = Vec::with_capacity(ids.groups.len());
    for (i, gid) in ids.groups.iter().enumerate() {
        // A process in a user namespace can carry thousands of groups; name only the first ones.
        let name = if i < MAX_NAMED_GROUPS {
            names.group(*gid, may_block).map_err(would_block)?
        } else {
            None
        };
        supplementary.push((*gid, name));
    }

    let mut selectors = SelectorSet::new();
    let mut add = |kind, value: String| selectors.insert(Selector::observed(kind, value));
    add(SelectorKind::Uid, ids.euid.to_string());
    add(SelectorKind::Gid, ids.egid.to_string());
    if let Some(user) = user {
        add(SelectorKind::User, user);
    }
    if let Some(group) = group {
        add(SelectorKind::Group, group);
    }
    for (gid, name) in supplementary {
        add(SelectorKind::SupplementaryGid, gid.to_string());
        if let Some(name) = name {
            add(SelectorKind::SupplementaryGroup, name);
        }
    }
    add(SelectorKind::Path, exe_path.clone());
    if let Some(digest) = &exe_sha256 {
        add(SelectorKind::Sha256, digest.clone());
    }
    if let Some(unit) = &systemd_unit {
        add(SelectorKind::SystemdUnit, unit.clone());
    }

    Ok(CallerFacts {
        pid,
        uid: ids.euid,
        gid: ids.egid,
        exe_path,
        exe_sha256,
        systemd_unit,
        selectors,
        lineage,
    })
}

/// Longest ancestry read: deeper trees are cut here (their deeper members are simply not
/// recognised as a task's).
const MAX_LINEAGE: usize = 64;

/// The ancestors of a process started at `child_start` whose parent is `parent`, nearest first:
/// the parent always, then up to the first that started before `since` (left out).
/// Each step reads `/proc/<pid>/stat` without pinning, so a pid may have been reused meanwhile:
/// a parent always starts no later than its child, so an entry that started later is not the
/// parent and ends the walk (as does pid 1, or 0 for a process whose parent is outside its PID
/// namespace).
pub fn ancestry_of(mut parent: i32, mut child_start: u64, since: u64) -> Vec<ProcessStamp> {
    let mut out = Vec::new();
    while parent > 1 && out.len() < MAX_LINEAGE {
        let Ok(stat) = read_proc_path(&format!("/proc/{parent}/stat")) else {
            break;
        };
        let Some((start, grandparent)) = parse_stat(&stat) else {
            break;
        };
        if start > child_start || (start < since && !out.is_empty()) {
            break;
        }
        out.push(ProcessStamp {
            pid: parent,
            start_ticks: start,
        });
        child_start = start;
        parent = grandparent;
    }
    out
}

/// The stamp of process `pid` and its parent's pid, read now (unpinned).
pub fn read_stamp(pid: i32) -> Option<(ProcessStamp, i32)> {
    let stat = read_proc_path(&format!("/proc/{pid}/stat")).ok()?;
    let (start_ticks, parent) = parse_stat(&stat)?;
    Some((ProcessStamp { pid, start_ticks }, parent))
}

/// Start time (field 22) and parent pid (field 4) of a `/proc/<pid>/stat` line.
fn parse_stat(stat: &str) -> Option<(u64, i32)> {
    // The command name (field 2) may hold spaces and parentheses; fields resume after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let parent = fields.nth(1)?.parse().ok()?;
    let start = fields.nth(17)?.parse().ok()?;
    Some((start, parent))
}

fn read_entry(pid: i32, dir: BorrowedFd<'_>, entry: &'static str) -> Result<String, AttestError> {
    read_proc_file(open_entry(pid, dir, entry)?).map_err(|source| AttestError::Proc {
        pid,
        entry,
        source,
    })
}

fn parse_status(status: &str) -> Option<StatusIds> {
    // Each line holds real, effective, saved and filesystem ids; the effective one is second.
    let effective = |prefix: &str| -> Option<u32> {
        let line = status.lines().find(|l| l.starts_with(prefix))?;
        line[prefix.len()..].split_whitespace().nth(1)?.parse().ok()
    };
    let groups = status
        .lines()
        .find(|l| l.starts_with("Groups:"))
        .map(|l| {
            l["Groups:".len()..]
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    Some(StatusIds {
        euid: effective("Uid:")?,
        egid: effective("Gid:")?,
        groups,
    })
}

/// The systemd unit from `/proc/<pid>/cgroup`: the first component of the cgroup path that is
/// not a slice, as systemd itself resolves a process's unit.
fn systemd_unit_of(cgroup: &str) -> Option<String> {
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| {
            cgroup
                .lines()
                .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p))
        })?;
    path.split('/')
        .filter(|c| !c.is_empty())
        .find(|c| !c.ends_with(".slice"))
        .filter(|c| {
            [".service", ".scope", ".socket", ".mount", ".swap", ".timer"]
                .iter()
                .any(|suffix| c.ends_with(suffix))
        })
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::{Attestor, PinMode};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn parses_effective_ids_and_groups() {
        let status = "Name:\tx\nUid:\t1000\t1001\t1001\t1001\nGid:\t100\t101\t101\t101\nGroups:\t4 27 1001 \n";
        assert_eq!(
            parse_status(status),
            Some(StatusIds {
                euid: 1001,
                egid: 101,
                groups: vec![4, 27, 1001]
            })
        );
        assert_eq!(parse_status("Name:\tx\n"), None);
    }

    #[test]
    fn stat_lines_give_start_time_and_parent() {
        let stat = "4242 (evil) 1 2 3 (x)) S 77 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1234 56";
        assert_eq!(parse_stat(stat), Some((987654, 77)));
        assert_eq!(parse_stat("4242 (x) S"), None);
    }

    #[test]
    fn this_process_ancestry_ends_at_init_and_starts_no_later_than_it() {
        let (own, parent) = read_stamp(std::process::id() as i32).unwrap();
        let ancestry = ancestry_of(parent, own.start_ticks, 0);
        assert_eq!(
            ancestry.first().map(|p| p.pid),
            (parent > 1).then_some(parent)
        );
        let mut later = own.start_ticks;
        for stamp in &ancestry {
            assert!(stamp.start_ticks <= later, "{ancestry:?}");
            later = stamp.start_ticks;
        }
        // A parent said to start before the child's start cannot be this process's parent.
        assert!(ancestry_of(parent, 0, 0).is_empty() || own.start_ticks == 0);
        // Cut at the parent's start, the walk keeps the parent and nothing older; cut after it,
        // the parent alone (always read: a task may be started for the caller's sibling).
        if let Some(first) = ancestry.first() {
            let cut = ancestry_of(parent, own.start_ticks, first.start_ticks);
            assert_eq!(cut.first(), Some(first));
            assert!(
                cut.iter().all(|s| s.start_ticks >= first.start_ticks),
                "{cut:?}"
            );
            assert_eq!(ancestry_of(parent, own.start_ticks, u64::MAX), vec![*first]);
        }
    }

    #[test]
    fn finds_the_systemd_unit() {
        assert_eq!(
            systemd_unit_of("0::/system.slice/coder.service\n").as_deref(),
            Some("coder.service")
        );
        assert_eq!(
            systemd_unit_of("0::/user.slice/user-1000.slice/user@1000.service/app.slice/x.scope\n")
                .as_deref(),
            Some("user@1000.service")
        );
        assert_eq!(
            systemd_unit_of("12:pids:/x\n1:name=systemd:/system.slice/cron.service\n").as_deref(),
            Some("cron.service")
        );
        assert_eq!(systemd_unit_of("0::/\n"), None);
        assert_eq!(systemd_unit_of("0::/docker/abcdef\n"), None);
    }

    fn attest_self(mode: PinMode, needs: FactNeeds) -> Result<CallerFacts, AttestError> {
        let (a, _b) = UnixStream::pair().unwrap();
        let attestor = Attestor::new(u64::MAX, mode);
        let peer = attestor.capture_peer(a.as_fd())?;
        attestor.attest(&peer, needs, true)
    }

    #[test]
    fn attests_this_very_process_in_both_pin_modes() {
        for mode in [PinMode::Pidfd, PinMode::ProcStartTime] {
            let facts = attest_self(
                mode,
                FactNeeds {
                    exe_sha256: true,
                    lineage: true,
                    lineage_since: 0,
                },
            )
            .unwrap();
            assert_eq!(facts.pid, std::process::id() as i32);
            assert_eq!(facts.uid, nix::unistd::geteuid().as_raw());
            let exe = std::env::current_exe().unwrap();
            assert_eq!(facts.exe_path, exe.to_string_lossy());
            let want = format!("unix:uid:{}", facts.uid);
            assert!(facts.selectors.iter().any(|s| s.to_string() == want));
            assert_eq!(facts.exe_sha256.as_ref().map(String::len), Some(64));
            assert!(
                facts
                    .selectors
                    .iter()
                    .any(|s| s.kind == SelectorKind::Sha256)
            );
        }
        let facts = attest_self(PinMode::Pidfd, FactNeeds::default()).unwrap();
        assert!(
            facts.exe_sha256.is_none(),
            "no entry needs the hash: none computed"
        );
    }

    #[test]
    fn the_non_blocking_path_defers_lookups_and_executable_access() {
        let (a, _b) = UnixStream::pair().unwrap();
        let attestor = Attestor::new(u64::MAX, PinMode::Pidfd);
        let peer = attestor.capture_peer(a.as_fd()).unwrap();
        let plain = FactNeeds::default();
        let deferred = attestor.attest(&peer, plain, false);
        assert!(
            matches!(deferred, Err(AttestError::WouldBlock)),
            "names not cached yet"
        );
        let slow = attestor.attest(&peer, plain, true).unwrap();
        let fast = attestor.attest(&peer, plain, false).unwrap();
        assert_eq!(fast, slow, "served from the name cache");
        let hashed = FactNeeds {
            exe_sha256: true,
            lineage: true,
            lineage_since: 0,
        };
        let deferred = attestor.attest(&peer, hashed, false);
        assert!(
            matches!(deferred, Err(AttestError::WouldBlock)),
            "the executable is never touched inline"
        );
        assert!(
            attestor
                .attest(&peer, hashed, true)
                .unwrap()
                .exe_sha256
                .is_some()
        );
    }

    #[test]
    fn oversized_executables_fail_only_when_hashed() {
        let (a, _b) = UnixStream::pair().unwrap();
        let attestor = Attestor::new(16, PinMode::Pidfd);
        let peer = attestor.capture_peer(a.as_fd()).unwrap();
        let err = attestor
            .attest(
                &peer,
                FactNeeds {
                    exe_sha256: true,
                    lineage: true,
                    lineage_since: 0,
                },
                true,
            )
            .unwrap_err();
        assert!(
            matches!(err, AttestError::ExeTooLarge { limit: 16, .. }),
            "{err}"
        );
        assert!(attestor.attest(&peer, FactNeeds::default(), true).is_ok());
    }
}
