//! TLS between agents and servers (rustls with aws-lc-rs, TLS 1.3 only).
//!
//! Peers are identified by SPIFFE ID, not host name: an agent accepts a server certificate that
//! chains to the trust bundle and carries `spiffe://<td>/tessera/server`, whatever address it
//! dialled. The server asks for a client certificate but does not require one, because
//! attestation happens before a node has one; every other node API call checks the verified
//! node SVID itself.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::AbortHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::runtime::accept::Handoff;

/// Descriptors the server keeps for everything but node connections: the admin socket and its
/// clients, datastore connections, state files, logging.
const RESERVED_FDS: u64 = 128;

/// A TLS configuration that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key was refused by rustls.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// No usable trust anchor was given.
    #[error("trust bundle has no usable root certificate")]
    NoRoots,
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// What any peer of the node API can hold. Together the handshakes and the connections stay
/// under the descriptor limit with room to spare, so a flood cannot starve the admin socket or
/// the datastore.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// TLS handshakes in progress at once, a quarter of them at most from one source address.
    /// At either limit, a new connection displaces the oldest handshake (of its source, or of
    /// all) that has had [`ConnectionLimits::handshake_grace`] to finish, or is closed.
    pub handshakes: usize,
    /// How long a handshake in progress is safe from being displaced.
    pub handshake_grace: Duration,
    /// How long a client gets to complete its handshake.
    pub handshake_timeout: Duration,
    /// Connections past their handshake; more are closed at once.
    pub connections: usize,
    /// A connection on which the peer sends nothing (not even a keepalive answer) for this
    /// long is closed.
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// Handshakes one source address may have in progress: a quarter of all, so that a flood
    /// from one address leaves room for everyone else.
    pub fn handshakes_per_source(&self) -> usize {
        (self.handshakes / 4).max(1)
    }

    /// Limits that follow this process's RLIMIT_NOFILE: a quarter of the descriptors not
    /// reserved go to handshakes (at most 64), the rest to connections.
    pub fn from_descriptor_limit() -> Self {
        Self::for_descriptors(crate::runtime::descriptor_limit())
    }

    /// Limits for a process that may hold `descriptors` descriptors.
    pub fn for_descriptors(descriptors: u64) -> Self {
        let budget = descriptors.saturating_sub(RESERVED_FDS).max(32) as usize;
        let handshakes = (budget / 4).clamp(4, 64);
        Self {
            handshakes,
            handshake_grace: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            connections: budget - handshakes,
            // Both sides ping every 30 s (HTTP/2 keepalive), so a live peer is never this quiet.
            idle_timeout: Duration::from_secs(75),
        }
    }
}

/// The one crypto provider of the process.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A root store holding every parseable certificate of `roots`.
pub fn root_store(roots: &[Vec<u8>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    let (added, _) =
        store.add_parsable_certificates(roots.iter().map(|d| CertificateDer::from(d.clone())));
    if added == 0 {
        return Err(TlsError::NoRoots);
    }
    Ok(store)
}

/// The server side: presents `chain` (leaf first) with `key_pkcs8`, and verifies any client
/// certificate offered against `client_roots`.
pub fn server_config(
    chain: &[Vec<u8>],
    key_pkcs8: &[u8],
    client_roots: &[Vec<u8>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(client_roots)?),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(TlsError::Verifier)?;
    let chain = chain
        .iter()
        .map(|d| CertificateDer::from(d.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The client side: trusts `roots`, expects the server to be `server_id`, and presents
/// `client` (chain and PKCS#8 key) when given.
pub fn client_config(
    roots: &[Vec<u8>],
    server_id: &str,
    client: Option<(&[Vec<u8>], &[u8])>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: root_store(roots)?,
        server_id: server_id.to_owned(),
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client {
        Some((chain, key)) => builder.with_client_auth_cert(
            chain
                .iter()
                .map(|d| CertificateDer::from(d.clone()))
                .collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Verifies a server by trust bundle and SPIFFE ID instead of host name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    server_id: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        if crate::ca::node::uri_sans_of(end_entity) != [self.server_id.as_str()] {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What the server knows about a connected peer.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    /// The client's address.
    pub remote: SocketAddr,
    /// The client's leaf certificate, verified against the bundle, when it offered one.
    pub client_leaf: Option<Vec<u8>>,
}

/// An accepted TLS connection.
pub struct TlsConnection {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    peer: TlsPeer,
    /// Counts against the connection limit while the connection lives.
    _slot: OwnedSemaphorePermit,
    /// How long the peer may stay silent.
    idle_timeout: Duration,
    /// When the connection is closed unless the peer sends something first.
    idle_deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Connected for TlsConnection {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = tokio::time::Instant::now() + this.idle_timeout;
                    this.idle_deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.idle_deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    tracing::info!(remote = %this.peer.remote, "closing a node API connection that stayed silent");
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer sent nothing within the idle timeout",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The handshakes in progress, oldest first, so that a new connection can displace the oldest.
#[derive(Default)]
struct Handshakes {
    /// (id, source address, start, the handshake task) in start order.
    pending: VecDeque<(u64, IpAddr, tokio::time::Instant, AbortHandle)>,
    /// The id of the next handshake.
    next_id: u64,
}

impl Handshakes {
    /// Makes room for one more handshake from `source`: `true` when there is room, after
    /// displacing the oldest handshake (of `source` when it holds its share, of anyone when all
    /// are taken) if that one has had its grace; `false` when the new connection must go.
    fn make_room(
        &mut self,
        source: IpAddr,
        limits: &ConnectionLimits,
        now: tokio::time::Instant,
    ) -> bool {
        let from_source = self.pending.iter().filter(|p| p.1 == source).count();
        let oldest = if from_source >= limits.handshakes_per_source() {
            self.pending.iter().position(|p| p.1 == source)
        } else if self.pending.len() >= limits.handshakes {
            Some(0)
        } else {
            return true;
        };
        match oldest {
            Some(at) if now.duration_since(self.pending[at].2) >= limits.handshake_grace => {
                if let Some((_, _, _, task)) = self.pending.remove(at) {
                    task.abort();
                }
                true
            }
            _ => false,
        }
    }

    fn finished(&mut self, id: u64) {
        self.pending.retain(|pending| pending.0 != id);
    }
}

/// Accepts TCP connections and completes their TLS handshakes concurrently, each with the
/// configuration current at accept time, until `shutdown`, within `limits`. Failed handshakes
/// are logged and dropped; they never reach the gRPC server.
pub fn incoming(
    listener: TcpListener,
    configs: watch::Receiver<Arc<ServerConfig>>,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    tracing::debug!(?limits, "node API connection limits");
    let handshakes = Arc::new(Mutex::new(Handshakes::default()));
    let slots = Arc::new(Semaphore::new(limits.connections));
    crate::runtime::accept::incoming(
        listener,
        "node API",
        shutdown,
        move |tcp: TcpStream, remote: SocketAddr, handoff: Handoff<TlsConnection>| {
            let mut pending = handshakes.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            if pending.make_room(remote.ip(), &limits, now) {
                let id = pending.next_id;
                pending.next_id += 1;
                let task = tokio::spawn(handshake(
                    tcp,
                    remote,
                    TlsAcceptor::from(configs.borrow().clone()),
                    limits,
                    slots.clone(),
                    handoff,
                ));
                pending
                    .pending
                    .push_back((id, remote.ip(), now, task.abort_handle()));
                let handshakes = handshakes.clone();
                tokio::spawn(async move {
                    let _ = task.await;
                    handshakes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .finished(id);
                });
            } else {
                tracing::warn!(%remote, limit = limits.handshakes, "too many TLS handshakes in progress; closing a new connection");
            }
            std::future::ready(())
        },
    )
}

/// Completes one handshake and hands the connection over, if a connection slot is free.
async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    limits: ConnectionLimits,
    slots: Arc<Semaphore>,
    handoff: Handoff<TlsConnection>,
) {
    let _ = tcp.set_nodelay(true);
    let io = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            tracing::info!(target: "tessera::audit", %remote, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(%remote, "TLS handshake timed out");
            return;
        }
    };
    let Ok(slot) = slots.try_acquire_owned() else {
        tracing::warn!(%remote, limit = limits.connections, "too many node API connections; closing a new one");
        return;
    };
    let client_leaf = io
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    let connection = TlsConnection {
        io,
        peer: TlsPeer {
            remote,
            client_leaf,
        },
        _slot: slot,
        idle_timeout: limits.idle_timeout,
        idle_deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
    };
    let _ = handoff.send(Ok(connection)).await;
}

/// A gRPC channel to `address` (`host:port`) over TLS with `config`. Connects lazily: the
/// first call dials.
pub fn channel(
    address: &str,
    config: Arc<ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let address = address.to_owned();
    let endpoint = Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let connector = TlsConnector::from(config);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let (address, connector) = (address.clone(), connector.clone());
            async move {
                let tcp = TcpStream::connect(&address).await?;
                let _ = tcp.set_nodelay(true);
                // The name is only sent as SNI; the verifier checks the SPIFFE ID instead.
                let name = ServerName::try_from("tessera-server").map_err(io::Error::other)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::TrustDomain;
    use std::time::SystemTime;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    /// A server configuration with a fresh serving certificate, and a client that trusts it.
    fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let td = TrustDomain::new("example.org").unwrap();
        let now = SystemTime::now();
        let (root, _, _) =
            crate::ca::generate_root(&td, Duration::from_secs(3600), now, 1, "root").unwrap();
        let (cert, key) =
            crate::ca::node::sign_server_svid(&root, &td, Duration::from_secs(3600), now).unwrap();
        let server = server_config(&[cert.der], &key, &root.bundle).unwrap();
        let client =
            client_config(&root.bundle, &crate::ca::node::server_spiffe_id(&td), None).unwrap();
        (server, client)
    }

    fn limits(handshakes: usize, idle_timeout: Duration) -> ConnectionLimits {
        ConnectionLimits {
            handshakes,
            handshake_grace: Duration::from_millis(100),
            handshake_timeout: Duration::from_secs(60),
            connections: 16,
            idle_timeout,
        }
    }

    async fn serve(
        limits: ConnectionLimits,
    ) -> (
        SocketAddr,
        ReceiverStream<Result<TlsConnection, io::Error>>,
        Arc<ClientConfig>,
        crate::runtime::Shutdown,
    ) {
        let (server, client) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // The receiver keeps the last configuration after its sender is gone.
        let (_, configs) = watch::channel(server);
        let shutdown = crate::runtime::Shutdown::new();
        let stream = incoming(listener, configs, limits, shutdown.signalled());
        (address, stream, client, shutdown)
    }

    async fn tls_connect(
        address: SocketAddr,
        client: Arc<ClientConfig>,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(address).await.unwrap();
        TlsConnector::from(client)
            .connect(ServerName::try_from("tessera-server").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// Whether the server has closed `socket` (EOF or reset), waiting up to `limit`.
    async fn closed_within(socket: &mut TcpStream, limit: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(limit, socket.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_open_connections_are_bounded_and_cannot_keep_a_real_client_out() {
        let (address, mut accepted, client, shutdown) =
            serve(limits(4, Duration::from_secs(60))).await;
        // One source may hold one of the four handshakes. Ten connections that never start their handshake, from the client's own address.
        let mut flood = Vec::new();
        for _ in 0..10 {
            flood.push(TcpStream::connect(address).await.unwrap());
        }
        // Let every held handshake outlive its grace, so the next connection may displace one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut real = tls_connect(address, client).await;
        let connection = tokio::time::timeout(Duration::from_secs(30), accepted.next())
            .await
            .expect("the real client's connection reached the server")
            .unwrap()
            .unwrap();
        assert!(connection.peer.client_leaf.is_none());
        real.write_all(b"x").await.unwrap();

        // One handshake of this source was held at most: nine were closed at once, and the real
        // client displaced the tenth.
        let mut closed = 0;
        for socket in &mut flood {
            if closed_within(socket, Duration::from_secs(5)).await {
                closed += 1;
            }
        }
        assert_eq!(closed, 10, "half-open connections left open");
        shutdown.trigger();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_connection_is_closed_after_the_idle_timeout_and_a_talking_one_is_not() {
        let idle = Duration::from_secs(2);
        // Room for both handshakes from this one address at once (a quarter of the limit per
        // source), so that a slow first handshake is never displaced by the second.
        let (address, mut accepted, client, shutdown) = serve(limits(8, idle)).await;
        let mut talking = tls_connect(address, client.clone()).await;
        let mut talked_to = accepted.next().await.unwrap().unwrap();
        let mut silent = tls_connect(address, client).await;
        let mut silent_at_server = accepted.next().await.unwrap().unwrap();

        // The talking peer sends a byte every 200 ms for three idle timeouts: all arrive.
        let sender = tokio::spawn(async move {
            for _ in 0..30 {
                talking.write_all(b"x").await.unwrap();
                talking.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            talking
        });
        let mut received = 0;
        let mut byte = [0u8; 1];
        while received < 30 {
            let n = talked_to
                .read(&mut byte)
                .await
                .expect("a talking peer is never idle");
            received += n;
        }
        let _talking = sender.await.unwrap();

        let error = silent_at_server.read(&mut byte).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        drop(silent_at_server);
        let mut end = [0u8; 1];
        assert!(matches!(silent.read(&mut end).await, Ok(0) | Err(_)));
        shutdown.trigger();
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_from_one_address_leaves_room_for_the_others() {
        let limits = limits(8, Duration::from_secs(60));
        let mut handshakes = Handshakes::default();
        let (attacker, agent): (IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let parked = tokio::spawn(std::future::pending::<()>());
        let start = |handshakes: &mut Handshakes, source: IpAddr| {
            let room = handshakes.make_room(source, &limits, tokio::time::Instant::now());
            if room {
                let id = handshakes.next_id;
                handshakes.next_id += 1;
                handshakes.pending.push_back((
                    id,
                    source,
                    tokio::time::Instant::now(),
                    parked.abort_handle(),
                ));
            }
            room
        };
        assert!(start(&mut handshakes, attacker));
        assert!(start(&mut handshakes, attacker));
        assert!(
            !start(&mut handshakes, attacker),
            "a third from one address, within the grace of its others, is refused"
        );
        assert!(
            start(&mut handshakes, agent),
            "another address still gets in"
        );
        tokio::time::advance(limits.handshake_grace).await;
        assert!(
            start(&mut handshakes, attacker),
            "past the grace, the attacker's oldest is displaced"
        );
        let from_attacker = handshakes
            .pending
            .iter()
            .filter(|p| p.1 == attacker)
            .count();
        assert_eq!(from_attacker, 2);
        assert_eq!(
            handshakes.pending.len(),
            3,
            "the agent's handshake was not touched"
        );
    }

    #[test]
    fn limits_follow_the_descriptor_limit_and_leave_a_reserve() {
        for descriptors in [256u64, 1024, 65_536] {
            let limits = ConnectionLimits::for_descriptors(descriptors);
            let used = (limits.handshakes + limits.connections) as u64;
            assert!(
                used + RESERVED_FDS <= descriptors,
                "{descriptors}: {limits:?}"
            );
            assert!((4..=64).contains(&limits.handshakes), "{limits:?}");
        }
    }
}
