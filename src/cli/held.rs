//! A command's process forked and held before it executes, for `tessera task run`: the process
//! exists, so the agent can pin it as the task's, but nothing of the command runs until its
//! task has started.
//!
//! Forking instead of starting a second program to wait saves `task run` one execution of this
//! binary (about 1.5 ms of start-up on the critical path, see the task bench notes). The child is
//! a fork of a multi-threaded process, so until it executes the command it does only what is
//! async-signal-safe: closes, a signal reset, a read, the exec, a write and `_exit`. Everything
//! it touches is allocated before the fork.

use std::ffi::{CString, OsString, c_char};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use super::Failure;

/// Exit code of a held process that was never released (its task did not start).
pub const NOT_RELEASED: i32 = 125;
/// Exit code when the command could not be executed, as shells use it.
pub const COMMAND_NOT_RUN: i32 = 127;

/// A forked process waiting to execute its command. Dropped without [`HeldCommand::wait`], it
/// is told to exit (or killed, once released) and reaped.
pub struct HeldCommand {
    /// The process; reaped by `wait` or on drop.
    pid: Pid,
    /// A byte written here releases the process; closed unwritten, the process exits with
    /// [`NOT_RELEASED`]. `None` once released.
    release: Option<OwnedFd>,
    /// What the process writes if its exec fails (the errno); end of file once the exec
    /// succeeded, since the exec closes the process's end.
    exec_error: OwnedFd,
    /// The command's program, for messages.
    program: String,
    /// Whether the process has been reaped.
    reaped: bool,
}

/// How a held command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Killed(Signal),
}

impl HeldCommand {
    /// Forks a process for `command` (program and arguments, the program looked up in `PATH`
    /// as a shell would) and holds it.
    pub fn fork(command: &[OsString]) -> Result<Self, Failure> {
        let program = command
            .first()
            .ok_or_else(|| Failure::usage("name the command to run after --"))?;
        let shown = program.to_string_lossy().into_owned();
        // Arguments from the command line cannot hold a NUL byte; a caller building them could.
        let argv = command
            .iter()
            .map(|arg| CString::new(arg.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Failure::usage(format!("an argument of {shown} holds a NUL byte")))?;
        let mut pointers: Vec<*const c_char> = argv.iter().map(|arg| arg.as_ptr()).collect();
        pointers.push(std::ptr::null());
        let pipe = || {
            nix::unistd::pipe2(OFlag::O_CLOEXEC)
                .map_err(|e| Failure::failed(format!("cannot make a pipe for {shown}: {e}")))
        };
        let (release_read, release_write) = pipe()?;
        let (error_read, error_write) = pipe()?;
        let pid = fork_held(
            &pointers,
            release_read.as_raw_fd(),
            release_write.as_raw_fd(),
            error_write.as_raw_fd(),
        )
        .map_err(|e| Failure::failed(format!("cannot start a process for {shown}: {e}")))?;
        drop((release_read, error_write));
        Ok(Self {
            pid,
            release: Some(release_write),
            exec_error: error_read,
            program: shown,
            reaped: false,
        })
    }

    /// The held process's id.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Lets the process execute its command.
    pub fn release(&mut self) -> Result<(), Failure> {
        let Some(release) = self.release.take() else {
            return Ok(());
        };
        nix::unistd::write(&release, b"1")
            .map(drop)
            .map_err(|e| Failure::failed(format!("cannot release {}: {e}", self.program)))
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        if !self.reaped {
            let _ = nix::sys::signal::kill(self.pid, signal);
        }
    }

    /// Waits for the process to end (blocking); an exec that failed is an error naming the
    /// program and the reason, with exit code [`COMMAND_NOT_RUN`].
    pub fn wait(&mut self) -> Result<Ended, Failure> {
        let ended = self.reap()?;
        let mut errno = [0u8; 4];
        match nix::unistd::read(&self.exec_error, &mut errno) {
            Ok(4) => Err(Failure {
                code: COMMAND_NOT_RUN as u8,
                message: format!(
                    "cannot run {}: {}",
                    self.program,
                    std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno))
                ),
            }),
            _ => Ok(ended),
        }
    }

    fn reap(&mut self) -> Result<Ended, Failure> {
        loop {
            match waitpid(self.pid, None) {
                Ok(WaitStatus::Exited(_, code)) => {
                    self.reaped = true;
                    return Ok(Ended::Exited(code));
                }
                Ok(WaitStatus::Signaled(_, signal, _)) => {
                    self.reaped = true;
                    return Ok(Ended::Killed(signal));
                }
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    // ECHILD: someone else reaped it; nothing is left to wait for.
                    self.reaped = true;
                    return Err(Failure::failed(format!(
                        "waiting for {}: {e}",
                        self.program
                    )));
                }
            }
        }
    }
}

impl Drop for HeldCommand {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        if self.release.take().is_none() {
            // Released: the command is running and nobody will wait for it.
            self.signal(Signal::SIGKILL);
        }
        let _ = self.reap();
    }
}

/// Forks; the child closes its copy of the release pipe's write end, waits for the release
/// byte on `release`, then executes `argv`, writing the errno to `exec_error` if that fails.
#[allow(unsafe_code)]
fn fork_held(
    argv: &[*const c_char],
    release: RawFd,
    release_writer: RawFd,
    exec_error: RawFd,
) -> Result<Pid, Errno> {
    // SAFETY: the child runs `held_child`, which calls only async-signal-safe functions and
    // never returns, so no lock another thread held at the fork is ever taken in it.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(child),
        nix::unistd::ForkResult::Child => held_child(argv, release, release_writer, exec_error),
    }
}

/// The forked child until its exec. Async-signal-safe calls only: no allocation, no locks.
#[allow(unsafe_code)]
fn held_child(
    argv: &[*const c_char],
    release: RawFd,
    release_writer: RawFd,
    exec_error: RawFd,
) -> ! {
    // SAFETY: raw syscalls on descriptors this process owns and on `argv`, a NUL-terminated
    // array of NUL-terminated strings that outlives the exec; `_exit` skips every destructor
    // and exit handler, which belong to the parent.
    unsafe {
        // Else the parent closing its end would not reach this read.
        libc::close(release_writer);
        // What this program changed of the signal state, the command must not inherit: Rust
        // ignores SIGPIPE, and the mask is reset as `std::process::Command` does.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        let mut byte = 0u8;
        loop {
            match libc::read(release, (&raw mut byte).cast(), 1) {
                1 => break,
                -1 if Errno::last() == Errno::EINTR => continue,
                _ => libc::_exit(NOT_RELEASED),
            }
        }
        libc::execvp(argv[0], argv.as_ptr());
        let errno = Errno::last_raw().to_ne_bytes();
        libc::write(exec_error, errno.as_ptr().cast(), errno.len());
        libc::_exit(COMMAND_NOT_RUN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_released_command_runs_and_its_exit_code_comes_back() {
        let mut held = HeldCommand::fork(&command(&["sh", "-c", "exit 7"])).unwrap();
        held.release().unwrap();
        assert_eq!(held.wait().unwrap(), Ended::Exited(7));
    }

    #[test]
    fn a_command_never_released_never_runs() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let script = format!("touch {}", marker.display());
        let mut held = HeldCommand::fork(&command(&["sh", "-c", &script])).unwrap();
        // The process exists before the release, as the agent needs to pin it.
        assert!(std::path::Path::new(&format!("/proc/{}", held.pid())).exists());
        held.release.take();
        assert_eq!(held.wait().unwrap(), Ended::Exited(NOT_RELEASED));
        assert!(!marker.exists());
    }

    #[test]
    fn a_missing_program_is_named_with_the_reason() {
        let mut held = HeldCommand::fork(&command(&["no-such-program-for-tessera"])).unwrap();
        held.release().unwrap();
        let failure = held.wait().unwrap_err();
        assert_eq!(failure.code, COMMAND_NOT_RUN as u8);
        assert!(
            failure.message.contains("no-such-program-for-tessera")
                && failure.message.contains("No such file"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn a_killed_command_reports_its_signal_and_the_pipe_signal_is_back_to_default() {
        // `kill -PIPE $$` ends the shell only if SIGPIPE is no longer ignored.
        let mut held = HeldCommand::fork(&command(&["sh", "-c", "kill -PIPE $$; exit 3"])).unwrap();
        held.release().unwrap();
        assert_eq!(held.wait().unwrap(), Ended::Killed(Signal::SIGPIPE));
    }

    #[test]
    fn dropping_a_held_command_reaps_it() {
        let held = HeldCommand::fork(&command(&["sh", "-c", "sleep 30"])).unwrap();
        let pid = held.pid;
        drop(held);
        assert_eq!(waitpid(pid, None), Err(Errno::ECHILD));
    }
}
