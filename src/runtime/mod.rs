//! The runtime toolkit both roles are built from: one shutdown signal ([`Shutdown`]), one
//! supervisor that owns a role's background tasks ([`Tasks`]), one retry pause with jittered
//! exponential backoff ([`Backoff`]), one accept loop ([`accept::incoming`]), wall-clock aware
//! waits for renewal loops ([`wait_until_wall_time`]), socket binding ([`socket`]) and
//! systemd's readiness protocol ([`sdnotify`]).
//!
//! It depends on nothing else of tessera, so the agent and the server meet here instead of
//! importing each other.

pub mod accept;
pub mod admin;
pub mod sdnotify;
pub mod socket;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One role's stop signal: triggered once (by an operator, by a test, or by a task that died),
/// seen by everything that waits on it, including waiters that arrive later.
#[derive(Clone, Debug)]
pub struct Shutdown {
    /// `true` once shutdown has been requested; shared by every clone, so it never closes
    /// while a clone lives.
    state: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal not yet triggered.
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Requests shutdown; later calls change nothing.
    pub fn trigger(&self) {
        self.state.send_replace(true);
    }

    /// Whether shutdown has been requested.
    pub fn is_triggered(&self) -> bool {
        *self.state.borrow()
    }

    /// Resolves once shutdown has been requested. Owns what it needs, so it can be handed to a
    /// spawned task.
    pub fn signalled(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut seen = self.state.subscribe();
        async move {
            // The sender lives as long as this receiver's `Shutdown`, so only `true` ends it.
            let _ = seen.wait_for(|stopped| *stopped).await;
        }
    }
}

/// Why a supervised task ended a role.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The task returned an error.
    #[error("background task {task} failed: {source}")]
    Failed {
        /// The task's name.
        task: &'static str,
        /// What it returned.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The task panicked.
    #[error("background task {task} panicked: {message}")]
    Panicked {
        /// The task's name.
        task: &'static str,
        /// The panic's message, when it had one.
        message: String,
    },
    /// A task meant to run until shutdown returned before it.
    #[error("background task {task} ended before shutdown was requested")]
    EndedEarly {
        /// The task's name.
        task: &'static str,
    },
}

/// The background tasks of one role. A task that fails, panics or ends before shutdown is
/// logged, its error kept for [`Tasks::wait`], and shutdown triggered: a role never serves
/// half-alive.
#[derive(Clone)]
pub struct Tasks {
    /// Triggered when a task dies; every task stops on it.
    shutdown: Shutdown,
    /// The supervising wrappers, joined by `wait`.
    handles: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// The first task failure, if any.
    failure: Arc<Mutex<Option<TaskError>>>,
}

impl Tasks {
    /// Tasks stopped by, and stopping on failure, `shutdown`.
    pub fn new(shutdown: Shutdown) -> Self {
        Self {
            shutdown,
            handles: Arc::default(),
            failure: Arc::default(),
        }
    }

    /// The shutdown signal the tasks share.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Runs `task` until it returns. An error fails the role; `Ok` is a normal end (for tasks
    /// that end on shutdown themselves, returning `Ok` before it is reported as
    /// [`TaskError::EndedEarly`]).
    pub fn spawn<E>(
        &self,
        name: &'static str,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) where
        E: std::error::Error + Send + Sync + 'static,
    {
        self.supervise(name, async move {
            task.await.map_err(|e| TaskError::Failed {
                task: name,
                source: Box::new(e),
            })
        });
    }

    /// Runs `task`, which should run until shutdown: ending before it fails the role.
    pub fn spawn_until_shutdown(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let shutdown = self.shutdown.clone();
        self.supervise(name, async move {
            task.await;
            if shutdown.is_triggered() {
                Ok(())
            } else {
                Err(TaskError::EndedEarly { task: name })
            }
        });
    }

    fn supervise(
        &self,
        name: &'static str,
        task: impl Future<Output = Result<(), TaskError>> + Send + 'static,
    ) {
        let inner = tokio::spawn(task);
        let (shutdown, failure) = (self.shutdown.clone(), self.failure.clone());
        let watcher = tokio::spawn(async move {
            let error = match inner.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(joined) if joined.is_panic() => TaskError::Panicked {
                    task: name,
                    message: panic_message(joined.into_panic()),
                },
                // Cancelled: only happens when the runtime itself shuts down.
                Err(_) => return,
            };
            tracing::error!(error = %error, "a background task died; shutting down");
            failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(error);
            shutdown.trigger();
        });
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(watcher);
    }

    /// Waits for every task (including those spawned meanwhile) and returns the first failure.
    pub async fn wait(self) -> Result<(), TaskError> {
        loop {
            let pending =
                std::mem::take(&mut *self.handles.lock().unwrap_or_else(|p| p.into_inner()));
            if pending.is_empty() {
                break;
            }
            for handle in pending {
                let _ = handle.await;
            }
        }
        match self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Pauses between retries: exponential from `min` to `max`, each pause drawn at random from
/// its upper half, so that a fleet that lost its server at the same moment does not come back
/// in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// The first pause, and the pause after a reset.
    min: Duration,
    /// The longest pause.
    max: Duration,
    /// The ceiling of the next pause.
    next: Duration,
}

impl Backoff {
    /// Pauses from `min` up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The next pause: between half of the current ceiling and the ceiling, which then doubles.
    pub fn next_pause(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (ceiling * 2).min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(unit_random())
    }

    /// Starts again from `min` (after a success).
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Sleeps for the next pause; `false` when `shutdown` came first.
    pub async fn pause(&mut self, shutdown: &Shutdown) -> bool {
        let pause = self.next_pause();
        tokio::select! {
            _ = shutdown.signalled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }
}

/// A uniformly distributed number in [0, 1).
fn unit_random() -> f64 {
    let mut bytes = [0u8; 8];
    // The system generator does not fail on Linux; without it, no jitter is still a pause.
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return 0.0;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// This process's soft limit on open descriptors (RLIMIT_NOFILE); 1024, the usual default,
/// when it cannot be read.
#[allow(unsafe_code)]
pub fn descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    }
}

/// How often a wait for a wall-clock time looks at the clock again. Timers are monotonic: they
/// do not run while a machine is suspended and ignore clock steps, while certificates expire by
/// the wall clock.
pub const WALL_CLOCK_CHECK: Duration = Duration::from_secs(5);

/// Waits until `now()` is at or past `due`, looking at the wall clock at least every
/// [`WALL_CLOCK_CHECK`]. Returns `false` when `shutdown` came first.
pub async fn wait_until_wall_time(
    due: SystemTime,
    now: impl Fn() -> SystemTime,
    shutdown: &Shutdown,
) -> bool {
    let stopped = shutdown.signalled();
    tokio::pin!(stopped);
    loop {
        let Ok(left) = due.duration_since(now()) else {
            return true;
        };
        if left.is_zero() {
            return true;
        }
        tokio::select! {
            _ = &mut stopped => return false,
            _ = tokio::time::sleep(left.min(WALL_CLOCK_CHECK)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test(start_paused = true)]
    async fn shutdown_reaches_waiters_before_and_after_it() {
        let shutdown = Shutdown::new();
        let early = tokio::spawn(shutdown.clone().signalled());
        tokio::task::yield_now().await;
        assert!(!early.is_finished(), "no shutdown requested yet");
        shutdown.trigger();
        early.await.unwrap();
        assert!(shutdown.is_triggered());
        // A waiter that arrives afterwards returns at once.
        tokio::time::timeout(Duration::from_millis(1), shutdown.signalled())
            .await
            .unwrap();
    }

    #[derive(Debug, thiserror::Error)]
    #[error("the disk is on fire")]
    struct Injected;

    #[tokio::test(start_paused = true)]
    async fn a_failing_task_stops_the_others_and_wait_returns_its_error() {
        let tasks = Tasks::new(Shutdown::new());
        let stopped_cleanly = Arc::new(AtomicU64::new(0));
        let counter = stopped_cleanly.clone();
        let stop = tasks.shutdown().signalled();
        tasks.spawn_until_shutdown("steady", async move {
            stop.await;
            counter.fetch_add(1, Ordering::SeqCst);
        });
        tasks.spawn("failing", async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Err::<(), _>(Injected)
        });
        let error = tasks.clone().wait().await.unwrap_err();
        assert!(
            matches!(
                &error,
                TaskError::Failed {
                    task: "failing",
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains("the disk is on fire"), "{error}");
        assert!(
            tasks.shutdown().is_triggered(),
            "a dead task stops the role"
        );
        assert_eq!(stopped_cleanly.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_and_an_early_end_are_failures_too() {
        let tasks = Tasks::new(Shutdown::new());
        tasks.spawn_until_shutdown("panicking", async { panic!("slot 7 is gone") });
        let error = tasks.wait().await.unwrap_err();
        assert!(
            matches!(&error, TaskError::Panicked { task: "panicking", message } if message == "slot 7 is gone"),
            "{error:?}"
        );

        let tasks = Tasks::new(Shutdown::new());
        tasks.spawn_until_shutdown("quitter", async {});
        let error = tasks.wait().await.unwrap_err();
        assert!(matches!(error, TaskError::EndedEarly { task: "quitter" }));
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_that_end_on_shutdown_are_a_clean_stop() {
        let tasks = Tasks::new(Shutdown::new());
        let stop = tasks.shutdown().signalled();
        tasks.spawn_until_shutdown("steady", stop);
        tasks.spawn("done", async { Ok::<(), Injected>(()) });
        tasks.shutdown().trigger();
        tasks.wait().await.unwrap();
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_with_jitter_in_the_upper_half() {
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(5));
        let mut backoff = Backoff::new(min, max);
        let mut ceiling = min;
        for _ in 0..10 {
            let pause = backoff.next_pause();
            assert!(
                pause >= ceiling / 2 && pause <= ceiling,
                "{pause:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceiling = (ceiling * 2).min(max);
        }
        assert_eq!(ceiling, max);
        backoff.reset();
        assert!(backoff.next_pause() <= min);
    }

    #[test]
    fn backoff_pauses_differ_between_agents() {
        // Twenty fresh backoffs drawing their first pause: lockstep would make them all equal.
        let pauses: std::collections::HashSet<Duration> = (0..20)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(5)).next_pause())
            .collect();
        assert!(pauses.len() > 1, "{pauses:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_pause_sleeps_and_yields_to_shutdown() {
        let shutdown = Shutdown::new();
        let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(8));
        let started = tokio::time::Instant::now();
        assert!(backoff.pause(&shutdown).await);
        let slept = started.elapsed();
        assert!(
            slept >= Duration::from_secs(1) && slept <= Duration::from_secs(2),
            "{slept:?}"
        );
        shutdown.trigger();
        assert!(!backoff.pause(&shutdown).await);
    }

    /// A wall clock the test moves: seconds since the epoch.
    fn fake_clock(seconds: &Arc<AtomicU64>) -> impl Fn() -> SystemTime + use<> {
        let seconds = seconds.clone();
        move || SystemTime::UNIX_EPOCH + Duration::from_secs(seconds.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_step_is_noticed_within_the_check_interval() {
        let wall = Arc::new(AtomicU64::new(1_000_000));
        let due = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + 12 * 3600);
        let shutdown = Shutdown::new();
        let waiting = tokio::spawn({
            let (clock, shutdown) = (fake_clock(&wall), shutdown.clone());
            async move { wait_until_wall_time(due, clock, &shutdown).await }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished(), "the due time is hours away");
        // The machine was suspended for a day: monotonic time barely moved, the wall clock did.
        wall.fetch_add(24 * 3600, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        assert!(waiting.await.unwrap());
        assert!(
            started.elapsed() <= WALL_CLOCK_CHECK,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_wait_ends_on_time_and_on_shutdown() {
        let wall = Arc::new(AtomicU64::new(0));
        let shutdown = Shutdown::new();
        let ticking = tokio::spawn({
            let wall = wall.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    wall.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let due = SystemTime::UNIX_EPOCH + Duration::from_secs(30);
        assert!(wait_until_wall_time(due, fake_clock(&wall), &shutdown).await);
        assert!(wall.load(Ordering::SeqCst) >= 30);
        shutdown.trigger();
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40);
        assert!(!wait_until_wall_time(far, fake_clock(&wall), &shutdown).await);
        ticking.abort();
    }
}
