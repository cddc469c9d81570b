//! tessera: workload identity for autonomous software.
//!
//! A node agent serves the SPIFFE Workload API on a Unix socket, attests every caller by what the
//! kernel says about it, and issues short-lived X.509-SVIDs that rotate before they expire. A
//! server holds the trust root, attests nodes, grants each an intermediate CA, keeps the
//! registration inventory, pushes entry changes to agents and stores the audit trail of every
//! credential.
//!
//! # Layout
//!
//! - [`spiffe`]: `SpiffeId` and `TrustDomain`, parsed strictly per the SPIFFE-ID standard.
//! - [`attest`]: peer credentials and pidfd pinning at accept, /proc facts, executable hashing,
//!   selectors.
//! - `entry` (crate-private): registration entries (who may be what, owned by whom, for what, until
//!   when) and matching callers against them.
//! - [`ca`]: the signing CA, X509-SVID minting, the standalone self-signed CA, node SVIDs and node
//!   intermediate CAs, CRLs.
//! - `clock` (crate-private): wall-clock instants as records carry them (Unix seconds).
//! - `config` (crate-private): what the agent's and the server's configuration files share.
//! - `durable` (crate-private): replacing a state file atomically and durably (rename, then
//!   directory fsync).
//! - `policy` (crate-private): Cedar authorisation policies (issue, start a task, delegate):
//!   tessera's schema, loading and validating a policy set, and deciding one request.
//! - [`events`]: credential lifecycle events: the shared model, the agent's recorder and its
//!   durable spool.
//! - [`agent`]: the node agent: configuration, entry source (file or server), identity cache and
//!   rotation, task credentials (the task registry and the Tasks service), the Workload API
//!   service, the socket endpoint, the server link and event uploader, and `app::build`, the
//!   composition root.
//! - `server` (crate-private): the trust domain's server: root CA, node API (attestation, renewal,
//!   sync, events), admin API, snapshot fan-out, and `app::build`.
//! - `runtime` (crate-private): what both roles are built from: the shutdown signal, the task
//!   supervisor, the retry backoff, the accept loop, wall-clock waits, socket binding and
//!   sd_notify.
//! - `store` (crate-private): the server's datastore trait with its SQLite and PostgreSQL backends.
//! - [`tls`]: rustls between agents and servers, peers identified by SPIFFE ID.
//! - [`verify`]: what a relying party checks before accepting an X.509-SVID: chain, SPIFFE ID,
//!   validity and revocation in the CRLs given.
//! - [`cli`]: the `tessera` command line: `agent`, `server`, `entry`, `token`, `node`, `bundle`,
//!   `events`, `inventory`, `svid`, `task`, `dev`.
//! - [`proto`]: code generated from `proto/`.
//!
//! ARCHITECTURE.md's "Layering" says which of these may use which (a unit test holds the code to
//! it). The benchmark harness is the workspace member `tessera-bench` (`bench/`), so that this
//! library and the `tessera` binary carry none of its plotting crates.

pub mod agent;
pub mod attest;
pub mod ca;
pub mod cli;
pub(crate) mod clock;
pub(crate) mod config;
pub(crate) mod durable;
pub(crate) mod entry;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
#[cfg(test)]
mod layering;
pub mod policy;
pub(crate) mod runtime;
pub(crate) mod server;
pub mod spiffe;
pub(crate) mod store;
pub mod tls;
pub mod verify;

/// Code generated from the `.proto` files.
pub mod proto {
    /// The SPIFFE Workload API (no protobuf package, service `SpiffeWorkloadAPI`).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod workload {
        tonic::include_proto!("workload");
    }

    /// tessera's own services: the node API (agent to server) and the admin API (CLI to server).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod tessera {
        tonic::include_proto!("tessera.v1");

        // A join token admits a node once: it never appears in Debug output or logs.
        impl std::fmt::Debug for JoinToken {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("JoinToken")
                    .field("token", &"<redacted>")
                    .field("expires_at", &self.expires_at)
                    .field("labels", &self.labels)
                    .finish()
            }
        }

        impl std::fmt::Debug for JoinTokenAttestation {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("JoinTokenAttestation")
                    .field("token", &"<redacted>")
                    .finish()
            }
        }
    }

    /// Encoded descriptors of the Workload API, for gRPC server reflection.
    pub const WORKLOAD_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("workload_descriptor");
}
