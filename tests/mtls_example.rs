//! The mTLS example pair (`examples/mtls_server.rs`, `examples/mtls_client.rs`) as real
//! processes on a real agent: echoes flow, a revoked client SVID gets its live connection closed
//! by the server, a fresh SVID connects again, and a handshake with the revoked one is refused.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// A child process whose output is collected as it comes, killed when dropped.
struct Running {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn start(program: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn echoes(&self) -> usize {
        self.stdout()
            .lines()
            .filter(|l| l.starts_with("echo: "))
            .count()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    fn describe(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut sink = sink.lock().unwrap();
            sink.push_str(&line);
            sink.push('\n');
        }
    });
    text
}

/// Accepts any server: this client is only here to present a given client certificate.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
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

/// Connects to `address` presenting `chain` and `key`, sends a line and returns what reading
/// its echo gave: the echo, or the error that ended the connection.
async fn echo_with(address: &str, chain: &[Vec<u8>], key: &[u8]) -> Result<String, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(
            chain.iter().cloned().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("spiffe.invalid").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"hello\n").await.map_err(|e| e.to_string())?;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(tls);
    match tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await {
        Err(_) => Err("no answer within 10 s".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(0)) => Err("closed without an answer".into()),
        Ok(Ok(_)) => Ok(line),
    }
}

fn client_entry(uid: &str, dns: &str) -> String {
    entry(
        "/client",
        &[uid],
        "5m",
        &format!("id = \"client\"\ndns_names = [\"{dns}\"]"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_cut_off_and_refused_and_its_fresh_svid_connects() {
    let server_exe = example("mtls_server");
    let client_exe = example("mtls_client");
    let uid = my_uid_selector();
    let path = format!("unix:path:{}", server_exe.display());
    // The server matches both entries and uses the first; the client, like this test, matches
    // only /client, so this test holds the very SVID the client presents.
    let server_entry = entry("/server", &[&uid, &path], "5m", "id = \"server\"");
    let agent =
        start_agent(&[server_entry.clone(), client_entry(&uid, "one.internal")].concat()).await;
    let socket = agent.uri();

    let mut stream = svid_stream(&agent).await;
    let first = stream.message().await.unwrap().unwrap();
    let old = &first.svids[0];
    assert_eq!(old.spiffe_id, "spiffe://example.org/client");
    let old_chain = split_der(&old.x509_svid);
    let old_key = old.x509_svid_key.clone();

    let server = Running::start(
        &server_exe,
        &[
            "--socket",
            &socket,
            "--listen",
            "127.0.0.1:0",
            "--expect-peer",
            "spiffe://example.org/client",
        ],
    );
    let address = eventually(Duration::from_secs(20), || {
        server
            .stdout()
            .lines()
            .find_map(|l| l.strip_prefix("listening on ").map(str::to_owned))
    })
    .await;
    let client_args = [
        "--socket",
        socket.as_str(),
        "--connect",
        address.as_str(),
        "--expect-peer",
        "spiffe://example.org/server",
    ];

    // a. Echoes flow.
    let mut client = Running::start(&client_exe, &client_args);
    eventually(Duration::from_secs(20), || {
        (client.echoes() >= 3).then_some(())
    })
    .await;
    assert!(
        server
            .stderr()
            .contains("connection from spiffe://example.org/client"),
        "{}",
        server.describe()
    );

    // b. Changing the client's entry revokes the SVID it holds and issues it a new one; the
    // server closes the connection that carries the old one.
    agent.rewrite_entries(&[server_entry, client_entry(&uid, "two.internal")].concat());
    let renewed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let message = stream.message().await.unwrap().unwrap();
            if message.svids[0].x509_svid != old.x509_svid {
                break message;
            }
        }
    })
    .await
    .expect("a new client SVID within 20 s");
    assert!(!renewed.crl.is_empty());
    let status = eventually(Duration::from_secs(5), || client.exited()).await;
    assert_eq!(status.code(), Some(3), "{}", client.describe());
    assert!(
        client.stderr().contains("connection closed by the peer"),
        "{}",
        client.describe()
    );
    let log = server.stderr();
    assert!(
        log.contains("closed connection to spiffe://example.org/client: revoked: serial"),
        "{}",
        server.describe()
    );

    // c. The client's fresh SVID connects; the revoked one is refused at the handshake.
    let mut fresh = Running::start(&client_exe, &client_args);
    eventually(Duration::from_secs(20), || {
        (fresh.echoes() >= 3).then_some(())
    })
    .await;
    let fresh_chain = split_der(&renewed.svids[0].x509_svid);
    let echoed = echo_with(&address, &fresh_chain, &renewed.svids[0].x509_svid_key).await;
    assert_eq!(echoed.as_deref(), Ok("hello\n"));

    let refused = echo_with(&address, &old_chain, &old_key).await;
    let error = refused.expect_err("the revoked SVID was accepted");
    assert!(error.contains("CertificateRevoked"), "{error}");
    eventually(Duration::from_secs(10), || {
        server
            .stderr()
            .contains("refused peer certificate: revoked: serial")
            .then_some(())
    })
    .await;
    assert!(fresh.exited().is_none(), "{}", fresh.describe());

    // A client that refuses the server's SVID exits 1 and says why.
    let mut picky = Running::start(
        &client_exe,
        &[
            "--socket",
            &socket,
            "--connect",
            &address,
            "--expect-peer",
            "spiffe://example.org/other",
        ],
    );
    let status = eventually(Duration::from_secs(20), || picky.exited()).await;
    assert_eq!(status.code(), Some(1), "{}", picky.describe());
    assert!(
        picky.stderr().contains(
            "refused peer certificate: peer is spiffe://example.org/server, expected spiffe://example.org/other"
        ) && picky.stderr().contains("handshake refused"),
        "{}",
        picky.describe()
    );
}
