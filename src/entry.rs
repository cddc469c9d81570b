//! Registration entries: who may be what, owned by whom, for what, until when.
//!
//! An entry is registration, not activation: nothing is minted until a matching caller asks.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::attest::{SelectorKind, SelectorSet};
use crate::spiffe::SpiffeId;

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
}

impl RegistrationEntry {
    /// True when a caller with `facts` may have this identity at `now`.
    pub fn matches(&self, facts: &SelectorSet, now: SystemTime) -> bool {
        !self.is_expired(now) && self.selectors.is_subset(facts)
    }

    /// True once the registration's own expiry has passed.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether a new certificate is needed when this entry replaces `previous` (same id).
    pub fn needs_new_certificate(&self, previous: &RegistrationEntry) -> bool {
        self.spiffe_id != previous.spiffe_id
            || self.x509_ttl != previous.x509_ttl
            || self.dns_names != previous.dns_names
            || self.expires_at != previous.expires_at
    }
}

/// Which costly facts attestation must gather because some entry uses them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FactNeeds {
    /// Some entry has a `unix:sha256` selector: hash the executable.
    pub exe_sha256: bool,
}

/// All entries an agent serves, in declaration order (the first match is the default identity).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntrySet {
    /// The entries, in order.
    pub entries: Vec<Arc<RegistrationEntry>>,
    /// What attestation must gather for these entries; computed once per set.
    needs: FactNeeds,
}

impl EntrySet {
    /// Builds a set from validated entries.
    pub fn new(entries: Vec<RegistrationEntry>) -> Self {
        let needs = FactNeeds {
            exe_sha256: entries
                .iter()
                .flat_map(|e| &e.selectors)
                .any(|s| s.kind == SelectorKind::Sha256),
        };
        Self {
            entries: entries.into_iter().map(Arc::new).collect(),
            needs,
        }
    }

    /// Entries a caller with `facts` matches at `now`, in order, hints made unique (a later
    /// entry whose hint repeats an earlier one is left out, as the Workload API requires).
    pub fn matching(&self, facts: &SelectorSet, now: SystemTime) -> Vec<Arc<RegistrationEntry>> {
        let mut seen_hints = Vec::new();
        let mut out = Vec::new();
        for entry in self.entries.iter().filter(|e| e.matches(facts, now)) {
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
        self.entries.iter().find(|e| e.id == id)
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
            owner: "team".into(),
            purpose: "test".into(),
            expires_at: None,
            hint: None,
            dns_names: vec![],
        }
    }

    fn facts(selectors: &[&str]) -> SelectorSet {
        selectors
            .iter()
            .map(|s| s.parse::<Selector>().unwrap())
            .collect()
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
}
