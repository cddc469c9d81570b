//! The one accept loop: the workload socket, the admin socket, the node API's TCP port and the
//! metrics port all accept through [`incoming`], which stops on shutdown and survives accept
//! errors (running out of descriptors, a peer gone before it was accepted) by pausing briefly.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// How long the loop pauses after a failed accept: long enough for closing connections to give
/// descriptors back, short enough that nobody notices.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Connections accepted but not yet taken by the server.
const QUEUE: usize = 64;

/// A listening socket.
pub trait Listener: Send + 'static {
    /// An accepted connection.
    type Connection: Send + 'static;
    /// The peer's address.
    type Address: Send + 'static;

    /// Waits for the next connection.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Connection, Self::Address)>> + Send;
}

impl Listener for UnixListener {
    type Connection = UnixStream;
    type Address = tokio::net::unix::SocketAddr;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Connection, Self::Address)>> + Send {
        UnixListener::accept(self)
    }
}

impl Listener for TcpListener {
    type Connection = TcpStream;
    type Address = std::net::SocketAddr;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Connection, Self::Address)>> + Send {
        TcpListener::accept(self)
    }
}

/// Where an accepted connection goes once it is ready for the server.
pub type Handoff<T> = mpsc::Sender<Result<T, io::Error>>;

/// Accepts on `listener` until `shutdown` resolves or the returned stream is dropped, calling
/// `admit` with each connection, its address and the handoff to the server. `admit` decides:
/// it may drop the connection, send it at once, or spawn work that sends it later (a TLS
/// handshake). `name` says which socket, in the log.
pub fn incoming<L, T, F, Fut>(
    listener: L,
    name: &'static str,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut admit: F,
) -> ReceiverStream<Result<T, io::Error>>
where
    L: Listener,
    T: Send + 'static,
    F: FnMut(L::Connection, L::Address, Handoff<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (handoff, connections) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => return,
                _ = handoff.closed() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((connection, address)) => admit(connection, address, handoff.clone()).await,
                Err(e) => {
                    tracing::warn!(socket = name, error = %e, "accept failed; retrying shortly");
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                    }
                }
            }
        }
    });
    ReceiverStream::new(connections)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Shutdown;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn admits_hands_over_and_stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let shutdown = Shutdown::new();
        let mut seen = 0u32;
        let mut stream = incoming(
            listener,
            "test",
            shutdown.signalled(),
            move |connection: UnixStream, _, handoff: Handoff<UnixStream>| {
                seen += 1;
                // Every second connection is refused by the admission rule.
                let admitted = seen % 2 == 1;
                async move {
                    if admitted {
                        let _ = handoff.send(Ok(connection)).await;
                    }
                }
            },
        );
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(UnixStream::connect(&path).await.unwrap());
        }
        for _ in 0..2 {
            stream.next().await.unwrap().unwrap();
        }
        shutdown.trigger();
        assert!(
            stream.next().await.is_none(),
            "the stream ends once the loop stops"
        );
    }
}
