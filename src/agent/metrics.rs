//! The agent's metrics in the Prometheus text format, on `GET /metrics` at the optional
//! `metrics_address` (loopback by convention; nothing secret is exposed, but nothing needs to
//! reach it from elsewhere). Served by hyper's HTTP/1.1 server: one request per connection,
//! the request head bounded in size and time.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::events::Spool;
use crate::events::recorder::Recorder;

/// Largest request head buffered (hyper's smallest allowed buffer).
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client gets to send its request head.
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

/// Serves `GET /metrics` on `listener` until `stop`, accepting through the one accept loop.
pub async fn serve(
    listener: TcpListener,
    sources: Arc<Sources>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let mut connections = crate::runtime::accept::incoming(
        listener,
        "metrics",
        stop,
        |stream: TcpStream, _, handoff| async move {
            let _ = handoff.send(Ok(stream)).await;
        },
    );
    while let Some(Ok(stream)) = tokio_stream::StreamExt::next(&mut connections).await {
        let sources = sources.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, sources).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

/// Serves one connection: one request, then the connection is closed.
async fn answer(stream: TcpStream, sources: Arc<Sources>) -> hyper::Result<()> {
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let sources = sources.clone();
        async move { Ok::<_, Infallible>(respond(&request, &sources)) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(MAX_REQUEST)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

/// The metrics for `GET /metrics`, 404 for anything else.
fn respond<B>(request: &Request<B>, sources: &Sources) -> Response<Full<Bytes>> {
    let (status, body) = if request.method() == Method::GET && request.uri().path() == "/metrics" {
        (StatusCode::OK, render(sources))
    } else {
        (
            StatusCode::NOT_FOUND,
            "only GET /metrics is served here\n".to_owned(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// Binds the metrics port.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::recorder::EventLog;
    use crate::proto::tessera::Event;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Discard;

    impl EventLog for Discard {
        fn append(
            &self,
            _critical: bool,
            _event: &Event,
        ) -> Result<(), crate::events::recorder::LogError> {
            Ok(())
        }
        fn sync(&self) -> Result<(), crate::events::recorder::LogError> {
            Ok(())
        }
    }

    /// A metrics server on a free loopback port; stops when the sender is dropped.
    async fn server() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = listener.local_addr().unwrap();
        let sources = Arc::new(Sources {
            recorder: Arc::new(Recorder::new("example.org", "", Box::new(Discard))),
            spool: None,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, sources, async {
            let _ = stopped.await;
        }));
        (address, stop)
    }

    /// Sends `request` and reads until the server closes the connection.
    async fn exchange(address: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn metrics_are_served_once_per_connection_and_nothing_else_is() {
        let (address, _stop) = server().await;
        let ok = exchange(address, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4\r\n"),
            "{ok}"
        );
        assert!(ok.contains("\r\nconnection: close\r\n"), "{ok}");
        assert!(
            ok.contains("# TYPE tessera_events_recorded_total counter\n"),
            "{ok}"
        );
        for request in [
            &b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"[..],
            b"POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
        ] {
            let refused = exchange(address, request).await;
            assert!(
                refused.starts_with("HTTP/1.1 404 Not Found\r\n"),
                "{refused}"
            );
            assert!(
                refused.ends_with("only GET /metrics is served here\n"),
                "{refused}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_finishes_its_request_is_cut_off() {
        let (address, _stop) = server().await;
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        assert!(
            started.elapsed() >= REQUEST_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
    }
}
