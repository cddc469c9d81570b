//! `SpiffeId` and `TrustDomain`: parsed once, always canonical.
//!
//! The rules are those of the SPIFFE-ID standard §2: scheme `spiffe`, a lowercase trust domain of
//! `[a-z0-9._-]` (at most 255 bytes), an optional path of non-empty segments of
//! `[a-zA-Z0-9._-]` that are neither `.` nor `..`, no percent-encoding, query, fragment, port or
//! userinfo, and at most 2048 bytes in all. Anything else is rejected, never repaired.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_ID_LEN: usize = 2048;

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("is empty")]
    Empty,
    /// The string does not start with `spiffe://`.
    #[error("must start with \"spiffe://\"")]
    WrongScheme,
    /// There is nothing between `spiffe://` and the path.
    #[error("has no trust domain")]
    MissingTrustDomain,
    /// The trust domain holds a character outside `[a-z0-9._-]`.
    #[error("trust domain has {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed")]
    BadTrustDomainChar(char),
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("path has an empty segment (a doubled or trailing '/')")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("path has a '.' or '..' segment")]
    DotSegment,
    /// A path segment holds a character outside `[a-zA-Z0-9._-]`.
    #[error("path has {0:?}; only letters, digits, '.', '-' and '_' are allowed in segments")]
    BadPathChar(char),
    /// The whole ID is longer than 2048 bytes.
    #[error("is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    /// A workload ID was required but the ID names only a trust domain.
    #[error("has no path; a workload identity needs one, e.g. spiffe://example.org/service")]
    MissingPath,
}

/// A SPIFFE trust domain name, e.g. `example.org`: lowercase and validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or its ID form (`spiffe://example.org`).
    pub fn new(name: &str) -> Result<Self, IdError> {
        let name = name.strip_prefix(SCHEME).unwrap_or(name);
        check_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The bare name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://example.org`, as used for bundle map keys.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A SPIFFE ID such as `spiffe://example.org/ns/prod/svc`, stored in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The full ID string.
    id: String,
    /// Byte offset where the path starts (== `id.len()` when there is no path).
    path_start: usize,
}

impl SpiffeId {
    /// Parses any SPIFFE ID, with or without a path.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::WrongScheme)?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(domain)?;
        if !path.is_empty() {
            check_path(path)?;
        }
        Ok(Self {
            id: s.to_owned(),
            path_start: SCHEME.len() + domain.len(),
        })
    }

    /// Parses a SPIFFE ID that must name a workload, i.e. has a non-empty path.
    pub fn parse_workload(s: &str) -> Result<Self, IdError> {
        let id = Self::parse(s)?;
        if id.path().is_empty() {
            return Err(IdError::MissingPath);
        }
        Ok(id)
    }

    /// The trust domain the ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.id[SCHEME.len()..self.path_start].to_owned())
    }

    /// The path, e.g. `/ns/prod/svc`; empty for a trust domain ID.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// The ID as a string.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn check_trust_domain(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    match name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        Some(c) => Err(IdError::BadTrustDomainChar(c)),
        None => Ok(()),
    }
}

/// `path` starts with '/'.
fn check_path(path: &str) -> Result<(), IdError> {
    for segment in path[1..].split('/') {
        if segment.is_empty() {
            return Err(IdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(IdError::DotSegment);
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(IdError::BadPathChar(c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_canonical_ids() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/Svc_1.v2-a").unwrap();
        assert_eq!(id.trust_domain().name(), "example.org");
        assert_eq!(id.path(), "/ns/prod/Svc_1.v2-a");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/prod/Svc_1.v2-a");

        let td_id = SpiffeId::parse("spiffe://10.0.0.1").unwrap();
        assert_eq!(td_id.path(), "");
        assert_eq!(td_id.trust_domain().id_string(), "spiffe://10.0.0.1");
    }

    #[test]
    fn rejects_every_malformed_form() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::Empty),
            ("http://example.org/a", IdError::WrongScheme),
            ("SPIFFE://example.org/a", IdError::WrongScheme),
            ("spiffe:/example.org/a", IdError::WrongScheme),
            ("spiffe:///a", IdError::MissingTrustDomain),
            ("spiffe://", IdError::MissingTrustDomain),
            ("spiffe://Example.org/a", IdError::BadTrustDomainChar('E')),
            (
                "spiffe://example.org:8080/a",
                IdError::BadTrustDomainChar(':'),
            ),
            (
                "spiffe://user@example.org/a",
                IdError::BadTrustDomainChar('@'),
            ),
            ("spiffe://[::1]/a", IdError::BadTrustDomainChar('[')),
            ("spiffe://example.org/", IdError::EmptySegment),
            ("spiffe://example.org/a//b", IdError::EmptySegment),
            ("spiffe://example.org/a/", IdError::EmptySegment),
            ("spiffe://example.org/./a", IdError::DotSegment),
            ("spiffe://example.org/a/..", IdError::DotSegment),
            ("spiffe://example.org/a%20b", IdError::BadPathChar('%')),
            ("spiffe://example.org/a?x=1", IdError::BadPathChar('?')),
            ("spiffe://example.org/a#frag", IdError::BadPathChar('#')),
            ("spiffe://example.org?x", IdError::BadTrustDomainChar('?')),
            ("spiffe://example.org/ü", IdError::BadPathChar('ü')),
        ];
        for (input, want) in cases {
            assert_eq!(
                SpiffeId::parse(input).as_ref(),
                Err(want),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn enforces_length_limits() {
        let long_td = "a".repeat(256);
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://{long_td}/x")),
            Err(IdError::TrustDomainTooLong)
        );
        let long_path = "/a".repeat(1100);
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://example.org{long_path}")),
            Err(IdError::TooLong)
        );
        let ok_td = "a".repeat(255);
        assert!(SpiffeId::parse(&format!("spiffe://{ok_td}/x")).is_ok());
    }

    #[test]
    fn workload_ids_need_a_path() {
        assert_eq!(
            SpiffeId::parse_workload("spiffe://example.org"),
            Err(IdError::MissingPath)
        );
        assert!(SpiffeId::parse_workload("spiffe://example.org/w").is_ok());
    }

    #[test]
    fn trust_domain_accepts_both_forms() {
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap().name(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::new("example.org").unwrap().id_string(),
            "spiffe://example.org"
        );
        assert!(TrustDomain::new("Example.org").is_err());
        assert!(TrustDomain::new("").is_err());
        assert!(TrustDomain::new("spiffe://example.org/path").is_err());
    }
}
