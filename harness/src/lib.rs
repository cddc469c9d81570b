//! What tessera's end-to-end tests and its benchmark harness (`tessera-bench`) share for driving
//! the real binaries: child processes that die with the harness and are killed when dropped,
//! waiting for one to serve with a deadline (failing early, with its log, when it exits), free
//! loopback ports, and scratch PostgreSQL databases ([`postgres`]).
//!
//! Errors are values ([`Error`]); tests unwrap them, the benchmark reports them.

pub mod postgres;

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(20);

/// Why a child process could not be started or did not do what was waited for.
#[derive(Debug)]
pub enum Error {
    /// Starting the process, or talking to it, failed.
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The process exited while it was expected to serve.
    Exited {
        /// The process.
        name: String,
        /// How it ended.
        status: ExitStatus,
        /// Its log so far (empty when it has none).
        log: String,
    },
    /// The deadline passed first.
    Timeout {
        /// What was waited for.
        what: String,
        /// The limit.
        limit: Duration,
        /// The process's log so far (empty when it has none).
        log: String,
    },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let with_log = |f: &mut std::fmt::Formatter<'_>, log: &str| {
            if log.is_empty() {
                Ok(())
            } else {
                write!(f, "; its log:\n{log}")
            }
        };
        match self {
            Error::Io { what, source } => write!(f, "{what}: {source}"),
            Error::Exited { name, status, log } => {
                write!(f, "{name} exited with {status}")?;
                with_log(f, log)
            }
            Error::Timeout { what, limit, log } => {
                write!(f, "{what}: not within {limit:?}")?;
                with_log(f, log)
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// True when running in CI (`CI` set, and not to `false`), where a missing prerequisite fails
/// a test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// A loopback address with a port that was free a moment ago, for a child process to bind.
/// (Another process could take it first; the child then fails to start and says so.)
pub fn free_loopback_address() -> Result<SocketAddr, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(io_error("finding a free loopback port"))
}

/// The word after the first `marker` in `log` from byte `start` on, once its line is complete.
fn logged_after(log: &Path, start: u64, marker: &str) -> Option<String> {
    let bytes = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(bytes.get(start as usize..)?);
    let line = text.split_inclusive('\n').find(|l| l.contains(marker))?;
    if !line.ends_with('\n') {
        return None;
    }
    let (_, after) = line.split_once(marker)?;
    let word: String = after
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ',')
        .collect();
    Some(word).filter(|w| !w.is_empty())
}

/// A command for `program` whose process is killed when the thread that starts it dies,
/// however it dies (a harness killed by a test timeout must not leave agents running).
///
/// The signal follows the starting *thread*: start long-lived children from a thread that
/// outlives them (a test's own thread, a runtime worker), not from a blocking-pool thread that
/// may be retired while they run.
#[allow(unsafe_code)]
pub fn command(program: impl AsRef<OsStr>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(program);
    // SAFETY: prctl is async-signal-safe and touches only the child being started.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
}

/// A child process, killed (SIGKILL, then reaped) when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    name: String,
    log: Option<PathBuf>,
    /// Where this process's output begins in its log (earlier runs may have appended to it).
    log_start: u64,
}

impl Process {
    /// Starts `command` as it is set up (standard streams included); `name` names it in errors.
    pub fn spawn(command: &mut Command, name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let child = command
            .spawn()
            .map_err(io_error(format!("starting {name}")))?;
        Ok(Self {
            child,
            name,
            log: None,
            log_start: 0,
        })
    }

    /// Starts `command` with no standard input and its output appended to the file `log`,
    /// which errors then quote.
    pub fn spawn_logged(
        command: &mut Command,
        name: impl Into<String>,
        log: &Path,
    ) -> Result<Self, Error> {
        let name = name.into();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_error(format!("opening {}", log.display())))?;
        let err = file
            .try_clone()
            .map_err(io_error(format!("opening {}", log.display())))?;
        let log_start = file
            .metadata()
            .map_err(io_error(format!("opening {}", log.display())))?
            .len();
        command.stdin(Stdio::null()).stdout(file).stderr(err);
        let mut process = Self::spawn(command, name)?;
        process.log = Some(log.to_path_buf());
        process.log_start = log_start;
        Ok(process)
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The process, for its standard streams.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The log file so far, or nothing when the process has none.
    pub fn logs(&self) -> String {
        self.log
            .as_ref()
            .and_then(|log| std::fs::read_to_string(log).ok())
            .unwrap_or_default()
    }

    /// Polls `ready` until it holds; fails when the process exits first or `limit` passes.
    pub fn wait_ready(
        &mut self,
        what: &str,
        limit: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + limit;
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(io_error(format!("waiting for {}", self.name)))?
            {
                return Err(Error::Exited {
                    name: self.name.clone(),
                    status,
                    log: self.logs(),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("{}: {what}", self.name),
                    limit,
                    log: self.logs(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until this process logs `marker` and returns the word after it (up to white
    /// space, a quote or a comma, so text and JSON logs both work): how a child reports what it
    /// chose itself, such as the port it bound. Fails when the process exits first or `limit`
    /// passes; only this process's own output counts, not an earlier run's in the same log.
    pub fn wait_for_logged(&mut self, marker: &str, limit: Duration) -> Result<String, Error> {
        let (log, start) = match &self.log {
            Some(log) => (log.clone(), self.log_start),
            None => {
                return Err(Error::Io {
                    what: format!("finding {marker:?} in the log of {}", self.name),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "started without a log file",
                    ),
                });
            }
        };
        let mut found = None;
        self.wait_ready(&format!("logging {marker:?}"), limit, || {
            found = logged_after(&log, start, marker);
            found.is_some()
        })?;
        Ok(found.unwrap_or_default())
    }

    /// Waits until the Unix socket `socket` accepts connections.
    pub fn wait_for_socket(&mut self, socket: &Path, limit: Duration) -> Result<(), Error> {
        self.wait_ready(&format!("serving {}", socket.display()), limit, || {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        })
    }

    /// Waits for the process to exit on its own; its status.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus, Error> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(io_error(format!("waiting for {}", self.name)))?
            {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("{} to exit", self.name),
                    limit,
                    log: self.logs(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    #[allow(unsafe_code)]
    pub fn signal(&self, signal: i32) -> Result<(), Error> {
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, signal) } == 0 {
            Ok(())
        } else {
            Err(io_error(format!("signalling {}", self.name))(
                std::io::Error::last_os_error(),
            ))
        }
    }

    /// Kills the process (SIGKILL: no draining) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident set size now and at peak, in KiB, from `/proc/<pid>/status` (0 when unknown).
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU time used so far (user + system), from `/proc/<pid>/stat`.
    #[allow(unsafe_code)]
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let ticks: u64 = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / per_second)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `command` to completion with its output captured, killing it after `limit`.
pub fn output_within(command: &mut Command, limit: Duration) -> Result<Output, Error> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_error("starting a command"))?;
    let deadline = Instant::now() + limit;
    while child
        .try_wait()
        .map_err(io_error("waiting for a command"))?
        .is_none()
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Timeout {
                what: format!("{command:?} to finish"),
                limit,
                log: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    child
        .wait_with_output()
        .map_err(io_error("collecting a command's output"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_exits_while_awaited_is_reported_with_its_log() {
        let dir = std::env::temp_dir().join(format!("tessera-harness-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("child.log");
        let mut process = Process::spawn_logged(
            command("/bin/sh").args(["-c", "echo starting up; exit 3"]),
            "sh",
            &log,
        )
        .unwrap();
        let error = process
            .wait_for_socket(&dir.join("never.sock"), Duration::from_secs(10))
            .unwrap_err();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(error, Error::Exited { .. }), "{error}");
        let text = error.to_string();
        assert!(
            text.contains("sh exited") && text.contains("starting up"),
            "{text}"
        );
    }

    #[test]
    fn a_logged_value_is_read_from_this_run_only() {
        let dir = std::env::temp_dir().join(format!("tessera-harness-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("child.log");
        std::fs::write(&log, "old run: listening on 127.0.0.1:1111\n").unwrap();
        let mut process = Process::spawn_logged(
            command("/bin/sh").args([
                "-c",
                "echo 'INFO x: listening on 127.0.0.1:2222 more'; exec sleep 30",
            ]),
            "sh",
            &log,
        )
        .unwrap();
        let found = process.wait_for_logged("listening on ", Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found.unwrap(), "127.0.0.1:2222");
    }

    #[test]
    fn a_slow_command_is_killed_at_its_limit() {
        let started = Instant::now();
        let error =
            output_within(command("/bin/sleep").arg("30"), Duration::from_millis(100)).unwrap_err();
        assert!(matches!(error, Error::Timeout { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn dropping_a_process_kills_it() {
        let process = Process::spawn(command("/bin/sleep").arg("30"), "sleep").unwrap();
        let pid = process.id();
        drop(process);
        // Killed and reaped: the pid names no process (barring its reuse in the meantime).
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
