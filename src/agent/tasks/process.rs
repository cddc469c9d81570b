//! The process a task is bound to: pinned by a pidfd, so that its exit is seen at once and its
//! pid, once reused, never passes for it.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::attest::{ProcessStamp, read_stamp};

/// Why a task's process cannot be pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// No such process (it has exited, or never existed).
    #[error("process {0} does not exist")]
    NoProcess(i32),
    /// The pid named a different process by the time it was pinned.
    #[error("process {0} changed while it was being pinned")]
    Changed(i32),
    /// `pidfd_open` failed otherwise.
    #[error("pidfd_open({pid}): {source}")]
    Pidfd {
        /// The process.
        pid: i32,
        /// What the kernel said.
        source: std::io::Error,
    },
}

/// A live process, pinned.
#[derive(Debug)]
pub struct PinnedProcess {
    /// Its pid and start time.
    pub stamp: ProcessStamp,
    /// Its parent when it was pinned.
    pub parent: i32,
    /// Its real uid then, from `/proc/<pid>/status`.
    pub uid: u32,
    /// Readable once the process has exited.
    pub pidfd: OwnedFd,
}

/// Pins process `pid`: opens a pidfd, then reads its stamp, parent and uid and proves with the
/// pidfd that the process did not exit meanwhile (so what was read is that process's).
/// `expected` refuses a process other than the one the caller already knows.
pub fn pin(pid: i32, expected: Option<ProcessStamp>) -> Result<PinnedProcess, PinError> {
    let pidfd = pidfd_open(pid)?;
    let (stamp, parent) = read_stamp(pid).ok_or(PinError::NoProcess(pid))?;
    let uid = read_uid(pid).ok_or(PinError::NoProcess(pid))?;
    if !is_alive(&pidfd) {
        return Err(PinError::NoProcess(pid));
    }
    if expected.is_some_and(|e| e != stamp) {
        return Err(PinError::Changed(pid));
    }
    Ok(PinnedProcess {
        stamp,
        parent,
        uid,
        pidfd,
    })
}

/// Whether the process behind `pidfd` is still running (a pidfd polls readable once it exits).
pub fn is_alive(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
}

/// The current time in the clock ticks `/proc/<pid>/stat` counts start times in (since boot).
pub fn boot_ticks_now() -> u64 {
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100);
    // Process start times count from boot, suspended time included: CLOCK_BOOTTIME.
    let since_boot = nix::sys::time::TimeSpec::from(boottime());
    let nanos = u128::from(since_boot.tv_sec().unsigned_abs()) * 1_000_000_000
        + u128::from(since_boot.tv_nsec().unsigned_abs());
    (nanos * u128::from(ticks_per_second) / 1_000_000_000) as u64
}

#[allow(unsafe_code)]
fn boottime() -> libc::timespec {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    now
}

/// Resolves when the process behind `pidfd` exits. Never resolves if the descriptor cannot be
/// registered with the reactor (the caller's sweep notices the exit instead).
#[allow(unsafe_code)]
pub async fn exited(pidfd: OwnedFd) {
    // SAFETY: an `OwnedFd` is a valid open descriptor that only this `AsyncFd` closes, and its
    // `as_raw_fd` always returns that same descriptor, as `register_with_interest` requires.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    };
    match registered {
        Ok(fd) => {
            let _ = fd.readable().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

fn read_uid(pid: i32) -> Option<u32> {
    let status = crate::attest::read_proc_path(&format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[allow(unsafe_code)]
fn pidfd_open(pid: i32) -> Result<OwnedFd, PinError> {
    if pid <= 0 {
        return Err(PinError::NoProcess(pid));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
    // is passed. PIDFD_NONBLOCK is not asked for: the descriptor is only polled.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let source = std::io::Error::last_os_error();
        return Err(match source.raw_os_error() {
            Some(libc::ESRCH) => PinError::NoProcess(pid),
            _ => PinError::Pidfd { pid, source },
        });
    }
    // SAFETY: the descriptor was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_a_child_and_sees_it_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pinned = pin(child.id() as i32, None).unwrap();
        assert_eq!(pinned.parent, std::process::id() as i32);
        assert!(is_alive(&pinned.pidfd));
        assert!(pinned.stamp.start_ticks <= boot_ticks_now());
        assert!(matches!(
            pin(
                child.id() as i32,
                Some(ProcessStamp {
                    start_ticks: pinned.stamp.start_ticks + 1,
                    ..pinned.stamp
                })
            ),
            Err(PinError::Changed(_))
        ));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!is_alive(&pinned.pidfd));
        assert!(matches!(
            pin(child.id() as i32, None),
            Err(PinError::NoProcess(_))
        ));
    }
}
