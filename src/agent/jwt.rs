//! JWT-SVIDs on the agent: who signs them (the agent itself when standalone, with a key kept in
//! its state directory; the server otherwise, over the node API), the tokens minted, the JWT
//! bundle served and validated against, and the revoked tokens refused.
//!
//! A token is kept per entry and audience set and handed out again until half its life has
//! passed; the cache holds at most `jwt.cache_size` of them, dropping the least recently used.
//! Tokens in use are minted afresh in the background at half-life (`run_refresh`), so a repeat
//! fetch never waits for the server; when the server cannot be reached, a token past half-life
//! is still handed out until it expires.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::entry::{EntrySet, RegistrationEntry};
use crate::events::recorder::{JwtFacts, Recorder};
use crate::jwt::{Jwk, JwkSet, JwtError, JwtKey, SvidClaims, Validated};
use crate::proto::tessera::node_client::NodeClient;
use crate::proto::tessera::{MintJwtSvidRequest, RevocationReason, TaskLink};
use crate::spiffe::TrustDomain;

pub use crate::jwt::KeyFileError as JwtKeyError;

/// A token's lifetime unless `[jwt] ttl` says otherwise.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);
/// Tokens kept unless `[jwt] cache_size` says otherwise.
pub const DEFAULT_JWT_CACHE_SIZE: usize = 1000;
/// How often holders of the bundle should look for a newer one, in seconds.
const BUNDLE_REFRESH_HINT: u64 = 300;
/// The standalone agent's key file in its state directory.
const KEY_FILE: &str = "jwt_key.pem";
/// A server-mode agent's copy of the server's JWT keys and revocations, for restarts during
/// an outage.
const UPSTREAM_FILE: &str = "jwt_upstream.json";
/// Verified tokens remembered at most (those expired are dropped first, then all).
const MAX_VERIFIED: usize = 4096;
/// How long a signing request to the server may take.
const MINT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the refresher looks for tokens at half-life.
const REFRESH_TICK: Duration = Duration::from_secs(1);

/// How tokens are minted and kept (`[jwt]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwtOptions {
    /// Lifetime of a token (a server may cut it shorter).
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

/// A cached token with what it takes to mint its successor.
struct Cached {
    token: Token,
    /// The entry it was minted for.
    entry: Arc<RegistrationEntry>,
    /// Use stamp: orders the evictions.
    used: u64,
    /// Handed out since it was minted: only such tokens are refreshed in the background.
    in_use: bool,
    /// Background refreshes that failed in a row.
    failures: u32,
    /// No background refresh before this Unix second (after a failure).
    retry_at: i64,
}

/// A cached token's key: the entry id and the sorted audience.
type TokenKey = (String, Vec<String>);

/// Tokens by entry and sorted audience, least recently used dropped first.
#[derive(Default)]
struct TokenCache {
    tokens: HashMap<TokenKey, Cached>,
    /// Bumped on every use.
    clock: u64,
}

/// Who signs.
enum Signer {
    /// The standalone agent, with its own key.
    Local(JwtKey),
    /// The server, over the node API channel of the current session (none while away).
    Server(Mutex<Option<tonic::transport::Channel>>),
}

/// The JWT bundle as served, with its JSON.
struct Bundle {
    set: JwkSet,
    json: Vec<u8>,
}

impl Bundle {
    fn of(keys: Vec<Jwk>, sequence: u64) -> Self {
        let set = JwkSet {
            keys,
            spiffe_sequence: Some(sequence),
            spiffe_refresh_hint: Some(BUNDLE_REFRESH_HINT),
        };
        // A set of public keys always serialises.
        let json = serde_json::to_vec(&set).unwrap_or_default();
        Self { set, json }
    }
}

/// What a server-mode agent keeps on disk of the server's JWT state.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct UpstreamState {
    keys: Vec<Jwk>,
    revoked: HashMap<String, i64>,
}

/// A token minted for an entry and not yet expired.
struct Minted {
    jti: String,
    spiffe_id: String,
    expires_at: i64,
    task: Option<Arc<crate::ca::task::TaskClaims>>,
}

/// The agent's JWT-SVID signer and validator.
pub struct JwtAuthority {
    /// Who signs.
    signer: Signer,
    /// The trust domain whose tokens these are.
    trust_domain: TrustDomain,
    /// Lifetime and cache size.
    options: JwtOptions,
    /// Where issuance, use and revocation events go.
    recorder: Arc<Recorder>,
    /// The bundle: the standalone key, or the server's keys as last synced.
    bundle: RwLock<Arc<Bundle>>,
    /// Moves on every change of the bundle, for FetchJWTBundles streams.
    bundle_changes: watch::Sender<u64>,
    /// Tokens minted and not yet stale.
    cache: Mutex<TokenCache>,
    /// A gate per token being minted, so that concurrent callers get one token signed.
    minting: Mutex<HashMap<TokenKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Tokens whose form and signature have been verified, by the SHA-256 of the token: a
    /// relying party validating the same bearer token on every request pays for the signature
    /// once. Audience, time and revocation are checked on every call.
    verified: Mutex<HashMap<[u8; 32], Arc<Validated>>>,
    /// Every token minted for this node and not yet expired, by entry id.
    minted: Mutex<HashMap<String, Vec<Minted>>>,
    /// Tokens revoked here: `jti` to `exp` (forgotten once expired).
    revoked: Mutex<HashMap<String, i64>>,
    /// Tokens the server revoked, anywhere in the trust domain (server mode).
    remote_revoked: RwLock<Arc<HashMap<String, i64>>>,
    /// Where the server's state is kept (server mode).
    upstream_file: Option<PathBuf>,
}

impl std::fmt::Debug for JwtAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthority")
            .field("local", &matches!(self.signer, Signer::Local(_)))
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl JwtAuthority {
    /// A standalone agent's authority, with the key saved in `state_dir` (made and saved there,
    /// 0600, first if there is none).
    pub fn load_or_create(
        state_dir: &Path,
        trust_domain: TrustDomain,
        options: JwtOptions,
        recorder: Arc<Recorder>,
    ) -> Result<Self, JwtKeyError> {
        let key = crate::jwt::load_or_create_key(&state_dir.join(KEY_FILE))?;
        Ok(Self::new(key, trust_domain, options, recorder))
    }

    /// A standalone authority signing with `key`.
    pub fn new(
        key: JwtKey,
        trust_domain: TrustDomain,
        options: JwtOptions,
        recorder: Arc<Recorder>,
    ) -> Self {
        let bundle = Bundle::of(vec![key.public_jwk().clone()], 1);
        Self::with(
            Signer::Local(key),
            bundle,
            trust_domain,
            options,
            recorder,
            None,
        )
    }

    /// A server-mode agent's authority: tokens come from the server, the bundle and the
    /// revocations from the sync stream (and from `state_dir` until it first arrives).
    pub fn upstream(
        state_dir: &Path,
        trust_domain: TrustDomain,
        options: JwtOptions,
        recorder: Arc<Recorder>,
    ) -> Self {
        let path = state_dir.join(UPSTREAM_FILE);
        let saved: UpstreamState = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "saved JWT bundle unreadable; waiting for the server's");
                UpstreamState::default()
            }),
            Err(_) => UpstreamState::default(),
        };
        let bundle = Bundle::of(saved.keys, 1);
        let authority = Self::with(
            Signer::Server(Mutex::new(None)),
            bundle,
            trust_domain,
            options,
            recorder,
            Some(path),
        );
        *write(&authority.remote_revoked) = Arc::new(saved.revoked);
        authority
    }

    fn with(
        signer: Signer,
        bundle: Bundle,
        trust_domain: TrustDomain,
        options: JwtOptions,
        recorder: Arc<Recorder>,
        upstream_file: Option<PathBuf>,
    ) -> Self {
        Self {
            signer,
            trust_domain,
            options,
            recorder,
            bundle: RwLock::new(Arc::new(bundle)),
            bundle_changes: watch::channel(0).0,
            cache: Mutex::new(TokenCache::default()),
            minting: Mutex::new(HashMap::new()),
            verified: Mutex::new(HashMap::new()),
            minted: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashMap::new()),
            remote_revoked: RwLock::new(Arc::default()),
            upstream_file,
        }
    }

    /// The JWT bundle as the Workload API sends it (a JWK Set, JSON).
    pub fn bundle_json(&self) -> Vec<u8> {
        read(&self.bundle).json.clone()
    }

    /// A receiver that moves on every change of the bundle.
    pub fn bundle_changes(&self) -> watch::Receiver<u64> {
        self.bundle_changes.subscribe()
    }

    /// Uses the node API `channel` to ask the server for tokens (server mode), until the
    /// returned guard is dropped (the session ended).
    pub(crate) fn connect(&self, channel: tonic::transport::Channel) -> Connected<'_> {
        if let Signer::Server(current) = &self.signer {
            *lock(current) = Some(channel);
        }
        Connected(self)
    }

    /// Takes the server's JWT keys (public JWKs, JSON) and revocations from a sync message,
    /// keeping them on disk for restarts during an outage.
    pub(crate) async fn apply_upstream(
        &self,
        keys: Option<Vec<String>>,
        revoked: Option<Vec<(String, i64)>>,
    ) {
        if keys.is_none() && revoked.is_none() {
            return;
        }
        if let Some(keys) = keys {
            let parsed: Vec<Jwk> = keys
                .iter()
                .filter_map(|text| match serde_json::from_str::<Jwk>(text) {
                    Ok(jwk) => Some(jwk),
                    Err(e) => {
                        tracing::warn!(error = %e, "the server sent a JWT key that does not parse; skipped");
                        None
                    }
                })
                .collect();
            let changed = {
                let mut bundle = write(&self.bundle);
                let changed = bundle.set.keys != parsed;
                if changed {
                    let sequence = bundle.set.spiffe_sequence.unwrap_or(0) + 1;
                    *bundle = Arc::new(Bundle::of(parsed, sequence));
                }
                changed
            };
            if changed {
                // Tokens verified under a key that left the bundle must be checked again.
                lock(&self.verified).clear();
                self.bundle_changes.send_modify(|n| *n = n.wrapping_add(1));
                tracing::info!(
                    keys = read(&self.bundle).set.keys.len(),
                    "JWT bundle synced from the server"
                );
            }
        }
        if let Some(revoked) = revoked {
            let revoked: Arc<HashMap<String, i64>> = Arc::new(revoked.into_iter().collect());
            lock(&self.cache)
                .tokens
                .retain(|_, cached| !revoked.contains_key(&cached.token.jti));
            *write(&self.remote_revoked) = revoked;
        }
        let Some(path) = self.upstream_file.clone() else {
            return;
        };
        let state = UpstreamState {
            keys: read(&self.bundle).set.keys.clone(),
            revoked: (**read(&self.remote_revoked)).clone(),
        };
        let saved = tokio::task::spawn_blocking(move || {
            let json = serde_json::to_vec(&state).unwrap_or_default();
            crate::durable::write_atomically(&path, &json, 0o644)
        })
        .await;
        if !matches!(saved, Ok(Ok(()))) {
            tracing::warn!("cannot keep the server's JWT bundle on disk");
        }
    }

    /// A token for `entry`'s identity and `audience` at `now`: the cached one unless it is past
    /// half its life, else a new one. `true` with a token minted now. With the server away, a
    /// cached token past half-life is handed out until it expires.
    pub async fn token(
        &self,
        entry: &Arc<RegistrationEntry>,
        audience: &[String],
        now: SystemTime,
    ) -> Result<(Token, bool), JwtError> {
        let now_s = crate::clock::unix_seconds(now);
        let mut audience = audience.to_vec();
        audience.sort();
        audience.dedup();
        let key = (entry.id.clone(), audience);
        if let Lookup::Fresh(token) = self.look_up(&key, entry, now_s) {
            return Ok((token, false));
        }
        // One mint per token at a time: callers asking for the same one wait for the first.
        let turn = self.minting_turn(&key);
        let _turn = turn.gate.lock().await;
        let kept = match self.look_up(&key, entry, now_s) {
            Lookup::Fresh(token) => return Ok((token, false)),
            Lookup::Stale(token) => Some(token),
            Lookup::Missing => None,
        };
        match self.mint(entry, &key.1, now_s).await {
            Ok(token) => {
                self.keep(key, entry.clone(), token.clone(), true);
                Ok((token, true))
            }
            Err(JwtError::Unavailable(why)) => match kept {
                Some(token) if token.expires_at > now_s => {
                    tracing::warn!(jti = %token.jti, reason = %why, "the server cannot sign now; handing out the cached JWT-SVID until it expires");
                    Ok((token, false))
                }
                _ => Err(JwtError::Unavailable(why)),
            },
            Err(e) => Err(e),
        }
    }

    /// The cached token for `key`, marked as used. A token minted for another version of the
    /// entry, or revoked since, is missing.
    fn look_up(&self, key: &TokenKey, entry: &RegistrationEntry, now: i64) -> Lookup {
        let mut cache = lock(&self.cache);
        cache.clock += 1;
        let stamp = cache.clock;
        match cache.tokens.get_mut(key) {
            Some(cached) if *cached.entry == *entry && !self.is_revoked(&cached.token.jti) => {
                cached.used = stamp;
                cached.in_use = true;
                if cached.token.stale(now) {
                    Lookup::Stale(cached.token.clone())
                } else {
                    Lookup::Fresh(cached.token.clone())
                }
            }
            _ => Lookup::Missing,
        }
    }

    /// The gate that lets one caller at a time mint the token of `key`.
    fn minting_turn(&self, key: &TokenKey) -> MintingTurn<'_> {
        let gate = lock(&self.minting).entry(key.clone()).or_default().clone();
        MintingTurn {
            authority: self,
            key: key.clone(),
            gate,
        }
    }

    /// Whether `jti` is revoked, here or by the server.
    fn is_revoked(&self, jti: &str) -> bool {
        lock(&self.revoked).contains_key(jti) || read(&self.remote_revoked).contains_key(jti)
    }

    fn keep(&self, key: TokenKey, entry: Arc<RegistrationEntry>, token: Token, in_use: bool) {
        let mut cache = lock(&self.cache);
        cache.clock += 1;
        let stamp = cache.clock;
        if cache.tokens.len() >= self.options.cache_size && !cache.tokens.contains_key(&key) {
            let oldest = cache
                .tokens
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                cache.tokens.remove(&oldest);
            }
        }
        cache.tokens.insert(
            key,
            Cached {
                token,
                entry,
                used: stamp,
                in_use,
                failures: 0,
                retry_at: 0,
            },
        );
    }

    /// Tokens in the cache now.
    pub fn cached_tokens(&self) -> usize {
        lock(&self.cache).tokens.len()
    }

    /// Mints a new token for `entry` and `audience` (sorted), signed here or by the server.
    async fn mint(
        &self,
        entry: &RegistrationEntry,
        audience: &[String],
        now: i64,
    ) -> Result<Token, JwtError> {
        self.mint_for(entry, audience, None, now).await
    }

    /// A WIT-SVID for `entry`'s identity at `now`, bound to a key made for it alone: the token
    /// and the holder's private key as a JWK. Never cached: every stream gets its own.
    pub async fn wit(
        &self,
        entry: &RegistrationEntry,
        now: SystemTime,
    ) -> Result<(Token, zeroize::Zeroizing<String>), JwtError> {
        let holder = JwtKey::generate()?;
        let token = self
            .mint_for(entry, &[], Some(&holder), crate::clock::unix_seconds(now))
            .await?;
        Ok((token, holder.private_jwk()?))
    }

    /// The WIT bundle: the JWT signing keys, for use `wit-svid`, as JSON.
    pub fn wit_bundle_json(&self) -> String {
        let bundle = read(&self.bundle).clone();
        let set = JwkSet {
            keys: bundle
                .set
                .keys
                .iter()
                .map(|k| k.with_use(crate::jwt::wit::WIT_SVID_USE))
                .collect(),
            spiffe_sequence: bundle.set.spiffe_sequence,
            spiffe_refresh_hint: bundle.set.spiffe_refresh_hint,
        };
        // A set of public keys always serialises.
        serde_json::to_string(&set).unwrap_or_default()
    }

    /// Mints a JWT-SVID for `audience`, or a WIT-SVID bound to `holder`.
    async fn mint_for(
        &self,
        entry: &RegistrationEntry,
        audience: &[String],
        holder: Option<&JwtKey>,
        now: i64,
    ) -> Result<Token, JwtError> {
        let task = entry.task.clone();
        let chain: Vec<(String, String)> = task
            .as_ref()
            .map(|t| {
                t.chain
                    .iter()
                    .map(|l| (l.task_id.clone(), l.spiffe_id.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let entry_id = task
            .as_ref()
            .map_or(entry.id.clone(), |t| t.entry_id.clone());
        let token = match &self.signer {
            Signer::Local(key) => {
                let mut expires_at = now + self.ttl_of(entry).as_secs() as i64;
                if let Some(limit) = entry.expires_at {
                    expires_at = expires_at.min(crate::clock::unix_seconds(limit));
                }
                if expires_at <= now {
                    return Err(JwtError::Claims(
                        "the entry's registration has expired".into(),
                    ));
                }
                let claims = SvidClaims {
                    subject: entry.spiffe_id.to_string(),
                    audience: audience.to_vec(),
                    issued_at: now,
                    expires_at,
                    jti: crate::jwt::new_jti(),
                    owner: entry.owner.clone(),
                    purpose: task
                        .as_ref()
                        .map_or(entry.purpose.clone(), |t| t.purpose.clone()),
                    entry_id: entry_id.clone(),
                    task: task.as_ref().map(|t| (t.task_id.clone(), chain.clone())),
                };
                let token = match holder {
                    None => crate::jwt::mint(key, &claims.to_json())?,
                    Some(holder) => {
                        crate::jwt::wit::mint_wit(key, &claims.to_wit_json(holder.public_jwk()))?
                    }
                };
                let facts = JwtFacts {
                    jti: &claims.jti,
                    spiffe_id: &claims.subject,
                    entry_id: &entry.id,
                    expires_at,
                    task: task.as_deref(),
                };
                self.recorder
                    .jwt_issued(&facts, audience, None)
                    .map_err(|e| JwtError::Key(format!("the issuance cannot be recorded: {e}")))?;
                Token {
                    token,
                    jti: claims.jti,
                    issued_at: now,
                    expires_at,
                }
            }
            Signer::Server(channel) => {
                if entry
                    .expires_at
                    .is_some_and(|limit| crate::clock::unix_seconds(limit) <= now)
                {
                    return Err(JwtError::Claims(
                        "the entry's registration has expired".into(),
                    ));
                }
                let channel = lock(channel)
                    .clone()
                    .ok_or_else(|| JwtError::Unavailable("not connected to the server".into()))?;
                let request = MintJwtSvidRequest {
                    entry_id,
                    spiffe_id: entry.spiffe_id.to_string(),
                    audience: audience.to_vec(),
                    ttl_seconds: self.ttl_within_registration(entry, now),
                    holder_jwk: holder
                        .map(|h| serde_json::to_string(h.public_jwk()).unwrap_or_default())
                        .unwrap_or_default(),
                    task_id: task.as_ref().map(|t| t.task_id.clone()).unwrap_or_default(),
                    chain: chain
                        .into_iter()
                        .map(|(task_id, spiffe_id)| TaskLink { task_id, spiffe_id })
                        .collect(),
                };
                let mut client = NodeClient::new(channel);
                let answer = tokio::time::timeout(MINT_TIMEOUT, client.mint_jwt_svid(request))
                    .await
                    .map_err(|_| {
                        JwtError::Unavailable("the server did not answer in time".into())
                    })?;
                let minted = match answer {
                    Ok(response) => response.into_inner(),
                    Err(status)
                        if matches!(
                            status.code(),
                            tonic::Code::Unavailable
                                | tonic::Code::DeadlineExceeded
                                | tonic::Code::Cancelled
                                | tonic::Code::Unknown
                        ) =>
                    {
                        return Err(JwtError::Unavailable(status.message().to_owned()));
                    }
                    Err(status) => {
                        return Err(JwtError::Refused(format!(
                            "the server refused to sign: {}",
                            status.message()
                        )));
                    }
                };
                Token {
                    token: minted.token,
                    jti: minted.jti,
                    issued_at: minted.issued_at,
                    expires_at: minted.expires_at,
                }
            }
        };
        let mut minted = lock(&self.minted);
        let of_entry = minted.entry(entry.id.clone()).or_default();
        of_entry.retain(|m| m.expires_at > now);
        of_entry.push(Minted {
            jti: token.jti.clone(),
            spiffe_id: entry.spiffe_id.to_string(),
            expires_at: token.expires_at,
            task,
        });
        Ok(token)
    }

    /// The lifetime to ask for at `now`: [`Self::ttl_of`], cut at the registration's expiry
    /// (for a task, its deadline).
    fn ttl_within_registration(&self, entry: &RegistrationEntry, now: i64) -> i64 {
        let ttl = self.ttl_of(entry).as_secs() as i64;
        match entry.expires_at {
            Some(limit) => ttl.min(crate::clock::unix_seconds(limit) - now).max(1),
            None => ttl,
        }
    }

    /// The lifetime of `entry`'s tokens: its own, else `[jwt] ttl`.
    fn ttl_of(&self, entry: &RegistrationEntry) -> Duration {
        entry.jwt_ttl.unwrap_or(self.options.ttl)
    }

    /// Counts a token handed to `caller`.
    pub fn record_fetch(
        &self,
        entry: &RegistrationEntry,
        token: &Token,
        caller: &crate::attest::CallerFacts,
    ) {
        let spiffe_id = entry.spiffe_id.to_string();
        let facts = JwtFacts {
            jti: &token.jti,
            spiffe_id: &spiffe_id,
            entry_id: &entry.id,
            expires_at: token.expires_at,
            task: entry.task.as_deref(),
        };
        self.recorder.jwt_used(&facts, caller, "fetched");
    }

    /// Counts a validation for `caller` of a token that passed.
    pub fn record_validation(&self, valid: &Validated, caller: &crate::attest::CallerFacts) {
        let Some(jti) = &valid.jti else {
            return;
        };
        let spiffe_id = valid.spiffe_id.to_string();
        let entry_id = valid.claims["tessera"]["entry_id"]
            .as_str()
            .unwrap_or_default();
        let facts = JwtFacts {
            jti,
            spiffe_id: &spiffe_id,
            entry_id,
            expires_at: valid.expires_at,
            task: None,
        };
        self.recorder.jwt_used(&facts, caller, "validated");
    }

    /// Validates `token` for `audience` at `now` against the trust domain's bundle, refusing
    /// revoked tokens.
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
        let remembered = lock(&self.verified).get(&digest).cloned();
        let valid = match remembered {
            Some(valid) => valid,
            None => {
                let bundle = read(&self.bundle).clone();
                let valid = Arc::new(crate::jwt::verify(token, now, |td| {
                    (*td == self.trust_domain).then_some(&bundle.set)
                })?);
                let mut verified = lock(&self.verified);
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
            && self.is_revoked(jti)
        {
            return Err(JwtError::Revoked(jti.clone()));
        }
        Ok((*valid).clone())
    }

    /// Revokes every unexpired token minted for an entry `live` no longer holds (deleted, or
    /// a task that ended), records each, and forgets the cached ones; the number revoked.
    pub(crate) fn revoke_entries_not_in(&self, live: &EntrySet, now: SystemTime) -> usize {
        let now = crate::clock::unix_seconds(now);
        let gone: Vec<(String, Minted)> = {
            let mut minted = lock(&self.minted);
            let ids: Vec<String> = minted
                .keys()
                .filter(|id| live.get(id).is_none())
                .cloned()
                .collect();
            ids.into_iter()
                .filter_map(|id| minted.remove(&id).map(|tokens| (id, tokens)))
                .flat_map(|(id, tokens)| tokens.into_iter().map(move |t| (id.clone(), t)))
                .filter(|(_, t)| t.expires_at > now)
                .collect()
        };
        // Tokens of entries that changed are minted afresh from the new version when next asked.
        lock(&self.cache).tokens.retain(|(entry_id, _), cached| {
            live.get(entry_id)
                .is_some_and(|entry| **entry == *cached.entry)
        });
        let mut revoked = lock(&self.revoked);
        revoked.retain(|_, exp| *exp > now);
        for (entry_id, token) in &gone {
            revoked.insert(token.jti.clone(), token.expires_at);
            let reason = if token.task.is_some() {
                RevocationReason::TaskEnded
            } else {
                RevocationReason::EntryRemoved
            };
            let facts = JwtFacts {
                jti: &token.jti,
                spiffe_id: &token.spiffe_id,
                entry_id,
                expires_at: token.expires_at,
                task: token.task.as_deref(),
            };
            self.recorder.jwt_revoked(&facts, reason, "");
        }
        gone.len()
    }

    /// Revokes the token `jti` if this agent signed it (standalone); whether it did.
    pub fn revoke_jti(&self, jti: &str, detail: &str) -> Result<bool, JwtError> {
        let now = crate::clock::unix_seconds(SystemTime::now());
        let found = lock(&self.minted).iter().find_map(|(entry_id, tokens)| {
            tokens
                .iter()
                .find(|t| t.jti == jti && t.expires_at > now)
                .map(|t| {
                    (
                        entry_id.clone(),
                        t.spiffe_id.clone(),
                        t.expires_at,
                        t.task.clone(),
                    )
                })
        });
        let Some((entry_id, spiffe_id, expires_at, task)) = found else {
            return Err(JwtError::Claims(format!(
                "no unexpired JWT-SVID with jti {jti:?} was signed here"
            )));
        };
        if lock(&self.revoked)
            .insert(jti.to_owned(), expires_at)
            .is_some()
        {
            return Ok(false);
        }
        lock(&self.cache)
            .tokens
            .retain(|_, cached| cached.token.jti != jti);
        let facts = JwtFacts {
            jti,
            spiffe_id: &spiffe_id,
            entry_id: &entry_id,
            expires_at,
            task: task.as_deref(),
        };
        self.recorder
            .jwt_revoked(&facts, RevocationReason::Operator, detail);
        Ok(true)
    }

    /// Mints afresh, at half-life, every cached token handed out since it was minted, until
    /// `stop`; tokens nobody asked for again are dropped at half-life instead. A refresh that
    /// fails keeps the old token, handed out until it expires.
    pub async fn run_refresh(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(REFRESH_TICK) => {}
            }
            let now = crate::clock::unix_seconds(SystemTime::now());
            let due: Vec<(TokenKey, Arc<RegistrationEntry>, String)> = {
                let mut cache = lock(&self.cache);
                cache.tokens.retain(|_, c| c.in_use || !c.token.stale(now));
                cache
                    .tokens
                    .iter()
                    .filter(|(_, c)| c.in_use && c.token.stale(now) && now >= c.retry_at)
                    .map(|(k, c)| (k.clone(), c.entry.clone(), c.token.jti.clone()))
                    .collect()
            };
            for (key, entry, jti) in due {
                // A caller minting this token now does the work; and once the gate is ours,
                // the token must still be the one found due.
                let turn = self.minting_turn(&key);
                let Ok(_gate) = turn.gate.try_lock() else {
                    continue;
                };
                let still_due = lock(&self.cache)
                    .tokens
                    .get(&key)
                    .is_some_and(|c| c.token.jti == jti);
                if !still_due {
                    continue;
                }
                match self.mint(&entry, &key.1, now).await {
                    Ok(token) => self.keep(key, entry, token, false),
                    Err(e) => {
                        let mut cache = lock(&self.cache);
                        let Some(cached) = cache.tokens.get_mut(&key) else {
                            continue;
                        };
                        if cached.failures == 0 {
                            tracing::warn!(entry = %entry.id, error = %e, "JWT-SVID refresh failed; the cached token is handed out until it expires, and the refresh retried");
                        }
                        cached.failures = cached.failures.saturating_add(1);
                        // 2 s, 4 s ... up to a minute between tries; none after a refusal.
                        cached.retry_at = now + (1i64 << cached.failures.min(6)).min(60);
                        if matches!(e, JwtError::Refused(_)) {
                            cached.in_use = false;
                        }
                        if cached.token.expires_at <= now {
                            cache.tokens.remove(&key);
                        }
                    }
                }
            }
        }
    }
}

/// What the cache holds for a token asked for.
enum Lookup {
    /// A token to hand out as it is.
    Fresh(Token),
    /// A token past half its life: handed out only when a new one cannot be had.
    Stale(Token),
    /// Nothing usable.
    Missing,
}

/// One caller's place in line to mint a token; the gate is forgotten with its last user.
struct MintingTurn<'a> {
    authority: &'a JwtAuthority,
    key: TokenKey,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for MintingTurn<'_> {
    fn drop(&mut self) {
        let mut minting = lock(&self.authority.minting);
        // Clones are only taken under this lock: the map's and this one mean no one else waits.
        if minting
            .get(&self.key)
            .is_some_and(|gate| Arc::ptr_eq(gate, &self.gate) && Arc::strong_count(gate) <= 2)
        {
            minting.remove(&self.key);
        }
    }
}

/// The server link of one session: while it lasts, tokens are asked for over its channel.
pub(crate) struct Connected<'a>(&'a JwtAuthority);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        if let Signer::Server(current) = &self.0.signer {
            *lock(current) = None;
        }
    }
}

/// A lock, taken even if a thread panicked holding it: the maps stay consistent entry by entry.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(cache_size: usize) -> JwtAuthority {
        JwtAuthority::new(
            JwtKey::generate().unwrap(),
            TrustDomain::new("example.org").unwrap(),
            JwtOptions {
                ttl: Duration::from_secs(300),
                cache_size,
            },
            crate::events::recorder::tests::memory_recorder().0,
        )
    }

    fn entry(id: &str, spiffe_id: &str, selectors: &[&str]) -> Arc<RegistrationEntry> {
        Arc::new(crate::entry::tests::entry(id, spiffe_id, selectors))
    }

    #[tokio::test]
    async fn a_token_is_reused_until_half_its_life_then_minted_afresh() {
        let jwt = authority(10);
        let e = entry("e", "spiffe://example.org/agent", &["unix:uid:1"]);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let aud = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (first, fresh) = jwt.token(&e, &aud(&["b", "a"]), t0).await.unwrap();
        assert!(fresh);
        let (again, fresh) = jwt
            .token(&e, &aud(&["a", "b", "a"]), t0 + Duration::from_secs(149))
            .await
            .unwrap();
        assert!(!fresh, "the same audience set, in any order");
        assert_eq!(again.token, first.token);
        let (later, fresh) = jwt
            .token(&e, &aud(&["a", "b"]), t0 + Duration::from_secs(150))
            .await
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

    #[tokio::test]
    async fn tokens_of_an_entry_that_is_gone_are_revoked() {
        let jwt = authority(10);
        let now = SystemTime::now();
        let kept = entry("kept", "spiffe://example.org/kept", &["unix:uid:1"]);
        let gone = entry("gone", "spiffe://example.org/gone", &["unix:uid:1"]);
        let (kept_token, _) = jwt.token(&kept, &["a".into()], now).await.unwrap();
        let (gone_token, _) = jwt.token(&gone, &["a".into()], now).await.unwrap();
        assert!(jwt.validate(&gone_token.token, "a", now).is_ok());
        let live = EntrySet::new(vec![(*kept).clone()]);
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

    #[tokio::test]
    async fn a_tasks_token_is_accounted_to_its_task_entry_and_names_its_chain() {
        use crate::ca::task::{TaskClaims, TaskLink};
        let link = |n: &str| TaskLink {
            task_id: format!("t-{n}"),
            spiffe_id: format!("spiffe://example.org/{n}/task/t-{n}"),
        };
        let mut e = crate::entry::tests::entry(
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
        let jwt = authority(10);
        let now = SystemTime::now();
        let (token, _) = jwt.token(&Arc::new(e), &["api".into()], now).await.unwrap();
        let claims = jwt.validate(&token.token, "api", now).unwrap().claims;
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

    #[tokio::test]
    async fn a_changed_entry_or_a_revoked_token_is_not_handed_out_again() {
        let jwt = authority(10);
        let now = SystemTime::now();
        let e = entry("e", "spiffe://example.org/agent", &["unix:uid:1"]);
        let (first, _) = jwt.token(&e, &["a".into()], now).await.unwrap();
        let mut changed = (*e).clone();
        changed.owner = "another team".into();
        let (second, fresh) = jwt
            .token(&Arc::new(changed), &["a".into()], now)
            .await
            .unwrap();
        assert!(
            fresh && second.jti != first.jti,
            "minted from the new version"
        );
        let valid = jwt.validate(&second.token, "a", now).unwrap();
        assert_eq!(valid.claims["tessera"]["owner"], "another team");
        // The server's revocations reach the cache: the revoked token is not served again.
        jwt.apply_upstream(None, Some(vec![(second.jti.clone(), second.expires_at)]))
            .await;
        assert!(matches!(
            jwt.validate(&second.token, "a", now),
            Err(JwtError::Revoked(_))
        ));
        let mut again = (*e).clone();
        again.owner = "another team".into();
        let (third, fresh) = jwt
            .token(&Arc::new(again), &["a".into()], now)
            .await
            .unwrap();
        assert!(
            fresh && third.jti != second.jti,
            "a new token, not the revoked one"
        );
    }

    #[tokio::test]
    async fn callers_asking_for_the_same_new_token_at_once_get_one_signed() {
        let jwt = authority(10);
        let e = entry("e", "spiffe://example.org/agent", &["unix:uid:1"]);
        let now = SystemTime::now();
        let aud = vec!["new".to_string()];
        let (a, b, c) = tokio::join!(
            jwt.token(&e, &aud, now),
            jwt.token(&e, &aud, now),
            jwt.token(&e, &aud, now)
        );
        let jtis: std::collections::HashSet<String> =
            [a, b, c].into_iter().map(|t| t.unwrap().0.jti).collect();
        assert_eq!(jtis.len(), 1, "one token for all three");
        assert!(lock(&jwt.minting).is_empty(), "the gate is forgotten");
    }

    #[tokio::test]
    async fn the_cache_drops_the_least_recently_used_token() {
        let jwt = authority(2);
        let e = entry("e", "spiffe://example.org/agent", &["unix:uid:1"]);
        let now = SystemTime::now();
        let aud = |a: &str| vec![a.to_string()];
        let (a, _) = jwt.token(&e, &aud("a"), now).await.unwrap();
        jwt.token(&e, &aud("b"), now).await.unwrap();
        jwt.token(&e, &aud("a"), now).await.unwrap();
        jwt.token(&e, &aud("c"), now).await.unwrap();
        assert_eq!(jwt.cached_tokens(), 2);
        let (a_again, fresh) = jwt.token(&e, &aud("a"), now).await.unwrap();
        assert!(!fresh && a_again.jti == a.jti, "a was used last: b went");
        let (_, fresh) = jwt.token(&e, &aud("b"), now).await.unwrap();
        assert!(fresh);
    }

    #[tokio::test]
    async fn a_token_never_outlives_its_registration() {
        let jwt = authority(10);
        let now = SystemTime::now();
        let mut e = crate::entry::tests::entry("e", "spiffe://example.org/agent", &["unix:uid:1"]);
        e.expires_at = Some(now + Duration::from_secs(60));
        let (token, _) = jwt
            .token(&Arc::new(e.clone()), &["a".into()], now)
            .await
            .unwrap();
        assert!(token.expires_at <= crate::clock::unix_seconds(now) + 60);
        e.expires_at = Some(now - Duration::from_secs(1));
        e.id = "expired".into();
        assert!(jwt.token(&Arc::new(e), &["a".into()], now).await.is_err());
    }

    #[test]
    fn the_key_is_kept_across_restarts_and_a_bad_key_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let recorder = || crate::events::recorder::tests::memory_recorder().0;
        let first =
            JwtAuthority::load_or_create(dir.path(), td.clone(), JwtOptions::default(), recorder())
                .unwrap();
        let again =
            JwtAuthority::load_or_create(dir.path(), td.clone(), JwtOptions::default(), recorder())
                .unwrap();
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
        let error = JwtAuthority::load_or_create(dir.path(), td, JwtOptions::default(), recorder())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(KEY_FILE) && error.contains("not PEM"),
            "{error}"
        );
    }
}
