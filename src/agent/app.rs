//! The agent's composition root: [`build`] wires configuration, CA, entry source, identity cache,
//! attestor and the Workload API endpoint together, and returns a handle with the bound socket
//! and a shutdown trigger.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::cache::IdentityCache;
use super::config::AgentConfig;
use super::endpoint::{self, EndpointError};
use super::entries::{ReloadCounts, watch_config_file};
use super::jwt::JwtAuthority;
use super::policy::{PolicyGate, PolicySource};
use super::revocation::{RevocationError, Revocations};
use super::sds::SdsService;
use super::tasks::TaskRegistry;
use super::tasks::service::TasksService;
use super::upstream::{Credentials, Seams, Upstream, UpstreamError};
use super::workload::{WorkloadService, check_security_header};
use crate::attest::{Attestor, PinMode};
use crate::ca::{
    CaError, LocalCaSource, SigningCa, load_or_create_local_ca, next_renewal_step, renew_local_ca,
};
use crate::events::recorder::{AuditLog, LogError, Recorder};
use crate::events::spool::Spool;
use crate::events::{SpoolLog, open_spool};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use crate::proto::tessera::admin_server::AdminServer;
use crate::proto::tessera::tasks_server::TasksServer;
use crate::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::runtime::{Backoff, Shutdown, TaskError, Tasks, wait_until_wall_time};
use crate::spiffe::TrustDomain;

/// How often delivery counts are reported and recorded events synced to disk.
const EVENT_FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// The event recorder: the durable spool in server mode (`state_dir/spool`, returned too, for
/// the uploader), a JSON-lines audit log in standalone mode (`state_dir/audit.jsonl`).
fn open_recorder(
    config: &AgentConfig,
    node_id: Option<&str>,
) -> Result<(Recorder, Option<Arc<Spool>>), AgentError> {
    let trust_domain = config.trust_domain.name();
    match node_id {
        Some(node_id) => {
            let spool = open_spool(&config.state_dir.join("spool"))
                .map_err(|e| AgentError::Events(LogError::Spool(e)))?;
            let log = Box::new(SpoolLog(spool.clone()));
            Ok((Recorder::new(trust_domain, node_id, log), Some(spool)))
        }
        None => {
            let path = config.state_dir.join("audit.jsonl");
            let log = AuditLog::open_with(&path, config.audit_limits).map_err(|source| {
                AgentError::Events(LogError::Audit {
                    op: "open",
                    path: path.clone(),
                    source,
                })
            })?;
            let host = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Any local user can be refused at will: count refusals per caller, as deliveries
            // are, so that the log grows with callers, not with calls.
            let recorder =
                Recorder::new(trust_domain, &host, Box::new(log)).with_aggregated_denials();
            Ok((recorder, None))
        }
    }
}

/// Serves the standalone admin socket at `path` (0600, root and this agent's user) until
/// shutdown, removing it after.
fn serve_admin(
    path: &std::path::Path,
    cache: Arc<IdentityCache>,
    task_registry: Arc<TaskRegistry>,
    jwt: Arc<JwtAuthority>,
    tasks: &Tasks,
    shutdown: &Shutdown,
) -> Result<(), AgentError> {
    let listener = crate::runtime::socket::bind_private(path).map_err(AgentError::AdminSocket)?;
    let own_uid = nix::unistd::geteuid().as_raw();
    let server = tonic::transport::Server::builder()
        .add_service(AdminServer::with_interceptor(
            super::admin::AgentAdmin::new(cache, task_registry, jwt),
            move |request| crate::runtime::admin::admit_administrator(request, own_uid, "agent"),
        ))
        .serve_with_incoming_shutdown(
            crate::runtime::admin::incoming(listener, shutdown.signalled()),
            shutdown.signalled(),
        );
    let path = path.to_owned();
    tracing::info!(admin_socket = %path.display(), "admin socket serving (svid revoke, entry revoke, task list and end)");
    tasks.spawn("admin socket", async move {
        let result = server.await;
        let _ = std::fs::remove_file(&path);
        result.map_err(AgentError::Serve)
    });
    Ok(())
}

/// How long a freshly attested node waits for its first entries before serving.
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(5);
/// How long open connections get to finish after shutdown before they are cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the agent could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The signing CA could not be loaded or created.
    #[error("signing CA: {0}")]
    Ca(#[from] CaError),
    /// The socket could not be set up.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// Server mode: the node could not be attested.
    #[error("node attestation: {0}")]
    Upstream(#[from] UpstreamError),
    /// The admin socket could not be bound.
    #[error("admin_socket: {0}")]
    AdminSocket(#[source] crate::runtime::socket::BindError),
    /// The revocation lists could not be restored.
    #[error("revocation lists: {0}")]
    Revocations(#[from] RevocationError),
    /// The JWT-SVID signing key could not be loaded or made.
    #[error(transparent)]
    JwtKey(#[from] crate::jwt::KeyFileError),
    /// The event log could not be opened.
    #[error("events: {0}")]
    Events(#[source] LogError),
    /// The metrics endpoint could not be bound.
    #[error("metrics_address {address}: {source}")]
    Metrics {
        /// The configured address.
        address: std::net::SocketAddr,
        /// The error from the system.
        #[source]
        source: std::io::Error,
    },
    /// Reflection descriptors could not be loaded (a build defect).
    #[error("gRPC reflection: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("Workload API server: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// The gRPC server ended on its own, before shutdown.
    #[error("Workload API server: it stopped accepting connections")]
    Stopped,
    /// A background task died, which stopped the agent.
    #[error(transparent)]
    Task(#[from] TaskError),
}

/// Knobs that are not part of the configuration file.
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// How connecting processes are pinned.
    pub pin_mode: PinMode,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            pin_mode: PinMode::Pidfd,
        }
    }
}

/// A running agent.
pub struct AgentHandle {
    /// The bound Workload API socket.
    pub socket_path: PathBuf,
    /// The identity cache, for inspection.
    pub cache: Arc<IdentityCache>,
    /// The live tasks, for inspection.
    pub task_registry: Arc<TaskRegistry>,
    /// What the standalone entry file watcher has refused, for inspection.
    pub entry_reloads: Arc<ReloadCounts>,
    /// The bound metrics address (the real port when configured with port 0).
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Triggered to drain and stop, by [`AgentHandle::shutdown`] or by a task that died.
    shutdown: Shutdown,
    /// Every background task of the agent, the Workload API server included.
    tasks: Tasks,
}

impl AgentHandle {
    /// The socket as a SPIFFE endpoint URI (`unix:///path`), for `SPIFFE_ENDPOINT_SOCKET`.
    pub fn socket_uri(&self) -> String {
        format!("unix://{}", self.socket_path.display())
    }

    /// Starts draining: streams end with Unavailable, then the socket is removed.
    pub fn shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Resolves once the agent is stopping: asked to, or because a background task died.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.shutdown.signalled()
    }

    /// Waits until every task has stopped; the error of the first task that died, if any.
    pub async fn wait(self) -> Result<(), AgentError> {
        Ok(self.tasks.wait().await?)
    }

    /// Drains and waits.
    pub async fn stop(self) -> Result<(), AgentError> {
        self.shutdown();
        self.wait().await
    }
}

/// Renews a generated standalone CA in two steps (publish the next root at half of the current
/// CA's life, sign with it from 80%) and publishes each result; warns about an operator's CA
/// instead. Holds the signing-authority sender for the agent's lifetime. Due times are read
/// off the wall clock `now` every few seconds, so a suspend or a clock step never leaves an
/// expired CA signing.
async fn renew_ca_when_due(
    source: LocalCaSource,
    trust_domain: TrustDomain,
    ca_tx: watch::Sender<Arc<SigningCa>>,
    now: impl Fn() -> SystemTime,
    shutdown: Shutdown,
) {
    let stop = shutdown.signalled();
    tokio::pin!(stop);
    loop {
        let current = ca_tx.borrow().clone();
        let (step, due) = next_renewal_step(&source, &current);
        if !wait_until_wall_time(due, &now, &shutdown).await {
            return;
        }
        let (source, trust_domain) = (source.clone(), trust_domain.clone());
        let renewed = tokio::task::spawn_blocking(move || {
            renew_local_ca(&source, &trust_domain, &current, step)
        })
        .await;
        let pause = match renewed {
            Ok(Ok(Some(ca))) => {
                ca_tx.send_replace(Arc::new(ca));
                continue;
            }
            Ok(Ok(None)) => {
                tracing::warn!(
                    not_after = %humantime::format_rfc3339(ca_tx.borrow().not_after),
                    "the configured CA is past 80% of its lifetime; replace ca.cert_file and ca.key_file and restart"
                );
                Duration::from_secs(24 * 3600)
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, ?step, "cannot renew the standalone CA; retrying in a minute");
                Duration::from_secs(60)
            }
            Err(e) => {
                tracing::error!(error = %e, "CA renewal task failed; retrying in a minute");
                Duration::from_secs(60)
            }
        };
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Standalone entries: reloaded from the configuration file when there is one.
fn spawn_entry_source(
    config: &AgentConfig,
    entries_tx: watch::Sender<Arc<crate::entry::EntrySet>>,
    policy_tx: PolicySource,
    counts: Arc<ReloadCounts>,
    tasks: &Tasks,
) {
    let stop = tasks.shutdown().signalled();
    match config.file.clone() {
        Some(file) => {
            tasks.spawn_until_shutdown(
                "entry file watcher",
                watch_config_file(
                    file,
                    config.trust_domain.clone(),
                    entries_tx,
                    policy_tx,
                    config.policy_file.clone(),
                    counts,
                    stop,
                ),
            );
        }
        None => {
            // No file to watch: keep the senders alive for the agent's lifetime.
            tasks.spawn_until_shutdown("entry source", async move {
                stop.await;
                drop(entries_tx);
                drop(policy_tx);
            });
        }
    }
}

/// Revokes the JWT-SVIDs of entries that leave the cache's set (deleted, expired out of the
/// configuration, or a task that ended), on every change to it.
async fn revoke_jwts_of_gone_entries(
    jwt: Arc<JwtAuthority>,
    cache: Arc<IdentityCache>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut changes = cache.subscribe();
    loop {
        let revoked = jwt.revoke_entries_not_in(&cache.entries(), SystemTime::now());
        if revoked > 0 {
            tracing::info!(revoked, "JWT-SVIDs of removed entries revoked");
        }
        tokio::select! {
            _ = &mut shutdown => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// Follows policy changes: new issuances and task starts carry the new version, every stream
/// decides again (revoking what the policy no longer permits its caller), and so does every
/// live task.
async fn follow_policy(
    gate: PolicyGate,
    cache: Arc<IdentityCache>,
    registry: Arc<TaskRegistry>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut changes = gate.subscribe();
    loop {
        let version = changes
            .borrow_and_update()
            .as_ref()
            .map_or(0, |p| p.version());
        cache.recorder().set_policy_version(version);
        registry.recheck_policy();
        // An SVID the new policy refuses to one of its holders is revoked; holders still
        // permitted get a fresh one at once.
        for (entry_id, version) in gate.refused_holders(&cache.entries()) {
            let revoked = cache.revoke_entry(
                &entry_id,
                crate::proto::tessera::RevocationReason::PolicyChanged,
                &format!("policy version {version}"),
            );
            tracing::info!(entry = %entry_id, version, revoked = revoked.len(), "the policy no longer permits a holder; SVIDs revoked");
        }
        cache.bump();
        tokio::select! {
            _ = &mut shutdown => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// Attests the node before serving (no saved state): retries while the server is unreachable,
/// fails at once when the server refuses the node.
async fn attest_at_start(
    upstream: &Upstream,
    shutdown: &Shutdown,
) -> Result<Credentials, AgentError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match upstream.attest().await {
            Ok(credentials) => return Ok(credentials),
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "server unreachable for node attestation; retrying");
            }
            Err(e) => return Err(AgentError::Upstream(e)),
        }
        if !backoff.pause(shutdown).await {
            return Err(AgentError::Upstream(UpstreamError::Stopped));
        }
    }
}

/// Builds and starts an agent. Returns once the socket accepts connections.
pub async fn build(config: AgentConfig, options: BuildOptions) -> Result<AgentHandle, AgentError> {
    let shutdown = Shutdown::new();
    let tasks = Tasks::new(shutdown.clone());

    // Server mode: the node's granted intermediate (saved, or from attesting now) and the last
    // synced entries; standalone: the local CA and the configured entries.
    let mut fresh_node = false;
    let upstream = match &config.server {
        Some(server) => {
            let upstream = Upstream::new(
                server.clone(),
                config.trust_domain.clone(),
                &config.state_dir,
            );
            let credentials = match upstream.load_saved()? {
                Some(saved) => {
                    tracing::info!(node = %saved.node_id, "serving from saved node state while the server link comes up");
                    saved
                }
                None => {
                    fresh_node = true;
                    attest_at_start(&upstream, &shutdown).await?
                }
            };
            Some((upstream, credentials))
        }
        None => None,
    };
    let (ca, entries) = match &upstream {
        Some((upstream, credentials)) => (credentials.signing_ca()?, upstream.entry_set()),
        None => (
            load_or_create_local_ca(&config.ca, &config.trust_domain)?,
            config.entries.clone(),
        ),
    };
    let ca = Arc::new(ca);
    let entries = Arc::new(entries);
    // The signing-authority seam: the local CA's renewals, or each granted intermediate.
    let (ca_tx, ca_rx) = watch::channel(ca.clone());
    // The entry-source seam: the config file, or the server's sync stream.
    let (entries_tx, entries_rx) = watch::channel(entries.clone());

    let (recorder, spool) =
        open_recorder(&config, upstream.as_ref().map(|(_, c)| c.node_id.as_str()))?;
    let recorder = Arc::new(recorder.with_use_window(config.use_window));
    tasks.spawn_until_shutdown(
        "event flusher",
        recorder
            .clone()
            .run_flusher(EVENT_FLUSH_INTERVAL, shutdown.signalled()),
    );
    let mut metrics_address = None;
    if let Some(address) = config.metrics_address {
        let listener = super::metrics::bind(address)
            .await
            .map_err(|source| AgentError::Metrics { address, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| AgentError::Metrics { address, source })?;
        // The real port when configured with port 0, for whoever scrapes.
        tracing::info!("metrics endpoint listening on {bound}");
        metrics_address = Some(bound);
        let sources = Arc::new(super::metrics::Sources {
            recorder: recorder.clone(),
            spool: spool.clone(),
        });
        tasks.spawn_until_shutdown(
            "metrics endpoint",
            super::metrics::serve(listener, sources, shutdown.signalled()),
        );
    }
    let revocations = Revocations::open(Some(config.state_dir.join("revocations.json")))?;
    tasks.spawn_until_shutdown("CRL signing", revocations.clone().run(shutdown.signalled()));
    let cache = IdentityCache::new(entries, ca, recorder.clone(), revocations);
    let entry_reloads = Arc::new(ReloadCounts::default());
    tasks.spawn_until_shutdown(
        "SVID rotation",
        cache.clone().run_rotation(ca_rx, shutdown.signalled()),
    );
    for output in config.outputs.clone() {
        tasks.spawn_until_shutdown(
            "certificate files ([[output]])",
            super::output::keep(cache.clone(), output, shutdown.signalled()),
        );
    }
    let node_id = upstream
        .as_ref()
        .map(|(_, credentials)| credentials.node_id.clone())
        .unwrap_or_default();
    // The policy seam: the configured policy file, or the server's policy (the last one saved
    // until the sync stream brings the current one).
    let initial_policy = match &upstream {
        Some((upstream, _)) => upstream.saved_policy(),
        None => config.policy.clone(),
    };
    let (policy_tx, _) = watch::channel(initial_policy);
    let gate = PolicyGate::new(&policy_tx, &node_id);
    // The only writer of the cache's entries: the source's, plus one per live task.
    let task_registry =
        TaskRegistry::new(cache.clone(), config.tasks, &config.state_dir, gate.clone());
    // Tasks restored from before a restart meet the policy in force before anything is served
    // (the follower's first pass would, a moment after the socket opens).
    task_registry.recheck_policy();
    tasks.spawn_until_shutdown(
        "policy follower",
        follow_policy(
            gate.clone(),
            cache.clone(),
            task_registry.clone(),
            shutdown.signalled(),
        ),
    );
    tasks.spawn_until_shutdown(
        "task registry",
        task_registry.clone().run(entries_rx, shutdown.signalled()),
    );
    // Standalone, the agent is its trust domain's root and signs JWT-SVIDs itself; in server
    // mode the server signs them.
    let jwt = Arc::new(match &upstream {
        Some(_) => JwtAuthority::upstream(
            &config.state_dir,
            config.trust_domain.clone(),
            config.jwt,
            recorder.clone(),
        ),
        None => JwtAuthority::load_or_create(
            &config.state_dir,
            config.trust_domain.clone(),
            config.jwt,
            recorder.clone(),
        )?,
    });
    tasks.spawn_until_shutdown(
        "JWT-SVID revocation",
        revoke_jwts_of_gone_entries(jwt.clone(), cache.clone(), shutdown.signalled()),
    );
    tasks.spawn_until_shutdown(
        "JWT-SVID refresh",
        jwt.clone().run_refresh(shutdown.signalled()),
    );
    if let (Some((upstream, credentials)), Some(spool)) = (upstream, spool) {
        let mut first_sync = entries_tx.subscribe();
        let seams = Seams {
            jwt: jwt.clone(),
            entries: entries_tx,
            ca: ca_tx,
            cache: cache.clone(),
            spool,
            tasks: task_registry.clone(),
            policy: policy_tx,
            gate: gate.clone(),
        };
        tasks.spawn_until_shutdown(
            "server link",
            super::upstream::run(upstream, Some(credentials), seams, shutdown.clone()),
        );
        // A node that has just joined has no entries yet: give the first sync a moment, so
        // that its first callers are not refused for want of entries it is about to receive.
        if fresh_node
            && tokio::time::timeout(FIRST_SYNC_WAIT, first_sync.changed())
                .await
                .is_err()
        {
            tracing::warn!("no entries from the server yet; serving without them meanwhile");
        }
    } else {
        tasks.spawn_until_shutdown(
            "standalone CA renewal",
            renew_ca_when_due(
                config.ca.clone(),
                config.trust_domain.clone(),
                ca_tx,
                SystemTime::now,
                shutdown.clone(),
            ),
        );
        spawn_entry_source(
            &config,
            entries_tx,
            policy_tx,
            entry_reloads.clone(),
            &tasks,
        );
    }

    let attestor = Arc::new(Attestor::new(config.exe_hash_size_limit, options.pin_mode));
    let service = WorkloadService::new(
        cache.clone(),
        attestor.clone(),
        config.trust_domain.clone(),
        config.allow_unauthenticated_verifiers,
        shutdown.clone(),
        task_registry.clone(),
        gate.clone(),
    )
    .with_jwt(jwt.clone())
    .with_wit(config.wit);
    let tasks_service = TasksService::new(service.clone(), task_registry.clone(), node_id);
    // Envoy sends no `workload.spiffe.io` header: SDS callers are attested all the same.
    let sds_service = SdsService::new(service.clone(), config.sds);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<SpiffeWorkloadApiServer<WorkloadService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::WORKLOAD_DESCRIPTOR_SET)
        .build_v1()
        .map_err(AgentError::Reflection)?;

    let listener = endpoint::bind(&config.socket_path)?;
    let socket_path = config.socket_path.clone();
    let timeouts = endpoint::ConnectionTimeouts {
        idle: config.idle_timeout,
        header_block: config.header_timeout,
    };
    let incoming = endpoint::incoming(listener, attestor, timeouts, shutdown.signalled());
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .max_concurrent_streams(Some(256))
        // Every request, to any service, restarts its connection's idle time.
        .layer(tower::util::MapRequestLayer::new(
            |request: http::Request<tonic::body::Body>| {
                if let Some(peer) = request.extensions().get::<endpoint::PeerInfo>() {
                    peer.touch();
                }
                request
            },
        ))
        .add_service(SpiffeWorkloadApiServer::with_interceptor(
            service,
            check_security_header,
        ))
        .add_service(TasksServer::with_interceptor(
            tasks_service,
            check_security_header,
        ))
        .add_service(SecretDiscoveryServiceServer::new(sds_service))
        .add_service(health_service)
        .add_service(reflection);

    tasks.spawn("Workload API server", {
        let socket_path = socket_path.clone();
        let shutdown = shutdown.clone();
        async move {
            let serve = router.serve_with_incoming_shutdown(incoming, shutdown.signalled());
            tokio::pin!(serve);
            let result = tokio::select! {
                result = &mut serve => match result {
                    Err(e) => Err(AgentError::Serve(e)),
                    Ok(()) if !shutdown.is_triggered() => Err(AgentError::Stopped),
                    Ok(()) => Ok(()),
                },
                _ = async {
                    shutdown.signalled().await;
                    tokio::time::sleep(DRAIN_TIMEOUT).await;
                } => {
                    tracing::warn!("connections did not drain in time; closing them");
                    Ok(())
                }
            };
            health
                .set_not_serving::<SpiffeWorkloadApiServer<WorkloadService>>()
                .await;
            let _ = std::fs::remove_file(&socket_path);
            tracing::info!(socket = %socket_path.display(), "Workload API stopped");
            result
        }
    });

    if let Some(path) = &config.admin_socket {
        serve_admin(
            path,
            cache.clone(),
            task_registry.clone(),
            jwt.clone(),
            &tasks,
            &shutdown,
        )?;
    }

    tracing::info!(
        socket = %socket_path.display(),
        trust_domain = %config.trust_domain,
        entries = cache.entries().entries.len(),
        mode = if config.server.is_some() { "server" } else { "standalone" },
        "Workload API serving"
    );
    Ok(AgentHandle {
        socket_path,
        cache,
        task_registry,
        entry_reloads,
        metrics_address,
        shutdown,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Debug, thiserror::Error)]
    #[error("injected failure")]
    struct Injected;

    #[tokio::test]
    async fn a_task_that_dies_stops_the_agent_and_wait_returns_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "trust_domain = \"example.org\"\nsocket_path = \"{}\"\nstate_dir = \"{}\"\n",
            dir.path().join("agent.sock").display(),
            dir.path().join("state").display(),
        );
        let config = AgentConfig::parse("agent.toml", &text).unwrap();
        let handle = build(config, BuildOptions::default()).await.unwrap();
        assert!(handle.socket_path.exists());
        handle
            .tasks
            .spawn("injected", async { Err::<(), _>(Injected) });
        handle.stopping().await;
        let socket = handle.socket_path.clone();
        let error = handle.wait().await.unwrap_err();
        assert!(
            matches!(
                &error,
                AgentError::Task(TaskError::Failed {
                    task: "injected",
                    ..
                })
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains("injected failure"), "{error}");
        assert!(
            !socket.exists(),
            "the agent stopped serving and removed its socket"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_standalone_ca_is_renewed_soon_after_a_wall_clock_jump() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let source = LocalCaSource::Generated {
            state_dir: dir.path().into(),
            ttl: Duration::from_secs(24 * 3600),
        };
        let ca = Arc::new(load_or_create_local_ca(&source, &td).unwrap());
        let first_roots = ca.bundle.len();
        let wall_offset = Arc::new(AtomicU64::new(0));
        let now = {
            let offset = wall_offset.clone();
            move || SystemTime::now() + Duration::from_secs(offset.load(Ordering::SeqCst))
        };
        let (ca_tx, mut ca_rx) = watch::channel(ca);
        let shutdown = Shutdown::new();
        let renewer = tokio::spawn(renew_ca_when_due(source, td, ca_tx, now, shutdown.clone()));
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!ca_rx.has_changed().unwrap(), "not due for 12 h");
        // Suspended for 13 hours: past half of the CA's life by the wall clock.
        wall_offset.store(13 * 3600, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(60), ca_rx.changed())
            .await
            .expect("the next root published within a minute, not an hour later")
            .unwrap();
        assert_eq!(
            ca_rx.borrow().bundle.len(),
            first_roots + 1,
            "the next root is published"
        );
        shutdown.trigger();
        renewer.await.unwrap();
    }
}
