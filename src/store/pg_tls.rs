//! TLS to PostgreSQL on rustls (aws-lc-rs, the only crypto backend), with libpq's `sslmode`
//! and `sslrootcert` honoured. The driver's own connection-string parser knows neither
//! `verify-ca`, `verify-full` nor `sslrootcert`, so [`ConnectionString::parse`] takes those out
//! of the string (in both the `key=value` and the URL form) and hands the rest to the driver.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (the default) | if the server offers it | not checked |
//! | `require` | always | not checked; with `sslrootcert`, as `verify-ca` (as libpq does) |
//! | `verify-ca` | always | chains to `sslrootcert` |
//! | `verify-full` | always | chains to `sslrootcert` and names the host connected to |
//!
//! Without a check the link is encrypted but a machine in the middle can read it; deployments
//! across a network use `verify-full`.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Why a connection string or its TLS settings cannot be used. Never holds the string itself,
/// which may carry a password.
#[derive(Debug, thiserror::Error)]
pub enum TlsSettingError {
    /// The string is not in libpq's `key=value` form and not a URL the driver reads.
    #[error("invalid PostgreSQL connection string: {0}")]
    Syntax(#[source] tokio_postgres::Error),
    /// A quoted value is not closed.
    #[error("invalid PostgreSQL connection string: a quoted value of {key} is not closed")]
    Unclosed {
        /// The key whose value is open.
        key: String,
    },
    /// `sslmode` has a value libpq does not know.
    #[error(
        "sslmode = {0:?}: must be disable, prefer, require, verify-ca or verify-full \
         (allow is not supported)"
    )]
    Mode(String),
    /// `verify-ca` or `verify-full` without `sslrootcert`.
    #[error(
        "sslmode = {0}: needs sslrootcert, the PEM file of the CA that signed the server's certificate"
    )]
    NoRootCert(&'static str),
    /// The root certificate file cannot be read.
    #[error("sslrootcert = {path}: {source}")]
    RootCertRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The root certificate file holds no usable certificate.
    #[error("sslrootcert = {path}: {reason}")]
    RootCertContent {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the verifier or the configuration.
    #[error("TLS to PostgreSQL: {0}")]
    Rustls(#[source] rustls::Error),
}

/// How the server's certificate is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// No TLS at all.
    Disabled,
    /// Encrypted; the certificate is not checked.
    Unchecked,
    /// The certificate must chain to the root certificates.
    Chain,
    /// The certificate must chain to the root certificates and name the host.
    ChainAndName,
}

/// A connection string taken apart: the driver's configuration and the TLS settings it
/// does not read.
pub struct ConnectionString {
    /// Everything but the TLS settings, for the driver.
    pub config: tokio_postgres::Config,
    /// How TLS is used.
    pub tls: PgTls,
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The driver's own Debug leaves the password out.
        f.debug_struct("ConnectionString")
            .field("config", &self.config)
            .field("tls", &self.tls.verification)
            .finish()
    }
}

impl ConnectionString {
    /// Parses a libpq connection string (`host=... sslmode=verify-full sslrootcert=...` or
    /// `postgresql://...?sslmode=verify-full&sslrootcert=...`) and reads the root certificates.
    pub fn parse(conninfo: &str) -> Result<Self, TlsSettingError> {
        let (rest, settings) =
            if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
                split_url(conninfo)
            } else {
                split_key_values(conninfo)?
            };
        let mut config: tokio_postgres::Config = rest.parse().map_err(TlsSettingError::Syntax)?;
        let mode = settings.mode.as_deref().unwrap_or("prefer");
        let verification = match (mode, &settings.root_cert) {
            ("disable", _) => Verification::Disabled,
            ("prefer", _) | ("require", None) => Verification::Unchecked,
            ("require", Some(_)) | ("verify-ca", Some(_)) => Verification::Chain,
            ("verify-full", Some(_)) => Verification::ChainAndName,
            ("verify-ca", None) => return Err(TlsSettingError::NoRootCert("verify-ca")),
            ("verify-full", None) => return Err(TlsSettingError::NoRootCert("verify-full")),
            (other, _) => return Err(TlsSettingError::Mode(other.to_owned())),
        };
        config.ssl_mode(match mode {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            _ => SslMode::Require,
        });
        let roots = match &settings.root_cert {
            Some(path) if verification != Verification::Disabled => read_roots(path)?,
            _ => Vec::new(),
        };
        Ok(Self {
            config,
            tls: PgTls::new(verification, &roots)?,
        })
    }
}

/// The TLS settings libpq has and the driver does not read.
#[derive(Default)]
struct TlsSettings {
    mode: Option<String>,
    root_cert: Option<PathBuf>,
}

impl TlsSettings {
    /// Takes `key` when it is one of ours; false when the driver should have it.
    fn take(&mut self, key: &str, value: &str) -> bool {
        match key {
            "sslmode" => self.mode = Some(value.to_owned()),
            "sslrootcert" => self.root_cert = Some(PathBuf::from(value)),
            _ => return false,
        }
        true
    }
}

/// Splits the `key=value` form: values may be quoted (`'a b'`) and hold `\'` and `\\`.
fn split_key_values(conninfo: &str) -> Result<(String, TlsSettings), TlsSettingError> {
    let mut settings = TlsSettings::default();
    let mut rest = String::new();
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            // The end, or a stray `=`: the driver's parser reports the latter.
            rest.extend(chars);
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            // Malformed: leave it whole to the driver, which says what is wrong.
            rest.push_str(&key);
            rest.extend(chars);
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(TlsSettingError::Unclosed { key }),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        if !settings.take(&key, &value) {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            rest.push_str(&format!("{key}='{quoted}' "));
        }
    }
    Ok((rest, settings))
}

/// Splits the URL form: the TLS settings leave its query string.
fn split_url(conninfo: &str) -> (String, TlsSettings) {
    let mut settings = TlsSettings::default();
    let Some((base, query)) = conninfo.split_once('?') else {
        return (conninfo.to_owned(), settings);
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            !settings.take(&percent_decode(key), &percent_decode(value))
        })
        .collect();
    if kept.is_empty() {
        (base.to_owned(), settings)
    } else {
        (format!("{base}?{}", kept.join("&")), settings)
    }
}

/// `%XX` escapes decoded; anything malformed is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_roots(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, TlsSettingError> {
    let text = std::fs::read_to_string(path).map_err(|source| TlsSettingError::RootCertRead {
        path: path.clone(),
        source,
    })?;
    let content = |reason: String| TlsSettingError::RootCertContent {
        path: path.clone(),
        reason,
    };
    let roots: Vec<CertificateDer<'static>> = ::pem::parse_many(&text)
        .map_err(|e| content(format!("not PEM: {e}")))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    if roots.is_empty() {
        return Err(content("holds no CERTIFICATE block".to_owned()));
    }
    Ok(roots)
}

/// The driver's TLS connector: one rustls configuration for every connection of a store.
#[derive(Clone)]
pub struct PgTls {
    verification: Verification,
    config: Arc<ClientConfig>,
}

impl PgTls {
    /// A connector that judges certificates by `verification` against `roots`.
    pub fn new(
        verification: Verification,
        roots: &[CertificateDer<'static>],
    ) -> Result<Self, TlsSettingError> {
        let provider = crate::tls::provider();
        let verifier: Arc<dyn ServerCertVerifier> = match verification {
            Verification::Disabled | Verification::Unchecked => {
                Arc::new(Unchecked(Arc::clone(&provider)))
            }
            Verification::Chain | Verification::ChainAndName => {
                let mut store = rustls::RootCertStore::empty();
                for root in roots {
                    store.add(root.clone()).map_err(TlsSettingError::Rustls)?;
                }
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                        .build()
                        .map_err(|e| {
                            TlsSettingError::Rustls(rustls::Error::General(e.to_string()))
                        })?;
                if verification == Verification::Chain {
                    Arc::new(ChainOnly(webpki))
                } else {
                    webpki
                }
            }
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsSettingError::Rustls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self {
            verification,
            config: Arc::new(config),
        })
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<PgTlsConnect, io::Error> {
        // Called for every connection, a Unix socket's too (with no host name); the name is
        // needed only if the server then agrees to TLS, so a bad one is reported there.
        Ok(PgTlsConnect {
            config: Arc::clone(&self.config),
            server_name: ServerName::try_from(host.to_owned()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("host {host:?} is not a name TLS can check: {e}"),
                )
            }),
        })
    }
}

/// One connection's TLS handshake, to `server_name`.
pub struct PgTlsConnect {
    config: Arc<ClientConfig>,
    server_name: Result<ServerName<'static>, io::Error>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let stream = connector.connect(self.server_name?, stream).await?;
            Ok(PgTlsStream(Box::new(stream)))
        })
    }
}

/// A TLS stream to PostgreSQL.
pub struct PgTlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM runs without channel binding, as with libpq's channel_binding=prefer against a
        // client that offers none.
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// `prefer` and `require` without a root: any certificate, but the handshake's signatures are
/// still checked, so the server holds the key of the certificate it shows.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must hold; the name in the certificate need not be the host's.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(conninfo: &str) -> (String, Option<String>, Option<PathBuf>) {
        let (rest, settings) = if conninfo.contains("://") {
            split_url(conninfo)
        } else {
            split_key_values(conninfo).unwrap()
        };
        (rest, settings.mode, settings.root_cert)
    }

    #[test]
    fn tls_settings_leave_both_forms_of_the_string() {
        let (rest, mode, root) = split(
            "host=db.internal  sslmode = verify-full sslrootcert='/etc/a b/ca.pem' \
             password='it\\'s'",
        );
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root, Some(PathBuf::from("/etc/a b/ca.pem")));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"it's"[..]));

        let (rest, mode, root) = split(
            "postgresql://u:p@db:5432/tessera?sslmode=verify-ca&application_name=x&sslrootcert=%2Fca.pem",
        );
        assert_eq!(rest, "postgresql://u:p@db:5432/tessera?application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-ca"));
        assert_eq!(root, Some(PathBuf::from("/ca.pem")));
    }

    #[test]
    fn modes_are_checked_without_showing_the_string() {
        let err = ConnectionString::parse("host=db password=hunter2 sslmode=verify-full")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs sslrootcert"), "{err}");
        let err = ConnectionString::parse("host=db password=hunter2 sslmode=allow")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslmode = \"allow\""), "{err}");
        let err = ConnectionString::parse("host=db password='hunter2")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let parsed = ConnectionString::parse("host=db password=hunter2 sslmode=require").unwrap();
        assert_eq!(parsed.tls.verification, Verification::Unchecked);
        assert_eq!(parsed.config.get_ssl_mode(), SslMode::Require);
        assert!(!format!("{parsed:?}").contains("hunter2"));
        let parsed = ConnectionString::parse("host=db").unwrap();
        assert_eq!(parsed.config.get_ssl_mode(), SslMode::Prefer);
    }
}
