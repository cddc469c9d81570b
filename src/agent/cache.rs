//! The identity cache: one X.509-SVID per registration entry, minted on first need, shared by
//! every caller that matches the entry, and rotated by a single task that owns the schedule.
//!
//! Streams learn about every change (rotation, entry change, CA change, registration expiry)
//! through one `watch` generation counter and then read the state they need. A stream holds a
//! [`Lease`] on the entries it serves; an SVID whose entry nobody leases at rotation time is
//! dropped instead of renewed, so the agent mints only for identities in use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::revocation::{CrlSet, Revocations};
use crate::attest::CallerFacts;
use crate::ca::{CaError, LeafRequest, SigningCa, X509Svid, mint_x509_svid};
use crate::entry::{EntrySet, RegistrationEntry};
use crate::events::model::takes_out_of_use as revokes;
use crate::events::recorder::{RecordError, Recorder};
use crate::proto::tessera::RevocationReason;

/// Why an SVID could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// Minting failed.
    #[error(transparent)]
    Mint(#[from] CaError),
    /// The issuance event could not be recorded, so the SVID is not handed out.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// Freshly minted SVIDs kept being superseded (the CA changing under every attempt) or
    /// were expired at once (a CA past its end).
    #[error("entry {entry}: no minted SVID stayed valid after {attempts} attempts")]
    Unstable {
        /// The entry's id.
        entry: String,
        /// How many SVIDs were minted for it in this call.
        attempts: usize,
    },
}

/// How many times one call mints an entry before it gives up.
const MAX_MINT_ATTEMPTS: usize = 3;

/// How long to wait before retrying a failed renewal.
const RENEWAL_RETRY: Duration = Duration::from_secs(5);
/// Renewals are never scheduled sooner than this after minting, so that an SVID whose life is
/// cut short (by the CA's or the registration's expiry) cannot make the agent mint in a loop.
const MIN_RENEWAL_DELAY: Duration = Duration::from_millis(500);
/// The rotation task looks at the wall clock at least this often.
const MAX_SLEEP: Duration = Duration::from_secs(5);

/// One entry's current SVID and its place in the schedule.
#[derive(Clone)]
struct Cached {
    /// The entry version the SVID was minted for.
    entry: Arc<RegistrationEntry>,
    /// The SVID itself, shared with every stream that serves it.
    svid: Arc<X509Svid>,
    /// The CA that signed it: its CRL is where a revocation goes.
    ca: Arc<SigningCa>,
    /// When the rotation task renews (or, without demand, drops) it.
    renew_at: SystemTime,
}

struct State {
    /// Current entries, as last published by the entry source.
    entries: Arc<EntrySet>,
    /// Current signing CA, as last published by the signing authority.
    ca: Arc<SigningCa>,
    /// Counts the CAs installed: a stream tells a new CA from the one it sent by this number
    /// (an address could be reused by the next CA once the old one is freed).
    ca_generation: u64,
    /// SVIDs by entry id.
    svids: HashMap<String, Cached>,
    /// SVIDs replaced before their expiry (rotation, a new CA): a holder may still present
    /// one, so revoking its entry revokes these too. Dropped once expired.
    superseded: Vec<Cached>,
    /// The CRLs relying parties are given, as the revocation lists last published them.
    crls: Arc<CrlSet>,
    /// Counts CRL sets installed, so a stream tells a new set from the one it sent.
    crl_generation: u64,
    /// The leases of each entry id, by lease number, each with its stream's waker.
    demand: Demand,
}

/// The SVIDs a caller is entitled to, with the bundle they chain to.
pub struct Identities {
    /// In entry order; the first is the default identity.
    pub svids: Vec<(Arc<RegistrationEntry>, Arc<X509Svid>)>,
    /// The CA they were minted under (its bundle goes to workloads).
    pub ca: Arc<SigningCa>,
    /// Which CA that is: a new number for every CA installed.
    pub ca_generation: u64,
    /// The CRLs to send with them.
    pub crls: Arc<CrlSet>,
    /// Which CRL set that is: a new number for every set installed.
    pub crl_generation: u64,
}

/// One SVID leaving service for `reason`, with the CA whose CRL lists it if it must be.
struct Withdrawn {
    cached: Cached,
    reason: RevocationReason,
    /// False when whoever ordered it has recorded the event already (the server).
    record: bool,
    /// Why, in the words of whoever asked (an operator); empty otherwise.
    detail: String,
}

/// An SVID an operator's revocation took out of use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSvid {
    /// Lowercase hex serial.
    pub serial: String,
    /// Its entry.
    pub entry_id: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// Its not-after.
    pub not_after: SystemTime,
}

impl RevokedSvid {
    fn of(cached: &Cached) -> Self {
        Self {
            serial: cached.svid.serial_hex.clone(),
            entry_id: cached.entry.id.clone(),
            spiffe_id: cached.svid.spiffe_id.to_string(),
            not_after: cached.svid.not_after,
        }
    }
}

/// What an operator's revocation of one serial found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialRevocation {
    /// Revoked now.
    Revoked(RevokedSvid),
    /// It was revoked before.
    AlreadyRevoked,
    /// This agent has not served it since it started (or it has expired).
    Unknown,
}

/// Shared identity state of one agent.
pub struct IdentityCache {
    /// Everything mutable; held only briefly (at most one mint per entry while held).
    state: Mutex<State>,
    /// Bumped on every change every stream might need to send; streams subscribe to it.
    generation: watch::Sender<u64>,
    /// Bumped after every rotation that renewed or withdrew an SVID.
    rotated: watch::Sender<u64>,
    /// Wakes the rotation task when a new SVID enters the schedule.
    schedule_changed: Notify,
    /// Jitter source, so that SVIDs minted together do not all renew in the same instant.
    jitter_seed: Mutex<u64>,
    /// Records issuance and revocation; shared with the Workload API service for uses.
    recorder: Arc<Recorder>,
    /// The CRLs of the CAs this agent signs with; revocations are added there.
    revocations: Arc<Revocations>,
    /// One lock per entry being minted on demand, so that concurrent first callers of one
    /// entry mint it once; removed when no caller holds it.
    minting: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The next lease's number.
    next_lease: std::sync::atomic::AtomicU64,
}

impl IdentityCache {
    /// A cache serving `entries` under `ca`, recording with `recorder` and revoking into
    /// `revocations`.
    pub fn new(
        entries: Arc<EntrySet>,
        ca: Arc<SigningCa>,
        recorder: Arc<Recorder>,
        revocations: Arc<Revocations>,
    ) -> Arc<Self> {
        revocations.install_ca(&ca);
        let crls = revocations.current();
        let mut seed = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut seed);
        Arc::new(Self {
            state: Mutex::new(State {
                entries,
                ca,
                ca_generation: 0,
                svids: HashMap::new(),
                superseded: Vec::new(),
                crls,
                crl_generation: 0,
                demand: HashMap::new(),
            }),
            generation: watch::channel(0).0,
            rotated: watch::channel(0).0,
            schedule_changed: Notify::new(),
            jitter_seed: Mutex::new(u64::from_le_bytes(seed) | 1),
            recorder,
            revocations,
            minting: Mutex::new(HashMap::new()),
            next_lease: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The revocation lists this cache revokes into.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// The event recorder.
    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }

    /// A receiver that changes whenever every stream should recompute what it sends: the
    /// entries, the CA or the CRLs changed. A rotation wakes only the leases of its entry.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// A receiver that changes after every rotation that renewed or withdrew an SVID.
    pub fn rotations(&self) -> watch::Receiver<u64> {
        self.rotated.subscribe()
    }

    /// How many SVIDs are cached; only these are ever renewed.
    pub fn cached_svids(&self) -> usize {
        self.lock().svids.len()
    }

    /// Whether some stream currently serves entry `entry_id`'s SVID.
    pub fn in_demand(&self, entry_id: &str) -> bool {
        self.lock()
            .demand
            .get(entry_id)
            .is_some_and(|leases| !leases.is_empty())
    }

    /// Serials and not-afters of the unexpired SVIDs minted for entry `entry_id`, served or
    /// replaced.
    pub fn svids_of(&self, entry_id: &str) -> Vec<(String, SystemTime)> {
        let now = SystemTime::now();
        let state = self.lock();
        state
            .svids
            .get(entry_id)
            .into_iter()
            .chain(state.superseded.iter().filter(|c| c.entry.id == entry_id))
            .filter(|c| c.svid.not_after > now)
            .map(|c| (c.svid.serial_hex.clone(), c.svid.not_after))
            .collect()
    }

    /// The current entries.
    pub fn entries(&self) -> Arc<EntrySet> {
        self.lock().entries.clone()
    }

    /// The current signing CA.
    pub fn ca(&self) -> Arc<SigningCa> {
        self.lock().ca.clone()
    }

    /// The CRLs streams currently send.
    pub fn crls(&self) -> Arc<CrlSet> {
        self.lock().crls.clone()
    }

    /// SVIDs for `entries`, chosen from the entry set `snapshot`, minting any that are missing,
    /// expired or stale; `lease` is moved to exactly these entries in the same step. `None` when
    /// `snapshot` is no longer the current set (the caller recomputes its matches): an entry
    /// removed a moment ago is never minted.
    pub fn acquire(
        self: &Arc<Self>,
        snapshot: &Arc<EntrySet>,
        entries: &[Arc<RegistrationEntry>],
        lease: &mut Lease,
        caller: Option<&CallerFacts>,
    ) -> Result<Option<Identities>, IssueError> {
        let mut attempts: HashMap<String, usize> = HashMap::new();
        loop {
            let now = SystemTime::now();
            let mut state = self.lock();
            if !Arc::ptr_eq(snapshot, &state.entries) {
                return Ok(None);
            }
            let mut svids = Vec::with_capacity(entries.len());
            let mut missing = None;
            for entry in entries {
                match fresh_svid(&state, entry, now) {
                    Some(svid) => svids.push((entry.clone(), svid)),
                    None => {
                        missing = Some(entry.clone());
                        break;
                    }
                }
            }
            let Some(entry) = missing else {
                let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
                lease.move_to(&mut state.demand, ids);
                return Ok(Some(Identities {
                    svids,
                    ca: state.ca.clone(),
                    ca_generation: state.ca_generation,
                    crls: state.crls.clone(),
                    crl_generation: state.crl_generation,
                }));
            };
            let ca = state.ca.clone();
            drop(state);
            let tried = attempts.entry(entry.id.clone()).or_default();
            *tried += 1;
            if *tried > MAX_MINT_ATTEMPTS {
                return Err(IssueError::Unstable {
                    entry: entry.id.clone(),
                    attempts: MAX_MINT_ATTEMPTS,
                });
            }
            // Key generation and the issuance record happen outside the state lock, so
            // callers of other entries (and the rotation task) never wait behind them.
            if !self.mint_missing(snapshot, &ca, &entry, caller)? {
                return Ok(None);
            }
        }
    }

    /// Mints `entry`'s SVID under `ca` unless another caller has meanwhile; one caller at a
    /// time mints a given entry. False when the entry set changed meanwhile.
    fn mint_missing(
        &self,
        snapshot: &Arc<EntrySet>,
        ca: &Arc<SigningCa>,
        entry: &Arc<RegistrationEntry>,
        caller: Option<&CallerFacts>,
    ) -> Result<bool, IssueError> {
        let entry_lock = self
            .minting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(entry.id.clone())
            .or_default()
            .clone();
        let minted = {
            let _minting = entry_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.mint_unless_cached(snapshot, ca, entry, caller)
        };
        let mut minting = self.minting.lock().unwrap_or_else(|p| p.into_inner());
        // Clones are taken under this lock: two means only the map's and ours are left.
        if Arc::strong_count(&entry_lock) == 2 {
            minting.remove(&entry.id);
        }
        minted
    }

    /// The body of [`mint_missing`](Self::mint_missing), run holding the entry's mint lock.
    fn mint_unless_cached(
        &self,
        snapshot: &Arc<EntrySet>,
        ca: &Arc<SigningCa>,
        entry: &Arc<RegistrationEntry>,
        caller: Option<&CallerFacts>,
    ) -> Result<bool, IssueError> {
        let now = SystemTime::now();
        {
            let state = self.lock();
            if !Arc::ptr_eq(snapshot, &state.entries) {
                return Ok(false);
            }
            if fresh_svid(&state, entry, now).is_some() || !Arc::ptr_eq(ca, &state.ca) {
                // Someone minted it meanwhile, or the CA changed: look again.
                return Ok(true);
            }
        }
        let svid = Arc::new(mint(ca, entry, now)?);
        self.recorder.issued(entry, &svid, caller)?;
        tracing::info!(
            entry = %entry.id,
            spiffe_id = %svid.spiffe_id,
            serial = %svid.serial_hex,
            not_after = %humantime::format_rfc3339(svid.not_after),
            "issued X.509-SVID"
        );
        let renew_at = self.renewal_time(&svid);
        let mut state = self.lock();
        // An SVID minted under a CA that has just been replaced is never handed out.
        if Arc::ptr_eq(ca, &state.ca) && Arc::ptr_eq(snapshot, &state.entries) {
            let replaced = state.svids.insert(
                entry.id.clone(),
                Cached {
                    entry: entry.clone(),
                    svid,
                    ca: ca.clone(),
                    renew_at,
                },
            );
            if let Some(old) = replaced.filter(|old| old.svid.not_after > now) {
                state.superseded.push(old);
            }
        }
        drop(state);
        self.schedule_changed.notify_one();
        Ok(true)
    }

    /// Mints entry `entry_id`'s SVID now unless one is cached, so that its first caller finds
    /// it ready: a task's SVID is minted as the task starts (recorded with `caller`, the
    /// starter), while its process is still on its way to ask. A failure is only logged; that
    /// caller meets it again and is told.
    pub fn prepare(self: &Arc<Self>, entry_id: &str, caller: Option<&CallerFacts>) {
        // A set replaced meanwhile (another task started) is looked at again, a few times.
        for _ in 0..MAX_MINT_ATTEMPTS {
            let snapshot = self.entries();
            let Some(entry) = snapshot.get(entry_id).cloned() else {
                return;
            };
            let mut lease = self.lease();
            match self.acquire(&snapshot, &[entry], &mut lease, caller) {
                Ok(Some(_)) => return,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(entry = entry_id, %error, "cannot mint an SVID ahead of its first caller");
                    return;
                }
            }
        }
    }

    /// An empty lease, to be filled by [`acquire`](Self::acquire).
    pub fn lease(self: &Arc<Self>) -> Lease {
        Lease {
            cache: self.clone(),
            number: self
                .next_lease
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ids: Vec::new(),
            waker: Arc::new(Notify::new()),
        }
    }

    /// Installs a new entry set: SVIDs of removed or materially changed entries are dropped,
    /// and every stream recomputes.
    pub fn set_entries(&self, entries: Arc<EntrySet>) {
        let mut state = self.lock();
        if Arc::ptr_eq(&state.entries, &entries) {
            return;
        }
        let mut withdrawn = Vec::new();
        let mut revoked_entries = Vec::new();
        let mut replaced = Vec::new();
        let mut newly_superseded = Vec::new();
        for (id, cached) in state.svids.drain() {
            let reason = match entries.get(&id) {
                None => RevocationReason::EntryRemoved,
                Some(e) if e.revokes_holders_of(&cached.entry) => RevocationReason::EntryChanged,
                Some(e) if e.needs_new_certificate(&cached.entry) => RevocationReason::Superseded,
                Some(_) => {
                    replaced.push((id, cached));
                    continue;
                }
            };
            if revokes(reason) {
                revoked_entries.push((id, reason));
            } else if cached.svid.not_after > SystemTime::now() {
                // Replaced, not revoked: its holder may use it until it expires.
                newly_superseded.push(cached.clone());
            }
            withdrawn.push(Withdrawn {
                cached,
                reason,
                record: true,
                detail: String::new(),
            });
        }
        state.svids.extend(replaced);
        state.superseded.extend(newly_superseded);
        // Earlier SVIDs of a revoked entry go with it; an entry that was removed or changed
        // while nothing was cached for it still has its superseded ones revoked.
        for (id, previous) in superseded_entries(&state) {
            if revoked_entries.iter().any(|(r, _)| *r == id) {
                continue;
            }
            match entries.get(&id) {
                None => revoked_entries.push((id, RevocationReason::EntryRemoved)),
                Some(e) if e.revokes_holders_of(&previous) => {
                    revoked_entries.push((id, RevocationReason::EntryChanged))
                }
                Some(_) => {}
            }
        }
        let superseded = std::mem::take(&mut state.superseded);
        for cached in superseded {
            match revoked_entries
                .iter()
                .find(|(id, _)| *id == cached.entry.id)
            {
                Some((_, reason)) => withdrawn.push(Withdrawn {
                    cached,
                    reason: *reason,
                    record: true,
                    detail: String::new(),
                }),
                None => state.superseded.push(cached),
            }
        }
        state.entries = entries;
        drop(state);
        self.record_revocations(withdrawn);
        // The rotation task looks again: the set may bring a nearer registration expiry.
        self.schedule_changed.notify_one();
        self.bump();
    }

    /// Revokes every live SVID of entry `entry_id` this agent minted (the one served and any
    /// it replaced) for `reason`, with the operator's `detail`; a holder that still matches
    /// gets a fresh one at once. Returns those revoked.
    pub fn revoke_entry(
        &self,
        entry_id: &str,
        reason: RevocationReason,
        detail: &str,
    ) -> Vec<RevokedSvid> {
        let mut state = self.lock();
        let mut withdrawn: Vec<Withdrawn> = state
            .svids
            .remove(entry_id)
            .into_iter()
            .map(|cached| Withdrawn {
                cached,
                reason,
                record: true,
                detail: String::new(),
            })
            .collect();
        let (gone, kept) = std::mem::take(&mut state.superseded)
            .into_iter()
            .partition(|c| c.entry.id == entry_id);
        state.superseded = kept;
        withdrawn.extend(gone.into_iter().map(|cached| Withdrawn {
            cached,
            reason,
            record: true,
            detail: String::new(),
        }));
        drop(state);
        let now = SystemTime::now();
        withdrawn.retain(|w| w.cached.svid.not_after > now);
        for w in &mut withdrawn {
            w.detail = detail.to_owned();
        }
        let revoked = withdrawn
            .iter()
            .map(|w| RevokedSvid::of(&w.cached))
            .collect();
        self.record_revocations(withdrawn);
        self.bump();
        revoked
    }

    /// An operator's revocation of the SVID with serial `serial_hex` on a standalone agent:
    /// found among those served or replaced since the agent started, revoked with `detail`,
    /// and replaced at once for its holders.
    pub fn revoke_known_serial(&self, serial_hex: &str, detail: &str) -> SerialRevocation {
        if self.revocations.is_revoked(serial_hex) {
            return SerialRevocation::AlreadyRevoked;
        }
        let now = SystemTime::now();
        let cached = take_serial(&mut self.lock(), serial_hex);
        match cached.filter(|c| c.svid.not_after > now) {
            Some(cached) => {
                let revoked = RevokedSvid::of(&cached);
                self.record_revocations(vec![Withdrawn {
                    cached,
                    reason: RevocationReason::Operator,
                    record: true,
                    detail: detail.to_owned(),
                }]);
                self.bump();
                SerialRevocation::Revoked(revoked)
            }
            None => SerialRevocation::Unknown,
        }
    }

    /// Revokes the SVID with serial `serial_hex` for `reason`, an order from the server (which
    /// recorded the event). Served, it is replaced at once; unknown here (minted before a
    /// restart), it is listed by every CA this agent signs for, until `not_after`. False when it
    /// was already revoked.
    pub fn revoke_serial(
        &self,
        serial_hex: &str,
        not_after: SystemTime,
        reason: RevocationReason,
    ) -> bool {
        if self.revocations.is_revoked(serial_hex) {
            return false;
        }
        let cached = take_serial(&mut self.lock(), serial_hex);
        match cached {
            Some(cached) => {
                self.record_revocations(vec![Withdrawn {
                    cached,
                    reason,
                    record: false,
                    detail: String::new(),
                }]);
                self.bump();
                true
            }
            None => self
                .revocations
                .revoke_anywhere(serial_hex, not_after, reason),
        }
    }

    /// Installs a new CRL set; streams send it.
    pub fn set_crls(&self, crls: Arc<CrlSet>) {
        let mut state = self.lock();
        if state.crls == crls {
            return;
        }
        state.crls = crls;
        state.crl_generation += 1;
        drop(state);
        self.bump();
    }

    /// Installs a new signing CA. A new signer means every SVID is re-minted under it on next
    /// need; a new bundle with the same signer (a root published ahead of use) keeps them.
    pub fn set_ca(&self, ca: Arc<SigningCa>) {
        let mut state = self.lock();
        let same_signer = state.ca.bundle.first() == ca.bundle.first()
            && state.ca.intermediates == ca.intermediates
            && state.ca.not_after == ca.not_after;
        let revoked: Vec<_> = if same_signer {
            Vec::new()
        } else {
            state
                .svids
                .drain()
                .map(|(_, cached)| Withdrawn {
                    cached,
                    reason: RevocationReason::CaRotated,
                    record: true,
                    detail: String::new(),
                })
                .collect()
        };
        // Replaced, not revoked: their holders may use them until they expire.
        let now = SystemTime::now();
        state.superseded.extend(
            revoked
                .iter()
                .filter(|w| w.cached.svid.not_after > now)
                .map(|w| w.cached.clone()),
        );
        state.ca = ca.clone();
        state.ca_generation += 1;
        drop(state);
        self.revocations.install_ca(&ca);
        self.record_revocations(revoked);
        self.bump();
    }

    /// Withdraws every entry and SVID at once for `reason` (the node was evicted); streams
    /// recompute and find nothing left. In one step, so that no stream re-mints in between.
    pub fn revoke_all(&self, reason: RevocationReason) {
        let mut state = self.lock();
        state.entries = Arc::new(EntrySet::default());
        let superseded = std::mem::take(&mut state.superseded);
        let revoked: Vec<_> = state
            .svids
            .drain()
            .map(|(_, cached)| cached)
            .chain(superseded)
            .map(|cached| Withdrawn {
                cached,
                reason,
                record: true,
                detail: String::new(),
            })
            .collect();
        drop(state);
        self.record_revocations(revoked);
        self.bump();
    }

    /// Renews due SVIDs that are in demand and drops the others; returns the next renewal time.
    /// Minting and recording happen outside the state lock: streams keep reading meanwhile.
    pub fn rotate_due(&self, now: SystemTime) -> Option<SystemTime> {
        // The entries whose streams must send again: only theirs are woken.
        let mut changed: Vec<String> = Vec::new();
        let mut expired = Vec::new();
        let mut renew = Vec::new();
        let ca = {
            let mut state = self.lock();
            let due: Vec<String> = state
                .svids
                .iter()
                .filter(|(_, c)| c.renew_at <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in due {
                let in_demand = state.demand.get(&id).is_some_and(|l| !l.is_empty());
                let entry = state
                    .entries
                    .get(&id)
                    .filter(|e| !e.is_expired(now))
                    .cloned();
                match (in_demand, entry) {
                    (true, Some(entry)) => renew.push((id, entry)),
                    _ => {
                        if let Some(cached) = state.svids.remove(&id)
                            && in_demand
                        {
                            expired.push(cached);
                        }
                        // A stream still serves it (its registration expired): make it recompute.
                        if in_demand {
                            changed.push(id);
                        }
                    }
                }
            }
            state.superseded.retain(|c| c.svid.not_after > now);
            state.ca.clone()
        };
        for cached in expired {
            self.recorder.revoked(
                &cached.entry,
                &cached.svid,
                RevocationReason::RegistrationExpired,
            );
        }
        let renewed: Vec<_> = renew
            .into_iter()
            .map(|(id, entry)| {
                let minted = mint(&ca, &entry, now)
                    .map_err(IssueError::from)
                    .and_then(|svid| {
                        self.recorder.issued(&entry, &svid, None)?;
                        Ok(svid)
                    });
                (id, entry, minted)
            })
            .collect();
        let mut state = self.lock();
        for (id, entry, minted) in renewed {
            match minted {
                // Kept only if nothing replaced the CA or removed the entry meanwhile; whoever
                // did has already told every stream to recompute.
                Ok(svid) if Arc::ptr_eq(&ca, &state.ca) && state.svids.contains_key(&id) => {
                    tracing::info!(
                        entry = %id,
                        spiffe_id = %svid.spiffe_id,
                        serial = %svid.serial_hex,
                        not_after = %humantime::format_rfc3339(svid.not_after),
                        "rotated X.509-SVID"
                    );
                    let svid = Arc::new(svid);
                    let renew_at = self.renewal_time(&svid);
                    let replaced = state.svids.insert(
                        id.clone(),
                        Cached {
                            entry,
                            svid,
                            ca: ca.clone(),
                            renew_at,
                        },
                    );
                    if let Some(old) = replaced.filter(|old| old.svid.not_after > now) {
                        state.superseded.push(old);
                    }
                    changed.push(id);
                }
                Ok(_) => {}
                Err(e) => {
                    let Some(cached) = state.svids.get_mut(&id) else {
                        continue;
                    };
                    if cached.svid.not_after <= now {
                        tracing::error!(entry = %id, error = %e, "renewal failed and the SVID has expired; withdrawing it");
                        state.svids.remove(&id);
                        changed.push(id);
                    } else {
                        tracing::error!(entry = %id, error = %e, "renewal failed; retrying");
                        cached.renew_at = (now + RENEWAL_RETRY).min(cached.svid.not_after);
                    }
                }
            }
        }
        let next_renewal = state.svids.values().map(|c| c.renew_at).min();
        let wakers: Vec<Arc<Notify>> = changed
            .iter()
            .filter_map(|id| state.demand.get(id))
            .flat_map(|leases| leases.values().cloned())
            .collect();
        drop(state);
        for waker in wakers {
            waker.notify_one();
        }
        if !changed.is_empty() {
            self.rotated.send_modify(|n| *n += 1);
        }
        next_renewal
    }

    /// Records revocations taken out of the state; called after its lock is released.
    /// Revocations also go into the signing CA's CRL while the certificate is valid.
    fn record_revocations(&self, withdrawn: Vec<Withdrawn>) {
        let now = SystemTime::now();
        for Withdrawn {
            cached,
            reason,
            record,
            detail,
        } in withdrawn
        {
            let svid = &cached.svid;
            if revokes(reason) && svid.not_after > now {
                self.revocations
                    .revoke(&cached.ca, &svid.serial_hex, svid.not_after, reason);
            }
            if record {
                self.recorder
                    .revoked_for(&cached.entry, svid, reason, &detail);
            }
        }
    }

    /// Tells every stream to recompute (e.g. a registration expired).
    pub fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Runs the rotation schedule until `shutdown` resolves. The only task that renews SVIDs.
    ///
    /// Deadlines are wall-clock instants (certificate validity is), while timers are monotonic:
    /// the task re-checks the wall clock at least every `MAX_SLEEP`, so a suspended VM or a
    /// clock step cannot leave expired SVIDs on open streams for long.
    pub async fn run_rotation(
        self: Arc<Self>,
        mut ca: watch::Receiver<Arc<SigningCa>>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut crls = self.revocations.subscribe();
        self.set_crls(crls.borrow_and_update().clone());
        let mut expiries_checked_until = SystemTime::now();
        loop {
            let now = SystemTime::now();
            let entries_now = self.entries();
            // Any registration that expired since the last pass, whatever woke this one.
            if entries_now
                .next_expiry_after(expiries_checked_until)
                .is_some_and(|at| at <= now)
            {
                self.bump();
            }
            expiries_checked_until = now;
            let next_renewal = self.rotate_due(now);
            let next_expiry = entries_now.next_expiry_after(now);
            let wake_at = [next_renewal, next_expiry].into_iter().flatten().min();
            let sleep_for = wake_at
                .map(|at| at.duration_since(now).unwrap_or_default())
                .unwrap_or(MAX_SLEEP)
                .min(MAX_SLEEP);
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep_until(Instant::now() + sleep_for) => {}
                _ = self.schedule_changed.notified() => {}
                changed = ca.changed() => {
                    if changed.is_err() { return; }
                    let current = ca.borrow_and_update().clone();
                    self.set_ca(current);
                }
                changed = crls.changed() => {
                    if changed.is_err() { return; }
                    let current = crls.borrow_and_update().clone();
                    self.set_crls(current);
                }
            }
        }
    }

    /// Half of the usable lifetime, ±10% jitter, measured from minting.
    fn renewal_time(&self, svid: &X509Svid) -> SystemTime {
        let life = svid.lifetime();
        // xorshift64: cheap, and good enough to spread renewals.
        let mut seed = self.jitter_seed.lock().unwrap_or_else(|p| p.into_inner());
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let permille = 400 + (*seed % 201); // 40.0% .. 60.0% of the lifetime
        svid.issued_at
            + life
                .mul_f64(permille as f64 / 1000.0)
                .max(MIN_RENEWAL_DELAY)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic in a caller: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Takes the SVID with serial `serial_hex` out of the cache, served or superseded.
fn take_serial(state: &mut State, serial_hex: &str) -> Option<Cached> {
    let served = state
        .svids
        .iter()
        .find(|(_, c)| c.svid.serial_hex == serial_hex)
        .map(|(id, _)| id.clone());
    match served {
        Some(id) => state.svids.remove(&id),
        None => state
            .superseded
            .iter()
            .position(|c| c.svid.serial_hex == serial_hex)
            .map(|at| state.superseded.swap_remove(at)),
    }
}

/// Entry ids with superseded SVIDs, each with the entry version one of them was minted for.
fn superseded_entries(state: &State) -> Vec<(String, Arc<RegistrationEntry>)> {
    let mut seen: Vec<(String, Arc<RegistrationEntry>)> = Vec::new();
    for cached in &state.superseded {
        if !seen.iter().any(|(id, _)| *id == cached.entry.id) {
            seen.push((cached.entry.id.clone(), cached.entry.clone()));
        }
    }
    seen
}

/// `entry`'s cached SVID, if it was minted for this entry (or a version that needs no new
/// certificate) and has not expired.
fn fresh_svid(
    state: &State,
    entry: &Arc<RegistrationEntry>,
    now: SystemTime,
) -> Option<Arc<X509Svid>> {
    state
        .svids
        .get(&entry.id)
        .filter(|c| Arc::ptr_eq(&c.entry, entry) || !entry.needs_new_certificate(&c.entry))
        .filter(|c| c.svid.not_after > now)
        .map(|c| c.svid.clone())
}

fn mint(ca: &SigningCa, entry: &RegistrationEntry, now: SystemTime) -> Result<X509Svid, CaError> {
    mint_x509_svid(
        ca,
        &LeafRequest {
            spiffe_id: &entry.spiffe_id,
            ttl: entry.x509_ttl,
            dns_names: &entry.dns_names,
            not_after_cap: entry.expires_at,
            task: entry.task.as_deref(),
        },
        now,
    )
}

/// A stream's claim on the entries it currently serves; released on drop.
pub struct Lease {
    cache: Arc<IdentityCache>,
    /// This lease's number among the cache's.
    number: u64,
    /// The entries it holds.
    ids: Vec<String>,
    /// Woken when one of its entries' SVIDs is rotated or withdrawn, and only then; changes
    /// every stream must see (a CA, CRLs, the entry set) go through the cache's generation.
    waker: Arc<Notify>,
}

impl Lease {
    fn move_to(&mut self, demand: &mut Demand, ids: Vec<String>) {
        for id in &ids {
            demand
                .entry(id.clone())
                .or_default()
                .insert(self.number, self.waker.clone());
        }
        let kept: std::collections::HashSet<&String> = ids.iter().collect();
        let dropped: Vec<String> = self
            .ids
            .iter()
            .filter(|id| !kept.contains(id))
            .cloned()
            .collect();
        release(demand, self.number, &dropped);
        self.ids = ids;
    }

    /// What wakes the lease's stream when one of its SVIDs is rotated.
    pub fn waker(&self) -> Arc<Notify> {
        self.waker.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.cache.lock();
        release(&mut state.demand, self.number, &self.ids);
    }
}

/// The leases of each entry id.
type Demand = HashMap<String, HashMap<u64, Arc<Notify>>>;

fn release(demand: &mut Demand, lease: u64, ids: &[String]) {
    for id in ids {
        if let Some(leases) = demand.get_mut(id) {
            leases.remove(&lease);
            if leases.is_empty() {
                demand.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::LocalCaSource;
    use crate::entry::tests::entry;

    /// A standalone CA for trust domain `td`, made in a directory that is gone once it is made.
    fn generated_ca() -> SigningCa {
        let dir = tempfile::tempdir().unwrap();
        let td = crate::spiffe::TrustDomain::new("td").unwrap();
        crate::ca::load_or_create_local_ca(
            &LocalCaSource::Generated {
                state_dir: dir.path().into(),
                ttl: Duration::from_secs(86400),
            },
            &td,
        )
        .unwrap()
    }

    fn setup(ttl: Duration) -> Arc<IdentityCache> {
        let ca = generated_ca();
        let mut a = entry("a", "spiffe://td/a", &["unix:uid:1"]);
        a.x509_ttl = ttl;
        let b = entry("b", "spiffe://td/b", &["unix:uid:1"]);
        IdentityCache::new(
            Arc::new(EntrySet::new(vec![a, b])),
            Arc::new(ca),
            crate::events::recorder::tests::memory_recorder().0,
            crate::agent::revocation::Revocations::open(None).unwrap(),
        )
    }

    #[test]
    fn every_installed_ca_gets_a_new_generation_even_at_the_same_address() {
        let cache = setup(Duration::from_secs(100));
        let entries = cache.entries();
        let mut lease = cache.lease();
        let before = cache
            .acquire(&entries, &entries.entries[..1], &mut lease, None)
            .unwrap()
            .unwrap();
        // The same allocation published again, as a freed CA's address can be reused by the
        // next one: streams must still see a new CA.
        cache.set_ca(before.ca.clone());
        let after = cache
            .acquire(&entries, &entries.entries[..1], &mut lease, None)
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&before.ca, &after.ca));
        assert_ne!(before.ca_generation, after.ca_generation);
    }

    #[test]
    fn prepare_mints_once_and_the_first_caller_is_served_that_svid() {
        let cache = setup(Duration::from_secs(100));
        assert!(cache.svids_of("a").is_empty());
        cache.prepare("a", None);
        let minted = cache.svids_of("a");
        assert_eq!(minted.len(), 1, "{minted:?}");
        cache.prepare("a", None);
        assert_eq!(
            cache.svids_of("a"),
            minted,
            "a second prepare mints nothing"
        );
        cache.prepare("no-such-entry", None);
        let entries = cache.entries();
        let mut lease = cache.lease();
        let served = cache
            .acquire(&entries, &entries.entries[..1], &mut lease, None)
            .unwrap()
            .unwrap();
        assert_eq!(served.svids[0].1.serial_hex, minted[0].0);
    }

    #[tokio::test]
    async fn shares_one_svid_per_entry_and_renews_only_what_is_leased() {
        let cache = setup(Duration::from_secs(100));
        let entries = cache.entries();
        let mut first = cache.lease();
        let mut second = cache.lease();
        let a = cache
            .acquire(&entries, &entries.entries[..1], &mut first, None)
            .unwrap()
            .unwrap();
        let a2 = cache
            .acquire(&entries, &entries.entries[..1], &mut second, None)
            .unwrap()
            .unwrap();
        assert!(
            Arc::ptr_eq(&a.svids[0].1, &a2.svids[0].1),
            "matching callers share the SVID"
        );
        let b = cache
            .acquire(&entries, &entries.entries[1..], &mut cache.lease(), None)
            .unwrap()
            .unwrap();
        let b_serial = b.svids[0].1.serial_hex.clone();

        // Past every renewal time: `a` is leased and renewed, `b`'s lease is gone so it is dropped.
        let later = SystemTime::now() + Duration::from_secs(190);
        let generation = cache.subscribe();
        let mut rotations = cache.rotations();
        let idle = cache.lease();
        cache.rotate_due(later);
        // Only the streams holding `a` are woken; the generation every stream follows stays.
        let woken = |lease: &Lease| {
            let waker = lease.waker();
            async move {
                tokio::time::timeout(Duration::ZERO, waker.notified())
                    .await
                    .is_ok()
            }
        };
        assert!(woken(&first).await && woken(&second).await);
        assert!(!woken(&idle).await);
        assert!(!generation.has_changed().unwrap());
        assert!(rotations.has_changed().unwrap());
        rotations.mark_unchanged();
        let state = cache.lock();
        assert_ne!(state.svids["a"].svid.serial_hex, a.svids[0].1.serial_hex);
        assert!(!state.svids.contains_key("b"));
        drop(state);
        let b_again = cache
            .acquire(&entries, &entries.entries[1..], &mut cache.lease(), None)
            .unwrap()
            .unwrap();
        assert_ne!(b_again.svids[0].1.serial_hex, b_serial);

        drop((first, second));
        assert!(!cache.lock().demand.contains_key("a"));
    }

    /// Holds the first critical event it is given until `release` is sent; keeps the rest.
    struct GatedLog {
        entered: std::sync::mpsc::SyncSender<()>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
        first: std::sync::atomic::AtomicBool,
    }

    impl crate::events::recorder::EventLog for Arc<GatedLog> {
        fn append(
            &self,
            critical: bool,
            _: &crate::proto::tessera::Event,
        ) -> Result<(), crate::events::recorder::LogError> {
            if critical && !self.first.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let _ = self.entered.send(());
                let _ = self.release.lock().unwrap().recv();
            }
            Ok(())
        }
        fn sync(&self) -> Result<(), crate::events::recorder::LogError> {
            Ok(())
        }
    }

    #[test]
    fn a_slow_issuance_does_not_hold_up_other_callers() {
        let ca = generated_ca();
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (release, release_rx) = std::sync::mpsc::channel();
        let log = Arc::new(GatedLog {
            entered: entered_tx,
            release: Mutex::new(release_rx),
            first: Default::default(),
        });
        let recorder = Arc::new(Recorder::new("td", "n1", Box::new(log)));
        let set = Arc::new(EntrySet::new(vec![
            entry("a", "spiffe://td/a", &["unix:uid:1"]),
            entry("b", "spiffe://td/b", &["unix:uid:1"]),
        ]));
        let cache = IdentityCache::new(
            set.clone(),
            Arc::new(ca),
            recorder,
            crate::agent::revocation::Revocations::open(None).unwrap(),
        );
        let (a, b) = (set.get("a").unwrap().clone(), set.get("b").unwrap().clone());

        let slow = std::thread::spawn({
            let (cache, set) = (cache.clone(), set.clone());
            move || {
                let mut lease = cache.lease();
                cache
                    .acquire(&set, &[a], &mut lease, None)
                    .unwrap()
                    .is_some()
            }
        });
        entered
            .recv_timeout(Duration::from_secs(30))
            .expect("the first issuance reached the log");
        // While that issuance is held, another entry is minted and served, and the cache read.
        let (done_tx, done) = std::sync::mpsc::channel();
        let fast = std::thread::spawn({
            let (cache, set) = (cache.clone(), set.clone());
            move || {
                let mut lease = cache.lease();
                let served = cache.acquire(&set, &[b], &mut lease, None).unwrap();
                let _ = cache.entries();
                let _ = done_tx.send(served.map(|ids| ids.svids.len()));
            }
        });
        let served = done.recv_timeout(Duration::from_secs(30));
        release.send(()).unwrap();
        assert_eq!(
            served,
            Ok(Some(1)),
            "a caller of another entry waited behind a slow issuance"
        );
        assert!(slow.join().unwrap());
        fast.join().unwrap();
    }

    #[test]
    fn renewal_lands_between_40_and_60_percent_of_life() {
        // A short TTL: the back-dating of not-before must not pull renewal into the past.
        let cache = setup(Duration::from_secs(6));
        let entries = cache.entries();
        for _ in 0..50 {
            cache.set_entries(entries.clone());
            let ids = cache
                .acquire(&entries, &entries.entries[..1], &mut cache.lease(), None)
                .unwrap()
                .unwrap();
            let svid = &ids.svids[0].1;
            let renew = cache.lock().svids["a"].renew_at;
            let life = svid.lifetime();
            let at = renew.duration_since(svid.issued_at).unwrap();
            assert!(
                at >= life.mul_f64(0.4) && at <= life.mul_f64(0.6),
                "{at:?} of {life:?}"
            );
            cache.lock().svids.clear();
        }
    }

    #[test]
    fn revocations_reach_the_crl_and_superseded_svids_go_with_their_entry() {
        let cache = setup(Duration::from_secs(100));
        let revocations = cache.revocations().clone();
        let entries = cache.entries();
        let mut lease = cache.lease();
        let first = cache
            .acquire(&entries, &entries.entries, &mut lease, None)
            .unwrap()
            .unwrap();
        let (first_a, first_b) = (
            first.svids[0].1.serial_hex.clone(),
            first.svids[1].1.serial_hex.clone(),
        );

        // A longer lifetime only supersedes: the old certificate stays valid, not revoked.
        let mut longer_a = (*entries.entries[0]).clone();
        longer_a.x509_ttl = Duration::from_secs(200);
        let b = (*entries.entries[1]).clone();
        cache.set_entries(Arc::new(EntrySet::new(vec![longer_a.clone(), b.clone()])));
        assert!(!revocations.is_revoked(&first_a));
        let entries = cache.entries();
        let second = cache
            .acquire(&entries, &entries.entries, &mut lease, None)
            .unwrap()
            .unwrap();
        let second_a = second.svids[0].1.serial_hex.clone();
        assert_ne!(second_a, first_a);

        // New selectors change who may hold it: both of a's certificates are revoked.
        let mut moved_a = longer_a.clone();
        moved_a.selectors = crate::entry::tests::entry("x", "spiffe://td/a", &["unix:uid:2"])
            .selectors
            .clone();
        cache.set_entries(Arc::new(EntrySet::new(vec![moved_a, b])));
        assert!(revocations.is_revoked(&first_a), "the superseded one too");
        assert!(revocations.is_revoked(&second_a));
        assert!(!revocations.is_revoked(&first_b));

        // An operator's revocation of b replaces it at once for its holders.
        let revoked = cache.revoke_entry("b", RevocationReason::Operator, "test");
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].serial, first_b);
        assert!(revocations.is_revoked(&first_b));
        let entries = cache.entries();
        let b_only: Vec<_> = entries
            .entries
            .iter()
            .filter(|e| e.id == "b")
            .cloned()
            .collect();
        let fresh = cache
            .acquire(&entries, &b_only, &mut lease, None)
            .unwrap()
            .unwrap();
        assert_ne!(fresh.svids[0].1.serial_hex, first_b);
        // A server order for a serial it no longer serves is a no-op the second time.
        let not_after = SystemTime::now() + Duration::from_secs(60);
        assert!(!cache.revoke_serial(&first_b, not_after, RevocationReason::Operator));
        assert!(cache.revoke_serial(
            &fresh.svids[0].1.serial_hex,
            not_after,
            RevocationReason::Operator
        ));
        assert_eq!(
            cache.cached_svids(),
            0,
            "the revoked SVID is no longer served"
        );
    }

    #[test]
    fn entry_changes_drop_only_affected_svids() {
        let cache = setup(Duration::from_secs(100));
        let entries = cache.entries();
        let mut lease = cache.lease();
        cache
            .acquire(&entries, &entries.entries, &mut lease, None)
            .unwrap()
            .unwrap();
        let mut changed_a = (*entries.entries[0]).clone();
        changed_a.x509_ttl = Duration::from_secs(50);
        let mut hinted_b = (*entries.entries[1]).clone();
        hinted_b.hint = Some("h".into());
        cache.set_entries(Arc::new(EntrySet::new(vec![changed_a, hinted_b])));
        let state = cache.lock();
        assert!(
            !state.svids.contains_key("a"),
            "TTL change needs a new certificate"
        );
        assert!(state.svids.contains_key("b"), "a hint change does not");
    }

    #[test]
    fn a_root_published_ahead_keeps_svids_and_a_new_signer_replaces_them() {
        let dir = tempfile::tempdir().unwrap();
        let td = crate::spiffe::TrustDomain::new("td").unwrap();
        let source = LocalCaSource::Generated {
            state_dir: dir.path().into(),
            ttl: Duration::from_secs(86400),
        };
        let first = Arc::new(crate::ca::load_or_create_local_ca(&source, &td).unwrap());
        let set = Arc::new(EntrySet::new(vec![entry(
            "a",
            "spiffe://td/a",
            &["unix:uid:1"],
        )]));
        let cache = IdentityCache::new(
            set.clone(),
            first.clone(),
            crate::events::recorder::tests::memory_recorder().0,
            crate::agent::revocation::Revocations::open(None).unwrap(),
        );
        let mut lease = cache.lease();
        let before = cache
            .acquire(&set, &set.entries, &mut lease, None)
            .unwrap()
            .unwrap();

        let prepared =
            crate::ca::renew_local_ca(&source, &td, &first, crate::ca::RenewalStep::Prepare)
                .unwrap()
                .unwrap();
        cache.set_ca(Arc::new(prepared));
        let during = cache
            .acquire(&set, &set.entries, &mut lease, None)
            .unwrap()
            .unwrap();
        assert!(
            Arc::ptr_eq(&before.svids[0].1, &during.svids[0].1),
            "same signer: SVID kept"
        );
        assert_eq!(during.ca.bundle.len(), 2, "the next root is served");

        let active =
            crate::ca::renew_local_ca(&source, &td, &during.ca, crate::ca::RenewalStep::Activate)
                .unwrap()
                .unwrap();
        cache.set_ca(Arc::new(active));
        let after = cache
            .acquire(&set, &set.entries, &mut lease, None)
            .unwrap()
            .unwrap();
        assert_ne!(
            after.svids[0].1.serial_hex, before.svids[0].1.serial_hex,
            "new signer: re-minted"
        );
    }
}
