//! Registration entries: who may be what, owned by whom, for what, until when.
//!
//! An entry is registration, not activation: nothing is minted until a matching caller asks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::attest::{FactNeeds, Selector, SelectorKind, SelectorSet};
use crate::ca::task::TaskClaims;
use crate::spiffe::{SpiffeId, TrustDomain};

/// The shortest X.509-SVID lifetime an entry may ask for.
pub const MIN_X509_TTL: Duration = Duration::from_secs(2);
/// The longest X.509-SVID lifetime anything accepts (a server may configure a lower limit).
pub const MAX_X509_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The shortest JWT-SVID lifetime an entry or an agent may ask for.
pub const MIN_JWT_TTL: Duration = Duration::from_secs(10);
/// The longest JWT-SVID lifetime anything accepts (a server may configure a lower limit).
pub const MAX_JWT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest owner, in bytes: a team, a person or a ticket queue.
pub const MAX_OWNER_LEN: usize = 256;
/// Longest purpose, in bytes: a sentence or two.
pub const MAX_PURPOSE_LEN: usize = 1024;
/// Longest hint, in bytes.
pub const MAX_HINT_LEN: usize = 1024;
/// Most entries one entry's tasks may delegate to.
pub const MAX_DELEGATES: usize = 64;
/// Most labels on one entry.
pub const MAX_LABELS: usize = 64;

/// When an entry issues anything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Activation {
    /// Whoever matches the selectors holds the identity for as long as the entry exists.
    #[default]
    Standing,
    /// Nothing is issued outside a task: a permitted workload starts a task for one process,
    /// and that process tree gets a per-task identity.
    Task,
}

impl Activation {
    /// The name in files, the admin API and listings.
    pub fn name(self) -> &'static str {
        match self {
            Self::Standing => "standing",
            Self::Task => "task",
        }
    }

    /// Parses a name as written by an operator; `None` names neither mode.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "standing" => Some(Self::Standing),
            "task" => Some(Self::Task),
            _ => None,
        }
    }
}

/// One registration entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// Stable identifier: given by the operator or derived from the SPIFFE ID and selectors.
    pub id: String,
    /// The identity granted.
    pub spiffe_id: SpiffeId,
    /// What a caller must show; the entry matches when these are a subset of the caller's.
    pub selectors: SelectorSet,
    /// Lifetime of each X.509-SVID minted for the entry.
    pub x509_ttl: Duration,
    /// Lifetime of each JWT-SVID; `None`: the agent's `[jwt] ttl`.
    pub jwt_ttl: Option<Duration>,
    /// Who answers for this identity.
    pub owner: String,
    /// What the identity is for.
    pub purpose: String,
    /// No issuance after this instant; SVIDs never outlive it.
    pub expires_at: Option<SystemTime>,
    /// Optional hint passed to workloads to tell identities apart.
    pub hint: Option<String>,
    /// Optional DNS SANs.
    pub dns_names: Vec<String>,
    /// Standing, or issued only inside tasks.
    pub activation: Activation,
    /// Ids of the task entries this entry's tasks may start child tasks under (delegation).
    pub delegates_to: Vec<String>,
    /// `key:value` labels for policies and listings.
    pub labels: Vec<String>,
    /// Set only on the per-task entries an agent derives from a task entry for one live task:
    /// the task its SVIDs name. Never set on a registration.
    pub task: Option<Arc<TaskClaims>>,
}

impl RegistrationEntry {
    /// True when a caller with `facts` may have this identity at `now` by its selectors alone:
    /// a standing entry, unexpired, whose selectors the caller shows. Task entries never match
    /// here; their identities go to the processes of a task.
    pub fn matches(&self, facts: &SelectorSet, now: SystemTime) -> bool {
        self.activation == Activation::Standing && self.may_be_started_by(facts, now)
    }

    /// True when a caller with `facts` shows this entry's selectors at `now`, whatever its
    /// activation: who may start a task of a task entry.
    pub fn may_be_started_by(&self, facts: &SelectorSet, now: SystemTime) -> bool {
        self.task.is_none() && !self.is_expired(now) && self.selectors.is_subset(facts)
    }

    /// True once the registration's own expiry has passed.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether certificates minted for `previous` (same id) must be revoked when this entry
    /// replaces it: who may hold them (SPIFFE ID, selectors) or what they say (DNS names, a
    /// lifetime or registration expiry cut shorter) changed.
    pub fn revokes_holders_of(&self, previous: &RegistrationEntry) -> bool {
        let expiry_cut = match (self.expires_at, previous.expires_at) {
            (Some(now), Some(before)) => now < before,
            (Some(_), None) => true,
            (None, _) => false,
        };
        self.spiffe_id != previous.spiffe_id
            || self.selectors != previous.selectors
            || self.dns_names != previous.dns_names
            || self.x509_ttl < previous.x509_ttl
            || self.activation != previous.activation
            || expiry_cut
    }

    /// Whether a new certificate is needed when this entry replaces `previous` (same id).
    pub fn needs_new_certificate(&self, previous: &RegistrationEntry) -> bool {
        self.spiffe_id != previous.spiffe_id
            || self.x509_ttl != previous.x509_ttl
            || self.dns_names != previous.dns_names
            || self.expires_at != previous.expires_at
    }
}

/// An entry as an operator wrote it (in a file or through the admin API), with durations and
/// instants already parsed, before checking.
#[derive(Debug, Clone, Default)]
pub struct EntryFields {
    /// Optional stable id; derived from the SPIFFE ID and selectors when absent.
    pub id: Option<String>,
    /// The SPIFFE ID to grant.
    pub spiffe_id: String,
    /// Selectors the caller must show.
    pub selectors: Vec<String>,
    /// SVID lifetime.
    pub x509_ttl: Duration,
    /// JWT-SVID lifetime, when the entry sets one.
    pub jwt_ttl: Option<Duration>,
    /// Who answers for the identity.
    pub owner: String,
    /// What it is for.
    pub purpose: String,
    /// Nothing is issued after this instant.
    pub expires_at: Option<SystemTime>,
    /// Optional hint.
    pub hint: Option<String>,
    /// Optional DNS SANs.
    pub dns_names: Vec<String>,
    /// `standing` (the default when empty) or `task`.
    pub activation: Option<String>,
    /// Entry ids this entry's tasks may delegate to.
    pub delegates_to: Vec<String>,
    /// `key:value` labels.
    pub labels: Vec<String>,
}

/// One field of an entry that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value:?}: {reason}")]
pub struct FieldError {
    /// The field at fault, e.g. `selectors[1]`.
    pub field: String,
    /// The value found.
    pub value: String,
    /// Why it is wrong and what would be right.
    pub reason: String,
}

impl FieldError {
    /// `value` of `field` refused for `reason`.
    pub fn new(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

impl EntryFields {
    /// Checks every field for an entry of `trust_domain` whose SVIDs may live at most
    /// `max_x509_ttl`; the first problem found names its field.
    pub fn check(
        self,
        trust_domain: &TrustDomain,
        max_x509_ttl: Duration,
    ) -> Result<RegistrationEntry, FieldError> {
        let spiffe_id = SpiffeId::parse_workload(&self.spiffe_id).map_err(|e| {
            FieldError::new(
                "spiffe_id",
                &self.spiffe_id,
                format!("not a workload SPIFFE ID: {e}"),
            )
        })?;
        if spiffe_id.trust_domain() != *trust_domain {
            return Err(FieldError::new(
                "spiffe_id",
                &self.spiffe_id,
                format!("is outside the trust domain {trust_domain}"),
            ));
        }
        let selectors = check_selectors(&self.selectors)?;
        if !(MIN_X509_TTL..=max_x509_ttl).contains(&self.x509_ttl) {
            return Err(FieldError::new(
                "x509_ttl",
                humantime::format_duration(self.x509_ttl).to_string(),
                format!(
                    "must be between {} and {}",
                    humantime::format_duration(MIN_X509_TTL),
                    humantime::format_duration(max_x509_ttl)
                ),
            ));
        }
        if let Some(ttl) = self.jwt_ttl
            && !(MIN_JWT_TTL..=MAX_JWT_TTL).contains(&ttl)
        {
            return Err(FieldError::new(
                "jwt_ttl",
                humantime::format_duration(ttl).to_string(),
                format!(
                    "must be between {} and {}",
                    humantime::format_duration(MIN_JWT_TTL),
                    humantime::format_duration(MAX_JWT_TTL)
                ),
            ));
        }
        for (field, value, max) in [
            ("owner", &self.owner, MAX_OWNER_LEN),
            ("purpose", &self.purpose, MAX_PURPOSE_LEN),
        ] {
            if value.trim().is_empty() {
                return Err(FieldError::new(
                    field,
                    value,
                    "is required: every identity needs an owner and a purpose",
                ));
            }
            check_free_text(field, value, max)?;
        }
        if let Some(hint) = &self.hint {
            if hint.is_empty() {
                return Err(FieldError::new(
                    "hint",
                    hint,
                    format!("must be 1 to {MAX_HINT_LEN} bytes"),
                ));
            }
            check_free_text("hint", hint, MAX_HINT_LEN)?;
        }
        for (i, name) in self.dns_names.iter().enumerate() {
            if !is_dns_name(name) {
                return Err(FieldError::new(
                    format!("dns_names[{i}]"),
                    name,
                    "not a DNS name (letters, digits, '-', '.', an optional leading '*.')",
                ));
            }
        }
        let activation = match self.activation.as_deref() {
            None | Some("") => Activation::Standing,
            Some(name) => Activation::from_name(name).ok_or_else(|| {
                FieldError::new("activation", name, "must be \"standing\" or \"task\"")
            })?,
        };
        let delegates_to = check_delegates(&self.delegates_to)?;
        if !delegates_to.is_empty() && activation != Activation::Task {
            return Err(FieldError::new(
                "delegates_to",
                delegates_to.join(","),
                "only a task entry's tasks can delegate; set activation = \"task\" or leave it empty",
            ));
        }
        let labels = check_labels(&self.labels)?;
        let id = match self.id {
            Some(id) => check_entry_id(&id).map(|()| id)?,
            None => derived_entry_id(&spiffe_id, &selectors),
        };
        Ok(RegistrationEntry {
            id,
            spiffe_id,
            selectors,
            x509_ttl: self.x509_ttl,
            jwt_ttl: self.jwt_ttl,
            owner: self.owner,
            purpose: self.purpose,
            expires_at: self.expires_at,
            hint: self.hint,
            dns_names: self.dns_names,
            activation,
            delegates_to,
            labels,
            task: None,
        })
    }
}

/// Checks the entry ids tasks may delegate to: each a valid id, none twice.
pub fn check_delegates(ids: &[String]) -> Result<Vec<String>, FieldError> {
    if ids.len() > MAX_DELEGATES {
        return Err(FieldError::new(
            "delegates_to",
            format!("{} ids", ids.len()),
            format!("at most {MAX_DELEGATES} entries"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        check_entry_id(id)
            .map_err(|e| FieldError::new(format!("delegates_to[{i}]"), id, e.reason))?;
        if out.contains(id) {
            return Err(FieldError::new(
                format!("delegates_to[{i}]"),
                id,
                "is listed twice",
            ));
        }
        out.push(id.clone());
    }
    Ok(out)
}

/// Checks `key:value` labels: a key of lowercase letters, digits, '.', '-', '_' (1 to 63),
/// a colon, and a value of 0 to 255 bytes of plain text; sorted, none twice.
pub fn check_labels(labels: &[String]) -> Result<Vec<String>, FieldError> {
    if labels.len() > MAX_LABELS {
        return Err(FieldError::new(
            "labels",
            format!("{} labels", labels.len()),
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    let mut out = Vec::with_capacity(labels.len());
    for (i, label) in labels.iter().enumerate() {
        let field = format!("labels[{i}]");
        let Some((key, value)) = label.split_once(':') else {
            return Err(FieldError::new(
                field,
                label,
                "must be key:value, e.g. team:payments",
            ));
        };
        let key_ok = (1..=63).contains(&key.len())
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if !key_ok {
            return Err(FieldError::new(
                field,
                label,
                "the key must be 1 to 63 of lowercase letters, digits, '.', '-', '_'",
            ));
        }
        check_free_text(&field, value, 255)?;
        out.push(label.clone());
    }
    out.sort();
    if let Some(pair) = out.windows(2).find(|w| w[0] == w[1]) {
        return Err(FieldError::new("labels", &pair[0], "is listed twice"));
    }
    Ok(out)
}

/// Parses workload selectors; at least one is required.
pub fn check_selectors(texts: &[String]) -> Result<SelectorSet, FieldError> {
    if texts.is_empty() {
        return Err(FieldError::new(
            "selectors",
            "[]",
            "at least one selector is required; an entry without selectors would match every caller",
        ));
    }
    let mut selectors = SelectorSet::new();
    for (i, text) in texts.iter().enumerate() {
        let selector: Selector = text
            .parse()
            .map_err(|e| FieldError::new(format!("selectors[{i}]"), text, format!("{e}")))?;
        // A caller has one value of each of these: two different ones can never match.
        if selector.kind.is_single_valued()
            && let Some(other) = selectors.iter().find(|s| s.kind == selector.kind)
            && *other != selector
        {
            return Err(FieldError::new(
                format!("selectors[{i}]"),
                text,
                format!(
                    "contradicts {other}: a caller has one {}, so an entry asking for two \
                     matches no caller",
                    selector.kind.prefix()
                ),
            ));
        }
        selectors.insert(selector);
    }
    Ok(selectors)
}

/// Refuses free text (owner, purpose, hint) that is longer than `max` bytes or holds control
/// or bidirectional-formatting characters, which would rewrite the terminal or the line of
/// whoever reads a listing or a log.
pub fn check_free_text(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.len() > max {
        let shown: String = value.chars().take(64).collect();
        return Err(FieldError::new(
            field,
            format!("{shown}..."),
            format!("is {} bytes; at most {max} are accepted", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| is_hidden_control(*c)) {
        return Err(FieldError::new(
            field,
            value,
            format!(
                "holds the control character U+{:04X}; write plain text on one line",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}

/// Control characters (C0, DEL, C1) and the bidirectional overrides and isolates.
fn is_hidden_control(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Checks an operator-chosen entry id.
pub fn check_entry_id(id: &str) -> Result<(), FieldError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "id",
            id,
            "must be 1 to 64 of letters, digits, '.', '-', '_'",
        ))
    }
}

/// A stable id for an entry the operator did not name: a digest of what it grants to whom.
pub fn derived_entry_id(spiffe_id: &SpiffeId, selectors: &SelectorSet) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(spiffe_id.as_str().as_bytes());
    for s in selectors {
        ctx.update(b"\n");
        ctx.update(s.to_string().as_bytes());
    }
    format!("e-{}", &hex::encode(ctx.finish())[..16])
}

/// Whether `name` is a DNS name, optionally with a leading wildcard label.
pub fn is_dns_name(name: &str) -> bool {
    let body = name.strip_prefix("*.").unwrap_or(name);
    !body.is_empty()
        && name.len() <= 253
        && body.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Node selector kinds an entry may name (the selectors node attestation gives a node).
pub const NODE_SELECTOR_KINDS: &[&str] = &[
    "node:id",
    "node:attestation",
    "node:label",
    "x509pop:subject:cn",
];

/// Checks one node selector of an entry: a known kind and a non-empty value (which may hold
/// spaces: a certificate's common name can). The one check, for the CLI and the admin API.
pub fn check_node_selector(text: &str) -> Result<(), String> {
    let known = NODE_SELECTOR_KINDS.iter().find(|kind| {
        text.strip_prefix(**kind)
            .is_some_and(|rest| rest.starts_with(':'))
    });
    match known {
        None => Err(format!(
            "unknown node selector type; known: {}",
            NODE_SELECTOR_KINDS
                .iter()
                .map(|k| format!("{k}:<value>"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Some(kind) if text.len() == kind.len() + 1 => {
            Err(format!("{kind} needs a value after the colon"))
        }
        Some(kind) if *kind == "node:attestation" => {
            let value = &text[kind.len() + 1..];
            if value == "join_token" || value == "x509pop" {
                Ok(())
            } else {
                Err("node:attestation is join_token or x509pop".into())
            }
        }
        Some(_) => Ok(()),
    }
}

/// All entries an agent serves, in declaration order (the first match is the default identity).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntrySet {
    /// The entries, in order.
    pub entries: Vec<Arc<RegistrationEntry>>,
    /// What attestation must gather for these entries; computed once per set.
    needs: FactNeeds,
    /// Positions in `entries` by each entry's first selector: an entry can match only callers
    /// that show that one, so a caller's match looks at the entries under its own selectors
    /// instead of every entry. Built with the set and never changed.
    by_first_selector: HashMap<Selector, Vec<u32>>,
    /// Positions of entries without selectors, which every caller shows.
    without_selectors: Vec<u32>,
    /// Position of each id's first entry, for lookups by id (every cached SVID is looked up
    /// when a new set is installed).
    by_id: HashMap<String, u32>,
}

impl EntrySet {
    /// Builds a set from validated entries.
    pub fn new(entries: Vec<RegistrationEntry>) -> Self {
        Self::from_shared(entries.into_iter().map(Arc::new).collect())
    }

    /// Builds a set from entries already shared (a set derived from another keeps its entries).
    pub fn from_shared(entries: Vec<Arc<RegistrationEntry>>) -> Self {
        let needs = FactNeeds {
            exe_sha256: entries
                .iter()
                .flat_map(|e| &e.selectors)
                .any(|s| s.kind == SelectorKind::Sha256),
            lineage: entries.iter().any(|e| e.task.is_some()),
            // The task registry knows where the walk may stop; it says so per call.
            lineage_since: 0,
        };
        let mut by_first_selector: HashMap<Selector, Vec<u32>> = HashMap::new();
        let mut without_selectors = Vec::new();
        let mut by_id = HashMap::with_capacity(entries.len());
        for (position, entry) in entries.iter().enumerate() {
            let position = position as u32;
            by_id.entry(entry.id.clone()).or_insert(position);
            match entry.selectors.first() {
                Some(first) => by_first_selector
                    .entry(first.clone())
                    .or_default()
                    .push(position),
                None => without_selectors.push(position),
            }
        }
        Self {
            entries,
            needs,
            by_first_selector,
            without_selectors,
            by_id,
        }
    }

    /// Entries a caller with `facts` matches at `now`, in order, hints made unique (a later
    /// entry whose hint repeats an earlier one is left out, as the Workload API requires).
    pub fn matching(&self, facts: &SelectorSet, now: SystemTime) -> Vec<Arc<RegistrationEntry>> {
        let mut candidates = self.without_selectors.clone();
        for fact in facts {
            if let Some(positions) = self.by_first_selector.get(fact) {
                candidates.extend_from_slice(positions);
            }
        }
        // Declaration order decides the default identity.
        candidates.sort_unstable();
        let mut seen_hints = Vec::new();
        let mut out = Vec::new();
        let entries = candidates.iter().map(|&p| &self.entries[p as usize]);
        for entry in entries.filter(|e| e.matches(facts, now)) {
            if let Some(hint) = &entry.hint {
                if seen_hints.contains(&hint) {
                    tracing::warn!(entry = %entry.id, %hint, "duplicate hint for one caller; entry left out");
                    continue;
                }
                seen_hints.push(hint);
            }
            out.push(entry.clone());
        }
        out
    }

    /// Looks an entry up by id.
    pub fn get(&self, id: &str) -> Option<&Arc<RegistrationEntry>> {
        self.by_id.get(id).map(|&p| &self.entries[p as usize])
    }

    /// The facts attestation must gather for these entries.
    pub fn fact_needs(&self) -> FactNeeds {
        self.needs
    }

    /// The earliest registration expiry after `now`, when the set of matches next changes.
    pub fn next_expiry_after(&self, now: SystemTime) -> Option<SystemTime> {
        self.entries
            .iter()
            .filter_map(|e| e.expires_at)
            .filter(|at| *at > now)
            .min()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::attest::Selector;

    pub(crate) fn entry(id: &str, spiffe_id: &str, selectors: &[&str]) -> RegistrationEntry {
        RegistrationEntry {
            id: id.into(),
            spiffe_id: SpiffeId::parse_workload(spiffe_id).unwrap(),
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
            x509_ttl: Duration::from_secs(300),
            jwt_ttl: None,
            owner: "team".into(),
            purpose: "test".into(),
            expires_at: None,
            hint: None,
            dns_names: vec![],
            activation: Activation::Standing,
            delegates_to: vec![],
            labels: vec![],
            task: None,
        }
    }

    fn facts(selectors: &[&str]) -> SelectorSet {
        selectors
            .iter()
            .map(|s| s.parse::<Selector>().unwrap())
            .collect()
    }

    fn fields() -> EntryFields {
        EntryFields {
            spiffe_id: "spiffe://td/w".into(),
            selectors: vec!["unix:uid:1001".into()],
            x509_ttl: Duration::from_secs(300),
            owner: "team".into(),
            purpose: "test".into(),
            ..EntryFields::default()
        }
    }

    fn refusal(fields: EntryFields) -> String {
        let td = TrustDomain::new("td").unwrap();
        fields.check(&td, MAX_X509_TTL).unwrap_err().to_string()
    }

    #[test]
    fn free_text_refuses_control_characters_and_excess_length() {
        let td = TrustDomain::new("td").unwrap();
        assert!(fields().check(&td, MAX_X509_TTL).is_ok());
        let err = refusal(EntryFields {
            owner: "team\u{1b}[2J".into(),
            ..fields()
        });
        assert!(err.starts_with("owner = \"team\\u{1b}[2J\""), "{err}");
        assert!(err.contains("U+001B"), "{err}");
        let err = refusal(EntryFields {
            purpose: "x".repeat(MAX_PURPOSE_LEN + 1),
            ..fields()
        });
        assert!(
            err.starts_with("purpose = ") && err.contains("1025 bytes"),
            "{err}"
        );
        assert!(
            err.len() < 200,
            "the message shows a prefix, not the whole value"
        );
        let err = refusal(EntryFields {
            hint: Some("line\nbreak".into()),
            ..fields()
        });
        assert!(
            err.starts_with("hint = ") && err.contains("U+000A"),
            "{err}"
        );
        let err = refusal(EntryFields {
            owner: "evil\u{202e}txt.exe".into(),
            ..fields()
        });
        assert!(err.contains("U+202E"), "{err}");
        let err = refusal(EntryFields {
            owner: "o".repeat(MAX_OWNER_LEN + 1),
            ..fields()
        });
        assert!(err.starts_with("owner = "), "{err}");
        // Text in any script is fine.
        assert!(
            EntryFields {
                owner: "équipe données".into(),
                ..fields()
            }
            .check(&td, MAX_X509_TTL)
            .is_ok()
        );
    }

    #[test]
    fn selectors_that_can_never_match_are_refused() {
        let err = refusal(EntryFields {
            selectors: vec!["unix:uid:1001".into(), "unix:uid:1002".into()],
            ..fields()
        });
        assert!(
            err.starts_with("selectors[1] = \"unix:uid:1002\"") && err.contains("unix:uid:1001"),
            "{err}"
        );
        let err = refusal(EntryFields {
            selectors: vec!["unix:path:/usr/bin/../bin/python3".into()],
            ..fields()
        });
        assert!(
            err.starts_with("selectors[0] = ") && err.contains(".."),
            "{err}"
        );
        // Several supplementary groups, and one fact given twice, can match.
        let td = TrustDomain::new("td").unwrap();
        let fine = EntryFields {
            selectors: vec![
                "unix:supplementary_gid:10".into(),
                "unix:supplementary_gid:20".into(),
                "unix:uid:1001".into(),
                "unix:uid:01001".into(),
            ],
            ..fields()
        };
        assert!(fine.check(&td, MAX_X509_TTL).is_ok());
    }

    #[test]
    fn matches_when_selectors_are_a_subset_in_declaration_order() {
        let set = EntrySet::new(vec![
            entry("a", "spiffe://td/a", &["unix:uid:1001", "unix:gid:50"]),
            entry("b", "spiffe://td/b", &["unix:uid:1001"]),
            entry("c", "spiffe://td/c", &["unix:uid:1002"]),
        ]);
        let now = SystemTime::now();
        let ids = |f: &SelectorSet| -> Vec<String> {
            set.matching(f, now).iter().map(|e| e.id.clone()).collect()
        };
        assert_eq!(ids(&facts(&["unix:uid:1001", "unix:gid:50"])), ["a", "b"]);
        assert_eq!(ids(&facts(&["unix:uid:1001", "unix:gid:51"])), ["b"]);
        assert!(ids(&facts(&["unix:gid:50"])).is_empty());
    }

    /// The index by first selector finds what a scan of every entry finds, in the same order;
    /// the index by id finds every entry.
    #[test]
    fn matching_through_the_index_agrees_with_a_scan() {
        let kinds = [
            "unix:uid:1",
            "unix:uid:2",
            "unix:gid:7",
            "unix:gid:8",
            "unix:path:/bin/x",
        ];
        let mut entries = Vec::new();
        // Every non-empty combination of up to three selectors, twice over in different order.
        for round in 0..2 {
            for mask in 1u32..(1 << kinds.len()) {
                if mask.count_ones() > 3 || (round == 1 && mask % 3 != 0) {
                    continue;
                }
                let selectors: Vec<&str> = (0..kinds.len())
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| kinds[i])
                    .collect();
                let id = format!("e{round}-{mask}");
                entries.push(entry(&id, &format!("spiffe://td/{id}"), &selectors));
            }
        }
        let set = EntrySet::new(entries.clone());
        for entry in &entries {
            assert_eq!(set.get(&entry.id).map(|e| &e.id), Some(&entry.id));
        }
        assert!(set.get("absent").is_none());
        let now = SystemTime::now();
        for mask in 0u32..(1 << kinds.len()) {
            let shown: Vec<&str> = (0..kinds.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| kinds[i])
                .collect();
            let caller = facts(&shown);
            let indexed: Vec<String> = set
                .matching(&caller, now)
                .iter()
                .map(|e| e.id.clone())
                .collect();
            let scanned: Vec<String> = entries
                .iter()
                .filter(|e| e.matches(&caller, now))
                .map(|e| e.id.clone())
                .collect();
            assert_eq!(indexed, scanned, "caller showing {shown:?}");
        }
    }

    #[test]
    fn expired_registrations_and_duplicate_hints_are_left_out() {
        let now = SystemTime::now();
        let mut expired = entry("x", "spiffe://td/x", &["unix:uid:1"]);
        expired.expires_at = Some(now - Duration::from_secs(1));
        let mut first = entry("h1", "spiffe://td/h1", &["unix:uid:1"]);
        first.hint = Some("db".into());
        let mut second = entry("h2", "spiffe://td/h2", &["unix:uid:1"]);
        second.hint = Some("db".into());
        let set = EntrySet::new(vec![expired, first, second]);
        let got: Vec<_> = set.matching(&facts(&["unix:uid:1"]), now);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, "h1");
        assert_eq!(
            set.next_expiry_after(now - Duration::from_secs(5)),
            Some(now - Duration::from_secs(1))
        );
    }

    #[test]
    fn sha256_need_follows_the_entries() {
        let plain = EntrySet::new(vec![entry("a", "spiffe://td/a", &["unix:uid:1"])]);
        assert!(!plain.fact_needs().exe_sha256);
        let hashed = EntrySet::new(vec![entry(
            "a",
            "spiffe://td/a",
            &[&format!("unix:sha256:{}", "0".repeat(64))],
        )]);
        assert!(hashed.fact_needs().exe_sha256);
    }

    #[test]
    fn node_selectors_are_checked() {
        assert!(check_node_selector("node:id:n1").is_ok());
        assert!(check_node_selector("node:attestation:x509pop").is_ok());
        assert!(check_node_selector("node:attestation:tpm").is_err());
        assert!(
            check_node_selector("node:id:")
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            check_node_selector("k8s:ns:x")
                .unwrap_err()
                .contains("unknown node selector type")
        );
        // Where the CLI's own rule (three non-empty parts, no spaces) used to disagree: a
        // common name with spaces is a real node's selector; an empty one matches no node.
        assert!(check_node_selector("x509pop:subject:cn:web server 1").is_ok());
        assert!(
            check_node_selector("x509pop:subject:cn:")
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(check_node_selector("rack:row:7").is_err());
    }

    #[test]
    fn activation_delegation_and_labels_are_checked() {
        let td = TrustDomain::new("td").unwrap();
        let task = EntryFields {
            activation: Some("task".into()),
            delegates_to: vec!["reviewer".into()],
            labels: vec!["team:payments".into(), "env:prod".into()],
            ..fields()
        }
        .check(&td, MAX_X509_TTL)
        .unwrap();
        assert_eq!(task.activation, Activation::Task);
        assert_eq!(task.delegates_to, ["reviewer"]);
        assert_eq!(task.labels, ["env:prod", "team:payments"], "sorted");
        let standing = fields().check(&td, MAX_X509_TTL).unwrap();
        assert_eq!(standing.activation, Activation::Standing);
        for (fields, field, reason) in [
            (
                EntryFields {
                    activation: Some("sometimes".into()),
                    ..fields()
                },
                "activation",
                "\"standing\" or \"task\"",
            ),
            (
                EntryFields {
                    delegates_to: vec!["reviewer".into()],
                    ..fields()
                },
                "delegates_to",
                "only a task entry",
            ),
            (
                EntryFields {
                    activation: Some("task".into()),
                    delegates_to: vec!["a".into(), "a".into()],
                    ..fields()
                },
                "delegates_to[1]",
                "twice",
            ),
            (
                EntryFields {
                    activation: Some("task".into()),
                    delegates_to: vec!["no spaces".into()],
                    ..fields()
                },
                "delegates_to[0]",
                "letters, digits",
            ),
            (
                EntryFields {
                    labels: vec!["nocolon".into()],
                    ..fields()
                },
                "labels[0]",
                "key:value",
            ),
            (
                EntryFields {
                    labels: vec!["Team:x".into()],
                    ..fields()
                },
                "labels[0]",
                "lowercase",
            ),
            (
                EntryFields {
                    labels: vec!["a:1".into(), "a:1".into()],
                    ..fields()
                },
                "labels",
                "twice",
            ),
        ] {
            let err = fields.check(&td, MAX_X509_TTL).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.reason.contains(reason), "{err}");
        }
    }

    #[test]
    fn task_entries_match_no_caller_by_selectors_but_say_who_may_start_them() {
        let now = SystemTime::now();
        let mut coder = entry("coder", "spiffe://td/coder", &["unix:uid:1001"]);
        coder.activation = Activation::Task;
        let caller = facts(&["unix:uid:1001"]);
        assert!(!coder.matches(&caller, now));
        assert!(coder.may_be_started_by(&caller, now));
        assert!(!coder.may_be_started_by(&facts(&["unix:uid:1002"]), now));
        let set = EntrySet::new(vec![coder.clone()]);
        assert!(set.matching(&caller, now).is_empty());
        // Making a standing entry a task entry takes its SVIDs from their holders.
        let mut standing = coder.clone();
        standing.activation = Activation::Standing;
        assert!(coder.revokes_holders_of(&standing));
    }
}
