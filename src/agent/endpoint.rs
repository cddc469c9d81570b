//! The Workload API socket: bound world-connectable on purpose (authorisation comes from
//! attestation, not file modes), and an accept loop that captures each peer's credentials and
//! pins its process before any byte is read.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
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
    let soft = crate::runtime::descriptor_limit();
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

/// How long a connection may do nothing, or take over a request's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionTimeouts {
    /// A connection with no stream open for this long is closed.
    pub idle: Duration,
    /// A connection whose client has not finished a header block this long after starting it
    /// is closed.
    pub header_block: Duration,
}

/// The peer of a connection, as captured at accept time; handed to every request on it.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The captured credentials, or why they could not be captured.
    credentials: Result<Arc<PeerCredentials>, Arc<AttestError>>,
    /// What the connection is doing, for its idle timeout.
    activity: Arc<Activity>,
}

impl PeerInfo {
    /// The captured credentials, or why they could not be captured.
    pub fn credentials(&self) -> Result<&PeerCredentials, &Arc<AttestError>> {
        self.credentials.as_deref()
    }

    /// Notes a request starting on the connection (its idle time starts again).
    pub fn touch(&self) {
        self.activity.touch();
    }

    /// Resolves once the client reads what the connection sends: at once unless the socket
    /// refused the last write.
    pub async fn client_reads(&self) {
        loop {
            let notified = self.activity.writable.notified();
            tokio::pin!(notified);
            // Registered before the flag is read, so a write between the two is not missed.
            notified.as_mut().enable();
            if !self.activity.write_blocked.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Marks a stream open on the connection until the returned guard is dropped; a
    /// connection with an open stream is never idle.
    pub fn stream_open(&self) -> OpenStream {
        self.activity.streams.fetch_add(1, Ordering::AcqRel);
        self.activity.touch();
        OpenStream(self.activity.clone())
    }
}

/// What a connection is doing, shared by its requests and its socket.
#[derive(Debug)]
struct Activity {
    /// Response streams open now.
    streams: AtomicUsize,
    /// When a request last started or a stream last ended.
    last: Mutex<Instant>,
    /// Set while the socket takes no more bytes (the client is not reading); cleared by the next
    /// write that goes through.
    write_blocked: AtomicBool,
    /// Wakes streams that hold their next message back until the client reads again.
    writable: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            streams: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            write_blocked: AtomicBool::new(false),
            writable: Notify::new(),
        }
    }

    /// Notes how a write to the socket went.
    fn wrote<T>(&self, result: &Poll<io::Result<T>>) {
        match result {
            Poll::Pending => self.write_blocked.store(true, Ordering::Release),
            Poll::Ready(Ok(_)) => {
                if self.write_blocked.swap(false, Ordering::AcqRel) {
                    self.writable.notify_waiters();
                }
            }
            Poll::Ready(Err(_)) => {}
        }
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn last(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A stream counted as open on its connection; dropped when the stream ends.
pub struct OpenStream(Arc<Activity>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.touch();
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An accepted connection: the socket (behind the `:authority` fix) and its peer.
pub struct PeerConnection {
    io: AuthorityFix<UnixStream>,
    peer: PeerInfo,
    /// The idle and header-block limits enforced on this connection.
    timeouts: ConnectionTimeouts,
    /// Wakes the connection when one of its timeouts may have run out.
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Counts against the agent-wide connection limit while the connection lives.
    _slot: OwnedSemaphorePermit,
    /// Counts against its user's share while the connection lives.
    _user_slot: UserSlot,
}

/// How the connection limit is shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shares {
    /// Connections the agent accepts at once, from everyone.
    total: usize,
    /// Connections any one user may hold.
    per_user: usize,
    /// Connections all ordinary users together may hold; the rest of the limit is kept for
    /// privileged users (root and the agent's own user), so no crowd of users can lock them out.
    ordinary: usize,
}

impl Shares {
    fn of(limit: usize) -> Self {
        Self {
            total: limit,
            per_user: (limit / 4).max(1),
            ordinary: limit - (limit / 8).max(1),
        }
    }
}

/// Open connections per uid (`None`: peers whose credentials could not be read).
#[derive(Default)]
struct Held {
    /// Connections per uid.
    by_user: HashMap<Option<u32>, usize>,
    /// Connections of ordinary (not privileged) users together.
    ordinary: usize,
}

type UserCounts = Arc<Mutex<Held>>;

/// One connection's place in its user's share; released on drop.
struct UserSlot {
    counts: UserCounts,
    uid: Option<u32>,
    privileged: bool,
}

impl UserSlot {
    /// Takes a slot for `uid`, unless the user already holds their share, or the user is an
    /// ordinary one and ordinary users hold all theirs. Privileged users are bounded only by
    /// the agent-wide limit.
    fn take(
        counts: &UserCounts,
        uid: Option<u32>,
        privileged: bool,
        shares: Shares,
    ) -> Option<Self> {
        let mut held = counts.lock().unwrap_or_else(|p| p.into_inner());
        if !privileged && held.ordinary >= shares.ordinary {
            return None;
        }
        let mine = held.by_user.entry(uid).or_default();
        if !privileged && *mine >= shares.per_user {
            return None;
        }
        *mine += 1;
        if !privileged {
            held.ordinary += 1;
        }
        Some(Self {
            counts: counts.clone(),
            uid,
            privileged,
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut held = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if !self.privileged {
            held.ordinary -= 1;
        }
        if let Some(mine) = held.by_user.get_mut(&self.uid) {
            *mine -= 1;
            if *mine == 0 {
                held.by_user.remove(&self.uid);
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

impl PeerConnection {
    /// Fails once the connection has been idle, or stuck in a header block, for too long; else
    /// arms the timer for the next moment that could happen. The server polls reads for as long
    /// as the connection lives, so the timer's wake-up always reaches this check.
    fn enforce_timeouts(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.deadline.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let mut next = now + self.timeouts.idle;
            if let Some(since) = self.io.header_block_open_since() {
                let due = since + self.timeouts.header_block;
                if now >= due {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "header block not finished within {:?}",
                            self.timeouts.header_block
                        ),
                    ));
                }
                next = next.min(due);
            }
            if self.peer.activity.streams.load(Ordering::Acquire) == 0 {
                let due = self.peer.activity.last() + self.timeouts.idle;
                if now >= due {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no stream for {:?}", self.timeouts.idle),
                    ));
                }
                next = next.min(due);
            }
            self.deadline.as_mut().reset(next.into());
        }
        Ok(())
    }
}

impl AsyncRead for PeerConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.enforce_timeouts(cx) {
            tracing::debug!(uid = ?this.peer.credentials().ok().map(|p| p.uid), error = %e, "closing a connection");
            return Poll::Ready(Err(e));
        }
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        // A header block opened by this read must not wait for a later, idle-length timer.
        if let Some(since) = this.io.header_block_open_since() {
            let due = (since + this.timeouts.header_block).into();
            if due < this.deadline.deadline() {
                this.deadline.as_mut().reset(due);
                let _ = this.deadline.as_mut().poll(cx);
            }
        }
        read
    }
}

impl AsyncWrite for PeerConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.peer.activity.wrote(&result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.peer.activity.wrote(&result);
        result
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
    timeouts: ConnectionTimeouts,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> ReceiverStream<Result<PeerConnection, io::Error>> {
    let limit = connection_limit();
    let shares = Shares::of(limit);
    let agent_uid = nix::unistd::geteuid().as_raw();
    tracing::debug!(
        limit,
        per_user = shares.per_user,
        ordinary_users = shares.ordinary,
        "connection limits from RLIMIT_NOFILE"
    );
    let slots = Arc::new(Semaphore::new(limit));
    let user_counts = UserCounts::default();
    crate::runtime::accept::incoming(
        listener,
        "workload",
        shutdown,
        move |stream: UnixStream, _, handoff| {
            let admitted = admit(
                &slots,
                &user_counts,
                shares,
                agent_uid,
                timeouts,
                &attestor,
                stream,
            );
            async move {
                if let Some(connection) = admitted {
                    let _ = handoff.send(Ok(connection)).await;
                }
            }
        },
    )
}

/// Captures the peer of `stream` and gives it a connection slot, or closes it when the agent,
/// its user or ordinary users together hold their share of connections.
fn admit(
    slots: &Arc<Semaphore>,
    user_counts: &UserCounts,
    shares: Shares,
    agent_uid: u32,
    timeouts: ConnectionTimeouts,
    attestor: &Attestor,
    stream: UnixStream,
) -> Option<PeerConnection> {
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        tracing::warn!(
            limit = shares.total,
            "too many open connections; closing a new one"
        );
        return None;
    };
    let peer = attestor.capture_peer(stream.as_fd());
    if let Err(e) = &peer {
        tracing::warn!(error = %e, "could not capture peer credentials");
    }
    let uid = peer.as_ref().ok().map(|p| p.uid);
    let privileged = uid.is_some_and(|uid| uid == 0 || uid == agent_uid);
    let Some(user_slot) = UserSlot::take(user_counts, uid, privileged, shares) else {
        tracing::warn!(
            ?uid,
            per_user = shares.per_user,
            ordinary_users = shares.ordinary,
            "user, or ordinary users together, hold their share of connections; closing a new one"
        );
        return None;
    };
    Some(PeerConnection {
        io: AuthorityFix::new(stream),
        peer: PeerInfo {
            credentials: peer.map(Arc::new).map_err(Arc::new),
            activity: Arc::new(Activity::new()),
        },
        timeouts,
        deadline: Box::pin(tokio::time::sleep(timeouts.idle.min(timeouts.header_block))),
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
        let shares = Shares {
            total: 128,
            per_user: 2,
            ordinary: 100,
        };
        let a = UserSlot::take(&counts, Some(1000), false, shares).unwrap();
        let _b = UserSlot::take(&counts, Some(1000), false, shares).unwrap();
        assert!(
            UserSlot::take(&counts, Some(1000), false, shares).is_none(),
            "third connection refused"
        );
        assert!(
            UserSlot::take(&counts, Some(1001), false, shares).is_some(),
            "other users unaffected"
        );
        drop(a);
        assert!(
            UserSlot::take(&counts, Some(1000), false, shares).is_some(),
            "a closed connection frees a slot"
        );
    }

    #[test]
    fn ordinary_users_together_cannot_take_the_privileged_share() {
        let shares = Shares::of(16);
        assert_eq!(
            shares,
            Shares {
                total: 16,
                per_user: 4,
                ordinary: 14
            }
        );
        let counts = UserCounts::default();
        let mut held = Vec::new();
        for uid in 1000..1010 {
            while let Some(slot) = UserSlot::take(&counts, Some(uid), false, shares) {
                held.push(slot);
            }
        }
        assert_eq!(held.len(), 14, "ordinary users share 14 of 16");
        assert!(UserSlot::take(&counts, Some(2000), false, shares).is_none());
        let root: Vec<_> = (0..2)
            .map(|_| UserSlot::take(&counts, Some(0), true, shares).unwrap())
            .collect();
        drop(held);
        assert_eq!(counts.lock().unwrap().ordinary, 0);
        drop(root);
        assert!(counts.lock().unwrap().by_user.is_empty());
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
        let private = crate::runtime::socket::bind_private(&dir.path().join("private.sock"));
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
        for attempt in [bind(&path), crate::runtime::socket::bind_private(&path)] {
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
