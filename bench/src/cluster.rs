//! A server and agents in server mode as child processes, for the scenarios that need them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tonic::transport::Channel;

use tessera_harness::Process;

use super::{BenchError, io_err, logged_address, start_tessera, start_tessera_logged};
use tessera::proto::tessera::admin_client::AdminClient;
use tessera::proto::tessera::{CreateJoinTokenRequest, GetBundleRequest};

/// The trust domain the scenarios' servers serve.
pub const TRUST_DOMAIN: &str = "bench.tessera";

/// A failure of an admin call, naming what was being done.
pub fn failed(what: &str) -> impl FnOnce(tonic::Status) -> BenchError + '_ {
    move |s| BenchError::Failed(format!("{what}: {:?} {}", s.code(), s.message()))
}

/// A running server with an admin client on its socket.
pub struct Server {
    /// The process; killed on drop.
    process: Process,
    /// Admin API client.
    pub admin: AdminClient<Channel>,
    /// The node API port on loopback.
    pub port: u16,
    /// The trust bundle, as PEM, for agents to bootstrap with.
    pub bundle: PathBuf,
    /// The configuration file, the admin socket and the log, for a restart.
    config: PathBuf,
    admin_socket: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Starts `tessera server run` in `dir` with `datastore` TOML (empty: SQLite). The server
    /// binds a port the kernel picks and logs it (in `dir/server.log`); no other process can
    /// take it between choosing and binding.
    pub async fn start(dir: &Path, datastore: &str) -> Result<Self, BenchError> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let admin_socket = dir.join("admin.sock");
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "trust_domain = \"{TRUST_DOMAIN}\"\nbind_address = \"127.0.0.1:0\"\nadmin_socket = \"{}\"\nstate_dir = \"{}\"\n{datastore}\n",
                admin_socket.display(),
                dir.join("server").display()
            ),
        )
        .map_err(io_err("writing the server configuration"))?;
        let log = dir.join("server.log");
        let mut process = start_server(&config, &admin_socket, &log)?;
        let port = logged_address(&mut process, "node API listening on ")?.port();
        // A restart binds the same port: nodes keep the address.
        let text =
            std::fs::read_to_string(&config).map_err(io_err("reading the server configuration"))?;
        std::fs::write(
            &config,
            text.replacen("127.0.0.1:0", &format!("127.0.0.1:{port}"), 1),
        )
        .map_err(io_err("pinning the server's port"))?;
        let mut admin = admin_client(&admin_socket).await?;
        let roots = admin
            .get_bundle(GetBundleRequest {})
            .await
            .map_err(failed("reading the bundle"))?
            .into_inner()
            .roots;
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, tessera::ca::to_pem("CERTIFICATE", &roots))
            .map_err(io_err("writing the bundle"))?;
        Ok(Self {
            process,
            admin,
            port,
            bundle,
            config,
            admin_socket,
            log,
        })
    }

    /// The server process.
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// Kills the server (SIGKILL: no draining) and starts it again with the same state and
    /// port; returns once it listens again.
    pub async fn restart(&mut self) -> Result<(), BenchError> {
        self.process.kill();
        self.process = start_server(&self.config, &self.admin_socket, &self.log)?;
        logged_address(&mut self.process, "node API listening on ")?;
        self.admin = admin_client(&self.admin_socket).await?;
        Ok(())
    }

    /// Writes the configuration of agent `name` (server mode, a fresh join token, and the
    /// top-level keys in `extra`) in `dir`; returns its config path, socket and state directory.
    pub async fn agent_config(
        &mut self,
        dir: &Path,
        name: &str,
        extra: &str,
    ) -> Result<AgentFiles, BenchError> {
        let token = self
            .admin
            .create_join_token(CreateJoinTokenRequest {
                ttl_seconds: 600,
                labels: vec![],
            })
            .await
            .map_err(failed("creating a join token"))?
            .into_inner()
            .token;
        let files = AgentFiles {
            config: dir.join(format!("{name}.toml")).display().to_string(),
            socket: dir.join(format!("{name}.sock")),
            state: dir.join(name),
        };
        std::fs::write(
            &files.config,
            format!(
                "trust_domain = \"{TRUST_DOMAIN}\"\nsocket_path = \"{}\"\nstate_dir = \"{}\"\n{extra}\n[server]\naddress = \"127.0.0.1:{}\"\ntrust_bundle_file = \"{}\"\njoin_token = \"{token}\"\n",
                files.socket.display(),
                files.state.display(),
                self.port,
                self.bundle.display()
            ),
        )
        .map_err(io_err("writing an agent configuration"))?;
        Ok(files)
    }
}

fn start_server(config: &Path, admin_socket: &Path, log: &Path) -> Result<Process, BenchError> {
    let config = config.display().to_string();
    start_tessera_logged(
        &["server", "run", "--config", &config],
        admin_socket,
        log,
        "warn,tessera::server::app=info",
    )
}

async fn admin_client(admin_socket: &Path) -> Result<AdminClient<Channel>, BenchError> {
    let channel = tessera::cli::client::channel(admin_socket)
        .await
        .map_err(|f| BenchError::Failed(f.message))?;
    Ok(AdminClient::new(channel))
}

/// Where an agent's configuration, socket and state live.
pub struct AgentFiles {
    /// The configuration file.
    pub config: String,
    /// The Workload API socket.
    pub socket: PathBuf,
    /// The state directory.
    pub state: PathBuf,
}

impl AgentFiles {
    /// Starts `tessera agent run` with this configuration and waits for its socket.
    pub fn start(&self) -> Result<Process, BenchError> {
        start_tessera(&["agent", "run", "--config", &self.config], &self.socket)
    }

    /// Starts the agent as [`AgentFiles::start`] does, configured with `metrics_address` on
    /// port 0, and returns it with the metrics address it bound, as it logged it (in
    /// `<state>.log`).
    pub fn start_with_metrics(&self) -> Result<(Process, SocketAddr), BenchError> {
        let mut log = self.state.clone().into_os_string();
        log.push(".log");
        let mut process = start_tessera_logged(
            &["agent", "run", "--config", &self.config],
            &self.socket,
            Path::new(&log),
            "warn,tessera::agent::app=info",
        )?;
        let metrics = logged_address(&mut process, "metrics endpoint listening on ")?;
        Ok((process, metrics))
    }
}
