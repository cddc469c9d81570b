//! Certificate files for servers that read files (nginx, PostgreSQL, HAProxy): a directory of
//! PEM files kept current, and a command run after each complete write. Used by `tessera svid
//! watch --out` (a workload writing its own SVID) and by the agent's `[[output]]` blocks
//! ([`keep`]: the agent writing an entry's SVID for a service it is configured for).
//!
//! Each update is written whole into a fresh directory `DIR/..<ms>-<n>`, which then becomes
//! current by one atomic rename of the symlink `DIR/..data`; `svid.pem`, `svid_key.pem`,
//! `bundle.pem` and `crl.pem` in DIR are symlinks through `..data`. Whoever opens a file after
//! a swap reads the new update and whoever opened it before reads the old one; a reader that
//! opens the certificate and the key on either side of a swap gets two updates, so one that
//! must be exact resolves `..data` once and reads both under it (the command runs only after a
//! complete write). A write that fails before the swap leaves `..data` where it was, so the
//! previous files stay in place.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::unistd::{Gid, Group, Uid, User};

use super::cache::IdentityCache;
use crate::entry::Activation;
use crate::proto::workload::X509svidResponse;
use crate::spiffe::SpiffeId;

/// The files of one update, by name, with whether each is the private key.
const FILES: [(&str, bool); 4] = [
    ("svid.pem", false),
    ("svid_key.pem", true),
    ("bundle.pem", false),
    ("crl.pem", false),
];

/// The symlink that names the current update's directory.
const CURRENT: &str = "..data";

/// How long the command waits after a write for the next one, so that a burst of updates (a
/// rotation followed by a CRL) runs it once.
pub const DEBOUNCE: Duration = Duration::from_millis(500);

/// Why an update was not written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The identity asked for is not among those at hand.
    #[error("no SVID for {asked} (there are: {present}); the files are left as they were")]
    NotPresent {
        /// The SPIFFE ID asked for, or "this workload".
        asked: String,
        /// The SPIFFE IDs at hand, or "none".
        present: String,
    },
    /// A certificate or chain does not parse.
    #[error("malformed certificate data: {0}")]
    Malformed(String),
    /// Writing failed.
    #[error("cannot write the files in {dir}: {source}; {left}")]
    Write {
        /// The output directory.
        dir: String,
        /// The system's error.
        source: std::io::Error,
        /// What the directory holds now.
        left: &'static str,
    },
}

/// Modes and ownership of the written files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Mode of svid.pem, bundle.pem and crl.pem.
    pub cert_mode: u32,
    /// Mode of svid_key.pem.
    pub key_mode: u32,
    /// Owner to give the files; `None` keeps the writer's.
    pub owner: Option<Uid>,
    /// Group to give the files; `None` keeps the writer's.
    pub group: Option<Gid>,
}

impl Default for FileOptions {
    fn default() -> Self {
        Self {
            cert_mode: 0o644,
            key_mode: 0o600,
            owner: None,
            group: None,
        }
    }
}

/// One `[[output]]` block: the SVID of the entry with `spiffe_id`, kept in `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The standing entry whose SVID is written.
    pub spiffe_id: SpiffeId,
    /// Where.
    pub dir: PathBuf,
    /// Run with `sh -c` after each complete write.
    pub exec: Option<String>,
    /// Modes and ownership.
    pub files: FileOptions,
}

/// Where and how the files are written.
#[derive(Debug, Clone)]
pub struct OutDir {
    dir: PathBuf,
    files: FileOptions,
    /// Counts updates written by this process, so that two in one millisecond differ.
    written: u64,
}

impl OutDir {
    /// A writer into `dir`.
    pub fn new(dir: PathBuf, files: FileOptions) -> Self {
        Self {
            dir,
            files,
            written: 0,
        }
    }

    /// Writes the SVID `spiffe_id` names (the default, first one, when `None`) from `response`,
    /// with its bundle and every CRL, and makes it current. Returns the SPIFFE ID written.
    pub fn write(
        &mut self,
        response: &X509svidResponse,
        spiffe_id: Option<&str>,
    ) -> Result<String, OutputError> {
        let svid = match spiffe_id {
            None => response.svids.first(),
            Some(id) => response.svids.iter().find(|s| s.spiffe_id == id),
        }
        .ok_or_else(|| {
            let present: Vec<&str> = response
                .svids
                .iter()
                .map(|s| s.spiffe_id.as_str())
                .collect();
            OutputError::NotPresent {
                asked: spiffe_id.unwrap_or("this workload").to_owned(),
                present: if present.is_empty() {
                    "none".to_owned()
                } else {
                    present.join(", ")
                },
            }
        })?;
        let chain = split_der(&svid.x509_svid)?;
        let bundle = split_der(&svid.bundle)?;
        let certificate = crate::ca::to_pem("CERTIFICATE", &chain);
        let key = zeroize::Zeroizing::new(crate::ca::to_pem("PRIVATE KEY", &[&svid.x509_svid_key]));
        let bundle = crate::ca::to_pem("CERTIFICATE", &bundle);
        // Every CRL the agent sent (an empty file when none), for `ssl_crl` and `-CRLfile`.
        let crls = crate::ca::to_pem("X509 CRL", &response.crl);
        self.written += 1;
        let millis = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let version = format!("..{millis}-{}", self.written);
        let failed = |source: std::io::Error, left: &'static str| OutputError::Write {
            dir: self.dir.display().to_string(),
            source,
            left,
        };
        let staged = self.stage(&version, |name| match name {
            "svid.pem" => certificate.as_bytes(),
            "svid_key.pem" => key.as_bytes(),
            "bundle.pem" => bundle.as_bytes(),
            _ => crls.as_bytes(),
        });
        if let Err(e) = staged.and_then(|()| self.swap_in(&version)) {
            let _ = fs::remove_dir_all(self.dir.join(&version));
            return Err(failed(e, "the previous files are left as they were"));
        }
        // From here the new set is current: a failure leaves it so, and says what is missing.
        self.link_names()
            .map_err(|e| failed(e, "the new files are in DIR/..data"))?;
        self.remove_earlier(&version);
        Ok(svid.spiffe_id.clone())
    }

    /// Writes the files of one update into `DIR/<version>`, each with its mode and owner, and
    /// makes them durable.
    fn stage<'a>(&self, version: &str, contents: impl Fn(&str) -> &'a [u8]) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let staged = self.dir.join(version);
        fs::create_dir(&staged)?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))?;
        for (name, is_key) in FILES {
            let mode = if is_key {
                self.files.key_mode
            } else {
                self.files.cert_mode
            };
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(staged.join(name))?;
            file.write_all(contents(name))?;
            // Exactly the mode asked for, whatever the umask.
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            if self.files.owner.is_some() || self.files.group.is_some() {
                nix::unistd::fchown(&file, self.files.owner, self.files.group)?;
            }
            file.sync_all()?;
        }
        crate::durable::sync_dir(&staged)
    }

    /// Makes `DIR/<version>` current: one rename replaces the symlink `..data`.
    fn swap_in(&self, version: &str) -> std::io::Result<()> {
        let next = self.dir.join("..data.next");
        remove_if_present(&next)?;
        symlink(version, &next)?;
        fs::rename(&next, self.dir.join(CURRENT))
    }

    /// The names readers open, each a symlink through `..data`: made once (or over the plain
    /// files an earlier `svid fetch --out` wrote), each by a rename too.
    fn link_names(&self) -> std::io::Result<()> {
        for (name, _) in FILES {
            let path = self.dir.join(name);
            let through = Path::new(CURRENT).join(name);
            if fs::read_link(&path).is_ok_and(|target| target == through) {
                continue;
            }
            let link = self.dir.join(format!(".{name}.next"));
            remove_if_present(&link)?;
            symlink(&through, &link)?;
            fs::rename(&link, &path)?;
        }
        crate::durable::sync_dir(&self.dir)
    }

    /// Removes earlier updates' directories, no longer named by `..data`. Best effort: one
    /// left behind is removed after the next update.
    fn remove_earlier(&self, current: &str) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if is_version_dir(&name) && name != current {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// `..<digits>-<digits>`: a directory this writer made.
fn is_version_dir(name: &str) -> bool {
    name.strip_prefix("..")
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(ms, n)| {
            !ms.is_empty()
                && !n.is_empty()
                && ms.bytes().all(|b| b.is_ascii_digit())
                && n.bytes().all(|b| b.is_ascii_digit())
        })
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// An octal file mode such as `0640`; the error says what would be right.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| "not a file mode; give octal permission bits such as 0600 or 0644".into())
}

/// A user name or numeric uid.
pub fn parse_owner(text: &str) -> Result<Uid, String> {
    if let Ok(uid) = text.parse::<u32>() {
        return Ok(Uid::from_raw(uid));
    }
    match User::from_name(text) {
        Ok(Some(user)) => Ok(user.uid),
        _ => Err("no such user; give a user name or a numeric uid".into()),
    }
}

/// A group name or numeric gid.
pub fn parse_group(text: &str) -> Result<Gid, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(Gid::from_raw(gid));
    }
    match Group::from_name(text) {
        Ok(Some(group)) => Ok(group.gid),
        _ => Err("no such group; give a group name or a numeric gid".into()),
    }
}

/// Splits concatenated DER certificates.
fn split_der(bytes: &[u8]) -> Result<Vec<&[u8]>, OutputError> {
    crate::ca::split_der_certificates(bytes).map_err(OutputError::Malformed)
}

/// Runs `command` with `sh -c`, waits for it (on the blocking pool) and says how it ended.
pub async fn run_hook(command: &str) -> String {
    let shell_command = command.to_owned();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(shell_command)
            .stdin(std::process::Stdio::null())
            .status()
    })
    .await;
    match status {
        Ok(Ok(status)) if status.success() => format!("ran {command:?}: exit status 0"),
        Ok(Ok(status)) => format!("ran {command:?}: {status}"),
        Ok(Err(e)) => format!("could not run {command:?}: {e}"),
        Err(e) => format!("could not run {command:?}: {e}"),
    }
}

/// Keeps `output`'s directory current with the SVID of its entry, served from `cache` (whose
/// rotation renews it, as for a stream), until `shutdown`. The entry must be a standing one of
/// the agent's current set; while there is none, the files are left as they are.
pub async fn keep(
    cache: Arc<IdentityCache>,
    output: Output,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut generations = cache.subscribe();
    let mut lease = cache.lease();
    let rotations = lease.waker();
    let mut out = OutDir::new(output.dir.clone(), output.files);
    let dir = output.dir.display().to_string();
    // What was last written (the whole message), and whether a missing entry was reported.
    let (mut written, mut missing_said) = (None::<X509svidResponse>, false);
    let mut hook_due: Option<tokio::time::Instant> = None;
    loop {
        let entries = cache.entries();
        let entry = entries
            .entries
            .iter()
            .find(|e| e.spiffe_id == output.spiffe_id && e.activation == Activation::Standing)
            .cloned();
        match entry {
            None if !missing_said => {
                tracing::warn!(spiffe_id = %output.spiffe_id, dir, "[[output]]: no standing entry with this SPIFFE ID; the files are left as they are");
                missing_said = true;
            }
            None => {}
            Some(entry) => {
                missing_said = false;
                match cache.acquire(&entries, &[entry], &mut lease, None) {
                    // The entries changed meanwhile: look again.
                    Ok(None) => continue,
                    Ok(Some(identities)) => {
                        let response = super::workload::svid_response(&identities);
                        if written.as_ref() != Some(&response) {
                            // Writing fsyncs: off the async workers.
                            let (mut writer, id, message) =
                                (out.clone(), output.spiffe_id.to_string(), response.clone());
                            let Ok((result, writer)) = tokio::task::spawn_blocking(move || {
                                let result = writer.write(&message, Some(&id));
                                (result, writer)
                            })
                            .await
                            else {
                                return;
                            };
                            out = writer;
                            match result {
                                Ok(_) => {
                                    tracing::info!(spiffe_id = %output.spiffe_id, dir, "[[output]]: wrote the certificate files");
                                    written = Some(response);
                                    if output.exec.is_some() {
                                        hook_due = Some(tokio::time::Instant::now() + DEBOUNCE);
                                    }
                                }
                                Err(e) => {
                                    tracing::error!(spiffe_id = %output.spiffe_id, error = %e, "[[output]]")
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(spiffe_id = %output.spiffe_id, error = %e, "[[output]]: cannot issue the SVID");
                    }
                }
            }
        }
        let hook_wait = async {
            match hook_due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = generations.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = rotations.notified() => {}
            () = hook_wait => {
                hook_due = None;
                if let Some(command) = &output.exec {
                    let said = run_hook(command).await;
                    tracing::info!(dir, "[[output]]: {said}");
                }
            }
            () = &mut shutdown => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_owners_and_version_names_parse_or_are_refused_with_what_is_right() {
        assert_eq!(parse_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_mode("640").unwrap(), 0o640);
        for bad in ["0800", "rw", "01777", ""] {
            assert!(
                parse_mode(bad).unwrap_err().contains("such as 0600"),
                "{bad}"
            );
        }
        assert_eq!(parse_owner("0").unwrap(), Uid::from_raw(0));
        assert_eq!(parse_owner("root").unwrap(), Uid::from_raw(0));
        assert!(
            parse_owner("no-such-user-here")
                .unwrap_err()
                .contains("no such user")
        );
        assert!(
            parse_group("no-such-group-here")
                .unwrap_err()
                .contains("no such group")
        );
        assert!(is_version_dir("..1764650000000-3"));
        for not in [
            "..data",
            "..data.next",
            "..-1",
            "..12-",
            "svid.pem",
            ".12-3",
        ] {
            assert!(!is_version_dir(not), "{not}");
        }
    }
}
