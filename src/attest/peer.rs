//! The peer of an accepted Unix connection, pinned so that its pid cannot be recycled under us.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{OFlag, openat};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::Mode;

use super::AttestError;

/// How the connecting process is pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinMode {
    /// SO_PEERPIDFD where the kernel has it (Linux 6.5+), else the /proc fallback.
    Pidfd,
    /// Always the /proc fallback: hold `/proc/<pid>` open and re-check start time and owner.
    ProcStartTime,
}

/// Whether this kernel supports SO_PEERPIDFD (Linux 6.5+), probed on a socket pair.
pub fn kernel_has_peer_pidfd() -> bool {
    let Ok((a, _b)) = std::os::unix::net::UnixStream::pair() else {
        return false;
    };
    match getsockopt(&a, sockopt::PeerPidfd) {
        Ok(_) => true,
        Err(nix::Error::ENOPROTOOPT) => false,
        Err(e) => {
            tracing::warn!(error = %e, "unexpected error probing SO_PEERPIDFD; pinning through /proc");
            false
        }
    }
}

/// The process on the other end of a connection, as captured at accept time.
#[derive(Debug)]
pub struct PeerCredentials {
    /// Process id from SO_PEERCRED.
    pub pid: i32,
    /// Effective uid at connect time.
    pub uid: u32,
    /// Effective gid at connect time.
    pub gid: u32,
    /// How liveness and identity of the process are proven later.
    pub(super) pin: Pin,
    /// The program the process ran when it connected; a process that has executed another
    /// since is refused, so a connection never outlives the image that made it.
    pub(super) exe: ExeIdentity,
}

/// An executable as the kernel knows it: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExeIdentity {
    /// The device holding the file.
    dev: u64,
    /// Its inode number.
    ino: u64,
}

#[derive(Debug)]
pub(super) enum Pin {
    /// A pidfd for the exact process that connected.
    Pidfd(OwnedFd),
    /// `/proc/<pid>` opened at accept time, and the process start time read then.
    Proc { dir: OwnedFd, start_time: u64 },
}

impl PeerCredentials {
    pub(super) fn capture(socket: BorrowedFd<'_>, mode: PinMode) -> Result<Self, AttestError> {
        let cred =
            getsockopt(&socket, sockopt::PeerCredentials).map_err(AttestError::PeerCredentials)?;
        let pid = cred.pid();
        if pid <= 0 {
            return Err(AttestError::NoPid);
        }
        let pidfd = match mode {
            // Support was established once at startup (`kernel_has_peer_pidfd`): any error here
            // is about this peer. ESRCH, and EINVAL on 6.5-6.15, mean it has already been reaped;
            // falling back to /proc now could read whoever holds the pid next.
            PinMode::Pidfd => match getsockopt(&socket, sockopt::PeerPidfd) {
                Ok(fd) => Some(fd),
                Err(nix::Error::ESRCH | nix::Error::EINVAL) => {
                    return Err(AttestError::Vanished { pid });
                }
                Err(e) => return Err(AttestError::PeerCredentials(e)),
            },
            PinMode::ProcStartTime => None,
        };
        let (pin, exe) = match pidfd {
            Some(fd) => {
                let dir = open_proc_dir(pid)?;
                let exe = exe_identity(pid, dir.as_fd())?;
                (Pin::Pidfd(fd), exe)
            }
            None => {
                let dir = open_proc_dir(pid)?;
                let start_time = read_start_time(pid, dir.as_fd())?;
                let exe = exe_identity(pid, dir.as_fd())?;
                (Pin::Proc { dir, start_time }, exe)
            }
        };
        let peer = Self {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            pin,
            exe,
        };
        // The executable was read through /proc/<pid>: prove the pid was still the caller's.
        peer.ensure_alive()?;
        Ok(peer)
    }

    /// Opens `/proc/<pid>` and proves it belongs to the process that connected.
    pub(super) fn open_verified_proc_dir(&self) -> Result<ProcDir<'_>, AttestError> {
        match &self.pin {
            Pin::Pidfd(_) => {
                // Open first, then check liveness: while the pinned process has not exited, its
                // pid cannot have been handed to anyone else, so the directory is its own.
                let dir = open_proc_dir(self.pid)?;
                self.ensure_alive()?;
                Ok(ProcDir::Owned(dir))
            }
            Pin::Proc { dir, .. } => {
                self.ensure_alive()?;
                Ok(ProcDir::Borrowed(dir.as_fd()))
            }
        }
    }

    /// Fails if the pinned process has exited or (fallback) its pid now names another process.
    pub(super) fn ensure_alive(&self) -> Result<(), AttestError> {
        match &self.pin {
            Pin::Pidfd(pidfd) => {
                let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::ZERO) {
                    Ok(0) => Ok(()),
                    // A pidfd polls readable once its process has exited.
                    Ok(_) => Err(AttestError::Vanished { pid: self.pid }),
                    Err(e) => Err(AttestError::Proc {
                        pid: self.pid,
                        entry: "pidfd",
                        source: e.into(),
                    }),
                }
            }
            Pin::Proc { dir, start_time } => match read_start_time(self.pid, dir.as_fd()) {
                Ok(now) if now == *start_time => Ok(()),
                Ok(_) => Err(AttestError::PidReused { pid: self.pid }),
                Err(AttestError::Proc { .. }) => Err(AttestError::Vanished { pid: self.pid }),
                Err(e) => Err(e),
            },
        }
    }
}

/// A directory fd for `/proc/<pid>` of the attested process.
pub(super) enum ProcDir<'a> {
    Owned(OwnedFd),
    Borrowed(BorrowedFd<'a>),
}

impl ProcDir<'_> {
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Owned(fd) => fd.as_fd(),
            Self::Borrowed(fd) => *fd,
        }
    }
}

fn open_proc_dir(pid: i32) -> Result<OwnedFd, AttestError> {
    nix::fcntl::open(
        format!("/proc/{pid}").as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        nix::Error::ENOENT | nix::Error::ESRCH => AttestError::Vanished { pid },
        e => AttestError::Proc {
            pid,
            entry: "",
            source: e.into(),
        },
    })
}

/// The executable of the process whose `/proc/<pid>` directory is `dir`. Read with cached
/// attributes only (`AT_STATX_DONT_SYNC`): device and inode are known to the kernel without
/// asking the file's file system, which could hang (an unreachable NFS server).
#[allow(unsafe_code)]
pub(super) fn exe_identity(pid: i32, dir: BorrowedFd<'_>) -> Result<ExeIdentity, AttestError> {
    use std::os::fd::AsRawFd;
    // SAFETY: statx writes one `statx` through a valid pointer; the path is a C string.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            dir.as_raw_fd(),
            c"exe".as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            libc::STATX_INO,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(AttestError::Proc {
            pid,
            entry: "exe",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(ExeIdentity {
        dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
    })
}

/// Reads a procfs file whole. Procfs files report size 0, so a reader that sizes its buffer from
/// metadata starts at a few bytes and doubles, one system call each time (the kernel renders the
/// file again for each); one page holds `stat`, `status` and `cgroup` in one call plus the one
/// that sees the end.
pub fn read_proc_file(mut file: File) -> std::io::Result<String> {
    let mut text = String::with_capacity(4096);
    std::io::Read::read_to_string(&mut file, &mut text)?;
    Ok(text)
}

/// [`read_proc_file`] of a path such as `/proc/<pid>/stat`.
pub fn read_proc_path(path: &str) -> std::io::Result<String> {
    read_proc_file(File::open(path)?)
}

/// Opens `entry` below a `/proc/<pid>` directory fd.
pub(super) fn open_entry(
    pid: i32,
    dir: BorrowedFd<'_>,
    entry: &'static str,
) -> Result<File, AttestError> {
    openat(
        dir,
        entry,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(File::from)
    .map_err(|e| AttestError::Proc {
        pid,
        entry,
        source: e.into(),
    })
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks since boot.
fn read_start_time(pid: i32, dir: BorrowedFd<'_>) -> Result<u64, AttestError> {
    let text =
        read_proc_file(open_entry(pid, dir, "stat")?).map_err(|source| AttestError::Proc {
            pid,
            entry: "stat",
            source,
        })?;
    parse_start_time(&text).ok_or_else(|| AttestError::ProcFormat {
        pid,
        entry: "stat",
        detail: "no start time in field 22".into(),
    })
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses; fields resume after the last ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // after_comm starts with field 3 (state); field 22 is the 20th from there.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_hostile_command_names() {
        let stat = "4242 (evil) 1 2 3 (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1234 56";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn reads_own_start_time() {
        let dir = open_proc_dir(std::process::id() as i32).unwrap();
        let t = read_start_time(std::process::id() as i32, dir.as_fd()).unwrap();
        assert!(t > 0);
    }
}
