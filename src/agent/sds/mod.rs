//! Envoy's Secret Discovery Service (v3) on the workload socket.
//!
//! Each caller is attested exactly as a Workload API caller is and gets the same identities
//! (the same entries, policy and tasks), as Envoy secrets. The three methods share one view of
//! the caller ([`Caller`]); the two streaming ones share one loop ([`run`]) over a protocol:
//! state-of-the-world ([`sotw`]) or incremental ([`delta`]). A stream pushes whenever what its
//! client subscribed to changes: a rotation, a new bundle, a new CRL set.

mod delta;
mod secrets;
mod sotw;

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::cache::Lease;
use super::endpoint::OpenStream;
use super::workload::{ServeError, StreamRefusals, WorkloadService, peer_of};
use crate::attest::CallerFacts;
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use crate::runtime::Shutdown;
pub use secrets::{
    ALL_BUNDLES, DEFAULT_SVID, ROOT_CA, SECRET_TYPE_URL, SPIFFE_VALIDATOR,
    SPIFFE_VALIDATOR_TYPE_URL,
};
use secrets::{Available, ContextMemo, Items, Source};

/// The node metadata key with which an Envoy asks for plain `trusted_ca` validation contexts.
pub const PLAIN_VALIDATION_METADATA: &str = "disable_spiffe_cert_validation";

/// How the agent serves SDS (`[sds]` in its configuration).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SdsOptions {
    /// Validation contexts as plain `trusted_ca` (and `crl`) for every caller, instead of the
    /// SPIFFE certificate validator.
    pub disable_spiffe_cert_validation: bool,
}

/// Everything that can end an SDS call. Mapped to a gRPC status in one place,
/// [`SdsError::into_status`].
#[derive(Debug, thiserror::Error)]
pub enum SdsError {
    /// A request named a resource type other than `Secret`.
    #[error("type_url {0:?} is not served here; SDS serves {SECRET_TYPE_URL}")]
    WrongType(String),
    /// A unary fetch named only secrets the caller may not have.
    #[error("no secret named {0:?} for this caller")]
    NotFound(Vec<String>),
    /// The Workload API side refused or failed (attestation, no identity, minting, draining).
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl SdsError {
    /// The status the client sees.
    fn into_status(self, caller: Option<&Caller>) -> Status {
        match self {
            Self::WrongType(_) => Status::invalid_argument(self.to_string()),
            Self::NotFound(_) => Status::not_found(self.to_string()),
            Self::Serve(error) => match caller {
                Some(caller) => caller.service.workload.refused(Some(&caller.facts), error),
                None => error.into_status(),
            },
        }
    }
}

/// The SDS implementation. Cheap to clone; one per endpoint.
#[derive(Clone)]
pub struct SdsService {
    /// Attestation, identities, accounting and the policy: the Workload API's own.
    workload: WorkloadService,
    /// How validation contexts are served.
    options: SdsOptions,
    /// The validation contexts of the current bundle and CRLs, shared by every stream.
    contexts: Arc<ContextMemo>,
}

impl SdsService {
    /// SDS over the identities `workload` serves.
    pub fn new(workload: WorkloadService, options: SdsOptions) -> Self {
        Self {
            workload,
            options,
            contexts: Arc::new(ContextMemo::default()),
        }
    }

    /// Attests the caller of `request` and checks that it may have something: an identity, or
    /// bundles.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let facts = self.workload.admit(request).await?;
        let mut caller = Caller {
            service: self.clone(),
            lease: self.workload.cache().lease(),
            facts,
            refusals: StreamRefusals::default(),
            plain: self.options.disable_spiffe_cert_validation,
        };
        if let Err(e) = caller.with_available(|_| ()) {
            return Err(e.into_status(Some(&caller)));
        }
        Ok(caller)
    }

    /// Runs `protocol` over `request`'s stream in a task of its own.
    async fn serve<P: Protocol>(
        &self,
        request: Request<Streaming<P::Request>>,
        protocol: P,
    ) -> Result<Response<ResponseStream<P::Response>>, Status> {
        let caller = self.caller(&request).await?;
        // Subscribed before anything is resolved, so no change in between goes unnoticed.
        let generation = self.workload.cache().subscribe();
        let open = peer_of(&request).map(|peer| peer.stream_open());
        let (tx, rx) = mpsc::channel(1);
        let link = Link {
            inbound: request.into_inner(),
            outbound: tx,
            generation,
            rotations: caller.lease.waker(),
            shutdown: self.workload.shutdown().clone(),
            _open: open,
        };
        tokio::spawn(run(caller, protocol, link));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One attested caller, as its call sees it.
struct Caller {
    /// The service, for its identities and accounting.
    service: SdsService,
    /// The caller's facts, gathered when the call came in.
    facts: CallerFacts,
    /// Keeps the caller's SVIDs in the cache while the call lasts.
    lease: Lease,
    /// The policy's refusals, each recorded once per call.
    refusals: StreamRefusals,
    /// Validation contexts as plain `trusted_ca`.
    plain: bool,
}

impl Caller {
    /// Remembers what the client said about itself on its first request.
    fn met(&mut self, node: &Node) {
        if asks_for_plain_validation(node) {
            self.plain = true;
        }
    }

    /// Calls `f` with everything the caller may have now: its identities (or none, for a
    /// verifier entitled to bundles only), the bundle and the CRLs.
    fn with_available<R>(&mut self, f: impl FnOnce(&Available<'_>) -> R) -> Result<R, SdsError> {
        let workload = &self.service.workload;
        let identities =
            workload.stream_identities(&self.facts, &mut self.lease, &mut self.refusals);
        let cache = workload.cache();
        let identities = match identities {
            Ok(identities) => Some(identities),
            Err(ServeError::NoIdentity) if workload.entitled_to_bundles(&self.facts)? => None,
            Err(e) => return Err(e.into()),
        };
        let (svids, ca, crls) = match &identities {
            Some(ids) => (ids.svids.as_slice(), ids.ca.clone(), ids.crls.clone()),
            None => (&[][..], cache.ca(), cache.crls()),
        };
        let trust_domain = workload.trust_domain();
        let available = Available {
            svids,
            contexts: self.service.contexts.get(trust_domain, &ca, &crls),
            trust_domain,
            plain: self.plain,
        };
        Ok(f(&available))
    }

    /// `items` packed as Envoy secrets; each SVID among them is counted as delivered.
    fn encode<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a String, &'a secrets::Item)>,
    ) -> Vec<(String, String, prost_types::Any)> {
        items
            .into_iter()
            .map(|(name, item)| {
                if let Source::Svid(entry, svid) = &item.source {
                    self.service.workload.record_use(entry, svid, &self.facts);
                }
                (
                    name.clone(),
                    item.version.clone(),
                    secrets::encode(name, item, self.plain),
                )
            })
            .collect()
    }
}

/// Whether `node`'s metadata asks for plain validation contexts (`true` as a boolean or text).
fn asks_for_plain_validation(node: &Node) -> bool {
    use prost_types::value::Kind;
    let Some(value) = node
        .metadata
        .as_ref()
        .and_then(|metadata| metadata.fields.get(PLAIN_VALIDATION_METADATA))
    else {
        return false;
    };
    match &value.kind {
        Some(Kind::BoolValue(flag)) => *flag,
        Some(Kind::StringValue(text)) => text.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

/// What both protocols keep about a stream: the client, whether it has spoken, and the nonces.
#[derive(Default)]
struct Session {
    /// The client, from its first request.
    node: Option<Node>,
    /// The first request has come.
    started: bool,
    /// Responses sent on this stream; the last one's nonce is this number.
    nonces: u64,
}

impl Session {
    /// Takes in what every request carries; `true` for the stream's first request.
    fn begin(
        &mut self,
        caller: &mut Caller,
        type_url: &str,
        node: Option<Node>,
    ) -> Result<bool, SdsError> {
        check_type(type_url)?;
        let first = !self.started;
        self.started = true;
        if self.node.is_none()
            && let Some(node) = node
        {
            caller.met(&node);
            self.node = Some(node);
        }
        Ok(first)
    }

    /// Which node the stream serves, for the log.
    fn node_name(&self) -> &str {
        self.node.as_ref().map_or("", |node| node.id.as_str())
    }

    /// Whether a request answers the last response (`nonce` empty: it answers none).
    fn answers_last(&self, nonce: &str) -> bool {
        self.nonces > 0 && nonce == self.nonces.to_string()
    }

    /// Logs the client's rejection of the last response.
    fn rejected(&self, nonce: &str, error: &crate::proto::google::rpc::Status) {
        tracing::warn!(
            node = self.node_name(),
            nonce,
            code = error.code,
            error = error.message,
            "the SDS client rejected the secrets sent (NACK); they are not sent again"
        );
    }

    /// The nonce of a new response, which becomes the last.
    fn next_nonce(&mut self) -> String {
        self.nonces += 1;
        self.nonces.to_string()
    }
}

/// One xDS protocol's side of a stream: what a request means and what to send on a change.
trait Protocol: Send + 'static {
    /// What the client sends.
    type Request: prost::Message + Default + Send + 'static;
    /// What the server sends.
    type Response: Send + 'static;

    /// Takes in one request; `Ok(true)`: resolve and maybe send now.
    fn on_request(&mut self, caller: &mut Caller, request: Self::Request)
    -> Result<bool, SdsError>;

    /// The response to send for what the caller may have now, if the client lacks any of it.
    fn on_change(&mut self, caller: &mut Caller) -> Result<Option<Self::Response>, SdsError>;
}

/// A stream's connection to its client and to the agent.
struct Link<Req, Resp> {
    /// Requests: the first, then ACKs, NACKs and subscription changes.
    inbound: Streaming<Req>,
    /// Responses, and the status that ends the stream.
    outbound: mpsc::Sender<Result<Resp, Status>>,
    /// Bumped on every change to the entries, the CA or CRLs.
    generation: watch::Receiver<u64>,
    /// Signalled when one of the stream's own SVIDs is rotated.
    rotations: Arc<tokio::sync::Notify>,
    /// The agent draining.
    shutdown: Shutdown,
    /// Counts the stream as open on its connection (so the connection is never idle) until the
    /// stream ends.
    _open: Option<OpenStream>,
}

/// Serves one stream until the client leaves, the agent drains or an error ends it.
async fn run<P: Protocol>(
    mut caller: Caller,
    mut protocol: P,
    mut link: Link<P::Request, P::Response>,
) {
    // Nothing is resolved until the first request says what the client wants.
    let mut started = false;
    loop {
        let resolve = tokio::select! {
            _ = link.shutdown.signalled() => {
                let _ = link.outbound.try_send(Err(ServeError::ShuttingDown.into_status()));
                return;
            }
            _ = link.outbound.closed() => return,
            request = link.inbound.message() => match request {
                Ok(Some(request)) => {
                    started = true;
                    protocol.on_request(&mut caller, request)
                }
                Ok(None) => return,
                Err(status) => {
                    tracing::debug!(%status, "SDS client's request stream failed");
                    return;
                }
            },
            changed = link.generation.changed() => match changed {
                Ok(()) => Ok(started),
                Err(_) => return,
            },
            _ = link.rotations.notified() => Ok(started),
        };
        let outcome = match resolve {
            Ok(true) => protocol.on_change(&mut caller),
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        };
        let message = match outcome {
            Ok(None) => continue,
            Ok(Some(response)) => Ok(response),
            Err(e) => Err(e.into_status(Some(&caller))),
        };
        let ends = message.is_err();
        tokio::select! {
            sent = link.outbound.send(message) => if sent.is_err() { return },
            _ = link.shutdown.signalled() => return,
        }
        if ends {
            return;
        }
    }
}

/// An SDS response stream.
type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Checks that a request asks for secrets (an empty type is taken to mean them).
fn check_type(type_url: &str) -> Result<(), SdsError> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(SdsError::WrongType(type_url.to_owned()))
    }
}

/// Resolves `names` for `caller` (none: everything).
fn resolve(caller: &mut Caller, names: &[String]) -> Result<Items, SdsError> {
    caller.with_available(|available| {
        available.items(names.iter().map(String::as_str), names.is_empty())
    })
}

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        self.serve(request, sotw::StateOfTheWorld::default()).await
    }

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        self.serve(request, delta::Incremental::default()).await
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let mut caller = self.caller(&request).await?;
        let request = request.into_inner();
        let answer = (|| {
            check_type(&request.type_url)?;
            if let Some(node) = &request.node {
                caller.met(node);
            }
            let items = resolve(&mut caller, &request.resource_names)?;
            if items.is_empty() {
                return Err(SdsError::NotFound(request.resource_names.clone()));
            }
            Ok(sotw::response(&caller, &items, String::new()))
        })();
        answer
            .map(Response::new)
            .map_err(|e| e.into_status(Some(&caller)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_with(metadata: Option<prost_types::Value>) -> Node {
        Node {
            metadata: metadata.map(|value| prost_types::Struct {
                fields: [(PLAIN_VALIDATION_METADATA.to_owned(), value)].into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn node_metadata_asks_for_plain_validation_with_true_only() {
        use prost_types::value::Kind;
        let value = |kind| Some(prost_types::Value { kind: Some(kind) });
        assert!(asks_for_plain_validation(&node_with(value(
            Kind::BoolValue(true)
        ))));
        assert!(asks_for_plain_validation(&node_with(value(
            Kind::StringValue("TRUE".into())
        ))));
        assert!(!asks_for_plain_validation(&node_with(value(
            Kind::BoolValue(false)
        ))));
        assert!(!asks_for_plain_validation(&node_with(value(
            Kind::NumberValue(1.0)
        ))));
        assert!(!asks_for_plain_validation(&node_with(None)));
    }

    #[test]
    fn only_the_secret_type_is_served() {
        assert!(check_type("").is_ok());
        assert!(check_type(SECRET_TYPE_URL).is_ok());
        let error = check_type("type.googleapis.com/envoy.config.cluster.v3.Cluster").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("envoy.config.cluster.v3.Cluster")
        );
        assert!(error.to_string().contains(SECRET_TYPE_URL));
    }
}
