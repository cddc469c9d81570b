//! What the agent's and the server's configuration files share: the error that names file, key
//! and value, and the parsers for durations and instants.

use std::time::{Duration, SystemTime};

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The configuration file.
        file: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not have the expected shape.
    #[error("{file}: {message}")]
    Syntax {
        /// The configuration file.
        file: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is well-formed TOML but not acceptable.
    #[error("{file}: {key} = {value:?}: {reason}")]
    Invalid {
        /// The configuration file.
        file: String,
        /// The key at fault, e.g. `entry[2].selectors[0]`.
        key: String,
        /// The value found.
        value: String,
        /// Why it is wrong and what would be right.
        reason: String,
    },
}

impl ConfigError {
    /// An unacceptable `value` at `key` of `file`.
    pub fn invalid(file: &str, key: &str, value: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Reads a TOML file and deserializes it, naming the file in every error.
pub fn read_toml<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<(String, T), ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    let raw = parse_toml(&file, &text)?;
    Ok((file, raw))
}

/// Deserializes TOML `text`; `file` names it in errors.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    file: &str,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Syntax {
        file: file.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// Parses a duration such as `90s`, `5m` or `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("not a duration ({e}); write e.g. \"90s\", \"5m\" or \"1h\""))
}

/// Parses an RFC 3339 instant such as `2027-01-31T18:00:00Z`.
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time ({e}); write e.g. \"2027-01-31T18:00:00Z\""))?;
    Ok(SystemTime::from(at))
}
