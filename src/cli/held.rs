//! A command's process forked and held before it executes, for `tessera task run`: the process
//! exists, so the agent can pin it as the task's, but nothing of the command runs until its
//! task has started.
//!
//! Forking instead of starting a second program to wait saves `task run` one execution of this
//! binary (about 1.5 ms of start-up on the critical path, see the task bench notes). The child is
//! a fork of a multi-threaded process, so until it executes the command it does only what is
//! async-signal-safe: closes, a signal reset, a read, the exec, a write and `_exit`. Everything
//! it touches is allocated before the fork.

use std::ffi::{CString, OsStr, OsString, c_char};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use super::Failure;

/// Exit code of a held process that was never released (its task did not start).
pub const NOT_RELEASED: i32 = 125;
/// Exit code when the command is not found, as shells use it.
pub const COMMAND_NOT_FOUND: i32 = 127;
/// Exit code when the command is found but cannot be executed, as shells use it.
pub const COMMAND_NOT_EXECUTABLE: i32 = 126;
/// The search path when `PATH` is not set, as the C library's `execvp` uses it.
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// A forked process waiting to execute its command. Dropped without [`HeldCommand::wait`], it
/// is told to exit (or killed, once released) and reaped.
pub struct HeldCommand {
    /// The process; reaped by `wait` or on drop.
    pid: Pid,
    /// A byte written here releases the process; closed unwritten, the process exits with
    /// [`NOT_RELEASED`]. `None` once released.
    release: Option<OwnedFd>,
    /// What the process writes if its exec fails (the errno); end of file once the exec
    /// succeeded, since the exec closes the process's end. The program is looked up before
    /// the fork, so this reports only what changed in between or what only the exec finds
    /// (a missing interpreter).
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
    /// as a shell would) and holds it. A program that is not found or not executable is an
    /// error before any process exists, with the shell's exit code (127 or 126).
    pub fn fork(command: &[OsString]) -> Result<Self, Failure> {
        let program = command
            .first()
            .ok_or_else(|| Failure::usage("name the command to run after --"))?;
        let shown = program.to_string_lossy().into_owned();
        let path = CString::new(locate(program)?.into_os_string().as_bytes())
            .map_err(|_| Failure::usage(format!("the program {shown} holds a NUL byte")))?;
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
            &path,
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
    fn signal(&self, signal: Signal) {
        if !self.reaped {
            let _ = nix::sys::signal::kill(self.pid, signal);
        }
    }

    /// Waits for the process to end (blocking); an exec that failed is an error naming the
    /// program and the reason, with the shell's exit code for it.
    pub fn wait(&mut self) -> Result<Ended, Failure> {
        let ended = self.reap()?;
        let mut errno = [0u8; 4];
        match nix::unistd::read(&self.exec_error, &mut errno) {
            Ok(4) => {
                let errno = i32::from_ne_bytes(errno);
                Err(not_run(
                    &self.program,
                    Errno::from_raw(errno),
                    std::io::Error::from_raw_os_error(errno),
                ))
            }
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

/// Where `program` is: itself when it names a path, else the first executable file of that
/// name in `PATH`'s directories.
fn locate(program: &OsStr) -> Result<PathBuf, Failure> {
    let shown = program.to_string_lossy();
    let executable = |path: &Path| -> Result<(), Errno> {
        if !path.is_file() {
            return Err(if path.exists() {
                Errno::EACCES
            } else {
                Errno::ENOENT
            });
        }
        nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)
    };
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return match executable(&path) {
            Ok(()) => Ok(path),
            Err(errno) => Err(not_run(&shown, errno, std::io::Error::from(errno))),
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    let mut denied = None;
    for dir in std::env::split_paths(&search) {
        // An empty entry is the current directory, as for the shell.
        let candidate = if dir.as_os_str().is_empty() {
            PathBuf::from(".").join(program)
        } else {
            dir.join(program)
        };
        match executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(Errno::EACCES) => denied = Some(candidate),
            Err(_) => {}
        }
    }
    Err(match denied {
        Some(path) => not_run(
            &shown,
            Errno::EACCES,
            format!("{} is not executable", path.display()),
        ),
        None => not_run(
            &shown,
            Errno::ENOENT,
            format!("not found in PATH ({})", search.to_string_lossy()),
        ),
    })
}

/// The failure for a program that could not be run for `errno`, with the shell's exit code.
fn not_run(program: &str, errno: Errno, reason: impl std::fmt::Display) -> Failure {
    let code = match errno {
        Errno::ENOENT | Errno::ENOTDIR => COMMAND_NOT_FOUND,
        _ => COMMAND_NOT_EXECUTABLE,
    };
    Failure {
        code: code as u8,
        message: format!("cannot run {program}: {reason}"),
    }
}

/// Forks; the child closes its copy of the release pipe's write end, waits for the release
/// byte on `release`, then executes `path` with `argv`, writing the errno to `exec_error` if
/// that fails.
#[allow(unsafe_code)]
fn fork_held(
    path: &CString,
    argv: &[*const c_char],
    release: RawFd,
    release_writer: RawFd,
    exec_error: RawFd,
) -> Result<Pid, Errno> {
    // SAFETY: the child runs `held_child`, which calls only async-signal-safe functions and
    // never returns, so no lock another thread held at the fork is ever taken in it.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(child),
        nix::unistd::ForkResult::Child => {
            held_child(path, argv, release, release_writer, exec_error)
        }
    }
}

/// The forked child until its exec. Async-signal-safe calls only: no allocation, no locks.
#[allow(unsafe_code)]
fn held_child(
    path: &CString,
    argv: &[*const c_char],
    release: RawFd,
    release_writer: RawFd,
    exec_error: RawFd,
) -> ! {
    // SAFETY: raw syscalls on descriptors this process owns, on `path` and on `argv`, a
    // NUL-terminated array of NUL-terminated strings that outlives the exec; `_exit` skips every destructor
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
        // `path` holds a slash, so nothing is searched; a script without `#!` still runs
        // with /bin/sh, as a shell would run it.
        libc::execvp(path.as_ptr(), argv.as_ptr());
        let errno = Errno::last_raw().to_ne_bytes();
        libc::write(exec_error, errno.as_ptr().cast(), errno.len());
        libc::_exit(COMMAND_NOT_FOUND)
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

    fn refused(words: &[&str]) -> Failure {
        match HeldCommand::fork(&command(words)) {
            Ok(_) => panic!("{words:?} was forked"),
            Err(failure) => failure,
        }
    }

    #[test]
    fn a_program_not_found_is_named_before_any_process_exists() {
        let failure = refused(&["no-such-program-for-tessera"]);
        assert_eq!(failure.code, COMMAND_NOT_FOUND as u8);
        assert!(
            failure
                .message
                .starts_with("cannot run no-such-program-for-tessera: not found in PATH ("),
            "{}",
            failure.message
        );
        let failure = refused(&["/no/such/program"]);
        assert_eq!(failure.code, COMMAND_NOT_FOUND as u8);
        assert!(
            failure.message.contains("/no/such/program: No such file"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn a_program_that_is_not_executable_gets_the_shells_code() {
        let dir = tempfile::tempdir().unwrap();
        let failure = refused(&[dir.path().to_str().unwrap()]);
        assert_eq!(
            failure.code, COMMAND_NOT_EXECUTABLE as u8,
            "{}",
            failure.message
        );
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "echo hi\n").unwrap();
        // Root may execute any file with an execute bit, and none is set here.
        let failure = refused(&[plain.to_str().unwrap()]);
        assert_eq!(
            failure.code, COMMAND_NOT_EXECUTABLE as u8,
            "{}",
            failure.message
        );
    }

    /// An executable script holding `text`, forked, released and waited for.
    fn run_script(text: &str) -> Result<Ended, Failure> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, text).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut held = HeldCommand::fork(&command(&[script.to_str().unwrap()])).unwrap();
        held.release().unwrap();
        held.wait()
    }

    #[test]
    fn what_only_the_exec_finds_is_reported_after_it() {
        let failure = run_script("#!/no/such/interpreter\n").unwrap_err();
        assert_eq!(failure.code, COMMAND_NOT_FOUND as u8);
        assert!(
            failure.message.contains("script: No such file"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn a_script_without_an_interpreter_line_runs_with_the_shell() {
        assert_eq!(run_script("exit 9\n").unwrap(), Ended::Exited(9));
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
