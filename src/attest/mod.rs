//! Workload attestation: who is on the other end of a Workload API connection, as the kernel
//! tells it, turned into selectors.
//!
//! At accept time the agent takes the peer's credentials (SO_PEERCRED) and a pidfd for the very
//! process that connected (SO_PEERPIDFD). Attestation then reads /proc through a directory fd
//! that is proven, by the pidfd, to belong to that process; a recycled pid can never lend its
//! facts to someone else. Kernels without SO_PEERPIDFD fall back to pinning `/proc/<pid>` at
//! accept time and re-checking the process start time and owner after reading.

mod hash;
mod names;
mod peer;
mod process;
mod selector;

pub use hash::ExeHashCache;
pub use peer::{PeerCredentials, PinMode, kernel_has_peer_pidfd, read_proc_path};
pub use process::{ancestry_of, read_stamp};
pub use selector::{Selector, SelectorError, SelectorKind, SelectorSet};

/// Which costly facts attestation must gather because some entry uses them (the entry set
/// works this out once per set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FactNeeds {
    /// Some entry has a `unix:sha256` selector: hash the executable.
    pub exe_sha256: bool,
    /// Some task is live: read the caller's ancestry, to find the task it runs in.
    pub lineage: bool,
    /// With `lineage`, the start tick of the oldest process that is a live task's own: beyond
    /// the parent (always read), the walk up the ancestry stops at an ancestor that started
    /// earlier, since neither it nor any of its own ancestors (each started no later than its
    /// child) can be one. 0 walks it all.
    pub lineage_since: u64,
}

/// A process as /proc names it for good: its pid and its start time in clock ticks since boot
/// (a pid is reused only by a process that starts later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ProcessStamp {
    /// Process id.
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`.
    pub start_ticks: u64,
}

/// Why a caller could not be attested. Reported to the caller only as "attestation failed";
/// the reason goes to the agent's log.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The socket reported no process id (the caller is in a PID namespace the agent cannot see).
    #[error(
        "peer process id is 0: the caller is in another PID namespace; run the agent in the host PID namespace"
    )]
    NoPid,
    /// The socket's peer credentials could not be read.
    #[error("cannot read the socket's peer credentials: {0}")]
    PeerCredentials(nix::Error),
    /// The process that connected has exited.
    #[error("process {pid} that connected has exited")]
    Vanished {
        /// The pid the connection reported.
        pid: i32,
    },
    /// The pid now names a different process than the one that connected.
    #[error("pid {pid} now belongs to a different process than the one that connected")]
    PidReused {
        /// The pid the connection reported.
        pid: i32,
    },
    /// The process has executed another program since it connected.
    #[error(
        "process {pid} has executed another program ({exe}) since it connected; that program must connect itself"
    )]
    ProgramChanged {
        /// The process.
        pid: i32,
        /// The program it runs now.
        exe: String,
    },
    /// The process's effective uid/gid differ from those it connected with.
    #[error(
        "process {pid} connected as uid {peer_uid} gid {peer_gid} but now runs as uid {uid} gid {gid}"
    )]
    CredentialsChanged {
        /// The process.
        pid: i32,
        /// Credentials at connect time.
        peer_uid: u32,
        /// Credentials at connect time.
        peer_gid: u32,
        /// Effective credentials now.
        uid: u32,
        /// Effective credentials now.
        gid: u32,
    },
    /// A /proc entry of the process could not be read.
    #[error("cannot read /proc/{pid}/{entry}: {source}")]
    Proc {
        /// The process.
        pid: i32,
        /// The /proc entry, e.g. `status`.
        entry: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A /proc entry does not have the expected format.
    #[error("/proc/{pid}/{entry} is malformed: {detail}")]
    ProcFormat {
        /// The process.
        pid: i32,
        /// The /proc entry.
        entry: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Attestation needs a lookup that may block (an uncached hash or name), and the caller
    /// asked not to block; it retries where blocking is allowed.
    #[error("attestation needs a blocking lookup")]
    WouldBlock,
    /// The executable is larger than the hashing limit.
    #[error(
        "executable of process {pid} is {size} bytes, over the hashing limit of {limit} bytes (attestation.exe_hash_size_limit)"
    )]
    ExeTooLarge {
        /// The process.
        pid: i32,
        /// The executable's size.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
}

/// What attestation established about a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerFacts {
    /// Process id.
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Executable path as the kernel reports it (inside the caller's mount namespace).
    pub exe_path: String,
    /// SHA-256 of the executable, when some entry needs it.
    pub exe_sha256: Option<String>,
    /// The systemd unit the process runs in, if any.
    pub systemd_unit: Option<String>,
    /// Every fact as a selector.
    pub selectors: SelectorSet,
    /// The caller's stamp, then (when [`FactNeeds::lineage`] asked for them) its parent's, and
    /// so on up to the first process that is not provably an ancestor (pid 1, an unreadable
    /// entry, or a parent that started after its child, i.e. a reused pid).
    pub lineage: Vec<ProcessStamp>,
}

/// Attests callers. One per agent; shared by every connection.
#[derive(Debug)]
pub struct Attestor {
    /// Digests of executables, reused while the file is unchanged.
    hashes: ExeHashCache,
    /// User and group names, reused for a minute.
    names: names::NameCache,
    /// How a connection's process is pinned at accept time.
    pin_mode: PinMode,
}

impl Attestor {
    /// An attestor hashing executables up to `exe_hash_size_limit` bytes. `PinMode::Pidfd` is
    /// used when the kernel supports it (checked here, once), else the /proc fallback.
    pub fn new(exe_hash_size_limit: u64, pin_mode: PinMode) -> Self {
        let pin_mode = match pin_mode {
            PinMode::Pidfd if !kernel_has_peer_pidfd() => {
                tracing::info!(
                    "kernel has no SO_PEERPIDFD (Linux 6.5+); pinning callers through /proc start times"
                );
                PinMode::ProcStartTime
            }
            mode => mode,
        };
        Self {
            hashes: ExeHashCache::new(exe_hash_size_limit),
            names: names::NameCache::default(),
            pin_mode,
        }
    }

    /// Takes the peer's credentials and pins its process; call right after accept.
    pub fn capture_peer(
        &self,
        socket: std::os::fd::BorrowedFd<'_>,
    ) -> Result<PeerCredentials, AttestError> {
        PeerCredentials::capture(socket, self.pin_mode)
    }

    /// Reads the pinned process's facts. With `may_block` false it only reads /proc (which never
    /// waits on I/O) and the caches, and returns [`AttestError::WouldBlock`] when it would need
    /// to hash an executable or look a name up; with `may_block` true, run it off the async
    /// workers.
    pub fn attest(
        &self,
        peer: &PeerCredentials,
        needs: FactNeeds,
        may_block: bool,
    ) -> Result<CallerFacts, AttestError> {
        process::read_facts(peer, needs, &self.hashes, &self.names, may_block)
    }
}
