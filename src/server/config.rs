//! The server's TOML configuration: parsed into checked types, or refused with the file, key and
//! value at fault and what would be right.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, parse_duration, parse_toml, read_toml};
use crate::entry::{MAX_X509_TTL, MIN_X509_TTL};
use crate::spiffe::TrustDomain;

/// Default node API address.
pub const DEFAULT_BIND_ADDRESS: &str = "0.0.0.0:8081";
/// Default admin socket: root-only, and away from the agents' public socket directory.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tessera-server/admin.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tessera/server";
const DEFAULT_MAX_X509_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_EVENTS_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);
const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// A node CA lives at least this many times the longest SVID TTL it may sign, so that it is
/// renewed (at half-life) long before any SVID it signs would be cut short.
pub const NODE_CA_TTL_FACTOR: u32 = 6;

/// Where the server keeps its records.
#[derive(Clone, PartialEq, Eq)]
pub enum DatastoreConfig {
    /// An embedded SQLite database file (one server process).
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A PostgreSQL database shared by every replica.
    Postgres {
        /// libpq-style connection string.
        connection: String,
    },
}

impl std::fmt::Debug for DatastoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite { path } => f.debug_struct("Sqlite").field("path", path).finish(),
            // The connection string may carry a password.
            Self::Postgres { .. } => f
                .debug_struct("Postgres")
                .field("connection", &"<redacted>")
                .finish(),
        }
    }
}

/// Where the root CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// Created on first start in the state directory.
    Generated {
        /// Lifetime of a newly created root.
        ttl: Duration,
    },
    /// An operator's CA certificate and PKCS#8 key, both PEM.
    Files {
        /// The CA certificate.
        cert: PathBuf,
        /// Its private key.
        key: PathBuf,
    },
}

/// A checked server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The trust domain this server is the root of.
    pub trust_domain: TrustDomain,
    /// Node API address (TCP, TLS).
    pub bind_address: SocketAddr,
    /// Admin API socket.
    pub admin_socket: PathBuf,
    /// Root key, server id and (by default) the SQLite database live here.
    pub state_dir: PathBuf,
    /// The longest X.509-SVID TTL an entry may ask for.
    pub max_x509_ttl: Duration,
    /// Lifetime of node intermediate CAs.
    pub node_ca_ttl: Duration,
    /// Lifetime of node SVIDs.
    pub node_svid_ttl: Duration,
    /// Root CA source.
    pub root: RootSource,
    /// Datastore.
    pub datastore: DatastoreConfig,
    /// CA certificates node certificates must chain to for x509pop; `None`: x509pop disabled.
    pub x509pop_ca_bundle: Option<PathBuf>,
    /// Events older than this are pruned, once the SVID they concern has expired.
    pub events_retention: Duration,
    /// What an issuance anomaly (an SVID a node may not have issued) sets off.
    pub on_anomaly: OnAnomaly,
    /// The deepest delegation chain the server accepts from a node's events; a deeper task is
    /// an anomaly.
    pub max_task_depth: u32,
    /// JWT-SVID signing (`[jwt]`).
    pub jwt: JwtSigning,
}

/// How the server signs JWT-SVIDs (`[jwt]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwtSigning {
    /// The longest lifetime a token gets (`jwt.max_ttl`), whatever an agent asks for.
    pub max_ttl: Duration,
    /// How long the replica signs with one key (`jwt.key_ttl`). Its successor is published in
    /// the bundle half-way through, and used only once this has passed.
    pub key_ttl: Duration,
}

/// The default of `jwt.max_ttl`.
pub const DEFAULT_MAX_JWT_TTL: Duration = Duration::from_secs(3600);
/// The default of `jwt.key_ttl`.
pub const DEFAULT_JWT_KEY_TTL: Duration = Duration::from_secs(24 * 3600);

impl Default for JwtSigning {
    fn default() -> Self {
        Self {
            max_ttl: DEFAULT_MAX_JWT_TTL,
            key_ttl: DEFAULT_JWT_KEY_TTL,
        }
    }
}

/// The default of `max_task_depth`, as agents' `tasks.max_depth`.
pub const DEFAULT_MAX_TASK_DEPTH: u32 = 4;

/// What the server does when a node reports issuing an identity no entry it may serve grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnAnomaly {
    /// Revoke the anomalous SVID (the default).
    Revoke,
    /// Revoke it and evict the node, revoking its intermediate CAs in the root's CRL.
    Evict,
    /// Only record the anomaly.
    Record,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: String,
    bind_address: Option<String>,
    admin_socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    max_x509_ttl: Option<String>,
    node_ca_ttl: Option<String>,
    node_svid_ttl: Option<String>,
    on_anomaly: Option<String>,
    max_task_depth: Option<u32>,
    #[serde(default)]
    ca: RawCa,
    #[serde(default)]
    datastore: RawDatastore,
    #[serde(default)]
    x509pop: RawX509Pop,
    #[serde(default)]
    events: RawEvents,
    #[serde(default)]
    jwt: RawJwt,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    max_ttl: Option<String>,
    key_ttl: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    retention: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCa {
    ttl: Option<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatastore {
    kind: Option<String>,
    path: Option<PathBuf>,
    connection: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawX509Pop {
    ca_bundle_file: Option<PathBuf>,
}

impl ServerConfig {
    /// Reads and checks the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (file, raw) = read_toml::<RawConfig>(path)?;
        Self::check(&file, raw)
    }

    /// Checks configuration `text`; `file` names it in messages.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        Self::check(file, parse_toml(file, text)?)
    }

    fn check(file: &str, raw: RawConfig) -> Result<Self, ConfigError> {
        let invalid =
            |key: &str, value: &str, reason: String| ConfigError::invalid(file, key, value, reason);
        let trust_domain = TrustDomain::new(&raw.trust_domain).map_err(|e| {
            invalid(
                "trust_domain",
                &raw.trust_domain,
                format!("{e} (expected a name such as \"example.org\")"),
            )
        })?;
        let bind_text = raw
            .bind_address
            .unwrap_or_else(|| DEFAULT_BIND_ADDRESS.to_owned());
        let bind_address: SocketAddr = bind_text.parse().map_err(|_| {
            invalid(
                "bind_address",
                &bind_text,
                "not an IP address and port; write e.g. \"0.0.0.0:8081\" or \"[::1]:8081\"".into(),
            )
        })?;
        let state_dir = raw
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let admin_socket = raw
            .admin_socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
        for (key, path) in [("admin_socket", &admin_socket), ("state_dir", &state_dir)] {
            if !path.is_absolute() {
                return Err(invalid(
                    key,
                    &path.display().to_string(),
                    "must be an absolute path".into(),
                ));
            }
        }
        let duration = |key: &str, text: Option<&str>, default: Duration| match text {
            None => Ok(default),
            Some(text) => parse_duration(text).map_err(|reason| invalid(key, text, reason)),
        };
        let max_x509_ttl = duration(
            "max_x509_ttl",
            raw.max_x509_ttl.as_deref(),
            DEFAULT_MAX_X509_TTL,
        )?;
        if !(MIN_X509_TTL..=MAX_X509_TTL).contains(&max_x509_ttl) {
            return Err(invalid(
                "max_x509_ttl",
                raw.max_x509_ttl.as_deref().unwrap_or_default(),
                "must be between 2s and 30days".into(),
            ));
        }
        let min_node_ca_ttl = max_x509_ttl * NODE_CA_TTL_FACTOR;
        let node_ca_ttl = duration(
            "node_ca_ttl",
            raw.node_ca_ttl.as_deref(),
            min_node_ca_ttl.max(Duration::from_secs(6 * 3600)),
        )?;
        if node_ca_ttl < min_node_ca_ttl {
            return Err(invalid(
                "node_ca_ttl",
                raw.node_ca_ttl.as_deref().unwrap_or_default(),
                format!(
                    "must be at least {NODE_CA_TTL_FACTOR} x max_x509_ttl ({}), so that no SVID is cut short by its node CA",
                    humantime::format_duration(min_node_ca_ttl)
                ),
            ));
        }
        // As long as the node CA by default: both renew together, and a node that lost its
        // server for a while can still renew when it is back, for as long as its CA lives.
        let node_svid_ttl = duration("node_svid_ttl", raw.node_svid_ttl.as_deref(), node_ca_ttl)?;
        if node_svid_ttl < Duration::from_secs(10) {
            return Err(invalid(
                "node_svid_ttl",
                raw.node_svid_ttl.as_deref().unwrap_or_default(),
                "must be at least 10s".into(),
            ));
        }
        let root = match (raw.ca.cert_file, raw.ca.key_file, raw.ca.ttl) {
            (Some(_), Some(_), Some(ttl)) => {
                return Err(invalid(
                    "ca.ttl",
                    &ttl,
                    "applies only to a root the server creates; remove it, or remove ca.cert_file and ca.key_file".into(),
                ));
            }
            (Some(cert), Some(key), None) => RootSource::Files { cert, key },
            (None, None, ttl) => {
                let ttl = duration("ca.ttl", ttl.as_deref(), DEFAULT_ROOT_TTL)?;
                // A node CA TTL so long that twice it is no Duration leaves no root TTL long
                // enough.
                if node_ca_ttl.checked_mul(2).is_none_or(|twice| ttl < twice) {
                    return Err(invalid(
                        "ca.ttl",
                        &humantime::format_duration(ttl).to_string(),
                        format!(
                            "must be at least twice node_ca_ttl ({})",
                            humantime::format_duration(node_ca_ttl)
                        ),
                    ));
                }
                RootSource::Generated { ttl }
            }
            (Some(cert), None, _) => {
                return Err(invalid(
                    "ca.cert_file",
                    &cert.display().to_string(),
                    "ca.key_file must be given too".into(),
                ));
            }
            (None, Some(key), _) => {
                return Err(invalid(
                    "ca.key_file",
                    &key.display().to_string(),
                    "ca.cert_file must be given too".into(),
                ));
            }
        };
        let datastore = match raw.datastore.kind.as_deref().unwrap_or("sqlite") {
            "sqlite" => {
                if let Some(connection) = &raw.datastore.connection {
                    return Err(invalid(
                        "datastore.connection",
                        connection,
                        "applies to kind = \"postgres\" only; SQLite takes datastore.path".into(),
                    ));
                }
                DatastoreConfig::Sqlite {
                    path: raw
                        .datastore
                        .path
                        .unwrap_or_else(|| state_dir.join("tessera.db")),
                }
            }
            "postgres" => {
                if let Some(path) = &raw.datastore.path {
                    return Err(invalid(
                        "datastore.path",
                        &path.display().to_string(),
                        "applies to kind = \"sqlite\" only; PostgreSQL takes datastore.connection"
                            .into(),
                    ));
                }
                let Some(connection) = raw.datastore.connection.filter(|c| !c.trim().is_empty())
                else {
                    return Err(invalid(
                        "datastore.connection",
                        "",
                        "is required with kind = \"postgres\", e.g. \"host=db.internal dbname=tessera user=tessera\"".into(),
                    ));
                };
                DatastoreConfig::Postgres { connection }
            }
            other => {
                return Err(invalid(
                    "datastore.kind",
                    other,
                    "must be \"sqlite\" or \"postgres\"".into(),
                ));
            }
        };
        let events_retention = duration(
            "events.retention",
            raw.events.retention.as_deref(),
            DEFAULT_EVENTS_RETENTION,
        )?;
        if events_retention < Duration::from_secs(3600) {
            return Err(invalid(
                "events.retention",
                raw.events.retention.as_deref().unwrap_or_default(),
                "must be at least 1h".into(),
            ));
        }
        let on_anomaly = match raw.on_anomaly.as_deref() {
            None | Some("revoke") => OnAnomaly::Revoke,
            Some("evict") => OnAnomaly::Evict,
            Some("record") => OnAnomaly::Record,
            Some(other) => {
                return Err(invalid(
                    "on_anomaly",
                    other,
                    "must be \"revoke\" (the default: revoke the SVID), \"evict\" (revoke it and evict the node) or \"record\" (only record it)".into(),
                ));
            }
        };
        let max_task_depth = raw.max_task_depth.unwrap_or(DEFAULT_MAX_TASK_DEPTH);
        if !(1..=16).contains(&max_task_depth) {
            return Err(invalid(
                "max_task_depth",
                &max_task_depth.to_string(),
                "must be between 1 (no delegation) and 16".into(),
            ));
        }
        let max_jwt_ttl = duration(
            "jwt.max_ttl",
            raw.jwt.max_ttl.as_deref(),
            DEFAULT_MAX_JWT_TTL,
        )?;
        if !(Duration::from_secs(10)..=Duration::from_secs(24 * 3600)).contains(&max_jwt_ttl) {
            return Err(invalid(
                "jwt.max_ttl",
                raw.jwt.max_ttl.as_deref().unwrap_or_default(),
                "must be between 10s and 24h".into(),
            ));
        }
        let jwt_key_ttl = duration(
            "jwt.key_ttl",
            raw.jwt.key_ttl.as_deref(),
            DEFAULT_JWT_KEY_TTL,
        )?;
        if jwt_key_ttl < Duration::from_secs(60) || jwt_key_ttl > Duration::from_secs(365 * 86400) {
            return Err(invalid(
                "jwt.key_ttl",
                raw.jwt.key_ttl.as_deref().unwrap_or_default(),
                "must be between 1m and 365days".into(),
            ));
        }
        Ok(Self {
            jwt: JwtSigning {
                max_ttl: max_jwt_ttl,
                key_ttl: jwt_key_ttl,
            },
            on_anomaly,
            max_task_depth,
            trust_domain,
            bind_address,
            admin_socket,
            state_dir,
            max_x509_ttl,
            node_ca_ttl,
            node_svid_ttl,
            root,
            datastore,
            x509pop_ca_bundle: raw.x509pop.ca_bundle_file,
            events_retention,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
trust_domain = "example.org"
bind_address = "127.0.0.1:8081"
admin_socket = "/run/t/admin.sock"
state_dir = "/var/lib/t"
max_x509_ttl = "30m"
node_ca_ttl = "4h"

[datastore]
kind = "sqlite"

[x509pop]
ca_bundle_file = "/etc/t/node-ca.pem"
"#;

    #[test]
    fn the_connection_string_stays_out_of_debug_output() {
        let text = GOOD.replace(
            "kind = \"sqlite\"",
            "kind = \"postgres\"\nconnection = \"host=db user=t password=hunter2\"",
        );
        let config = ServerConfig::parse("server.toml", &text).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("Postgres"), "{shown}");
    }

    #[test]
    fn parses_a_full_config_with_defaults() {
        let config = ServerConfig::parse("server.toml", GOOD).unwrap();
        assert_eq!(config.trust_domain.name(), "example.org");
        assert_eq!(config.max_x509_ttl, Duration::from_secs(1800));
        assert_eq!(config.node_ca_ttl, Duration::from_secs(4 * 3600));
        assert_eq!(
            config.datastore,
            DatastoreConfig::Sqlite {
                path: PathBuf::from("/var/lib/t/tessera.db")
            }
        );
        assert!(matches!(config.root, RootSource::Generated { .. }));
        let minimal = ServerConfig::parse("s.toml", "trust_domain = \"td\"").unwrap();
        assert_eq!(minimal.node_ca_ttl, Duration::from_secs(6 * 3600));
    }

    #[test]
    fn bad_values_name_file_key_and_what_is_right() {
        let cases = [
            (
                "node_ca_ttl = \"4h\"",
                "node_ca_ttl = \"2h\"",
                "server.toml: node_ca_ttl = \"2h\": must be at least 6 x max_x509_ttl (3h)",
            ),
            (
                "127.0.0.1:8081",
                "localhost",
                "bind_address = \"localhost\": not an IP address and port",
            ),
            (
                "kind = \"sqlite\"",
                "kind = \"mysql\"",
                "datastore.kind = \"mysql\": must be \"sqlite\" or \"postgres\"",
            ),
            (
                "kind = \"sqlite\"",
                "kind = \"postgres\"",
                "datastore.connection = \"\": is required",
            ),
            (
                "max_x509_ttl = \"30m\"",
                "max_x509_ttl = \"forever\"",
                "max_x509_ttl = \"forever\": not a duration",
            ),
            (
                "/run/t/admin.sock",
                "admin.sock",
                "admin_socket = \"admin.sock\": must be an absolute path",
            ),
            (
                "node_ca_ttl = \"4h\"",
                "node_ca_ttl = \"500000000000y\"",
                ": must be at least twice node_ca_ttl",
            ),
        ];
        for (from, to, want) in cases {
            let err = ServerConfig::parse("server.toml", &GOOD.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want),
                "{from} -> {to}: got {err:?}, want {want:?}"
            );
        }
        let err = ServerConfig::parse("server.toml", &format!("{GOOD}\nbogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `bogus`"), "{err}");
        // [jwt]: defaults, and bounds that name the key.
        assert_eq!(
            ServerConfig::parse("server.toml", GOOD).unwrap().jwt,
            JwtSigning::default()
        );
        let jwt =
            |body: &str| ServerConfig::parse("server.toml", &format!("{GOOD}\n[jwt]\n{body}\n"));
        let set = jwt("max_ttl = \"10m\"\nkey_ttl = \"7d\"").unwrap().jwt;
        assert_eq!(set.max_ttl, Duration::from_secs(600));
        assert_eq!(set.key_ttl, Duration::from_secs(7 * 86400));
        for (body, want) in [
            (
                "max_ttl = \"5s\"",
                "server.toml: jwt.max_ttl = \"5s\": must be between 10s and 24h",
            ),
            (
                "key_ttl = \"30s\"",
                "server.toml: jwt.key_ttl = \"30s\": must be between 1m and 365days",
            ),
            (
                "max_ttl = \"soon\"",
                "jwt.max_ttl = \"soon\": not a duration",
            ),
            ("audience = \"x\"", "unknown field `audience`"),
        ] {
            let err = jwt(body).unwrap_err().to_string();
            assert!(err.contains(want), "{body}: got {err:?}, want {want:?}");
        }
    }
}
