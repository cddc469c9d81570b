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
//! - [`jwt`]: JWT-SVIDs: the ES256 signing key and its JWK, JWT bundles (JWK Sets), minting a
//!   token and validating one per the JWT-SVID standard.
//! - [`events`]: credential lifecycle events: the shared model, the agent's recorder and its
//!   durable spool.
//! - [`agent`]: the node agent: configuration, entry source (file or server), identity cache and
//!   rotation, task credentials (the task registry and the Tasks service), the Workload API
//!   service, Envoy's Secret Discovery Service beside it, the socket endpoint, the server link and event uploader, and `app::build`, the
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
//!   `events`, `inventory`, `svid`, `jwt`, `wit`, `task`, `policy`, `dev`.
//! - [`proto`]: code generated from `proto/`: the Workload API, tessera's services, and the part
//!   of Envoy's API that SDS uses.
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
pub mod jwt;
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

    /// Protobuf messages over gRPC, as tonic's own codec, with 1 KiB buffers instead of 8 KiB.
    ///
    /// A stream's decode buffer lives as long as the stream and its encode buffer keeps the size
    /// of its largest message: for thousands of long-lived streams (the Workload API's, SDS's)
    /// whose messages are a few KiB and whose requests a few hundred bytes, the default sizes are
    /// a large part of what a stream costs.
    #[derive(Debug)]
    pub struct SmallBufferCodec<T, U>(std::marker::PhantomData<(T, U)>);

    impl<T, U> Default for SmallBufferCodec<T, U> {
        fn default() -> Self {
            Self(std::marker::PhantomData)
        }
    }

    impl<T, U> SmallBufferCodec<T, U> {
        /// 1 KiB to start with; a message is encoded whole before the yield threshold applies.
        const SETTINGS: (usize, usize) = (1024, 32 * 1024);

        fn settings() -> tonic::codec::BufferSettings {
            tonic::codec::BufferSettings::new(Self::SETTINGS.0, Self::SETTINGS.1)
        }
    }

    impl<T, U> tonic::codec::Codec for SmallBufferCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = tonic_prost::ProstEncoder<T>;
        type Decoder = tonic_prost::ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            tonic_prost::ProstEncoder::new(Self::settings())
        }

        fn decoder(&mut self) -> Self::Decoder {
            tonic_prost::ProstDecoder::new(Self::settings())
        }
    }

    /// Envoy's Secret Discovery Service: the subset of Envoy's API that SDS uses, in Envoy's
    /// packages (the generated code refers across them by relative paths).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod envoy {
        pub mod config {
            pub mod core {
                pub mod v3 {
                    tonic::include_proto!("envoy.config.core.v3");
                }
            }
        }
        pub mod service {
            pub mod discovery {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.discovery.v3");
                }
            }
            pub mod secret {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.secret.v3");
                }
            }
        }
        pub mod extensions {
            pub mod transport_sockets {
                pub mod tls {
                    pub mod v3 {
                        tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");

                        // A certificate's private key never appears in Debug output or logs.
                        impl std::fmt::Debug for TlsCertificate {
                            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                                f.debug_struct("TlsCertificate")
                                    .field("certificate_chain", &self.certificate_chain)
                                    .field("private_key", &"<redacted>")
                                    .finish()
                            }
                        }
                    }
                }
            }
        }
    }

    /// `google.rpc.Status`, which an xDS client attaches to a NACK.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod google {
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }

    /// Encoded descriptors of the Workload API, for gRPC server reflection.
    pub const WORKLOAD_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("workload_descriptor");
}
