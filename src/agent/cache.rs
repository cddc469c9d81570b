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
}

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
        let now = SystemTime::now();
        let mut minted_any = false;
        let mut state = self.lock();
        if !Arc::ptr_eq(snapshot, &state.entries) {
            return Ok(None);
        }
        let mut svids = Vec::with_capacity(entries.len());
        for entry in entries {
            let fresh = state
                .svids
                .get(&entry.id)
                .filter(|c| Arc::ptr_eq(&c.entry, entry) || !entry.needs_new_certificate(&c.entry));
            let fresh = fresh.filter(|c| c.svid.not_after > now);
            let svid = match fresh {
                Some(cached) => cached.svid.clone(),
                None => {
                    let svid = Arc::new(mint(&state.ca, entry, now)?);
                    self.recorder.issued(entry, &svid, caller)?;
                    let renew_at = self.renewal_time(&svid);
                    tracing::info!(
                        entry = %entry.id,
                        spiffe_id = %svid.spiffe_id,
                        serial = %svid.serial_hex,
                        not_after = %humantime::format_rfc3339(svid.not_after),
                        "issued X.509-SVID"
                    );
                    state.svids.insert(
                        entry.id.clone(),
                        Cached {
                            entry: entry.clone(),
                            svid: svid.clone(),
                            renew_at,
                        },
                    );
                    minted_any = true;
                    svid
                }
            };
            svids.push((entry.clone(), svid));
        }
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        lease.move_to(&mut state.demand, ids);
        let (ca, ca_generation) = (state.ca.clone(), state.ca_generation);
        drop(state);
        if minted_any {
            self.schedule_changed.notify_one();
        }
        Ok(Some(Identities {
            svids,
            ca,
            ca_generation,
        }))
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
        let mut state = self.lock();
        state.svids.retain(|id, cached| {
            let reason = match entries.get(id) {
                None => RevocationReason::EntryRemoved,
                Some(e) if e.needs_new_certificate(&cached.entry) => RevocationReason::EntryChanged,
                Some(_) => return true,
            };
            self.recorder.revoked(&cached.entry, &cached.svid, reason);
            false
        });
        state.entries = entries;
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
        if !same_signer {
            for (_, cached) in state.svids.drain() {
                self.recorder
                    .revoked(&cached.entry, &cached.svid, RevocationReason::CaRotated);
            }
        }
        state.ca = ca;
        state.ca_generation += 1;
        drop(state);
        self.bump();
    }

    /// Withdraws every entry and SVID at once for `reason` (the node was evicted); streams
    /// recompute and find nothing left. In one step, so that no stream re-mints in between.
    pub fn revoke_all(&self, reason: RevocationReason) {
        let mut state = self.lock();
        state.entries = Arc::new(EntrySet::default());
        for (_, cached) in state.svids.drain() {
            self.recorder.revoked(&cached.entry, &cached.svid, reason);
        }
        drop(state);
        self.bump();
    }

    /// Renews due SVIDs that are in demand and drops the others; returns the next renewal time.
    pub fn rotate_due(&self, now: SystemTime) -> Option<SystemTime> {
        let mut state = self.lock();
        let mut changed = false;
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
            let (true, Some(entry)) = (in_demand, entry) else {
                if let Some(cached) = state.svids.remove(&id)
                    && in_demand
                {
                    self.recorder.revoked(
                        &cached.entry,
                        &cached.svid,
                        RevocationReason::RegistrationExpired,
                    );
                }
                // A stream still serves it (its registration expired): make it recompute.
                changed |= in_demand;
                continue;
            };
            let minted = mint(&state.ca, &entry, now)
                .map_err(IssueError::from)
                .and_then(|svid| {
                    self.recorder.issued(&entry, &svid, None)?;
                    Ok(svid)
                });
            match minted {
                Ok(svid) => {
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
                Err(e) => {
                    let cached = state.svids.get_mut(&id).expect("due id is cached");
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

    fn setup(ttl: Duration) -> Arc<IdentityCache> {
        let dir = tempfile::tempdir().unwrap();
        let td = crate::spiffe::TrustDomain::new("td").unwrap();
        let ca = crate::ca::load_or_create_local_ca(
            &LocalCaSource::Generated {
                state_dir: dir.path().into(),
                ttl: Duration::from_secs(86400),
            },
            &td,
        )
        .unwrap();
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
