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
use crate::runtime::Backoff;

/// Events per batch: as many as the server takes. Each batch is one datastore transaction, so
/// fewer, larger batches write each hot index page fewer times (500 a batch ingested about
/// 21,000 events/s on SQLite in the benchmark, 1,000 about 23,000).
const BATCH_EVENTS: usize = crate::events::model::MAX_BATCH_EVENTS;
/// Bytes of encoded events per batch, well under the server's message limit.
const BATCH_BYTES: usize = 1 << 20;
/// First pause after a failed upload; doubled up to [`MAX_PAUSE`].
const MIN_PAUSE: Duration = Duration::from_millis(200);
/// The longest pause between uploads.
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// An upload that lasted this long was a working connection: the next failure starts the
/// backoff afresh.
const HEALTHY_UPLOAD: Duration = Duration::from_secs(30);
/// Batches sent but not yet acknowledged.
const IN_FLIGHT: usize = 8;

/// Why an upload run ended.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The server refused or ended the stream with a status; retry later.
    #[error("event stream: {0}")]
    Status(#[source] tonic::Status),
    /// The upload ended without an error of its own (what ended, in words).
    #[error("event upload: {0}")]
    Ended(&'static str),
    /// The server acknowledged a batch when none was in flight.
    #[error("event stream: ack {0} for no batch in flight")]
    UnexpectedAck(u64),
    /// The server acknowledged a batch other than the oldest one in flight.
    #[error("event stream: ack {got} where {due} was due")]
    OutOfOrder {
        /// The batch acknowledged.
        got: u64,
        /// The oldest batch in flight.
        due: u64,
    },
    /// The spool could not be read or acknowledged.
    #[error("spool: {0}")]
    Spool(#[source] crate::events::SpoolError),
    /// The blocking-pool task reading or acknowledging the spool panicked or was cancelled.
    #[error("spool task: {0}")]
    Task(#[source] tokio::task::JoinError),
}

/// Uploads until the stream fails. Returns the error; the caller retries with backoff.
pub async fn upload(spool: Arc<Spool>, channel: Channel) -> UploadError {
    let mut client = NodeClient::new(channel);
    let (tx, rx) = mpsc::channel::<EventBatch>(IN_FLIGHT);
    let mut acks = match client.report_events(ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return UploadError::Status(status),
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
                Ok(Err(e)) => return UploadError::Spool(e),
                Err(e) => return UploadError::Task(e),
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
                    return UploadError::Ended("the request stream was closed");
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
                    Ok(None) => return UploadError::Ended("the server ended the event stream"),
                    Err(status) => return UploadError::Status(status),
                };
                let Some((sequence, last)) = in_flight.pop_front() else {
                    return UploadError::UnexpectedAck(ack.sequence);
                };
                if ack.sequence != sequence {
                    return UploadError::OutOfOrder { got: ack.sequence, due: sequence };
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
                    Ok(Err(e)) => return UploadError::Spool(e),
                    Err(e) => return UploadError::Task(e),
                }
            }
            changed = appended.changed(), if in_flight.len() < IN_FLIGHT => {
                if changed.is_err() {
                    return UploadError::Ended("the spool was closed");
                }
            }
        }
    }
}

/// Runs [`upload`] again and again with jittered backoff, until the task is aborted.
pub async fn run(spool: Arc<Spool>, channel: Channel) {
    retry_uploads(|| upload(spool.clone(), channel.clone())).await
}

/// Runs `upload` again and again, pausing with jittered backoff after each failure; an upload
/// that worked for a while resets the backoff.
async fn retry_uploads<F, Fut>(mut upload: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = UploadError>,
{
    let mut backoff = Backoff::new(MIN_PAUSE, MAX_PAUSE);
    loop {
        let started = tokio::time::Instant::now();
        let error = upload().await;
        if started.elapsed() > HEALTHY_UPLOAD {
            backoff.reset();
        }
        let pause = backoff.next_pause();
        tracing::warn!(%error, retry_in = ?pause, "event upload interrupted");
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn failed_uploads_back_off_and_a_healthy_one_resets_the_backoff() {
        // Each upload records when it started; the sixth lasts a minute before failing.
        let starts = Arc::new(Mutex::new(Vec::<Instant>::new()));
        let runner = tokio::spawn({
            let starts = starts.clone();
            retry_uploads(move || {
                let starts = starts.clone();
                async move {
                    let attempt = {
                        let mut starts = starts.lock().unwrap();
                        starts.push(Instant::now());
                        starts.len()
                    };
                    if attempt == 6 {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    UploadError::Ended("connection refused")
                }
            })
        });
        while starts.lock().unwrap().len() < 8 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        runner.abort();
        let starts = starts.lock().unwrap().clone();
        let pauses: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        // Ceilings 0.2, 0.4, 0.8, 1.6, 3.2 s; each pause in the upper half of its ceiling.
        let mut ceiling = MIN_PAUSE;
        for pause in &pauses[..4] {
            assert!(
                *pause >= ceiling / 2 && *pause <= ceiling,
                "{pause:?} for ceiling {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(MAX_PAUSE);
        }
        // The sixth upload ran for a minute: the pause after it starts from the bottom again.
        let after_healthy = pauses[5] - Duration::from_secs(60);
        assert!(after_healthy <= MIN_PAUSE, "{after_healthy:?}");
        assert!(pauses[4] > MIN_PAUSE, "no reset before it: {:?}", pauses[4]);
    }
}
