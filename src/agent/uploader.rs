//! Server mode: sends the spool's unacknowledged events up one `ReportEvents` stream and
//! acknowledges them in the spool once the server has stored them. After a reconnection or a
//! restart it starts again from the spool's acknowledged position, so every event is sent until
//! the server confirms it; the server stores each event once whatever the retries.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::events::spool::Spool;
use crate::proto::tessera::node_client::NodeClient;
use crate::proto::tessera::{Event, EventBatch};

/// Events per batch: as many as the server takes. Each batch is one datastore transaction, so
/// fewer, larger batches write each hot index page fewer times (500 a batch ingested about
/// 21,000 events/s on SQLite in the benchmark, 1,000 about 23,000).
const BATCH_EVENTS: usize = crate::events::model::MAX_BATCH_EVENTS;
/// Bytes of encoded events per batch, well under the server's message limit.
const BATCH_BYTES: usize = 1 << 20;
/// First pause after a failed upload; doubled up to 5 s.
const MIN_PAUSE: Duration = Duration::from_millis(200);
/// Batches sent but not yet acknowledged.
const IN_FLIGHT: usize = 8;

/// Why an upload run ended.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The stream to the server failed; retry later.
    #[error("event stream: {0}")]
    Stream(String),
    /// The spool could not be read or acknowledged.
    #[error("spool: {0}")]
    Spool(String),
}

/// Uploads until the stream fails. Returns the error; the caller retries with backoff.
pub async fn upload(spool: Arc<Spool>, channel: Channel) -> UploadError {
    let mut client = NodeClient::new(channel);
    let (tx, rx) = mpsc::channel::<EventBatch>(IN_FLIGHT);
    let mut acks = match client.report_events(ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return UploadError::Stream(status.to_string()),
    };
    let mut appended = spool.subscribe();
    // Batches in flight: (batch sequence, last spool sequence in it).
    let mut in_flight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut sent_up_to = spool.acked();
    let mut next_batch = 1u64;
    loop {
        if in_flight.len() < IN_FLIGHT {
            appended.borrow_and_update();
            let read = {
                let spool = spool.clone();
                tokio::task::spawn_blocking(move || {
                    spool.read_unacked(sent_up_to, BATCH_EVENTS, BATCH_BYTES)
                })
                .await
            };
            let records = match read {
                Ok(Ok(records)) => records,
                Ok(Err(e)) => return UploadError::Spool(e.to_string()),
                Err(e) => return UploadError::Spool(e.to_string()),
            };
            if let Some(last) = records.last().map(|(seq, _, _)| *seq) {
                let events: Vec<Event> = records
                    .iter()
                    .filter_map(|(seq, _, payload)| match Event::decode(payload.as_slice()) {
                        Ok(event) => Some(event),
                        Err(e) => {
                            tracing::error!(seq, error = %e, "spooled event unreadable; skipped");
                            None
                        }
                    })
                    .collect();
                let batch = EventBatch {
                    sequence: next_batch,
                    events,
                };
                if tx.send(batch).await.is_err() {
                    return UploadError::Stream("request stream closed".into());
                }
                in_flight.push_back((next_batch, last));
                next_batch += 1;
                sent_up_to = last;
                continue;
            }
        }
        tokio::select! {
            ack = acks.message() => {
                let ack = match ack {
                    Ok(Some(ack)) => ack,
                    Ok(None) => return UploadError::Stream("server ended the event stream".into()),
                    Err(status) => return UploadError::Stream(status.to_string()),
                };
                let Some((sequence, last)) = in_flight.pop_front() else {
                    return UploadError::Stream(format!("ack {} for no batch in flight", ack.sequence));
                };
                if ack.sequence != sequence {
                    return UploadError::Stream(format!("ack {} where {sequence} was due", ack.sequence));
                }
                if !ack.error.is_empty() {
                    // The server will never take this batch; keeping it would stop every later
                    // event. Say so loudly and move on.
                    tracing::error!(batch = sequence, error = %ack.error, "server refused an event batch; dropped");
                }
                let acked = {
                    let spool = spool.clone();
                    tokio::task::spawn_blocking(move || spool.ack(last)).await
                };
                match acked {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return UploadError::Spool(e.to_string()),
                    Err(e) => return UploadError::Spool(e.to_string()),
                }
            }
            changed = appended.changed(), if in_flight.len() < IN_FLIGHT => {
                if changed.is_err() {
                    return UploadError::Spool("spool closed".into());
                }
            }
        }
    }
}

/// Runs [`upload`] again and again with backoff, until the task is aborted.
pub async fn run(spool: Arc<Spool>, channel: Channel) {
    let mut pause = MIN_PAUSE;
    loop {
        let started = tokio::time::Instant::now();
        let error = upload(spool.clone(), channel.clone()).await;
        if started.elapsed() > Duration::from_secs(30) {
            pause = MIN_PAUSE;
        }
        tracing::warn!(%error, retry_in = ?pause, "event upload interrupted");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
