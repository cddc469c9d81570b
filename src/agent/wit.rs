//! The WIT-SVID profile of the Workload API (Incubating; served when `[wit] enabled`):
//! FetchWITSVID streams, for each identity of the caller, a WIT bound to a key made for that
//! stream alone, with the key; a fresh pair at half-life, and at once when the caller's
//! identities change. FetchWITBundles streams the WIT bundle (the JWT signing keys with
//! `use: "wit-svid"`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::jwt::JwtAuthority;
use super::workload::{ResponseStream, ServeError, WorkloadService, peer_of};
use crate::attest::CallerFacts;
use crate::proto::workload::{
    WitBundlesRequest, WitBundlesResponse, Witsvid, WitsvidRequest, WitsvidResponse,
};
use crate::spiffe::SpiffeId;

/// A receiver that moves on every change of the cache (`generation`) and of `jwt`'s bundle.
pub(super) fn wake_on_cache_or_bundle(
    mut generation: watch::Receiver<u64>,
    jwt: &JwtAuthority,
) -> watch::Receiver<u64> {
    let (merged_tx, merged) = watch::channel(0u64);
    let mut bundle_changes = jwt.bundle_changes();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = bundle_changes.changed() => if changed.is_err() { return },
                changed = generation.changed() => if changed.is_err() { return },
                _ = merged_tx.closed() => return,
            }
            merged_tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    });
    merged
}

/// One round of WITs for a stream: the message, when to renew, and which entries it covers.
struct Minted {
    message: WitsvidResponse,
    renew_at: tokio::time::Instant,
    entries: Vec<String>,
}

impl WorkloadService {
    /// The JWT authority when the WIT-SVID profile is on; `Unimplemented` otherwise.
    fn wit_authority(&self) -> Result<Arc<JwtAuthority>, Status> {
        match self.jwt_and_wit() {
            (Some(jwt), true) => Ok(jwt.clone()),
            _ => Err(Status::unimplemented(
                "the WIT-SVID profile (Incubating) is off on this agent; [wit] enabled = true \
                 turns it on",
            )),
        }
    }

    /// The entries whose identities the caller may have now (only `wanted`, when given).
    fn wit_entries(
        &self,
        facts: &CallerFacts,
        wanted: Option<&SpiffeId>,
    ) -> Result<Vec<Arc<crate::entry::RegistrationEntry>>, ServeError> {
        let entries = self.cache().entries();
        let mut refused = Vec::new();
        let mut permitted = self.permitted(&entries, facts, &mut refused)?;
        if let Some(wanted) = wanted {
            permitted.retain(|entry| entry.spiffe_id == *wanted);
        }
        if permitted.is_empty() {
            return Err(ServeError::NoIdentity);
        }
        Ok(permitted)
    }

    /// A WIT, with its own key, for each identity the caller may have.
    async fn mint_wits(
        &self,
        jwt: &JwtAuthority,
        facts: &CallerFacts,
        wanted: Option<&SpiffeId>,
    ) -> Result<Minted, ServeError> {
        let entries = self.wit_entries(facts, wanted)?;
        let now = SystemTime::now();
        let mut svids = Vec::with_capacity(entries.len());
        let mut renew_in = Duration::MAX;
        for entry in &entries {
            let (token, key) = jwt.wit(entry, now).await.map_err(ServeError::Jwt)?;
            jwt.record_fetch(entry, &token, facts);
            let half = u64::try_from((token.expires_at - token.issued_at) / 2).unwrap_or(0);
            renew_in = renew_in.min(Duration::from_secs(half.max(1)));
            svids.push(Witsvid {
                spiffe_id: entry.spiffe_id.to_string(),
                wit_svid: token.token,
                wit_svid_key: key.to_string(),
                hint: entry.hint.clone().unwrap_or_default(),
            });
        }
        Ok(Minted {
            message: WitsvidResponse { svids },
            renew_at: tokio::time::Instant::now() + renew_in,
            entries: entries.iter().map(|e| e.id.clone()).collect(),
        })
    }

    /// FetchWITSVID.
    pub(super) async fn wit_svids(
        &self,
        request: Request<WitsvidRequest>,
    ) -> Result<Response<ResponseStream<WitsvidResponse>>, Status> {
        let jwt = self.wit_authority()?;
        let wanted = match request.get_ref().spiffe_id.as_str() {
            "" => None,
            text => Some(SpiffeId::parse(text).map_err(|e| {
                Status::invalid_argument(format!("spiffe_id {text:?} is not a SPIFFE ID: {e}"))
            })?),
        };
        let facts = self.admit(&request).await?;
        let mut generation = self.cache().subscribe();
        let first = self
            .mint_wits(&jwt, &facts, wanted.as_ref())
            .await
            .map_err(|e| self.refused(Some(&facts), e))?;
        let slot: Arc<Mutex<Option<Result<WitsvidResponse, ServeError>>>> = Arc::default();
        let (ready_tx, ready) = watch::channel(0u64);
        let service = self.clone();
        let filled = slot.clone();
        let (mut renew_at, mut covered) = (first.renew_at, first.entries);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(renew_at) => {}
                    changed = generation.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let now: Option<Vec<String>> = service
                            .wit_entries(&facts, wanted.as_ref())
                            .ok()
                            .map(|entries| entries.iter().map(|e| e.id.clone()).collect());
                        if now.as_ref() == Some(&covered) {
                            continue;
                        }
                    }
                    _ = ready_tx.closed() => return,
                }
                let next = service.mint_wits(&jwt, &facts, wanted.as_ref()).await;
                let failed = next.is_err();
                let message = next.map(|minted| {
                    renew_at = minted.renew_at;
                    covered = minted.entries;
                    minted.message
                });
                *filled.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
                ready_tx.send_modify(|n| *n = n.wrapping_add(1));
                if failed {
                    return;
                }
            }
        });
        let stream = self.spawn_stream(peer_of(&request), ready, None, first.message, move || {
            slot.lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .transpose()
        });
        Ok(Response::new(stream))
    }

    /// FetchWITBundles.
    pub(super) async fn wit_bundles(
        &self,
        request: Request<WitBundlesRequest>,
    ) -> Result<Response<ResponseStream<WitBundlesResponse>>, Status> {
        let jwt = self.wit_authority()?;
        let (facts, generation) = self.bundle_caller(&request).await?;
        let mut last = jwt.wit_bundle_json();
        let domain = self.trust_domain().id_string();
        let first = WitBundlesResponse {
            bundles: HashMap::from([(domain.clone(), last.clone())]),
        };
        let service = self.clone();
        let wake = wake_on_cache_or_bundle(generation, &jwt);
        let stream = self.spawn_stream(peer_of(&request), wake, None, first, move || {
            if !service.entitled_to_bundles(&facts)? {
                return Err(ServeError::NoIdentity);
            }
            let now = jwt.wit_bundle_json();
            if now == last {
                return Ok(None);
            }
            last = now.clone();
            Ok(Some(WitBundlesResponse {
                bundles: HashMap::from([(domain.clone(), now)]),
            }))
        });
        Ok(Response::new(stream))
    }
}
