//! The server's composition root: [`build`] opens the datastore, loads the root, publishes it to
//! the bundle, starts the snapshot hub and binds the node API (TCP, TLS) and the admin API
//! (root-only Unix socket). It returns a handle with the bound addresses and a shutdown trigger.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use super::State;
use super::admin_api::AdminService;
use super::config::{DatastoreConfig, ServerConfig};
use super::node_api::{NodeService, x509pop_verifier};
use super::root::{load_or_create_root, load_or_create_server_id};
use super::sync::{load_snapshot, run_hub};
use crate::agent::endpoint::{EndpointError, bind_private};
use crate::ca::node::sign_server_svid;
use crate::ca::{CaError, SigningCa};
use crate::proto::tessera::admin_server::AdminServer;
use crate::proto::tessera::node_server::NodeServer;
use crate::store::{BundleRoot, Datastore, StoreError, unix_seconds};
use crate::tls::{TlsError, server_config};

/// Lifetime of the serving certificate; renewed at half-life.
const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long streams get to end after shutdown before connections are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The state directory could not be created.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The root CA could not be loaded or created.
    #[error("root CA: {0}")]
    Root(#[from] CaError),
    /// The datastore could not be opened or read.
    #[error("datastore: {0}")]
    Store(#[from] StoreError),
    /// The x509pop CA bundle could not be loaded.
    #[error("x509pop.ca_bundle_file: {0}")]
    X509Pop(String),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The node API port could not be bound.
    #[error("node API {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The admin socket could not be set up.
    #[error("admin socket: {0}")]
    Admin(#[from] EndpointError),
    /// A gRPC server failed.
    #[error("{0}")]
    Serve(String),
}

/// A running server.
pub struct ServerHandle {
    /// The bound node API address (the real port when configured with port 0).
    pub node_address: SocketAddr,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// This replica's id.
    pub server_id: String,
    /// Set to `true` to drain and stop.
    shutdown: watch::Sender<bool>,
    /// The two API servers; end after draining.
    servers: JoinHandle<Result<(), ServerError>>,
}

impl ServerHandle {
    /// Starts draining.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) -> Result<(), ServerError> {
        self.servers
            .await
            .map_err(|e| ServerError::Serve(e.to_string()))?
    }

    /// Drains and waits.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.shutdown();
        self.wait().await
    }
}

async fn signalled(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Opens the configured datastore, applying migrations.
pub async fn open_store(config: &DatastoreConfig) -> Result<Arc<dyn Datastore>, StoreError> {
    match config {
        DatastoreConfig::Sqlite { path } => {
            let path = path.clone();
            let store =
                tokio::task::spawn_blocking(move || crate::store::sqlite::SqliteStore::open(&path))
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))??;
            Ok(Arc::new(store))
        }
        DatastoreConfig::Postgres { connection } => Ok(Arc::new(
            crate::store::postgres::PostgresStore::connect(connection).await?,
        )),
    }
}

/// Builds the serving TLS configuration: a fresh serving certificate, and client certificates
/// verified against `bundle`.
fn serving_config(
    root: &SigningCa,
    config: &ServerConfig,
    bundle: &[Vec<u8>],
) -> Result<(Arc<rustls::ServerConfig>, SystemTime), ServerError> {
    let (cert, key) = sign_server_svid(
        root,
        &config.trust_domain,
        SERVING_CERT_TTL,
        SystemTime::now(),
    )?;
    let tls = server_config(&[cert.der], &key, bundle)?;
    Ok((tls, cert.not_after))
}

/// Keeps the serving configuration current: a new one when the bundle changes, and a new
/// serving certificate at half of its life.
async fn refresh_serving_config(
    state: Arc<State>,
    publish: watch::Sender<Arc<rustls::ServerConfig>>,
    mut not_after: SystemTime,
) {
    let mut snapshots = state.snapshots.clone();
    let mut bundle = snapshots.borrow_and_update().bundle.clone();
    let shutdown = state.shutdown.clone();
    loop {
        let half_life = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            / 2;
        tokio::select! {
            _ = signalled(shutdown.clone()) => return,
            changed = snapshots.changed() => {
                if changed.is_err() { return }
                let current = snapshots.borrow_and_update().bundle.clone();
                if current == bundle { continue }
                bundle = current;
            }
            _ = tokio::time::sleep(half_life.max(Duration::from_secs(1))) => {}
        }
        match serving_config(&state.root, &state.config, &bundle) {
            Ok((config, expiry)) => {
                publish.send_replace(config);
                not_after = expiry;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot renew the serving certificate; retrying in a minute");
                not_after = SystemTime::now() + Duration::from_secs(120);
            }
        }
    }
}

/// Prunes events past their retention hourly (and once at start), never one whose SVID is
/// still valid.
async fn prune_events(state: Arc<State>) {
    let shutdown = state.shutdown.clone();
    loop {
        let now = crate::store::unix_now();
        let older_than_ms = (now - state.config.events_retention.as_secs() as i64) * 1000;
        match state.store.prune_events(older_than_ms, now).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned events past their retention"),
            Err(e) => tracing::warn!(error = %e, "cannot prune events; retrying in an hour"),
        }
        tokio::select! {
            _ = signalled(shutdown.clone()) => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// Accepts admin connections from root or the server's own user only.
fn admin_incoming(
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> ReceiverStream<Result<tokio::net::UnixStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    let own_uid = nix::unistd::geteuid().as_raw();
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed on the admin socket");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == 0 || cred.uid() == own_uid => {
                    if tx.send(Ok(stream)).await.is_err() {
                        return;
                    }
                }
                Ok(cred) => tracing::warn!(
                    target: "tessera::audit",
                    uid = cred.uid(),
                    pid = cred.pid().unwrap_or(0),
                    "admin connection refused: only root or the server's user may administer"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "admin connection without peer credentials refused")
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Builds and starts a server replica. Returns once both APIs accept connections.
pub async fn build(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    std::fs::create_dir_all(&config.state_dir)
        .and_then(|()| {
            std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|source| ServerError::StateDir {
            path: config.state_dir.display().to_string(),
            source,
        })?;
    let server_id = load_or_create_server_id(&config.state_dir)?;
    let root = load_or_create_root(
        &config.root,
        &config.state_dir,
        &config.trust_domain,
        &server_id,
    )?;
    let x509pop = match &config.x509pop_ca_bundle {
        Some(path) => Some(x509pop_verifier(path).map_err(ServerError::X509Pop)?),
        None => None,
    };
    let store = open_store(&config.datastore).await?;
    store
        .publish_root(BundleRoot {
            server_id: server_id.clone(),
            der: root.bundle[0].clone(),
            not_after: unix_seconds(root.not_after),
        })
        .await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let initial = load_snapshot(store.as_ref()).await?;
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(initial));
    tokio::spawn(run_hub(
        store.clone(),
        snapshot_tx,
        signalled(shutdown_rx.clone()),
    ));

    let bundle = snapshot_rx.borrow().bundle.clone();
    let (tls, serving_not_after) = serving_config(&root, &config, &bundle)?;
    let (tls_tx, tls_rx) = watch::channel(tls);

    let listener = tokio::net::TcpListener::bind(config.bind_address)
        .await
        .map_err(|source| ServerError::Bind {
            address: config.bind_address,
            source,
        })?;
    let node_address = listener.local_addr().map_err(|source| ServerError::Bind {
        address: config.bind_address,
        source,
    })?;
    let admin_listener = bind_private(&config.admin_socket)?;
    let admin_socket = config.admin_socket.clone();

    let state = Arc::new(State {
        config,
        store,
        root,
        server_id: server_id.clone(),
        x509pop,
        snapshots: snapshot_rx,
        shutdown: shutdown_rx.clone(),
    });
    tokio::spawn(refresh_serving_config(
        state.clone(),
        tls_tx,
        serving_not_after,
    ));
    tokio::spawn(prune_events(state.clone()));

    let node_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(NodeServer::new(NodeService::new(state.clone())))
        .serve_with_incoming_shutdown(
            crate::tls::incoming(listener, tls_rx, signalled(shutdown_rx.clone())),
            signalled(shutdown_rx.clone()),
        );
    let admin_server = tonic::transport::Server::builder()
        .add_service(AdminServer::new(AdminService::new(state.clone())))
        .serve_with_incoming_shutdown(
            admin_incoming(admin_listener, signalled(shutdown_rx.clone())),
            signalled(shutdown_rx.clone()),
        );

    let servers = tokio::spawn({
        let admin_socket = admin_socket.clone();
        let mut drained = shutdown_rx.clone();
        async move {
            let both = async { tokio::try_join!(node_server, admin_server).map(|_| ()) };
            tokio::pin!(both);
            let result = tokio::select! {
                result = &mut both => result.map_err(|e| ServerError::Serve(e.to_string())),
                _ = async {
                    let _ = drained.wait_for(|stop| *stop).await;
                    tokio::time::sleep(DRAIN_TIMEOUT).await;
                } => Ok(()),
            };
            let _ = std::fs::remove_file(&admin_socket);
            tracing::info!("server stopped");
            result
        }
    });

    tracing::info!(
        node_api = %node_address,
        admin_socket = %admin_socket.display(),
        trust_domain = %state.config.trust_domain,
        server_id = %server_id,
        "server up"
    );
    Ok(ServerHandle {
        node_address,
        admin_socket,
        server_id,
        shutdown: shutdown_tx,
        servers,
    })
}
