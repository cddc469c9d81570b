//! User and group names for ids, cached briefly: a lookup may go through NSS to a directory
//! service and block, so the hot path uses the cache and only misses go to the blocking pool.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Group, Uid, User};

/// How long a looked-up name is trusted. A renamed user shows the old name for at most this long.
const NAME_TTL: Duration = Duration::from_secs(60);
/// The cache never holds more names than this.
const MAX_NAMES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Id {
    User(u32),
    Group(u32),
}

/// Names by id, with the instant each was looked up. Lives as long as the attestor.
#[derive(Debug, Default)]
pub struct NameCache {
    names: Mutex<HashMap<Id, (Option<String>, Instant)>>,
}

/// A lookup would have to block on NSS, and blocking was not allowed.
#[derive(Debug)]
pub struct WouldBlock;

impl NameCache {
    /// The name of user `uid`, if it has one.
    pub fn user(&self, uid: u32, may_block: bool) -> Result<Option<String>, WouldBlock> {
        self.lookup(Id::User(uid), may_block)
    }

    /// The name of group `gid`, if it has one.
    pub fn group(&self, gid: u32, may_block: bool) -> Result<Option<String>, WouldBlock> {
        self.lookup(Id::Group(gid), may_block)
    }

    fn lookup(&self, id: Id, may_block: bool) -> Result<Option<String>, WouldBlock> {
        if let Some((name, at)) = self.lock().get(&id)
            && at.elapsed() < NAME_TTL
        {
            return Ok(name.clone());
        }
        if !may_block {
            return Err(WouldBlock);
        }
        let name = match id {
            Id::User(uid) => User::from_uid(Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|u| u.name),
            Id::Group(gid) => Group::from_gid(Gid::from_raw(gid))
                .ok()
                .flatten()
                .map(|g| g.name),
        };
        let mut names = self.lock();
        if names.len() >= MAX_NAMES {
            // Make room without penalising everyone: stale names first, else any one.
            names.retain(|_, (_, at)| at.elapsed() < NAME_TTL);
            if names.len() >= MAX_NAMES
                && let Some(victim) = names.keys().next().copied()
            {
                names.remove(&victim);
            }
        }
        names.insert(id, (name.clone(), Instant::now()));
        Ok(name)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Id, (Option<String>, Instant)>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_block_hits_do_not() {
        let cache = NameCache::default();
        assert!(
            cache.user(0, false).is_err(),
            "a miss must not look up without leave to block"
        );
        assert_eq!(cache.user(0, true).unwrap().as_deref(), Some("root"));
        assert_eq!(cache.user(0, false).unwrap().as_deref(), Some("root"));
        assert_eq!(cache.group(0, true).unwrap().as_deref(), Some("root"));
        assert_eq!(cache.user(4_000_000, true).unwrap(), None);
        assert_eq!(
            cache.user(4_000_000, false).unwrap(),
            None,
            "absent names are cached too"
        );
    }
}
