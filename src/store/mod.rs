//! The server's datastore: one [`Datastore`] trait, two real backends. SQLite ([`sqlite`]) is
//! embedded and the default; PostgreSQL ([`postgres`]) lets several server replicas share one
//! database. Both apply versioned migrations to the same schema and pass the same test suite
//! (`suite`, built with the tests).
//!
//! Records hold plain values (strings, Unix seconds); the server checks them before they get
//! here. Every write is one transaction: an outage mid-operation leaves nothing half-written.
//! After every committed change to entries, node status or the bundle, every replica's
//! [`Datastore::changes`] receiver moves on, so each can push the change to its agents.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

mod codec;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod suite;

/// Why a datastore operation failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The database cannot be reached or failed mid-operation; nothing was changed. Retry later.
    #[error("datastore unavailable: {0}")]
    Unavailable(String),
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
    #[error("datastore holds an unreadable record: {0}")]
    Corrupt(String),
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

    /// Marks the token with `digest` used by `node_id` and returns its labels, in one atomic
    /// step: of two concurrent uses, exactly one succeeds. `TokenRefused` otherwise.
    async fn consume_join_token(
        &self,
        digest: &str,
        node_id: &str,
        now: i64,
    ) -> Result<Vec<String>, StoreError>;

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

    /// A receiver that changes after every committed change to entries, node status or the
    /// bundle, by this replica or any other sharing the database. It may also change without a
    /// change (after a reconnection, when changes may have been missed): readers reload.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    unix_seconds(SystemTime::now())
}

/// `t` as seconds since the Unix epoch (0 for earlier instants).
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Sorts and de-duplicates selectors, the canonical form stored and compared for uniqueness.
pub fn canonical(mut selectors: Vec<String>) -> Vec<String> {
    selectors.sort();
    selectors.dedup();
    selectors
}
