//! The trust domain's server: root CA, node attestation, per-node intermediate CAs, the
//! registration inventory, and live sync of entries to agents.

pub mod admin_api;
pub mod app;
pub mod config;
pub mod jwt;
pub mod node_api;
pub mod policy;
pub mod revocation;
pub mod root;
pub mod sync;
pub mod tasks;
#[cfg(test)]
mod testing;

use std::sync::Arc;

use rustls::server::danger::ClientCertVerifier;
use tokio::sync::watch;

pub use app::{ServerError, build};
pub use config::ServerConfig;

use crate::ca::SigningCa;
use crate::store::Datastore;
use sync::Snapshot;

/// What every request handler of one server replica shares. Lives as long as the server.
pub struct State {
    /// The checked configuration.
    pub config: ServerConfig,
    /// Entries, nodes, tokens and the bundle, shared with the other replicas.
    pub store: Arc<dyn Datastore>,
    /// This replica's root CA; signs node SVIDs, node CAs, the serving certificate and the
    /// root CRL.
    pub root: SigningCa,
    /// This replica's stable id: whose root granted a node CA, and so whose CRL revokes it.
    pub server_id: String,
    /// Verifies x509pop node certificates; `None` when x509pop is not enabled.
    pub x509pop: Option<Arc<dyn ClientCertVerifier>>,
    /// The latest entries, nodes and bundle, republished after every datastore change.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Triggered when the server starts draining.
    pub shutdown: crate::runtime::Shutdown,
    /// When each node's contact was last written, so that a busy node costs few writes.
    pub contacts: node_api::Contacts,
    /// The open sync streams, woken by the snapshot hub when a change concerns their node.
    pub wakers: Arc<sync::Wakers>,
    /// Signs JWT-SVIDs; its keys rotate in a task of their own.
    pub jwt: Arc<jwt::JwtSigner>,
}
