//! The server's datastore: one [`Datastore`] trait, two real backends. SQLite ([`sqlite`]) is
//! embedded and the default; PostgreSQL ([`postgres`]) lets several server replicas share one
//! database. Both apply versioned migrations to the same schema and pass the same test suite
//! (`suite`, built with the tests).
//!
//! Records hold plain values (strings, Unix seconds); the server checks them before they get
//! here. Every write is one transaction: an outage mid-operation leaves nothing half-written.
//! After every committed change to entries, node status or the bundle, every replica's
//! [`Datastore::changes`] receiver moves on, so each can push the change to its agents.
//!
//! The store also keeps credential lifecycle events ([`EventRecord`], the stored form of
//! `tessera.v1.Event`) and an inventory derived from them in the same transaction: one row per
//! SVID ([`SvidRecord`]), the last issuance and use per entry ([`EntryActivity`]) and the last
//! event per node ([`NodeActivity`]). Storing is idempotent by event id, so producers may retry
//! a batch freely; only newly stored events count towards the inventory. Stored events get an
//! increasing position, `seq`, by which readers page and tail ([`EventFilter::after_seq`]);
//! after every batch that stored something, every replica's [`Datastore::events_appended`]
//! receiver moves on. Events never move [`Datastore::changes`]: they do not change what agents
//! are served.

use tokio::sync::watch;

// Records hold Unix seconds; the clock helpers are the ground module's, re-exported here for
// the backends and the server.
pub use crate::clock::{unix_now, unix_seconds};

mod codec;
mod events;
mod pg_tls;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod suite;
pub mod wire;

/// Why a datastore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or failed mid-operation; nothing was changed. Retry later.
    #[error("datastore unavailable: {context}{}", cause_suffix(.source))]
    Unavailable {
        /// What failed.
        context: String,
        /// The driver's, file system's or runtime's error, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// No record with this id.
    #[error("no {kind} with id {id:?}")]
    NotFound {
        /// `entry` or `node`.
        kind: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The record would duplicate an existing one.
    #[error("{0}")]
    AlreadyExists(String),
    /// An update was based on an older revision than the stored one.
    #[error("entry {id:?} is at revision {actual}, not {expected}; read it again and retry")]
    RevisionConflict {
        /// The entry.
        id: String,
        /// The revision the update was based on.
        expected: i64,
        /// The stored revision.
        actual: i64,
    },
    /// A join token cannot be used.
    #[error("join token refused: {0}")]
    TokenRefused(TokenRefusal),
    /// The node is not in a state that allows the operation.
    #[error("node {id:?} is {status}")]
    NodeNotActive {
        /// The node.
        id: String,
        /// Its status.
        status: NodeStatus,
    },
    /// A stored row could not be decoded (written by a newer or broken version).
    #[error("datastore holds an unreadable record: {context}{}", cause_suffix(.source))]
    Corrupt {
        /// What could not be read.
        context: String,
        /// The decoder's or driver's error, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// The request holds a value the datastore cannot store (or look for); nothing was written.
    #[error("invalid request: {reason}{}", cause_suffix(.source))]
    Invalid {
        /// What is wrong, naming the value.
        reason: String,
        /// The database's refusal, when it was the database that refused.
        #[source]
        source: Option<Cause>,
    },
}

// The tests compare errors whole; causes have no equality of their own, so two errors are
// equal when they are of one kind and say the same.
#[cfg(test)]
impl PartialEq for StoreError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

/// The error underneath a datastore failure: the driver's, the file system's or the runtime's.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

impl StoreError {
    /// `Unavailable` with no underlying error (a timeout, a closed pool).
    pub fn unavailable(context: impl Into<String>) -> Self {
        Self::Unavailable {
            context: context.into(),
            source: None,
        }
    }

    /// `Unavailable` because of `source`.
    pub fn unavailable_from(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self::Unavailable {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// `Corrupt` found by this code's own checks.
    pub fn corrupt(context: impl Into<String>) -> Self {
        Self::Corrupt {
            context: context.into(),
            source: None,
        }
    }

    /// `Corrupt` because a decoder refused the stored value.
    pub fn corrupt_from(context: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self::Corrupt {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// `Invalid` found by this code's own checks.
    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::Invalid {
            reason: reason.into(),
            source: None,
        }
    }

    /// `Invalid` because the database refused the values.
    pub fn invalid_from(reason: impl Into<String>, source: impl Into<Cause>) -> Self {
        Self::Invalid {
            reason: reason.into(),
            source: Some(source.into()),
        }
    }

    /// The same error with `place` (a file, a column) in front of what failed; other kinds
    /// already name what they are about and are returned unchanged.
    pub(crate) fn within(self, place: impl std::fmt::Display) -> Self {
        match self {
            Self::Unavailable { context, source } => Self::Unavailable {
                context: format!("{place}: {context}"),
                source,
            },
            Self::Corrupt { context, source } => Self::Corrupt {
                context: format!("{place}: {context}"),
                source,
            },
            Self::Invalid { reason, source } => Self::Invalid {
                reason: format!("{place}: {reason}"),
                source,
            },
            other => other,
        }
    }
}

/// `": <the cause>"`, or nothing: the message names the underlying error as well as keeping it
/// as the source, since most readers (logs, the CLI) see only the message.
fn cause_suffix(source: &Option<Cause>) -> String {
    let Some(source) = source else {
        return String::new();
    };
    // The driver's own message is only "db error"; the server's message and code say more.
    match source.downcast_ref::<tokio_postgres::Error>() {
        Some(e) => format!(": {}", postgres::describe(e)),
        None => format!(": {source}"),
    }
}

/// Why a join token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No token with this digest was ever created.
    Unknown,
    /// The token was already used by a node.
    Used,
    /// The token's lifetime is over.
    Expired,
}

impl std::fmt::Display for TokenRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unknown => "unknown token",
            Self::Used => "token already used",
            Self::Expired => "token expired",
        })
    }
}

/// A registration entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntryRecord {
    /// Stable id, unique.
    pub id: String,
    /// The SPIFFE ID granted.
    pub spiffe_id: String,
    /// Workload selectors, sorted and without duplicates; unique together with `spiffe_id`.
    pub selectors: Vec<String>,
    /// Node selectors, sorted; empty: every node.
    pub node_selectors: Vec<String>,
    /// X.509-SVID lifetime in seconds.
    pub x509_ttl_seconds: i64,
    /// Who answers for the identity.
    pub owner: String,
    /// What it is for.
    pub purpose: String,
    /// Unix seconds after which nothing is issued.
    pub expires_at: Option<i64>,
    /// Seconds without use after which the identity counts as unused.
    pub inactivity_timeout_seconds: Option<i64>,
    /// Lifetime of its JWT-SVIDs, seconds (at most the server's `jwt.max_ttl`); `None`: what the
    /// agent asks for (`[jwt] ttl`).
    pub jwt_ttl_seconds: Option<i64>,
    /// Optional hint.
    pub hint: Option<String>,
    /// Extra DNS SANs.
    pub dns_names: Vec<String>,
    /// 1 on creation, incremented by every update.
    pub revision: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
    /// `standing` or `task`.
    pub activation: String,
    /// Entry ids this entry's tasks may delegate to.
    pub delegates_to: Vec<String>,
    /// `key:value` labels, sorted.
    pub labels: Vec<String>,
}

/// A node's standing with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// Attested; may renew and sync.
    Active,
    /// Its credentials were ended; it may attest again where its method allows.
    Evicted,
    /// Refused for good.
    Banned,
}

impl NodeStatus {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Evicted => "evicted",
            Self::Banned => "banned",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(Self::Active),
            "evicted" => Some(Self::Evicted),
            "banned" => Some(Self::Banned),
            _ => None,
        }
    }
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An attested node as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Node id, the last part of its SPIFFE ID.
    pub id: String,
    /// `join_token` or `x509pop`.
    pub attestation: String,
    /// Node selectors, sorted (e.g. `node:id:...`, `node:label:...`).
    pub selectors: Vec<String>,
    /// Standing.
    pub status: NodeStatus,
    /// Unix seconds of the last successful attestation.
    pub attested_at: i64,
    /// Unix seconds of the last attestation, renewal or sync.
    pub last_seen: i64,
    /// Hex serial of the current node SVID.
    pub svid_serial: String,
    /// Unix seconds.
    pub svid_not_after: i64,
    /// Hex serial of the current intermediate CA.
    pub ca_serial: String,
    /// Unix seconds.
    pub ca_not_after: i64,
}

/// The credentials granted at one renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCredentialsRecord {
    /// Hex serial of the node SVID.
    pub svid_serial: String,
    /// Unix seconds.
    pub svid_not_after: i64,
    /// Hex serial of the intermediate CA.
    pub ca_serial: String,
    /// Unix seconds.
    pub ca_not_after: i64,
}

/// A join token as stored: only its digest, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// Lowercase hex SHA-256 of the token.
    pub digest: String,
    /// Unix seconds after which it is refused.
    pub expires_at: i64,
    /// Become `node:label:<label>` selectors of the node that uses it.
    pub labels: Vec<String>,
    /// Unix seconds.
    pub created_at: i64,
}

/// One JWT-SVID as the inventory knows it, kept from its events like [`SvidRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JwtRecord {
    /// Its `jti`: the key.
    pub jti: String,
    /// The entry it was signed for (the first non-empty one any event named).
    pub entry_id: String,
    /// Its `sub` (likewise).
    pub spiffe_id: String,
    /// The node it was signed for (likewise).
    pub node_id: String,
    /// For a task's token, the task (likewise).
    pub task_id: String,
    /// Its `aud`, from its issuance.
    pub audience: Vec<String>,
    /// When it was signed, Unix milliseconds; `None` until its `jwt_issued` event is stored.
    pub issued_ms: Option<i64>,
    /// Its `exp`, Unix seconds (the first any event gave).
    pub expires_at: Option<i64>,
    /// When it was revoked (the earliest revocation), Unix milliseconds.
    pub revoked_ms: Option<i64>,
    /// Why, from the same revocation.
    pub reason: Option<String>,
    /// The latest use any `jwt_used` event reported, Unix milliseconds.
    pub last_used_ms: Option<i64>,
    /// Uses counted by all its `jwt_used` events.
    pub uses: i64,
}

impl JwtRecord {
    /// Not revoked, and not known to have expired at `now` (Unix seconds).
    pub fn may_be_live(&self, now: i64) -> bool {
        self.revoked_ms.is_none() && self.expires_at.is_none_or(|at| at > now)
    }
}

/// Which JWT-SVIDs [`Datastore::jwts`] returns: those matching every condition given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JwtFilter {
    /// Only tokens of this entry.
    pub entry_id: Option<String>,
    /// Only tokens signed for this node.
    pub node_id: Option<String>,
    /// Only tokens of this task.
    pub task_id: Option<String>,
    /// Only tokens not revoked and not expired at these Unix seconds.
    pub live_at: Option<i64>,
    /// At most this many, newest first; 0, or more than [`MAX_EVENTS_LISTED`]: that many.
    pub limit: usize,
}

/// One JWT-SVID signing key a server replica published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKeyRecord {
    /// The replica that signs with it.
    pub server_id: String,
    /// Its `kid`.
    pub kid: String,
    /// The public key as a JWK (JSON).
    pub jwk: String,
    /// Unix seconds from which the replica signs with it (published ahead of it).
    pub active_from: i64,
    /// Unix seconds after which no token it signed can be live: it leaves the bundle then.
    pub not_after: i64,
}

/// One trust anchor of the trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleRoot {
    /// The replica that owns the root (its id is stable across restarts).
    pub server_id: String,
    /// DER of the root certificate.
    pub der: Vec<u8>,
    /// Unix seconds; the root leaves the bundle after this.
    pub not_after: i64,
}

/// A node intermediate CA a root granted, kept until it expires: eviction revokes it in that
/// root's CRL, and the CRLs the node publishes are checked against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCaRecord {
    /// Lowercase hex serial.
    pub serial: String,
    /// The node it was granted to.
    pub node_id: String,
    /// The replica whose root signed it.
    pub server_id: String,
    /// DER of the certificate.
    pub der: Vec<u8>,
    /// Unix seconds.
    pub not_after: i64,
}

/// A certificate the trust domain revoked, until it expires: an order to the issuer that must
/// list it in its CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRecord {
    /// Lowercase hex serial: the key (revoking again changes nothing).
    pub serial: String,
    /// The node concerned: whose CA issued the SVID, or whose CA this is.
    pub node_id: String,
    /// For a node CA, the replica whose root lists it; `None` for an SVID, which the node's own
    /// CA lists.
    pub root_server_id: Option<String>,
    /// The certificate's not-after, Unix seconds; the record is not served after it.
    pub not_after: i64,
    /// The reason's name (the event model's).
    pub reason: String,
    /// Why, in the words of whoever revoked it.
    pub detail: String,
    /// When, Unix milliseconds.
    pub revoked_ms: i64,
}

/// Whether an entry is dormant (nothing issued) after its inactivity timeout passed, and when
/// an operator last activated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryStanding {
    /// The entry.
    pub entry_id: String,
    /// Since when it is dormant, Unix milliseconds; `None` while active.
    pub dormant_since_ms: Option<i64>,
    /// When `tessera entry activate` last woke it, Unix milliseconds: its inactivity is
    /// counted from then at the earliest.
    pub activated_ms: Option<i64>,
}

/// The latest CRL of one issuer, as the server passes it on to every agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlRecord {
    /// Lowercase hex of the issuer's name (DER): the key.
    pub issuer: String,
    /// Who published it: a node id, or `server:<id>` for a replica's root.
    pub publisher: String,
    /// Its cRLNumber; a CRL replaces the stored one only with a higher number.
    pub number: i64,
    /// Its nextUpdate, Unix seconds.
    pub next_update: i64,
    /// The issuing CA's not-after, Unix seconds: no certificate it signed outlives it, so
    /// neither does the CRL's record.
    pub until: i64,
    /// How many certificates it lists.
    pub revoked: i64,
    /// The CRL, DER.
    pub der: Vec<u8>,
}

/// The kinds of [`EventRecord`], as stored: the event model's names (those of
/// `tessera.v1.EventKind` without their prefix, in lowercase).
pub mod event_kind {
    use crate::events::model::kind_from_name;
    use crate::proto::tessera::EventKind;

    /// True for the kinds the datastore stores (every kind but `unspecified`).
    pub fn is_known(kind: &str) -> bool {
        kind_from_name(kind).is_some()
    }

    /// True for the kinds that concern one SVID, named by its serial, and update the SVID
    /// inventory.
    pub fn is_svid(kind: &str) -> bool {
        matches!(
            kind_from_name(kind),
            Some(EventKind::SvidIssued | EventKind::SvidUsed | EventKind::SvidRevoked)
        )
    }

    /// True for the kinds that concern one JWT-SVID, named by its `jti`, and update the JWT
    /// inventory.
    pub fn is_jwt(kind: &str) -> bool {
        matches!(
            kind_from_name(kind),
            Some(EventKind::JwtIssued | EventKind::JwtUsed | EventKind::JwtRevoked)
        )
    }

    /// A JWT-SVID was handed out or validated: not only by the node it was signed for.
    pub const JWT_USED: &str = "jwt_used";
    /// Kind names for the tests' records.
    #[cfg(test)]
    pub(crate) const JWT_ISSUED: &str = "jwt_issued";
    #[cfg(test)]
    pub(crate) const JWT_REVOKED: &str = "jwt_revoked";

    /// A task began; the task inventory is kept from these and [`TASK_ENDED`].
    pub const TASK_STARTED: &str = "task_started";
    /// A task ended.
    pub const TASK_ENDED: &str = "task_ended";

    /// Kind names for the tests' records.
    #[cfg(test)]
    pub(crate) const SVID_ISSUED: &str = "svid_issued";
    #[cfg(test)]
    pub(crate) const SVID_USED: &str = "svid_used";
    #[cfg(test)]
    pub(crate) const SVID_REVOKED: &str = "svid_revoked";
    #[cfg(test)]
    pub(crate) const ATTESTATION_DENIED: &str = "attestation_denied";
    #[cfg(test)]
    pub(crate) const NODE_ATTESTED: &str = "node_attested";
}

/// One credential event as stored (see `proto/tessera/v1/events.proto` for the meaning of the
/// fields). Text fields that do not apply are empty, numbers that do not apply `None`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventRecord {
    /// Minted by the producer, unique: the idempotency key. Never empty.
    pub id: String,
    /// A kind name of the event model (`events::model::KIND_NAMES`).
    pub kind: String,
    /// When it happened, Unix milliseconds (the producer's clock).
    pub time_ms: i64,
    /// The node that reported it; empty for events the server produced.
    pub node_id: String,
    /// The registration entry concerned, if any.
    pub entry_id: String,
    /// The SPIFFE ID concerned, if any.
    pub spiffe_id: String,
    /// Lowercase hex serial of the SVID concerned; never empty for the SVID kinds
    /// ([`event_kind::is_svid`]).
    pub serial: String,
    /// The SVID's not-after, Unix seconds.
    pub not_after: Option<i64>,
    /// Why an SVID was revoked (`svid_revoked`), e.g. `entry_removed`.
    pub reason: Option<String>,
    /// The calling process, for events about a workload call.
    pub caller: Option<CallerRecord>,
    /// `svid_used`: the aggregation window's first delivery, Unix milliseconds.
    pub first_ms: Option<i64>,
    /// `svid_used`: the window's last delivery, Unix milliseconds (`time_ms` when absent).
    pub last_ms: Option<i64>,
    /// `svid_used`: deliveries in the window, not negative (1 when absent).
    pub count: Option<i64>,
    /// Free text: why an attestation was denied, what an anomaly is about.
    pub detail: String,
    /// When the server received it, Unix milliseconds; set by the server at ingest.
    pub received_ms: i64,
    /// Task events, and issuance and revocation of task SVIDs: the task.
    pub task: Option<EventTask>,
    /// Issuances, task starts and policy refusals: the policy version that decided (0: none set).
    pub policy_version: Option<i64>,
    /// Policy refusals: the ids of the determining policies.
    pub policies: Vec<String>,
    /// The JWT-SVID concerned (`jti`); never empty for the JWT kinds ([`event_kind::is_jwt`]).
    pub jti: String,
    /// `jwt_issued`: the token's audience.
    pub audience: Vec<String>,
}

/// What a task event (or an event about a task SVID) says about its task; stored as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct EventTask {
    /// The task.
    pub task_id: String,
    /// From the root task down to this one: (task id, SPIFFE ID).
    pub chain: Vec<(String, String)>,
    /// What the task is for (`task_started`, `task_ended`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub purpose: String,
    /// Its entry's owner (`task_started`, `task_ended`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
    /// Its process (`task_started`, `task_ended`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pid: i64,
    /// Why it ended (`task_ended`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// One version of the trust domain's authorisation policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyRecord {
    /// 1 for the first policy set, one more for each change.
    pub version: i64,
    /// The Cedar text; empty for a version that cleared the policy (entries alone decide).
    pub text: String,
    /// Lowercase hex SHA-256 of the text.
    pub sha256: String,
    /// Unix milliseconds.
    pub set_ms: i64,
}

/// A task as the server knows it from its nodes' events, and the end it ordered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskRecord {
    /// The key.
    pub task_id: String,
    /// The node whose agent runs it.
    pub node_id: String,
    /// Its task entry.
    pub entry_id: String,
    /// Its own SPIFFE ID.
    pub spiffe_id: String,
    /// The task it was delegated from, if any.
    pub parent_id: Option<String>,
    /// From the root task down to this one: (task id, SPIFFE ID).
    pub chain: Vec<(String, String)>,
    /// What it is for.
    pub purpose: String,
    /// Its entry's owner.
    pub owner: String,
    /// Its process on the node.
    pub pid: i64,
    /// Effective uid of the process that started it, when the start event was stored.
    pub starter_uid: Option<i64>,
    /// Unix milliseconds, when the start event was stored.
    pub started_ms: Option<i64>,
    /// Unix seconds.
    pub deadline: i64,
    /// Unix milliseconds, once ended.
    pub ended_ms: Option<i64>,
    /// Why it ended (a task end reason name).
    pub end_reason: Option<String>,
    /// Unix milliseconds, once the server ordered it ended.
    pub end_ordered_ms: Option<i64>,
    /// The reason of that order.
    pub end_order_reason: Option<String>,
    /// The operator's words for it.
    pub end_order_detail: String,
}

/// What the kernel and `/proc` said about a calling process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CallerRecord {
    /// Process id.
    pub pid: i64,
    /// Effective user id.
    pub uid: i64,
    /// Effective group id.
    pub gid: i64,
    /// Path of the executable.
    pub exe_path: String,
    /// Lowercase hex SHA-256 of the executable.
    pub exe_sha256: String,
    /// systemd unit, or empty.
    pub unit: String,
}

/// The outcome of storing a batch of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoredCount {
    /// Events stored now.
    pub stored: u32,
    /// Events already stored before (retries), or repeated within the batch.
    pub duplicates: u32,
}

/// Which events [`Datastore::list_events`] returns: those matching every condition given.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventFilter {
    /// Only events with `time_ms >= since_ms`.
    pub since_ms: Option<i64>,
    /// Only events with `time_ms < until_ms`.
    pub until_ms: Option<i64>,
    /// Only events of one of these kinds; empty: every kind. An unknown kind is `Invalid`.
    pub kinds: Vec<String>,
    /// Only events about this SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Only events about this entry.
    pub entry_id: Option<String>,
    /// Only events reported by this node (empty: produced by the server).
    pub node_id: Option<String>,
    /// Only events about the SVID with this serial.
    pub serial: Option<String>,
    /// Only events stored after the one at this position: the last `seq` of the previous page.
    pub after_seq: Option<i64>,
    /// At most this many events; 0, or more than [`MAX_EVENTS_LISTED`]: that many.
    pub limit: usize,
    /// The order of the events returned, and so which ones a limit keeps.
    pub order: EventOrder,
}

/// The order in which [`Datastore::list_events`] returns events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventOrder {
    /// By `seq`, the order they were stored: the order to page and tail by (`after_seq`).
    #[default]
    Arrival,
    /// By the event's own time (`time_ms`), then by arrival: the order things happened in, for
    /// people reading a listing. Nodes upload late, so this is not the arrival order.
    EventTime,
}

impl EventOrder {
    /// The SQL `ORDER BY` list, the same for every backend.
    pub(crate) fn sql(self) -> &'static str {
        match self {
            Self::Arrival => "seq",
            Self::EventTime => "time_ms, seq",
        }
    }
}

/// The most events one [`Datastore::list_events`] returns.
pub const MAX_EVENTS_LISTED: usize = 10_000;

/// A stored event with its store-assigned position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position: increasing in the order events were stored (with gaps), never reused.
    pub seq: i64,
    /// The event.
    pub event: EventRecord,
}

/// One SVID as the inventory knows it, maintained from its events. Events about one SVID may
/// arrive in any order, so what no stored event said yet is `None` or empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SvidRecord {
    /// Lowercase hex serial: the key.
    pub serial: String,
    /// The entry it was issued for (the first non-empty one any event named).
    pub entry_id: String,
    /// Its SPIFFE ID (likewise).
    pub spiffe_id: String,
    /// The node that reported it (likewise).
    pub node_id: String,
    /// When it was issued, Unix milliseconds; `None` until its `svid_issued` event is stored.
    pub issued_ms: Option<i64>,
    /// Its not-after, Unix seconds (the first any event gave); `None` while no event gave it.
    pub not_after: Option<i64>,
    /// When it was revoked (the earliest revocation), Unix milliseconds.
    pub revoked_ms: Option<i64>,
    /// Why, from the same revocation.
    pub reason: Option<String>,
    /// The latest delivery any `svid_used` event reported, Unix milliseconds.
    pub last_used_ms: Option<i64>,
    /// Deliveries counted by all its `svid_used` events.
    pub uses: i64,
}

impl SvidRecord {
    /// Not revoked, and not known to have expired at `now` (Unix seconds): what a revocation
    /// must still reach.
    pub fn may_be_live(&self, now: i64) -> bool {
        self.revoked_ms.is_none() && self.not_after.is_none_or(|at| at > now)
    }
}

/// The last issuance and use of an entry's SVIDs, kept when the SVIDs and events are pruned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntryActivity {
    /// The entry.
    pub entry_id: String,
    /// The latest `svid_issued` time, Unix milliseconds.
    pub last_issued_ms: Option<i64>,
    /// The latest delivery any `svid_used` event reported, Unix milliseconds.
    pub last_used_ms: Option<i64>,
}

/// How long the change log keeps a record: a node away longer than this gets its full state
/// when it reconnects. Pruned with the events; the latest record always stays.
pub const CHANGE_LOG_KEEP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What one record of the change log says changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// An entry (key: its id) was created, updated or deleted.
    Entry,
    /// A node (key: its id) was attested or changed status or selectors.
    Node,
    /// An entry's standing (key: the entry id) changed: dormant or awake.
    Standing,
    /// The bundle's roots.
    Bundle,
    /// The JWT signing keys.
    JwtKey,
    /// The CRLs.
    Crl,
    /// The revocation orders of a node (key: the node id).
    Revocation,
    /// The tasks of a node (key: the node id).
    Task,
    /// The authorisation policy.
    Policy,
    /// The JWT-SVID revocations.
    JwtRevocation,
    /// A kind this version does not know (written by a newer replica): readers reload all.
    Unknown(String),
}

impl ChangeKind {
    /// The kind a change log record names.
    pub fn parse(text: &str) -> Self {
        match text {
            "entry" => Self::Entry,
            "node" => Self::Node,
            "standing" => Self::Standing,
            "bundle" => Self::Bundle,
            "jwt_key" => Self::JwtKey,
            "crl" => Self::Crl,
            "revocation" => Self::Revocation,
            "task" => Self::Task,
            "policy" => Self::Policy,
            "jwt_revocation" => Self::JwtRevocation,
            other => Self::Unknown(other.to_owned()),
        }
    }
}

/// One committed change to what sync streams send. The datastore writes these itself (by
/// triggers), in commit order: a reader that has seen revision `r` has seen every change
/// before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// Its position in the log; never reused.
    pub revision: i64,
    /// What changed.
    pub kind: ChangeKind,
    /// The entry or node the change is about (see [`ChangeKind`]); empty for the sections
    /// every node gets.
    pub key: String,
    /// When it was committed, Unix milliseconds.
    pub time_ms: i64,
}

/// The last event a node reported.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeActivity {
    /// The node.
    pub node_id: String,
    /// The latest `time_ms` of the events it reported, Unix milliseconds.
    pub last_event_ms: i64,
}

/// Storage for the server's state, shared by all replicas of one trust domain.
#[async_trait::async_trait]
pub trait Datastore: Send + Sync + 'static {
    /// Stores a new entry with revision 1 and both timestamps `now`. `AlreadyExists` when the id,
    /// or the SPIFFE ID together with the selectors, is taken.
    async fn create_entry(&self, entry: EntryRecord, now: i64) -> Result<EntryRecord, StoreError>;

    /// Replaces the entry with `entry.id` when its stored revision is `entry.revision`; stores it
    /// with the next revision and `updated_at = now`. `NotFound`, `RevisionConflict`, or
    /// `AlreadyExists` when another entry has the same SPIFFE ID and selectors.
    async fn update_entry(&self, entry: EntryRecord, now: i64) -> Result<EntryRecord, StoreError>;

    /// Removes an entry and returns what it was. `NotFound` when absent.
    async fn delete_entry(&self, id: &str) -> Result<EntryRecord, StoreError>;

    /// One entry.
    async fn get_entry(&self, id: &str) -> Result<Option<EntryRecord>, StoreError>;

    /// Every entry, ordered by creation time then id.
    async fn list_entries(&self) -> Result<Vec<EntryRecord>, StoreError>;

    /// Stores a new join token. `AlreadyExists` when its digest is taken.
    async fn create_join_token(&self, token: JoinTokenRecord) -> Result<(), StoreError>;

    /// Spends the join token with `digest` and records `node` as attested by it, in one
    /// transaction: the node's selectors gain `node:label:<label>` for each of the token's
    /// labels, and it is stored as [`Datastore::attest_node`] would. Of two concurrent uses,
    /// exactly one succeeds; the others get `TokenRefused`. When the node cannot be recorded
    /// (`NodeNotActive`, `Unavailable`) the token stays unspent, so the agent can try again.
    async fn join_node(
        &self,
        digest: &str,
        node: NodeRecord,
        now: i64,
    ) -> Result<NodeRecord, StoreError>;

    /// Records a successful attestation: inserts the node, or replaces the record of an active
    /// or evicted one, which becomes active (`node.status` is ignored). `NodeNotActive` (status
    /// banned) for a banned node, which stays banned.
    async fn attest_node(&self, node: NodeRecord) -> Result<NodeRecord, StoreError>;

    /// Records renewed credentials of an active node and its last contact. `NodeNotActive` for
    /// an evicted or banned node, `NotFound` for an unknown one.
    async fn renew_node(
        &self,
        id: &str,
        credentials: NodeCredentialsRecord,
        now: i64,
    ) -> Result<NodeRecord, StoreError>;

    /// Updates a node's last contact (no change notification). `NotFound` for an unknown node.
    async fn touch_node(&self, id: &str, now: i64) -> Result<(), StoreError>;

    /// One node.
    async fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError>;

    /// Every node, ordered by id.
    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;

    /// Sets a node's status. A banned node cannot be set back to evicted or active
    /// (`NodeNotActive` with status banned; banning it again is harmless); `NotFound` for an
    /// unknown node.
    async fn set_node_status(&self, id: &str, status: NodeStatus)
    -> Result<NodeRecord, StoreError>;

    /// Adds `root`; when the same server already published the same DER, only its not-after is
    /// updated, so publishing again is harmless. Every other root stays, older roots of the same
    /// server included, until it expires: agents keep trusting certificates issued under a root
    /// that was rotated out.
    async fn publish_root(&self, root: BundleRoot) -> Result<(), StoreError>;

    /// Every root not expired at `now`, ordered by server id then not-after.
    async fn bundle(&self, now: i64) -> Result<Vec<BundleRoot>, StoreError>;

    /// Adds a JWT signing key to the bundle; publishing the same server's `kid` again only
    /// updates its times.
    async fn publish_jwt_key(&self, key: JwtKeyRecord) -> Result<(), StoreError>;

    /// Every JWT signing key not expired at `now`, ordered by server id then `active_from`.
    async fn jwt_keys(&self, now: i64) -> Result<Vec<JwtKeyRecord>, StoreError>;

    /// The JWT-SVIDs matching `filter`, newest issuance first.
    async fn jwts(&self, filter: JwtFilter) -> Result<Vec<JwtRecord>, StoreError>;

    /// One JWT-SVID by `jti`.
    async fn jwt(&self, jti: &str) -> Result<Option<JwtRecord>, StoreError>;

    /// Every JWT-SVID revoked and not expired at `now` (Unix seconds): `jti` and `exp`.
    async fn jwt_revocations(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError>;

    /// A receiver that changes after every committed change to entries, node status, the
    /// bundle or the JWT revocations, by this replica or any other sharing the database. It may also change without a
    /// change (after a reconnection, when changes may have been missed): readers reload.
    fn changes(&self) -> watch::Receiver<u64>;

    /// The change log after `revision`, in revision order, at most `limit` records.
    async fn changes_after(
        &self,
        revision: i64,
        limit: usize,
    ) -> Result<Vec<ChangeRecord>, StoreError>;

    /// The newest `limit` records of the change log, in revision order.
    async fn recent_changes(&self, limit: usize) -> Result<Vec<ChangeRecord>, StoreError>;

    /// The latest revision of the change log; 0 when nothing was ever logged.
    async fn last_revision(&self) -> Result<i64, StoreError>;

    /// The entries with these ids, in no particular order; ids not stored are left out.
    async fn entries_by_id(&self, ids: &[String]) -> Result<Vec<EntryRecord>, StoreError>;

    /// The nodes with these ids, in no particular order; ids not stored are left out.
    async fn nodes_by_id(&self, ids: &[String]) -> Result<Vec<NodeRecord>, StoreError>;

    /// Stores a batch of events in one transaction, idempotently: an event whose id is already
    /// stored, or repeated within the batch, counts as a duplicate and changes nothing. In the
    /// same transaction, the newly stored events update the inventory: `svid_issued`,
    /// `svid_used` and `svid_revoked` the SVID with their serial (creating its row if no event
    /// about it was stored yet), `svid_issued` and `svid_used` their entry's activity, and every
    /// event its node's activity. `Invalid`, with nothing stored, when any event has an unknown
    /// kind, an empty id, an SVID kind without a serial, or a negative count. After a batch that
    /// stored something, [`Datastore::events_appended`] moves on.
    async fn store_events(&self, events: Vec<EventRecord>) -> Result<StoredCount, StoreError>;

    /// The events matching `filter` (every condition given), ordered by `seq`, at most
    /// `filter.limit` of them. To page or tail, ask again with `after_seq` set to the last `seq`
    /// seen: positions are handed out in commit order, so no event can later appear behind one
    /// already returned.
    async fn list_events(&self, filter: EventFilter) -> Result<Vec<StoredEvent>, StoreError>;

    /// The SVIDs in the inventory, of one entry and/or one node when given, ordered by issuance
    /// (those whose issuance is not known last), then serial.
    async fn svids(
        &self,
        entry_id: Option<&str>,
        node_id: Option<&str>,
    ) -> Result<Vec<SvidRecord>, StoreError>;

    /// The activity of every entry an SVID was issued or used for, ordered by entry id. Entries
    /// without any are absent.
    async fn entry_activity(&self) -> Result<Vec<EntryActivity>, StoreError>;

    /// The activity of every node that reported an event, ordered by node id.
    async fn node_activity(&self) -> Result<Vec<NodeActivity>, StoreError>;

    /// Deletes the events older than `older_than_ms` (by `time_ms`) that concern no SVID still
    /// valid at `now` (Unix seconds): their own not-after is absent or before `now`, and the
    /// inventory does not know their serial with a not-after at or after `now`. Also deletes
    /// from the inventory the SVIDs and JWT-SVIDs that expired before `older_than_ms` (or, of
    /// unknown expiry, with nothing newer than it), the JWT signing keys out of the bundle
    /// before it, the activity of entries and nodes that no longer exist, last active
    /// before it, and the change log's records older than [`CHANGE_LOG_KEEP`] or than it. Works in chunks of a few thousand events, each one
    /// transaction, so ingestion is never held up for long; a failure part-way leaves the
    /// chunks before it done, and calling again finishes the work. Returns the events deleted.
    async fn prune_events(&self, older_than_ms: i64, now: i64) -> Result<u64, StoreError>;

    /// A receiver that changes after every batch of events stored, by this replica or any other
    /// sharing the database (and after a reconnection, when some may have been missed): tailing
    /// readers ask for what follows the last `seq` they saw.
    fn events_appended(&self) -> watch::Receiver<u64>;

    /// The SVID with lowercase hex serial `serial` in the inventory, if any event named it.
    async fn svid(&self, serial: &str) -> Result<Option<SvidRecord>, StoreError>;

    /// Records a node CA granted by a root; recording it again changes nothing.
    async fn record_node_ca(&self, ca: NodeCaRecord) -> Result<(), StoreError>;

    /// The node CAs not expired at `now` (Unix seconds), of one node when given, ordered by
    /// node id then not-after.
    async fn node_cas(
        &self,
        node_id: Option<&str>,
        now: i64,
    ) -> Result<Vec<NodeCaRecord>, StoreError>;

    /// Records revocations in one transaction; a serial already revoked keeps its first record.
    /// Returns the serials this call revoked; when there are any, [`Datastore::changes`] moves
    /// on.
    async fn revoke(&self, records: Vec<RevocationRecord>) -> Result<Vec<String>, StoreError>;

    /// The revocations of certificates not expired at `now` (Unix seconds), ordered by serial.
    async fn revocations(&self, now: i64) -> Result<Vec<RevocationRecord>, StoreError>;

    /// Stores `crl` when no CRL of its issuer is stored or the stored one has a lower number;
    /// returns whether it was stored (then [`Datastore::changes`] moves on).
    async fn put_crl(&self, crl: CrlRecord) -> Result<bool, StoreError>;

    /// The CRLs of issuers not expired at `now` (Unix seconds), ordered by issuer.
    async fn crls(&self, now: i64) -> Result<Vec<CrlRecord>, StoreError>;

    /// Makes entry `entry_id` dormant since `since_ms` unless it already is; returns whether
    /// it became dormant now (then [`Datastore::changes`] moves on).
    async fn set_entry_dormant(&self, entry_id: &str, since_ms: i64) -> Result<bool, StoreError>;

    /// Wakes entry `entry_id` at `now_ms`: no longer dormant, its inactivity counted from now.
    /// Returns whether it was dormant; [`Datastore::changes`] moves on either way.
    async fn activate_entry(&self, entry_id: &str, now_ms: i64) -> Result<bool, StoreError>;

    /// The standing of every entry that was ever dormant or activated, ordered by entry id.
    async fn entry_standings(&self) -> Result<Vec<EntryStanding>, StoreError>;

    /// Stores `text` as the next version of the policy (empty: the policy is cleared) at
    /// `now_ms`, unless it equals the current version's text; returns the current version.
    /// Then [`Datastore::changes`] moves on. Two replicas setting at once: one of them gets
    /// `RevisionConflict` and may try again.
    async fn set_policy(&self, text: &str, now_ms: i64) -> Result<PolicyRecord, StoreError>;

    /// The current policy version; `None` before any was set.
    async fn policy(&self) -> Result<Option<PolicyRecord>, StoreError>;

    /// Every policy version, oldest first.
    async fn policy_history(&self) -> Result<Vec<PolicyRecord>, StoreError>;

    /// Tasks, live ones only when `live_only` (not ended, whatever was ordered), ordered by
    /// start (tasks whose start is not known last), then id.
    async fn tasks(&self, live_only: bool) -> Result<Vec<TaskRecord>, StoreError>;

    /// One task.
    async fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError>;

    /// Orders task `task_id` and every live task delegated from it ended, for `reason` with
    /// the operator's `detail`, at `now_ms`; a task already ordered keeps its first order.
    /// Returns the tasks newly ordered; `NotFound` when no such task is known. Then
    /// [`Datastore::changes`] moves on.
    async fn order_task_end(
        &self,
        task_id: &str,
        reason: &str,
        detail: &str,
        now_ms: i64,
    ) -> Result<Vec<TaskRecord>, StoreError>;
}

/// Sorts and de-duplicates selectors, the canonical form stored and compared for uniqueness.
pub fn canonical(mut selectors: Vec<String>) -> Vec<String> {
    selectors.sort();
    selectors.dedup();
    selectors
}
