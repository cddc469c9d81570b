//! JWT-SVIDs on a standalone agent: its signing key (kept in the state directory, so that a
//! restart never adds a key to the bundle), the tokens it has minted, and the JWT bundle it
//! serves and validates against.
//!
//! A token is kept per entry and audience set and handed out again until half its life has
//! passed; the cache holds at most `jwt.cache_size` of them, dropping the least recently used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use crate::entry::{EntrySet, RegistrationEntry};
use crate::jwt::{JwkSet, JwtError, JwtKey, Validated};
use crate::spiffe::TrustDomain;

/// A token's lifetime unless `[jwt] ttl` says otherwise.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);
/// Tokens kept unless `[jwt] cache_size` says otherwise.
pub const DEFAULT_JWT_CACHE_SIZE: usize = 1000;
/// How often holders of the bundle should look for a newer one, in seconds.
const BUNDLE_REFRESH_HINT: u64 = 300;
/// The key file in the agent's state directory.
const KEY_FILE: &str = "jwt_key.pem";
/// Verified tokens remembered at most (those expired are dropped first, then all).
const MAX_VERIFIED: usize = 4096;

/// How tokens are minted and kept (`[jwt]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwtOptions {
    /// Lifetime of a token.
    pub ttl: Duration,
    /// Tokens kept at most.
    pub cache_size: usize,
}

impl Default for JwtOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_JWT_TTL,
            cache_size: DEFAULT_JWT_CACHE_SIZE,
        }
    }
}

/// Why the signing key could not be loaded or kept.
#[derive(Debug, thiserror::Error)]
pub enum JwtKeyError {
    /// The key file exists but could not be read.
    #[error("cannot read the JWT signing key {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file does not hold a PKCS#8 P-256 key.
    #[error("{}: {reason}; move it away to have a new key made", path.display())]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A new key could not be made or saved.
    #[error("cannot save a new JWT signing key to {}: {reason}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One minted token as the cache keeps it.
#[derive(Debug, Clone)]
pub struct Token {
    /// The compact JWS.
    pub token: String,
    /// Its `jti`.
    pub jti: String,
    /// `iat`, Unix seconds.
    pub issued_at: i64,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
}

impl Token {
    /// Whether the token is past half its life at `now` (it is then minted afresh).
    fn stale(&self, now: i64) -> bool {
        now >= self.issued_at + (self.expires_at - self.issued_at) / 2
    }
}

/// Tokens by entry and sorted audience, least recently used dropped first.
#[derive(Default)]
struct TokenCache {
    tokens: HashMap<(String, Vec<String>), (Token, u64)>,
    /// Bumped on every use; a token's use stamp orders the evictions.
    clock: u64,
}

/// The standalone agent's JWT-SVID signer and validator.
pub struct JwtAuthority {
    /// The signing key.
    key: JwtKey,
    /// The trust domain whose tokens these are.
    trust_domain: TrustDomain,
    /// The bundle: the signing key's public half.
    bundle: JwkSet,
    /// The bundle as JSON, as the Workload API sends it.
    bundle_json: Vec<u8>,
    /// Lifetime and cache size.
    options: JwtOptions,
    /// Tokens minted and not yet stale.
    cache: Mutex<TokenCache>,
    /// Tokens whose form and signature have been verified, by the SHA-256 of the token: a
    /// relying party validating the same bearer token on every request pays for the signature
    /// once. Audience and time are checked on every call.
    verified: Mutex<HashMap<[u8; 32], Arc<Validated>>>,
    /// Every token minted and not yet expired, by entry id: its `jti` and `exp`.
    minted: Mutex<HashMap<String, Vec<(String, i64)>>>,
    /// Tokens revoked before their expiry: `jti` to `exp` (forgotten once expired).
    revoked: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for JwtAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthority")
            .field("kid", &self.key.kid())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl JwtAuthority {
    /// The authority with the key saved in `state_dir`, made and saved there (0600) first if
    /// there is none.
    pub fn load_or_create(
        state_dir: &Path,
        trust_domain: TrustDomain,
        options: JwtOptions,
    ) -> Result<Self, JwtKeyError> {
        let path = state_dir.join(KEY_FILE);
        let key = match std::fs::read(&path) {
            Ok(bytes) => read_key(&path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let write = |reason: String| JwtKeyError::Write {
                    path: path.clone(),
                    reason,
                };
                let key = JwtKey::generate().map_err(|e| write(e.to_string()))?;
                let pem = zeroize::Zeroizing::new(crate::ca::to_pem("PRIVATE KEY", &[key.pkcs8()]));
                std::fs::create_dir_all(state_dir).map_err(|e| write(e.to_string()))?;
                crate::durable::write_atomically(&path, pem.as_bytes(), 0o600)
                    .map_err(|e| write(e.to_string()))?;
                tracing::info!(kid = key.kid(), file = %path.display(), "made a JWT signing key");
                key
            }
            Err(source) => return Err(JwtKeyError::Read { path, source }),
        };
        Ok(Self::new(key, trust_domain, options))
    }

    /// The authority signing with `key`.
    pub fn new(key: JwtKey, trust_domain: TrustDomain, options: JwtOptions) -> Self {
        let bundle = JwkSet {
            keys: vec![key.public_jwk().clone()],
            spiffe_sequence: Some(1),
            spiffe_refresh_hint: Some(BUNDLE_REFRESH_HINT),
        };
        // A set of one public key always serialises.
        let bundle_json = serde_json::to_vec(&bundle).unwrap_or_default();
        Self {
            key,
            trust_domain,
            bundle,
            bundle_json,
            options,
            cache: Mutex::new(TokenCache::default()),
            verified: Mutex::new(HashMap::new()),
            minted: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashMap::new()),
        }
    }

    /// The JWT bundle as the Workload API sends it (a JWK Set, JSON).
    pub fn bundle_json(&self) -> &[u8] {
        &self.bundle_json
    }

    /// A token for `entry`'s identity and `audience` at `now`: the cached one unless it is past
    /// half its life, else a new one. `true` with a token minted now.
    pub fn token(
        &self,
        entry: &RegistrationEntry,
        audience: &[String],
        now: SystemTime,
    ) -> Result<(Token, bool), JwtError> {
        let now_s = crate::clock::unix_seconds(now);
        let mut audience = audience.to_vec();
        audience.sort();
        audience.dedup();
        let key = (entry.id.clone(), audience);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.clock += 1;
        let stamp = cache.clock;
        if let Some((token, used)) = cache.tokens.get_mut(&key)
            && !token.stale(now_s)
        {
            *used = stamp;
            return Ok((token.clone(), false));
        }
        let token = self.mint(entry, &key.1, now_s)?;
        if cache.tokens.len() >= self.options.cache_size && !cache.tokens.contains_key(&key) {
            let oldest = cache
                .tokens
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                cache.tokens.remove(&oldest);
            }
        }
        cache.tokens.insert(key, (token.clone(), stamp));
        Ok((token, true))
    }

    /// Tokens in the cache now.
    pub fn cached_tokens(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.tokens.len())
    }

    fn mint(
        &self,
        entry: &RegistrationEntry,
        audience: &[String],
        now: i64,
    ) -> Result<Token, JwtError> {
        let mut expires_at = now + self.options.ttl.as_secs() as i64;
        if let Some(limit) = entry.expires_at {
            expires_at = expires_at.min(crate::clock::unix_seconds(limit));
        }
        if expires_at <= now {
            return Err(JwtError::Claims(
                "the entry's registration has expired".into(),
            ));
        }
        let jti = uuid::Uuid::now_v7().simple().to_string();
        let claims = claims(entry, audience, now, expires_at, &jti);
        let token = crate::jwt::mint(&self.key, &claims)?;
        let mut minted = lock(&self.minted);
        let of_entry = minted.entry(entry.id.clone()).or_default();
        of_entry.retain(|(_, exp)| *exp > now);
        of_entry.push((jti.clone(), expires_at));
        Ok(Token {
            token,
            jti,
            issued_at: now,
            expires_at,
        })
    }

    /// Validates `token` for `audience` at `now` against this trust domain's bundle.
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<Validated, JwtError> {
        let now = crate::clock::unix_seconds(now);
        let digest: [u8; 32] =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
                .as_ref()
                .try_into()
                .unwrap_or_default();
        let remembered = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            .cloned();
        let valid = match remembered {
            Some(valid) => valid,
            None => {
                let valid = Arc::new(crate::jwt::verify(token, now, |td| {
                    (*td == self.trust_domain).then_some(&self.bundle)
                })?);
                let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
                if verified.len() >= MAX_VERIFIED {
                    verified.retain(|_, v| v.expires_at > now);
                    if verified.len() >= MAX_VERIFIED {
                        verified.clear();
                    }
                }
                verified.insert(digest, valid.clone());
                valid
            }
        };
        valid.check(audience, now)?;
        if let Some(jti) = &valid.jti
            && lock(&self.revoked).contains_key(jti)
        {
            return Err(JwtError::Revoked(jti.clone()));
        }
        Ok((*valid).clone())
    }

    /// Revokes every unexpired token minted for an entry `live` no longer holds (deleted, or
    /// a task that ended) and forgets the cached ones; the number revoked.
    pub(crate) fn revoke_entries_not_in(&self, live: &EntrySet, now: SystemTime) -> usize {
        let now = crate::clock::unix_seconds(now);
        let gone: Vec<(String, i64)> = {
            let mut minted = lock(&self.minted);
            let ids: Vec<String> = minted
                .keys()
                .filter(|id| live.get(id).is_none())
                .cloned()
                .collect();
            ids.iter()
                .filter_map(|id| minted.remove(id))
                .flatten()
                .filter(|(_, exp)| *exp > now)
                .collect()
        };
        lock(&self.cache)
            .tokens
            .retain(|(entry_id, _), _| live.get(entry_id).is_some());
        let mut revoked = lock(&self.revoked);
        revoked.retain(|_, exp| *exp > now);
        let count = gone.len();
        revoked.extend(gone);
        count
    }
}

/// A lock, taken even if a thread panicked holding it: the maps stay consistent entry by entry.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_key(path: &Path, bytes: &[u8]) -> Result<JwtKey, JwtKeyError> {
    let invalid = |reason: String| JwtKeyError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let block = pem::parse(bytes).map_err(|e| invalid(format!("not PEM: {e}")))?;
    if block.tag() != "PRIVATE KEY" {
        return Err(invalid(format!(
            "holds a {:?} block, not a PRIVATE KEY (PKCS#8)",
            block.tag()
        )));
    }
    JwtKey::from_pkcs8(block.contents()).map_err(|e| invalid(e.to_string()))
}

/// The claims of a token for `entry`: the standard's (`sub`, `aud`, `exp`, `iat`, `jti`),
/// tessera's own under `tessera` (owner, purpose, entry id; for a task, its id and chain), and
/// for a delegated task the chain as nested RFC 8693 `act` claims, the parent first.
fn claims(
    entry: &RegistrationEntry,
    audience: &[String],
    issued_at: i64,
    expires_at: i64,
    jti: &str,
) -> Map<String, Value> {
    let mut tessera = serde_json::json!({
        "owner": entry.owner,
        "purpose": entry.purpose,
        "entry_id": entry.id,
    });
    let mut claims = serde_json::json!({
        "sub": entry.spiffe_id.as_str(),
        "aud": audience,
        "exp": expires_at,
        "iat": issued_at,
        "jti": jti,
    });
    if let Some(task) = &entry.task {
        tessera["entry_id"] = task.entry_id.clone().into();
        tessera["purpose"] = task.purpose.clone().into();
        tessera["task_id"] = task.task_id.clone().into();
        tessera["chain"] = task
            .chain
            .iter()
            .map(|link| serde_json::json!({"task_id": link.task_id, "sub": link.spiffe_id}))
            .collect::<Vec<_>>()
            .into();
        // The chain runs from the root down to this task; `act` nests from the parent up.
        let mut act: Option<Value> = None;
        for link in task.chain.iter().rev().skip(1).rev() {
            let mut actor = serde_json::json!({"sub": link.spiffe_id, "task_id": link.task_id});
            if let Some(outer) = act.take() {
                actor["act"] = outer;
            }
            act = Some(actor);
        }
        if let Some(act) = act {
            claims["act"] = act;
        }
    }
    claims["tessera"] = tessera;
    match claims {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::tests::entry;

    fn authority(cache_size: usize) -> JwtAuthority {
        JwtAuthority::new(
            JwtKey::generate().unwrap(),
            TrustDomain::new("example.org").unwrap(),
            JwtOptions {
                ttl: Duration::from_secs(300),
                cache_size,
            },
        )
    }

    #[test]
    fn a_token_is_reused_until_half_its_life_then_minted_afresh() {
        let jwt = authority(10);
        let e = entry("e", "spiffe://example.org/agent", &["unix:uid:1"]);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let aud = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (first, fresh) = jwt.token(&e, &aud(&["b", "a"]), t0).unwrap();
        assert!(fresh);
        let (again, fresh) = jwt
            .token(&e, &aud(&["a", "b", "a"]), t0 + Duration::from_secs(149))
            .unwrap();
        assert!(!fresh, "the same audience set, in any order");
        assert_eq!(again.token, first.token);
        let (later, fresh) = jwt
            .token(&e, &aud(&["a", "b"]), t0 + Duration::from_secs(150))
            .unwrap();
        assert!(
            fresh && later.jti != first.jti,
            "past half-life: a new token"
        );
        let valid = jwt
            .validate(&later.token, "a", t0 + Duration::from_secs(151))
            .unwrap();
        assert_eq!(valid.spiffe_id.as_str(), "spiffe://example.org/agent");
        assert_eq!(valid.claims["tessera"]["owner"], "team");
        assert_eq!(valid.claims["tessera"]["entry_id"], "e");
        assert_eq!(
            valid.expires_at - valid.claims["iat"].as_i64().unwrap(),
            300
        );
        // Validated again from memory: the audience and the time are still checked.
        assert!(
            jwt.validate(&later.token, "a", t0 + Duration::from_secs(152))
                .is_ok()
        );
        let error = jwt
            .validate(&later.token, "c", t0 + Duration::from_secs(152))
            .unwrap_err();
        assert!(matches!(error, JwtError::Audience { .. }), "{error}");
        let error = jwt
            .validate(&later.token, "a", t0 + Duration::from_secs(450))
            .unwrap_err();
        assert!(matches!(error, JwtError::Expired(_)), "{error}");
        let mut forged = later.token.clone();
        forged.pop();
        assert!(
            jwt.validate(&forged, "a", t0 + Duration::from_secs(152))
                .is_err()
        );
    }

    #[test]
    fn tokens_of_an_entry_that_is_gone_are_revoked() {
        let jwt = authority(10);
        let now = SystemTime::now();
        let kept = entry("kept", "spiffe://example.org/kept", &["unix:uid:1"]);
        let gone = entry("gone", "spiffe://example.org/gone", &["unix:uid:1"]);
        let (kept_token, _) = jwt.token(&kept, &["a".into()], now).unwrap();
        let (gone_token, _) = jwt.token(&gone, &["a".into()], now).unwrap();
        assert!(jwt.validate(&gone_token.token, "a", now).is_ok());
        let live = EntrySet::new(vec![kept.clone()]);
        assert_eq!(jwt.revoke_entries_not_in(&live, now), 1);
        let error = jwt.validate(&gone_token.token, "a", now).unwrap_err();
        assert!(
            matches!(error, JwtError::Revoked(ref jti) if *jti == gone_token.jti),
            "{error}"
        );
        assert!(jwt.validate(&kept_token.token, "a", now).is_ok());
        assert_eq!(
            jwt.cached_tokens(),
            1,
            "the gone entry's token is not handed out again"
        );
        assert_eq!(jwt.revoke_entries_not_in(&live, now), 0, "revoked once");
    }

    #[test]
    fn a_delegated_tasks_token_names_its_chain_in_nested_act_claims() {
        use crate::ca::task::{TaskClaims, TaskLink};
        let link = |n: &str| TaskLink {
            task_id: format!("t-{n}"),
            spiffe_id: format!("spiffe://example.org/{n}/task/t-{n}"),
        };
        let mut e = entry(
            "derived",
            "spiffe://example.org/leaf/task/t-leaf",
            &["unix:uid:1"],
        );
        e.task = Some(Arc::new(TaskClaims {
            task_id: "t-leaf".into(),
            entry_id: "leaf".into(),
            owner: "team".into(),
            purpose: "review part of it".into(),
            chain: vec![link("root"), link("mid"), link("leaf")],
        }));
        let claims = Value::Object(claims(&e, &["api".into()], 100, 400, "j"));
        assert_eq!(claims["sub"], "spiffe://example.org/leaf/task/t-leaf");
        assert_eq!(claims["tessera"]["task_id"], "t-leaf");
        assert_eq!(claims["tessera"]["entry_id"], "leaf");
        assert_eq!(claims["tessera"]["purpose"], "review part of it");
        assert_eq!(claims["tessera"]["chain"].as_array().unwrap().len(), 3);
        assert_eq!(
            claims["act"],
            serde_json::json!({
                "sub": "spiffe://example.org/mid/task/t-mid",
                "task_id": "t-mid",
                "act": {"sub": "spiffe://example.org/root/task/t-root", "task_id": "t-root"},
            }),
            "the parent first, the root innermost"
        );
    }

    #[test]
    fn the_cache_drops_the_least_recently_used_token() {
        let jwt = authority(2);
        let e = entry("e", "spiffe://example.org/agent", &["unix:uid:1"]);
        let now = SystemTime::now();
        let aud = |a: &str| vec![a.to_string()];
        let (a, _) = jwt.token(&e, &aud("a"), now).unwrap();
        jwt.token(&e, &aud("b"), now).unwrap();
        jwt.token(&e, &aud("a"), now).unwrap();
        jwt.token(&e, &aud("c"), now).unwrap();
        assert_eq!(jwt.cached_tokens(), 2);
        let (a_again, fresh) = jwt.token(&e, &aud("a"), now).unwrap();
        assert!(!fresh && a_again.jti == a.jti, "a was used last: b went");
        let (_, fresh) = jwt.token(&e, &aud("b"), now).unwrap();
        assert!(fresh);
    }

    #[test]
    fn a_token_never_outlives_its_registration() {
        let jwt = authority(10);
        let now = SystemTime::now();
        let mut e = entry("e", "spiffe://example.org/agent", &["unix:uid:1"]);
        e.expires_at = Some(now + Duration::from_secs(60));
        let (token, _) = jwt.token(&e, &["a".into()], now).unwrap();
        assert!(token.expires_at <= crate::clock::unix_seconds(now) + 60);
        e.expires_at = Some(now - Duration::from_secs(1));
        e.id = "expired".into();
        assert!(jwt.token(&e, &["a".into()], now).is_err());
    }

    #[test]
    fn the_key_is_kept_across_restarts_and_a_bad_key_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let first =
            JwtAuthority::load_or_create(dir.path(), td.clone(), JwtOptions::default()).unwrap();
        let again =
            JwtAuthority::load_or_create(dir.path(), td.clone(), JwtOptions::default()).unwrap();
        assert_eq!(
            first.bundle_json(),
            again.bundle_json(),
            "no new key on restart"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join(KEY_FILE), "garbage").unwrap();
        let error = JwtAuthority::load_or_create(dir.path(), td, JwtOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(KEY_FILE) && error.contains("not PEM"),
            "{error}"
        );
    }
}
