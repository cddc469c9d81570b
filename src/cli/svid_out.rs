//! `svid watch --out DIR`: a directory of PEM files kept current for servers that read files
//! (nginx, PostgreSQL, HAProxy), and a command run after each complete write.
//!
//! Each update is written whole into a fresh directory `DIR/..<ms>-<n>`, which then becomes
//! current by one atomic rename of the symlink `DIR/..data`; `svid.pem`, `svid_key.pem`,
//! `bundle.pem` and `crl.pem` in DIR are symlinks through `..data`. Whoever opens the files
//! after a swap sees the new set, whoever opened them before sees the old one, and no one sees a
//! certificate beside a key from another update. A write that fails leaves `..data` where it
//! was, so the previous files stay in place.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::unistd::{Gid, Group, Uid, User};

use super::Failure;
use crate::proto::workload::X509svidResponse;

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
pub(super) const DEBOUNCE: Duration = Duration::from_millis(500);

/// Where and how the files are written.
#[derive(Debug, Clone)]
pub(super) struct OutDir {
    dir: PathBuf,
    cert_mode: u32,
    key_mode: u32,
    owner: Option<Uid>,
    group: Option<Gid>,
    /// Counts updates written by this process, so that two in one millisecond differ.
    written: u64,
}

impl OutDir {
    /// Checks the options; errors are usage errors naming the bad value.
    pub(super) fn new(
        dir: PathBuf,
        cert_mode: &str,
        key_mode: &str,
        owner: Option<&str>,
        group: Option<&str>,
    ) -> Result<Self, Failure> {
        Ok(Self {
            dir,
            cert_mode: parse_mode("--cert-mode", cert_mode)?,
            key_mode: parse_mode("--key-mode", key_mode)?,
            owner: owner.map(parse_owner).transpose()?,
            group: group.map(parse_group).transpose()?,
            written: 0,
        })
    }

    /// Writes the SVID `spiffe_id` names (the default, first one, when `None`) from `response`,
    /// with its bundle and every CRL, and makes it current. Returns the SPIFFE ID written.
    pub(super) fn write(
        &mut self,
        response: &X509svidResponse,
        spiffe_id: Option<&str>,
    ) -> Result<String, Failure> {
        let svid = match spiffe_id {
            None => response.svids.first(),
            Some(id) => response.svids.iter().find(|s| s.spiffe_id == id),
        }
        .ok_or_else(|| {
            let sent: Vec<&str> = response.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
            Failure::failed(format!(
                "the Workload API sent no SVID for {} (it sent: {}); the files are left as they were",
                spiffe_id.unwrap_or("this workload"),
                if sent.is_empty() { "none".to_owned() } else { sent.join(", ") }
            ))
        })?;
        let chain = super::svid::split_der(&svid.x509_svid)?;
        let bundle = super::svid::split_der(&svid.bundle)?;
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
        let failed = |e: std::io::Error, left: &str| {
            Failure::failed(format!(
                "cannot write the files in {}: {e}; {left}",
                self.dir.display()
            ))
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
                self.key_mode
            } else {
                self.cert_mode
            };
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(staged.join(name))?;
            file.write_all(contents(name))?;
            // Exactly the mode asked for, whatever the umask.
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            if self.owner.is_some() || self.group.is_some() {
                nix::unistd::fchown(&file, self.owner, self.group)?;
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

/// An octal file mode such as `0640`.
fn parse_mode(option: &str, text: &str) -> Result<u32, Failure> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| {
            Failure::usage(format!(
                "{option} {text}: not a file mode; give octal permission bits such as 0600 or 0644"
            ))
        })
}

fn parse_owner(text: &str) -> Result<Uid, Failure> {
    if let Ok(uid) = text.parse::<u32>() {
        return Ok(Uid::from_raw(uid));
    }
    match User::from_name(text) {
        Ok(Some(user)) => Ok(user.uid),
        _ => Err(Failure::usage(format!(
            "--owner {text}: no such user; give a user name or a numeric uid"
        ))),
    }
}

fn parse_group(text: &str) -> Result<Gid, Failure> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(Gid::from_raw(gid));
    }
    match Group::from_name(text) {
        Ok(Some(group)) => Ok(group.gid),
        _ => Err(Failure::usage(format!(
            "--group {text}: no such group; give a group name or a numeric gid"
        ))),
    }
}

/// Runs `command` with `sh -c`, waits for it (on the blocking pool) and says how it ended.
pub(super) async fn run_hook(command: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_owners_and_version_names_parse_or_are_refused_by_name() {
        assert_eq!(parse_mode("--key-mode", "0600").unwrap(), 0o600);
        assert_eq!(parse_mode("--key-mode", "640").unwrap(), 0o640);
        for bad in ["0800", "rw", "01777", ""] {
            let failure = parse_mode("--key-mode", bad).unwrap_err();
            assert_eq!(failure.code, 2);
            assert!(
                failure.message.contains(&format!("--key-mode {bad}:")),
                "{}",
                failure.message
            );
        }
        assert_eq!(parse_owner("0").unwrap(), Uid::from_raw(0));
        assert_eq!(parse_owner("root").unwrap(), Uid::from_raw(0));
        let failure = parse_owner("no-such-user-here").unwrap_err();
        assert!(
            failure
                .message
                .contains("--owner no-such-user-here: no such user")
        );
        assert!(parse_group("no-such-group-here").is_err());
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
