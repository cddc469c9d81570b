//! The SPIFFE Workload API service: attests each caller, then streams the full current state of
//! its identities (or bundles) and a new message whenever that state changes.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::cache::{Identities, IdentityCache, IssueError, Lease};
use super::endpoint::PeerInfo;
use super::jwt::JwtAuthority;
use super::policy::{Asked, PolicyGate, Verdict};
use super::tasks::TaskRegistry;
use crate::attest::{AttestError, Attestor, CallerFacts};
use crate::entry::{EntrySet, RegistrationEntry};
use crate::policy::Action;
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use crate::proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid,
    X509svidRequest, X509svidResponse,
};
use crate::runtime::Shutdown;
use crate::spiffe::{SpiffeId, TrustDomain};

/// The metadata key every Workload API call must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// A stream whose client has left this many messages in a row unread (each replaced by a newer
/// one before it could be sent) is ended: the client is not reading.
const MAX_UNREAD_UPDATES: usize = 8;

/// At most this many attestations read /proc at once; the rest wait their turn.
const MAX_CONCURRENT_ATTESTATIONS: usize = 64;

/// Everything that can go wrong serving one call. Mapped to a gRPC status in one place,
/// [`ServeError::into_status`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The caller could not be attested.
    #[error("workload attestation failed: {0}")]
    Attestation(#[from] AttestError),
    /// The connection did not come through the agent's accept loop, so nothing was captured.
    #[error("no peer credentials for the connection: it was not accepted by the agent")]
    NotAccepted,
    /// Peer credentials could not be captured when the connection was accepted.
    #[error("no peer credentials for the connection: {0}")]
    NoPeer(#[source] Arc<AttestError>),
    /// The caller matches no registration entry.
    #[error("no identity issued")]
    NoIdentity,
    /// Minting an SVID, or recording its issuance, failed.
    #[error("could not issue an X.509-SVID: {0}")]
    Mint(#[from] IssueError),
    /// The agent is draining.
    #[error("agent is shutting down")]
    ShuttingDown,
    /// Entries now select on facts this stream's attestation did not gather; the client must
    /// reconnect to be attested afresh.
    #[error("registration entries now need facts gathered at connect time; reconnect")]
    StaleAttestation,
    /// A JWT-SVID could not be minted.
    #[error("could not issue a JWT-SVID: {0}")]
    Jwt(#[source] crate::jwt::JwtError),
    /// The blocking-pool task that attests a caller panicked or was cancelled.
    #[error("internal error: attestation task: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The limit on attestations in the blocking pool was closed.
    #[error("internal error: attestation permits: {0}")]
    Permits(#[source] tokio::sync::AcquireError),
}

impl ServeError {
    /// The status a client sees. Details of attestation and internal failures stay in the log.
    pub fn into_status(self) -> Status {
        match self {
            Self::NoIdentity => Status::permission_denied("no identity issued"),
            Self::ShuttingDown => Status::unavailable("agent is shutting down"),
            Self::StaleAttestation => Status::unavailable(
                "registration entries changed what a caller is attested by; reconnect",
            ),
            Self::Attestation(_) | Self::NotAccepted | Self::NoPeer(_) => {
                tracing::warn!(error = %self, "refused a Workload API call");
                Status::unavailable("workload attestation failed")
            }
            Self::Mint(_) => {
                tracing::error!(error = %self, "refused a Workload API call");
                Status::unavailable("could not issue an X.509-SVID; retry later")
            }
            Self::Jwt(crate::jwt::JwtError::Unavailable(why)) => {
                tracing::warn!(reason = %why, "could not get a JWT-SVID signed");
                Status::unavailable(
                    "could not issue a JWT-SVID: the server cannot be reached; retry later",
                )
            }
            Self::Jwt(crate::jwt::JwtError::Refused(why)) => Status::permission_denied(why),
            Self::Jwt(_) => {
                tracing::error!(error = %self, "refused a Workload API call");
                Status::unavailable("could not issue a JWT-SVID; retry later")
            }
            Self::Task(_) | Self::Permits(_) => {
                tracing::error!(error = %self, "Workload API call failed");
                Status::internal("internal error")
            }
        }
    }
}

/// Refuses Workload API calls without exactly one `workload.spiffe.io: true` header.
pub fn check_security_header(request: Request<()>) -> Result<Request<()>, Status> {
    let mut values = request.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v == "true" => Ok(request),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// The Workload API implementation. Cheap to clone; one per endpoint.
#[derive(Clone)]
pub struct WorkloadService {
    /// Identities and the signing CA.
    cache: Arc<IdentityCache>,
    /// Reads callers' facts.
    attestor: Arc<Attestor>,
    /// Bounds concurrent /proc reading and hashing.
    attest_permits: Arc<Semaphore>,
    /// The trust domain served, for bundle map keys.
    trust_domain: TrustDomain,
    /// Serve bundles to callers without an identity.
    allow_unauthenticated_verifiers: bool,
    /// Triggered when the agent drains; every stream then ends.
    shutdown: Shutdown,
    /// Live tasks: a caller inside one gets its identity first.
    tasks: Arc<TaskRegistry>,
    /// The authorisation policy, asked before anything is issued.
    gate: PolicyGate,
    /// Signs and validates JWT-SVIDs; `None` where this service serves none.
    jwt: Option<Arc<JwtAuthority>>,
    /// Serve the WIT-SVID profile (`[wit] enabled`).
    wit: bool,
}

impl WorkloadService {
    /// A service over `cache`, attesting with `attestor`.
    pub fn new(
        cache: Arc<IdentityCache>,
        attestor: Arc<Attestor>,
        trust_domain: TrustDomain,
        allow_unauthenticated_verifiers: bool,
        shutdown: Shutdown,
        tasks: Arc<TaskRegistry>,
        gate: PolicyGate,
    ) -> Self {
        Self {
            jwt: None,
            wit: false,
            cache,
            attestor,
            attest_permits: Arc::new(Semaphore::new(MAX_CONCURRENT_ATTESTATIONS)),
            trust_domain,
            allow_unauthenticated_verifiers,
            shutdown,
            tasks,
            gate,
        }
    }

    /// The service serving JWT-SVIDs from `jwt` (without one, their methods answer
    /// `Unimplemented`).
    pub fn with_jwt(mut self, jwt: Arc<JwtAuthority>) -> Self {
        self.jwt = Some(jwt);
        self
    }

    /// The service serving the WIT-SVID profile too (with the JWT authority's keys).
    pub fn with_wit(mut self, enabled: bool) -> Self {
        self.wit = enabled;
        self
    }

    /// The JWT authority and whether WIT-SVIDs are served.
    pub(super) fn jwt_and_wit(&self) -> (Option<&Arc<JwtAuthority>>, bool) {
        (self.jwt.as_ref(), self.wit)
    }

    /// The JWT-SVID authority, or `Unimplemented` where this agent has none.
    fn jwt_authority(&self) -> Result<&Arc<JwtAuthority>, Status> {
        self.jwt.as_ref().ok_or_else(|| {
            Status::unimplemented("this Workload API service was built without JWT-SVIDs")
        })
    }

    /// Identities and the signing CA.
    pub(super) fn cache(&self) -> &Arc<IdentityCache> {
        &self.cache
    }

    /// The trust domain served.
    pub(super) fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Triggered when the agent drains.
    pub(super) fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Attests the caller of `request` with its ancestry, whatever the entries need: for the
    /// Tasks service, which must know the task a caller runs in.
    pub(crate) async fn attest_with_lineage<T>(
        &self,
        request: &Request<T>,
    ) -> Result<CallerFacts, ServeError> {
        let mut needs = self.cache.entries().fact_needs();
        needs.lineage = true;
        self.attest_for(request, needs).await
    }

    pub(super) async fn attest<T>(&self, request: &Request<T>) -> Result<CallerFacts, ServeError> {
        self.attest_for(request, self.cache.entries().fact_needs())
            .await
    }

    async fn attest_for<T>(
        &self,
        request: &Request<T>,
        mut needs: crate::attest::FactNeeds,
    ) -> Result<CallerFacts, ServeError> {
        if needs.lineage {
            needs.lineage_since = self.tasks.oldest_root_ticks();
        }
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or(ServeError::NotAccepted)?;
        // Fast path, on this worker: /proc reads and cache hits only, which never wait on I/O.
        // Hashing an executable or an NSS lookup goes to the blocking pool below.
        match peer.credentials() {
            Err(e) => return Err(ServeError::NoPeer(e.clone())),
            Ok(credentials) => match self.attestor.attest(credentials, needs, false) {
                Err(AttestError::WouldBlock) => {}
                done => return done.map_err(ServeError::from),
            },
        }
        let attestor = self.attestor.clone();
        // The permit moves into the blocking task: a client that cancels its call cannot free
        // a slot while its executable is still being hashed.
        let permit = self
            .attest_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(ServeError::Permits)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            match peer.credentials() {
                Ok(credentials) => attestor
                    .attest(credentials, needs, true)
                    .map_err(ServeError::from),
                Err(e) => Err(ServeError::NoPeer(e.clone())),
            }
        })
        .await
        .map_err(ServeError::Task)?
    }

    /// The caller's current identities, or `NoIdentity`; with a policy set, only the entries
    /// it permits, the others returned in `refused` (entry id and the decision).
    pub(super) fn identities(
        &self,
        facts: &CallerFacts,
        lease: &mut Lease,
        refused: &mut Vec<(String, crate::policy::Decision)>,
    ) -> Result<Identities, ServeError> {
        loop {
            let entries = self.cache.entries();
            let matching = self.permitted(&entries, facts, refused)?;
            // `None`: the entries changed under us; match again against the new set.
            if let Some(identities) = self
                .cache
                .acquire(&entries, &matching, lease, Some(facts))?
            {
                return Ok(identities);
            }
        }
    }

    /// Admits the caller of a call that may issue: refused while the agent drains, attested,
    /// and recorded as refused if attestation fails.
    pub(super) async fn admit<T>(&self, request: &Request<T>) -> Result<CallerFacts, Status> {
        if self.shutdown.is_triggered() {
            return Err(ServeError::ShuttingDown.into_status());
        }
        self.attest(request)
            .await
            .map_err(|e| self.refused(None, e))
    }

    /// [`Self::identities`] for a stream: each policy refusal is recorded once per stream, when
    /// it first happens.
    pub(super) fn stream_identities(
        &self,
        facts: &CallerFacts,
        lease: &mut Lease,
        refusals: &mut StreamRefusals,
    ) -> Result<Identities, ServeError> {
        let identities = self.identities(facts, lease, &mut refusals.current);
        let now: Vec<String> = refusals.current.iter().map(|(id, _)| id.clone()).collect();
        if now != refusals.recorded {
            let new: Vec<_> = refusals
                .current
                .iter()
                .filter(|(id, _)| !refusals.recorded.contains(id))
                .cloned()
                .collect();
            self.record_refusals(facts, &new);
            refusals.recorded = now;
        }
        identities
    }

    /// The entries of `entries` whose identities the caller may have now, its task's first; with
    /// a policy set, only those it permits, the others returned in `refused`. `NoIdentity` when
    /// none is left.
    pub(super) fn permitted(
        &self,
        entries: &EntrySet,
        facts: &CallerFacts,
        refused: &mut Vec<(String, crate::policy::Decision)>,
    ) -> Result<Vec<Arc<RegistrationEntry>>, ServeError> {
        refused.clear();
        let mut matching = Vec::new();
        // The task the caller runs in comes first: its default identity. Only while a task is
        // live (the set then holds derived entries) is the registry asked at all.
        if entries.fact_needs().lineage
            && let Some(task) = self.tasks.task_of(&facts.lineage)
            && let Some(entry) = entries.get(&task.id)
        {
            matching.push(entry.clone());
        }
        matching.extend(matching_entries(entries, facts)?);
        matching.retain(|entry| {
            match self
                .gate
                .decide(Action::Issue, facts, entry, Asked::issue(entry))
            {
                Verdict::Denied(decision) => {
                    refused.push((entry.id.clone(), decision));
                    false
                }
                _ => true,
            }
        });
        if matching.is_empty() {
            return Err(ServeError::NoIdentity);
        }
        Ok(matching)
    }

    /// Records a refused caller (no identity, or attestation failed) and converts the error.
    pub(super) fn refused(&self, facts: Option<&CallerFacts>, error: ServeError) -> Status {
        if matches!(
            error,
            ServeError::NoIdentity
                | ServeError::Attestation(_)
                | ServeError::NotAccepted
                | ServeError::NoPeer(_)
        ) {
            self.cache.recorder().denied(facts, &error.to_string());
        }
        error.into_status()
    }

    /// Counts a delivery of each SVID to the caller (aggregated by the recorder).
    fn record_uses(&self, identities: &Identities, facts: &CallerFacts) {
        for (entry, svid) in &identities.svids {
            self.record_use(entry, svid, facts);
        }
    }

    /// Counts a delivery of `svid` to the caller (aggregated by the recorder).
    pub(super) fn record_use(
        &self,
        entry: &RegistrationEntry,
        svid: &crate::ca::X509Svid,
        facts: &CallerFacts,
    ) {
        self.cache.recorder().used(entry, svid, facts);
        self.gate.note_holder(&entry.id, facts);
    }

    /// Records the policy's refusals of `refused` entries to `facts`' caller.
    pub(super) fn record_refusals(
        &self,
        facts: &CallerFacts,
        refused: &[(String, crate::policy::Decision)],
    ) {
        for (entry_id, decision) in refused {
            self.cache.recorder().policy_denied(
                facts,
                Action::Issue.name(),
                entry_id,
                decision.version,
                &decision.determining,
            );
        }
    }

    pub(super) fn entitled_to_bundles(&self, facts: &CallerFacts) -> Result<bool, ServeError> {
        let entries = self.cache.entries();
        Ok(self.allow_unauthenticated_verifiers
            || (entries.fact_needs().lineage && self.tasks.task_of(&facts.lineage).is_some())
            || !matching_entries(&entries, facts)?.is_empty())
    }

    /// Attests a caller of a bundle stream and checks that it may have bundles; its facts and
    /// the cache's generation, subscribed before the first message is made.
    pub(super) async fn bundle_caller<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(CallerFacts, watch::Receiver<u64>), Status> {
        if self.shutdown.is_triggered() {
            return Err(ServeError::ShuttingDown.into_status());
        }
        let facts = self
            .attest(request)
            .await
            .map_err(ServeError::into_status)?;
        let generation = self.cache.subscribe();
        if !self
            .entitled_to_bundles(&facts)
            .map_err(ServeError::into_status)?
        {
            return Err(ServeError::NoIdentity.into_status());
        }
        Ok((facts, generation))
    }

    fn bundles_response(&self) -> X509BundlesResponse {
        X509BundlesResponse {
            crl: self.cache.crls().ders.clone(),
            bundles: HashMap::from([(self.trust_domain.id_string(), self.cache.ca().bundle_der())]),
        }
    }

    /// Runs a stream: `next` is asked for a message after every cache change and every rotation
    /// `rotations` (the stream's lease's waker) signals; `Ok(None)` means
    /// "nothing new to send", `Err` ends the stream with that error. `generation` must have been
    /// subscribed before `first` was computed, so that no change in between goes unnoticed.
    ///
    /// Each message is the full state, so only the latest matters: a message is handed to the
    /// connection only while its client reads (its socket takes bytes); until then it waits here,
    /// replaced by any newer one. A stream whose client leaves [`MAX_UNREAD_UPDATES`] messages in
    /// a row unread is ended. What a client that never reads costs is thus one message per stream.
    pub(super) fn spawn_stream<T, F>(
        &self,
        peer: Option<PeerInfo>,
        mut generation: watch::Receiver<u64>,
        rotations: Option<Arc<tokio::sync::Notify>>,
        first: T,
        mut next: F,
    ) -> ResponseStream<T>
    where
        T: Send + 'static,
        F: FnMut() -> Result<Option<T>, ServeError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(1);
        let shutdown = self.shutdown.clone();
        let open = peer.as_ref().map(PeerInfo::stream_open);
        tokio::spawn(async move {
            let mut latest: Option<T> = None;
            let mut unread = 0usize;
            loop {
                let client_reads = async {
                    if let Some(peer) = &peer {
                        peer.client_reads().await;
                    }
                    tx.reserve().await
                };
                // Only this stream's own SVIDs' rotations wake it; every other change comes
                // through the generation.
                let rotated = async {
                    match &rotations {
                        Some(waker) => waker.notified().await,
                        None => std::future::pending().await,
                    }
                };
                let ended = tokio::select! {
                    changed = generation.changed() => changed.is_err(),
                    _ = rotated => false,
                    _ = tx.closed() => return,
                    _ = shutdown.signalled() => true,
                    permit = client_reads, if latest.is_some() => {
                        let Ok(permit) = permit else { return };
                        if let Some(message) = latest.take() {
                            permit.send(Ok(message));
                        }
                        unread = 0;
                        continue;
                    }
                };
                let outcome = if ended {
                    Err(ServeError::ShuttingDown)
                } else {
                    next()
                };
                match outcome {
                    Ok(None) => {}
                    Ok(Some(message)) => {
                        if latest.replace(message).is_some() {
                            unread += 1;
                        }
                        if unread >= MAX_UNREAD_UPDATES {
                            tracing::info!(
                                unread,
                                "ending a Workload API stream whose client does not read"
                            );
                            let status = Status::resource_exhausted(
                                "the client did not read this stream's updates",
                            );
                            drop(latest);
                            tokio::select! {
                                _ = tx.send(Err(status)) => {}
                                _ = tx.closed() => {}
                            }
                            return;
                        }
                    }
                    Err(e) => {
                        tokio::select! {
                            _ = tx.send(Err(e.into_status())) => {}
                            _ = tx.closed() => {}
                        }
                        return;
                    }
                }
            }
        });
        // The first message is ready now: it goes out without a hop through the update task.
        // The connection counts the stream as open until the server drops it.
        Box::pin(
            tokio_stream::once(Ok(first))
                .chain(ReceiverStream::new(rx))
                .map(move |message| {
                    let _open = &open;
                    message
                }),
        )
    }
}

/// A JSON object as a protobuf Struct.
fn json_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, json_value(v))).collect(),
    }
}

fn json_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_value).collect(),
        }),
        Value::Object(map) => Kind::StructValue(json_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A stream's policy refusals: those of its last resolution, and those already recorded.
#[derive(Default)]
pub(super) struct StreamRefusals {
    /// Entry ids and decisions of the last resolution's refusals.
    current: Vec<(String, crate::policy::Decision)>,
    /// Entry ids whose refusal this stream has recorded.
    recorded: Vec<String>,
}

/// The connection a request came on, if it came through the agent's accept loop.
pub(super) fn peer_of<T>(request: &Request<T>) -> Option<PeerInfo> {
    request.extensions().get::<PeerInfo>().cloned()
}

/// Entries `facts` match now; refuses facts gathered without something the entries now need.
fn matching_entries(
    entries: &EntrySet,
    facts: &CallerFacts,
) -> Result<Vec<Arc<RegistrationEntry>>, ServeError> {
    if entries.fact_needs().exe_sha256 && facts.exe_sha256.is_none() {
        return Err(ServeError::StaleAttestation);
    }
    Ok(entries.matching(&facts.selectors, SystemTime::now()))
}

/// What a client would see change between two X.509-SVID messages: serials and hints, the
/// CA and the CRL set.
type SvidFingerprint = (Vec<(String, String)>, u64, u64);

fn fingerprint(ids: &Identities) -> SvidFingerprint {
    let svids = ids
        .svids
        .iter()
        .map(|(entry, svid)| {
            (
                svid.serial_hex.clone(),
                entry.hint.clone().unwrap_or_default(),
            )
        })
        .collect();
    (svids, ids.ca_generation, ids.crl_generation)
}

/// The Workload API message for `ids`.
pub(super) fn svid_response(ids: &Identities) -> X509svidResponse {
    let bundle = ids.ca.bundle_der();
    X509svidResponse {
        svids: ids
            .svids
            .iter()
            .map(|(entry, svid)| X509svid {
                spiffe_id: svid.spiffe_id.to_string(),
                x509_svid: svid.chain_concat(),
                x509_svid_key: svid.key_pkcs8.to_vec(),
                bundle: bundle.clone(),
                hint: entry.hint.clone().unwrap_or_default(),
            })
            .collect(),
        crl: ids.crls.ders.clone(),
        federated_bundles: HashMap::new(),
    }
}

/// A Workload API response stream: the first message, then every update.
pub(super) type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadService {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;
    type FetchWITSVIDStream = ResponseStream<WitsvidResponse>;
    type FetchWITBundlesStream = ResponseStream<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let facts = self.admit(&request).await?;
        let generation = self.cache.subscribe();
        let mut lease = self.cache.lease();
        let mut refusals = StreamRefusals::default();
        let first = self
            .stream_identities(&facts, &mut lease, &mut refusals)
            .map_err(|e| self.refused(Some(&facts), e))?;
        tracing::debug!(pid = facts.pid, uid = facts.uid, exe = %facts.exe_path, svids = first.svids.len(), "serving X.509-SVIDs");
        let mut last = fingerprint(&first);
        let message = svid_response(&first);
        self.record_uses(&first, &facts);
        let service = self.clone();
        let peer = peer_of(&request);
        let rotations = lease.waker();
        let stream = self.spawn_stream(peer, generation, Some(rotations), message, move || {
            let ids = service.stream_identities(&facts, &mut lease, &mut refusals)?;
            let now = fingerprint(&ids);
            if now == last {
                return Ok(None);
            }
            last = now;
            service.record_uses(&ids, &facts);
            Ok(Some(svid_response(&ids)))
        });
        Ok(Response::new(stream))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let (facts, generation) = self.bundle_caller(&request).await?;
        let first = self.bundles_response();
        let mut last = first.clone();
        let service = self.clone();
        let peer = peer_of(&request);
        let stream = self.spawn_stream(peer, generation, None, first, move || {
            if !service.entitled_to_bundles(&facts)? {
                return Err(ServeError::NoIdentity);
            }
            let now = service.bundles_response();
            if now == last {
                return Ok(None);
            }
            last = now.clone();
            Ok(Some(now))
        });
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let jwt = self.jwt_authority()?;
        let asked = request.get_ref();
        if asked.audience.is_empty() || asked.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument(
                "audience is required: one or more non-empty values",
            ));
        }
        let wanted = match asked.spiffe_id.as_str() {
            "" => None,
            text => Some(SpiffeId::parse(text).map_err(|e| {
                Status::invalid_argument(format!("spiffe_id {text:?} is not a SPIFFE ID: {e}"))
            })?),
        };
        let facts = self.admit(&request).await?;
        let entries = self.cache.entries();
        let mut refused = Vec::new();
        let permitted = self.permitted(&entries, &facts, &mut refused);
        self.record_refusals(&facts, &refused);
        let mut permitted = permitted.map_err(|e| self.refused(Some(&facts), e))?;
        if let Some(wanted) = &wanted {
            permitted.retain(|entry| entry.spiffe_id == *wanted);
            if permitted.is_empty() {
                return Err(Status::permission_denied(format!(
                    "no identity issued: the caller is not entitled to {wanted}"
                )));
            }
        }
        let now = SystemTime::now();
        let mut svids = Vec::with_capacity(permitted.len());
        for entry in &permitted {
            let (token, _) = jwt
                .token(entry, &asked.audience, now)
                .await
                .map_err(|e| ServeError::Jwt(e).into_status())?;
            jwt.record_fetch(entry, &token, &facts);
            svids.push(Jwtsvid {
                spiffe_id: entry.spiffe_id.to_string(),
                svid: token.token,
                hint: entry.hint.clone().unwrap_or_default(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let jwt = self.jwt_authority()?.clone();
        let (facts, generation) = self.bundle_caller(&request).await?;
        let mut last = jwt.bundle_json();
        let first = JwtBundlesResponse {
            bundles: HashMap::from([(self.trust_domain.id_string(), last.clone())]),
        };
        let service = self.clone();
        let peer = peer_of(&request);
        // Woken by the cache (entitlement) and by the JWT bundle's own changes (server keys).
        let wake = super::wit::wake_on_cache_or_bundle(generation, &jwt);
        let stream = self.spawn_stream(peer, wake, None, first, move || {
            if !service.entitled_to_bundles(&facts)? {
                return Err(ServeError::NoIdentity);
            }
            let now = jwt.bundle_json();
            if now == last {
                return Ok(None);
            }
            last = now.clone();
            Ok(Some(JwtBundlesResponse {
                bundles: HashMap::from([(service.trust_domain.id_string(), now)]),
            }))
        });
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let jwt = self.jwt_authority()?;
        let asked = request.get_ref();
        if asked.audience.is_empty() {
            return Err(Status::invalid_argument("audience is required"));
        }
        if asked.svid.is_empty() {
            return Err(Status::invalid_argument("svid is required"));
        }
        // Any local process may validate: it is attested for the record, not entitled.
        let facts = self
            .attest(&request)
            .await
            .map_err(|e| self.refused(None, e))?;
        let valid = jwt
            .validate(&asked.svid, &asked.audience, SystemTime::now())
            .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
        jwt.record_validation(&valid, &facts);
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: valid.spiffe_id.to_string(),
            claims: Some(json_struct(valid.claims)),
        }))
    }

    async fn fetch_witsvid(
        &self,
        request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        self.wit_svids(request).await
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        self.wit_bundles(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_header_must_be_exactly_one_true() {
        let with = |values: &[&str]| {
            let mut request = Request::new(());
            for v in values {
                request
                    .metadata_mut()
                    .append(SECURITY_HEADER, v.parse().unwrap());
            }
            check_security_header(request)
                .map(|_| ())
                .map_err(|s| s.code())
        };
        assert_eq!(with(&["true"]), Ok(()));
        assert_eq!(with(&[]), Err(tonic::Code::InvalidArgument));
        assert_eq!(with(&["True"]), Err(tonic::Code::InvalidArgument));
        assert_eq!(with(&["true", "true"]), Err(tonic::Code::InvalidArgument));
    }

    #[test]
    fn a_stream_tells_cas_apart_by_generation_not_by_address() {
        let td = TrustDomain::new("td").unwrap();
        let (ca, _, _) = crate::ca::generate_root(
            &td,
            std::time::Duration::from_secs(3600),
            SystemTime::now(),
            0,
            "t",
        )
        .unwrap();
        let ca = Arc::new(ca);
        let crls = Arc::new(crate::agent::revocation::CrlSet::default());
        let sent = Identities {
            svids: Vec::new(),
            ca: ca.clone(),
            ca_generation: 1,
            crls: crls.clone(),
            crl_generation: 1,
        };
        let now = Identities {
            svids: Vec::new(),
            ca,
            ca_generation: 2,
            crls: crls.clone(),
            crl_generation: 1,
        };
        assert_ne!(
            fingerprint(&sent),
            fingerprint(&now),
            "a new CA at a reused address is still news"
        );
        let new_crls = Identities {
            svids: Vec::new(),
            ca: now.ca.clone(),
            ca_generation: 2,
            crls,
            crl_generation: 2,
        };
        assert_ne!(
            fingerprint(&now),
            fingerprint(&new_crls),
            "a new CRL set is news"
        );
    }
}
