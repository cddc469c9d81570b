//! Authorisation policies in Cedar: may this workload be issued this entry's SVID, start a task
//! under it, or delegate it to a sub-agent?
//!
//! A [`PolicySet`] is parsed and validated once, against tessera's [`SCHEMA`], when it is
//! loaded; [`PolicySet::decide`] then answers one [`Request`] at a time without parsing
//! anything, and remembers its answers for actions whose policies never read `context.time`
//! (module `memo`). The semantics are Cedar's: a request is allowed only if some `permit` matches and
//! no `forbid` does, so an empty set (or one of comments only) denies everything. Whether "no
//! policy set at all" means "entries alone decide" is the caller's choice, not this module's.
//!
//! Policies are named by an `@id("...")` annotation; one without it keeps Cedar's default id,
//! `policy<N>` for the N-th policy of the text (from 0). Those ids are what a [`Decision`]
//! reports.
//!
//! One difference from Cedar's defaults: a policy that fails to evaluate (which strict
//! validation makes rare: an integer overflow, say) denies the request, even if it is a
//! `forbid`, rather than being skipped. An authorisation check that cannot be completed fails
//! closed.

mod guard;
mod memo;
mod schema;
mod text;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use cedar_policy::{
    ActionConstraint, Authorizer, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

use crate::spiffe::SpiffeId;
use guard::Guard;

pub use schema::SCHEMA;

/// What the caller wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Be issued an X.509-SVID for the entry (standing or for a task).
    Issue,
    /// Start a task under the entry.
    StartTask,
    /// Hand the current task on to a sub-agent.
    Delegate,
}

impl Action {
    const ALL: [Action; 3] = [Action::Issue, Action::StartTask, Action::Delegate];

    /// The action's place in `ALL`.
    fn index(self) -> usize {
        match self {
            Action::Issue => 0,
            Action::StartTask => 1,
            Action::Delegate => 2,
        }
    }

    /// The action's name in policies: `Tessera::Action::"<name>"`.
    pub fn name(self) -> &'static str {
        match self {
            Action::Issue => "Issue",
            Action::StartTask => "StartTask",
            Action::Delegate => "Delegate",
        }
    }
}

/// How an entry's identity comes to life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// Issued whenever a matching workload asks (`"standing"` in policies).
    Standing,
    /// Issued only inside a task started under the entry (`"task"` in policies).
    Task,
}

impl Activation {
    /// The value of `resource.activation` in policies.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Standing => "standing",
            Activation::Task => "task",
        }
    }
}

/// The task a workload runs in.
#[derive(Debug, Clone, Copy)]
pub struct Task<'a> {
    /// The task's id.
    pub id: &'a str,
    /// The entry the task was started under.
    pub entry_id: &'a str,
    /// The SPIFFE ID the task acts as.
    pub spiffe_id: &'a SpiffeId,
}

/// The attested workload asking.
#[derive(Debug, Clone, Copy)]
pub struct Principal<'a> {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// The uid's user name, when the name service knows it.
    pub user: Option<&'a str>,
    /// The gid's group name, when the name service knows it.
    pub group: Option<&'a str>,
    /// Path of the executable.
    pub exe: &'a str,
    /// The executable's SHA-256, lowercase hex, when it was computed.
    pub sha256: Option<&'a str>,
    /// The systemd unit the process runs in.
    pub systemd_unit: Option<&'a str>,
    /// The node the agent runs on.
    pub node_id: &'a str,
    /// The node's labels, e.g. `env:prod`.
    pub node_labels: &'a [String],
    /// The task the workload runs in, if any.
    pub task: Option<Task<'a>>,
    /// SPIFFE IDs of the tasks from the root task down to the current one; empty outside a task.
    pub delegation_chain: &'a [SpiffeId],
}

/// The registration entry the request is about.
#[derive(Debug, Clone, Copy)]
pub struct Resource<'a> {
    /// The entry's id.
    pub entry_id: &'a str,
    /// The SPIFFE ID the entry grants.
    pub spiffe_id: &'a SpiffeId,
    /// Who owns the entry.
    pub owner: &'a str,
    /// What the entry is for.
    pub purpose: &'a str,
    /// The entry's labels, `key:value`.
    pub labels: &'a [String],
    /// Standing or task.
    pub activation: Activation,
}

/// The circumstances of the request.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Now, in Unix seconds.
    pub time: i64,
    /// The lifetime asked for (tasks only).
    pub requested_ttl: Option<Duration>,
    /// The purpose the caller gave.
    pub requested_purpose: Option<&'a str>,
    /// 0 for a standing issue or a root task; the parent's depth plus one for a delegation.
    pub delegation_depth: u32,
}

/// One authorisation question.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Who asks.
    pub principal: Principal<'a>,
    /// For what.
    pub action: Action,
    /// About which entry.
    pub resource: Resource<'a>,
    /// In what circumstances.
    pub context: Context<'a>,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// The version of the policy set that decided.
    pub version: u64,
    /// Ids of the policies that decided, sorted: the permits that allowed, or the forbids that
    /// denied. Empty when nothing matched (default deny) or when an error denied.
    pub determining: Vec<String>,
    /// Evaluation errors, each naming its policy, sorted. Any error denies.
    pub errors: Vec<String>,
}

/// Where in a policy text something is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, or e.g. "policy version 7".
    pub source_name: String,
    /// 1-based line and column (in characters), when Cedar said where.
    pub position: Option<(usize, usize)>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "{}:{line}:{column}", self.source_name),
            None => f.write_str(&self.source_name),
        }
    }
}

/// Why a policy text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The text is not Cedar.
    #[error("{at}: {message}{}", and_more(*.more))]
    Parse {
        /// Where the first error is.
        at: Location,
        /// Cedar's message, with its hint if it gave one.
        message: String,
        /// How many further errors Cedar found.
        more: usize,
    },
    /// A policy is Cedar but does not hold to tessera's schema.
    #[error("{at}: {message}{}", and_more(*.more))]
    Invalid {
        /// Where the first error is.
        at: Location,
        /// The id of the policy at fault.
        policy: String,
        /// Cedar's message (which names the policy), with its hint if it gave one.
        message: String,
        /// How many further errors the validator found.
        more: usize,
    },
    /// Two policies have the same id.
    #[error("{at}: @id({id:?}) is already the id of {other}")]
    DuplicateId {
        /// The id.
        id: String,
        /// The second policy's `@id`.
        at: Location,
        /// The first policy with that id: where it is, or which one by default id.
        other: String,
    },
    /// An `@id` annotation is empty.
    #[error("{at}: @id(\"\") is empty; name the policy")]
    EmptyId {
        /// The annotation.
        at: Location,
    },
    /// The text holds a template (a policy with `?principal` or `?resource`), which tessera has
    /// nothing to link.
    #[error(
        "{source_name}: policy {id} is a template (?principal or ?resource); write the entity or a condition instead"
    )]
    Template {
        /// The file, or e.g. "policy version 7".
        source_name: String,
        /// The template's id.
        id: String,
    },
}

fn and_more(more: usize) -> String {
    match more {
        0 => String::new(),
        1 => " (and 1 more error)".to_owned(),
        n => format!(" (and {n} more errors)"),
    }
}

/// Parsed once: the schema, the names requests are built from, and the authoriser.
struct Fixed {
    schema: Schema,
    entry: EntityTypeName,
    caller: EntityUid,
    actions: [EntityUid; 3],
    authorizer: Authorizer,
}

static FIXED: LazyLock<Fixed> = LazyLock::new(|| {
    // SCHEMA and the names below are constants of this file; the tests parse them, so a
    // failure here is a build defect, not a property of any input.
    let (schema, _warnings) =
        Schema::from_cedarschema_str(SCHEMA).expect("tessera's Cedar schema parses");
    let name = |s: &str| EntityTypeName::from_str(s).expect("a constant Cedar type name parses");
    let workload = name("Tessera::Workload");
    let action_type = name("Tessera::Action");
    let actions = Action::ALL
        .map(|a| EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(a.name())));
    Fixed {
        schema,
        caller: EntityUid::from_type_name_and_id(workload, EntityId::new("caller")),
        entry: name("Tessera::Entry"),
        actions,
        authorizer: Authorizer::new(),
    }
});

/// The policies whose scope admits one action.
#[derive(Debug, Clone, Default)]
struct ForAction {
    /// All of them, for requests that pass every guard.
    all: cedar_policy::PolicySet,
    /// Each with its guard, if it has one.
    guarded: Vec<(cedar_policy::Policy, Option<Guard>)>,
}

impl ForAction {
    /// The policies that `request` may satisfy, or the reason they cannot be gathered.
    fn for_request(
        &self,
        request: &Request<'_>,
    ) -> Result<Cow<'_, cedar_policy::PolicySet>, String> {
        let holds = |guard: &Option<Guard>| guard.as_ref().is_none_or(|g| g.holds(request));
        if self.guarded.iter().all(|(_, guard)| holds(guard)) {
            return Ok(Cow::Borrowed(&self.all));
        }
        let mut set = cedar_policy::PolicySet::new();
        for (policy, guard) in &self.guarded {
            if holds(guard) {
                set.add(policy.clone())
                    .map_err(|e| format!("gathering policy {}: {e}", policy.id()))?;
            }
        }
        Ok(Cow::Owned(set))
    }
}

/// A validated set of Cedar policies, ready to decide.
#[derive(Debug, Clone)]
pub struct PolicySet {
    /// The policies that may apply to each action, in `Action::ALL` order.
    by_action: [ForAction; 3],
    /// Per action, whether one of its policies reads `context.time`: its decisions are not
    /// remembered.
    reads_time: [bool; 3],
    /// Decisions made so far, for actions whose policies never read the time; shared by clones,
    /// which hold the same policies, and dropped with the set.
    memo: Arc<memo::Memo>,
    ids: Vec<String>,
    version: u64,
    text: String,
    digest: String,
}

impl PolicySet {
    /// Parses and validates `text` against tessera's [`SCHEMA`] (strict mode). `source_name`
    /// names the file, or e.g. "policy version 7", in errors, which give the line and column of
    /// the first problem.
    pub fn parse(text: &str, version: u64, source_name: &str) -> Result<Self, PolicyError> {
        let locate = |offset: Option<usize>| Location {
            source_name: source_name.to_owned(),
            position: offset.map(|o| text::line_column(text, o)),
        };
        let parsed = cedar_policy::PolicySet::from_str(text).map_err(|errors| {
            let mut all = errors.iter();
            let (offset, message) = all.next().map_or((None, String::new()), describe);
            PolicyError::Parse {
                at: locate(offset),
                message,
                more: all.count(),
            }
        })?;
        if let Some(template) = parsed.templates().next() {
            return Err(PolicyError::Template {
                source_name: source_name.to_owned(),
                id: template.id().to_string(),
            });
        }

        // Cedar numbers policies in text order (policy0, policy1, ...) but does not keep them
        // in that order; the @id scan below relies on it.
        let mut in_order: Vec<(usize, &cedar_policy::Policy)> = parsed
            .policies()
            .map(|p| (default_index(p.id()), p))
            .collect();
        in_order.sort_by_key(|(index, _)| *index);
        let annotations = text::id_annotations(text);
        let mut next_annotation = annotations.iter();
        // Each id seen so far: where its @id is (none for a default id), and how to name it.
        let mut seen: HashMap<String, (Option<Location>, String)> = HashMap::new();
        let mut renamed = cedar_policy::PolicySet::new();
        let mut ids = Vec::with_capacity(in_order.len());
        for (index, policy) in in_order {
            let (id, at) = match policy.annotation("id") {
                Some(id) => {
                    let at = locate(next_annotation.next().copied());
                    if id.is_empty() {
                        return Err(PolicyError::EmptyId { at });
                    }
                    (id.to_owned(), Some(at))
                }
                None => (policy.id().to_string(), None),
            };
            let described = match &at {
                Some(Location {
                    position: Some((line, column)),
                    ..
                }) => format!("the policy at {line}:{column}"),
                _ => format!(
                    "policy #{} of the text (no @id, so Cedar's default id)",
                    index.saturating_add(1)
                ),
            };
            if let Some((first_at, first_described)) = seen.remove(&id) {
                // Report at an @id. Two default ids never clash, so when this policy has none,
                // the earlier one has.
                let (at, other) = match at {
                    Some(at) => (at, first_described),
                    None => (first_at.unwrap_or_else(|| locate(None)), described),
                };
                return Err(PolicyError::DuplicateId { id, at, other });
            }
            seen.insert(id.clone(), (at, described));
            if renamed
                .add(policy.new_id(PolicyId::new(id.clone())))
                .is_err()
            {
                // Every id was checked unique just above, the only reason `add` refuses.
                return Err(PolicyError::DuplicateId {
                    id,
                    at: locate(None),
                    other: "another policy".to_owned(),
                });
            }
            ids.push(id);
        }

        let validator = Validator::new(FIXED.schema.clone());
        let result = validator.validate(&renamed, ValidationMode::Strict);
        let mut errors = result.validation_errors();
        if let Some(first) = errors.next() {
            let (offset, message) = describe(first);
            return Err(PolicyError::Invalid {
                at: locate(offset),
                policy: first.policy_id().to_string(),
                message,
                more: errors.count(),
            });
        }

        // Cedar weighs every policy it is given; one whose scope names another action can only
        // be "not applicable", so each action gets the policies that may apply to it. The schema
        // has no action groups, so `action in [...]` is membership of the list.
        let mut by_action = Action::ALL.map(|_| ForAction::default());
        for policy in renamed.policies() {
            let guard = Guard::of(policy);
            for (for_action, uid) in by_action.iter_mut().zip(&FIXED.actions) {
                let applies = match policy.action_constraint() {
                    ActionConstraint::Any => true,
                    ActionConstraint::Eq(action) => action == *uid,
                    ActionConstraint::In(actions) => actions.contains(uid),
                };
                if !applies {
                    continue;
                }
                if for_action.all.add(policy.clone()).is_err() {
                    return Err(PolicyError::DuplicateId {
                        id: policy.id().to_string(),
                        at: locate(None),
                        other: "another policy".to_owned(),
                    });
                }
                for_action.guarded.push((policy.clone(), guard.clone()));
            }
        }

        let reads_time = by_action
            .each_ref()
            .map(|for_action| for_action.all.policies().any(memo::reads_time));
        Ok(Self {
            by_action,
            reads_time,
            memo: Arc::default(),
            ids,
            version,
            text: text.to_owned(),
            digest: sha256_hex(text),
        })
    }

    /// The version the set was loaded as.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The text the set was parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// SHA-256 of the text, lowercase hex: names exactly which text decided.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The policies' ids, in text order.
    pub fn policy_ids(&self) -> Vec<String> {
        self.ids.clone()
    }

    /// Decides `request`. Never fails: a request that cannot be put to Cedar, or whose
    /// evaluation errs, is denied with the reason in [`Decision::errors`].
    pub fn decide(&self, request: &Request<'_>) -> Decision {
        let index = request.action.index();
        let key = (!self.reads_time[index]).then(|| memo::key(request));
        if let Some(decision) = key.as_deref().and_then(|key| self.memo.get(key)) {
            return decision;
        }
        let decision = match self.by_action[index].for_request(request) {
            Ok(policies) => self.decide_among(request, &policies),
            Err(error) => self.refused(error),
        };
        if let Some(key) = key {
            self.memo.put(key, &decision);
        }
        decision
    }

    /// Decides `request` by the given policies only.
    fn decide_among(&self, request: &Request<'_>, policies: &cedar_policy::PolicySet) -> Decision {
        let fixed = &*FIXED;
        let (cedar_request, entities) = match to_cedar(fixed, request) {
            Ok(built) => built,
            Err(error) => return self.refused(error),
        };
        let response = fixed
            .authorizer
            .is_authorized(&cedar_request, policies, &entities);
        let diagnostics = response.diagnostics();
        // Cedar gathers both in hash sets; sorted, equal decisions compare equal.
        let mut errors: Vec<String> = diagnostics.errors().map(ToString::to_string).collect();
        errors.sort();
        let cedar_allows = response.decision() == cedar_policy::Decision::Allow;
        let allowed = cedar_allows && errors.is_empty();
        // Permits that would have allowed did not decide when an error denied instead.
        let mut determining: Vec<String> = if cedar_allows && !allowed {
            Vec::new()
        } else {
            diagnostics.reason().map(ToString::to_string).collect()
        };
        determining.sort();
        Decision {
            allowed,
            version: self.version,
            determining,
            errors,
        }
    }

    fn refused(&self, error: String) -> Decision {
        Decision {
            allowed: false,
            version: self.version,
            determining: Vec::new(),
            errors: vec![error],
        }
    }
}

/// The N of Cedar's default id `policyN`; ids not of that form (none are, straight from the
/// parser) sort last.
fn default_index(id: &PolicyId) -> usize {
    id.to_string()
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

/// The byte offset of a Cedar diagnostic's first label, and its message with any hint.
fn describe(diagnostic: &(impl Diagnostic + ?Sized)) -> (Option<usize>, String) {
    let offset = diagnostic
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    let mut message = diagnostic.to_string();
    if let Some(help) = diagnostic.help() {
        message.push_str("; ");
        message.push_str(&help.to_string());
    }
    (offset, message)
}

fn sha256_hex(text: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes()).as_ref())
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn strings<'s>(values: impl IntoIterator<Item = &'s str>) -> RestrictedExpression {
    RestrictedExpression::new_set(values.into_iter().map(string))
}

/// Builds Cedar's request and entity store. The entities are built by this code to the schema,
/// so they are not checked against it again: that check would cost more than the decision.
fn to_cedar(
    fixed: &Fixed,
    request: &Request<'_>,
) -> Result<(cedar_policy::Request, Entities), String> {
    let p = &request.principal;
    let mut attrs: Vec<(String, RestrictedExpression)> = Vec::with_capacity(11);
    attrs.push(("uid".into(), RestrictedExpression::new_long(p.uid.into())));
    attrs.push(("gid".into(), RestrictedExpression::new_long(p.gid.into())));
    for (name, value) in [
        ("user", p.user),
        ("group", p.group),
        ("sha256", p.sha256),
        ("systemd_unit", p.systemd_unit),
    ] {
        if let Some(value) = value {
            attrs.push((name.into(), string(value)));
        }
    }
    attrs.push(("exe".into(), string(p.exe)));
    attrs.push(("node_id".into(), string(p.node_id)));
    attrs.push((
        "node_labels".into(),
        strings(p.node_labels.iter().map(String::as_str)),
    ));
    if let Some(task) = &p.task {
        let record = RestrictedExpression::new_record([
            ("id".to_owned(), string(task.id)),
            ("entry_id".to_owned(), string(task.entry_id)),
            ("spiffe_id".to_owned(), string(task.spiffe_id.as_str())),
        ])
        .map_err(|e| format!("principal.task: {e}"))?;
        attrs.push(("task".into(), record));
    }
    attrs.push((
        "delegation_chain".into(),
        strings(p.delegation_chain.iter().map(SpiffeId::as_str)),
    ));
    let principal = Entity::new_with_tags(fixed.caller.clone(), attrs, [], [])
        .map_err(|e| format!("principal: {e}"))?;

    let r = &request.resource;
    let resource_uid =
        EntityUid::from_type_name_and_id(fixed.entry.clone(), EntityId::new(r.entry_id));
    let resource = Entity::new_with_tags(
        resource_uid.clone(),
        [
            ("id".to_owned(), string(r.entry_id)),
            ("spiffe_id".to_owned(), string(r.spiffe_id.as_str())),
            ("owner".to_owned(), string(r.owner)),
            ("purpose".to_owned(), string(r.purpose)),
            (
                "labels".to_owned(),
                strings(r.labels.iter().map(String::as_str)),
            ),
            ("activation".to_owned(), string(r.activation.name())),
        ],
        [],
        [],
    )
    .map_err(|e| format!("resource: {e}"))?;

    let c = &request.context;
    let mut pairs: Vec<(String, RestrictedExpression)> = Vec::with_capacity(4);
    pairs.push(("time".into(), RestrictedExpression::new_long(c.time)));
    pairs.push((
        "delegation_depth".into(),
        RestrictedExpression::new_long(c.delegation_depth.into()),
    ));
    if let Some(ttl) = c.requested_ttl {
        // A lifetime beyond Cedar's Long (292 billion years) is as good as the largest one.
        let seconds = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        pairs.push((
            "requested_ttl".into(),
            RestrictedExpression::new_long(seconds),
        ));
    }
    if let Some(purpose) = c.requested_purpose {
        pairs.push(("requested_purpose".into(), string(purpose)));
    }
    let context = cedar_policy::Context::from_pairs(pairs).map_err(|e| format!("context: {e}"))?;

    let entities = Entities::from_entities([principal, resource], None)
        .map_err(|e| format!("entities: {e}"))?;
    let action = fixed.actions[request.action.index()].clone();
    let cedar_request =
        cedar_policy::Request::new(fixed.caller.clone(), action, resource_uid, context, None)
            .map_err(|e| format!("request: {e}"))?;
    Ok((cedar_request, entities))
}
