//! The standalone entry source: entries come from the agent's configuration file and are
//! reloaded on SIGHUP and whenever the file changes, without a restart. A file that no longer
//! parses is reported and the last good entries stay in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::config::AgentConfig;
use crate::entry::EntrySet;
use crate::spiffe::TrustDomain;

/// How often the file's metadata is checked for a change.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies one version of the file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// What the watcher has refused, so that a caller can tell "kept the last good entries" from
/// "has not looked at the file yet".
#[derive(Debug, Default)]
pub struct ReloadCounts {
    refused: AtomicU64,
}

impl ReloadCounts {
    /// How many reloads were refused (a file that does not parse, or another trust domain).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Acquire)
    }
}

/// Watches `file` and publishes its entries on `entries` until `shutdown` resolves.
pub async fn watch_config_file(
    file: PathBuf,
    trust_domain: TrustDomain,
    entries: watch::Sender<Arc<EntrySet>>,
    counts: Arc<ReloadCounts>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file change only");
            None
        }
    };
    let mut last = stamp(&file);
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    loop {
        let reason = tokio::select! {
            _ = &mut shutdown => return,
            _ = async { match hangup.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => "SIGHUP",
            _ = ticker.tick() => {
                let now = stamp(&file);
                if now == last {
                    tracing::debug!(file = %file.display(), "entry file unchanged");
                    continue;
                }
                last = now;
                "file change"
            }
        };
        if !reload(&file, &trust_domain, &entries, reason) {
            counts.refused.fetch_add(1, Ordering::AcqRel);
        }
    }
}

fn reload(
    file: &Path,
    trust_domain: &TrustDomain,
    entries: &watch::Sender<Arc<EntrySet>>,
    reason: &str,
) -> bool {
    match AgentConfig::load(file) {
        Ok(config) if config.trust_domain != *trust_domain => {
            tracing::error!(
                file = %file.display(),
                found = %config.trust_domain,
                serving = %trust_domain,
                "trust_domain changed; restart the agent to change it. Keeping the last good entries"
            );
            false
        }
        Ok(config) => {
            let count = config.entries.entries.len();
            let changed = entries.send_if_modified(|current| {
                if **current == config.entries {
                    return false;
                }
                *current = Arc::new(config.entries);
                true
            });
            tracing::info!(file = %file.display(), reason, entries = count, changed, "reloaded registration entries");
            true
        }
        Err(e) => {
            tracing::error!(reason, error = %e, "cannot reload entries; keeping the last good ones");
            false
        }
    }
}
