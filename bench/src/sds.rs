//! Scenario `sds_streams`: thousands of concurrent Envoy SDS streams on one agent through a
//! rotation, beside `streams_at_scale` (the same through the Workload API): every stream must
//! be pushed its next SVID before the one it holds expires, within the agent's memory target.

use std::path::Path;
use std::time::{Duration, SystemTime};

use prost::Message;
use tokio::sync::{Barrier, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::scenarios::{
    RotationSeen, STREAMS_PER_CONNECTION, StreamsRun, streams_through_rotation,
};
use super::{BenchError, Plan, ScenarioResult};
use tessera::agent::sds::SECRET_TYPE_URL;
use tessera::proto::envoy::config::core::v3::{Node, data_source::Specifier};
use tessera::proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use tessera::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tessera::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;

/// Every this many streams, one is incremental (DeltaSecrets); the rest state-of-the-world.
const DELTA_EVERY: usize = 4;
/// What each stream subscribes to, as an Envoy with one mTLS listener does.
const NAMES: [&str; 2] = ["default", "ROOTCA"];

fn failed(what: &'static str) -> impl Fn(tonic::Status) -> BenchError {
    move |s| BenchError::Failed(format!("{what}: {:?} {}", s.code(), s.message()))
}

fn node() -> Option<Node> {
    Some(Node {
        id: "bench-envoy".into(),
        cluster: "bench".into(),
        ..Default::default()
    })
}

/// The PEM chain of the `default` secret among `resources`, if there.
fn default_chain<'a>(
    resources: impl Iterator<Item = &'a prost_types::Any>,
) -> Result<Option<Vec<u8>>, BenchError> {
    for any in resources {
        if any.type_url != SECRET_TYPE_URL {
            return Err(BenchError::Failed(format!(
                "resource of type {}",
                any.type_url
            )));
        }
        let secret = Secret::decode(any.value.as_slice())
            .map_err(|e| BenchError::Failed(format!("decoding a Secret: {e}")))?;
        if secret.name != "default" {
            continue;
        }
        let Some(secret::Type::TlsCertificate(certificate)) = secret.r#type else {
            return Err(BenchError::Failed(
                "`default` is not a tls_certificate".into(),
            ));
        };
        return match certificate.certificate_chain.and_then(|c| c.specifier) {
            Some(Specifier::InlineBytes(bytes)) => Ok(Some(bytes)),
            _ => Err(BenchError::Failed("`default` has no inline chain".into())),
        };
    }
    Ok(None)
}

/// The not-after (Unix seconds) of the leaf of a PEM chain.
fn not_after(chain: &[u8]) -> Result<i64, BenchError> {
    let leaf = pem::parse_many(chain)
        .ok()
        .and_then(|blocks| blocks.into_iter().next())
        .ok_or_else(|| BenchError::Failed("no PEM certificate in the chain".into()))?;
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf.contents())
        .map_err(|e| BenchError::Failed(format!("parsing the leaf: {e}")))?;
    Ok(certificate.validity().not_after.timestamp())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// Opens one StreamSecrets stream, ACKs its first response, waits for every other stream to
/// open, then for the push of a new `default`. `Some(true)`: pushed before the first SVID's
/// not-after; `Some(false)`: late; `None`: missed.
async fn state_of_the_world(channel: Channel, opened: &Barrier, wait: Duration) -> RotationSeen {
    let (requests, rx) = mpsc::channel(2);
    let ask = |nonce: String, version: String| DiscoveryRequest {
        version_info: version,
        node: node(),
        resource_names: NAMES.map(String::from).to_vec(),
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: nonce,
        error_detail: None,
    };
    let _ = requests.send(ask(String::new(), String::new())).await;
    let mut stream = SecretDiscoveryServiceClient::new(channel)
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .map_err(failed("StreamSecrets"))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(failed("StreamSecrets stream"))?
        .ok_or_else(|| BenchError::Failed("stream ended".into()))?;
    let held = default_chain(first.resources.iter())?
        .ok_or_else(|| BenchError::Failed("no `default` in the first response".into()))?;
    let expires = not_after(&held)?;
    let _ = requests.send(ask(first.nonce, first.version_info)).await;
    opened.wait().await;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(response))) => {
                let pushed = default_chain(response.resources.iter())?;
                if pushed.is_some_and(|chain| chain != held) {
                    return Ok(Some(unix_now() < expires));
                }
                let _ = requests
                    .send(ask(response.nonce, response.version_info))
                    .await;
            }
            _ => return Ok(None),
        }
    }
}

/// As [`state_of_the_world`], over DeltaSecrets.
async fn incremental(channel: Channel, opened: &Barrier, wait: Duration) -> RotationSeen {
    let (requests, rx) = mpsc::channel(2);
    let _ = requests
        .send(DeltaDiscoveryRequest {
            node: node(),
            type_url: SECRET_TYPE_URL.into(),
            resource_names_subscribe: NAMES.map(String::from).to_vec(),
            ..Default::default()
        })
        .await;
    let ack = |nonce: String| DeltaDiscoveryRequest {
        response_nonce: nonce,
        ..Default::default()
    };
    let mut stream = SecretDiscoveryServiceClient::new(channel)
        .delta_secrets(ReceiverStream::new(rx))
        .await
        .map_err(failed("DeltaSecrets"))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(failed("DeltaSecrets stream"))?
        .ok_or_else(|| BenchError::Failed("stream ended".into()))?;
    let held = default_chain(first.resources.iter().filter_map(|r| r.resource.as_ref()))?
        .ok_or_else(|| BenchError::Failed("no `default` in the first response".into()))?;
    let expires = not_after(&held)?;
    let _ = requests.send(ack(first.nonce)).await;
    opened.wait().await;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(response))) => {
                let pushed = default_chain(
                    response
                        .resources
                        .iter()
                        .filter_map(|r| r.resource.as_ref()),
                )?;
                if pushed.is_some_and(|chain| chain != held) {
                    return Ok(Some(unix_now() < expires));
                }
                let _ = requests.send(ack(response.nonce)).await;
            }
            _ => return Ok(None),
        }
    }
}

pub async fn sds_streams(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    let ttl = plan.stream_ttl.as_secs();
    let run = StreamsRun {
        name: "sds_streams",
        description: format!(
            "Concurrent Envoy SDS streams on one agent ({STREAMS_PER_CONNECTION} per connection; 1 in {DELTA_EVERY} DeltaSecrets, the rest StreamSecrets), each subscribed to `default` and `ROOTCA` and ACKing every response, SVID TTL {ttl}s: every stream must be pushed its next SVID before the one it holds expires. RSS and CPU are the agent process's own (/proc)."
        ),
        chart_file: "sds_streams_rss.png",
        chart_title: format!("Agent RSS against concurrent SDS streams (TTL {ttl}s)"),
        x_label: "concurrent SDS streams",
    };
    streams_through_rotation(plan, dir, run, |i, channel, opened, wait| async move {
        if i % DELTA_EVERY == DELTA_EVERY - 1 {
            incremental(channel, &opened, wait).await
        } else {
            state_of_the_world(channel, &opened, wait).await
        }
    })
    .await
}
