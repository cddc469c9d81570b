//! A signing key kept in a file: PKCS#8 PEM, mode 0600, made once and then reused, so that a
//! restart never adds a key to the bundle.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::JwtKey;

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The key file exists but could not be read.
    #[error("cannot read the JWT signing key {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file does not hold a PKCS#8 P-256 key.
    #[error("{}: {reason}; move it away to have a new key made", path.display())]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A new key could not be made or saved.
    #[error("cannot save a JWT signing key to {}: {reason}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The key in `path`, or `None` when there is no such file.
pub fn load_key(path: &Path) -> Result<Option<JwtKey>, KeyFileError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => Zeroizing::new(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(KeyFileError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let invalid = |reason: String| KeyFileError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let block = pem::parse(&*bytes).map_err(|e| invalid(format!("not PEM: {e}")))?;
    if block.tag() != "PRIVATE KEY" {
        return Err(invalid(format!(
            "holds a {:?} block, not a PRIVATE KEY (PKCS#8)",
            block.tag()
        )));
    }
    JwtKey::from_pkcs8(block.contents())
        .map(Some)
        .map_err(|e| invalid(e.to_string()))
}

/// Writes `key` to `path` (0600), replacing it atomically.
pub fn save_key(path: &Path, key: &JwtKey) -> Result<(), KeyFileError> {
    let write = |reason: String| KeyFileError::Write {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| write(e.to_string()))?;
    }
    let pem = Zeroizing::new(pem::encode(&pem::Pem::new("PRIVATE KEY", key.pkcs8())));
    crate::durable::write_atomically(path, pem.as_bytes(), 0o600).map_err(|e| write(e.to_string()))
}

/// The key in `path`, made and saved there first when there is none.
pub fn load_or_create_key(path: &Path) -> Result<JwtKey, KeyFileError> {
    if let Some(key) = load_key(path)? {
        return Ok(key);
    }
    let key = JwtKey::generate().map_err(|e| KeyFileError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    save_key(path, &key)?;
    tracing::info!(kid = key.kid(), file = %path.display(), "made a JWT signing key");
    Ok(key)
}
