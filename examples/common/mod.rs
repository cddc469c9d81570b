//! What the mTLS example server and client share: arguments, the identity kept from the
//! Workload API stream, rustls configurations that verify peers with `tessera::verify`, and the
//! register of live connections that are checked again on every update.
// Each binary uses its own half of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    ServerConfig, SignatureScheme,
};
use tessera::proto::workload::{X509svidRequest, X509svidResponse};
use tessera::verify::{Rejection, Usage, Verified, verify_svid};
use tokio::sync::oneshot;

/// The command line both examples take: `--socket URI ADDR_FLAG ADDR [--expect-peer ID]`.
pub struct Args {
    /// The Workload API endpoint.
    pub socket: String,
    /// The address to listen on or connect to.
    pub address: String,
    /// The only SPIFFE ID accepted from the peer, if given.
    pub expect_peer: Option<String>,
}

impl Args {
    /// Reads the process arguments; `address_flag` is `--listen` or `--connect`.
    pub fn parse(address_flag: &str) -> Result<Self, String> {
        let usage = format!(
            "usage: --socket unix:///path {address_flag} HOST:PORT [--expect-peer SPIFFE_ID]"
        );
        let mut socket = std::env::var("SPIFFE_ENDPOINT_SOCKET").ok();
        let mut address = None;
        let mut expect_peer = None;
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let slot = match flag.as_str() {
                "--socket" => &mut socket,
                "--expect-peer" => &mut expect_peer,
                f if f == address_flag => &mut address,
                other => return Err(format!("unknown argument {other:?}; {usage}")),
            };
            *slot = Some(
                args.next()
                    .ok_or_else(|| format!("{flag} needs a value; {usage}"))?,
            );
        }
        Ok(Self {
            socket: socket.ok_or_else(|| {
                format!("no --socket given and SPIFFE_ENDPOINT_SOCKET is unset; {usage}")
            })?,
            address: address.ok_or_else(|| format!("no {address_flag} given; {usage}"))?,
            expect_peer,
        })
    }
}

/// The rustls provider of both examples: aws-lc-rs only, as in tessera itself.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The identity from the latest Workload API message.
struct Current {
    spiffe_id: String,
    certified: Arc<CertifiedKey>,
    bundle: Vec<Vec<u8>>,
    crls: Vec<Vec<u8>>,
}

/// A connection whose peer is checked again on every update.
struct Live {
    peer_id: String,
    peer_chain: Vec<Vec<u8>>,
    close: oneshot::Sender<String>,
}

/// This process's identity as the Workload API last sent it, and the connections it carries.
pub struct Workload {
    current: RwLock<Arc<Current>>,
    live: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
    /// How peers' certificates are used: a server checks clients, a client checks servers.
    peer_usage: Usage,
    expect_peer: Option<String>,
    provider: Arc<CryptoProvider>,
}

/// A tracked connection: its peer, and what says when it has to be closed.
pub struct Tracked {
    /// The key to [`Workload::untrack`] it with.
    pub id: u64,
    /// The peer's SPIFFE ID.
    pub peer_id: String,
    /// Resolves with the reason when an update makes the peer unacceptable.
    pub closed: oneshot::Receiver<String>,
}

impl Workload {
    /// Opens the FetchX509SVID stream at `socket`, waits for the first identity, and keeps
    /// following the stream in the background.
    pub async fn start(
        socket: &str,
        peer_usage: Usage,
        expect_peer: Option<String>,
    ) -> Result<Arc<Self>, String> {
        let provider = provider();
        let mut stream = open_stream(socket).await?;
        let first = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Err("the Workload API stream ended before any SVID".into()),
            Err(status) => return Err(format!("the Workload API refused: {}", status.message())),
        };
        let current = parse(&first, &provider)?;
        eprintln!("identity: {}", current.spiffe_id);
        let workload = Arc::new(Self {
            current: RwLock::new(Arc::new(current)),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            peer_usage,
            expect_peer,
            provider,
        });
        tokio::spawn(follow(workload.clone(), socket.to_owned(), stream));
        Ok(workload)
    }

    fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Takes a new message: new connections use it at once, and every live connection whose
    /// peer it no longer accepts is closed. Runs right as the message arrives, so a revocation
    /// closes connections without waiting for anything.
    fn update(&self, message: &X509svidResponse) {
        let next = match parse(message, &self.provider) {
            Ok(next) => next,
            Err(e) => {
                eprintln!("Workload API update ignored, keeping the previous identity: {e}");
                return;
            }
        };
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let refused: Vec<(u64, String)> = live
            .iter()
            .filter_map(|(id, conn)| {
                self.check(&conn.peer_chain)
                    .err()
                    .map(|reason| (*id, reason))
            })
            .collect();
        for (id, reason) in refused {
            if let Some(conn) = live.remove(&id) {
                eprintln!("closed connection to {}: {reason}", conn.peer_id);
                // The connection may have ended on its own meanwhile; nothing to close then.
                let _ = conn.close.send(reason);
            }
        }
    }

    /// Checks a peer's chain against the current bundle and CRLs, and the expected peer.
    fn check(&self, chain: &[Vec<u8>]) -> Result<Verified, String> {
        let current = self.current();
        let verified = verify_svid(
            chain,
            &current.bundle,
            &current.crls,
            self.peer_usage,
            SystemTime::now(),
        )
        .map_err(|e| e.to_string())?;
        match &self.expect_peer {
            Some(expected) if verified.spiffe_id.to_string() != *expected => Err(format!(
                "peer is {}, expected {expected}",
                verified.spiffe_id
            )),
            _ => Ok(verified),
        }
    }

    /// Registers an established connection by its peer's chain. Checked once more here, so
    /// that an update between the handshake and this call is not missed.
    pub fn track(&self, peer_chain: Option<&[CertificateDer<'_>]>) -> Result<Tracked, String> {
        let peer_chain: Vec<Vec<u8>> = peer_chain
            .unwrap_or_default()
            .iter()
            .map(|c| c.to_vec())
            .collect();
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let verified = self.check(&peer_chain)?;
        let (close, closed) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let peer_id = verified.spiffe_id.to_string();
        live.insert(
            id,
            Live {
                peer_id: peer_id.clone(),
                peer_chain,
                close,
            },
        );
        Ok(Tracked {
            id,
            peer_id,
            closed,
        })
    }

    /// Forgets a connection that ended.
    pub fn untrack(&self, id: u64) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// A rustls verdict on a peer presented in a handshake.
    fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let chain: Vec<Vec<u8>> = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.to_vec())
            .collect();
        let current = self.current();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
        let error = match verify_svid(&chain, &current.bundle, &current.crls, self.peer_usage, now)
        {
            Ok(verified) => match &self.expect_peer {
                Some(expected) if verified.spiffe_id.to_string() != *expected => {
                    eprintln!(
                        "refused peer certificate: peer is {}, expected {expected}",
                        verified.spiffe_id
                    );
                    return Err(CertificateError::ApplicationVerificationFailure.into());
                }
                _ => return Ok(()),
            },
            Err(rejection) => rejection,
        };
        eprintln!("refused peer certificate: {error}");
        // The specific TLS alerts tell the peer why without a log of its own.
        Err(match error {
            Rejection::Revoked { .. } => CertificateError::Revoked,
            Rejection::Validity { .. } => CertificateError::Expired,
            other => CertificateError::Other(OtherError(Arc::new(other))),
        }
        .into())
    }
}

/// Follows the stream, reopening it after a second whenever it ends, so that an agent restart
/// does not leave the process with an identity that is never renewed.
async fn follow(
    workload: Arc<Workload>,
    socket: String,
    mut stream: tonic::Streaming<X509svidResponse>,
) {
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                workload.update(&message);
                continue;
            }
            Ok(None) => eprintln!("the Workload API stream ended; reopening it"),
            Err(status) => eprintln!(
                "the Workload API stream failed ({}); reopening it",
                status.message()
            ),
        }
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match open_stream(&socket).await {
                Ok(next) => {
                    stream = next;
                    break;
                }
                Err(e) => eprintln!("{e}"),
            }
        }
    }
}

async fn open_stream(socket: &str) -> Result<tonic::Streaming<X509svidResponse>, String> {
    let mut client = tessera::cli::client::connect(socket)
        .await
        .map_err(|f| f.message)?;
    client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| format!("the Workload API refused: {}", status.message()))
}

/// The first (default) SVID of a message, with its bundle and the CRLs.
fn parse(message: &X509svidResponse, provider: &CryptoProvider) -> Result<Current, String> {
    let svid = message
        .svids
        .first()
        .ok_or("the Workload API message holds no SVID")?;
    let chain: Vec<CertificateDer<'static>> = split_der(&svid.x509_svid)
        .map_err(|e| format!("SVID chain: {e}"))?
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            svid.x509_svid_key.clone(),
        )))
        .map_err(|e| format!("SVID key: {e}"))?;
    Ok(Current {
        spiffe_id: svid.spiffe_id.clone(),
        certified: Arc::new(CertifiedKey::new(chain, key)),
        bundle: split_der(&svid.bundle).map_err(|e| format!("bundle: {e}"))?,
        crls: message.crl.clone(),
    })
}

/// Splits concatenated DER certificates, as the Workload API sends chains and bundles.
fn split_der(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(bytes)
            .map_err(|e| format!("certificate {}: {e}", out.len()))?;
        out.push(bytes[..bytes.len() - rest.len()].to_vec());
        bytes = rest;
    }
    Ok(out)
}

/// Both verifiers and both certificate resolvers, reading the identity current at each
/// handshake.
#[derive(Clone)]
struct Handshakes(Arc<Workload>);

impl std::fmt::Debug for Handshakes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handshakes")
    }
}

impl Handshakes {
    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for Handshakes {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .verify_peer(end_entity, intermediates, now)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Both configurations allow TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ServerCertVerifier for Handshakes {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // An SVID names its holder by SPIFFE ID, not by host name (see --expect-peer).
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .verify_peer(end_entity, intermediates, now)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ResolvesServerCert for Handshakes {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

impl ResolvesClientCert for Handshakes {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A TLS 1.3 server configuration that requires a client SVID, both read at each handshake.
pub fn server_config(workload: &Arc<Workload>) -> Result<ServerConfig, String> {
    let handshakes = Handshakes(workload.clone());
    Ok(
        ServerConfig::builder_with_provider(workload.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(handshakes.clone()))
            .with_cert_resolver(Arc::new(handshakes)),
    )
}

/// A TLS 1.3 client configuration that presents this process's SVID and checks the server's.
pub fn client_config(workload: &Arc<Workload>) -> Result<ClientConfig, String> {
    let handshakes = Handshakes(workload.clone());
    Ok(
        ClientConfig::builder_with_provider(workload.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(handshakes.clone()))
            .with_client_cert_resolver(Arc::new(handshakes)),
    )
}

/// The longest line echoed; a longer one ends the connection instead of growing a buffer.
pub const MAX_LINE: u64 = 4096;

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at a clean end of the stream.
pub async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<String>> {
    use tokio::io::AsyncBufReadExt;
    use tokio::io::AsyncReadExt;
    let mut line = Vec::new();
    let read = (&mut *reader)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    if line.pop() != Some(b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("line longer than {MAX_LINE} bytes, or cut short"),
        ));
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "line is not UTF-8"))
}
