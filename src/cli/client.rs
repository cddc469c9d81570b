//! gRPC clients for the CLI over Unix sockets: the Workload API (endpoint URI parsing, the
//! security header) and the server's admin API, with the mapping of their statuses to failures.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::Failure;
use crate::agent::workload::SECURITY_HEADER;
use crate::proto::tessera::admin_client::AdminClient;
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

/// Adds the Workload API's security header (the Tasks service asks for it too).
pub(super) fn add_security_header(
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
    Ok(workload_client(channel(&socket_path(address)?).await?))
}

/// A Workload API client on `channel`, adding the security header to every call.
pub fn workload_client(channel: Channel) -> WorkloadClient {
    SpiffeWorkloadApiClient::with_interceptor(channel, add_security_header as fn(_) -> _)
}

/// A gRPC channel to the Unix socket at `path` (no Workload API header added).
pub async fn channel(path: &Path) -> Result<Channel, Failure> {
    dial(Endpoint::from_static("http://localhost"), path)
        .await
        .map_err(|e| {
            Failure::failed(format!(
                "cannot connect to the Workload API at {}: {} (is the agent running?)",
                path.display(),
                cause(&e)
            ))
        })
}

/// Connects to the server's admin API on the Unix socket at `socket`.
pub async fn connect_admin(socket: &Path) -> Result<AdminClient<Channel>, Failure> {
    // Admin calls are short; a bound keeps a wedged server from hanging a script forever.
    let endpoint = Endpoint::from_static("http://localhost").timeout(ADMIN_CALL_TIMEOUT);
    let channel = dial(endpoint, socket)
        .await
        .map_err(|e| admin_connect_failure(socket, &e))?;
    Ok(AdminClient::new(channel))
}

/// How long one admin call may take before the CLI gives up.
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens `endpoint` over the Unix socket at `path`.
async fn dial(endpoint: Endpoint, path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The endpoint's URI is required by tonic but unused: the connector dials the socket.
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
}

/// What went wrong under a connection error: tonic's own wording ("transport error") hides it.
fn cause(error: &tonic::transport::Error) -> String {
    std::error::Error::source(error)
        .map(|s| s.to_string())
        .unwrap_or_else(|| error.to_string())
}

/// The last error of a source chain: the one that says what actually happened.
fn innermost<'a>(
    mut error: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    while let Some(source) = error.source() {
        error = source;
    }
    error
}

/// The OS error behind a connection error, if any.
fn io_error_kind(error: &tonic::transport::Error) -> Option<std::io::ErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

/// Where to point the CLI when the server is not at the socket it tried.
const ADMIN_SOCKET_HINT: &str =
    "pass --admin-socket PATH or set TESSERA_ADMIN_SOCKET to use another socket";

fn admin_connect_failure(socket: &Path, error: &tonic::transport::Error) -> Failure {
    let hint = match io_error_kind(error) {
        Some(std::io::ErrorKind::PermissionDenied) => {
            "the admin socket is for root only; run this command as root".to_owned()
        }
        _ => format!("is the server running? {ADMIN_SOCKET_HINT}"),
    };
    Failure::failed(format!(
        "the tessera server is not reachable at {}: {} ({hint})",
        socket.display(),
        cause(error)
    ))
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

/// A failure for a status the admin API returned from a call through `socket`.
///
/// The server's message is kept: it says what was wrong in the operator's terms. A refused
/// argument is the caller's mistake (exit 2); everything else is a failure (exit 1).
pub fn admin_status_failure(status: tonic::Status, socket: &Path) -> Failure {
    let message = status.message();
    // Statuses the server sent carry no source; one with a source was made here from a broken
    // connection, and its message alone ("transport error") explains nothing.
    if let Some(source) = std::error::Error::source(&status) {
        return Failure::failed(format!(
            "the call to the tessera server at {} failed: {} (is a tessera server listening \
             there? {ADMIN_SOCKET_HINT})",
            socket.display(),
            innermost(source)
        ));
    }
    match status.code() {
        tonic::Code::InvalidArgument => Failure::usage(format!("the server refused: {message}")),
        tonic::Code::NotFound | tonic::Code::AlreadyExists => Failure::failed(message),
        tonic::Code::FailedPrecondition => {
            Failure::failed(format!("not possible in the current state: {message}"))
        }
        tonic::Code::Aborted => Failure::failed(format!(
            "changed by someone else meanwhile: {message}; run the command again"
        )),
        tonic::Code::Unavailable => Failure::failed(format!(
            "the tessera server at {} is unavailable: {message} (if it is running, retry \
             later; otherwise {ADMIN_SOCKET_HINT})",
            socket.display()
        )),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => Failure::failed(format!(
            "the server refused this caller: {message} (run this command as root)"
        )),
        tonic::Code::Unimplemented => Failure::failed(format!(
            "{} does not serve the admin API ({message}); is it a tessera server of this \
             version? {ADMIN_SOCKET_HINT}",
            socket.display()
        )),
        // A call over the time limit ends Cancelled on this side, DeadlineExceeded on the other.
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => Failure::failed(format!(
            "the server did not answer in time ({message}); calls may take {}s",
            ADMIN_CALL_TIMEOUT.as_secs()
        )),
        code => Failure::failed(format!("the server answered {code:?}: {message}")),
    }
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

    #[test]
    fn maps_admin_statuses_to_exit_codes() {
        let socket = Path::new("/run/t/admin.sock");
        let map =
            |code, message: &str| admin_status_failure(tonic::Status::new(code, message), socket);

        let refused = map(
            tonic::Code::InvalidArgument,
            "selector \"x\" is not type:kind:value",
        );
        assert_eq!(refused.code, 2);
        assert!(
            refused.message.contains("selector \"x\""),
            "{}",
            refused.message
        );

        for code in [
            tonic::Code::NotFound,
            tonic::Code::AlreadyExists,
            tonic::Code::FailedPrecondition,
            tonic::Code::Aborted,
            tonic::Code::Unavailable,
            tonic::Code::PermissionDenied,
            tonic::Code::Unimplemented,
            tonic::Code::Internal,
        ] {
            let failure = map(code, "the server's words");
            assert_eq!(failure.code, 1, "{code:?}");
            assert!(
                failure.message.contains("the server's words"),
                "{}",
                failure.message
            );
        }

        let unavailable = map(tonic::Code::Unavailable, "connection reset");
        assert!(
            unavailable.message.contains("/run/t/admin.sock"),
            "{}",
            unavailable.message
        );
        assert!(
            unavailable.message.contains("--admin-socket"),
            "{}",
            unavailable.message
        );
        assert!(
            unavailable.message.contains("TESSERA_ADMIN_SOCKET"),
            "{}",
            unavailable.message
        );
        assert!(
            map(tonic::Code::Aborted, "moved on")
                .message
                .contains("run the command again")
        );
    }

    #[tokio::test]
    async fn missing_admin_socket_says_how_to_point_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent.sock");
        let Err(failure) = connect_admin(&socket).await else {
            panic!("connected to nothing");
        };
        assert_eq!(failure.code, 1);
        assert!(
            failure.message.contains("not reachable"),
            "{}",
            failure.message
        );
        assert!(
            failure.message.contains(&socket.display().to_string()),
            "{}",
            failure.message
        );
        assert!(
            failure.message.contains("--admin-socket"),
            "{}",
            failure.message
        );
    }
}
