//! An mTLS line-echo server whose identity, trust bundle and CRLs come from the Workload API.
//!
//! It requires a client SVID, refuses one that is revoked, and closes a live connection as soon
//! as an update from the agent revokes the client's SVID (or its CA).
//!
//! ```sh
//! cargo run --example mtls_server -- --socket unix:///path/agent.sock --listen 127.0.0.1:0
//! ```

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Args, Workload, read_line, server_config};
use tessera::verify::Usage;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() {
    let args = match Args::parse("--listen") {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let workload = Workload::start(&args.socket, Usage::Client, args.expect_peer).await?;
    let acceptor = TlsAcceptor::from(Arc::new(server_config(&workload)?));
    let listener = TcpListener::bind(&args.address)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.address))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on {local}");
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        tokio::spawn(serve(workload.clone(), acceptor.clone(), tcp, from));
    }
}

async fn serve(
    workload: Arc<Workload>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    from: std::net::SocketAddr,
) {
    // A peer that stops mid-handshake would otherwise hold its task forever.
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            eprintln!("refused handshake from {from}: {e}");
            return;
        }
        Err(_) => {
            eprintln!("handshake from {from} not finished within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let tracked = match workload.track(tls.get_ref().1.peer_certificates()) {
        Ok(tracked) => tracked,
        Err(reason) => {
            eprintln!("refused connection from {from}: {reason}");
            return;
        }
    };
    eprintln!("connection from {} ({from})", tracked.peer_id);
    let (read, mut write) = tokio::io::split(tls);
    let mut read = BufReader::new(read);
    let mut closed = tracked.closed;
    let ended = loop {
        tokio::select! {
            // The reason was logged where the decision was made.
            _ = &mut closed => break None,
            line = read_line(&mut read) => match line {
                Ok(Some(line)) => {
                    if let Err(e) = write.write_all(format!("{line}\n").as_bytes()).await {
                        break Some(e.to_string());
                    }
                }
                Ok(None) => break Some("closed by the peer".to_owned()),
                Err(e) => break Some(e.to_string()),
            },
        }
    };
    // close_notify, so that the client sees a deliberate close and not a broken connection.
    let _ = write.shutdown().await;
    workload.untrack(tracked.id);
    if let Some(reason) = ended {
        eprintln!("connection from {} ended: {reason}", tracked.peer_id);
    }
}
