//! An mTLS line-echo client whose identity, trust bundle and CRLs come from the Workload API.
//!
//! It sends a line every 100 ms and prints each echo. Exit codes: 1 when the connection or
//! handshake fails (the message says why), 3 when the server closes the connection, 4 when an
//! update from the agent makes this side close it (the server's SVID was revoked).
//!
//! ```sh
//! cargo run --example mtls_client -- --socket unix:///path/agent.sock --connect 127.0.0.1:PORT
//! ```

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Args, Workload, client_config, read_line};
use rustls::pki_types::ServerName;
use tessera::verify::Usage;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[tokio::main]
async fn main() {
    let args = match Args::parse("--connect") {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let (code, message) = run(args).await;
    eprintln!("{message}");
    std::process::exit(code);
}

async fn run(args: Args) -> (i32, String) {
    let workload = match Workload::start(&args.socket, Usage::Server, args.expect_peer).await {
        Ok(workload) => workload,
        Err(e) => return (1, format!("error: {e}")),
    };
    let config = match client_config(&workload) {
        Ok(config) => config,
        Err(e) => return (1, format!("error: {e}")),
    };
    let tcp = match TcpStream::connect(&args.address).await {
        Ok(tcp) => tcp,
        Err(e) => return (1, format!("cannot connect to {}: {e}", args.address)),
    };
    // Never looked at: the verifier checks the server's SPIFFE ID instead.
    let name = ServerName::try_from("spiffe.invalid").expect("a valid DNS name");
    let tls = match TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => return (1, format!("handshake refused: {e}")),
    };
    let tracked = match workload.track(tls.get_ref().1.peer_certificates()) {
        Ok(tracked) => tracked,
        Err(reason) => return (1, format!("handshake refused: {reason}")),
    };
    eprintln!("connected to {}", tracked.peer_id);
    let (read, mut write) = tokio::io::split(tls);
    let mut read = BufReader::new(read);
    let mut closed = tracked.closed;
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    let mut echoes = 0u64;
    let outcome = loop {
        tokio::select! {
            _ = &mut closed => {
                let _ = write.shutdown().await;
                break (4, "closed the connection: the server's SVID is no longer accepted".to_owned());
            }
            _ = ticks.tick() => {
                if let Err(e) = write.write_all(format!("ping {echoes}\n").as_bytes()).await {
                    break (3, format!("connection closed by the peer: {e}"));
                }
            }
            line = read_line(&mut read) => match line {
                Ok(Some(line)) => {
                    println!("echo: {line}");
                    echoes += 1;
                }
                Ok(None) => break (3, format!("connection closed by the peer after {echoes} echoes")),
                // In TLS 1.3 the server judges the client's certificate after the client has
                // finished its side of the handshake: a refusal arrives as the first read.
                Err(e) if echoes == 0 => break (1, format!("handshake refused by the server: {e}")),
                Err(e) => break (3, format!("connection closed by the peer: {e}")),
            },
        }
    };
    workload.untrack(tracked.id);
    outcome
}
