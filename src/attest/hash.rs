//! SHA-256 of executables, cached by (device, inode, size, mtime, ctime) so that a process
//! started from an unchanged binary costs one fstat, not a read of the whole file. The ctime is
//! part of the key because a file's owner can reset its mtime after rewriting it; nobody can set
//! the ctime.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, OnceLock};

/// The cache never holds more digests than this; when full it starts over.
const MAX_CACHED: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
    ctime_sec: i64,
    ctime_nsec: i64,
}

/// Why an executable could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The file is larger than the configured limit.
    #[error("{size} bytes is over the limit of {limit}")]
    TooLarge {
        /// The file's size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Reading the file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A hash being computed; every caller that wants the same file waits for the one result, its
/// error included (shared, since an `io::Error` cannot be cloned).
type InFlight = Arc<OnceLock<Result<String, Arc<std::io::Error>>>>;

/// Executable digests, shared by every attestation.
#[derive(Debug)]
pub struct ExeHashCache {
    /// Files above this size are refused.
    size_limit: u64,
    /// Digests by file identity; lives as long as the agent, bounded by `MAX_CACHED`.
    digests: Mutex<HashMap<FileKey, String>>,
    /// Hashes under way, so that many processes started from one new binary read it once.
    in_flight: Mutex<HashMap<FileKey, InFlight>>,
}

impl ExeHashCache {
    /// An empty cache refusing files over `size_limit` bytes.
    pub fn new(size_limit: u64) -> Self {
        Self {
            size_limit,
            digests: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    fn key_of(&self, exe: &File) -> Result<FileKey, HashError> {
        let meta = exe.metadata()?;
        if meta.len() > self.size_limit {
            return Err(HashError::TooLarge {
                size: meta.len(),
                limit: self.size_limit,
            });
        }
        Ok(FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime_sec: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        })
    }

    /// The lowercase hex SHA-256 of the open file `exe`.
    pub fn digest(&self, exe: File) -> Result<String, HashError> {
        let key = self.key_of(&exe)?;
        if let Some(hit) = self.lock().get(&key) {
            return Ok(hit.clone());
        }
        let cell = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        // One caller hashes; the others block here until its result is in.
        let result = cell
            .get_or_init(|| hash_file(exe).map_err(Arc::new))
            .clone();
        // Cache the digest before retiring the in-flight marker, so that no caller arriving in
        // between finds neither and hashes the file again.
        if let Ok(digest) = &result {
            let mut digests = self.lock();
            if digests.len() >= MAX_CACHED {
                digests.clear();
            }
            digests.insert(key, digest.clone());
        }
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        // The kind stays what the read said (a denied read is still PermissionDenied), and the
        // error itself stays reachable underneath.
        result.map_err(|e| HashError::Io(std::io::Error::new(e.kind(), e)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, String>> {
        // A panic while holding the lock cannot leave the map inconsistent: use it anyway.
        self.digests.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn hash_file(mut exe: File) -> std::io::Result<String> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = exe.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn digests_match_sha256sum_and_are_cached_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, b"hello\n").unwrap();
        let cache = ExeHashCache::new(1024);
        let d = cache.digest(File::open(&path).unwrap()).unwrap();
        assert_eq!(
            d,
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        assert_eq!(cache.lock().len(), 1);

        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"more").unwrap();
        drop(f);
        let d2 = cache.digest(File::open(&path).unwrap()).unwrap();
        assert_ne!(d, d2);
        assert_eq!(cache.lock().len(), 2);
    }

    #[test]
    fn concurrent_callers_share_one_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, vec![7u8; 8 << 20]).unwrap();
        let cache = Arc::new(ExeHashCache::new(u64::MAX));
        let digests: Vec<String> = (0..8)
            .map(|_| {
                let (cache, path) = (cache.clone(), path.clone());
                std::thread::spawn(move || cache.digest(File::open(path).unwrap()).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(digests.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(cache.lock().len(), 1);
        assert!(cache.in_flight.lock().unwrap().is_empty());
    }

    #[test]
    fn a_failed_read_keeps_its_kind_and_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory opens, but reading it fails with EISDIR.
        let cache = ExeHashCache::new(u64::MAX);
        match cache.digest(File::open(dir.path()).unwrap()) {
            Err(HashError::Io(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::IsADirectory);
                let inner = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<Arc<std::io::Error>>());
                assert_eq!(inner.and_then(|i| i.raw_os_error()), Some(libc::EISDIR));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_files_over_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![0u8; 2048]).unwrap();
        let err = ExeHashCache::new(1024)
            .digest(File::open(&path).unwrap())
            .unwrap_err();
        assert!(matches!(
            err,
            HashError::TooLarge {
                size: 2048,
                limit: 1024
            }
        ));
    }
}
