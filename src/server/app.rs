//! The server's composition root: [`build`] opens the datastore, loads the root, publishes it to
//! the bundle, starts the snapshot hub and binds the node API (TCP, TLS) and the admin API
//! (root-only Unix socket). It returns a handle with the bound addresses and a shutdown trigger.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::State;
use super::admin_api::AdminService;
use super::config::{DatastoreConfig, ServerConfig};
use super::node_api::{NodeService, X509PopBundleError, x509pop_verifier};
use super::root::{load_or_create_root, load_or_create_server_id};
use super::sync::{Snapshot, Wakers, load_snapshot, run_hub};
use crate::ca::node::sign_server_svid;
use crate::ca::{CaError, SigningCa};
use crate::proto::tessera::admin_server::AdminServer;
use crate::proto::tessera::node_server::NodeServer;
use crate::runtime::socket::{BindError, bind_private};
use crate::runtime::{Shutdown, TaskError, Tasks, wait_until_wall_time};
use crate::store::{BundleRoot, Datastore, StoreError, unix_seconds};
use crate::tls::{ConnectionLimits, TlsError, server_config};

/// Lifetime of the serving certificate; renewed at half-life.
const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long streams get to end after shutdown before connections are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent streams one node API connection may open: an agent needs three (sync, event
/// upload, a renewal or attestation).
const NODE_STREAMS_PER_CONNECTION: u32 = 16;
/// How long a node API handler may take to answer (streams then run on their own).
const NODE_REQUEST_DEADLINE: Duration = Duration::from_secs(30);

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
    X509Pop(#[from] X509PopBundleError),
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
    Admin(#[from] BindError),
    /// A gRPC server failed.
    #[error("node or admin API server: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// The gRPC servers ended on their own, before shutdown.
    #[error("the node and admin APIs stopped accepting connections")]
    Stopped,
    /// The JWT-SVID signing key could not be loaded, made or published.
    #[error("JWT signing key: {0}")]
    Jwt(#[from] super::jwt::JwtSignerError),
    /// A background task died, which stopped the server.
    #[error(transparent)]
    Task(#[from] TaskError),
}

/// A running server.
pub struct ServerHandle {
    /// The bound node API address (the real port when configured with port 0).
    pub node_address: SocketAddr,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// Triggered to drain and stop, by [`ServerHandle::shutdown`] or by a task that died.
    shutdown: Shutdown,
    /// Every background task of the server, the two API servers included.
    tasks: Tasks,
}

impl ServerHandle {
    /// Starts draining.
    pub fn shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Resolves once the server is stopping: asked to, or because a background task died.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.shutdown.signalled()
    }

    /// Waits until every task has stopped; the error of the first task that died, if any.
    pub async fn wait(self) -> Result<(), ServerError> {
        Ok(self.tasks.wait().await?)
    }

    /// Drains and waits.
    pub async fn stop(self) -> Result<(), ServerError> {
        self.shutdown();
        self.wait().await
    }
}

/// Opens the configured datastore, applying migrations.
pub async fn open_store(config: &DatastoreConfig) -> Result<Arc<dyn Datastore>, StoreError> {
    match config {
        DatastoreConfig::Sqlite { path } => {
            let path = path.clone();
            let store =
                tokio::task::spawn_blocking(move || crate::store::sqlite::SqliteStore::open(&path))
                    .await
                    .map_err(|e| {
                        StoreError::unavailable_from("the task opening SQLite failed", e)
                    })??;
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

/// The point at which a certificate valid until `not_after` is renewed: half-way from `now`.
fn half_life_from(now: SystemTime, not_after: SystemTime) -> SystemTime {
    now + not_after.duration_since(now).unwrap_or_default() / 2
}

/// Keeps the serving configuration current: a new one (from `renew`, given the bundle) when the
/// bundle differs from `in_service`, the one the configuration in service was built from, and a new serving certificate at half of its life, by the wall clock `now`
/// looked at every few seconds, so a suspend or a clock step never leaves an expired
/// certificate in service.
async fn refresh_serving_config<C: Send + Sync>(
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    publish: watch::Sender<C>,
    in_service: Vec<Vec<u8>>,
    not_after: SystemTime,
    mut renew: impl FnMut(&[Vec<u8>]) -> Result<(C, SystemTime), ServerError>,
    now: impl Fn() -> SystemTime,
    shutdown: Shutdown,
) {
    // The configuration in service was built from `in_service`; a bundle published since then
    // is compared on the first turn.
    let mut bundle = in_service;
    snapshots.mark_changed();
    let mut renew_at = half_life_from(now(), not_after);
    loop {
        tokio::select! {
            _ = shutdown.signalled() => return,
            changed = snapshots.changed() => {
                if changed.is_err() { return }
                let current = snapshots.borrow_and_update().bundle.clone();
                if *current == bundle { continue }
                bundle = current.to_vec();
            }
            reached = wait_until_wall_time(renew_at, &now, &shutdown) => if !reached { return },
        }
        match renew(&bundle) {
            Ok((config, expiry)) => {
                publish.send_replace(config);
                renew_at = half_life_from(now(), expiry);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot renew the serving certificate; retrying in a minute");
                renew_at = now() + Duration::from_secs(60);
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
            _ = shutdown.signalled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
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
        Some(path) => Some(x509pop_verifier(path)?),
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

    let jwt = Arc::new(
        super::jwt::JwtSigner::start(&config.state_dir, &server_id, config.jwt, store.as_ref())
            .await?,
    );

    let shutdown = Shutdown::new();
    let tasks = Tasks::new(shutdown.clone());
    let initial = load_snapshot(store.as_ref()).await?;
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(initial));
    let wakers = Arc::new(Wakers::default());
    tasks.spawn_until_shutdown(
        "snapshot hub",
        run_hub(
            store.clone(),
            snapshot_tx,
            wakers.clone(),
            shutdown.signalled(),
        ),
    );

    let bundle = snapshot_rx.borrow().bundle.to_vec();
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
        shutdown: shutdown.clone(),
        contacts: Default::default(),
        wakers,
        jwt: jwt.clone(),
    });
    tasks.spawn_until_shutdown(
        "JWT signing key rotation",
        jwt.run_rotation(state.store.clone(), shutdown.signalled()),
    );
    tasks.spawn_until_shutdown("serving certificate renewal", {
        let state = state.clone();
        refresh_serving_config(
            state.snapshots.clone(),
            tls_tx,
            bundle,
            serving_not_after,
            move |bundle| serving_config(&state.root, &state.config, bundle),
            SystemTime::now,
            shutdown.clone(),
        )
    });
    tasks.spawn_until_shutdown("event pruning", prune_events(state.clone()));
    tasks.spawn_until_shutdown(
        "inactivity sweep",
        super::revocation::run_inactivity(state.clone(), shutdown.signalled()),
    );
    tasks.spawn_until_shutdown(
        "root CRL signing",
        super::revocation::run_root_crl(state.clone(), shutdown.signalled()),
    );

    let node_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(NODE_STREAMS_PER_CONNECTION))
        .timeout(NODE_REQUEST_DEADLINE)
        .add_service(NodeServer::new(NodeService::new(state.clone())))
        .serve_with_incoming_shutdown(
            crate::tls::incoming(
                listener,
                tls_rx,
                ConnectionLimits::from_descriptor_limit(),
                shutdown.signalled(),
            ),
            shutdown.signalled(),
        );
    let own_uid = nix::unistd::geteuid().as_raw();
    let admin_server = tonic::transport::Server::builder()
        .add_service(AdminServer::with_interceptor(
            AdminService::new(state.clone()),
            move |request| crate::runtime::admin::admit_administrator(request, own_uid, "server"),
        ))
        .serve_with_incoming_shutdown(
            crate::runtime::admin::incoming(admin_listener, shutdown.signalled()),
            shutdown.signalled(),
        );

    tasks.spawn("node and admin APIs", {
        let admin_socket = admin_socket.clone();
        let shutdown = shutdown.clone();
        async move {
            let both = async { tokio::try_join!(node_server, admin_server).map(|_| ()) };
            tokio::pin!(both);
            let result = tokio::select! {
                result = &mut both => match result {
                    Err(e) => Err(ServerError::Serve(e)),
                    Ok(()) if !shutdown.is_triggered() => Err(ServerError::Stopped),
                    Ok(()) => Ok(()),
                },
                _ = async {
                    shutdown.signalled().await;
                    tokio::time::sleep(DRAIN_TIMEOUT).await;
                } => Ok(()),
            };
            let _ = std::fs::remove_file(&admin_socket);
            tracing::info!("server stopped");
            result
        }
    });

    // In the message itself, so that whoever started the server with port 0 finds the port
    // in text and JSON logs alike.
    tracing::info!("node API listening on {node_address}");
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
        shutdown,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test(start_paused = true)]
    async fn the_serving_certificate_is_renewed_soon_after_a_wall_clock_jump() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let wall_offset = Arc::new(AtomicU64::new(0));
        let now = {
            let offset = wall_offset.clone();
            move || start + Duration::from_secs(offset.load(Ordering::SeqCst))
        };
        let (_snapshots_tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
        let (publish, mut published) = watch::channel(0u32);
        let renewals = Arc::new(AtomicU64::new(0));
        let shutdown = Shutdown::new();
        let refresher = tokio::spawn(refresh_serving_config(
            snapshots,
            publish,
            Vec::new(),
            start + SERVING_CERT_TTL,
            {
                let (renewals, now) = (renewals.clone(), now.clone());
                move |_bundle: &[Vec<u8>]| {
                    let count = renewals.fetch_add(1, Ordering::SeqCst) as u32 + 1;
                    Ok((count, now() + SERVING_CERT_TTL))
                }
            },
            now,
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(renewals.load(Ordering::SeqCst), 0, "not due for 12 h");
        // Suspended for a day: the certificate in service has expired by the wall clock.
        wall_offset.store(24 * 3600, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(60), published.changed())
            .await
            .expect("renewed within a minute of monotonic time, not hours later")
            .unwrap();
        assert_eq!(*published.borrow(), 1);
        shutdown.trigger();
        refresher.await.unwrap();
    }

    /// Also when the bundle changed before the task first looked: the configuration in service
    /// was built from the older one.
    #[tokio::test(start_paused = true)]
    async fn a_bundle_change_renews_at_once() {
        let (snapshots_tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
        let (publish, mut published) = watch::channel(0u32);
        let shutdown = Shutdown::new();
        let refresher = tokio::spawn(refresh_serving_config(
            snapshots,
            publish,
            Vec::new(),
            SystemTime::now() + SERVING_CERT_TTL,
            |bundle: &[Vec<u8>]| Ok((bundle.len() as u32, SystemTime::now() + SERVING_CERT_TTL)),
            SystemTime::now,
            shutdown.clone(),
        ));
        let mut snapshot = Snapshot::default();
        snapshot.bundle = Arc::new(vec![vec![1], vec![2]]);
        snapshots_tx.send_replace(Arc::new(snapshot));
        tokio::time::timeout(Duration::from_secs(60), published.changed())
            .await
            .expect("renewed on the bundle change, not at half-life")
            .unwrap();
        assert_eq!(*published.borrow(), 2, "built with the new bundle");
        shutdown.trigger();
        refresher.await.unwrap();
    }
}
