//! A server's shared state over a real SQLite database in a temporary directory, for the unit
//! tests of the node and admin APIs.

use std::sync::Arc;

use tokio::sync::watch;

use super::State;
use super::config::ServerConfig;
use super::root::load_or_create_root;
use super::sync::load_snapshot;
use crate::store::sqlite::SqliteStore;
use crate::store::{BundleRoot, Datastore, unix_seconds};

/// The state of a server of `example.org` keeping everything under `dir`.
pub(crate) async fn state(dir: &std::path::Path) -> Arc<State> {
    state_with(dir, "").await
}

/// Like [`state`], with `top` lines of configuration before the tables.
pub(crate) async fn state_with(dir: &std::path::Path, top: &str) -> Arc<State> {
    let text = format!(
        "trust_domain = \"example.org\"\nadmin_socket = \"{0}/admin.sock\"\n\
         state_dir = \"{0}\"\n{top}\n[datastore]\nkind = \"sqlite\"\npath = \"{0}/tessera.db\"\n",
        dir.display()
    );
    let config = ServerConfig::parse("server.toml", &text).unwrap();
    let store: Arc<dyn Datastore> = Arc::new(SqliteStore::open(&dir.join("tessera.db")).unwrap());
    let root = load_or_create_root(&config.root, dir, &config.trust_domain, "s1").unwrap();
    store
        .publish_root(BundleRoot {
            server_id: "s1".into(),
            der: root.bundle[0].clone(),
            not_after: unix_seconds(root.not_after),
        })
        .await
        .unwrap();
    let jwt = super::jwt::JwtSigner::start(dir, "s1", config.jwt, store.as_ref())
        .await
        .unwrap();
    let snapshot = load_snapshot(store.as_ref()).await.unwrap();
    let (_, snapshots) = watch::channel(Arc::new(snapshot));
    let shutdown = crate::runtime::Shutdown::new();
    Arc::new(State {
        config,
        store,
        root,
        server_id: "s1".into(),
        x509pop: None,
        snapshots,
        shutdown,
        contacts: Default::default(),
        wakers: Default::default(),
        jwt: Arc::new(jwt),
    })
}
