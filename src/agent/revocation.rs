//! The agent's revocation lists: one per signing CA it holds (the standalone root, or each node
//! intermediate the server granted), each signed into an X.509 CRL by that CA's key.
//!
//! A CA stays here until it expires, so its CRL is published as long as any certificate it
//! signed may still be shown. Revoking adds an entry and wakes [`Revocations::run`], which signs
//! at once and publishes the set every Workload API stream sends; the task also re-signs each
//! CRL at half of [`CRL_LIFETIME`] and drops entries whose certificate has expired.
//!
//! The lists are kept in `state_dir/revocations.json` (entries, CRL numbers, the last CRL
//! signed), so a restart, with or without the server, publishes what was revoked before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::ca::crl::{CRL_LIFETIME, Revoked, check_crl, parse_crl, sign_crl, subject_der};
use crate::ca::{SigningCa, whole_seconds};
use crate::clock::unix_seconds;
use crate::durable::write_atomically;
use crate::events::model::{reason_from_name, reason_name};
use crate::proto::tessera::RevocationReason;

/// The longest the task sleeps, so that wall-clock deadlines are looked at after a suspend.
const MAX_SLEEP: Duration = Duration::from_secs(5);

/// Why the revocation lists could not be loaded or kept.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// The state file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The state file does not hold revocation lists.
    #[error(
        "{path}: not a revocation state file ({reason}); move it away to start with empty lists (the revocations it held are then forgotten)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The CRLs relying parties on this node are given.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CrlSet {
    /// DER CRLs, this agent's own first, then those from upstream for other issuers.
    pub ders: Vec<Vec<u8>>,
    /// DER of the CRLs this agent signed (what it reports upstream).
    pub own: Vec<Vec<u8>>,
}

/// One revoked certificate, as kept.
#[derive(Debug, Clone, Copy)]
struct Entry {
    revoked_at: SystemTime,
    reason: RevocationReason,
    /// The certificate's own expiry: the entry is dropped after it.
    not_after: SystemTime,
}

/// The last CRL signed for an issuer.
#[derive(Debug, Clone)]
struct Signed {
    der: Vec<u8>,
    this_update: SystemTime,
    next_update: SystemTime,
}

/// The revocation list of one CA.
struct IssuerList {
    /// DER of the CA's certificate.
    certificate: Vec<u8>,
    /// The CA's subject as DER: CRLs from elsewhere with this issuer are superseded by ours.
    subject: Vec<u8>,
    /// The CA with its key, while this process holds it; a list restored from disk for a CA
    /// no longer current has none and publishes its last CRL until that CRL's nextUpdate.
    ca: Option<Arc<SigningCa>>,
    /// The CA's expiry: after it the list is dropped.
    not_after: SystemTime,
    /// The last CRL number used.
    number: u64,
    /// By lowercase hex serial.
    entries: BTreeMap<String, Entry>,
    signed: Option<Signed>,
    /// Entries changed since `signed`.
    dirty: bool,
}

impl IssuerList {
    fn due(&self, now: SystemTime) -> bool {
        self.ca.is_some()
            && (self.dirty
                || self
                    .signed
                    .as_ref()
                    .is_none_or(|s| now >= s.this_update + CRL_LIFETIME / 2))
    }

    fn next_due(&self) -> Option<SystemTime> {
        self.ca.as_ref()?;
        Some(
            self.signed
                .as_ref()
                .map_or(SystemTime::UNIX_EPOCH, |s| s.this_update + CRL_LIFETIME / 2),
        )
    }
}

struct Lists {
    issuers: Vec<IssuerList>,
    /// CRLs from upstream (the roots' and other nodes'), already checked by the server.
    remote: Vec<Vec<u8>>,
    /// Something changed that the state file does not hold yet.
    unsaved: bool,
}

/// The agent's revocation lists and the CRL set it publishes.
pub struct Revocations {
    /// Held briefly; signing happens under it (one ECDSA signature per changed list).
    lists: Mutex<Lists>,
    /// Wakes the signing task after a change.
    wake: Notify,
    /// What relying parties are given; every Workload API stream reads it.
    published: watch::Sender<Arc<CrlSet>>,
    /// `state_dir/revocations.json`; `None` in tests that keep nothing.
    path: Option<PathBuf>,
}

impl Revocations {
    /// Lists restored from `path` (none if the file does not exist yet).
    pub fn open(path: Option<PathBuf>) -> Result<Arc<Self>, RevocationError> {
        let (issuers, remote) = match &path {
            Some(path) => load(path)?,
            None => (Vec::new(), Vec::new()),
        };
        let this = Arc::new(Self {
            lists: Mutex::new(Lists {
                issuers,
                remote,
                unsaved: false,
            }),
            wake: Notify::new(),
            published: watch::channel(Arc::new(CrlSet::default())).0,
            path,
        });
        this.publish(SystemTime::now());
        Ok(this)
    }

    /// A receiver of the CRL set, which changes whenever a CRL does.
    pub fn subscribe(&self) -> watch::Receiver<Arc<CrlSet>> {
        self.published.subscribe()
    }

    /// The CRL set as last published.
    pub fn current(&self) -> Arc<CrlSet> {
        self.published.borrow().clone()
    }

    /// Takes `ca` as a signer of CRLs (a new CA gets an empty list; a CA restored from disk gets
    /// its key back). Earlier CAs keep their lists until they expire.
    pub fn install_ca(&self, ca: &Arc<SigningCa>) {
        let mut lists = self.lock();
        match lists
            .issuers
            .iter_mut()
            .find(|l| l.certificate == ca.certificate)
        {
            Some(list) => {
                if list.ca.is_none() {
                    list.ca = Some(ca.clone());
                    list.dirty = true;
                }
            }
            None => lists.issuers.push(IssuerList {
                certificate: ca.certificate.clone(),
                subject: subject_der(&ca.certificate).unwrap_or_default(),
                ca: Some(ca.clone()),
                not_after: ca.not_after,
                number: 0,
                entries: BTreeMap::new(),
                signed: None,
                dirty: true,
            }),
        }
        drop(lists);
        self.wake.notify_one();
    }

    /// Revokes the certificate with serial `serial_hex`, signed by `ca`, which expires at
    /// `not_after`. False when it was already revoked (or `ca` is unknown here).
    pub fn revoke(
        &self,
        ca: &SigningCa,
        serial_hex: &str,
        not_after: SystemTime,
        reason: RevocationReason,
    ) -> bool {
        let mut lists = self.lock();
        let Some(list) = lists
            .issuers
            .iter_mut()
            .find(|l| l.certificate == ca.certificate && l.ca.is_some())
        else {
            tracing::warn!(serial = %serial_hex, "cannot revoke: its CA is no longer held");
            return false;
        };
        let added = add(list, serial_hex, not_after, reason);
        drop(lists);
        if added {
            self.wake.notify_one();
        }
        added
    }

    /// Revokes `serial_hex` in the list of every CA this agent can still sign for (the server
    /// orders revocations by serial; only one of them issued it, and the others' lists are not
    /// consulted for a serial they never signed). False when nothing was added.
    pub fn revoke_anywhere(
        &self,
        serial_hex: &str,
        not_after: SystemTime,
        reason: RevocationReason,
    ) -> bool {
        let mut lists = self.lock();
        let mut added = false;
        for list in lists.issuers.iter_mut().filter(|l| l.ca.is_some()) {
            added |= add(list, serial_hex, not_after, reason);
        }
        drop(lists);
        if added {
            self.wake.notify_one();
        }
        added
    }

    /// Whether `serial_hex` is revoked in any of this agent's lists.
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        self.lock()
            .issuers
            .iter()
            .any(|l| l.entries.contains_key(serial_hex))
    }

    /// Replaces the CRLs from upstream (every other issuer's, as the server last sent them).
    pub fn set_remote(&self, ders: Vec<Vec<u8>>) {
        {
            let mut lists = self.lock();
            if lists.remote == ders {
                return;
            }
            lists.remote = ders;
            lists.unsaved = true;
        }
        self.publish(SystemTime::now());
        // Kept on disk, so that a restart while the server is away still passes them on.
        self.wake.notify_one();
    }

    /// Signs what changed or is due, drops what expired, keeps and publishes the result; until
    /// `shutdown` resolves.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let now = SystemTime::now();
            let next = self.sign_due(now);
            // Written on the blocking pool: a slow disk holds up no async worker.
            if let Some((path, state)) = self.take_unsaved() {
                let saved = tokio::task::spawn_blocking(move || save(&path, &state)).await;
                if let Ok(Err(e)) = saved {
                    tracing::error!(error = %e, "cannot keep the revocation lists on disk");
                    self.lock().unsaved = true;
                }
            }
            let sleep_for = next
                .map(|at| at.duration_since(now).unwrap_or_default())
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            tokio::select! {
                _ = &mut shutdown => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep_for) => {}
            }
        }
    }

    /// What the state file should now hold, when something changed since it was written.
    fn take_unsaved(&self) -> Option<(PathBuf, StateFile)> {
        let path = self.path.clone()?;
        let mut lists = self.lock();
        if !lists.unsaved {
            return None;
        }
        lists.unsaved = false;
        Some((path, snapshot_of(&lists)))
    }

    /// Signs what is due, then writes the state file at once (for tests; the task writes it
    /// from the blocking pool).
    #[cfg(test)]
    fn sign_and_save(&self, now: SystemTime) {
        self.sign_due(now);
        if let Some((path, state)) = self.take_unsaved() {
            save(&path, &state).unwrap();
        }
    }

    /// One pass of [`run`](Self::run) without the writing; returns when the next CRL falls due.
    pub fn sign_due(&self, now: SystemTime) -> Option<SystemTime> {
        let mut changed = false;
        {
            let mut lists = self.lock();
            let before = lists.issuers.len();
            lists.issuers.retain(|l| {
                l.not_after > now
                    && (l.ca.is_some() || l.signed.as_ref().is_some_and(|s| s.next_update > now))
            });
            changed |= lists.issuers.len() != before;
            for list in &mut lists.issuers {
                let before = list.entries.len();
                list.entries.retain(|_, e| e.not_after > now);
                if list.entries.len() != before {
                    list.dirty = true;
                }
                if !list.due(now) {
                    continue;
                }
                let Some(ca) = list.ca.clone() else { continue };
                // Never below a number used before, even if the state file was lost.
                let number = (list.number + 1).max(unix_millis(now));
                let entries: Vec<Revoked> = list
                    .entries
                    .iter()
                    .filter_map(|(serial, e)| {
                        Some(Revoked {
                            serial: hex::decode(serial).ok()?,
                            revoked_at: e.revoked_at,
                            reason: e.reason,
                        })
                    })
                    .collect();
                match sign_crl(&ca, number, now, &entries) {
                    Ok(der) => {
                        let this_update = whole_seconds(now);
                        list.signed = Some(Signed {
                            der,
                            this_update,
                            next_update: this_update + CRL_LIFETIME,
                        });
                        list.number = number;
                        list.dirty = false;
                        changed = true;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot sign a CRL; retrying");
                    }
                }
            }
            lists.unsaved |= changed;
        }
        if changed {
            self.publish(now);
        }
        let lists = self.lock();
        let retry = lists
            .issuers
            .iter()
            .any(|l| l.dirty && l.ca.is_some())
            .then(|| now + Duration::from_secs(1));
        lists
            .issuers
            .iter()
            .filter_map(IssuerList::next_due)
            .chain(retry)
            .min()
    }

    fn publish(&self, now: SystemTime) {
        let lists = self.lock();
        let own: Vec<Vec<u8>> = lists
            .issuers
            .iter()
            .filter_map(|l| l.signed.as_ref())
            .filter(|s| is_current(s, now))
            .map(|s| s.der.clone())
            .collect();
        let own_subjects: Vec<&[u8]> = lists.issuers.iter().map(|l| l.subject.as_slice()).collect();
        let remote = lists.remote.iter().filter(|der| {
            parse_crl(der).is_ok_and(|info| !own_subjects.contains(&info.issuer_der.as_slice()))
        });
        let set = CrlSet {
            ders: own.iter().chain(remote).cloned().collect(),
            own,
        };
        drop(lists);
        self.published.send_if_modified(|current| {
            if **current == set {
                return false;
            }
            *current = Arc::new(set);
            true
        });
    }

    fn lock(&self) -> MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Publishes this agent's own CRLs to the server at once and after every change, for as long
/// as the server session lasts (the task is dropped with it). A refused or failed call is
/// retried with backoff; the next session publishes again from scratch.
pub async fn publish_upstream(revocations: Arc<Revocations>, channel: tonic::transport::Channel) {
    use crate::proto::tessera::PublishCrlsRequest;
    use crate::proto::tessera::node_client::NodeClient;
    let mut client = NodeClient::new(channel);
    let mut crls = revocations.subscribe();
    let mut backoff =
        crate::runtime::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut published: Option<Vec<Vec<u8>>> = None;
    loop {
        let own = crls.borrow_and_update().own.clone();
        if !own.is_empty() && published.as_ref() != Some(&own) {
            let request = PublishCrlsRequest { crls: own.clone() };
            match client.publish_crls(request).await {
                Ok(response) => {
                    // Refused ones stay refused (a CA from before a new attestation, say):
                    // said once, not retried until the set changes.
                    for reason in &response.get_ref().refused {
                        tracing::warn!(%reason, "the server refused one of this node's CRLs");
                    }
                    published = Some(own);
                    backoff.reset();
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), code = ?status.code(), "the server did not take this node's CRLs; retrying");
                    tokio::time::sleep(backoff.next_pause()).await;
                    continue;
                }
            }
        }
        if crls.changed().await.is_err() {
            return;
        }
    }
}

fn is_current(signed: &Signed, now: SystemTime) -> bool {
    signed.next_update > now
}

fn add(
    list: &mut IssuerList,
    serial_hex: &str,
    not_after: SystemTime,
    reason: RevocationReason,
) -> bool {
    if list.entries.contains_key(serial_hex) {
        return false;
    }
    list.entries.insert(
        serial_hex.to_owned(),
        Entry {
            revoked_at: SystemTime::now(),
            reason,
            not_after,
        },
    );
    list.dirty = true;
    true
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    issuers: Vec<IssuerState>,
    /// Hex DER of the CRLs last received from upstream.
    #[serde(default)]
    remote: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct IssuerState {
    /// Hex DER of the CA certificate.
    ca: String,
    number: u64,
    /// Hex DER of the last CRL signed, if any.
    crl: Option<String>,
    revoked: Vec<EntryState>,
}

#[derive(Serialize, Deserialize)]
struct EntryState {
    serial: String,
    revoked_at: i64,
    not_after: i64,
    reason: String,
}

fn snapshot_of(lists: &Lists) -> StateFile {
    StateFile {
        version: 1,
        remote: lists.remote.iter().map(hex::encode).collect(),
        issuers: lists
            .issuers
            .iter()
            .map(|l| IssuerState {
                ca: hex::encode(&l.certificate),
                number: l.number,
                crl: l.signed.as_ref().map(|s| hex::encode(&s.der)),
                revoked: l
                    .entries
                    .iter()
                    .map(|(serial, e)| EntryState {
                        serial: serial.clone(),
                        revoked_at: unix_seconds(e.revoked_at),
                        not_after: unix_seconds(e.not_after),
                        reason: reason_name(e.reason).to_owned(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn save(path: &Path, state: &StateFile) -> Result<(), RevocationError> {
    let json = serde_json::to_vec(state).map_err(|e| RevocationError::Corrupt {
        path: path.into(),
        reason: e.to_string(),
    })?;
    write_atomically(path, &json, 0o600).map_err(|source| RevocationError::Io {
        path: path.into(),
        source,
    })
}

fn from_seconds(s: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(s.max(0) as u64)
}

/// The issuers' lists and the remote CRLs kept in the state file.
type Loaded = (Vec<IssuerList>, Vec<Vec<u8>>);

fn load(path: &Path) -> Result<Loaded, RevocationError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(source) => {
            return Err(RevocationError::Io {
                path: path.into(),
                source,
            });
        }
    };
    let corrupt = |reason: String| RevocationError::Corrupt {
        path: path.into(),
        reason,
    };
    let state: StateFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if state.version != 1 {
        return Err(corrupt(format!(
            "version {} (this agent reads 1)",
            state.version
        )));
    }
    let remote = state
        .remote
        .iter()
        .map(|der| hex::decode(der).map_err(|e| corrupt(format!("remote: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let issuers = state
        .issuers
        .into_iter()
        .map(|issuer| {
            let certificate =
                hex::decode(&issuer.ca).map_err(|e| corrupt(format!("ca: {e}")))?;
            let subject = subject_der(&certificate)
                .ok_or_else(|| corrupt("ca: not an X.509 certificate".into()))?;
            let not_after = crate::ca::node::not_after_of(&certificate)
                .ok_or_else(|| corrupt("ca: not an X.509 certificate".into()))?;
            // A CRL that does not check against its CA is dropped: a new one is signed, or,
            // without the key, none is published.
            let signed = match &issuer.crl {
                Some(crl) => {
                    let der = hex::decode(crl).map_err(|e| corrupt(format!("crl: {e}")))?;
                    match check_crl(&der, &certificate) {
                        Ok(info) => Some(Signed {
                            der,
                            this_update: info.this_update,
                            next_update: info.next_update,
                        }),
                        Err(e) => {
                            tracing::warn!(file = %path.display(), error = %e, "dropping a stored CRL that does not check");
                            None
                        }
                    }
                }
                None => None,
            };
            let mut entries = BTreeMap::new();
            for e in issuer.revoked {
                if e.serial.is_empty() || hex::decode(&e.serial).is_err() {
                    return Err(corrupt(format!("serial {:?} is not hex", e.serial)));
                }
                entries.insert(
                    e.serial,
                    Entry {
                        revoked_at: from_seconds(e.revoked_at),
                        reason: reason_from_name(&e.reason),
                        not_after: from_seconds(e.not_after),
                    },
                );
            }
            Ok(IssuerList {
                certificate,
                subject,
                ca: None,
                not_after,
                number: issuer.number,
                entries,
                signed,
                dirty: false,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((issuers, remote))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::crl::CrlInfo;
    use crate::ca::generate_root;
    use crate::spiffe::TrustDomain;

    fn ca(name: &str) -> Arc<SigningCa> {
        let td = TrustDomain::new("example.org").unwrap();
        Arc::new(
            generate_root(&td, Duration::from_secs(86400), SystemTime::now(), 0, name)
                .unwrap()
                .0,
        )
    }

    fn own_crls(revocations: &Revocations) -> Vec<CrlInfo> {
        revocations
            .current()
            .own
            .iter()
            .map(|der| parse_crl(der).unwrap())
            .collect()
    }

    #[test]
    fn a_revocation_is_signed_into_the_cas_crl_once() {
        let revocations = Revocations::open(None).unwrap();
        let ca = ca("one");
        revocations.install_ca(&ca);
        let now = SystemTime::now();
        revocations.sign_due(now);
        let empty = own_crls(&revocations);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].revoked.is_empty());

        let expiry = now + 2 * CRL_LIFETIME;
        assert!(revocations.revoke(&ca, "4a01", expiry, RevocationReason::EntryRemoved));
        assert!(!revocations.revoke(&ca, "4a01", expiry, RevocationReason::Operator));
        revocations.sign_due(now);
        let crls = revocations.current();
        let info = check_crl(&crls.own[0], &ca.certificate).unwrap();
        assert!(info.number > empty[0].number);
        assert_eq!(info.find("4a01").unwrap().reason_code, Some(5));
        assert_eq!(crls.ders, crls.own);
        assert!(revocations.is_revoked("4a01"));

        // Nothing changed and nothing is due: the same CRL stays published.
        revocations.sign_due(now + Duration::from_secs(60));
        assert_eq!(revocations.current().own, crls.own);
        // At half of its life it is signed again, with a higher number.
        revocations.sign_due(now + CRL_LIFETIME / 2 + Duration::from_secs(1));
        let resigned = own_crls(&revocations);
        assert!(resigned[0].number > info.number);
        assert!(resigned[0].find("4a01").is_some());
        // Once the certificate has expired its entry goes.
        revocations.sign_due(expiry + Duration::from_secs(1));
        assert!(own_crls(&revocations)[0].revoked.is_empty());
    }

    #[test]
    fn the_lists_survive_a_restart_and_an_old_ca_is_published_until_its_crl_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revocations.json");
        let (old, new) = (ca("old"), ca("new"));
        let now = SystemTime::now();
        let expiry = now + 2 * CRL_LIFETIME;
        {
            let revocations = Revocations::open(Some(path.clone())).unwrap();
            revocations.install_ca(&old);
            revocations.install_ca(&new);
            revocations.revoke(&old, "0a0b", expiry, RevocationReason::EntryChanged);
            revocations.revoke(&new, "0c0d", expiry, RevocationReason::Operator);
            let upstream = sign_crl(&ca("upstream"), 3, now, &[]).unwrap();
            revocations.set_remote(vec![upstream]);
            revocations.sign_and_save(now);
            assert_eq!(revocations.current().own.len(), 2);
        }
        let revocations = Revocations::open(Some(path.clone())).unwrap();
        // Published at once from the file, before any CA is installed.
        let restored = own_crls(&revocations);
        assert_eq!(restored.len(), 2);
        assert_eq!(
            revocations.current().ders.len(),
            3,
            "the upstream CRL is kept too"
        );
        assert!(restored.iter().any(|c| c.find("0a0b").is_some()));
        revocations.install_ca(&new);
        revocations.sign_due(now);
        // A new revocation for the old CA cannot be signed without its key.
        assert!(!revocations.revoke(&old, "0e0f", expiry, RevocationReason::Operator));
        // The old CA's last CRL is published until its nextUpdate, then dropped.
        revocations.sign_due(now + CRL_LIFETIME + Duration::from_secs(1));
        let later = own_crls(&revocations);
        assert_eq!(later.len(), 1);
        assert!(later[0].find("0c0d").is_some());

        std::fs::write(&path, b"{not json").unwrap();
        let error = Revocations::open(Some(path.clone()))
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("revocations.json") && error.contains("move it away"),
            "{error}"
        );
    }

    #[test]
    fn a_crl_from_upstream_for_an_issuer_of_ours_is_not_passed_on() {
        let revocations = Revocations::open(None).unwrap();
        let (mine, other) = (ca("mine"), ca("other"));
        revocations.install_ca(&mine);
        revocations.sign_due(SystemTime::now());
        let stale_mine = sign_crl(&mine, 1, SystemTime::now(), &[]).unwrap();
        let others = sign_crl(&other, 1, SystemTime::now(), &[]).unwrap();
        revocations.set_remote(vec![stale_mine, others.clone(), b"garbage".to_vec()]);
        let set = revocations.current();
        assert_eq!(set.ders.len(), 2);
        assert_eq!(set.ders[1], others);
    }
}
