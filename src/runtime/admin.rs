//! The admin sockets of both roles (the server's, and a standalone agent's): connections are
//! accepted from anyone who can reach the socket (it is 0600), and who may call is decided per
//! call from the connection's peer credentials, so that a refused caller gets an answer naming
//! the rule instead of a dropped connection.

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;

/// The admin socket's connections, as tonic serves them.
pub fn incoming(
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> ReceiverStream<Result<UnixStream, std::io::Error>> {
    super::accept::incoming(
        listener,
        "admin",
        shutdown,
        move |stream: UnixStream, _, handoff| async move {
            let _ = handoff.send(Ok(stream)).await;
        },
    )
}

/// Lets a call through when its caller is root or `own_uid` (the user the `role`, "server" or
/// "agent", runs as); refuses it with PermissionDenied naming the rule otherwise, and audits
/// that.
pub fn admit_administrator(
    request: tonic::Request<()>,
    own_uid: u32,
    role: &'static str,
) -> Result<tonic::Request<()>, tonic::Status> {
    let peer = request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred);
    match peer {
        Some(cred) if cred.uid() == 0 || cred.uid() == own_uid => Ok(request),
        Some(cred) => {
            tracing::warn!(
                target: "tessera::audit",
                uid = cred.uid(),
                pid = cred.pid().unwrap_or(0),
                "admin call refused: only root or the {role}'s user may administer"
            );
            Err(tonic::Status::permission_denied(format!(
                "the admin API is for root and the {role}'s user (uid {own_uid}); this caller \
                 runs as uid {}",
                cred.uid()
            )))
        }
        None => {
            tracing::warn!("admin call without peer credentials refused");
            Err(tonic::Status::permission_denied(format!(
                "the admin API is for root and the {role}'s user; this caller's uid is unknown"
            )))
        }
    }
}
