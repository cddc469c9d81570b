//! The agent's metrics in the Prometheus text format, on `GET /metrics` at the optional
//! `metrics_address` (loopback by convention; nothing secret is exposed, but nothing needs to
//! reach it from elsewhere). A deliberately small HTTP/1.1 responder: one request per
//! connection, headers bounded in size and time.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::events::Spool;
use crate::events::recorder::Recorder;

/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client gets to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the metrics are read from. Lives as long as the agent.
pub struct Sources {
    /// Event counters.
    pub recorder: Arc<Recorder>,
    /// The spool, in server mode.
    pub spool: Option<Arc<Spool>>,
}

/// The metrics as Prometheus text.
pub fn render(sources: &Sources) -> String {
    let mut out = String::new();
    let counters = sources.recorder.counters();
    let _ = writeln!(
        out,
        "# HELP tessera_events_recorded_total Events the agent recorded, by kind.\n# TYPE tessera_events_recorded_total counter"
    );
    for (kind, count) in counters.recorded {
        let _ = writeln!(
            out,
            "tessera_events_recorded_total{{kind=\"{kind}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP tessera_events_not_recorded_total Events that could not be written (spool full or disk error), by kind.\n# TYPE tessera_events_not_recorded_total counter"
    );
    for (kind, count) in counters.failed {
        let _ = writeln!(
            out,
            "tessera_events_not_recorded_total{{kind=\"{kind}\"}} {count}"
        );
    }
    if let Some(spool) = &sources.spool {
        let stats = spool.stats();
        let gauges = [
            (
                "tessera_spool_pending_records",
                "Events not yet acknowledged by the server.",
                "gauge",
                stats.pending_records,
            ),
            (
                "tessera_spool_pending_bytes",
                "Bytes of events not yet acknowledged.",
                "gauge",
                stats.pending_bytes,
            ),
            (
                "tessera_spool_disk_bytes",
                "Bytes of spool segment files.",
                "gauge",
                stats.disk_bytes,
            ),
            (
                "tessera_spool_last_seq",
                "Sequence number of the newest event.",
                "gauge",
                stats.last_seq,
            ),
            (
                "tessera_spool_acked_seq",
                "Sequence number up to which the server acknowledged.",
                "gauge",
                stats.acked,
            ),
            (
                "tessera_spool_dropped_total",
                "Droppable events refused because the spool was full.",
                "counter",
                stats.dropped_droppable,
            ),
            (
                "tessera_spool_refused_critical_total",
                "Critical events refused (issuance was refused with them).",
                "counter",
                stats.refused_critical,
            ),
            (
                "tessera_spool_corrupt_skipped_total",
                "Records found damaged when read, and skipped.",
                "counter",
                stats.corrupt_skipped,
            ),
        ];
        for (name, help, kind, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
    out
}

/// Serves `GET /metrics` on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    sources: Arc<Sources>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the metrics port");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &sources).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, sources: &Sources) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_REQUEST {
                return Err(std::io::Error::other("request head too long or cut short"));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::other("request timed out"))??;
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") {
        ("200 OK", render(sources))
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_owned(),
        )
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the metrics port.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}
