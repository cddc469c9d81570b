//! What a task SVID says about its task, in a non-critical certificate extension that relying
//! parties may read (and may ignore: the SPIFFE ID alone names the task).
//!
//! The extension's OID is [`TASK_EXTENSION_OID`]: an arc below Microsoft's published prefix
//! for OIDs made from a GUID (1.2.840.113556.1.8000.2554, then the GUID in seven numbers), which
//! needs no registration; tessera's GUID is `1c0a67b5-33ef-48e7-a17f-8ca198328fc8`, and the last
//! arc, 1, is the task claims. Its `extnValue` holds one DER UTF8String whose text is a JSON
//! object:
//!
//! ```json
//! {"v":1,"task_id":"0193...","entry_id":"coder","owner":"team-a","purpose":"fix issue 7",
//!  "chain":[{"task_id":"0193...","spiffe_id":"spiffe://td/agent/task/0193..."}, ...]}
//! ```
//!
//! `chain` runs from the root task down to this task, inclusive: a root task has one link.

use serde::{Deserialize, Serialize};

/// The OID of the task claims extension (see the module documentation).
pub const TASK_EXTENSION_OID: &[u64] = &[
    1, 2, 840, 113556, 1, 8000, 2554, 7178, 26549, 13295, 18663, 41343, 9216408, 3313608, 1,
];

/// The version of the JSON form this code writes and reads.
const CLAIMS_VERSION: u32 = 1;

/// The longest extension value accepted when reading one.
const MAX_CLAIMS_LEN: usize = 64 * 1024;

/// One task of a delegation chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLink {
    /// The task's id.
    pub task_id: String,
    /// The task's SPIFFE ID.
    pub spiffe_id: String,
}

/// What a task SVID carries about its task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskClaims {
    /// The task's id.
    pub task_id: String,
    /// The task-activated entry the task runs under.
    pub entry_id: String,
    /// Who answers for it: the entry's owner.
    pub owner: String,
    /// What the task is for, as its starter said.
    pub purpose: String,
    /// From the root task down to this one, inclusive.
    pub chain: Vec<TaskLink>,
}

#[derive(Serialize, Deserialize)]
struct Versioned<'a> {
    v: u32,
    #[serde(flatten)]
    claims: std::borrow::Cow<'a, TaskClaims>,
}

/// Why an extension could not be read as task claims.
#[derive(Debug, thiserror::Error)]
pub enum TaskClaimsError {
    /// The value is not one DER UTF8String.
    #[error("task extension is not a DER UTF8String")]
    NotUtf8String,
    /// The value is longer than anything tessera writes.
    #[error("task extension is {0} bytes, over the {MAX_CLAIMS_LEN}-byte limit")]
    TooLong(usize),
    /// The text is not the JSON object tessera writes.
    #[error("task extension JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// A version this code does not read.
    #[error("task extension version {0}; this build reads version {CLAIMS_VERSION}")]
    Version(u32),
    /// The certificate could not be parsed.
    #[error("certificate: {0}")]
    Certificate(String),
}

impl TaskClaims {
    /// The DER `extnValue` contents: a UTF8String of the JSON form.
    pub fn to_extension_value(&self) -> Vec<u8> {
        let text = serde_json::to_string(&Versioned {
            v: CLAIMS_VERSION,
            claims: std::borrow::Cow::Borrowed(self),
        })
        // Serialising plain strings into JSON cannot fail.
        .unwrap_or_default();
        der_utf8_string(text.as_bytes())
    }

    /// Reads claims from an extension value written by [`to_extension_value`](Self::to_extension_value).
    pub fn from_extension_value(value: &[u8]) -> Result<Self, TaskClaimsError> {
        if value.len() > MAX_CLAIMS_LEN {
            return Err(TaskClaimsError::TooLong(value.len()));
        }
        let text = read_der_utf8_string(value).ok_or(TaskClaimsError::NotUtf8String)?;
        let versioned: Versioned<'static> =
            serde_json::from_str(text).map_err(TaskClaimsError::Json)?;
        if versioned.v != CLAIMS_VERSION {
            return Err(TaskClaimsError::Version(versioned.v));
        }
        Ok(versioned.claims.into_owned())
    }

    /// The claims in a DER certificate, `None` when it has no task extension.
    pub fn from_certificate(der: &[u8]) -> Result<Option<Self>, TaskClaimsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TaskClaimsError::Certificate(e.to_string()))?;
        let oid = x509_parser::oid_registry::Oid::from(TASK_EXTENSION_OID)
            .map_err(|_| TaskClaimsError::Certificate("task extension OID".into()))?;
        cert.extensions()
            .iter()
            .find(|ext| ext.oid == oid)
            .map(|ext| Self::from_extension_value(ext.value))
            .transpose()
    }
}

/// DER UTF8String (tag 12) with a definite length.
fn der_utf8_string(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0x0c];
    let len = bytes.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let be = len.to_be_bytes();
        let skip = be.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (be.len() - skip) as u8);
        out.extend_from_slice(&be[skip..]);
    }
    out.extend_from_slice(bytes);
    out
}

/// The text of a DER UTF8String that fills `der` exactly; `None` for anything else (other tags,
/// indefinite or non-minimal lengths, trailing bytes, invalid UTF-8).
fn read_der_utf8_string(der: &[u8]) -> Option<&str> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, body) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count || rest[0] == 0 {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        if len < 0x80 {
            return None;
        }
        (len, &rest[count..])
    };
    if body.len() != len {
        return None;
    }
    std::str::from_utf8(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(purpose: &str) -> TaskClaims {
        TaskClaims {
            task_id: "t1".into(),
            entry_id: "coder".into(),
            owner: "team-a".into(),
            purpose: purpose.into(),
            chain: vec![TaskLink {
                task_id: "t1".into(),
                spiffe_id: "spiffe://td/coder/task/t1".into(),
            }],
        }
    }

    #[test]
    fn claims_round_trip_through_short_and_long_der_lengths() {
        for purpose in ["fix it", &"x".repeat(300), &"y".repeat(70_000 / 2)] {
            let value = claims(purpose).to_extension_value();
            assert_eq!(
                TaskClaims::from_extension_value(&value).unwrap(),
                claims(purpose)
            );
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        let good = claims("p").to_extension_value();
        let mut wrong_tag = good.clone();
        wrong_tag[0] = 0x04;
        assert!(TaskClaims::from_extension_value(&wrong_tag).is_err());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(TaskClaims::from_extension_value(&trailing).is_err());
        assert!(TaskClaims::from_extension_value(&good[..good.len() - 1]).is_err());
        // A long-form length for a short string is not DER.
        assert!(TaskClaims::from_extension_value(&[0x0c, 0x81, 0x01, b'x']).is_err());
        let future = der_utf8_string(
            br#"{"v":2,"task_id":"t","entry_id":"e","owner":"o","purpose":"p","chain":[]}"#,
        );
        assert!(matches!(
            TaskClaims::from_extension_value(&future),
            Err(TaskClaimsError::Version(2))
        ));
    }
}
