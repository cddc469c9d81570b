//! Server mode: the agent's link to its server. Attests the node, keeps its node SVID and
//! intermediate CA renewed at half-life, holds one sync stream, and publishes what it learns
//! through the agent's two seams (the entry set and the signing CA). Everything learned is kept
//! on disk, so that a restart while the server is down still serves until the intermediate
//! expires.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{KeyPair, PublicKeyData, SigningKey};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::Code;
use zeroize::Zeroizing;

use super::config::{NodeAttestation, UpstreamConfig};
use crate::ca::node::{
    key_and_csr, not_after_of, server_spiffe_id, signing_ca_from_grant, x509pop_message,
};
use crate::ca::{
    CaError, SigningCa, certificates_from_pem, load_pem_certs, to_pem, write_atomically,
};
use crate::entry::{EntryFields, EntrySet, MAX_X509_TTL, RegistrationEntry};
use crate::policy::PolicySet;
use crate::proto::tessera::node_client::NodeClient;
use crate::proto::tessera::{
    AttestRequest, CrlSet, Csrs, Entry, JoinTokenAttestation, NodeCredentials, RenewRequest,
    RevocationOrders, RevocationReason, SyncRequest, SyncUpdate, TaskEndOrders, TaskEndReason,
    X509PopAttestation, X509PopProof, attest_request, attest_response,
};
use crate::runtime::{Backoff, Shutdown, wait_until_wall_time};
use crate::spiffe::TrustDomain;

const NODE_SVID_FILE: &str = "node_svid.pem";
const NODE_SVID_KEY_FILE: &str = "node_svid_key.pem";
const NODE_CA_FILE: &str = "node_ca.pem";
const NODE_CA_KEY_FILE: &str = "node_ca_key.pem";
const BUNDLE_FILE: &str = "bundle.pem";
const ENTRIES_FILE: &str = "entries.json";
/// The server's policy as last synced: `{"version": N, "text": "..."}`.
const POLICY_FILE: &str = "policy.json";

/// The policy as kept on disk.
#[derive(Debug, Serialize, Deserialize)]
struct StoredPolicy {
    version: u64,
    text: String,
}
const NODE_ID_FILE: &str = "node_id";
/// What a node's credentials are kept in; all or none of them make a usable state.
const CREDENTIAL_FILES: [&str; 5] = [
    NODE_SVID_FILE,
    NODE_SVID_KEY_FILE,
    NODE_CA_FILE,
    NODE_CA_KEY_FILE,
    NODE_ID_FILE,
];
/// Reconnection backoff bounds.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The pause after the server refused the node (a bad token, an untrusted certificate):
/// retrying sooner would only fill the server's audit log.
const REFUSED_PAUSE: Duration = Duration::from_secs(30);

/// Why the link to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The server refused the node for good (bad token, untrusted certificate, banned...).
    #[error("server refused the node: {}", status_text(.0))]
    Refused(#[source] tonic::Status),
    /// The server could not be reached or failed; worth retrying.
    #[error("server unavailable: {}", status_text(.0))]
    Unavailable(#[source] tonic::Status),
    /// The server answered outside the protocol (what it did, in words); worth retrying.
    #[error("server unavailable: {0}")]
    Protocol(&'static str),
    /// The server asked for a proof the configured attestation method cannot give.
    #[error("server refused the node: it sent an x509pop challenge to a join-token attestation")]
    UnexpectedChallenge,
    /// The node was evicted or banned.
    #[error("node no longer admitted: {}", status_text(.0))]
    Evicted(#[source] tonic::Status),
    /// The agent was stopped before the node was attested.
    #[error("stopped before the node was attested")]
    Stopped,
    /// A configured file or the server address could not be used.
    #[error("{setting}: {source}")]
    Setting {
        /// The configuration key, with the file where there is one.
        setting: String,
        /// What was wrong with it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Keys, certificates or the node state on disk could not be made or written.
    #[error("{0}")]
    Local(#[from] CaError),
    /// The node state could not be used to open a connection (its key or TLS settings).
    #[error("node SVID for TLS: {0}")]
    ClientTls(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The blocking-pool task writing the node state panicked or was cancelled.
    #[error("writing the node state failed: {0}")]
    StateTask(#[source] tokio::task::JoinError),
    /// The node credentials on disk do not fit together (a crash between writing a key and its
    /// certificate, or files removed by hand), and a join token cannot attest the node again.
    #[error(
        "the node state in {} is unusable: {problem}. This node joined with a join token, which is spent after one use: create a new token on the server (`tessera token create`), put it in server.join_token, remove {}, and start the agent again",
        dir.display(),
        files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    UnusableState {
        /// The node state directory.
        dir: PathBuf,
        /// What does not fit.
        #[source]
        problem: StateProblem,
        /// The files to remove before joining again.
        files: Vec<PathBuf>,
    },
}

/// What is wrong with the node credentials on disk; file names are relative to the node state
/// directory, which the message around this one names.
#[derive(Debug, thiserror::Error)]
pub enum StateProblem {
    /// Some credential files are there, these are not.
    #[error("{} missing", .0.join(", "))]
    Missing(Vec<&'static str>),
    /// A file cannot be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: &'static str,
        /// The error from the system.
        #[source]
        source: std::io::Error,
    },
    /// A certificate file is not PEM.
    #[error("{file} is not PEM: {source}")]
    Pem {
        /// The file.
        file: &'static str,
        /// What the PEM reader refused.
        #[source]
        source: pem::PemError,
    },
    /// A certificate file (or the bundle) holds no CERTIFICATE block.
    #[error("{file} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        file: &'static str,
    },
    /// A key file is not a PEM PKCS#8 private key.
    #[error("{file} is not a PEM PKCS#8 private key ({source})")]
    Key {
        /// The file.
        file: &'static str,
        /// What the key reader refused.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate file holds something that is not an X.509 certificate.
    #[error("{file} is not an X.509 certificate ({source})")]
    Certificate {
        /// The file.
        file: &'static str,
        /// What the certificate parser refused.
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// A key is not the one its certificate certifies (a crash between two renames).
    #[error("{key} does not match the public key in {certificate}")]
    Mismatch {
        /// The key file.
        key: &'static str,
        /// The certificate file.
        certificate: &'static str,
    },
}

impl UpstreamError {
    /// A configured file or address that could not be used.
    fn setting(
        setting: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Setting {
            setting: setting.into(),
            source: source.into(),
        }
    }

    /// Whether the server is worth trying again soon (not a refusal, nothing wrong locally).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Protocol(_))
    }
}

fn status_error(status: tonic::Status) -> UpstreamError {
    match status.code() {
        Code::PermissionDenied => UpstreamError::Evicted(status),
        Code::Unauthenticated | Code::InvalidArgument | Code::FailedPrecondition => {
            UpstreamError::Refused(status)
        }
        _ => UpstreamError::Unavailable(status),
    }
}

/// A status as one line: its code and message (tonic's own form adds details and metadata).
fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// A node's granted credentials, with the keys they certify.
pub struct Credentials {
    /// The node id.
    pub node_id: String,
    /// DER node SVID.
    pub svid_der: Vec<u8>,
    /// PEM PKCS#8 key of the node SVID.
    pub svid_key_pem: Zeroizing<String>,
    /// DER node intermediate CA.
    pub ca_der: Vec<u8>,
    /// PEM PKCS#8 key of the node CA.
    pub ca_key_pem: Zeroizing<String>,
    /// DER roots.
    pub bundle: Vec<Vec<u8>>,
}

impl Credentials {
    /// The signing CA these credentials make.
    pub fn signing_ca(&self) -> Result<SigningCa, CaError> {
        let key = KeyPair::from_pem(&self.ca_key_pem)?;
        signing_ca_from_grant(&self.ca_der, key, self.bundle.clone())
    }

    /// When to renew: at half of the shorter-lived of the node SVID and the node CA; `now`
    /// when neither certificate can be read.
    pub fn renew_at(&self, now: SystemTime) -> SystemTime {
        [&self.svid_der, &self.ca_der]
            .iter()
            .filter_map(|der| half_life(der))
            .min()
            .unwrap_or(now)
    }
}

fn svid_expired(credentials: &Credentials, now: SystemTime) -> bool {
    not_after_of(&credentials.svid_der).is_none_or(|t| t <= now)
}

fn half_life(der: &[u8]) -> Option<SystemTime> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let start = cert.validity().not_before.timestamp().max(0) as u64;
    let end = cert.validity().not_after.timestamp().max(0) as u64;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(start + end.saturating_sub(start) / 2))
}

/// One synced entry, as kept on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct StoredEntry {
    id: String,
    spiffe_id: String,
    selectors: Vec<String>,
    x509_ttl_seconds: i64,
    owner: String,
    purpose: String,
    expires_at: Option<i64>,
    hint: String,
    dns_names: Vec<String>,
    revision: i64,
    created_at: i64,
    // Absent from files written before tasks existed.
    #[serde(default)]
    activation: String,
    #[serde(default)]
    delegates_to: Vec<String>,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    jwt_ttl_seconds: Option<i64>,
}

impl From<&Entry> for StoredEntry {
    fn from(e: &Entry) -> Self {
        Self {
            id: e.id.clone(),
            spiffe_id: e.spiffe_id.clone(),
            selectors: e.selectors.clone(),
            x509_ttl_seconds: e.x509_ttl_seconds,
            owner: e.owner.clone(),
            purpose: e.purpose.clone(),
            expires_at: e.expires_at,
            hint: e.hint.clone(),
            dns_names: e.dns_names.clone(),
            revision: e.revision,
            created_at: e.created_at,
            activation: e.activation.clone(),
            delegates_to: e.delegates_to.clone(),
            labels: e.labels.clone(),
            jwt_ttl_seconds: e.jwt_ttl_seconds,
        }
    }
}

impl StoredEntry {
    fn to_registration(&self, trust_domain: &TrustDomain) -> Option<RegistrationEntry> {
        let fields = EntryFields {
            id: Some(self.id.clone()),
            spiffe_id: self.spiffe_id.clone(),
            selectors: self.selectors.clone(),
            x509_ttl: Duration::from_secs(u64::try_from(self.x509_ttl_seconds).ok()?),
            jwt_ttl: self
                .jwt_ttl_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
            owner: self.owner.clone(),
            purpose: self.purpose.clone(),
            expires_at: self
                .expires_at
                .map(|at| SystemTime::UNIX_EPOCH + Duration::from_secs(at.max(0) as u64)),
            hint: Some(self.hint.clone()).filter(|h| !h.is_empty()),
            dns_names: self.dns_names.clone(),
            activation: Some(self.activation.clone()),
            delegates_to: self.delegates_to.clone(),
            labels: self.labels.clone(),
        };
        match fields.check(trust_domain, MAX_X509_TTL) {
            Ok(entry) => Some(entry),
            Err(e) => {
                tracing::warn!(entry = %self.id, error = %e, "entry from the server cannot be served; left out");
                None
            }
        }
    }
}

/// The agent's state kept on disk in server mode.
#[derive(Clone)]
pub struct DiskState {
    dir: PathBuf,
}

impl DiskState {
    /// State under `state_dir/upstream`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("upstream"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Saves credentials (keys 0600) atomically, file by file; the CA key goes before its
    /// certificate so that a crash never pairs a certificate with the wrong key on load.
    pub fn save_credentials(&self, c: &Credentials) -> Result<(), CaError> {
        create_private_dir(&self.dir)?;
        write_atomically(
            &self.path(NODE_SVID_KEY_FILE),
            c.svid_key_pem.as_bytes(),
            0o600,
        )?;
        write_atomically(
            &self.path(NODE_SVID_FILE),
            to_pem("CERTIFICATE", &[&c.svid_der]).as_bytes(),
            0o644,
        )?;
        write_atomically(&self.path(NODE_CA_KEY_FILE), c.ca_key_pem.as_bytes(), 0o600)?;
        write_atomically(
            &self.path(NODE_CA_FILE),
            to_pem("CERTIFICATE", &[&c.ca_der]).as_bytes(),
            0o644,
        )?;
        self.save_bundle(&c.bundle)?;
        write_atomically(&self.path(NODE_ID_FILE), c.node_id.as_bytes(), 0o644)
    }

    fn save_bundle(&self, bundle: &[Vec<u8>]) -> Result<(), CaError> {
        create_private_dir(&self.dir)?;
        write_atomically(
            &self.path(BUNDLE_FILE),
            to_pem("CERTIFICATE", bundle).as_bytes(),
            0o644,
        )
    }

    /// Forgets the credentials (after eviction).
    pub fn remove_credentials(&self) {
        for name in CREDENTIAL_FILES.iter().chain([&ENTRIES_FILE]) {
            let _ = std::fs::remove_file(self.path(name));
        }
        // Make the removals durable, or a power loss could bring back the forgotten node.
        if let Err(e) = crate::durable::sync_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot sync the node state directory");
        }
    }

    /// Loads saved credentials: `None` when there are none, an error saying what does not fit
    /// when some files are missing, unreadable, or a key does not match its certificate (what a
    /// crash between two of the renames in [`DiskState::save_credentials`] leaves).
    pub fn load_credentials(&self) -> Result<Option<Credentials>, StateProblem> {
        let present: Vec<&str> = CREDENTIAL_FILES
            .iter()
            .copied()
            .filter(|name| self.path(name).exists())
            .collect();
        if present.is_empty() {
            return Ok(None);
        }
        if present.len() < CREDENTIAL_FILES.len() {
            let missing = CREDENTIAL_FILES
                .iter()
                .copied()
                .filter(|name| !present.contains(name))
                .collect();
            return Err(StateProblem::Missing(missing));
        }
        let read = |file: &'static str| {
            std::fs::read_to_string(self.path(file))
                .map_err(|source| StateProblem::Read { file, source })
        };
        let certs = |file: &'static str| {
            let certs = certificates_from_pem(read(file)?)
                .map_err(|source| StateProblem::Pem { file, source })?;
            if certs.is_empty() {
                return Err(StateProblem::NoCertificate { file });
            }
            Ok(certs)
        };
        let cert = |file: &'static str| {
            certs(file)?
                .into_iter()
                .next()
                .ok_or(StateProblem::NoCertificate { file })
        };
        let credentials = Credentials {
            node_id: read(NODE_ID_FILE)?.trim().to_owned(),
            svid_der: cert(NODE_SVID_FILE)?,
            svid_key_pem: Zeroizing::new(read(NODE_SVID_KEY_FILE)?),
            ca_der: cert(NODE_CA_FILE)?,
            ca_key_pem: Zeroizing::new(read(NODE_CA_KEY_FILE)?),
            bundle: certs(BUNDLE_FILE)?,
        };
        check_key_matches(
            &credentials.svid_key_pem,
            NODE_SVID_KEY_FILE,
            &credentials.svid_der,
            NODE_SVID_FILE,
        )?;
        check_key_matches(
            &credentials.ca_key_pem,
            NODE_CA_KEY_FILE,
            &credentials.ca_der,
            NODE_CA_FILE,
        )?;
        Ok(Some(credentials))
    }

    /// The credential files, for messages.
    fn credential_paths(&self) -> Vec<PathBuf> {
        CREDENTIAL_FILES
            .iter()
            .map(|name| self.path(name))
            .collect()
    }

    fn load_bundle(&self) -> Option<Vec<Vec<u8>>> {
        load_pem_certs(&self.path(BUNDLE_FILE))
            .ok()
            .filter(|b| !b.is_empty())
    }

    fn save_entries(&self, entries: &[StoredEntry]) -> Result<(), CaError> {
        let json = serde_json::to_vec_pretty(entries).map_err(|e| CaError::BadFile {
            path: self.path(ENTRIES_FILE).display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomically(&self.path(ENTRIES_FILE), &json, 0o600)
    }

    fn save_policy(&self, policy: &StoredPolicy) -> Result<(), CaError> {
        create_private_dir(&self.dir)?;
        let json = serde_json::to_vec_pretty(policy).map_err(|e| CaError::BadFile {
            path: self.path(POLICY_FILE).display().to_string(),
            reason: e.to_string(),
        })?;
        write_atomically(&self.path(POLICY_FILE), &json, 0o600)
    }

    /// The policy last synced, parsed; `None` when none was, or it cannot be read (logged).
    fn load_policy(&self) -> Option<Arc<PolicySet>> {
        let path = self.path(POLICY_FILE);
        let bytes = std::fs::read(&path).ok()?;
        let stored: StoredPolicy = match serde_json::from_slice(&bytes) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "saved policy unreadable; serving without one until the server sends it");
                return None;
            }
        };
        if stored.text.is_empty() {
            return None;
        }
        match PolicySet::parse(
            &stored.text,
            stored.version,
            &format!("policy version {}", stored.version),
        ) {
            Ok(set) => Some(Arc::new(set)),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "saved policy does not load; serving without one until the server sends it");
                None
            }
        }
    }

    fn load_entries(&self) -> Vec<StoredEntry> {
        let path = self.path(ENTRIES_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "synced entries unreadable; starting without them");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }
}

/// Checks that the private key in `key_pem` (from `key_name`) is the one `cert_der` (from
/// `cert_name`) certifies.
fn check_key_matches(
    key_pem: &str,
    key_name: &'static str,
    cert_der: &[u8],
    cert_name: &'static str,
) -> Result<(), StateProblem> {
    use x509_parser::prelude::*;
    let key = KeyPair::from_pem(key_pem).map_err(|source| StateProblem::Key {
        file: key_name,
        source,
    })?;
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|source| StateProblem::Certificate {
            file: cert_name,
            source,
        })?;
    if cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
        return Err(StateProblem::Mismatch {
            key: key_name,
            certificate: cert_name,
        });
    }
    Ok(())
}

/// Runs `write` (file writes and their fsyncs) on the blocking pool: a slow disk then holds up
/// no async worker, and with it no Workload API call.
async fn on_blocking_pool<T: Send + 'static>(
    write: impl FnOnce() -> Result<T, CaError> + Send + 'static,
) -> Result<T, UpstreamError> {
    match tokio::task::spawn_blocking(write).await {
        Ok(result) => Ok(result?),
        Err(e) => Err(UpstreamError::StateTask(e)),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| crate::ca::io_error(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| crate::ca::io_error(dir, e))
}

/// A source of wall-clock time. Renewal follows the credentials' validity, which is wall-clock
/// time, so the link reads this rather than `SystemTime::now` itself: a test can then move it
/// with tokio's paused clock and watch the schedule without waiting for it.
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The link to the server, with what the agent has learned so far.
pub struct Upstream {
    config: UpstreamConfig,
    trust_domain: TrustDomain,
    disk: DiskState,
    /// Synced entries, sorted by creation then id (the order workloads see).
    entries: Vec<StoredEntry>,
    /// The server's change log revision `entries` are at, from the last sync message applied
    /// since this process last attested; 0 when unknown. A new sync stream asks to catch up
    /// from it instead of being sent everything.
    synced_revision: i64,
    /// What "now" is for expiry and renewal.
    clock: WallClock,
}

impl Upstream {
    /// A link configured by `config`, with state under `state_dir`.
    pub fn new(config: UpstreamConfig, trust_domain: TrustDomain, state_dir: &Path) -> Self {
        let disk = DiskState::new(state_dir);
        let entries = disk.load_entries();
        Self {
            config,
            trust_domain,
            disk,
            entries,
            synced_revision: 0,
            clock: Arc::new(SystemTime::now),
        }
    }

    /// The same link, reading the time from `clock` instead of the system's.
    pub fn with_clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// The policy as last synced (from disk): what the agent enforces while the server is away.
    pub fn saved_policy(&self) -> Option<Arc<PolicySet>> {
        self.disk.load_policy()
    }

    /// The entry set as last synced (from disk at start).
    pub fn entry_set(&self) -> EntrySet {
        EntrySet::new(
            self.entries
                .iter()
                .filter_map(|e| e.to_registration(&self.trust_domain))
                .collect(),
        )
    }

    /// Saved credentials whose CA is still valid.
    pub fn saved_credentials(&self) -> Option<Credentials> {
        self.load_saved().ok().flatten()
    }

    /// Saved credentials whose CA is still valid; `None` when the node must attest. Credentials
    /// that do not fit together are logged and left for attestation to replace with x509pop; with
    /// a join token, which cannot attest again, they are an error that says what to do.
    pub fn load_saved(&self) -> Result<Option<Credentials>, UpstreamError> {
        let credentials = match self.disk.load_credentials() {
            Ok(Some(credentials)) => credentials,
            Ok(None) => return Ok(None),
            Err(problem) => {
                if let NodeAttestation::X509Pop { .. } = self.config.attestation {
                    tracing::warn!(dir = %self.disk.dir.display(), %problem,
                        "the saved node credentials are unusable; attesting again with x509pop");
                    return Ok(None);
                }
                return Err(UpstreamError::UnusableState {
                    dir: self.disk.dir.clone(),
                    problem,
                    files: self.disk.credential_paths(),
                });
            }
        };
        let ca_valid = not_after_of(&credentials.ca_der).is_some_and(|t| t > self.now());
        Ok(ca_valid.then_some(credentials))
    }

    fn roots_for_server(
        &self,
        credentials: Option<&Credentials>,
    ) -> Result<Vec<Vec<u8>>, UpstreamError> {
        if let Some(c) = credentials {
            return Ok(c.bundle.clone());
        }
        if let Some(bundle) = self.disk.load_bundle() {
            return Ok(bundle);
        }
        load_pem_certs(&self.config.trust_bundle_file)
            .map_err(|e| UpstreamError::setting("server.trust_bundle_file", e))
    }

    fn client(
        &self,
        credentials: Option<&Credentials>,
    ) -> Result<NodeClient<tonic::transport::Channel>, UpstreamError> {
        self.channel(credentials).map(NodeClient::new)
    }

    /// A channel to the server, presenting the node SVID when `credentials` are given.
    pub fn channel(
        &self,
        credentials: Option<&Credentials>,
    ) -> Result<tonic::transport::Channel, UpstreamError> {
        let roots = self.roots_for_server(credentials)?;
        let key_der;
        let chain;
        let client_auth = match credentials {
            Some(c) => {
                let key = KeyPair::from_pem(&c.svid_key_pem)
                    .map_err(|e| UpstreamError::ClientTls(e.into()))?;
                key_der = Zeroizing::new(key.serialize_der());
                chain = vec![c.svid_der.clone()];
                Some((chain.as_slice(), key_der.as_slice()))
            }
            None => None,
        };
        let tls =
            crate::tls::client_config(&roots, &server_spiffe_id(&self.trust_domain), client_auth)
                .map_err(|e| UpstreamError::ClientTls(e.into()))?;
        crate::tls::channel(&self.config.address, tls)
            .map_err(|e| UpstreamError::setting("server.address", e))
    }

    /// Attests the node with the configured method and saves the credentials.
    pub async fn attest(&self) -> Result<Credentials, UpstreamError> {
        let (svid_key, svid_csr) = key_and_csr()?;
        let (ca_key, ca_csr) = key_and_csr()?;
        let csrs = Csrs {
            node_svid: svid_csr,
            ca: ca_csr,
        };
        let mut client = self.client(None)?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let first = match &self.config.attestation {
            NodeAttestation::JoinToken(token) => {
                attest_request::Step::JoinToken(JoinTokenAttestation {
                    token: token.clone(),
                })
            }
            NodeAttestation::X509Pop { cert_file, .. } => {
                let chain = load_pem_certs(cert_file)
                    .map_err(|e| UpstreamError::setting("server.x509pop.cert_file", e))?;
                attest_request::Step::X509pop(X509PopAttestation { cert_chain: chain })
            }
        };
        let _ = tx
            .send(AttestRequest {
                step: Some(first),
                csrs: Some(csrs.clone()),
            })
            .await;
        let mut responses = client
            .attest(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(status_error)?
            .into_inner();
        let granted =
            loop {
                let message = responses.message().await.map_err(status_error)?.ok_or(
                    UpstreamError::Protocol("the attestation stream ended without an answer"),
                )?;
                match message.step {
                    Some(attest_response::Step::Challenge(challenge)) => {
                        let NodeAttestation::X509Pop { key_file, .. } = &self.config.attestation
                        else {
                            return Err(UpstreamError::UnexpectedChallenge);
                        };
                        let key_setting =
                            || format!("server.x509pop.key_file {}", key_file.display());
                        let key_pem = Zeroizing::new(
                            std::fs::read_to_string(key_file)
                                .map_err(|e| UpstreamError::setting(key_setting(), e))?,
                        );
                        let key = KeyPair::from_pem(&key_pem)
                            .map_err(|e| UpstreamError::setting(key_setting(), e))?;
                        let signature = key
                            .sign(&x509pop_message(
                                &challenge.nonce,
                                &csrs.node_svid,
                                &csrs.ca,
                            ))
                            .map_err(|e| UpstreamError::setting(key_setting(), e))?;
                        let proof = AttestRequest {
                            step: Some(attest_request::Step::X509popProof(X509PopProof {
                                signature,
                            })),
                            csrs: None,
                        };
                        let _ = tx.send(proof).await;
                    }
                    Some(attest_response::Step::Credentials(granted)) => break granted,
                    None => {
                        return Err(UpstreamError::Protocol("the attestation answer was empty"));
                    }
                }
            };
        let credentials = self.accept(granted, svid_key, ca_key).await?;
        tracing::info!(node = %credentials.node_id, server = %self.config.address, "node attested");
        Ok(credentials)
    }

    /// Renews both credentials with the current node SVID and saves them.
    pub async fn renew(&self, current: &Credentials) -> Result<Credentials, UpstreamError> {
        let (svid_key, svid_csr) = key_and_csr()?;
        let (ca_key, ca_csr) = key_and_csr()?;
        let granted = self
            .client(Some(current))?
            .renew(RenewRequest {
                csrs: Some(Csrs {
                    node_svid: svid_csr,
                    ca: ca_csr,
                }),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let credentials = self.accept(granted, svid_key, ca_key).await?;
        tracing::info!(node = %credentials.node_id, "node credentials renewed");
        Ok(credentials)
    }

    async fn accept(
        &self,
        granted: NodeCredentials,
        svid_key: KeyPair,
        ca_key: KeyPair,
    ) -> Result<Credentials, UpstreamError> {
        let bundle = granted.bundle.map(|b| b.roots).unwrap_or_default();
        if bundle.is_empty() {
            return Err(UpstreamError::Protocol("the server sent no trust bundle"));
        }
        let credentials = Credentials {
            node_id: granted.node_id,
            svid_der: granted.node_svid,
            svid_key_pem: Zeroizing::new(svid_key.serialize_pem()),
            ca_der: granted.ca_cert,
            ca_key_pem: Zeroizing::new(ca_key.serialize_pem()),
            bundle,
        };
        // Refuse a grant that does not fit the keys before it replaces anything on disk.
        credentials.signing_ca()?;
        let disk = self.disk.clone();
        on_blocking_pool(move || {
            disk.save_credentials(&credentials)?;
            Ok(credentials)
        })
        .await
    }

    /// Applies one sync message; returns whether the bundle changed.
    async fn apply(&mut self, update: SyncUpdate, credentials: &mut Credentials) -> bool {
        self.synced_revision = update.revision;
        if update.full {
            self.entries = update.upserted.iter().map(StoredEntry::from).collect();
        } else {
            self.entries.retain(|e| {
                !update.removed.contains(&e.id) && !update.upserted.iter().any(|u| u.id == e.id)
            });
            self.entries
                .extend(update.upserted.iter().map(StoredEntry::from));
        }
        self.entries
            .sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let (disk, entries) = (self.disk.clone(), self.entries.clone());
        if let Err(e) = on_blocking_pool(move || disk.save_entries(&entries)).await {
            tracing::warn!(error = %e, "cannot save synced entries; a restart would serve older ones");
        }
        match update.bundle {
            Some(bundle) if !bundle.roots.is_empty() && bundle.roots != credentials.bundle => {
                credentials.bundle = bundle.roots;
                let (disk, bundle) = (self.disk.clone(), credentials.bundle.clone());
                if let Err(e) = on_blocking_pool(move || disk.save_bundle(&bundle)).await {
                    tracing::warn!(error = %e, "cannot save the trust bundle");
                }
                true
            }
            _ => false,
        }
    }
}

/// Where the agent's entries and signing CA are published.
pub struct Seams {
    /// JWT-SVIDs: signed over the session's channel; the server's keys and revocations go there.
    pub jwt: Arc<super::jwt::JwtAuthority>,
    /// The entry set.
    pub entries: watch::Sender<Arc<EntrySet>>,
    /// The signing CA.
    pub ca: watch::Sender<Arc<SigningCa>>,
    /// The identity cache, for withdrawing every SVID on eviction and for the event recorder.
    pub cache: Arc<super::cache::IdentityCache>,
    /// The event spool the uploader drains.
    pub spool: Arc<crate::events::spool::Spool>,
    /// The node's tasks: the server's end orders go there, and eviction ends them all.
    pub tasks: Arc<super::tasks::TaskRegistry>,
    /// The policy seam: the server's policy goes there.
    pub policy: super::policy::PolicySource,
    /// Where the node's labels go, for policies.
    pub gate: super::policy::PolicyGate,
}

/// Aborts a task when dropped, so that a session's helpers end with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn publish_ca(seams: &Seams, credentials: &Credentials) {
    match credentials.signing_ca() {
        Ok(ca) => {
            seams.ca.send_replace(Arc::new(ca));
        }
        Err(e) => tracing::error!(error = %e, "cannot use the granted CA"),
    }
}

enum Outcome {
    /// Reconnect after a pause.
    Retry(UpstreamError),
    /// The node was evicted; the server's status says why.
    Evicted(tonic::Status),
    /// Shutting down.
    Stop,
}

/// Runs the link until `shutdown`: renews credentials when due, holds the sync stream, and
/// reconnects with jittered backoff. After an eviction the agent stops serving and re-attests
/// when its method allows it (x509pop); a join token is spent, so such a node waits for an
/// operator.
pub async fn run(
    mut upstream: Upstream,
    mut credentials: Option<Credentials>,
    seams: Seams,
    shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    let mut refused = Backoff::new(REFUSED_PAUSE, REFUSED_PAUSE);
    loop {
        let current = match credentials.take() {
            Some(c) if svid_expired(&c, upstream.now()) => {
                if matches!(upstream.config.attestation, NodeAttestation::X509Pop { .. }) {
                    tracing::warn!(
                        "the node SVID expired while the server was away; attesting again"
                    );
                    continue;
                }
                tracing::error!(
                    "the node SVID expired while the server was away, and a join token is spent after one use: serving until the node CA expires; re-join the node with a new token (server.join_token) and restart the agent"
                );
                shutdown.signalled().await;
                return;
            }
            Some(c) => c,
            None => match upstream.attest().await {
                Ok(c) => {
                    // A new attestation may bring other node selectors: nothing to catch up from.
                    upstream.synced_revision = 0;
                    seams.cache.recorder().set_node_id(&c.node_id);
                    publish_ca(&seams, &c);
                    c
                }
                Err(e) => {
                    tracing::warn!(error = %e, "node attestation failed; retrying");
                    let pause = match e {
                        e if e.is_unavailable() => &mut backoff,
                        _ => &mut refused,
                    };
                    if !pause.pause(&shutdown).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let (outcome, kept) =
            session(&mut upstream, current, &seams, &shutdown, &mut backoff).await;
        credentials = kept;
        match outcome {
            Outcome::Stop => return,
            Outcome::Retry(e) => {
                tracing::warn!(error = %e, "lost the server; serving from local state meanwhile");
                if !backoff.pause(&shutdown).await {
                    return;
                }
            }
            Outcome::Evicted(why) => {
                tracing::error!(reason = %status_text(&why), "this node is no longer admitted by the server; it stops serving identities");
                seams.tasks.end_all(TaskEndReason::NodeEvicted);
                seams
                    .cache
                    .revoke_all(crate::proto::tessera::RevocationReason::NodeEvicted);
                if let Some(old) = credentials.take() {
                    report_before_leaving(&upstream, &old, &seams.spool).await;
                }
                upstream.entries.clear();
                let disk = upstream.disk.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || disk.remove_credentials()).await
                {
                    tracing::error!(error = %e, "forgetting the node credentials failed");
                }
                seams.entries.send_replace(Arc::new(EntrySet::default()));
                credentials = None;
                if !matches!(upstream.config.attestation, NodeAttestation::X509Pop { .. }) {
                    tracing::error!(
                        "a join token is spent after one use: create a new one with `tessera token create`, put it in server.join_token and restart the agent"
                    );
                    shutdown.signalled().await;
                    return;
                }
                if !backoff.pause(&shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Passes on the CRLs of the trust domain's other issuers, and signs the revocations the server
/// ordered into this node's CRLs (each at most once).
fn apply_revocations(seams: &Seams, crls: Option<CrlSet>, orders: Option<RevocationOrders>) {
    if let Some(crls) = crls {
        seams.cache.revocations().set_remote(crls.crls);
    }
    for order in orders.map(|o| o.orders).unwrap_or_default() {
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(order.not_after.max(0) as u64);
        let reason = RevocationReason::try_from(order.reason).unwrap_or(RevocationReason::Operator);
        if seams.cache.revoke_serial(&order.serial, not_after, reason) {
            tracing::info!(serial = %order.serial, detail = %order.detail, "SVID revoked by the server");
        }
    }
}

/// Installs the server's policy (keeping it on disk for outages); a policy this agent cannot
/// load keeps the last good one in force, and says so.
async fn apply_policy(upstream: &Upstream, seams: &Seams, policy: crate::proto::tessera::Policy) {
    let version = u64::try_from(policy.version).unwrap_or(0);
    let current = seams.policy.borrow().clone();
    if current.as_ref().map_or(0, |p| p.version()) == version && version != 0 {
        return;
    }
    let next = if policy.text.is_empty() {
        None
    } else {
        match PolicySet::parse(&policy.text, version, &format!("policy version {version}")) {
            Ok(set) => Some(Arc::new(set)),
            Err(e) => {
                tracing::error!(version, error = %e, "the server's policy does not load here; keeping the last good one");
                return;
            }
        }
    };
    if current.is_none() && next.is_none() {
        return;
    }
    let stored = StoredPolicy {
        version,
        text: policy.text,
    };
    let disk = upstream.disk.clone();
    match tokio::task::spawn_blocking(move || disk.save_policy(&stored)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot keep the policy on disk"),
        Err(e) => tracing::error!(error = %e, "cannot keep the policy on disk"),
    }
    tracing::info!(version, "policy synced from the server");
    seams.policy.send_replace(next);
}

/// Ends the tasks the server ordered ended (each with its descendants); tasks this agent does
/// not run (ended already, or before a restart) are skipped.
fn apply_task_ends(seams: &Seams, orders: Option<TaskEndOrders>) {
    for order in orders.map(|o| o.orders).unwrap_or_default() {
        let reason = TaskEndReason::try_from(order.reason).unwrap_or(TaskEndReason::Operator);
        if seams
            .tasks
            .end(&order.task_id, reason, &order.detail)
            .is_some()
        {
            tracing::info!(task = %order.task_id, detail = %order.detail, "task ended by the server");
        }
    }
}

/// How long an evicted node may take to report what it recorded before it forgets its
/// credentials.
const LAST_REPORT_LIMIT: Duration = Duration::from_secs(5);

/// Uploads what the spool holds (the eviction's revocations included) with the credentials of
/// the node just evicted: the server takes event reports from an evicted node, so the audit
/// trail keeps what the node did up to the end. Bounded by [`LAST_REPORT_LIMIT`].
async fn report_before_leaving(
    upstream: &Upstream,
    credentials: &Credentials,
    spool: &Arc<crate::events::spool::Spool>,
) {
    let Ok(channel) = upstream.channel(Some(credentials)) else {
        return;
    };
    let target = spool.stats().last_seq;
    let uploaded = async {
        while spool.acked() < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let outcome = tokio::time::timeout(LAST_REPORT_LIMIT, async {
        tokio::select! {
            _ = super::uploader::upload(spool.clone(), channel) => {}
            _ = uploaded => {}
        }
    })
    .await;
    let left = target.saturating_sub(spool.acked());
    match outcome {
        Ok(()) if left == 0 => {
            tracing::info!("reported every event recorded before the eviction")
        }
        _ => tracing::warn!(
            left,
            "could not report every event recorded before the eviction; they stay in the spool"
        ),
    }
}

/// Renews the node's credentials and publishes the new CA.
async fn renew_into(
    upstream: &Upstream,
    credentials: &mut Credentials,
    seams: &Seams,
) -> Result<(), UpstreamError> {
    *credentials = upstream.renew(credentials).await?;
    publish_ca(seams, credentials);
    Ok(())
}

/// What an error means for the link: an eviction forgets the credentials, anything else
/// retries with them.
fn outcome_of(error: UpstreamError, credentials: Credentials) -> (Outcome, Option<Credentials>) {
    match error {
        // Kept for one last report of what the node recorded; then forgotten.
        UpstreamError::Evicted(why) => (Outcome::Evicted(why), Some(credentials)),
        e => (Outcome::Retry(e), Some(credentials)),
    }
}

/// One connected stretch: renewals and the sync stream, until an error or `shutdown`. Returns the
/// credentials to go on with (after an eviction, only for the last report).
async fn session(
    upstream: &mut Upstream,
    mut credentials: Credentials,
    seams: &Seams,
    shutdown: &Shutdown,
    backoff: &mut Backoff,
) -> (Outcome, Option<Credentials>) {
    let clock = upstream.clock.clone();
    if clock() >= credentials.renew_at(clock())
        && let Err(e) = renew_into(upstream, &mut credentials, seams).await
    {
        return outcome_of(e, credentials);
    }
    let channel = match upstream.channel(Some(&credentials)) {
        Ok(channel) => channel,
        Err(e) => return (Outcome::Retry(e), Some(credentials)),
    };
    let mut client = NodeClient::new(channel.clone());
    // Tokens are signed over this session's connection; between sessions, none is asked for.
    let _signing = seams.jwt.connect(channel.clone());
    // Events go up the same connection for as long as this session lasts.
    let _uploader = AbortOnDrop(tokio::spawn(super::uploader::run(
        seams.spool.clone(),
        channel.clone(),
    )));
    // So do this node's CRLs, for the server to pass on to every other node.
    let _crl_publisher = AbortOnDrop(tokio::spawn(super::revocation::publish_upstream(
        seams.cache.revocations().clone(),
        channel,
    )));
    let request = SyncRequest {
        since_revision: upstream.synced_revision,
    };
    let since = request.since_revision;
    let mut stream = match client.sync(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return outcome_of(status_error(status), credentials),
    };
    let mut first = true;
    loop {
        // Renewal is due by the wall clock, looked at every few seconds: a suspended machine
        // renews as soon as it wakes, not after its monotonic timer runs out.
        let renew_at = credentials.renew_at(clock());
        tokio::select! {
            due = wait_until_wall_time(renew_at, &*clock, shutdown) => {
                if !due {
                    return (Outcome::Stop, Some(credentials));
                }
                if let Err(e) = renew_into(upstream, &mut credentials, seams).await {
                    return outcome_of(e, credentials);
                }
            }
            message = stream.message() => match message {
                Ok(Some(mut update)) => {
                    backoff.reset();
                    let full = update.full;
                    if std::mem::take(&mut first) && !full {
                        tracing::info!(since, revision = update.revision, "caught up with the server's changes since the last stream");
                    }
                    apply_revocations(seams, update.crls.take(), update.revocations.take());
                    apply_task_ends(seams, update.task_ends.take());
                    if update.full {
                        seams.gate.set_node_labels(std::mem::take(&mut update.node_labels));
                    }
                    if let Some(policy) = update.policy.take() {
                        apply_policy(upstream, seams, policy).await;
                    }
                    let jwt_keys = update.bundle.as_ref().map(|b| b.jwt_keys.clone());
                    let jwt_revoked = update.jwt_revocations.take().map(|r| {
                        r.revoked.into_iter().map(|j| (j.jti, j.expires_at)).collect()
                    });
                    seams.jwt.apply_upstream(jwt_keys, jwt_revoked).await;
                    let bundle_changed = upstream.apply(update, &mut credentials).await;
                    if bundle_changed {
                        publish_ca(seams, &credentials);
                    }
                    let entries = upstream.entry_set();
                    tracing::info!(entries = entries.entries.len(), full, "entries synced from the server");
                    seams.entries.send_replace(Arc::new(entries));
                }
                Ok(None) => return (Outcome::Retry(UpstreamError::Protocol("the sync stream ended")), Some(credentials)),
                Err(status) => return outcome_of(status_error(status), credentials),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::generate_root;
    use crate::ca::node::{node_spiffe_id, sign_node_ca, sign_node_svid};
    use crate::proto::tessera::Bundle;

    fn trust_domain() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn upstream(state_dir: &Path) -> Upstream {
        let config = UpstreamConfig {
            address: "127.0.0.1:1".into(),
            trust_bundle_file: state_dir.join("bootstrap.pem"),
            attestation: NodeAttestation::JoinToken("unused".into()),
        };
        Upstream::new(config, trust_domain(), state_dir)
    }

    /// Credentials as a server would grant them at `now`, with these lifetimes.
    fn granted(now: SystemTime, svid_ttl: Duration, ca_ttl: Duration) -> Credentials {
        let td = trust_domain();
        let (root, _, _) = generate_root(&td, Duration::from_secs(86_400), now, 1, "root").unwrap();
        let (svid_key, svid_csr) = key_and_csr().unwrap();
        let (ca_key, ca_csr) = key_and_csr().unwrap();
        let node = node_spiffe_id(&td, "n1").unwrap();
        let svid = sign_node_svid(&root, &node, &svid_csr, svid_ttl, now).unwrap();
        let ca = sign_node_ca(&root, &td, "n1", &ca_csr, ca_ttl, now).unwrap();
        Credentials {
            node_id: "n1".into(),
            svid_der: svid.der,
            svid_key_pem: Zeroizing::new(svid_key.serialize_pem()),
            ca_der: ca.der,
            ca_key_pem: Zeroizing::new(ca_key.serialize_pem()),
            bundle: root.bundle.clone(),
        }
    }

    fn entry(name: &str, created_at: i64) -> Entry {
        Entry {
            id: name.into(),
            spiffe_id: format!("spiffe://example.org/{name}"),
            selectors: vec!["unix:uid:1000".into()],
            x509_ttl_seconds: 300,
            owner: "o".into(),
            purpose: "p".into(),
            revision: 1,
            created_at,
            ..Default::default()
        }
    }

    fn served(upstream: &Upstream) -> Vec<String> {
        upstream
            .entry_set()
            .entries
            .iter()
            .map(|e| e.spiffe_id.to_string())
            .collect()
    }

    #[test]
    fn renewal_is_due_at_half_of_the_shorter_lived_credential() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ten_minutes = Duration::from_secs(600);
        let credentials = granted(now, ten_minutes, Duration::from_secs(3600));
        let due = credentials.renew_at(now);
        // Half of the SVID's ten minutes, counted from its back-dated start.
        assert!(
            due <= now + ten_minutes / 2 && due >= now + ten_minutes / 2 - crate::ca::BACKDATE,
            "{:?}",
            due.duration_since(now)
        );
        let shorter_ca = granted(now, Duration::from_secs(3600), ten_minutes);
        assert_eq!(shorter_ca.renew_at(now), due);
        assert!(!svid_expired(
            &credentials,
            now + ten_minutes - Duration::from_secs(1)
        ));
        assert!(svid_expired(&credentials, now + ten_minutes));
    }

    #[test]
    fn unreadable_credentials_are_due_at_once_and_expired() {
        let now = SystemTime::now();
        let mut credentials = granted(now, Duration::from_secs(600), Duration::from_secs(600));
        credentials.svid_der = b"not a certificate".to_vec();
        credentials.ca_der = Vec::new();
        assert_eq!(credentials.renew_at(now), now);
        assert!(svid_expired(&credentials, now));
    }

    #[tokio::test]
    async fn a_full_sync_replaces_a_delta_patches_and_both_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut link = upstream(dir.path());
        let mut credentials = granted(
            SystemTime::now(),
            Duration::from_secs(600),
            Duration::from_secs(600),
        );
        let roots = credentials.bundle.clone();
        // Attestation saves the credentials first, and with them the state directory.
        link.disk.save_credentials(&credentials).unwrap();

        let full = SyncUpdate {
            full: true,
            upserted: vec![entry("b", 2), entry("a", 1)],
            removed: Vec::new(),
            bundle: Some(Bundle {
                roots: roots.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(
            !link.apply(full, &mut credentials).await,
            "the same bundle is no change"
        );
        assert_eq!(
            served(&link),
            ["spiffe://example.org/a", "spiffe://example.org/b"],
            "creation order"
        );

        let delta = SyncUpdate {
            full: false,
            upserted: vec![entry("c", 3)],
            removed: vec!["a".into()],
            bundle: None,
            ..Default::default()
        };
        assert!(!link.apply(delta, &mut credentials).await);
        assert_eq!(
            served(&link),
            ["spiffe://example.org/b", "spiffe://example.org/c"]
        );

        let mut rotated = roots.clone();
        rotated.push(
            granted(
                SystemTime::now(),
                Duration::from_secs(60),
                Duration::from_secs(60),
            )
            .bundle[0]
                .clone(),
        );
        let new_bundle = SyncUpdate {
            bundle: Some(Bundle {
                roots: rotated.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(link.apply(new_bundle, &mut credentials).await);
        assert_eq!(credentials.bundle, rotated);

        // What a restart finds: the patched entries and the new bundle.
        let restarted = upstream(dir.path());
        assert_eq!(
            served(&restarted),
            ["spiffe://example.org/b", "spiffe://example.org/c"]
        );
        assert_eq!(restarted.disk.load_bundle().unwrap(), rotated);
    }

    #[tokio::test]
    async fn an_entry_the_agent_cannot_serve_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut link = upstream(dir.path());
        let mut credentials = granted(
            SystemTime::now(),
            Duration::from_secs(600),
            Duration::from_secs(600),
        );
        let mut foreign = entry("foreign", 1);
        foreign.spiffe_id = "spiffe://elsewhere.org/foreign".into();
        let update = SyncUpdate {
            full: true,
            upserted: vec![foreign, entry("ours", 2)],
            ..Default::default()
        };
        link.apply(update, &mut credentials).await;
        assert_eq!(served(&link), ["spiffe://example.org/ours"]);
    }

    #[tokio::test]
    async fn saved_credentials_load_back_and_a_torn_save_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let link = upstream(dir.path());
        let credentials = granted(
            SystemTime::now(),
            Duration::from_secs(600),
            Duration::from_secs(600),
        );
        let svid = credentials.svid_der.clone();
        let disk = link.disk.clone();
        on_blocking_pool(move || disk.save_credentials(&credentials))
            .await
            .unwrap();
        let loaded = link.load_saved().unwrap().unwrap();
        assert_eq!(loaded.svid_der, svid);

        // A crash between the key's rename and its certificate's: another key beside it.
        let (other, _) = key_and_csr().unwrap();
        std::fs::write(
            dir.path().join("upstream").join(NODE_SVID_KEY_FILE),
            other.serialize_pem(),
        )
        .unwrap();
        match link.load_saved() {
            Err(UpstreamError::UnusableState { problem, .. }) => assert!(
                matches!(
                    problem,
                    StateProblem::Mismatch {
                        certificate: "node_svid.pem",
                        ..
                    }
                ),
                "{problem}"
            ),
            other => panic!(
                "expected UnusableState, got {:?}",
                other.map(|c| c.is_some())
            ),
        }
    }

    #[tokio::test]
    async fn each_unusable_credential_file_is_named_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let link = upstream(dir.path());
        let credentials = granted(
            SystemTime::now(),
            Duration::from_secs(600),
            Duration::from_secs(600),
        );
        link.disk.save_credentials(&credentials).unwrap();
        let file = |name: &str| dir.path().join("upstream").join(name);

        std::fs::write(
            file(NODE_CA_FILE),
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let problem = link.disk.load_credentials().err().unwrap();
        assert!(
            matches!(
                &problem,
                StateProblem::Pem {
                    file: NODE_CA_FILE,
                    ..
                }
            ),
            "{problem}"
        );
        assert!(std::error::Error::source(&problem).is_some_and(|s| s.is::<pem::PemError>()));

        std::fs::write(file(NODE_CA_FILE), "no PEM here").unwrap();
        let problem = link.disk.load_credentials().err().unwrap();
        assert!(
            matches!(&problem, StateProblem::NoCertificate { file: NODE_CA_FILE }),
            "{problem}"
        );

        std::fs::remove_file(file(NODE_CA_FILE)).unwrap();
        std::fs::create_dir(file(NODE_CA_FILE)).unwrap();
        let problem = link.disk.load_credentials().err().unwrap();
        assert!(
            matches!(
                &problem,
                StateProblem::Read {
                    file: NODE_CA_FILE,
                    ..
                }
            ),
            "{problem}"
        );

        std::fs::remove_dir(file(NODE_CA_FILE)).unwrap();
        let problem = link.disk.load_credentials().err().unwrap();
        assert!(
            matches!(&problem, StateProblem::Missing(files) if files == &[NODE_CA_FILE]),
            "{problem}"
        );
    }

    /// The link runs whole against this: a node API that grants what it
    /// is asked, plays the sync streams a test scripts, and counts calls.
    mod scripted_server {
        use std::collections::VecDeque;
        use std::net::SocketAddr;
        use std::pin::Pin;
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicUsize, Ordering};

        use tokio_stream::{Stream, StreamExt};
        use tonic::{Request, Response, Status, Streaming};

        use super::*;
        use crate::ca::node::sign_server_svid;
        use crate::events::SpoolLog;
        use crate::events::recorder::Recorder;
        use crate::proto::tessera::node_server::{Node, NodeServer};
        use crate::proto::tessera::{AttestResponse, Bundle, EventAck, EventBatch};

        type Replies<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

        /// One sync stream as the fake server plays it: these updates, then held open or ended.
        struct SyncScript {
            updates: Vec<Result<SyncUpdate, Status>>,
            hold: bool,
        }

        #[derive(Default)]
        struct Calls {
            attest: AtomicUsize,
            renew: AtomicUsize,
            sync: AtomicUsize,
        }

        struct FakeNode {
            root: SigningCa,
            svid_ttl: Duration,
            /// The time grants start at: the client's clock, so that both agree.
            clock: WallClock,
            calls: Arc<Calls>,
            syncs: Mutex<VecDeque<SyncScript>>,
        }

        impl FakeNode {
            fn grant(&self, csrs: Option<Csrs>) -> Result<NodeCredentials, Status> {
                let csrs = csrs.ok_or_else(|| Status::invalid_argument("csrs are required"))?;
                let td = trust_domain();
                let now = (self.clock)();
                let refused = |e: &dyn std::fmt::Display| Status::invalid_argument(e.to_string());
                let node = node_spiffe_id(&td, "n1").map_err(|e| refused(&e))?;
                let svid = sign_node_svid(&self.root, &node, &csrs.node_svid, self.svid_ttl, now)
                    .map_err(|e| refused(&e))?;
                let ca = sign_node_ca(
                    &self.root,
                    &td,
                    "n1",
                    &csrs.ca,
                    Duration::from_secs(3600),
                    now,
                )
                .map_err(|e| refused(&e))?;
                Ok(NodeCredentials {
                    node_id: "n1".into(),
                    spiffe_id: node.to_string(),
                    node_svid: svid.der,
                    ca_cert: ca.der,
                    bundle: Some(Bundle {
                        roots: self.root.bundle.clone(),
                        ..Default::default()
                    }),
                })
            }
        }

        #[tonic::async_trait]
        impl Node for FakeNode {
            type AttestStream = Replies<AttestResponse>;
            type SyncStream = Replies<SyncUpdate>;
            type ReportEventsStream = Replies<EventAck>;

            async fn attest(
                &self,
                request: Request<Streaming<AttestRequest>>,
            ) -> Result<Response<Self::AttestStream>, Status> {
                self.calls.attest.fetch_add(1, Ordering::SeqCst);
                let first = request
                    .into_inner()
                    .message()
                    .await?
                    .ok_or_else(|| Status::invalid_argument("no attestation request"))?;
                let answer = AttestResponse {
                    step: Some(attest_response::Step::Credentials(self.grant(first.csrs)?)),
                };
                Ok(Response::new(Box::pin(tokio_stream::iter([Ok(answer)]))))
            }

            async fn renew(
                &self,
                request: Request<RenewRequest>,
            ) -> Result<Response<NodeCredentials>, Status> {
                self.calls.renew.fetch_add(1, Ordering::SeqCst);
                self.grant(request.into_inner().csrs).map(Response::new)
            }

            async fn sync(
                &self,
                _: Request<SyncRequest>,
            ) -> Result<Response<Self::SyncStream>, Status> {
                self.calls.sync.fetch_add(1, Ordering::SeqCst);
                let script = self
                    .syncs
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or(SyncScript {
                        updates: vec![Ok(full(&[]))],
                        hold: true,
                    });
                let played = tokio_stream::iter(script.updates);
                let stream: Self::SyncStream = if script.hold {
                    Box::pin(played.chain(tokio_stream::pending()))
                } else {
                    Box::pin(played)
                };
                Ok(Response::new(stream))
            }

            async fn report_events(
                &self,
                _: Request<Streaming<EventBatch>>,
            ) -> Result<Response<Self::ReportEventsStream>, Status> {
                Ok(Response::new(Box::pin(tokio_stream::pending())))
            }

            async fn publish_crls(
                &self,
                _: Request<crate::proto::tessera::PublishCrlsRequest>,
            ) -> Result<Response<crate::proto::tessera::PublishCrlsResponse>, Status> {
                Ok(Response::new(Default::default()))
            }

            async fn mint_jwt_svid(
                &self,
                _: Request<crate::proto::tessera::MintJwtSvidRequest>,
            ) -> Result<Response<crate::proto::tessera::MintJwtSvidResponse>, Status> {
                Err(Status::unimplemented("this fake signs no JWT-SVIDs"))
            }
        }

        fn full(entries: &[Entry]) -> SyncUpdate {
            SyncUpdate {
                full: true,
                upserted: entries.to_vec(),
                ..Default::default()
            }
        }

        /// A fake node API serving over TLS on a loopback port the kernel picks, until
        /// `shutdown`; its address, call counts and roots.
        async fn serve(
            svid_ttl: Duration,
            scripts: Vec<SyncScript>,
            shutdown: &Shutdown,
            clock: WallClock,
        ) -> (SocketAddr, Arc<Calls>, Vec<Vec<u8>>) {
            let td = trust_domain();
            let now = SystemTime::now();
            let (root, _, _) =
                generate_root(&td, Duration::from_secs(86_400), now, 1, "root").unwrap();
            let (cert, key) = sign_server_svid(&root, &td, Duration::from_secs(3600), now).unwrap();
            let tls = crate::tls::server_config(&[cert.der], &key, &root.bundle).unwrap();
            let (configs_tx, configs) = watch::channel(tls);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let calls = Arc::new(Calls::default());
            let roots = root.bundle.clone();
            let node = FakeNode {
                root,
                svid_ttl,
                clock,
                calls: calls.clone(),
                syncs: Mutex::new(scripts.into()),
            };
            let incoming = crate::tls::incoming(
                listener,
                configs,
                crate::tls::ConnectionLimits::from_descriptor_limit(),
                shutdown.signalled(),
            );
            let stop = shutdown.signalled();
            tokio::spawn(async move {
                let _configs_tx = configs_tx;
                let _ = tonic::transport::Server::builder()
                    .add_service(NodeServer::new(node))
                    .serve_with_incoming_shutdown(incoming, stop)
                    .await;
            });
            (address, calls, roots)
        }

        /// The client's link, running as the agent runs it, joining with a token.
        struct Link {
            entries: watch::Receiver<Arc<EntrySet>>,
            ca: watch::Receiver<Arc<SigningCa>>,
            shutdown: Shutdown,
            task: tokio::task::JoinHandle<()>,
        }

        fn start_link(
            state_dir: &Path,
            address: SocketAddr,
            roots: &[Vec<u8>],
            clock: WallClock,
        ) -> Link {
            let td = trust_domain();
            let bootstrap = state_dir.join("bootstrap.pem");
            std::fs::write(&bootstrap, to_pem("CERTIFICATE", roots)).unwrap();
            let config = UpstreamConfig {
                address: address.to_string(),
                trust_bundle_file: bootstrap,
                attestation: NodeAttestation::JoinToken("t".into()),
            };
            let (placeholder, _, _) = generate_root(
                &td,
                Duration::from_secs(3600),
                SystemTime::now(),
                0,
                "placeholder",
            )
            .unwrap();
            let placeholder = Arc::new(placeholder);
            let spool = crate::events::open_spool(&state_dir.join("spool")).unwrap();
            let recorder = Arc::new(Recorder::new(
                "example.org",
                "",
                Box::new(SpoolLog(spool.clone())),
            ));
            let cache = crate::agent::cache::IdentityCache::new(
                Arc::new(EntrySet::default()),
                placeholder.clone(),
                recorder,
                crate::agent::revocation::Revocations::open(None).unwrap(),
            );
            let (entries_tx, entries) = watch::channel(Arc::new(EntrySet::default()));
            let (ca_tx, ca) = watch::channel(placeholder);
            let (policy, _) = watch::channel(None);
            let tasks = crate::agent::tasks::TaskRegistry::new(
                cache.clone(),
                crate::agent::config::TaskLimits::default(),
                state_dir,
                crate::agent::policy::PolicyGate::new(&policy, ""),
            );
            let seams = Seams {
                jwt: Arc::new(crate::agent::jwt::JwtAuthority::upstream(
                    state_dir,
                    td.clone(),
                    Default::default(),
                    cache.recorder().clone(),
                )),
                entries: entries_tx,
                ca: ca_tx,
                cache,
                spool,
                tasks,
                gate: crate::agent::policy::PolicyGate::new(&policy, ""),
                policy,
            };
            let shutdown = Shutdown::new();
            let task = tokio::spawn(run(
                Upstream::new(config, td, state_dir).with_clock(clock),
                None,
                seams,
                shutdown.clone(),
            ));
            Link {
                entries,
                ca,
                shutdown,
                task,
            }
        }

        impl Link {
            async fn stop(self) {
                self.shutdown.trigger();
                tokio::time::timeout(Duration::from_secs(10), self.task)
                    .await
                    .expect("the link stops on shutdown")
                    .unwrap();
            }
        }

        async fn entries_become(link: &mut Link, names: &[&str]) {
            let wanted: Vec<String> = names
                .iter()
                .map(|n| format!("spiffe://example.org/{n}"))
                .collect();
            let names_of = |set: &EntrySet| -> Vec<String> {
                set.entries
                    .iter()
                    .map(|e| e.spiffe_id.to_string())
                    .collect()
            };
            let reached = matches!(
                tokio::time::timeout(
                    Duration::from_secs(20),
                    link.entries.wait_for(|set| names_of(set) == wanted),
                )
                .await,
                Ok(Ok(_))
            );
            assert!(
                reached,
                "entries never became {wanted:?}: {:?}",
                names_of(&link.entries.borrow())
            );
        }

        #[tokio::test]
        async fn a_node_attests_serves_what_it_syncs_and_reconnects_when_the_stream_ends() {
            let dir = tempfile::tempdir().unwrap();
            let server = Shutdown::new();
            let scripts = vec![
                SyncScript {
                    updates: vec![Ok(full(&[entry("a", 1)]))],
                    hold: false,
                },
                SyncScript {
                    updates: vec![Ok(full(&[entry("a", 1), entry("b", 2)]))],
                    hold: true,
                },
            ];
            let (address, calls, roots) =
                serve(Duration::from_secs(600), scripts, &server, system_clock()).await;
            let mut link = start_link(dir.path(), address, &roots, system_clock());

            entries_become(&mut link, &["a", "b"]).await;
            assert_eq!(calls.attest.load(Ordering::SeqCst), 1);
            assert_eq!(calls.sync.load(Ordering::SeqCst), 2, "one reconnect");
            assert_eq!(
                link.ca.borrow().bundle,
                roots,
                "the granted CA is published"
            );
            let state = dir.path().join("upstream");
            assert_eq!(
                std::fs::read_to_string(state.join(NODE_ID_FILE)).unwrap(),
                "n1"
            );
            let saved: Vec<StoredEntry> =
                serde_json::from_slice(&std::fs::read(state.join(ENTRIES_FILE)).unwrap()).unwrap();
            assert_eq!(saved.len(), 2);
            link.stop().await;
            server.trigger();
        }

        fn system_clock() -> WallClock {
            Arc::new(SystemTime::now)
        }

        /// A wall clock that starts at the system's time and then moves only with tokio's
        /// clock, which a paused test advances as far as it likes at no cost.
        fn paused_wall_clock() -> WallClock {
            let (wall, start) = (SystemTime::now(), tokio::time::Instant::now());
            Arc::new(move || wall + start.elapsed())
        }

        #[tokio::test(start_paused = true)]
        async fn credentials_are_renewed_at_half_life_and_the_new_ca_published() {
            let dir = tempfile::tempdir().unwrap();
            let server = Shutdown::new();
            let clock = paused_wall_clock();
            let (address, calls, roots) =
                serve(Duration::from_secs(600), Vec::new(), &server, clock.clone()).await;
            let mut link = start_link(dir.path(), address, &roots, clock.clone());
            let granted = tokio::time::timeout(
                Duration::from_secs(20),
                link.ca.wait_for(|ca| ca.bundle == roots),
            )
            .await
            .expect("attested")
            .unwrap()
            .intermediates
            .clone();
            let saved = DiskState::new(dir.path())
                .load_credentials()
                .unwrap()
                .unwrap();
            let due = saved.renew_at(clock());
            // Ten minutes, back-dated: half of the life is over a little under five minutes
            // after the grant.
            let ahead = due.duration_since(clock()).unwrap();
            assert!(ahead > Duration::from_secs(240), "due in {ahead:?}");

            tokio::time::sleep(ahead - Duration::from_secs(1)).await;
            assert_eq!(calls.renew.load(Ordering::SeqCst), 0, "renewed early");
            assert_eq!(link.ca.borrow().intermediates, granted);

            let renewed = matches!(
                tokio::time::timeout(
                    Duration::from_secs(30),
                    link.ca
                        .wait_for(|ca| ca.bundle == roots && ca.intermediates != granted),
                )
                .await,
                Ok(Ok(_))
            );
            assert!(renewed, "no renewal published");
            let late = clock().duration_since(due).unwrap_or_default();
            assert!(
                late < Duration::from_secs(1),
                "renewed {late:?} after it was due"
            );
            assert_eq!(calls.renew.load(Ordering::SeqCst), 1);
            assert_eq!(
                calls.attest.load(Ordering::SeqCst),
                1,
                "renewed, not attested again"
            );
            link.stop().await;
            server.trigger();
        }

        #[tokio::test]
        async fn an_evicted_node_forgets_its_credentials_and_entries() {
            let dir = tempfile::tempdir().unwrap();
            let server = Shutdown::new();
            let scripts = vec![SyncScript {
                updates: vec![
                    Ok(full(&[entry("a", 1)])),
                    Err(Status::permission_denied("node evicted")),
                ],
                hold: false,
            }];
            let (address, calls, roots) =
                serve(Duration::from_secs(600), scripts, &server, system_clock()).await;
            let link = start_link(dir.path(), address, &roots, system_clock());
            let node_id = dir.path().join("upstream").join(NODE_ID_FILE);
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            // The node id is written before the first sync and removed only by an eviction,
            // which then withdraws the entries.
            while calls.sync.load(Ordering::SeqCst) == 0
                || node_id.exists()
                || !link.entries.borrow().entries.is_empty()
            {
                assert!(std::time::Instant::now() < deadline, "never evicted");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(!dir.path().join("upstream").join(ENTRIES_FILE).exists());
            assert!(
                !dir.path()
                    .join("upstream")
                    .join(NODE_SVID_KEY_FILE)
                    .exists()
            );
            link.stop().await;
            server.trigger();
        }
    }
}
