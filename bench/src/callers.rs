//! Workload API callers with identities of their own, many thousands at once: processes forked
//! from this one, each switched to a user of its own, that connect to the agent's socket, hand
//! the connection to this process and then wait, unchanged, until this process lets them go.
//!
//! An agent chooses an identity by what it attests of the process that connected (its uid, gid,
//! path or hash), and refuses a connection whose process has since run another program, so a
//! caller cannot be a short-lived helper that connects and then `exec`s something smaller. A
//! forked copy that never `exec`s costs the kernel little more than its page tables: 10,000 of
//! them fit on a small machine where 10,000 started programs would not.
//!
//! The code between `fork` and `_exit` in the child calls only system calls: the parent has other
//! threads, so the child must not allocate or take a lock.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::BenchError;

/// How long a caller may take to connect and hand its connection over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a caller reports back before anything else: connected, or which step failed.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Connected = 0,
    SetIds = 1,
    Socket = 2,
    Connect = 3,
}

impl Step {
    fn describe(code: u8) -> &'static str {
        match code {
            1 => "switching to its user",
            2 => "creating its socket",
            3 => "connecting to the agent",
            _ => "an unknown step",
        }
    }
}

/// Forked callers and the connections they made. Dropping it lets every caller exit and reaps
/// them.
pub struct Callers {
    /// One connection per caller, in caller order; each was made by its caller, so the agent
    /// attests that caller for every call on it.
    pub connections: Vec<UnixStream>,
    /// The callers' process ids, for reaping.
    pids: Vec<libc::pid_t>,
    /// The write end of the pipe every caller waits on: closing it (or this process ending)
    /// lets them all exit.
    release: Option<OwnedFd>,
}

impl Callers {
    /// Forks `count` callers connected to the Workload API socket at `socket`. With
    /// `first_uid`, caller `i` runs as uid and gid `first_uid + i` (which needs root); without,
    /// as this process's own user.
    pub fn connect(
        socket: &Path,
        count: usize,
        first_uid: Option<u32>,
    ) -> Result<Self, BenchError> {
        let address = socket_address(socket)?;
        let (release_read, release_write) = pipe()?;
        let (parent_end, child_end) = seqpacket_pair()?;
        set_receive_timeout(&parent_end, HANDOVER_TIMEOUT)?;
        let mut callers = Callers {
            connections: Vec::with_capacity(count),
            pids: Vec::with_capacity(count),
            release: Some(release_write),
        };
        for i in 0..count {
            let ids = first_uid.map(|first| first + i as u32);
            // SAFETY: the child runs `caller` alone, which makes system calls only and never
            // returns; every value it reads was prepared before the fork.
            let pid = unsafe { libc::fork() };
            match pid {
                -1 => {
                    return Err(BenchError::Failed(format!(
                        "forking caller {i}: {}",
                        std::io::Error::last_os_error()
                    )));
                }
                0 => unsafe {
                    caller(
                        child_end.as_raw_fd(),
                        release_read.as_raw_fd(),
                        &address,
                        ids,
                    )
                },
                pid => {
                    callers.pids.push(pid);
                    let connection = receive_connection(&parent_end)
                        .map_err(|e| BenchError::Failed(format!("caller {i} (pid {pid}): {e}")))?;
                    callers.connections.push(connection);
                }
            }
        }
        Ok(callers)
    }

    /// The callers' process ids, in caller order.
    #[cfg(test)]
    pub fn pids(&self) -> &[libc::pid_t] {
        &self.pids
    }
}

impl Drop for Callers {
    fn drop(&mut self) {
        self.connections.clear();
        // Every caller waiting on the pipe now exits; one still stuck connecting (to an agent
        // that stopped accepting) is killed. Then each is reaped.
        self.release = None;
        for &pid in &self.pids {
            let mut status = 0;
            // SAFETY: signals and waits for a child of this process, which has not been reaped
            // yet, so the pid is still its own; the status goes through a valid pointer.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
        }
    }
}

/// The caller itself, in the forked child: keeps `handover` and `release` (closing every other
/// descriptor it inherited, among them the other callers' connections), takes its ids,
/// connects, sends the connection through `handover`, and waits for `release` to close.
unsafe fn caller(
    handover: RawFd,
    release: RawFd,
    address: &libc::sockaddr_un,
    ids: Option<u32>,
) -> ! {
    unsafe {
        let (low, high) = (handover.min(release), handover.max(release));
        close_range(3, low - 1);
        close_range(low + 1, high - 1);
        close_range(high + 1, u32::MAX as RawFd);
        if let Some(id) = ids {
            let dropped = libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>());
            let gid = libc::syscall(libc::SYS_setgid, id);
            let uid = libc::syscall(libc::SYS_setuid, id);
            if dropped != 0 || gid != 0 || uid != 0 {
                report(handover, Step::SetIds, -1);
            }
        }
        let connection = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if connection < 0 {
            report(handover, Step::Socket, -1);
        }
        let connected = libc::connect(
            connection,
            (address as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        );
        if connected != 0 {
            report(handover, Step::Connect, -1);
        }
        report(handover, Step::Connected, connection);
        // The parent holds the connection now; this copy must not keep it open after the
        // parent closes it.
        libc::close(connection);
        libc::close(handover);
        let mut byte = 0u8;
        loop {
            let read = libc::read(release, (&mut byte as *mut u8).cast(), 1);
            if read >= 0 || *libc::__errno_location() != libc::EINTR {
                libc::_exit(0);
            }
        }
    }
}

/// In the child: sends `step` (and the connection with it when there is one) and, unless
/// connected, exits.
unsafe fn report(handover: RawFd, step: Step, connection: RawFd) {
    unsafe {
        let errno = if step == Step::Connected {
            0
        } else {
            *libc::__errno_location()
        };
        let mut payload = [0u8; 5];
        payload[0] = step as u8;
        payload[1..].copy_from_slice(&errno.to_le_bytes());
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        // Room for one control message carrying one descriptor, 8-byte aligned.
        let mut control = [0u64; 4];
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        if connection >= 0 {
            message.msg_control = control.as_mut_ptr().cast();
            message.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as _;
            let header = libc::CMSG_FIRSTHDR(&message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::copy_nonoverlapping(
                (&connection as *const RawFd).cast::<u8>(),
                libc::CMSG_DATA(header),
                std::mem::size_of::<RawFd>(),
            );
        }
        libc::sendmsg(handover, &message, 0);
        if step != Step::Connected {
            libc::_exit(1);
        }
    }
}

/// Closes the descriptors `first..=last`, if any.
unsafe fn close_range(first: RawFd, last: RawFd) {
    if first <= last {
        unsafe { libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32) };
    }
}

/// In the parent: the next caller's report, and its connection.
fn receive_connection(from: &OwnedFd) -> Result<UnixStream, String> {
    let mut payload = [0u8; 5];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: receives into the buffers `message` points at, marking received descriptors
    // close-on-exec.
    let received = unsafe { libc::recvmsg(from.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(format!(
            "no word within {HANDOVER_TIMEOUT:?}: {}",
            std::io::Error::last_os_error()
        ));
    }
    if received as usize != payload.len() {
        return Err(format!(
            "a report of {received} bytes, not {}",
            payload.len()
        ));
    }
    let errno = i32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]);
    if payload[0] != Step::Connected as u8 {
        return Err(format!(
            "failed {}: {}",
            Step::describe(payload[0]),
            std::io::Error::from_raw_os_error(errno)
        ));
    }
    // SAFETY: the control buffer was filled by recvmsg; the header is checked before its data
    // is read.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&message);
        if header.is_null()
            || (*header).cmsg_level != libc::SOL_SOCKET
            || (*header).cmsg_type != libc::SCM_RIGHTS
        {
            return Err("a report without its connection".into());
        }
        let mut fd: RawFd = -1;
        std::ptr::copy_nonoverlapping(
            libc::CMSG_DATA(header),
            (&mut fd as *mut RawFd).cast::<u8>(),
            std::mem::size_of::<RawFd>(),
        );
        Ok(UnixStream::from_raw_fd(fd))
    }
}

fn socket_address(path: &Path) -> Result<libc::sockaddr_un, BenchError> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= address.sun_path.len() {
        return Err(BenchError::Failed(format!(
            "the socket path {} is longer than the {} bytes a Unix socket address holds",
            path.display(),
            address.sun_path.len() - 1
        )));
    }
    for (to, from) in address.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    Ok(address)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), BenchError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_failure("creating the callers' pipe"));
    }
    // SAFETY: both descriptors were just created and are owned here alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd), BenchError> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array.
    let made = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if made != 0 {
        return Err(os_failure("creating the callers' hand-over socket"));
    }
    // SAFETY: both descriptors were just created and are owned here alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_receive_timeout(socket: &OwnedFd, timeout: Duration) -> Result<(), BenchError> {
    let value = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: passes a timeval of the size given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&value as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(os_failure("setting the hand-over timeout"));
    }
    Ok(())
}

/// Raises this process's descriptor limit (and so that of the processes it starts) to `wanted`,
/// or as high as it may go without privilege. Returns the soft limit now in force.
pub fn raise_descriptor_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit through valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur >= wanted {
            return limit.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max.max(wanted),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return wanted;
        }
        let within = libc::rlimit {
            rlim_cur: limit.rlim_max.min(wanted),
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &within) == 0 {
            return within.rlim_cur;
        }
        limit.rlim_cur
    }
}

fn os_failure(what: &str) -> BenchError {
    BenchError::Failed(format!("{what}: {}", std::io::Error::last_os_error()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Callers connect as themselves: the peer of every connection is its own caller, alive
    /// until the callers are dropped.
    #[test]
    fn each_connection_is_made_by_its_own_caller() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let callers = Callers::connect(&socket, 5, None).unwrap();
        let mut peers = Vec::new();
        for _ in 0..5 {
            let (accepted, _) = listener.accept().unwrap();
            peers.push(peer_pid(&accepted));
        }
        peers.sort_unstable();
        let mut pids = callers.pids().to_vec();
        pids.sort_unstable();
        assert_eq!(peers, pids);
        for pid in &pids {
            assert!(Path::new(&format!("/proc/{pid}")).exists(), "{pid} waits");
        }
        drop(callers);
        for pid in &pids {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "{pid} was reaped"
            );
        }
    }

    /// A caller that cannot connect says which step failed and why.
    #[test]
    fn a_caller_that_cannot_connect_is_reported_with_its_step() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("absent.sock");
        let Err(BenchError::Failed(message)) = Callers::connect(&absent, 1, None) else {
            panic!("connecting to a socket that does not exist succeeded");
        };
        assert!(
            message.contains("connecting to the agent") && message.contains("No such file"),
            "{message}"
        );
    }

    fn peer_pid(stream: &UnixStream) -> libc::pid_t {
        let mut credentials = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: reads a ucred of the size given.
        let read = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut credentials as *mut libc::ucred).cast(),
                &mut length,
            )
        };
        assert_eq!(read, 0);
        credentials.pid
    }
}
