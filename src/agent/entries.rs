//! The standalone entry source: entries come from the agent's configuration file and are
//! reloaded on SIGHUP and whenever the file changes, without a restart; so is the policy of its
//! `policy_file`. A file that no longer parses is reported and the last good entries (and
//! policy) stay in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::config::AgentConfig;
use super::policy::PolicySource;
use crate::entry::EntrySet;
use crate::policy::PolicySet;
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

/// Watches `file` (and the policy file it names) and publishes its entries on `entries` and
/// its policy on `policy` until `shutdown` resolves.
pub async fn watch_config_file(
    file: PathBuf,
    trust_domain: TrustDomain,
    entries: watch::Sender<Arc<EntrySet>>,
    policy: PolicySource,
    mut policy_path: Option<PathBuf>,
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
    let stamps =
        |policy_path: &Option<PathBuf>| (stamp(&file), policy_path.as_deref().and_then(stamp));
    let mut last = stamps(&policy_path);
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    loop {
        let reason = tokio::select! {
            _ = &mut shutdown => return,
            _ = async { match hangup.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => "SIGHUP",
            _ = ticker.tick() => {
                if stamps(&policy_path) == last {
                    tracing::debug!(file = %file.display(), "entry file unchanged");
                    continue;
                }
                "file change"
            }
        };
        // The policy file the configuration now names is watched from here on.
        match reload(&file, &trust_domain, &entries, &policy, reason) {
            Some(path) => policy_path = path,
            None => {
                counts.refused.fetch_add(1, Ordering::AcqRel);
            }
        }
        last = stamps(&policy_path);
    }
}

fn reload(
    file: &Path,
    trust_domain: &TrustDomain,
    entries: &watch::Sender<Arc<EntrySet>>,
    policy: &PolicySource,
    reason: &str,
) -> Option<Option<PathBuf>> {
    match AgentConfig::load(file) {
        Ok(config) if config.trust_domain != *trust_domain => {
            tracing::error!(
                file = %file.display(),
                found = %config.trust_domain,
                serving = %trust_domain,
                "trust_domain changed; restart the agent to change it. Keeping the last good entries"
            );
            None
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
            publish_policy(policy, config.policy);
            Some(config.policy_file)
        }
        Err(e) => {
            tracing::error!(reason, error = %e, "cannot reload entries and policy; keeping the last good ones");
            None
        }
    }
}

/// Publishes `loaded` (read as version 1) as the next version when its text differs from the
/// policy in force; `None` removes the policy (entries alone decide).
fn publish_policy(policy: &PolicySource, loaded: Option<Arc<PolicySet>>) {
    let current = policy.borrow().clone();
    let next = match (loaded, current) {
        (None, None) => return,
        (Some(new), Some(old)) if new.text() == old.text() => return,
        (None, Some(_)) => None,
        (Some(new), old) => {
            let version = old.map_or(0, |o| o.version()) + 1;
            match PolicySet::parse(new.text(), version, "policy_file") {
                Ok(set) => Some(Arc::new(set)),
                // It parsed a moment ago as version 1; the version does not change what parses.
                Err(e) => {
                    tracing::error!(error = %e, "cannot load the policy; keeping the last good one");
                    return;
                }
            }
        }
    };
    tracing::info!(
        version = next.as_ref().map_or(0, |p| p.version()),
        "policy reloaded"
    );
    policy.send_replace(next);
}
