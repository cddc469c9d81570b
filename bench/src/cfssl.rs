//! The peer CA in the mint scenario: cfssl's `serve` endpoint on loopback, asked to generate a
//! P-256 key and a certificate signed by the same CA the agent signs with.
//!
//! cfssl runs as its own process pinned to one CPU with `GOMAXPROCS=1`, so that its rate is a
//! per-core rate like the agent's; a few keep-alive HTTP/1.1 clients keep it busy. Its CPU time
//! is read from `/proc` around every block, so the figure that is compared (certificates per
//! CPU-second of the cfssl process) does not depend on how fast the harness's own client is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;

use tessera_harness::Process;

use super::{BenchError, io_err};

/// Concurrent keep-alive connections to cfssl: enough to keep one core busy while one waits.
const CONNECTIONS: usize = 4;

/// What cfssl is asked for: what an X.509-SVID needs (a new P-256 key, a leaf for one name).
const NEW_CERT_REQUEST: &str = r#"{"request":{"CN":"mint","hosts":["spiffe://bench.local/mint"],"key":{"algo":"ecdsa","size":256}}}"#;

/// [`NEW_CERT_REQUEST`] in words, for the report.
pub const NEW_CERT_REQUEST_SUMMARY: &str =
    "a new P-256 key and a certificate naming spiffe://bench.local/mint, signed by the agent's CA";

/// A running `cfssl serve` signing with a given CA.
pub struct Cfssl {
    /// The server process, pinned to one CPU; killed on drop.
    process: Process,
    /// Its address on loopback.
    address: std::net::SocketAddr,
}

/// One block of requests: how many certificates, in how long, for how much cfssl CPU time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Block {
    /// Certificates received, each checked to be one.
    pub certificates: usize,
    /// Wall-clock time for the block.
    pub wall: Duration,
    /// CPU time (user + system) the cfssl process spent in the block.
    pub server_cpu: Duration,
}

impl std::ops::AddAssign for Block {
    fn add_assign(&mut self, other: Self) {
        self.certificates += other.certificates;
        self.wall += other.wall;
        self.server_cpu += other.server_cpu;
    }
}

/// The `cfssl` executable on `PATH`, if there is one.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("cfssl"))
        .find(|candidate| candidate.is_file())
}

impl Cfssl {
    /// Starts `program serve` with the CA in `ca_cert`/`ca_key` (PEM) and waits until it
    /// answers a first certificate request, which is checked to carry a certificate.
    pub async fn start(program: &Path, ca_cert: &Path, ca_key: &Path) -> Result<Self, BenchError> {
        // Unlike the servers of tessera, cfssl cannot be left to pick its port: given port 0 it
        // binds one but logs "Now listening on 127.0.0.1:0", so the port is chosen here.
        let address = tessera_harness::free_loopback_address()?;
        let mut command = tessera_harness::command(program);
        command
            .args(["serve", "-loglevel", "3", "-address", "127.0.0.1", "-port"])
            .arg(address.port().to_string())
            .arg("-ca")
            .arg(ca_cert)
            .arg("-ca-key")
            .arg(ca_key)
            .env("GOMAXPROCS", "1");
        pin_to_first_cpu(&mut command);
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        let process = Process::spawn(&mut command, "cfssl serve")?;
        let cfssl = Self { process, address };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match cfssl.connect().await {
                Ok(mut sender) => {
                    new_certificate(&mut sender).await?;
                    return Ok(cfssl);
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(BenchError::Failed(format!(
                        "cfssl serve on {address} did not come up: {e}"
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn connect(&self) -> Result<Sender, BenchError> {
        let stream = TcpStream::connect(self.address)
            .await
            .map_err(io_err(format!("connecting to cfssl on {}", self.address)))?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| BenchError::Failed(format!("HTTP handshake with cfssl: {e}")))?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// Asks for `count` new certificates over [`CONNECTIONS`] connections.
    pub async fn block(&self, count: usize) -> Result<Block, BenchError> {
        let mut senders = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS {
            senders.push(self.connect().await?);
        }
        let cpu_before = self.process.cpu_time();
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(CONNECTIONS);
        for (index, mut sender) in senders.into_iter().enumerate() {
            let share = count / CONNECTIONS + usize::from(index < count % CONNECTIONS);
            tasks.push(tokio::spawn(async move {
                for _ in 0..share {
                    new_certificate(&mut sender).await?;
                }
                Ok::<_, BenchError>(share)
            }));
        }
        let mut certificates = 0;
        for task in tasks {
            certificates += task
                .await
                .map_err(|e| BenchError::Failed(format!("a cfssl client failed: {e}")))??;
        }
        Ok(Block {
            certificates,
            wall: started.elapsed(),
            server_cpu: self.process.cpu_time().saturating_sub(cpu_before),
        })
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One `newcert` call; fails unless cfssl answered with a parseable certificate.
async fn new_certificate(sender: &mut Sender) -> Result<(), BenchError> {
    let request = http::Request::post("/api/v1/cfssl/newcert")
        .header(http::header::HOST, "127.0.0.1")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(NEW_CERT_REQUEST.as_bytes())))
        .map_err(|e| BenchError::Failed(format!("building a cfssl request: {e}")))?;
    sender
        .ready()
        .await
        .map_err(|e| BenchError::Failed(format!("cfssl connection: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| BenchError::Failed(format!("cfssl request: {e}")))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| BenchError::Failed(format!("cfssl response: {e}")))?
        .to_bytes();
    certificate_in(status, &body).map(drop)
}

/// The DER certificate in a `newcert` answer, or why there is none.
fn certificate_in(status: http::StatusCode, body: &[u8]) -> Result<Vec<u8>, BenchError> {
    let bad = |why: String| {
        BenchError::Failed(format!(
            "cfssl newcert answered {status}: {why}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ))
    };
    #[derive(serde::Deserialize)]
    struct Answer {
        success: bool,
        result: Option<AnswerResult>,
    }
    #[derive(serde::Deserialize)]
    struct AnswerResult {
        certificate: String,
    }
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| bad(format!("not a cfssl answer ({e})")))?;
    let pem_text = match answer {
        Answer {
            success: true,
            result: Some(result),
        } if status.is_success() => result.certificate,
        _ => return Err(bad("no certificate".into())),
    };
    let block = pem::parse(pem_text).map_err(|e| bad(format!("certificate not PEM ({e})")))?;
    x509_parser::parse_x509_certificate(block.contents())
        .map_err(|e| bad(format!("certificate not X.509 ({e})")))?;
    Ok(block.into_contents())
}

/// Pins the child to the lowest-numbered CPU this process may use.
#[allow(unsafe_code)]
fn pin_to_first_cpu(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: sched_getaffinity/sched_setaffinity are async-signal-safe and act on the child
    // alone; the set lives on the child's stack.
    unsafe {
        command.pre_exec(|| {
            let mut allowed: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            if libc::sched_getaffinity(0, size, &mut allowed) != 0 {
                return Ok(());
            }
            if let Some(cpu) =
                (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &allowed))
            {
                let mut one: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut one);
                libc::sched_setaffinity(0, size, &one);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_taken_from_an_answer_and_its_absence_named() {
        let refused =
            br#"{"success":false,"result":null,"errors":[{"code":1000,"message":"bad"}]}"#;
        let error = certificate_in(http::StatusCode::BAD_REQUEST, refused).unwrap_err();
        assert!(error.to_string().contains("400"), "{error}");
        assert!(error.to_string().contains("no certificate"), "{error}");

        let garbage = certificate_in(http::StatusCode::OK, b"<html>").unwrap_err();
        assert!(
            garbage.to_string().contains("not a cfssl answer"),
            "{garbage}"
        );

        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["mint".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let answer = serde_json::json!({"success": true, "result": {"certificate": cert.pem()}});
        let der = certificate_in(http::StatusCode::OK, answer.to_string().as_bytes()).unwrap();
        assert_eq!(der, cert.der().to_vec());

        let not_pem = br#"{"success":true,"result":{"certificate":"hello"}}"#;
        let error = certificate_in(http::StatusCode::OK, not_pem).unwrap_err();
        assert!(error.to_string().contains("not PEM"), "{error}");
    }
}
