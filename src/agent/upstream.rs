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
use crate::proto::tessera::node_client::NodeClient;
use crate::proto::tessera::{
    AttestRequest, Csrs, Entry, JoinTokenAttestation, NodeCredentials, RenewRequest, SyncRequest,
    SyncUpdate, X509PopAttestation, X509PopProof, attest_request, attest_response,
};
use crate::runtime::{Backoff, Shutdown, wait_until_wall_time};
use crate::spiffe::TrustDomain;

const NODE_SVID_FILE: &str = "node_svid.pem";
const NODE_SVID_KEY_FILE: &str = "node_svid_key.pem";
const NODE_CA_FILE: &str = "node_ca.pem";
const NODE_CA_KEY_FILE: &str = "node_ca_key.pem";
const BUNDLE_FILE: &str = "bundle.pem";
const ENTRIES_FILE: &str = "entries.json";
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
    #[error("server refused the node: {0}")]
    Refused(String),
    /// The server could not be reached or failed; worth retrying.
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// The node was evicted or banned.
    #[error("node no longer admitted: {0}")]
    Evicted(String),
    /// A local file or key could not be used.
    #[error("{0}")]
    Local(String),
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
        problem: String,
        /// The files to remove before joining again.
        files: Vec<PathBuf>,
    },
}

impl From<CaError> for UpstreamError {
    fn from(e: CaError) -> Self {
        Self::Local(e.to_string())
    }
}

fn status_error(status: tonic::Status) -> UpstreamError {
    let message = format!("{}: {}", code_name(status.code()), status.message());
    match status.code() {
        Code::PermissionDenied => UpstreamError::Evicted(message),
        Code::Unauthenticated | Code::InvalidArgument | Code::FailedPrecondition => {
            UpstreamError::Refused(message)
        }
        _ => UpstreamError::Unavailable(message),
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
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
            owner: self.owner.clone(),
            purpose: self.purpose.clone(),
            expires_at: self
                .expires_at
                .map(|at| SystemTime::UNIX_EPOCH + Duration::from_secs(at.max(0) as u64)),
            hint: Some(self.hint.clone()).filter(|h| !h.is_empty()),
            dns_names: self.dns_names.clone(),
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
    pub fn load_credentials(&self) -> Result<Option<Credentials>, String> {
        let present: Vec<&str> = CREDENTIAL_FILES
            .iter()
            .copied()
            .filter(|name| self.path(name).exists())
            .collect();
        if present.is_empty() {
            return Ok(None);
        }
        if present.len() < CREDENTIAL_FILES.len() {
            let missing: Vec<&str> = CREDENTIAL_FILES
                .iter()
                .copied()
                .filter(|name| !present.contains(name))
                .collect();
            return Err(format!("{} missing", missing.join(", ")));
        }
        let read = |name: &str| {
            std::fs::read_to_string(self.path(name)).map_err(|e| format!("{name}: {e}"))
        };
        let cert = |name: &str| {
            certificates_from_pem(read(name)?)
                .ok()
                .and_then(|certs| certs.into_iter().next())
                .ok_or_else(|| format!("{name} holds no PEM certificate"))
        };
        let credentials = Credentials {
            node_id: read(NODE_ID_FILE)?.trim().to_owned(),
            svid_der: cert(NODE_SVID_FILE)?,
            svid_key_pem: Zeroizing::new(read(NODE_SVID_KEY_FILE)?),
            ca_der: cert(NODE_CA_FILE)?,
            ca_key_pem: Zeroizing::new(read(NODE_CA_KEY_FILE)?),
            bundle: self
                .load_bundle()
                .ok_or_else(|| format!("{BUNDLE_FILE} holds no certificate"))?,
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
    key_name: &str,
    cert_der: &[u8],
    cert_name: &str,
) -> Result<(), String> {
    use x509_parser::prelude::*;
    let key = KeyPair::from_pem(key_pem)
        .map_err(|e| format!("{key_name} is not a PEM PKCS#8 private key ({e})"))?;
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| format!("{cert_name} is not an X.509 certificate ({e})"))?;
    if cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
        return Err(format!(
            "{key_name} does not match the public key in {cert_name}"
        ));
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
        Err(e) => Err(UpstreamError::Local(format!(
            "writing the node state failed: {e}"
        ))),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| crate::ca::io_error(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| crate::ca::io_error(dir, e))
}

/// The link to the server, with what the agent has learned so far.
pub struct Upstream {
    config: UpstreamConfig,
    trust_domain: TrustDomain,
    disk: DiskState,
    /// Synced entries, sorted by creation then id (the order workloads see).
    entries: Vec<StoredEntry>,
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
        }
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
        let ca_valid = not_after_of(&credentials.ca_der).is_some_and(|t| t > SystemTime::now());
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
            .map_err(|e| UpstreamError::Local(format!("server.trust_bundle_file: {e}")))
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
                    .map_err(|e| UpstreamError::Local(format!("node SVID key: {e}")))?;
                key_der = Zeroizing::new(key.serialize_der());
                chain = vec![c.svid_der.clone()];
                Some((chain.as_slice(), key_der.as_slice()))
            }
            None => None,
        };
        let tls =
            crate::tls::client_config(&roots, &server_spiffe_id(&self.trust_domain), client_auth)
                .map_err(|e| UpstreamError::Local(e.to_string()))?;
        crate::tls::channel(&self.config.address, tls)
            .map_err(|e| UpstreamError::Local(format!("server.address: {e}")))
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
                    .map_err(|e| UpstreamError::Local(format!("server.x509pop.cert_file: {e}")))?;
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
        let granted = loop {
            let message = responses
                .message()
                .await
                .map_err(status_error)?
                .ok_or_else(|| {
                    UpstreamError::Unavailable("attestation stream ended without an answer".into())
                })?;
            match message.step {
                Some(attest_response::Step::Challenge(challenge)) => {
                    let NodeAttestation::X509Pop { key_file, .. } = &self.config.attestation else {
                        return Err(UpstreamError::Refused(
                            "server sent an x509pop challenge to a join-token attestation".into(),
                        ));
                    };
                    let key_pem =
                        Zeroizing::new(std::fs::read_to_string(key_file).map_err(|e| {
                            UpstreamError::Local(format!(
                                "server.x509pop.key_file: {}: {e}",
                                key_file.display()
                            ))
                        })?);
                    let key = KeyPair::from_pem(&key_pem).map_err(|e| {
                        UpstreamError::Local(format!(
                            "server.x509pop.key_file: {}: {e}",
                            key_file.display()
                        ))
                    })?;
                    let signature = key
                        .sign(&x509pop_message(
                            &challenge.nonce,
                            &csrs.node_svid,
                            &csrs.ca,
                        ))
                        .map_err(|e| UpstreamError::Local(format!("x509pop signature: {e}")))?;
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
                    return Err(UpstreamError::Unavailable(
                        "empty attestation answer".into(),
                    ));
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
            return Err(UpstreamError::Unavailable(
                "server sent no trust bundle".into(),
            ));
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
    /// The entry set.
    pub entries: watch::Sender<Arc<EntrySet>>,
    /// The signing CA.
    pub ca: watch::Sender<Arc<SigningCa>>,
    /// The identity cache, for withdrawing every SVID on eviction and for the event recorder.
    pub cache: Arc<super::cache::IdentityCache>,
    /// The event spool the uploader drains.
    pub spool: Arc<crate::events::spool::Spool>,
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
    /// The node was evicted.
    Evicted(String),
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
            Some(c) if svid_expired(&c, SystemTime::now()) => {
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
                    seams.cache.recorder().set_node_id(&c.node_id);
                    publish_ca(&seams, &c);
                    c
                }
                Err(e) => {
                    tracing::warn!(error = %e, "node attestation failed; retrying");
                    let pause = match e {
                        UpstreamError::Unavailable(_) => &mut backoff,
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
                tracing::error!(reason = %why, "this node is no longer admitted by the server; it stops serving identities");
                seams
                    .cache
                    .revoke_all(crate::proto::tessera::RevocationReason::NodeEvicted);
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
        UpstreamError::Evicted(why) => (Outcome::Evicted(why), None),
        e => (Outcome::Retry(e), Some(credentials)),
    }
}

/// One connected stretch: renewals and the sync stream, until an error or `shutdown`. Returns the
/// credentials to go on with (none after an eviction).
async fn session(
    upstream: &mut Upstream,
    mut credentials: Credentials,
    seams: &Seams,
    shutdown: &Shutdown,
    backoff: &mut Backoff,
) -> (Outcome, Option<Credentials>) {
    if SystemTime::now() >= credentials.renew_at(SystemTime::now())
        && let Err(e) = renew_into(upstream, &mut credentials, seams).await
    {
        return outcome_of(e, credentials);
    }
    let channel = match upstream.channel(Some(&credentials)) {
        Ok(channel) => channel,
        Err(e) => return (Outcome::Retry(e), Some(credentials)),
    };
    let mut client = NodeClient::new(channel.clone());
    // Events go up the same connection for as long as this session lasts.
    let _uploader = AbortOnDrop(tokio::spawn(super::uploader::run(
        seams.spool.clone(),
        channel,
    )));
    let mut stream = match client.sync(SyncRequest {}).await {
        Ok(response) => response.into_inner(),
        Err(status) => return outcome_of(status_error(status), credentials),
    };
    loop {
        // Renewal is due by the wall clock, looked at every few seconds: a suspended machine
        // renews as soon as it wakes, not after its monotonic timer runs out.
        let renew_at = credentials.renew_at(SystemTime::now());
        tokio::select! {
            due = wait_until_wall_time(renew_at, SystemTime::now, shutdown) => {
                if !due {
                    return (Outcome::Stop, Some(credentials));
                }
                if let Err(e) = renew_into(upstream, &mut credentials, seams).await {
                    return outcome_of(e, credentials);
                }
            }
            message = stream.message() => match message {
                Ok(Some(update)) => {
                    backoff.reset();
                    let full = update.full;
                    let bundle_changed = upstream.apply(update, &mut credentials).await;
                    if bundle_changed {
                        publish_ca(seams, &credentials);
                    }
                    let entries = upstream.entry_set();
                    tracing::info!(entries = entries.entries.len(), full, "entries synced from the server");
                    seams.entries.send_replace(Arc::new(entries));
                }
                Ok(None) => return (Outcome::Retry(UpstreamError::Unavailable("sync stream ended".into())), Some(credentials)),
                Err(status) => return outcome_of(status_error(status), credentials),
            }
        }
    }
}
