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
/// replacing a stale socket, never another kind of file.
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
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| BindError::Bind {
                path: shown(),
                source,
            })?;
        }
        Ok(_) => return Err(BindError::NotASocket { path: shown() }),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| BindError::Bind {
        path: shown(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode)).map_err(
        |source| BindError::Bind {
            path: shown(),
            source,
        },
    )?;
    Ok(listener)
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
