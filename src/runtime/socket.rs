//! Binding Unix sockets: the agent's world-connectable Workload API socket and the server's
//! owner-only admin socket go through the same checks.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The socket's directory could not be created.
    #[error("cannot create socket directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// Something other than a socket is in the way.
    #[error("{path} exists and is not a socket; refusing to remove it")]
    NotASocket {
        /// The configured socket path.
        path: String,
    },
    /// The socket's directory could be changed by users other than root and the agent's own.
    #[error("socket directory {path} is {reason}")]
    UnsafeDirectory {
        /// The directory.
        path: String,
        /// What is wrong with it and how to fix it.
        reason: String,
    },
    /// Something answers on the socket already; it is never taken over.
    #[error(
        "{path}: another agent or server is serving this socket; stop it, or configure another socket path"
    )]
    InUse {
        /// The configured socket path.
        path: String,
    },
    /// Binding or setting permissions failed.
    #[error("cannot bind {path}: {source}")]
    Bind {
        /// The configured socket path.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// Binds a socket only its owner can connect to, in a directory only its owner can enter
/// (when the directory is created here).
pub fn bind_private(path: &Path) -> Result<UnixListener, BindError> {
    bind_with_modes(path, 0o600, 0o700)
}

/// Binds `path` with `socket_mode`, creating its directory with `dir_mode` when missing and
/// replacing a stale socket, never a live one and never another kind of file.
pub fn bind_with_modes(
    path: &Path,
    socket_mode: u32,
    dir_mode: u32,
) -> Result<UnixListener, BindError> {
    let shown = || path.display().to_string();
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|source| BindError::CreateDir {
            path: dir.display().to_string(),
            source,
        })?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode));
    }
    if let Some(dir) = path.parent() {
        check_directory(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Only a stale socket (nothing listening) is replaced: removing a live one would
            // silently cut its server's clients off and leave it serving nobody.
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(BindError::InUse { path: shown() }),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(source) => {
                    return Err(BindError::Bind {
                        path: shown(),
                        source,
                    });
                }
            }
            std::fs::remove_file(path).map_err(|source| BindError::Bind {
                path: shown(),
                source,
            })?;
        }
        Ok(_) => return Err(BindError::NotASocket { path: shown() }),
        Err(_) => {}
    }
    bind_socket(path, socket_mode).map_err(|source| BindError::Bind {
        path: shown(),
        source,
    })
}

/// Refuses a directory that someone other than root and the agent's own user could change: such
/// a user could swap the socket for a file or a link of their own between our steps.
fn check_directory(dir: &Path) -> Result<(), BindError> {
    use std::os::unix::fs::MetadataExt;
    let refused = |reason: String| BindError::UnsafeDirectory {
        path: dir.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(dir).map_err(|source| BindError::CreateDir {
        path: dir.display().to_string(),
        source,
    })?;
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if meta.uid() != 0 && meta.uid() != uid {
        return Err(refused(format!(
            "owned by uid {}; it must belong to root or to uid {uid}, which runs this process",
            meta.uid()
        )));
    }
    if meta.mode() & 0o002 != 0 {
        return Err(refused(format!(
            "writable by every user (mode {:o}); remove that with chmod o-w, or choose a directory of its own",
            meta.mode() & 0o7777
        )));
    }
    if meta.mode() & 0o020 != 0 && meta.gid() != 0 && meta.gid() != gid {
        return Err(refused(format!(
            "writable by group {} (mode {:o}); remove that with chmod g-w",
            meta.gid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Binds a listening socket at `path` with `mode`. The mode is set on the socket before it has a
/// name (Linux gives the bound file the socket's mode, less the umask), and the bits the umask
/// took away are restored through a descriptor of the very file bound, never by following the
/// path again.
fn bind_socket(path: &Path, mode: u32) -> io::Result<UnixListener> {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use nix::sys::stat::Mode;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let socket = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    nix::sys::stat::fchmod(&socket, Mode::from_bits_truncate(mode))?;
    nix::sys::socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &UnixAddr::new(path)?,
    )?;
    let bound = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let meta = bound.metadata()?;
    if !meta.file_type().is_socket() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(
            "the bound socket was replaced before its mode could be set",
        ));
    }
    if meta.mode() & 0o777 != mode {
        // An O_PATH descriptor cannot be fchmod'ed; its /proc link names exactly that file.
        let by_descriptor = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&bound));
        std::fs::set_permissions(by_descriptor, std::fs::Permissions::from_mode(mode))?;
    }
    nix::sys::socket::listen(&socket, Backlog::MAXCONN)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_private_socket_is_for_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin").join("admin.sock");
        let listener = bind_private(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        drop(listener);
    }
}
