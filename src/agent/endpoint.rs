//! The Workload API socket: bound world-connectable on purpose (authorisation comes from
//! attestation, not file modes), and an accept loop that captures each peer's credentials and
//! pins its process before any byte is read.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::authority::AuthorityFix;
use crate::attest::{AttestError, Attestor, PeerCredentials};

/// Connections beyond this many are closed at once.
const MAX_CONNECTIONS: usize = 32_768;
/// Descriptors kept free for everything else (state files, /proc reads, logging).
const RESERVED_FDS: u64 = 256;

/// How many connections may be open: each holds two descriptors (the socket and the pidfd or
/// /proc directory), so the limit follows RLIMIT_NOFILE, leaving room for attestation's reads.
fn connection_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    let by_fds = soft.saturating_sub(RESERVED_FDS) / 2;
    (by_fds as usize).clamp(16, MAX_CONNECTIONS)
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The socket's directory could not be created.
    #[error("cannot create socket directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// Something other than a socket is in the way.
    #[error("{path} exists and is not a socket; refusing to remove it")]
    NotASocket {
        /// The configured socket path.
        path: String,
    },
    /// The socket's directory could be changed by users other than root and the agent's own.
    #[error("socket directory {path} is {reason}")]
    UnsafeDirectory {
        /// The directory.
        path: String,
        /// What is wrong with it and how to fix it.
        reason: String,
    },
    /// Something answers on the socket already; it is never taken over.
    #[error(
        "{path}: another agent or server is serving this socket; stop it, or configure another socket path"
    )]
    InUse {
        /// The configured socket path.
        path: String,
    },
    /// Binding or setting permissions failed.
    #[error("cannot bind {path}: {source}")]
    Bind {
        /// The configured socket path.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// Binds the Workload API socket: creates the directory, removes a stale socket, makes the
/// socket connectable by every local user.
pub fn bind(path: &Path) -> Result<UnixListener, EndpointError> {
    // World-connectable on purpose: authorisation comes from attestation, not file modes.
    bind_with_modes(path, 0o777, 0o755)
}

/// Binds a socket only its owner can connect to, in a directory only its owner can enter
/// (when the directory is created here).
pub fn bind_private(path: &Path) -> Result<UnixListener, EndpointError> {
    bind_with_modes(path, 0o600, 0o700)
}

fn bind_with_modes(
    path: &Path,
    socket_mode: u32,
    dir_mode: u32,
) -> Result<UnixListener, EndpointError> {
    let shown = || path.display().to_string();
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|source| EndpointError::CreateDir {
            path: dir.display().to_string(),
            source,
        })?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode));
    }
    if let Some(dir) = path.parent() {
        check_directory(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Only a stale socket (nothing listening) is replaced: removing a live one would
            // silently cut its server's clients off and leave it serving nobody.
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(EndpointError::InUse { path: shown() }),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(source) => {
                    return Err(EndpointError::Bind {
                        path: shown(),
                        source,
                    });
                }
            }
            std::fs::remove_file(path).map_err(|source| EndpointError::Bind {
                path: shown(),
                source,
            })?;
        }
        Ok(_) => return Err(EndpointError::NotASocket { path: shown() }),
        Err(_) => {}
    }
    bind_socket(path, socket_mode).map_err(|source| EndpointError::Bind {
        path: shown(),
        source,
    })
}

/// Refuses a directory that someone other than root and the agent's own user could change: such
/// a user could swap the socket for a file or a link of their own between our steps.
fn check_directory(dir: &Path) -> Result<(), EndpointError> {
    use std::os::unix::fs::MetadataExt;
    let refused = |reason: String| EndpointError::UnsafeDirectory {
        path: dir.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(dir).map_err(|source| EndpointError::CreateDir {
        path: dir.display().to_string(),
        source,
    })?;
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if meta.uid() != 0 && meta.uid() != uid {
        return Err(refused(format!(
            "owned by uid {}; it must belong to root or to uid {uid}, which runs this process",
            meta.uid()
        )));
    }
    if meta.mode() & 0o002 != 0 {
        return Err(refused(format!(
            "writable by every user (mode {:o}); remove that with chmod o-w, or choose a directory of its own",
            meta.mode() & 0o7777
        )));
    }
    if meta.mode() & 0o020 != 0 && meta.gid() != 0 && meta.gid() != gid {
        return Err(refused(format!(
            "writable by group {} (mode {:o}); remove that with chmod g-w",
            meta.gid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Binds a listening socket at `path` with `mode`. The mode is set on the socket before it has a
/// name (Linux gives the bound file the socket's mode, less the umask), and the bits the umask
/// took away are restored through a descriptor of the very file bound, never by following the
/// path again.
fn bind_socket(path: &Path, mode: u32) -> io::Result<UnixListener> {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use nix::sys::stat::Mode;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let socket = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    nix::sys::stat::fchmod(&socket, Mode::from_bits_truncate(mode))?;
    nix::sys::socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &UnixAddr::new(path)?,
    )?;
    let bound = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = bound.metadata()?;
    if !meta.file_type().is_socket() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(
            "the bound socket was replaced before its mode could be set",
        ));
    }
    if meta.mode() & 0o777 != mode {
        // An O_PATH descriptor cannot be fchmod'ed; its /proc link names exactly that file.
        let by_descriptor = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&bound));
        std::fs::set_permissions(by_descriptor, std::fs::Permissions::from_mode(mode))?;
    }
    nix::sys::socket::listen(&socket, Backlog::MAXCONN)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(socket))
}

/// The peer of a connection, as captured at accept time; handed to every request on it.
#[derive(Clone, Debug)]
pub struct PeerInfo(Arc<Result<PeerCredentials, AttestError>>);

impl PeerInfo {
    /// The captured credentials, or why they could not be captured.
    pub fn credentials(&self) -> Result<&PeerCredentials, &AttestError> {
        self.0.as_ref().as_ref()
    }
}

/// An accepted connection: the socket (behind the `:authority` fix) and its peer.
pub struct PeerConnection {
    io: AuthorityFix<UnixStream>,
    peer: PeerInfo,
    /// Counts against the agent-wide connection limit while the connection lives.
    _slot: OwnedSemaphorePermit,
    /// Counts against its user's share while the connection lives.
    _user_slot: UserSlot,
}

/// Open connections per uid (`None`: peers whose credentials could not be read).
type UserCounts = Arc<Mutex<HashMap<Option<u32>, usize>>>;

/// One connection's place in its user's share; released on drop.
struct UserSlot {
    counts: UserCounts,
    uid: Option<u32>,
}

impl UserSlot {
    /// Takes a slot for `uid`, unless the user already holds `limit` connections.
    fn take(counts: &UserCounts, uid: Option<u32>, limit: usize) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
        let held = map.entry(uid).or_default();
        if *held >= limit {
            return None;
        }
        *held += 1;
        Some(Self {
            counts: counts.clone(),
            uid,
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = map.get_mut(&self.uid) {
            *held -= 1;
            if *held == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

impl Connected for PeerConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for PeerConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Accepts connections until `shutdown` resolves, capturing each peer. Accept errors (such as
/// running out of file descriptors) are logged and retried, never fatal.
pub fn incoming(
    listener: UnixListener,
    attestor: Arc<Attestor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> ReceiverStream<Result<PeerConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let limit = connection_limit();
    // No single user may hold more than half of the connections: others can always connect.
    let per_user_limit = (limit / 2).max(1);
    tracing::debug!(
        limit,
        per_user_limit,
        "connection limits from RLIMIT_NOFILE"
    );
    let slots = Arc::new(Semaphore::new(limit));
    let user_counts = UserCounts::default();
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::error!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(
                    limit = MAX_CONNECTIONS,
                    "too many open connections; closing a new one"
                );
                continue;
            };
            let peer = attestor.capture_peer(stream.as_fd());
            if let Err(e) = &peer {
                tracing::warn!(error = %e, "could not capture peer credentials");
            }
            let uid = peer.as_ref().ok().map(|p| p.uid);
            let Some(user_slot) = UserSlot::take(&user_counts, uid, per_user_limit) else {
                tracing::warn!(
                    ?uid,
                    limit = per_user_limit,
                    "user holds too many connections; closing a new one"
                );
                continue;
            };
            let connection = PeerConnection {
                io: AuthorityFix::new(stream),
                peer: PeerInfo(Arc::new(peer)),
                _slot: slot,
                _user_slot: user_slot,
            };
            if tx.send(Ok(connection)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_share_is_bounded_and_released_on_drop() {
        let counts = UserCounts::default();
        let a = UserSlot::take(&counts, Some(1000), 2).unwrap();
        let _b = UserSlot::take(&counts, Some(1000), 2).unwrap();
        assert!(
            UserSlot::take(&counts, Some(1000), 2).is_none(),
            "third connection refused"
        );
        assert!(
            UserSlot::take(&counts, Some(1001), 2).is_some(),
            "other users unaffected"
        );
        drop(a);
        assert!(
            UserSlot::take(&counts, Some(1000), 2).is_some(),
            "a closed connection frees a slot"
        );
    }

    #[tokio::test]
    async fn binding_replaces_a_stale_socket_but_never_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("agent.sock");
        let first = bind(&path).unwrap();
        drop(first); // leaves a stale socket file behind
        assert!(path.exists());
        let second = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o777, "connectable by every local user");
        drop(second);

        let not_a_socket = dir.path().join("precious.txt");
        std::fs::write(&not_a_socket, "keep me").unwrap();
        let err = bind(&not_a_socket).unwrap_err().to_string();
        assert!(
            err.contains("is not a socket; refusing to remove it"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&not_a_socket).unwrap(), "keep me");
    }

    #[tokio::test]
    async fn a_directory_others_can_write_is_refused_and_modes_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = bind(&open.join("agent.sock")).unwrap_err().to_string();
        assert!(
            err.contains("is writable by every user (mode 1777)"),
            "{err}"
        );
        assert!(!open.join("agent.sock").exists());

        // Exact modes whatever the umask: the bits it removes are restored on the bound file.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let world = bind(&dir.path().join("world.sock"));
        let private = bind_private(&dir.path().join("private.sock"));
        nix::sys::stat::umask(old);
        let (_world, _private) = (world.unwrap(), private.unwrap());
        for (name, mode) in [("world.sock", 0o777), ("private.sock", 0o600)] {
            let meta = std::fs::metadata(dir.path().join(name)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
        }
    }

    #[tokio::test]
    async fn binding_never_takes_over_a_live_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let live = bind(&path).unwrap();
        for attempt in [bind(&path), bind_private(&path)] {
            let err = attempt.unwrap_err();
            assert!(matches!(err, EndpointError::InUse { .. }), "{err}");
            assert!(
                err.to_string()
                    .contains("another agent or server is serving this socket"),
                "{err}"
            );
        }
        // The live socket is still there and still answers.
        let (connected, accepted) =
            tokio::join!(tokio::net::UnixStream::connect(&path), live.accept());
        connected.unwrap();
        accepted.unwrap();
    }

    #[test]
    fn connection_limit_follows_the_descriptor_limit() {
        let limit = connection_limit();
        assert!((16..=MAX_CONNECTIONS).contains(&limit));
    }
}
