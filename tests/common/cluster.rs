//! Real server and agent processes for end-to-end tests of server mode: each with its own
//! config file, state directory and log file, killed when dropped (and when the test process
//! dies: see `tessera_harness::command`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tessera_harness::Process;

use super::TRUST_DOMAIN;

/// The binary under test.
pub const TESSERA: &str = env!("CARGO_BIN_EXE_tessera");

/// What servers are configured to bind first: the kernel picks a free port, which the server
/// logs (no window in which another process could take a port chosen beforehand).
const ANY_PORT: &str = "127.0.0.1:0";

/// Starts `tessera <args>` with its output appended to `log`.
fn spawn_logged(args: &[&str], log: &Path) -> Process {
    let mut command = tessera_harness::command(TESSERA);
    command.args(args).env("TESSERA_LOG", "info,tessera=debug");
    Process::spawn_logged(&mut command, format!("tessera {}", args.join(" ")), log)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `tessera <args> --admin-socket <admin_socket>`.
fn admin(admin_socket: &Path, args: &[&str]) -> Output {
    Command::new(TESSERA)
        .args(args)
        .arg("--admin-socket")
        .arg(admin_socket)
        .output()
        .unwrap()
}

/// True when `tessera <args>` against `admin_socket` succeeds.
fn admin_succeeds(admin_socket: &Path, args: &[&str]) -> bool {
    admin(admin_socket, args).status.success()
}

/// A `tessera server run` process.
pub struct ServerProcess {
    /// The process, while running.
    pub child: Option<Process>,
    /// Its configuration file.
    pub config_path: PathBuf,
    /// Its admin socket.
    pub admin_socket: PathBuf,
    /// `127.0.0.1:<port>` of its node API: the port it bound first (port 0 in its
    /// configuration), which a restart binds again.
    pub address: String,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
}

impl ServerProcess {
    /// Writes `dir/<name>.toml` (state in `dir/<name>`, `extra` TOML appended) and starts it.
    pub fn start(dir: &Path, name: &str, extra: &str) -> Self {
        let admin_socket = dir.join(format!("{name}-admin.sock"));
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config_path,
            format!(
                "trust_domain = \"{TRUST_DOMAIN}\"\nbind_address = \"{ANY_PORT}\"\nadmin_socket = \"{}\"\nstate_dir = \"{}\"\nmax_x509_ttl = \"1h\"\nnode_svid_ttl = \"1h\"\n{extra}\n",
                admin_socket.display(),
                dir.join(name).display(),
            ),
        )
        .unwrap();
        let mut server = Self {
            child: None,
            config_path,
            admin_socket,
            address: String::new(),
            log: dir.join(format!("{name}.log")),
        };
        server.restart();
        server
    }

    /// Starts the process again with the same configuration and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let config = self.config_path.display().to_string();
        self.child = Some(spawn_logged(
            &["server", "run", "--config", &config],
            &self.log,
        ));
        let admin_socket = self.admin_socket.clone();
        let ready = || admin_succeeds(&admin_socket, &["bundle", "show"]);
        let child = self.child.as_mut().unwrap();
        let bound = child
            .wait_for_logged("node API listening on ", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
        child
            .wait_ready("answering the admin API", Duration::from_secs(30), ready)
            .unwrap_or_else(|e| panic!("{e}"));
        if self.address.is_empty() {
            // Agents keep the address across server restarts: from now on bind this port.
            let config = std::fs::read_to_string(&self.config_path).unwrap();
            let pinned = config.replacen(
                &format!("bind_address = \"{ANY_PORT}\""),
                &format!("bind_address = \"{bound}\""),
                1,
            );
            std::fs::write(&self.config_path, pinned).unwrap();
            self.address = bound;
        } else {
            assert_eq!(bound, self.address, "the restarted server moved");
        }
    }

    /// Kills the process (SIGKILL: no draining).
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// Runs `tessera <args> --admin-socket <this server's>`.
    pub fn admin(&self, args: &[&str]) -> Output {
        admin(&self.admin_socket, args)
    }

    /// Like [`admin`](Self::admin) with `--output json`, asserting success; the parsed output.
    pub fn admin_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.admin(&all);
        assert!(
            out.status.success(),
            "tessera {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "tessera {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `tessera entry create` of `spiffe://<td><path>` for the test user's uid, on every node
    /// unless `extra` names nodes; the created entry's id.
    pub fn create_entry(&self, path: &str, extra: &[&str]) -> String {
        let selector = super::my_uid_selector();
        let id = format!("spiffe://{TRUST_DOMAIN}{path}");
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--selector",
            &selector,
            "--x509-ttl",
            "5m",
            "--owner",
            "tests",
            "--purpose",
            "end-to-end test",
        ];
        if !extra.contains(&"--node") && !extra.contains(&"--node-selector") {
            args.push("--all-nodes");
        }
        args.extend_from_slice(extra);
        let created = self.admin_json(&args);
        created["id"].as_str().expect("entry id in JSON").to_owned()
    }

    /// Writes the trust bundle as PEM to `path`.
    pub fn write_bundle(&self, path: &Path) {
        let out = self.admin(&["bundle", "show"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(path, &out.stdout).unwrap();
    }

    /// A new join token.
    pub fn join_token(&self) -> String {
        let out = self.admin(&["token", "create", "--ttl", "10m"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// The log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A `tessera agent run` process in server mode.
pub struct AgentProcess {
    /// The process, while running.
    pub child: Option<Process>,
    /// Its configuration file.
    pub config_path: PathBuf,
    /// Its Workload API socket.
    pub socket: PathBuf,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its log file.
    pub log: PathBuf,
}

impl AgentProcess {
    /// Writes `dir/<name>.toml` for server `address`, trusting `bundle`, attesting with the
    /// `attestation` TOML lines of the `[server]` table, and starts it (without waiting).
    pub fn spawn(dir: &Path, name: &str, address: &str, bundle: &Path, attestation: &str) -> Self {
        Self::spawn_with(dir, name, address, bundle, attestation, "")
    }

    /// Like [`spawn`](Self::spawn), with `top` TOML lines before the `[server]` table.
    pub fn spawn_with(
        dir: &Path,
        name: &str,
        address: &str,
        bundle: &Path,
        attestation: &str,
        top: &str,
    ) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let state_dir = dir.join(name);
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config_path,
            format!(
                "trust_domain = \"{TRUST_DOMAIN}\"\nsocket_path = \"{}\"\nstate_dir = \"{}\"\n{top}\n\n[server]\naddress = \"{address}\"\ntrust_bundle_file = \"{}\"\n{attestation}\n",
                socket.display(),
                state_dir.display(),
                bundle.display(),
            ),
        )
        .unwrap();
        let mut agent = Self {
            child: None,
            config_path,
            socket,
            state_dir,
            log: dir.join(format!("{name}.log")),
        };
        agent.spawn_again();
        agent
    }

    /// Like [`spawn`](Self::spawn), then waits until the socket is served.
    pub fn start(dir: &Path, name: &str, address: &str, bundle: &Path, attestation: &str) -> Self {
        let mut agent = Self::spawn(dir, name, address, bundle, attestation);
        agent.wait_ready();
        agent
    }

    /// Starts the process again with the same configuration.
    pub fn spawn_again(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let config = self.config_path.display().to_string();
        self.child = Some(spawn_logged(
            &["agent", "run", "--config", &config],
            &self.log,
        ));
    }

    /// The port of the metrics endpoint the running process bound (configure
    /// `metrics_address = "127.0.0.1:0"`), as it logged it.
    pub fn metrics_port(&mut self) -> u16 {
        let bound = self
            .child
            .as_mut()
            .expect("agent running")
            .wait_for_logged("metrics endpoint listening on ", Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
        bound
            .parse::<std::net::SocketAddr>()
            .unwrap_or_else(|e| panic!("{bound}: {e}"))
            .port()
    }

    /// Waits until the Workload API socket accepts connections.
    pub fn wait_ready(&mut self) {
        self.child
            .as_mut()
            .expect("agent running")
            .wait_for_socket(&self.socket, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Waits for the process to exit on its own; its status.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let status = self
            .child
            .as_mut()
            .expect("agent running")
            .wait_exit(limit)
            .unwrap_or_else(|e| panic!("{e}"));
        self.child = None;
        status
    }

    /// Kills the process.
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// `unix://` URI of the socket.
    pub fn uri(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// The log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A node CA and a node certificate signed by it (x509pop), written as PEM into `dir`:
/// returns (CA bundle file, node cert file, node key file).
pub fn x509pop_files(dir: &Path, name: &str, node_cn: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} node CA"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let node_key = KeyPair::generate().unwrap();
    let mut node_params = CertificateParams::new(vec![]).unwrap();
    node_params
        .distinguished_name
        .push(DnType::CommonName, node_cn);
    node_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    node_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let node_cert = node_params.signed_by(&node_key, &issuer).unwrap();
    let files = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-node.pem")),
        dir.join(format!("{name}-node-key.pem")),
    );
    std::fs::write(&files.0, ca_cert.pem()).unwrap();
    std::fs::write(&files.1, node_cert.pem()).unwrap();
    std::fs::write(&files.2, node_key.serialize_pem()).unwrap();
    files
}

/// The `[server]` lines for x509pop with these files.
pub fn x509pop_attestation(cert: &Path, key: &Path) -> String {
    format!(
        "[server.x509pop]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

/// The server link of a node whose state is in `state_dir`, for speaking to `address` with
/// that node's saved credentials (as a misbehaving or evicted node would).
pub fn node_link(
    address: &str,
    bundle: &Path,
    state_dir: &Path,
) -> tessera::agent::upstream::Upstream {
    let config = tessera::agent::config::UpstreamConfig {
        address: address.to_owned(),
        trust_bundle_file: bundle.to_path_buf(),
        attestation: tessera::agent::config::NodeAttestation::JoinToken("spent".into()),
    };
    let td = tessera::spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
    tessera::agent::upstream::Upstream::new(config, td, state_dir)
}
