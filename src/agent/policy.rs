//! The agent's side of authorisation policies: the policy in force (from `policy_file` in
//! standalone mode, from the server's sync stream in server mode), and the one place decisions
//! are asked for, with the attested caller, its task and the entry turned into a Cedar request.
//!
//! Without a policy, entries alone decide (a caller that matches an entry's selectors is issued
//! its SVID; one that matches a task entry may start its tasks; a task may delegate to the
//! entries its entry lists). With a policy, anything no `permit` allows is refused: issuing
//! still needs the entry to match, starting and delegating are the policy's alone.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::attest::{CallerFacts, SelectorKind};
use crate::ca::task::TaskClaims;
use crate::clock::unix_seconds;
use crate::entry::{Activation, RegistrationEntry};
use crate::policy::{Action, Context, Decision, PolicySet, Principal, Request, Resource, Task};
use crate::spiffe::SpiffeId;

/// The policy seam: `None` while no policy is set.
pub type PolicySource = watch::Sender<Option<Arc<PolicySet>>>;

/// What a decision came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No policy is set: the entries' own rules decide.
    NoPolicy,
    /// The policy of this version allowed it.
    Allowed(u64),
    /// The policy refused it.
    Denied(Decision),
}

impl Verdict {
    /// True unless the policy refused.
    pub fn allows(&self) -> bool {
        !matches!(self, Self::Denied(_))
    }

    /// The deciding policy version; 0 without a policy.
    pub fn version(&self) -> u64 {
        match self {
            Self::NoPolicy => 0,
            Self::Allowed(version) => *version,
            Self::Denied(decision) => decision.version,
        }
    }
}

/// What a request is about, besides the caller and the entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked<'a> {
    /// The task the caller runs in (for Issue inside a task, and Delegate: the parent).
    pub task: Option<&'a TaskClaims>,
    /// The lifetime asked for.
    pub ttl: Option<Duration>,
    /// The purpose given.
    pub purpose: Option<&'a str>,
    /// 0 for a standing issue or a root task; the parent's depth plus one for a delegation.
    pub depth: u32,
}

impl<'a> Asked<'a> {
    /// What issuing `entry`'s SVID asks: for a task's entry, the task, its purpose and depth.
    pub fn issue(entry: &'a RegistrationEntry) -> Self {
        let task = entry.task.as_deref();
        Self {
            task,
            ttl: Some(entry.x509_ttl),
            purpose: task.map(|t| t.purpose.as_str()),
            depth: task.map_or(0, |t| t.chain.len().saturating_sub(1) as u32),
        }
    }
}

/// Asks the policy in force. Cheap to clone; one per agent.
#[derive(Clone)]
pub struct PolicyGate {
    /// The policy in force.
    current: watch::Receiver<Option<Arc<PolicySet>>>,
    /// The node's id (empty for a standalone agent), for `principal.node_id`.
    node_id: Arc<str>,
    /// The node's labels as the server last sent them, for `principal.node_labels`.
    node_labels: Arc<std::sync::RwLock<Arc<[String]>>>,
    /// Who was served what, for a policy change to check again.
    holders: Arc<Holders>,
}

impl PolicyGate {
    /// A gate reading the policy published on `source`, on node `node_id`.
    pub fn new(source: &PolicySource, node_id: &str) -> Self {
        Self {
            current: source.subscribe(),
            node_id: node_id.into(),
            node_labels: Arc::new(std::sync::RwLock::new(Arc::from(Vec::new()))),
            holders: Arc::default(),
        }
    }

    /// Notes that `caller` was served entry `entry_id`'s SVID (only while a policy is set: a
    /// policy set later checks the holders it finds from then on).
    pub fn note_holder(&self, entry_id: &str, caller: &CallerFacts) {
        if self.current.borrow().is_some() {
            self.holders.note(entry_id, caller);
        }
    }

    /// The entries of `entries` the policy in force refuses to some holder, with its version.
    pub fn refused_holders(&self, entries: &crate::entry::EntrySet) -> Vec<(String, u64)> {
        self.holders.refused_now(self, entries)
    }

    /// Sets the node's labels (server mode: from the sync stream).
    pub fn set_node_labels(&self, labels: Vec<String>) {
        *self.node_labels.write().unwrap_or_else(|p| p.into_inner()) = labels.into();
    }

    /// The policy in force.
    pub fn policy(&self) -> Option<Arc<PolicySet>> {
        self.current.borrow().clone()
    }

    /// A receiver that changes with the policy.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<PolicySet>>> {
        self.current.clone()
    }

    /// What the policy in force says about `caller` doing `action` on `entry`.
    pub fn decide(
        &self,
        action: Action,
        caller: &CallerFacts,
        entry: &RegistrationEntry,
        asked: Asked<'_>,
    ) -> Verdict {
        let Some(policy) = self.policy() else {
            return Verdict::NoPolicy;
        };
        let labels = self
            .node_labels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let decision = decide(
            &policy,
            &self.node_id,
            &labels,
            action,
            caller,
            entry,
            asked,
        );
        if decision.allowed {
            Verdict::Allowed(decision.version)
        } else {
            Verdict::Denied(decision)
        }
    }
}

/// Most distinct callers remembered per entry: a policy change is checked against these.
const MAX_HOLDERS: usize = 64;

/// Who has been served each entry's SVID, so that a policy change can tell whether it refuses a
/// holder (and then revoke the SVID: its holders still permitted get a fresh one at once).
#[derive(Default)]
pub struct Holders {
    by_entry: std::sync::Mutex<std::collections::HashMap<String, Vec<CallerFacts>>>,
}

impl Holders {
    /// Notes that `caller` was served entry `entry_id`'s SVID.
    pub fn note(&self, entry_id: &str, caller: &CallerFacts) {
        let mut by_entry = self.by_entry.lock().unwrap_or_else(|p| p.into_inner());
        let callers = by_entry.entry(entry_id.to_owned()).or_default();
        let same = |c: &CallerFacts| {
            (c.pid, c.uid, c.gid, &c.exe_path)
                == (caller.pid, caller.uid, caller.gid, &caller.exe_path)
        };
        if callers.iter().any(same) {
            return;
        }
        if callers.len() >= MAX_HOLDERS {
            callers.remove(0);
        }
        callers.push(caller.clone());
    }

    /// The entries of `entries` that `gate` now refuses to some remembered holder; those
    /// holders are forgotten.
    pub fn refused_now(
        &self,
        gate: &PolicyGate,
        entries: &crate::entry::EntrySet,
    ) -> Vec<(String, u64)> {
        let mut by_entry = self.by_entry.lock().unwrap_or_else(|p| p.into_inner());
        by_entry.retain(|id, _| entries.get(id).is_some());
        let mut refused = Vec::new();
        for (entry_id, callers) in by_entry.iter_mut() {
            let Some(entry) = entries.get(entry_id) else {
                continue;
            };
            let asked = Asked::issue(entry);
            let mut version = None;
            callers.retain(
                |caller| match gate.decide(Action::Issue, caller, entry, asked) {
                    Verdict::Denied(decision) => {
                        version = Some(decision.version);
                        false
                    }
                    _ => true,
                },
            );
            if let Some(version) = version {
                refused.push((entry_id.clone(), version));
            }
        }
        refused
    }
}

/// `policy`'s decision, with the request built from tessera's types.
pub fn decide(
    policy: &PolicySet,
    node_id: &str,
    node_labels: &[String],
    action: Action,
    caller: &CallerFacts,
    entry: &RegistrationEntry,
    asked: Asked<'_>,
) -> Decision {
    let selector = |kind: SelectorKind| {
        caller
            .selectors
            .iter()
            .find(|s| s.kind == kind)
            .map(|s| s.value.as_str())
    };
    let chain: Vec<SpiffeId> = asked
        .task
        .map(|t| {
            t.chain
                .iter()
                .filter_map(|l| SpiffeId::parse_workload(&l.spiffe_id).ok())
                .collect()
        })
        .unwrap_or_default();
    let task_id = asked.task.and_then(|t| {
        let own = t.chain.last()?;
        Some((t, SpiffeId::parse_workload(&own.spiffe_id).ok()?))
    });
    // A task's derived entry is asked about as the registration it was derived from.
    let registered = entry.task.as_ref().and_then(|claims| {
        let suffix = format!("/task/{}", claims.task_id);
        let id = entry.spiffe_id.as_str().strip_suffix(&suffix)?;
        Some((claims.entry_id.as_str(), SpiffeId::parse_workload(id).ok()?))
    });
    let (entry_id, spiffe_id) = match &registered {
        Some((entry_id, spiffe_id)) => (*entry_id, spiffe_id),
        None => (entry.id.as_str(), &entry.spiffe_id),
    };
    let request = Request {
        principal: Principal {
            uid: caller.uid,
            gid: caller.gid,
            user: selector(SelectorKind::User),
            group: selector(SelectorKind::Group),
            exe: &caller.exe_path,
            sha256: caller.exe_sha256.as_deref(),
            systemd_unit: caller.systemd_unit.as_deref(),
            node_id,
            node_labels,
            task: task_id.as_ref().map(|(t, id)| Task {
                id: &t.task_id,
                entry_id: &t.entry_id,
                spiffe_id: id,
            }),
            delegation_chain: &chain,
        },
        action,
        resource: Resource {
            entry_id,
            spiffe_id,
            owner: &entry.owner,
            purpose: &entry.purpose,
            labels: &entry.labels,
            activation: match entry.activation {
                Activation::Standing => crate::policy::Activation::Standing,
                Activation::Task => crate::policy::Activation::Task,
            },
        },
        context: Context {
            time: unix_seconds(SystemTime::now()),
            requested_ttl: asked.ttl,
            requested_purpose: asked.purpose,
            delegation_depth: asked.depth,
        },
    };
    policy.decide(&request)
}
