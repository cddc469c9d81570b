//! Replacing a file so that a crash at any point leaves either the old contents or the new ones,
//! and once this returns, the new ones even after a power loss.
//!
//! The new bytes go to a temporary sibling (`<name>.tmp`), which is fsynced and renamed over the
//! file. The rename is only durable once the directory holding both names is fsynced too: until
//! then a power loss may bring back the old name, or no file at all where the temporary one was.
//! Every state file tessera replaces (keys, certificates, bundles, synced entries, the event
//! spool's cursor) goes through [`write_atomically`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The temporary sibling [`write_atomically`] writes before the rename: the file name with
/// `.tmp` added. A crash can leave it behind; the next write replaces it.
pub fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes` (created with `mode`), durably: temporary sibling written and
/// fsynced, renamed over `path`, directory fsynced.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temporary_path(path);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Fsyncs the directory holding `path`, so that a rename or a removal in it is durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

/// Fsyncs directory `dir`.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_file_with_its_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        fs::write(temporary_path(&path), b"left by a crash").unwrap();
        write_atomically(&path, b"first", 0o600).unwrap();
        write_atomically(&path, b"second", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["key.pem"]);
        assert_eq!(
            temporary_path(Path::new("state/acked")),
            Path::new("state/acked.tmp")
        );
    }

    #[test]
    fn a_directory_that_cannot_be_synced_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone").join("file");
        assert!(sync_parent(&missing).is_err());
    }
}
