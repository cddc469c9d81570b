//! A Workload API client for the CLI: endpoint URI parsing and a channel over the Unix socket.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::Failure;
use crate::agent::workload::SECURITY_HEADER;
use crate::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

/// A Workload API client that adds the security header to every call.
pub type WorkloadClient = SpiffeWorkloadApiClient<
    InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

/// The socket path of a SPIFFE endpoint address: `unix:///path`, `unix:/path` or `/path`.
pub fn socket_path(address: &str) -> Result<PathBuf, Failure> {
    let path = if let Some(rest) = address.strip_prefix("unix://") {
        if !rest.starts_with('/') {
            return Err(Failure::usage(format!(
                "socket address {address:?} has an authority; write unix:///absolute/path"
            )));
        }
        rest
    } else if let Some(rest) = address.strip_prefix("unix:") {
        rest
    } else if address.starts_with("tcp:") {
        return Err(Failure::usage(format!(
            "socket address {address:?}: tessera serves the Workload API on Unix sockets only; write unix:///absolute/path"
        )));
    } else {
        address
    };
    if !path.starts_with('/') || path.contains(['?', '#']) {
        return Err(Failure::usage(format!(
            "socket address {address:?} is not a Unix socket URI; write unix:///absolute/path"
        )));
    }
    Ok(PathBuf::from(path))
}

fn add_security_header(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    request.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(request)
}

/// Connects to the Workload API at `address`.
pub async fn connect(address: &str) -> Result<WorkloadClient, Failure> {
    let channel = channel(&socket_path(address)?).await?;
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel,
        add_security_header as fn(_) -> _,
    ))
}

/// A gRPC channel to the Unix socket at `path` (no Workload API header added).
pub async fn channel(path: &std::path::Path) -> Result<Channel, Failure> {
    let shown = path.display().to_string();
    let path = path.to_path_buf();
    // The URI is required by tonic but unused: the connector below dials the socket.
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| {
            Failure::failed(format!(
                "cannot connect to the Workload API at {shown}: {} (is the agent running?)",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string())
            ))
        })?;
    Ok(channel)
}

/// A failure for a status the Workload API returned.
pub fn status_failure(status: tonic::Status) -> Failure {
    let hint = match status.code() {
        tonic::Code::PermissionDenied => {
            " (this process matches no registration entry, or its identity was revoked)"
        }
        tonic::Code::Unavailable => {
            " (the agent could not attest or serve this process; see its log)"
        }
        _ => "",
    };
    Failure::failed(format!(
        "Workload API answered {:?}: {}{hint}",
        status.code(),
        status.message()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoint_addresses() {
        assert_eq!(
            socket_path("unix:///run/t/a.sock").unwrap(),
            PathBuf::from("/run/t/a.sock")
        );
        assert_eq!(
            socket_path("unix:/run/t/a.sock").unwrap(),
            PathBuf::from("/run/t/a.sock")
        );
        assert_eq!(
            socket_path("/run/t/a.sock").unwrap(),
            PathBuf::from("/run/t/a.sock")
        );
        for bad in [
            "unix://host/a.sock",
            "tcp://127.0.0.1:8000",
            "a.sock",
            "unix:///a.sock?x=1",
        ] {
            let err = socket_path(bad).unwrap_err();
            assert_eq!(err.code, 2, "{bad}");
            assert!(err.message.contains(bad), "{}", err.message);
        }
    }
}
