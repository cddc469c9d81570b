//! The agent's TOML configuration: parsed into checked types, or refused with the file, key and
//! value at fault and what would be right.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::ca::LocalCaSource;
use crate::entry::{EntryFields, EntrySet, MAX_X509_TTL, RegistrationEntry};
pub use crate::events::recorder::AuditLimits;
use crate::policy::PolicySet;
use crate::spiffe::{SpiffeId, TrustDomain};

/// Default Workload API socket.
pub const DEFAULT_SOCKET_PATH: &str = "/run/tessera/agent.sock";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tessera/agent";
/// Executables larger than this are not hashed by default (256 MiB).
pub const DEFAULT_EXE_HASH_SIZE_LIMIT: u64 = 256 << 20;
/// Default window over which deliveries are counted into one `svid_used` event.
const DEFAULT_USE_WINDOW: Duration = Duration::from_secs(10);
/// The longest path a Unix socket can be bound to: `sun_path` is 108 bytes with its NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Default time a connection may stay open with no stream before it is closed.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a client gets to finish sending a request's headers.
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CA_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// How tasks are bounded (`[tasks]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLimits {
    /// A task's lifetime when its starter names none.
    pub default_ttl: Duration,
    /// The longest lifetime a task may ask for.
    pub max_ttl: Duration,
    /// A task ends after this long without any of its processes using its identity, unless
    /// its starter asked for less.
    pub idle_timeout: Duration,
    /// How deep delegation may go: a root task has depth 1.
    pub max_depth: u32,
}

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
            idle_timeout: Duration::from_secs(15 * 60),
            max_depth: 4,
        }
    }
}

/// The deepest delegation `tasks.max_depth` may allow: every level adds a link to each
/// certificate of the chain below it.
const MAX_TASK_DEPTH: u32 = 16;

pub use crate::config::ConfigError;
use crate::config::{parse_duration, parse_rfc3339};

/// A checked agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The file the configuration came from; entries are reloaded from it. `None` when the
    /// configuration was built in code (e.g. by `tessera dev`).
    pub file: Option<PathBuf>,
    /// The trust domain whose identities this agent serves.
    pub trust_domain: TrustDomain,
    /// Path of the Workload API socket.
    pub socket_path: PathBuf,
    /// Where the agent keeps its state (the standalone CA).
    pub state_dir: PathBuf,
    /// Serve bundles to callers that have no identity (verifier-only workloads).
    pub allow_unauthenticated_verifiers: bool,
    /// Executables larger than this fail attestation when an entry needs their hash.
    pub exe_hash_size_limit: u64,
    /// Where the signing CA comes from.
    pub ca: LocalCaSource,
    /// The registration entries (standalone mode; empty in server mode).
    pub entries: EntrySet,
    /// Server mode: where entries and the signing CA come from. `None`: standalone.
    pub server: Option<UpstreamConfig>,
    /// Deliveries of one SVID to one caller are counted this long, then reported as one event;
    /// in standalone mode refusals of one caller too.
    pub use_window: Duration,
    /// Standalone mode: when the audit log is rotated and how many rotated files are kept.
    pub audit_limits: AuditLimits,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None`: not served.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Standalone only: a root-only socket where `tessera svid revoke` and `tessera entry
    /// revoke` reach this agent (`--admin-socket`).
    pub admin_socket: Option<PathBuf>,
    /// Standalone only: the Cedar policy file, reloaded with the entries.
    pub policy_file: Option<PathBuf>,
    /// The policy read from `policy_file` by [`AgentConfig::load`] (never by `parse`, which
    /// reads no other file); `None` without one.
    pub policy: Option<Arc<PolicySet>>,
    /// A Workload API connection with no stream open for this long is closed.
    pub idle_timeout: Duration,
    /// A Workload API connection whose client takes longer than this over one request's
    /// headers is closed.
    pub header_timeout: Duration,
    /// Limits of task lifetimes and delegation (`[tasks]`).
    pub tasks: TaskLimits,
    /// Certificate files the agent keeps current for services that read files (`[[output]]`),
    /// read at start.
    pub outputs: Vec<crate::agent::output::Output>,
    /// How Envoy's Secret Discovery Service is served on the workload socket (`[sds]`).
    pub sds: crate::agent::sds::SdsOptions,
    /// Lifetime and cache of JWT-SVIDs (`[jwt]`).
    pub jwt: crate::agent::jwt::JwtOptions,
    /// Serve the WIT-SVID profile (`[wit] enabled`; off by default while the profile is
    /// Incubating).
    pub wit: bool,
}

/// How an agent in server mode reaches and attests to its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// `host:port` of the server's node API.
    pub address: String,
    /// PEM roots to trust the server by until the first bundle arrives from it.
    pub trust_bundle_file: PathBuf,
    /// How the node proves who it is.
    pub attestation: NodeAttestation,
}

/// A node attestation method.
#[derive(Clone, PartialEq, Eq)]
pub enum NodeAttestation {
    /// A one-time join token from `tessera token create`.
    JoinToken(String),
    /// A node certificate and its key (x509pop).
    X509Pop {
        /// PEM chain, node certificate first.
        cert_file: PathBuf,
        /// PEM PKCS#8 private key.
        key_file: PathBuf,
    },
}

impl std::fmt::Debug for NodeAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // A join token admits a node once: it never appears in Debug output or logs.
            Self::JoinToken(_) => f.write_str("JoinToken(<redacted>)"),
            Self::X509Pop {
                cert_file,
                key_file,
            } => f
                .debug_struct("X509Pop")
                .field("cert_file", cert_file)
                .field("key_file", key_file)
                .finish(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: String,
    socket_path: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    allow_unauthenticated_verifiers: bool,
    metrics_address: Option<String>,
    admin_socket: Option<PathBuf>,
    policy_file: Option<PathBuf>,
    #[serde(default)]
    attestation: RawAttestation,
    #[serde(default)]
    ca: RawCa,
    #[serde(default, rename = "entry")]
    entries: Vec<RawEntry>,
    server: Option<RawServer>,
    #[serde(default)]
    events: RawEvents,
    #[serde(default)]
    connections: RawConnections,
    #[serde(default)]
    tasks: RawTasks,
    #[serde(default, rename = "output")]
    outputs: Vec<RawOutput>,
    #[serde(default)]
    sds: RawSds,
    #[serde(default)]
    jwt: RawJwt,
    #[serde(default)]
    wit: RawWit,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWit {
    enabled: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    ttl: Option<String>,
    cache_size: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSds {
    #[serde(default)]
    disable_spiffe_cert_validation: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    spiffe_id: String,
    dir: PathBuf,
    exec: Option<String>,
    cert_mode: Option<String>,
    key_mode: Option<String>,
    owner: Option<String>,
    group: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTasks {
    default_ttl: Option<String>,
    max_ttl: Option<String>,
    idle_timeout: Option<String>,
    max_depth: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConnections {
    idle_timeout: Option<String>,
    header_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEvents {
    use_window: Option<String>,
    audit_log_max_bytes: Option<u64>,
    audit_log_keep: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    address: String,
    trust_bundle_file: PathBuf,
    join_token: Option<String>,
    x509pop: Option<RawX509Pop>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawX509Pop {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAttestation {
    exe_hash_size_limit: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCa {
    ttl: Option<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// An entry as written in the file, before checking.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawEntry {
    /// Optional stable id.
    pub id: Option<String>,
    /// The SPIFFE ID to grant.
    pub spiffe_id: String,
    /// Selectors the caller must show.
    pub selectors: Vec<String>,
    /// SVID lifetime, e.g. `5m`.
    pub x509_ttl: String,
    /// JWT-SVID lifetime, e.g. `10m`; absent: `[jwt] ttl`.
    pub jwt_ttl: Option<String>,
    /// Who answers for the identity.
    pub owner: String,
    /// What it is for.
    pub purpose: String,
    /// RFC 3339 instant after which nothing is issued.
    pub expires_at: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
    /// Optional DNS SANs.
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// `standing` (the default) or `task`.
    pub activation: Option<String>,
    /// Entry ids this entry's tasks may delegate to.
    #[serde(default)]
    pub delegates_to: Vec<String>,
    /// `key:value` labels.
    #[serde(default)]
    pub labels: Vec<String>,
}

impl AgentConfig {
    /// Reads and checks the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let mut config = Self::parse(&file, &text)?;
        config.file = Some(path.to_path_buf());
        config.policy = match &config.policy_file {
            None => None,
            Some(policy_file) => Some(Arc::new(load_policy(&file, policy_file, 1)?)),
        };
        Ok(config)
    }

    /// Checks configuration `text`; `file` names it in messages.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: &str, value: &str, reason: String| ConfigError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
            reason,
        };
        let trust_domain = TrustDomain::new(&raw.trust_domain).map_err(|e| {
            invalid(
                "trust_domain",
                &raw.trust_domain,
                format!("{e} (expected a name such as \"example.org\")"),
            )
        })?;
        let state_dir = raw
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let socket_path = raw
            .socket_path
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH));
        for (key, path) in [("socket_path", &socket_path), ("state_dir", &state_dir)] {
            if !path.is_absolute() {
                return Err(invalid(
                    key,
                    &path.display().to_string(),
                    "must be an absolute path".into(),
                ));
            }
        }
        let socket_path_len = socket_path.as_os_str().len();
        if socket_path_len > MAX_SOCKET_PATH {
            return Err(invalid(
                "socket_path",
                &socket_path.display().to_string(),
                format!(
                    "is {socket_path_len} bytes; a Unix socket path can be at most {MAX_SOCKET_PATH} bytes (sun_path), so choose a shorter one"
                ),
            ));
        }
        let ca_given = raw.ca.cert_file.is_some() || raw.ca.ttl.is_some();
        let ca = match (raw.ca.cert_file, raw.ca.key_file) {
            (Some(_), Some(_)) if raw.ca.ttl.is_some() => {
                return Err(invalid(
                    "ca.ttl",
                    raw.ca.ttl.as_deref().unwrap_or_default(),
                    "applies only to a CA the agent creates; remove it, or remove ca.cert_file and ca.key_file".into(),
                ));
            }
            (Some(cert), Some(key)) => LocalCaSource::Files { cert, key },
            (None, None) => {
                let ttl = match raw.ca.ttl.as_deref() {
                    None => DEFAULT_CA_TTL,
                    Some(text) => {
                        let ttl = parse_duration(text)
                            .map_err(|reason| invalid("ca.ttl", text, reason))?;
                        if ttl < Duration::from_secs(3600) {
                            return Err(invalid("ca.ttl", text, "must be at least 1h".into()));
                        }
                        ttl
                    }
                };
                LocalCaSource::Generated {
                    state_dir: state_dir.clone(),
                    ttl,
                }
            }
            (Some(cert), None) => {
                return Err(invalid(
                    "ca.cert_file",
                    &cert.display().to_string(),
                    "ca.key_file must be given too".into(),
                ));
            }
            (None, Some(key)) => {
                return Err(invalid(
                    "ca.key_file",
                    &key.display().to_string(),
                    "ca.cert_file must be given too".into(),
                ));
            }
        };
        if raw.attestation.exe_hash_size_limit == Some(0) {
            return Err(invalid(
                "attestation.exe_hash_size_limit",
                "0",
                "must be at least 1 (bytes); with 0 no executable could be hashed".into(),
            ));
        }
        let server = match raw.server {
            None => None,
            Some(server) => {
                if !raw.entries.is_empty() {
                    return Err(invalid(
                        "entry",
                        &format!("{} entries", raw.entries.len()),
                        "in server mode entries come from the server; remove [[entry]] or [server]"
                            .into(),
                    ));
                }
                if ca_given {
                    return Err(invalid(
                        "ca",
                        "[ca]",
                        "in server mode the server grants this node its CA; remove [ca] or [server]".into(),
                    ));
                }
                Some(check_server(file, server)?)
            }
        };
        let entries = check_entries(file, &trust_domain, raw.entries)?;
        let use_window = match raw.events.use_window.as_deref() {
            None => DEFAULT_USE_WINDOW,
            Some(text) => {
                let window =
                    parse_duration(text).map_err(|r| invalid("events.use_window", text, r))?;
                if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&window) {
                    return Err(invalid(
                        "events.use_window",
                        text,
                        "must be between 1s and 1h".into(),
                    ));
                }
                window
            }
        };
        let audit_limits = check_audit_limits(file, &raw.events)?;
        let idle_timeout = connection_timeout(
            file,
            "connections.idle_timeout",
            raw.connections.idle_timeout.as_deref(),
            DEFAULT_IDLE_TIMEOUT,
        )?;
        let header_timeout = connection_timeout(
            file,
            "connections.header_timeout",
            raw.connections.header_timeout.as_deref(),
            DEFAULT_HEADER_TIMEOUT,
        )?;
        let tasks = check_tasks(file, &raw.tasks)?;
        let jwt = check_jwt(file, &raw.jwt)?;
        let outputs = raw
            .outputs
            .iter()
            .enumerate()
            .map(|(index, output)| check_output(file, &trust_domain, index, output))
            .collect::<Result<Vec<_>, _>>()?;
        let metrics_address = match raw.metrics_address.as_deref() {
            None => None,
            Some(text) => Some(text.parse().map_err(|_| {
                invalid(
                    "metrics_address",
                    text,
                    "not an IP address and port; write e.g. \"127.0.0.1:9464\"".into(),
                )
            })?),
        };
        if let (Some(path), Some(_)) = (&raw.admin_socket, &server) {
            return Err(invalid(
                "admin_socket",
                &path.display().to_string(),
                "applies to a standalone agent; with a [server], revoke on the server's admin socket".into(),
            ));
        }
        if let Some(path) = &raw.policy_file {
            if server.is_some() {
                return Err(invalid(
                    "policy_file",
                    &path.display().to_string(),
                    "applies to a standalone agent; with a [server], set the policy there (tessera policy set)".into(),
                ));
            }
            if !path.is_absolute() {
                return Err(invalid(
                    "policy_file",
                    &path.display().to_string(),
                    "must be an absolute path".into(),
                ));
            }
        }
        Ok(Self {
            admin_socket: raw.admin_socket,
            policy_file: raw.policy_file,
            policy: None,
            file: None,
            trust_domain,
            socket_path,
            state_dir,
            allow_unauthenticated_verifiers: raw.allow_unauthenticated_verifiers,
            exe_hash_size_limit: raw
                .attestation
                .exe_hash_size_limit
                .unwrap_or(DEFAULT_EXE_HASH_SIZE_LIMIT),
            ca,
            entries,
            server,
            use_window,
            audit_limits,
            metrics_address,
            idle_timeout,
            header_timeout,
            tasks,
            outputs,
            sds: crate::agent::sds::SdsOptions {
                disable_spiffe_cert_validation: raw.sds.disable_spiffe_cert_validation,
            },
            jwt,
            wit: raw.wit.enabled.unwrap_or(false),
        })
    }
}

/// One `[[output]]` block, every value checked and named by its key when wrong.
fn check_output(
    file: &str,
    trust_domain: &TrustDomain,
    index: usize,
    raw: &RawOutput,
) -> Result<crate::agent::output::Output, ConfigError> {
    use crate::agent::output::{FileOptions, Output, parse_group, parse_mode, parse_owner};
    let key = |name: &str| format!("output[{index}].{name}");
    let spiffe_id = SpiffeId::parse(&raw.spiffe_id).map_err(|e| {
        ConfigError::invalid(file, &key("spiffe_id"), &raw.spiffe_id, e.to_string())
    })?;
    if spiffe_id.trust_domain() != *trust_domain {
        return Err(ConfigError::invalid(
            file,
            &key("spiffe_id"),
            &raw.spiffe_id,
            format!("must be in this agent's trust domain, {trust_domain}"),
        ));
    }
    let dir = raw.dir.display().to_string();
    if !raw.dir.is_absolute() {
        return Err(ConfigError::invalid(
            file,
            &key("dir"),
            &dir,
            "must be an absolute path",
        ));
    }
    if raw.exec.as_deref().is_some_and(|c| c.trim().is_empty()) {
        return Err(ConfigError::invalid(
            file,
            &key("exec"),
            "",
            "is empty; give a shell command such as \"systemctl reload nginx\", or leave it out",
        ));
    }
    let defaults = FileOptions::default();
    let mode = |name: &str, text: &Option<String>, default: u32| match text {
        None => Ok(default),
        Some(text) => parse_mode(text).map_err(|r| ConfigError::invalid(file, &key(name), text, r)),
    };
    Ok(Output {
        spiffe_id,
        dir: raw.dir.clone(),
        exec: raw.exec.clone(),
        files: FileOptions {
            cert_mode: mode("cert_mode", &raw.cert_mode, defaults.cert_mode)?,
            key_mode: mode("key_mode", &raw.key_mode, defaults.key_mode)?,
            owner: match &raw.owner {
                None => None,
                Some(text) => Some(
                    parse_owner(text)
                        .map_err(|r| ConfigError::invalid(file, &key("owner"), text, r))?,
                ),
            },
            group: match &raw.group {
                None => None,
                Some(text) => Some(
                    parse_group(text)
                        .map_err(|r| ConfigError::invalid(file, &key("group"), text, r))?,
                ),
            },
        },
    })
}

/// `[jwt]`: a token lifetime of 10 s to 24 h, a cache of 1 to 1,000,000 tokens.
fn check_jwt(file: &str, raw: &RawJwt) -> Result<crate::agent::jwt::JwtOptions, ConfigError> {
    let mut options = crate::agent::jwt::JwtOptions::default();
    if let Some(text) = raw.ttl.as_deref() {
        let ttl = parse_duration(text)
            .map_err(|reason| ConfigError::invalid(file, "jwt.ttl", text, reason))?;
        if !(Duration::from_secs(10)..=Duration::from_secs(24 * 3600)).contains(&ttl) {
            return Err(ConfigError::invalid(
                file,
                "jwt.ttl",
                text,
                "must be between 10s and 24h",
            ));
        }
        options.ttl = ttl;
    }
    if let Some(size) = raw.cache_size {
        if !(1..=1_000_000).contains(&size) {
            return Err(ConfigError::invalid(
                file,
                "jwt.cache_size",
                &size.to_string(),
                "must be between 1 and 1000000",
            ));
        }
        options.cache_size = size;
    }
    Ok(options)
}

fn check_tasks(file: &str, raw: &RawTasks) -> Result<TaskLimits, ConfigError> {
    let defaults = TaskLimits::default();
    let duration = |key: &str, text: Option<&str>, default: Duration| match text {
        None => Ok(default),
        Some(text) => {
            let value = parse_duration(text)
                .map_err(|reason| ConfigError::invalid(file, key, text, reason))?;
            if !(Duration::from_secs(1)..=Duration::from_secs(30 * 24 * 3600)).contains(&value) {
                return Err(ConfigError::invalid(
                    file,
                    key,
                    text,
                    "must be between 1s and 30d",
                ));
            }
            Ok(value)
        }
    };
    let max_ttl = duration("tasks.max_ttl", raw.max_ttl.as_deref(), defaults.max_ttl)?;
    let default_ttl = duration(
        "tasks.default_ttl",
        raw.default_ttl.as_deref(),
        defaults.default_ttl.min(max_ttl),
    )?;
    if default_ttl > max_ttl {
        return Err(ConfigError::invalid(
            file,
            "tasks.default_ttl",
            raw.default_ttl.as_deref().unwrap_or_default(),
            format!(
                "is longer than tasks.max_ttl ({}); a default must be a lifetime tasks may have",
                humantime::format_duration(max_ttl)
            ),
        ));
    }
    let idle_timeout = duration(
        "tasks.idle_timeout",
        raw.idle_timeout.as_deref(),
        defaults.idle_timeout,
    )?;
    let max_depth = raw.max_depth.unwrap_or(defaults.max_depth);
    if !(1..=MAX_TASK_DEPTH).contains(&max_depth) {
        return Err(ConfigError::invalid(
            file,
            "tasks.max_depth",
            &max_depth.to_string(),
            format!("must be between 1 (no delegation) and {MAX_TASK_DEPTH}"),
        ));
    }
    Ok(TaskLimits {
        default_ttl,
        max_ttl,
        idle_timeout,
        max_depth,
    })
}

/// Reads and checks the Cedar policy at `path` for configuration `file`, as `version`.
pub fn load_policy(file: &str, path: &Path, version: u64) -> Result<PolicySet, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.display().to_string(),
        source,
    })?;
    PolicySet::parse(&text, version, &path.display().to_string()).map_err(|e| ConfigError::Syntax {
        file: file.to_owned(),
        message: format!("policy_file: {e}"),
    })
}

/// Smallest audit log size before rotation: a few events. Anything smaller would rotate on
/// nearly every line.
const MIN_AUDIT_LOG_BYTES: u64 = 64 << 10;
/// Most rotated audit log files kept.
const MAX_AUDIT_LOG_KEEP: u32 = 100;

fn check_audit_limits(file: &str, raw: &RawEvents) -> Result<AuditLimits, ConfigError> {
    let defaults = AuditLimits::default();
    let max_bytes = raw.audit_log_max_bytes.unwrap_or(defaults.max_bytes);
    if max_bytes < MIN_AUDIT_LOG_BYTES {
        return Err(ConfigError::invalid(
            file,
            "events.audit_log_max_bytes",
            &max_bytes.to_string(),
            format!(
                "must be at least {MIN_AUDIT_LOG_BYTES} bytes (the default is {})",
                defaults.max_bytes
            ),
        ));
    }
    let keep = raw.audit_log_keep.unwrap_or(defaults.keep);
    if keep > MAX_AUDIT_LOG_KEEP {
        return Err(ConfigError::invalid(
            file,
            "events.audit_log_keep",
            &keep.to_string(),
            format!(
                "must be at most {MAX_AUDIT_LOG_KEEP} rotated files (the default is {})",
                defaults.keep
            ),
        ));
    }
    Ok(AuditLimits { max_bytes, keep })
}

/// A connection timeout at `key`: between 1 s and 24 h, `default` when absent.
fn connection_timeout(
    file: &str,
    key: &str,
    text: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(text) = text else {
        return Ok(default);
    };
    let timeout =
        parse_duration(text).map_err(|reason| ConfigError::invalid(file, key, text, reason))?;
    if !(Duration::from_secs(1)..=Duration::from_secs(24 * 3600)).contains(&timeout) {
        return Err(ConfigError::invalid(
            file,
            key,
            text,
            "must be between 1s and 24h",
        ));
    }
    Ok(timeout)
}

fn check_server(file: &str, raw: RawServer) -> Result<UpstreamConfig, ConfigError> {
    let port_ok = raw
        .address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(ConfigError::invalid(
            file,
            "server.address",
            &raw.address,
            "must be host:port, e.g. \"tessera-server.internal:8081\" or \"10.0.0.5:8081\"",
        ));
    }
    let attestation = match (raw.join_token, raw.x509pop) {
        (Some(token), None) if !token.trim().is_empty() => {
            NodeAttestation::JoinToken(token.trim().to_owned())
        }
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                file,
                "server.join_token",
                "",
                "is empty; create one with `tessera token create` on the server",
            ));
        }
        (None, Some(pop)) => NodeAttestation::X509Pop {
            cert_file: pop.cert_file,
            key_file: pop.key_file,
        },
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                file,
                "server.join_token",
                "<redacted>",
                "give either server.join_token or [server.x509pop], not both",
            ));
        }
        (None, None) => {
            return Err(ConfigError::invalid(
                file,
                "server",
                "[server]",
                "needs a node attestation method: server.join_token or [server.x509pop]",
            ));
        }
    };
    Ok(UpstreamConfig {
        address: raw.address,
        trust_bundle_file: raw.trust_bundle_file,
        attestation,
    })
}

/// Checks every raw entry; the first problem found is returned with its key.
pub fn check_entries(
    file: &str,
    trust_domain: &TrustDomain,
    raw: Vec<RawEntry>,
) -> Result<EntrySet, ConfigError> {
    let mut entries = Vec::with_capacity(raw.len());
    let mut ids = HashSet::new();
    let mut identities = HashSet::new();
    for (index, raw) in raw.into_iter().enumerate() {
        let entry = check_entry(file, trust_domain, index, raw)?;
        let key = |field: &str| format!("entry[{index}].{field}");
        if !ids.insert(entry.id.clone()) {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                key: key("id"),
                value: entry.id.clone(),
                reason: "another entry has the same id".into(),
            });
        }
        if !identities.insert((entry.spiffe_id.clone(), entry.selectors.clone())) {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                key: key("spiffe_id"),
                value: entry.spiffe_id.to_string(),
                reason: "another entry grants the same SPIFFE ID for the same selectors".into(),
            });
        }
        entries.push(entry);
    }
    Ok(EntrySet::new(entries))
}

fn check_entry(
    file: &str,
    trust_domain: &TrustDomain,
    index: usize,
    raw: RawEntry,
) -> Result<RegistrationEntry, ConfigError> {
    let key = |field: &str| format!("entry[{index}].{field}");
    let x509_ttl = parse_duration(&raw.x509_ttl)
        .map_err(|r| ConfigError::invalid(file, &key("x509_ttl"), &raw.x509_ttl, r))?;
    let jwt_ttl = match &raw.jwt_ttl {
        None => None,
        Some(text) => Some(
            parse_duration(text)
                .map_err(|r| ConfigError::invalid(file, &key("jwt_ttl"), text, r))?,
        ),
    };
    let expires_at = match &raw.expires_at {
        None => None,
        Some(text) => {
            let at = parse_rfc3339(text)
                .map_err(|r| ConfigError::invalid(file, &key("expires_at"), text, r))?;
            if at <= SystemTime::now() {
                tracing::warn!(file, key = %key("expires_at"), value = %text, "registration has already expired; nothing will be issued for it");
            }
            Some(at)
        }
    };
    let fields = EntryFields {
        id: raw.id,
        spiffe_id: raw.spiffe_id,
        selectors: raw.selectors,
        x509_ttl,
        jwt_ttl,
        owner: raw.owner,
        purpose: raw.purpose,
        expires_at,
        hint: raw.hint,
        dns_names: raw.dns_names,
        activation: raw.activation,
        delegates_to: raw.delegates_to,
        labels: raw.labels,
    };
    fields
        .check(trust_domain, MAX_X509_TTL)
        .map_err(|e| ConfigError::invalid(file, &key(&e.field), &e.value, e.reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
trust_domain = "example.org"
socket_path = "/tmp/t/agent.sock"
state_dir = "/tmp/t/state"

[[entry]]
spiffe_id = "spiffe://example.org/agent/coder"
selectors = ["unix:uid:1001", "systemd:unit:coder.service"]
x509_ttl = "5m"
owner = "ml-platform"
purpose = "coding agent"
expires_at = "2030-01-01T00:00:00+02:00"
hint = "primary"
dns_names = ["coder.internal"]

[[entry]]
id = "db-reader"
spiffe_id = "spiffe://example.org/db/reader"
selectors = ["unix:gid:70"]
x509_ttl = "1h"
owner = "data"
purpose = "read replicas"
"#;

    #[test]
    fn parses_a_full_config() {
        let config = AgentConfig::parse("agent.toml", GOOD).unwrap();
        assert_eq!(config.trust_domain.name(), "example.org");
        assert_eq!(config.entries.entries.len(), 2);
        let first = &config.entries.entries[0];
        assert!(first.id.starts_with("e-"));
        assert_eq!(first.x509_ttl, Duration::from_secs(300));
        assert_eq!(
            first.expires_at.unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_448_800)
        );
        assert_eq!(config.entries.entries[1].id, "db-reader");
        assert_eq!(config.exe_hash_size_limit, DEFAULT_EXE_HASH_SIZE_LIMIT);
        assert!(matches!(config.ca, LocalCaSource::Generated { .. }));
        assert_eq!(config.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(config.header_timeout, DEFAULT_HEADER_TIMEOUT);
    }

    #[test]
    fn a_socket_path_longer_than_sun_path_is_refused() {
        let fits = format!("/run/{}", "s".repeat(MAX_SOCKET_PATH - 5));
        let text = GOOD.replace("/tmp/t/agent.sock", &fits);
        assert!(AgentConfig::parse("agent.toml", &text).is_ok());
        let long = format!("/run/{}", "s".repeat(MAX_SOCKET_PATH - 4));
        let text = GOOD.replace("/tmp/t/agent.sock", &long);
        let err = AgentConfig::parse("agent.toml", &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("socket_path")
                && err.contains("is 108 bytes; a Unix socket path can be at most 107 bytes"),
            "{err}"
        );
    }

    #[test]
    fn connection_timeouts_are_read_and_checked() {
        let text =
            format!("{GOOD}\n[connections]\nidle_timeout = \"2m\"\nheader_timeout = \"3s\"\n");
        let config = AgentConfig::parse("agent.toml", &text).unwrap();
        assert_eq!(config.idle_timeout, Duration::from_secs(120));
        assert_eq!(config.header_timeout, Duration::from_secs(3));
        let text = format!("{GOOD}\n[connections]\nheader_timeout = \"0s\"\n");
        let err = AgentConfig::parse("agent.toml", &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("connections.header_timeout = \"0s\": must be between 1s and 24h"),
            "{err}"
        );
    }

    #[test]
    fn audit_log_limits_have_defaults_and_bounds() {
        let config = AgentConfig::parse("agent.toml", GOOD).unwrap();
        assert_eq!(config.audit_limits, AuditLimits::default());
        let with = |events: &str| {
            let text = GOOD.replacen(
                "\n[[entry]]",
                &format!("\n[events]\n{events}\n\n[[entry]]"),
                1,
            );
            AgentConfig::parse("agent.toml", &text)
        };
        let config = with("audit_log_max_bytes = 1048576\naudit_log_keep = 0").unwrap();
        assert_eq!(
            config.audit_limits,
            AuditLimits {
                max_bytes: 1 << 20,
                keep: 0
            }
        );
        let err = with("audit_log_max_bytes = 100").unwrap_err().to_string();
        assert!(
            err.contains(
                "agent.toml: events.audit_log_max_bytes = \"100\": must be at least 65536"
            ),
            "{err}"
        );
        let err = with("audit_log_keep = 1000").unwrap_err().to_string();
        assert!(
            err.contains("agent.toml: events.audit_log_keep = \"1000\": must be at most 100"),
            "{err}"
        );
    }

    #[test]
    fn jwt_lifetime_and_cache_are_configurable_and_checked() {
        let config = AgentConfig::parse("agent.toml", GOOD).unwrap();
        assert_eq!(config.jwt, crate::agent::jwt::JwtOptions::default());
        let with = |jwt: &str| {
            let text = GOOD.replacen("\n[[entry]]", &format!("\n[jwt]\n{jwt}\n\n[[entry]]"), 1);
            AgentConfig::parse("agent.toml", &text)
        };
        let config = with("ttl = \"90s\"\ncache_size = 50").unwrap();
        assert_eq!(config.jwt.ttl, Duration::from_secs(90));
        assert_eq!(config.jwt.cache_size, 50);
        for (body, says) in [
            (
                "ttl = \"1s\"",
                "agent.toml: jwt.ttl = \"1s\": must be between 10s and 24h",
            ),
            ("ttl = \"soon\"", "agent.toml: jwt.ttl = \"soon\""),
            (
                "cache_size = 0",
                "agent.toml: jwt.cache_size = \"0\": must be between 1",
            ),
            ("audience = \"x\"", "unknown field `audience`"),
        ] {
            let err = with(body).unwrap_err().to_string();
            assert!(err.contains(says), "{body}: {err}");
        }
        assert!(!config.wit, "the WIT-SVID profile is off unless asked for");
        let text = GOOD.replacen("\n[[entry]]", "\n[wit]\nenabled = true\n\n[[entry]]", 1);
        assert!(AgentConfig::parse("agent.toml", &text).unwrap().wit);
        let text = GOOD.replacen("\n[[entry]]", "\n[wit]\nenabled = \"yes\"\n\n[[entry]]", 1);
        let err = AgentConfig::parse("agent.toml", &text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agent.toml") && err.contains("enabled") && err.contains("boolean"),
            "{err}"
        );
    }

    #[test]
    fn sds_validation_form_is_configurable_and_checked() {
        let config = AgentConfig::parse("agent.toml", GOOD).unwrap();
        assert!(
            !config.sds.disable_spiffe_cert_validation,
            "SPIFFE validator by default"
        );
        let with = |sds: &str| {
            let text = GOOD.replacen("\n[[entry]]", &format!("\n[sds]\n{sds}\n\n[[entry]]"), 1);
            AgentConfig::parse("agent.toml", &text)
        };
        let config = with("disable_spiffe_cert_validation = true").unwrap();
        assert!(config.sds.disable_spiffe_cert_validation);
        let err = with("disable_spiffe_cert_validation = \"yes\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("agent.toml") && err.contains("disable_spiffe_cert_validation"),
            "{err}"
        );
        let err = with("validator = \"plain\"").unwrap_err().to_string();
        assert!(err.contains("unknown field `validator`"), "{err}");
    }

    #[test]
    fn output_blocks_are_read_and_each_bad_value_is_named_by_its_key() {
        let block = |body: &str| {
            format!("{GOOD}\n[[output]]\nspiffe_id = \"spiffe://example.org/db/reader\"\n{body}\n")
        };
        let text = block("dir = \"/etc/tls\"\nexec = \"true\"\nkey_mode = \"0640\"\ngroup = \"0\"");
        let config = AgentConfig::parse("agent.toml", &text).unwrap();
        let output = &config.outputs[0];
        assert_eq!(output.dir, PathBuf::from("/etc/tls"));
        assert_eq!(output.exec.as_deref(), Some("true"));
        assert_eq!(
            (output.files.key_mode, output.files.cert_mode),
            (0o640, 0o644)
        );
        assert_eq!(output.files.group, Some(nix::unistd::Gid::from_raw(0)));
        for (body, says) in [
            (
                "dir = \"tls\"",
                "output[0].dir = \"tls\": must be an absolute path",
            ),
            (
                "dir = \"/t\"\nkey_mode = \"0999\"",
                "output[0].key_mode = \"0999\": not a file mode",
            ),
            (
                "dir = \"/t\"\nowner = \"no-such-user-here\"",
                "output[0].owner = \"no-such-user-here\": no such user",
            ),
            ("dir = \"/t\"\nexec = \" \"", "output[0].exec"),
            ("dir = \"/t\"\nmode = \"0600\"", "unknown field `mode`"),
        ] {
            let err = AgentConfig::parse("agent.toml", &block(body))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("agent.toml"), "{err}");
            assert!(err.contains(says), "{body}: {err}");
        }
        let foreign = GOOD.to_owned()
            + "\n[[output]]\nspiffe_id = \"spiffe://elsewhere.test/x\"\ndir = \"/t\"\n";
        let err = AgentConfig::parse("agent.toml", &foreign)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("output[0].spiffe_id") && err.contains("example.org"),
            "{err}"
        );
    }

    fn error_for(replace: &str, with: &str) -> String {
        let text = GOOD.replacen(replace, with, 1);
        AgentConfig::parse("agent.toml", &text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn every_bad_value_is_named_with_file_key_and_reason() {
        let cases = [
            (
                "trust_domain = \"example.org\"",
                "trust_domain = \"Example.org\"",
                "agent.toml: trust_domain = \"Example.org\"",
            ),
            (
                "spiffe://example.org/agent/coder",
                "spiffe://example.org/agent//coder",
                "entry[0].spiffe_id",
            ),
            (
                "spiffe://example.org/agent/coder",
                "spiffe://other.org/agent",
                "is outside the trust domain example.org",
            ),
            (
                "unix:uid:1001",
                "unix:uid:alice",
                "entry[0].selectors[0] = \"unix:uid:alice\": unix:uid needs a decimal id",
            ),
            ("unix:uid:1001", "k8s:pod:x", "unknown selector \"k8s:pod\""),
            (
                "x509_ttl = \"5m\"",
                "x509_ttl = \"5 parsecs\"",
                "entry[0].x509_ttl = \"5 parsecs\": not a duration",
            ),
            (
                "x509_ttl = \"5m\"",
                "x509_ttl = \"1s\"",
                "must be between 2s and 30days",
            ),
            (
                "x509_ttl = \"5m\"",
                "x509_ttl = \"5m\"\njwt_ttl = \"5 parsecs\"",
                "entry[0].jwt_ttl = \"5 parsecs\": not a duration",
            ),
            (
                "x509_ttl = \"5m\"",
                "x509_ttl = \"5m\"\njwt_ttl = \"2d\"",
                "entry[0].jwt_ttl = \"2days\": must be between 10s and 1day",
            ),
            ("owner = \"ml-platform\"", "owner = \" \"", "entry[0].owner"),
            (
                "2030-01-01T00:00:00+02:00",
                "next tuesday",
                "entry[0].expires_at = \"next tuesday\": not an RFC 3339 time",
            ),
            ("coder.internal", "bad_name!", "entry[0].dns_names[0]"),
            ("id = \"db-reader\"", "id = \"has space\"", "entry[1].id"),
            (
                "selectors = [\"unix:gid:70\"]",
                "selectors = []",
                "entry[1].selectors",
            ),
            (
                "socket_path = \"/tmp/t/agent.sock\"",
                "socket_path = \"agent.sock\"",
                "socket_path = \"agent.sock\": must be an absolute path",
            ),
            (
                "state_dir = \"/tmp/t/state\"",
                "state_dir = \"/tmp/t/state\"\n[attestation]\nexe_hash_size_limit = 0",
                "attestation.exe_hash_size_limit = \"0\": must be at least 1",
            ),
            (
                "state_dir = \"/tmp/t/state\"",
                "state_dir = \"/tmp/t/state\"\n[ca]\nttl = \"1d\"\ncert_file = \"/c\"\nkey_file = \"/k\"",
                "ca.ttl = \"1d\": applies only to a CA the agent creates",
            ),
        ];
        for (from, to, want) in cases {
            let err = error_for(from, to);
            assert!(
                err.contains(want),
                "replacing {from:?} by {to:?}: got {err:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn syntax_errors_and_unknown_keys_name_the_file_and_line() {
        let err = error_for("x509_ttl = \"5m\"", "x509_ttl = 5m").to_string();
        assert!(
            err.starts_with("agent.toml: TOML parse error at line"),
            "{err}"
        );
        let err = error_for("hint = \"primary\"", "hnt = \"primary\"").to_string();
        assert!(err.contains("unknown field `hnt`"), "{err}");
        let err = error_for("owner = \"ml-platform\"\n", "").to_string();
        assert!(err.contains("missing field `owner`"), "{err}");
    }

    #[test]
    fn duplicates_are_refused() {
        let dup = format!(
            "{GOOD}\n[[entry]]\nid = \"db-reader\"\nspiffe_id = \"spiffe://example.org/x\"\nselectors = [\"unix:uid:1\"]\nx509_ttl = \"5m\"\nowner = \"o\"\npurpose = \"p\"\n"
        );
        let err = AgentConfig::parse("agent.toml", &dup)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("entry[2].id = \"db-reader\": another entry has the same id"),
            "{err}"
        );
        let same = format!(
            "{GOOD}\n[[entry]]\nspiffe_id = \"spiffe://example.org/db/reader\"\nselectors = [\"unix:gid:70\"]\nx509_ttl = \"5m\"\nowner = \"o\"\npurpose = \"p\"\n"
        );
        let err = AgentConfig::parse("agent.toml", &same)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("same SPIFFE ID for the same selectors"),
            "{err}"
        );
    }

    const SERVER_MODE: &str = r#"
trust_domain = "example.org"
socket_path = "/tmp/t/agent.sock"
state_dir = "/tmp/t/state"

[server]
address = "tessera.internal:8081"
trust_bundle_file = "/etc/tessera/bundle.pem"
join_token = "abc"
"#;

    #[test]
    fn server_mode_parses_and_refuses_what_does_not_belong() {
        let config = AgentConfig::parse("agent.toml", SERVER_MODE).unwrap();
        let server = config.server.unwrap();
        assert_eq!(server.address, "tessera.internal:8081");
        assert_eq!(server.attestation, NodeAttestation::JoinToken("abc".into()));
        assert!(config.entries.entries.is_empty());
        let shown = format!("{server:?}");
        assert!(
            shown.contains("JoinToken(<redacted>)") && !shown.contains("\"abc\""),
            "{shown}"
        );

        let pop = SERVER_MODE.replace(
            "join_token = \"abc\"",
            "[server.x509pop]\ncert_file = \"/n.pem\"\nkey_file = \"/k.pem\"",
        );
        let config = AgentConfig::parse("agent.toml", &pop).unwrap();
        assert!(matches!(
            config.server.unwrap().attestation,
            NodeAttestation::X509Pop { .. }
        ));

        let cases = [
            (
                SERVER_MODE.replace("tessera.internal:8081", "tessera.internal"),
                "server.address = \"tessera.internal\": must be host:port",
            ),
            (
                SERVER_MODE.replace("join_token = \"abc\"\n", ""),
                "server = \"[server]\": needs a node attestation method",
            ),
            (
                SERVER_MODE.replace("join_token = \"abc\"", "join_token = \" \""),
                "server.join_token = \"\": is empty",
            ),
            (
                format!(
                    "{SERVER_MODE}\n[[entry]]\nspiffe_id = \"spiffe://example.org/x\"\nselectors = [\"unix:uid:1\"]\nx509_ttl = \"5m\"\nowner = \"o\"\npurpose = \"p\"\n"
                ),
                "in server mode entries come from the server",
            ),
        ];
        for (text, want) in cases {
            let err = AgentConfig::parse("agent.toml", &text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "got {err:?}, want {want:?}");
        }
    }
}
