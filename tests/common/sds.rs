//! An Envoy-like SDS client on Envoy's own API types (the `envoy-types` crate), shared by the
//! tests that talk to an agent's Secret Discovery Service.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{DataSource, Node, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::Message;
use tessera::agent::sds::SECRET_TYPE_URL;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// How long a test waits for a response it expects.
pub const EXPECT: Duration = Duration::from_secs(15);
/// How long a test listens to be sure that nothing is sent.
pub const QUIET: Duration = Duration::from_millis(700);

pub async fn client(socket: &Path) -> SecretDiscoveryServiceClient<Channel> {
    let channel = tessera::cli::client::channel(socket).await.unwrap();
    SecretDiscoveryServiceClient::new(channel)
}

pub fn node(id: &str, plain: bool) -> Node {
    let metadata = plain.then(|| Struct {
        fields: [(
            "disable_spiffe_cert_validation".to_owned(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        )]
        .into(),
    });
    Node {
        id: id.to_owned(),
        cluster: "tests".to_owned(),
        metadata,
        ..Default::default()
    }
}

pub fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.to_owned(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        type_url: SECRET_TYPE_URL.to_owned(),
        response_nonce: nonce.to_owned(),
        ..Default::default()
    }
}

/// A bidirectional stream: requests in through `requests`, responses out of `responses`.
pub struct Stream<Req, Resp> {
    pub requests: mpsc::Sender<Req>,
    pub responses: tonic::Streaming<Resp>,
}

impl<Req, Resp> Stream<Req, Resp> {
    pub async fn send(&self, request: Req) {
        self.requests.send(request).await.unwrap();
    }

    pub async fn next(&mut self) -> Resp {
        tokio::time::timeout(EXPECT, self.responses.message())
            .await
            .expect("a response within 15 s")
            .expect("a response, not an error")
            .expect("the stream still open")
    }

    /// The stream's next item, error or not, if one comes within `limit`.
    pub async fn within(&mut self, limit: Duration) -> Option<Result<Option<Resp>, tonic::Status>> {
        tokio::time::timeout(limit, self.responses.message())
            .await
            .ok()
    }

    pub async fn quiet(&mut self, why: &str)
    where
        Resp: std::fmt::Debug,
    {
        if let Some(item) = self.within(QUIET).await {
            panic!("{why}, yet the agent sent {item:?}");
        }
    }
}

/// Opens a stream with `call`, `first` its first request.
async fn open<Req, Resp, F, Fut>(first: Req, call: F) -> Stream<Req, Resp>
where
    F: FnOnce(ReceiverStream<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<Resp>>, tonic::Status>>,
{
    let (requests, rx) = mpsc::channel(8);
    requests.send(first).await.unwrap();
    let responses = call(ReceiverStream::new(rx)).await.unwrap().into_inner();
    Stream {
        requests,
        responses,
    }
}

pub async fn stream_secrets(
    socket: &Path,
    first: DiscoveryRequest,
) -> Stream<DiscoveryRequest, DiscoveryResponse> {
    let mut client = client(socket).await;
    open(first, |requests| client.stream_secrets(requests)).await
}

pub async fn delta_secrets(
    socket: &Path,
    first: DeltaDiscoveryRequest,
) -> Stream<DeltaDiscoveryRequest, DeltaDiscoveryResponse> {
    let mut client = client(socket).await;
    open(first, |requests| client.delta_secrets(requests)).await
}

/// Decodes a packed secret, checking its type.
pub fn unpack(any: &envoy_types::pb::google::protobuf::Any) -> Secret {
    assert_eq!(any.type_url, SECRET_TYPE_URL);
    Secret::decode(any.value.as_slice()).unwrap()
}

/// A response's secrets by name, checking the response's type.
pub fn secrets(response: &DiscoveryResponse) -> BTreeMap<String, Secret> {
    assert_eq!(response.type_url, SECRET_TYPE_URL);
    assert!(!response.version_info.is_empty());
    response
        .resources
        .iter()
        .map(|any| {
            let secret = unpack(any);
            (secret.name.clone(), secret)
        })
        .collect()
}

pub fn inline(source: &Option<DataSource>) -> &[u8] {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(Specifier::InlineBytes(bytes)) => bytes,
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

pub fn pem_blocks(bytes: &[u8], tag: &str) -> Vec<Vec<u8>> {
    pem::parse_many(bytes)
        .unwrap()
        .into_iter()
        .filter(|block| block.tag() == tag)
        .map(|block| block.into_contents())
        .collect()
}

pub fn tls_certificate(secret: &Secret) -> &TlsCertificate {
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(certificate)) => certificate,
        other => panic!("{}: expected a tls_certificate, got {other:?}", secret.name),
    }
}

pub fn validation_context(secret: &Secret) -> &CertificateValidationContext {
    match &secret.r#type {
        Some(secret::Type::ValidationContext(context)) => context,
        other => panic!(
            "{}: expected a validation_context, got {other:?}",
            secret.name
        ),
    }
}

/// The plain form: `trusted_ca` and `crl`, as PEM text.
pub fn plain_validation(secret: &Secret) -> (String, String) {
    let context = validation_context(secret);
    assert!(context.custom_validator_config.is_none(), "the plain form");
    (
        String::from_utf8(inline(&context.trusted_ca).to_vec()).unwrap(),
        String::from_utf8(inline(&context.crl).to_vec()).unwrap(),
    )
}
