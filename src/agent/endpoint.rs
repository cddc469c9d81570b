//! The Workload API socket: bound world-connectable on purpose (authorisation comes from
//! attestation, not file modes), and an accept loop that captures each peer's credentials and
//! pins its process before any byte is read.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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

/// Why the socket could not be set up (shared with the server's admin socket).
pub use crate::runtime::socket::BindError as EndpointError;

/// Binds the Workload API socket: creates the directory, removes a stale socket, makes the
/// socket connectable by every local user.
pub fn bind(path: &Path) -> Result<UnixListener, EndpointError> {
    // World-connectable on purpose: authorisation comes from attestation, not file modes.
    crate::runtime::socket::bind_with_modes(path, 0o777, 0o755)
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
    crate::runtime::accept::incoming(
        listener,
        "workload",
        shutdown,
        move |stream: UnixStream, _, handoff| {
            let admitted = admit(&slots, &user_counts, per_user_limit, &attestor, stream);
            async move {
                if let Some(connection) = admitted {
                    let _ = handoff.send(Ok(connection)).await;
                }
            }
        },
    )
}

/// Captures the peer of `stream` and gives it a connection slot, or closes it when the agent or
/// its user holds too many connections.
fn admit(
    slots: &Arc<Semaphore>,
    user_counts: &UserCounts,
    per_user_limit: usize,
    attestor: &Attestor,
    stream: UnixStream,
) -> Option<PeerConnection> {
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        tracing::warn!(
            limit = MAX_CONNECTIONS,
            "too many open connections; closing a new one"
        );
        return None;
    };
    let peer = attestor.capture_peer(stream.as_fd());
    if let Err(e) = &peer {
        tracing::warn!(error = %e, "could not capture peer credentials");
    }
    let uid = peer.as_ref().ok().map(|p| p.uid);
    let Some(user_slot) = UserSlot::take(user_counts, uid, per_user_limit) else {
        tracing::warn!(
            ?uid,
            limit = per_user_limit,
            "user holds too many connections; closing a new one"
        );
        return None;
    };
    Some(PeerConnection {
        io: AuthorityFix::new(stream),
        peer: PeerInfo(Arc::new(peer)),
        _slot: slot,
        _user_slot: user_slot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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

    #[test]
    fn connection_limit_follows_the_descriptor_limit() {
        let limit = connection_limit();
        assert!((16..=MAX_CONNECTIONS).contains(&limit));
    }
}
