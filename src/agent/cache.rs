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

use crate::attest::CallerFacts;
use crate::ca::{CaError, LeafRequest, SigningCa, X509Svid, mint_x509_svid};
use crate::entry::{EntrySet, RegistrationEntry};
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
struct Cached {
    /// The entry version the SVID was minted for.
    entry: Arc<RegistrationEntry>,
    /// The SVID itself, shared with every stream that serves it.
    svid: Arc<X509Svid>,
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
    /// Number of leases per entry id.
    demand: HashMap<String, usize>,
}

/// The SVIDs a caller is entitled to, with the bundle they chain to.
pub struct Identities {
    /// In entry order; the first is the default identity.
    pub svids: Vec<(Arc<RegistrationEntry>, Arc<X509Svid>)>,
    /// The CA they were minted under (its bundle goes to workloads).
    pub ca: Arc<SigningCa>,
    /// Which CA that is: a new number for every CA installed.
    pub ca_generation: u64,
}

/// Shared identity state of one agent.
pub struct IdentityCache {
    /// Everything mutable; held only briefly (at most one mint per entry while held).
    state: Mutex<State>,
    /// Bumped on every change a stream might need to send; streams subscribe to it.
    generation: watch::Sender<u64>,
    /// Wakes the rotation task when a new SVID enters the schedule.
    schedule_changed: Notify,
    /// Jitter source, so that SVIDs minted together do not all renew in the same instant.
    jitter_seed: Mutex<u64>,
    /// Records issuance and revocation; shared with the Workload API service for uses.
    recorder: Arc<Recorder>,
    /// One lock per entry being minted on demand, so that concurrent first callers of one
    /// entry mint it once; removed when no caller holds it.
    minting: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl IdentityCache {
    /// A cache serving `entries` under `ca`, recording with `recorder`.
    pub fn new(entries: Arc<EntrySet>, ca: Arc<SigningCa>, recorder: Arc<Recorder>) -> Arc<Self> {
        let mut seed = [0u8; 8];
        let _ = aws_lc_rs::rand::fill(&mut seed);
        Arc::new(Self {
            state: Mutex::new(State {
                entries,
                ca,
                ca_generation: 0,
                svids: HashMap::new(),
                demand: HashMap::new(),
            }),
            generation: watch::channel(0).0,
            schedule_changed: Notify::new(),
            jitter_seed: Mutex::new(u64::from_le_bytes(seed) | 1),
            recorder,
            minting: Mutex::new(HashMap::new()),
        })
    }

    /// The event recorder.
    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }

    /// A receiver that changes whenever streams should recompute what they send.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// How many SVIDs are cached; only these are ever renewed.
    pub fn cached_svids(&self) -> usize {
        self.lock().svids.len()
    }

    /// The current entries.
    pub fn entries(&self) -> Arc<EntrySet> {
        self.lock().entries.clone()
    }

    /// The current signing CA.
    pub fn ca(&self) -> Arc<SigningCa> {
        self.lock().ca.clone()
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
            state.svids.insert(
                entry.id.clone(),
                Cached {
                    entry: entry.clone(),
                    svid,
                    renew_at,
                },
            );
        }
        drop(state);
        self.schedule_changed.notify_one();
        Ok(true)
    }

    /// An empty lease, to be filled by [`acquire`](Self::acquire).
    pub fn lease(self: &Arc<Self>) -> Lease {
        Lease {
            cache: self.clone(),
            ids: Vec::new(),
        }
    }

    /// Installs a new entry set: SVIDs of removed or materially changed entries are dropped,
    /// and every stream recomputes.
    pub fn set_entries(&self, entries: Arc<EntrySet>) {
        let mut revoked = Vec::new();
        let mut state = self.lock();
        state.svids.retain(|id, cached| {
            let reason = match entries.get(id) {
                None => RevocationReason::EntryRemoved,
                Some(e) if e.needs_new_certificate(&cached.entry) => RevocationReason::EntryChanged,
                Some(_) => return true,
            };
            revoked.push((cached.entry.clone(), cached.svid.clone(), reason));
            false
        });
        state.entries = entries;
        drop(state);
        self.record_revocations(revoked);
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
                .map(|(_, c)| (c.entry, c.svid, RevocationReason::CaRotated))
                .collect()
        };
        state.ca = ca;
        state.ca_generation += 1;
        drop(state);
        self.record_revocations(revoked);
        self.bump();
    }

    /// Withdraws every entry and SVID at once for `reason` (the node was evicted); streams
    /// recompute and find nothing left. In one step, so that no stream re-mints in between.
    pub fn revoke_all(&self, reason: RevocationReason) {
        let mut state = self.lock();
        state.entries = Arc::new(EntrySet::default());
        let revoked: Vec<_> = state
            .svids
            .drain()
            .map(|(_, c)| (c.entry, c.svid, reason))
            .collect();
        drop(state);
        self.record_revocations(revoked);
        self.bump();
    }

    /// Renews due SVIDs that are in demand and drops the others; returns the next renewal time.
    /// Minting and recording happen outside the state lock: streams keep reading meanwhile.
    pub fn rotate_due(&self, now: SystemTime) -> Option<SystemTime> {
        let mut changed = false;
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
                let in_demand = state.demand.get(&id).copied().unwrap_or(0) > 0;
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
                        changed |= in_demand;
                    }
                }
            }
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
                    state.svids.insert(
                        id,
                        Cached {
                            entry,
                            svid,
                            renew_at,
                        },
                    );
                    changed = true;
                }
                Ok(_) => {}
                Err(e) => {
                    let Some(cached) = state.svids.get_mut(&id) else {
                        continue;
                    };
                    if cached.svid.not_after <= now {
                        tracing::error!(entry = %id, error = %e, "renewal failed and the SVID has expired; withdrawing it");
                        state.svids.remove(&id);
                        changed = true;
                    } else {
                        tracing::error!(entry = %id, error = %e, "renewal failed; retrying");
                        cached.renew_at = (now + RENEWAL_RETRY).min(cached.svid.not_after);
                    }
                }
            }
        }
        let next_renewal = state.svids.values().map(|c| c.renew_at).min();
        drop(state);
        if changed {
            self.bump();
        }
        next_renewal
    }

    /// Records revocations taken out of the state; called after its lock is released.
    fn record_revocations(
        &self,
        revoked: Vec<(Arc<RegistrationEntry>, Arc<X509Svid>, RevocationReason)>,
    ) {
        for (entry, svid, reason) in revoked {
            self.recorder.revoked(&entry, &svid, reason);
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
        mut entries: watch::Receiver<Arc<EntrySet>>,
        mut ca: watch::Receiver<Arc<SigningCa>>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
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
                changed = entries.changed() => {
                    if changed.is_err() { return; }
                    let set = entries.borrow_and_update().clone();
                    self.set_entries(set);
                }
                changed = ca.changed() => {
                    if changed.is_err() { return; }
                    let current = ca.borrow_and_update().clone();
                    self.set_ca(current);
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
        },
        now,
    )
}

/// A stream's claim on the entries it currently serves; released on drop.
pub struct Lease {
    cache: Arc<IdentityCache>,
    ids: Vec<String>,
}

impl Lease {
    fn move_to(&mut self, demand: &mut HashMap<String, usize>, ids: Vec<String>) {
        for id in &ids {
            *demand.entry(id.clone()).or_default() += 1;
        }
        release(demand, &self.ids);
        self.ids = ids;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.cache.lock();
        release(&mut state.demand, &self.ids);
    }
}

fn release(demand: &mut HashMap<String, usize>, ids: &[String]) {
    for id in ids {
        if let Some(count) = demand.get_mut(id) {
            *count -= 1;
            if *count == 0 {
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
    fn shares_one_svid_per_entry_and_renews_only_what_is_leased() {
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
        let mut gen_rx = cache.subscribe();
        cache.rotate_due(later);
        assert!(gen_rx.has_changed().unwrap());
        gen_rx.mark_unchanged();
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
        let cache = IdentityCache::new(set.clone(), Arc::new(ca), recorder);
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
