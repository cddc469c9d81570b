//! Selectors: the facts about a caller that registration entries are written against, in the
//! form `type:kind:value` (`unix:uid:1001`, `systemd:unit:coder.service`).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// One kind of fact a selector can state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SelectorKind {
    /// `unix:uid`: effective user id.
    Uid,
    /// `unix:gid`: effective group id.
    Gid,
    /// `unix:user`: name of the effective user.
    User,
    /// `unix:group`: name of the effective group.
    Group,
    /// `unix:supplementary_gid`: one supplementary group id.
    SupplementaryGid,
    /// `unix:supplementary_group`: one supplementary group name.
    SupplementaryGroup,
    /// `unix:path`: the executable's path as the kernel reports it.
    Path,
    /// `unix:sha256`: lowercase hex SHA-256 of the executable.
    Sha256,
    /// `systemd:unit`: the systemd unit the process runs in.
    SystemdUnit,
}

const ALL_KINDS: [SelectorKind; 9] = [
    SelectorKind::Uid,
    SelectorKind::Gid,
    SelectorKind::User,
    SelectorKind::Group,
    SelectorKind::SupplementaryGid,
    SelectorKind::SupplementaryGroup,
    SelectorKind::Path,
    SelectorKind::Sha256,
    SelectorKind::SystemdUnit,
];

impl SelectorKind {
    /// True for kinds of which a caller has exactly one value (an entry asking for two
    /// different ones matches nobody); false for supplementary groups, of which it has many.
    pub fn is_single_valued(self) -> bool {
        !matches!(self, Self::SupplementaryGid | Self::SupplementaryGroup)
    }

    /// The `type:kind` prefix, e.g. `unix:uid`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Uid => "unix:uid",
            Self::Gid => "unix:gid",
            Self::User => "unix:user",
            Self::Group => "unix:group",
            Self::SupplementaryGid => "unix:supplementary_gid",
            Self::SupplementaryGroup => "unix:supplementary_group",
            Self::Path => "unix:path",
            Self::Sha256 => "unix:sha256",
            Self::SystemdUnit => "systemd:unit",
        }
    }
}

/// Why a string is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The string is not `type:kind:value`.
    #[error("must have the form type:kind:value, e.g. \"unix:uid:1001\"")]
    Shape,
    /// The `type:kind` prefix is not one tessera knows.
    #[error("unknown selector {0:?}; known: {known}", known = known_prefixes())]
    UnknownKind(String),
    /// The selector holds a control character, which no fact about a caller does.
    #[error("holds a control character; no caller's facts do, so it could never match")]
    Control,
    /// The value is not valid for its kind.
    #[error("{prefix} needs {expected}")]
    BadValue {
        /// The selector's `type:kind`.
        prefix: &'static str,
        /// What a valid value looks like.
        expected: &'static str,
    },
}

fn known_prefixes() -> String {
    ALL_KINDS.map(SelectorKind::prefix).join(", ")
}

/// A parsed selector, its value in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// What the selector states.
    pub kind: SelectorKind,
    /// The canonical value (decimal ids, lowercase hex digests).
    pub value: String,
}

impl Selector {
    /// A selector from a fact the agent observed itself (no validation needed).
    pub fn observed(kind: SelectorKind, value: impl Into<String>) -> Self {
        Self {
            kind,
            value: value.into(),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.prefix(), self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, ':');
        let (Some(ty), Some(kind), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SelectorError::Shape);
        };
        if s.chars().any(char::is_control) {
            return Err(SelectorError::Control);
        }
        let prefix = format!("{ty}:{kind}");
        let kind = ALL_KINDS
            .into_iter()
            .find(|k| k.prefix() == prefix)
            .ok_or(SelectorError::UnknownKind(prefix))?;
        let bad = |expected| SelectorError::BadValue {
            prefix: kind.prefix(),
            expected,
        };
        let value = match kind {
            SelectorKind::Uid | SelectorKind::Gid | SelectorKind::SupplementaryGid => value
                .parse::<u32>()
                .map_err(|_| bad("a decimal id from 0 to 4294967295"))?
                .to_string(),
            SelectorKind::User | SelectorKind::Group | SelectorKind::SupplementaryGroup => {
                if value.is_empty() || value.contains(char::is_whitespace) {
                    return Err(bad("a non-empty name without spaces"));
                }
                value.to_owned()
            }
            SelectorKind::Path => {
                if !value.starts_with('/') {
                    return Err(bad("an absolute path, e.g. /usr/bin/python3.11"));
                }
                // The kernel reports an executable's path normalised: one with `.`, `..` or
                // empty components, or a trailing slash, names no executable it would report.
                let normal = value == "/"
                    || value[1..]
                        .split('/')
                        .all(|part| !matches!(part, "" | "." | ".."));
                if !normal {
                    return Err(bad(
                        "a normalised absolute path (no `.` or `..` components, no `//`, no \
                         trailing `/`), as the kernel reports it",
                    ));
                }
                value.to_owned()
            }
            SelectorKind::Sha256 => {
                if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(
                        "64 hex digits (a SHA-256 digest, as sha256sum prints it)",
                    ));
                }
                value.to_ascii_lowercase()
            }
            SelectorKind::SystemdUnit => {
                if value.is_empty() || value.contains('/') || !value.contains('.') {
                    return Err(bad("a unit name such as coder.service"));
                }
                value.to_owned()
            }
        };
        Ok(Self { kind, value })
    }
}

/// A set of selectors: either an entry's requirements or a caller's attested facts.
pub type SelectorSet = BTreeSet<Selector>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_canonicalises() {
        let s: Selector = "unix:uid:0001001".parse().unwrap();
        assert_eq!(s.to_string(), "unix:uid:1001");
        let digest = "AB".repeat(32);
        let s: Selector = format!("unix:sha256:{digest}").parse().unwrap();
        assert_eq!(s.value, "ab".repeat(32));
        let s: Selector = "unix:path:/opt/a:b/bin".parse().unwrap();
        assert_eq!(s.value, "/opt/a:b/bin");
        let s: Selector = "systemd:unit:coder.service".parse().unwrap();
        assert_eq!(s.kind, SelectorKind::SystemdUnit);
    }

    #[test]
    fn rejects_bad_selectors_with_a_reason() {
        assert_eq!("unix".parse::<Selector>(), Err(SelectorError::Shape));
        assert_eq!("unix:uid".parse::<Selector>(), Err(SelectorError::Shape));
        let err = "k8s:ns:default".parse::<Selector>().unwrap_err();
        assert!(err.to_string().contains("unknown selector \"k8s:ns\""));
        assert!(err.to_string().contains("unix:uid"));
        assert!(matches!(
            "unix:uid:-1".parse::<Selector>(),
            Err(SelectorError::BadValue {
                prefix: "unix:uid",
                ..
            })
        ));
        assert!("unix:path:relative/bin".parse::<Selector>().is_err());
        assert!("unix:sha256:abc".parse::<Selector>().is_err());
        assert!("systemd:unit:".parse::<Selector>().is_err());
        assert!("unix:user:".parse::<Selector>().is_err());
    }

    #[test]
    fn paths_and_values_that_no_caller_has_are_refused() {
        for path in [
            "/usr/../bin/sh",
            "/usr/./bin",
            "/usr//bin",
            "/usr/bin/",
            "/..",
        ] {
            let err = format!("unix:path:{path}").parse::<Selector>().unwrap_err();
            assert!(err.to_string().contains("normalised"), "{path}: {err}");
        }
        assert!("unix:path:/usr/bin/..python".parse::<Selector>().is_ok());
        assert_eq!(
            "systemd:unit:a\n.service".parse::<Selector>(),
            Err(SelectorError::Control)
        );
    }
}
