//! JWT-SVIDs signed by the server: the replica's signing key and its successor (kept in the
//! state directory, published in the datastore's bundle before use), the rotation that promotes
//! one to the other, signing for nodes, and revocation by `jti`.
//!
//! Rotation: a replica signs with one key for `jwt.key_ttl`. Half-way through, it makes the
//! next key, saves it (`jwt_key_next.pem`) and publishes it, to become active when the current
//! key's time is up; every agent has had it in its bundle for half a `key_ttl` by then. A key
//! stays in the bundle until `jwt.max_ttl` after its last signature, so every token it signed
//! can be checked until it expires. A restart reuses both files and their published records,
//! so it adds no key.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::State;
use super::config::JwtSigning;
use super::node_api::NodeApiError;
use crate::jwt::{Jwk, JwtError, JwtKey, KeyFileError, SvidClaims};
use crate::proto::tessera::{Event, EventKind, JwtRevocation, RevocationReason, TaskLink};
use crate::proto::tessera::{MintJwtSvidRequest, MintJwtSvidResponse};
use crate::spiffe::SpiffeId;
use crate::store::wire::to_record;
use crate::store::{Datastore, JwtFilter, JwtKeyRecord, JwtRecord, StoreError, unix_now};

/// The key the replica signs with.
const CURRENT_FILE: &str = "jwt_key.pem";
/// Its successor, published and not yet used.
const NEXT_FILE: &str = "jwt_key_next.pem";
/// The longest the rotation task sleeps between looks at the clock.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// Why the signing keys could not be set up or rotated.
#[derive(Debug, thiserror::Error)]
pub enum JwtSignerError {
    /// A key file could not be read or written.
    #[error(transparent)]
    File(#[from] KeyFileError),
    /// The datastore failed.
    #[error("publishing the JWT signing key: {0}")]
    Store(#[from] StoreError),
}

/// A key with its published record.
struct PublishedKey {
    key: Arc<JwtKey>,
    record: JwtKeyRecord,
}

/// The replica's signing keys. Shared by the node API (signing) and the rotation task.
pub struct JwtSigner {
    /// Where the key files live.
    state_dir: PathBuf,
    /// The replica, as its records name it.
    server_id: String,
    /// Lifetimes.
    config: JwtSigning,
    /// The key in use.
    current: RwLock<PublishedKey>,
    /// The published successor, once made.
    next: RwLock<Option<PublishedKey>>,
    /// The key in use was promoted but its file not saved yet: the successor's file is then its
    /// only copy on disk, and no new successor may be made until it is saved.
    current_unsaved: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("server_id", &self.server_id)
            .field("kid", &self.kid())
            .finish_non_exhaustive()
    }
}

/// What the rotation task does next, decided from the clock and the two keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Make and publish the successor, active from the given Unix second.
    Prepare { active_from: i64 },
    /// Start signing with the successor.
    Promote,
    /// Nothing until the given Unix second.
    Wait { until: i64 },
}

/// The rotation's next step at `now` for a current key active since `active_from`, with a
/// successor active from `next_from` if one is published.
fn plan(now: i64, active_from: i64, next_from: Option<i64>, key_ttl: i64) -> Step {
    match next_from {
        Some(from) if now >= from => Step::Promote,
        Some(from) => Step::Wait { until: from },
        None => {
            let prepare_at = active_from + key_ttl / 2;
            if now >= prepare_at {
                // Late (the server was down): the successor still waits half a key_ttl, and the
                // current key signs until then.
                Step::Prepare {
                    active_from: (active_from + key_ttl).max(now + key_ttl / 2),
                }
            } else {
                Step::Wait { until: prepare_at }
            }
        }
    }
}

impl JwtSigner {
    /// Loads (or makes) the replica's keys and publishes their records.
    pub async fn start(
        state_dir: &Path,
        server_id: &str,
        config: JwtSigning,
        store: &dyn Datastore,
    ) -> Result<Self, JwtSignerError> {
        let now = unix_now();
        let published = store.jwt_keys(now).await?;
        let record_of = |key: &JwtKey| {
            published
                .iter()
                .find(|r| r.server_id == server_id && r.kid == key.kid())
                .cloned()
        };
        let current = Arc::new(crate::jwt::load_or_create_key(
            &state_dir.join(CURRENT_FILE),
        )?);
        let next = crate::jwt::load_key(&state_dir.join(NEXT_FILE))?.map(Arc::new);
        let key_ttl = config.key_ttl.as_secs() as i64;
        // A successor is published for its whole signing period (its stored record rebuilt,
        // in case key_ttl changed).
        let next_record = next.as_ref().map(|key| {
            let from = record_of(key).map_or(now + key_ttl / 2, |r| r.active_from);
            record(server_id, key, from, from + key_ttl, &config)
        });
        let active_from = record_of(&current).map_or(now, |r| r.active_from);
        // Without a successor the current key signs until its time is up, or, when that has
        // passed (the server was down), until a successor made now may be used.
        let signs_until = next_record
            .as_ref()
            .map_or((active_from + key_ttl).max(now + key_ttl / 2), |r| {
                r.active_from
            });
        let current_record = record(server_id, &current, active_from, signs_until, &config);
        store.publish_jwt_key(current_record.clone()).await?;
        if let Some(r) = &next_record {
            store.publish_jwt_key(r.clone()).await?;
        }
        tracing::info!(kid = current.kid(), "JWT-SVIDs are signed with this key");
        Ok(Self {
            state_dir: state_dir.to_path_buf(),
            server_id: server_id.to_owned(),
            config,
            current: RwLock::new(PublishedKey {
                key: current,
                record: current_record,
            }),
            next: RwLock::new(
                next.zip(next_record)
                    .map(|(key, record)| PublishedKey { key, record }),
            ),
            current_unsaved: Default::default(),
        })
    }

    /// The `kid` of the key in use.
    pub fn kid(&self) -> String {
        read(&self.current).key.kid().to_owned()
    }

    /// The longest lifetime a token gets.
    pub fn max_ttl(&self) -> Duration {
        self.config.max_ttl
    }

    /// Signs `claims` with the key in use, as a JWT-SVID, or as a WIT-SVID for `holder`;
    /// the token and the key's `kid`.
    pub fn sign(
        &self,
        claims: &SvidClaims,
        holder: Option<&Jwk>,
    ) -> Result<(String, String), JwtError> {
        let key = read(&self.current).key.clone();
        let token = match holder {
            None => crate::jwt::mint(&key, &claims.to_json())?,
            Some(holder) => crate::jwt::wit::mint_wit(&key, &claims.to_wit_json(holder))?,
        };
        Ok((token, key.kid().to_owned()))
    }

    /// Makes, saves and publishes the successor, active from `active_from`; the current key's
    /// record is extended to cover its tokens until then.
    async fn prepare(&self, store: &dyn Datastore, active_from: i64) -> Result<(), JwtSignerError> {
        // The current key's record first: it must cover its tokens until the successor's use.
        let current = {
            let current = read(&self.current);
            record(
                &self.server_id,
                &current.key,
                current.record.active_from,
                active_from,
                &self.config,
            )
        };
        store.publish_jwt_key(current.clone()).await?;
        write(&self.current).record = current;
        let path = self.state_dir.join(NEXT_FILE);
        let key = JwtKey::generate().map_err(|e| KeyFileError::Write {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        crate::jwt::save_key(&path, &key)?;
        // Published for its whole signing period ahead: once promoted it stays in the bundle
        // until the next rotation extends it again.
        let next = record(
            &self.server_id,
            &key,
            active_from,
            active_from + self.config.key_ttl.as_secs() as i64,
            &self.config,
        );
        store.publish_jwt_key(next.clone()).await?;
        tracing::info!(
            kid = key.kid(),
            active_from,
            "published the next JWT signing key"
        );
        *write(&self.next) = Some(PublishedKey {
            key: Arc::new(key),
            record: next,
        });
        Ok(())
    }

    /// Signs with the successor from now on; its file becomes the current one.
    ///
    /// The switch happens in memory first: the old key's record ends soon after, whatever the
    /// disk does. Should the file not be saved, the successor's file stays (a restart promotes
    /// it again), and saving is retried before anything else.
    fn promote(&self) -> Result<(), JwtSignerError> {
        let Some(next) = write(&self.next).take() else {
            return Ok(());
        };
        let key = next.key.clone();
        *write(&self.current) = next;
        tracing::info!(
            kid = key.kid(),
            "JWT-SVIDs are now signed with the next key"
        );
        self.current_unsaved.store(true, Ordering::Release);
        self.save_current()
    }

    /// Saves the key in use as the current file, once it was promoted; then its copy as the
    /// successor's file goes.
    fn save_current(&self) -> Result<(), JwtSignerError> {
        if !self.current_unsaved.load(Ordering::Acquire) {
            return Ok(());
        }
        let key = read(&self.current).key.clone();
        crate::jwt::save_key(&self.state_dir.join(CURRENT_FILE), &key)?;
        self.current_unsaved.store(false, Ordering::Release);
        let _ = std::fs::remove_file(self.state_dir.join(NEXT_FILE));
        Ok(())
    }

    /// Rotates the keys on schedule until `stop`. A failure is logged and retried a minute
    /// later; the current key stays in use meanwhile.
    pub async fn run_rotation(
        self: Arc<Self>,
        store: Arc<dyn Datastore>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.save_current() {
                tracing::error!(error = %e, "cannot save the JWT signing key in use; retrying in 1m");
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                continue;
            }
            let now = unix_now();
            let step = plan(
                now,
                read(&self.current).record.active_from,
                read(&self.next).as_ref().map(|n| n.record.active_from),
                self.config.key_ttl.as_secs() as i64,
            );
            let result = match step {
                Step::Prepare { active_from } => self.prepare(store.as_ref(), active_from).await,
                Step::Promote => self.promote(),
                Step::Wait { .. } => Ok(()),
            };
            let pause = match (step, result) {
                (Step::Wait { until }, _) => {
                    Duration::from_secs(u64::try_from(until - now).unwrap_or(0).max(1))
                        .min(MAX_SLEEP)
                }
                (_, Ok(())) => Duration::ZERO,
                (_, Err(e)) => {
                    tracing::error!(error = %e, "JWT signing key rotation failed; retrying in 1m");
                    Duration::from_secs(60)
                }
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// The published record of `key`: active from `active_from`, signing until `signs_until`, in
/// the bundle until `max_ttl` after that.
fn record(
    server_id: &str,
    key: &JwtKey,
    active_from: i64,
    signs_until: i64,
    config: &JwtSigning,
) -> JwtKeyRecord {
    JwtKeyRecord {
        server_id: server_id.to_owned(),
        kid: key.kid().to_owned(),
        // A public JWK of strings always serialises.
        jwk: serde_json::to_string(key.public_jwk()).unwrap_or_default(),
        active_from,
        not_after: signs_until.max(active_from) + config.max_ttl.as_secs() as i64,
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The revocations every agent is sent: `jti` and `exp` of each revoked, unexpired token.
pub fn revocations_message(revoked: &[(String, i64)]) -> Vec<JwtRevocation> {
    revoked
        .iter()
        .map(|(jti, expires_at)| JwtRevocation {
            jti: jti.clone(),
            expires_at: *expires_at,
        })
        .collect()
}

impl State {
    /// Revokes every live JWT-SVID `filter` selects, recording one `jwt_revoked` event each;
    /// agents refuse them once the next snapshot reaches them. A listing is bounded, so this
    /// goes on until none is left. The number revoked now.
    pub async fn revoke_jwts(
        &self,
        mut filter: JwtFilter,
        reason: RevocationReason,
        detail: &str,
    ) -> Result<usize, StoreError> {
        let mut revoked = 0;
        let mut previous: Option<String> = None;
        loop {
            filter.live_at = Some(unix_now());
            let live = self.store.jwts(filter.clone()).await?;
            let Some(first) = live.first() else {
                break;
            };
            // A pass that finds what the last one revoked means the revocations do not stick.
            if previous.as_deref() == Some(first.jti.as_str()) {
                return Err(StoreError::corrupt(format!(
                    "JWT-SVID {} is still live after its revocation was stored",
                    first.jti
                )));
            }
            previous = Some(first.jti.clone());
            let received = crate::events::model::now_ms();
            let records = live
                .iter()
                .map(|jwt| {
                    to_record(
                        &self.jwt_revoked_event(jwt, reason, detail),
                        EventKind::JwtRevoked,
                        "",
                        received,
                    )
                })
                .collect();
            self.store.store_events(records).await?;
            revoked += live.len();
        }
        if revoked > 0 {
            tracing::info!(target: "tessera::audit", count = revoked, reason = crate::events::model::reason_name(reason), %detail, "JWT-SVIDs revoked");
        }
        Ok(revoked)
    }

    /// The server's `jwt_revoked` event for `jwt`.
    pub fn jwt_revoked_event(
        &self,
        jwt: &JwtRecord,
        reason: RevocationReason,
        detail: &str,
    ) -> Event {
        let mut event = self.server_event(EventKind::JwtRevoked, "", detail.to_owned());
        event.jti = jwt.jti.clone();
        event.entry_id = jwt.entry_id.clone();
        event.spiffe_id = jwt.spiffe_id.clone();
        event.not_after = jwt.expires_at.unwrap_or(0);
        event.set_reason(reason);
        event
    }
}

/// A task chain as the wire carries it, as (task id, SPIFFE ID) pairs.
pub fn chain_pairs(chain: &[TaskLink]) -> Vec<(String, String)> {
    chain
        .iter()
        .map(|l| (l.task_id.clone(), l.spiffe_id.clone()))
        .collect()
}

/// Most audience values one token may carry, and the longest one.
const MAX_AUDIENCES: usize = 32;
const MAX_AUDIENCE_LEN: usize = 256;
/// A token's lifetime when the agent asks for none.
const DEFAULT_TTL: i64 = 300;

impl State {
    /// Signs a JWT-SVID for node `node_id` as `asked`, if the node may serve that identity now,
    /// and records its issuance before handing it out.
    pub async fn mint_jwt(
        &self,
        node_id: &str,
        asked: MintJwtSvidRequest,
    ) -> Result<MintJwtSvidResponse, NodeApiError> {
        let holder = match asked.holder_jwk.as_str() {
            "" => None,
            text => Some(serde_json::from_str::<Jwk>(text).map_err(|e| {
                NodeApiError::BadRequest(format!("holder_jwk is not an EC public JWK: {e}"))
            })?),
        };
        if holder.is_some() && !asked.audience.is_empty() {
            return Err(NodeApiError::BadRequest(
                "a WIT-SVID has no audience: leave audience empty with holder_jwk".into(),
            ));
        }
        if (holder.is_none() && asked.audience.is_empty())
            || asked.audience.len() > MAX_AUDIENCES
            || asked
                .audience
                .iter()
                .any(|a| a.is_empty() || a.len() > MAX_AUDIENCE_LEN || a.contains('\0'))
        {
            return Err(NodeApiError::BadRequest(format!(
                "audience must hold 1 to {MAX_AUDIENCES} values of 1 to {MAX_AUDIENCE_LEN} bytes"
            )));
        }
        let subject = SpiffeId::parse(&asked.spiffe_id).map_err(|e| {
            NodeApiError::BadRequest(format!("spiffe_id {:?}: {e}", asked.spiffe_id))
        })?;
        let snapshot = self.snapshots.borrow().clone();
        let now_ms = crate::events::model::now_ms();
        let entry = snapshot
            .entry(&asked.entry_id)
            .filter(|_| !snapshot.dormant.contains(&asked.entry_id))
            .filter(|_| {
                snapshot.may_have_issued(
                    node_id,
                    &asked.entry_id,
                    subject.as_str(),
                    &asked.task_id,
                    now_ms,
                )
            })
            .cloned()
            .ok_or_else(|| {
                NodeApiError::Forbidden(format!(
                    "node {node_id} may not serve {subject} under entry {:?} now",
                    asked.entry_id
                ))
            })?;
        let mut purpose = entry.purpose.clone();
        let mut task_deadline = None;
        let task = if asked.task_id.is_empty() {
            None
        } else {
            let ends_with_task = asked
                .chain
                .last()
                .is_some_and(|l| l.task_id == asked.task_id && l.spiffe_id == asked.spiffe_id);
            if !ends_with_task || asked.chain.len() > self.config.max_task_depth as usize {
                return Err(NodeApiError::BadRequest(format!(
                    "a task's chain must end with the task itself and be at most {} long",
                    self.config.max_task_depth
                )));
            }
            let chain = chain_pairs(&asked.chain);
            // Every task of the chain the server already knows must be this node's, under the
            // entry named, with the same ancestry; the rest is checked when their start events
            // arrive (an anomaly then revokes).
            for (depth, link) in asked.chain.iter().enumerate() {
                let Some(known) = self.store.task(&link.task_id).await? else {
                    continue;
                };
                let problem = if known.node_id != node_id {
                    Some(format!("runs on node {:?}", known.node_id))
                } else if known.chain != chain[..=depth] {
                    Some("has another delegation chain".to_owned())
                } else if depth + 1 == chain.len() && known.entry_id != asked.entry_id {
                    Some(format!("runs under entry {:?}", known.entry_id))
                } else if depth + 1 == chain.len() && known.ended_ms.is_some() {
                    Some("has ended".to_owned())
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Err(NodeApiError::Forbidden(format!(
                        "task {} {problem}",
                        link.task_id
                    )));
                }
                if depth + 1 == chain.len() {
                    purpose = known.purpose;
                    task_deadline = Some(known.deadline);
                }
            }
            Some((asked.task_id.clone(), chain))
        };
        let now = unix_now();
        let max = self.jwt.max_ttl().as_secs() as i64;
        // What the agent asks for (its ttl, or the entry's, cut at the registration or task
        // deadline it knows of), never more than the entry's own lifetime or max_ttl.
        let asked_ttl = if asked.ttl_seconds > 0 {
            asked.ttl_seconds
        } else {
            DEFAULT_TTL
        };
        let ttl = entry
            .jwt_ttl_seconds
            .filter(|t| *t > 0)
            .map_or(asked_ttl, |own| own.min(asked_ttl))
            .min(max);
        let mut expires_at = now + ttl;
        // Never past the registration, nor past the task's deadline.
        for limit in [entry.expires_at, task_deadline.filter(|d| *d > 0)]
            .into_iter()
            .flatten()
        {
            expires_at = expires_at.min(limit);
        }
        if expires_at <= now {
            return Err(NodeApiError::Forbidden(format!(
                "entry {:?} has expired",
                asked.entry_id
            )));
        }
        let mut audience = asked.audience;
        audience.sort();
        audience.dedup();
        let claims = SvidClaims {
            subject: subject.to_string(),
            audience,
            issued_at: now,
            expires_at,
            jti: crate::jwt::new_jti(),
            owner: entry.owner.clone(),
            purpose,
            entry_id: entry.id.clone(),
            task,
        };
        let (token, kid) = self
            .jwt
            .sign(&claims, holder.as_ref())
            .map_err(|e| NodeApiError::Jwt(format!("signing a JWT-SVID: {e}")))?;
        let mut event = self.server_event(
            EventKind::JwtIssued,
            node_id,
            format!(
                "{} signed by server {} with key {kid}",
                if holder.is_some() {
                    "WIT-SVID"
                } else {
                    "JWT-SVID"
                },
                self.server_id
            ),
        );
        event.jti = claims.jti.clone();
        event.entry_id = claims.entry_id.clone();
        event.spiffe_id = claims.subject.clone();
        event.audience = claims.audience.clone();
        event.not_after = expires_at;
        if let Some((task_id, chain)) = &claims.task {
            event.task_id = task_id.clone();
            event.chain = asked.chain;
            debug_assert_eq!(chain.len(), event.chain.len());
        }
        self.store
            .store_events(vec![to_record(
                &event,
                EventKind::JwtIssued,
                node_id,
                now_ms,
            )])
            .await?;
        // The snapshot may lag a deletion or an eviction that committed meanwhile, and the
        // revocations those made did not see this token: check again now that it is stored.
        let entry_gone = self.store.get_entry(&entry.id).await?.is_none();
        let node_gone = self
            .store
            .get_node(node_id)
            .await?
            .is_none_or(|node| node.status != crate::store::NodeStatus::Active);
        let task_ended = match &claims.task {
            Some((task_id, _)) => self
                .store
                .task(task_id)
                .await?
                .is_some_and(|task| task.ended_ms.is_some()),
            None => false,
        };
        if entry_gone || node_gone || task_ended {
            let (reason, what) = if entry_gone {
                (RevocationReason::EntryRemoved, "its entry was deleted")
            } else if node_gone {
                (RevocationReason::NodeEvicted, "its node was evicted")
            } else {
                (RevocationReason::TaskEnded, "its task ended")
            };
            let record = JwtRecord {
                jti: claims.jti.clone(),
                entry_id: claims.entry_id.clone(),
                spiffe_id: claims.subject.clone(),
                expires_at: Some(expires_at),
                ..JwtRecord::default()
            };
            let revoked = self.jwt_revoked_event(&record, reason, what);
            self.store
                .store_events(vec![to_record(
                    &revoked,
                    EventKind::JwtRevoked,
                    "",
                    crate::events::model::now_ms(),
                )])
                .await?;
            return Err(NodeApiError::Forbidden(format!(
                "{} is no longer served: {what}",
                claims.subject
            )));
        }
        Ok(MintJwtSvidResponse {
            token,
            jti: claims.jti,
            issued_at: now,
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_successor_is_published_half_way_and_used_at_the_end() {
        let ttl = 100;
        assert_eq!(plan(10, 0, None, ttl), Step::Wait { until: 50 });
        assert_eq!(plan(50, 0, None, ttl), Step::Prepare { active_from: 100 });
        assert_eq!(plan(60, 0, Some(100), ttl), Step::Wait { until: 100 });
        assert_eq!(plan(100, 0, Some(100), ttl), Step::Promote);
        // Down past the end: the successor still waits half a key_ttl before use.
        assert_eq!(plan(500, 0, None, ttl), Step::Prepare { active_from: 550 });
    }

    #[tokio::test]
    async fn signing_requests_are_checked_before_anything_is_signed() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::server::testing::state(dir.path()).await;
        let asked = |audience: &[&str], holder: &str| MintJwtSvidRequest {
            entry_id: "e".into(),
            spiffe_id: "spiffe://example.org/w".into(),
            audience: audience.iter().map(|a| a.to_string()).collect(),
            holder_jwk: holder.into(),
            ..Default::default()
        };
        let holder = serde_json::to_string(JwtKey::generate().unwrap().public_jwk()).unwrap();
        for (request, expected) in [
            (asked(&[], ""), "audience must hold"),
            (asked(&["a", ""], ""), "audience must hold"),
            (asked(&["a"], &holder), "a WIT-SVID has no audience"),
            (
                asked(&[], "{not json"),
                "holder_jwk is not an EC public JWK",
            ),
        ] {
            let error = state.mint_jwt("n1", request).await.unwrap_err();
            assert!(
                matches!(&error, NodeApiError::BadRequest(m) if m.contains(expected)),
                "{error}"
            );
        }
        // A node the server does not know may serve nothing.
        let error = state.mint_jwt("n1", asked(&["a"], "")).await.unwrap_err();
        assert!(matches!(error, NodeApiError::Forbidden(_)), "{error}");
        assert!(
            state
                .store
                .jwts(JwtFilter::default())
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn revoking_by_node_revokes_each_live_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::server::testing::state(dir.path()).await;
        let now_ms = crate::events::model::now_ms();
        let issued = |n: usize, node: &str| {
            let mut event = state.server_event(EventKind::JwtIssued, node, "test".into());
            event.jti = format!("jti-{node}-{n}");
            event.spiffe_id = "spiffe://example.org/w".into();
            event.entry_id = "e".into();
            event.not_after = unix_now() + 600;
            to_record(&event, EventKind::JwtIssued, node, now_ms)
        };
        let records = (0..3)
            .map(|n| issued(n, "n1"))
            .chain([issued(0, "n2")])
            .collect();
        state.store.store_events(records).await.unwrap();
        let by_node = |node: &str| JwtFilter {
            node_id: Some(node.into()),
            ..JwtFilter::default()
        };
        let revoked = state
            .revoke_jwts(by_node("n1"), RevocationReason::NodeEvicted, "evicted")
            .await
            .unwrap();
        assert_eq!(revoked, 3);
        let again = state
            .revoke_jwts(by_node("n1"), RevocationReason::NodeEvicted, "evicted")
            .await
            .unwrap();
        assert_eq!(again, 0, "revoked once");
        let revocations = state.store.jwt_revocations(unix_now()).await.unwrap();
        assert_eq!(revocations.len(), 3, "n2's token stays valid");
    }

    #[tokio::test]
    async fn a_restart_adds_no_key_and_a_rotation_publishes_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::SqliteStore::open(&dir.path().join("db")).unwrap();
        let config = JwtSigning {
            max_ttl: Duration::from_secs(60),
            key_ttl: Duration::from_secs(600),
        };
        let signer = JwtSigner::start(dir.path(), "s1", config, &store)
            .await
            .unwrap();
        let first = signer.kid();
        let again = JwtSigner::start(dir.path(), "s1", config, &store)
            .await
            .unwrap();
        assert_eq!(again.kid(), first, "the key file is reused");
        assert_eq!(store.jwt_keys(unix_now()).await.unwrap().len(), 1);

        let now = unix_now();
        signer.prepare(&store, now + 300).await.unwrap();
        let keys = store.jwt_keys(now).await.unwrap();
        assert_eq!(keys.len(), 2, "the successor is in the bundle before use");
        assert_eq!(signer.kid(), first, "and not used yet");
        let current = keys.iter().find(|k| k.kid == first).unwrap();
        assert_eq!(
            current.not_after,
            now + 300 + 60,
            "the old key outlives its last token"
        );
        // A restart before the promotion keeps both.
        let restarted = JwtSigner::start(dir.path(), "s1", config, &store)
            .await
            .unwrap();
        assert_eq!(restarted.kid(), first);
        assert_eq!(store.jwt_keys(now).await.unwrap().len(), 2);
        signer.promote().unwrap();
        assert_ne!(signer.kid(), first);
        let promoted = signer.kid();
        let later = now + 300 + 60 + 1;
        assert!(
            store
                .jwt_keys(later)
                .await
                .unwrap()
                .iter()
                .any(|k| k.kid == promoted),
            "the key in use stays in the bundle past max_ttl after it became active"
        );
        let restarted = JwtSigner::start(dir.path(), "s1", config, &store)
            .await
            .unwrap();
        assert_eq!(
            restarted.kid(),
            signer.kid(),
            "the promoted key is the current file"
        );
        assert_eq!(store.jwt_keys(now).await.unwrap().len(), 2);
    }
}
