//! The one test suite every [`Datastore`] backend passes, and its entry points per backend:
//! [`sqlite_suite`] on a temporary file, [`postgres_suite`] on a scratch database of the server
//! named by `TESSERA_TEST_POSTGRES` (skipped, loudly, without it; mandatory in CI).
//!
//! Each case is an async function over a `&dyn Datastore`, so both backends run the very same
//! checks; the few that need to reopen a database or reach under the API take a [`Harness`].
//! The event cases cover idempotent storing, the inventory derived from events, filters and
//! paging, pruning and the migration of a database a version-1 server left.
//!
//! `ingest_rate`, ignored by default, measures how fast each backend stores batches of events:
//! `cargo test --lib ingest_rate -- --ignored --nocapture`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::{
    BundleRoot, CallerRecord, ChangeKind, CrlRecord, Datastore, EntryActivity, EntryRecord,
    EventFilter, EventOrder, EventRecord, EventTask, JoinTokenRecord, JwtFilter, JwtKeyRecord,
    NodeActivity, NodeCaRecord, NodeCredentialsRecord, NodeRecord, NodeStatus, RevocationRecord,
    StoreError, StoredCount, StoredEvent, SvidRecord, TokenRefusal, event_kind,
};

/// The clock of the suite: stores take `now` from their callers.
const NOW: i64 = 1_700_000_000;
/// The same instant in milliseconds, the unit of event times.
const NOW_MS: i64 = NOW * 1000;
/// How long a change may take to show in `changes()`.
const CHANGE_WAIT: Duration = Duration::from_secs(2);

/// A backend's database, opened as often as a test needs.
#[async_trait::async_trait]
trait Harness: Send + Sync {
    /// A new store on the same database.
    async fn open(&self) -> Result<Arc<dyn Datastore>, StoreError>;
    /// Runs SQL on the database directly, to set up what the API cannot.
    async fn execute(&self, sql: &str);
    /// The single integer `sql` selects, read directly from the database.
    async fn query_i64(&self, sql: &str) -> i64;
    /// Creates the database with the schema of `version`, as a server of that version left it.
    async fn create_at_version(&self, version: i64);
}

fn entry(id: &str, spiffe_id: &str, selectors: &[&str]) -> EntryRecord {
    EntryRecord {
        id: id.to_owned(),
        spiffe_id: spiffe_id.to_owned(),
        selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
        node_selectors: vec![],
        x509_ttl_seconds: 3600,
        owner: "team-a".to_owned(),
        purpose: "tests".to_owned(),
        expires_at: None,
        inactivity_timeout_seconds: None,
        jwt_ttl_seconds: Some(600),
        hint: None,
        dns_names: vec![],
        revision: 0,
        created_at: 0,
        updated_at: 0,
        activation: "standing".to_owned(),
        delegates_to: vec![],
        labels: vec![],
    }
}

fn node(id: &str, serial: &str) -> NodeRecord {
    NodeRecord {
        id: id.to_owned(),
        attestation: "join_token".to_owned(),
        selectors: vec![
            format!("node:id:{id}"),
            "node:label:b".to_owned(),
            "node:label:a".to_owned(),
        ],
        status: NodeStatus::Active,
        attested_at: NOW,
        last_seen: NOW,
        svid_serial: serial.to_owned(),
        svid_not_after: NOW + 3600,
        ca_serial: "ca01".to_owned(),
        ca_not_after: NOW + 86_400,
    }
}

fn credentials(serial: &str) -> NodeCredentialsRecord {
    NodeCredentialsRecord {
        svid_serial: serial.to_owned(),
        svid_not_after: NOW + 7200,
        ca_serial: "ca02".to_owned(),
        ca_not_after: NOW + 90_000,
    }
}

fn token(digest: &str, expires_at: i64) -> JoinTokenRecord {
    JoinTokenRecord {
        digest: digest.to_owned(),
        expires_at,
        labels: vec!["rack-7".to_owned(), "gpu".to_owned()],
        created_at: NOW - 60,
    }
}

fn root(server_id: &str, der: &[u8], not_after: i64) -> BundleRoot {
    BundleRoot {
        server_id: server_id.to_owned(),
        der: der.to_vec(),
        not_after,
    }
}

/// Runs `op` and checks that `changes()` moved on because of it.
async fn expect_change<T>(store: &dyn Datastore, what: &str, op: impl Future<Output = T>) -> T {
    let mut changes = store.changes();
    let out = op.await;
    tokio::time::timeout(CHANGE_WAIT, changes.changed())
        .await
        .unwrap_or_else(|_| panic!("changes() did not move after {what}"))
        .unwrap();
    out
}

async fn entries_round_trip(store: &dyn Datastore) {
    let mut first = entry(
        "e-b",
        "spiffe://example.org/web",
        &["unix:uid:1000", "k:v", "unix:uid:1000"],
    );
    first.node_selectors = vec!["node:label:z".to_owned(), "node:label:a".to_owned()];
    first.expires_at = Some(NOW + 100);
    first.inactivity_timeout_seconds = Some(600);
    first.hint = Some("frontend".to_owned());
    first.dns_names = vec!["web.local".to_owned(), "a.local".to_owned()];
    first.revision = 42;
    let created = store.create_entry(first.clone(), NOW).await.unwrap();
    assert_eq!(created.selectors, ["k:v", "unix:uid:1000"]);
    assert_eq!(created.node_selectors, ["node:label:a", "node:label:z"]);
    assert_eq!(
        created.dns_names,
        ["web.local", "a.local"],
        "DNS names keep their order"
    );
    assert_eq!(
        (created.revision, created.created_at, created.updated_at),
        (1, NOW, NOW)
    );
    assert_eq!(
        (created.expires_at, created.inactivity_timeout_seconds),
        (Some(NOW + 100), Some(600))
    );
    assert_eq!(created.hint.as_deref(), Some("frontend"));
    assert_eq!(store.get_entry("e-b").await.unwrap(), Some(created.clone()));
    assert_eq!(store.get_entry("absent").await.unwrap(), None);

    let same_time = store
        .create_entry(entry("e-a", "spiffe://example.org/db", &["k:v"]), NOW)
        .await
        .unwrap();
    let earlier = store
        .create_entry(entry("e-z", "spiffe://example.org/old", &["k:v"]), NOW - 10)
        .await
        .unwrap();
    assert_eq!(earlier.hint, None);
    let ids: Vec<String> = store
        .list_entries()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["e-z", "e-a", "e-b"], "by creation time, then id");
    assert_eq!(store.list_entries().await.unwrap()[1], same_time);
}

async fn duplicate_entries_refused(store: &dyn Datastore) {
    let spiffe = "spiffe://example.org/api";
    store
        .create_entry(entry("one", spiffe, &["a:1", "b:2"]), NOW)
        .await
        .unwrap();

    let err = store
        .create_entry(entry("one", "spiffe://example.org/other", &["c:3"]), NOW)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyExists(m) if m.contains("\"one\"")),
        "{err}"
    );

    // The same selectors in another order and repeated are the same selectors.
    let err = store
        .create_entry(entry("two", spiffe, &["b:2", "a:1", "a:1"]), NOW)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyExists(m) if m.contains(spiffe) && m.contains("selectors")),
        "{err}"
    );

    store
        .create_entry(entry("three", spiffe, &["a:1"]), NOW)
        .await
        .unwrap();
    store
        .create_entry(
            entry("four", "spiffe://example.org/x", &["a:1", "b:2"]),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(store.list_entries().await.unwrap().len(), 3);
}

async fn entry_updates_check_revision(store: &dyn Datastore) {
    let created = store
        .create_entry(entry("u", "spiffe://example.org/u", &["a:1"]), NOW)
        .await
        .unwrap();
    let other = store
        .create_entry(entry("w", "spiffe://example.org/w", &["w:1"]), NOW)
        .await
        .unwrap();

    let mut change = created.clone();
    change.selectors = vec!["z:9".to_owned(), "a:1".to_owned()];
    change.owner = "team-b".to_owned();
    change.hint = Some("moved".to_owned());
    change.created_at = 5; // ignored: the creation time is the store's
    let updated = store.update_entry(change.clone(), NOW + 5).await.unwrap();
    assert_eq!(updated.revision, 2);
    assert_eq!((updated.created_at, updated.updated_at), (NOW, NOW + 5));
    assert_eq!(updated.selectors, ["a:1", "z:9"]);
    assert_eq!(updated.owner, "team-b");
    assert_eq!(store.get_entry("u").await.unwrap(), Some(updated.clone()));

    // A second update based on revision 1 lost the race.
    let err = store.update_entry(change, NOW + 6).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::RevisionConflict {
            id: "u".to_owned(),
            expected: 1,
            actual: 2
        }
    );

    let mut missing = created.clone();
    missing.id = "nope".to_owned();
    assert_eq!(
        store.update_entry(missing, NOW).await.unwrap_err(),
        StoreError::NotFound {
            kind: "entry",
            id: "nope".to_owned()
        }
    );

    // Taking another entry's SPIFFE ID and selectors is refused and changes nothing.
    let mut clash = updated.clone();
    clash.spiffe_id = other.spiffe_id.clone();
    clash.selectors = other.selectors.clone();
    let err = store.update_entry(clash, NOW + 7).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::AlreadyExists(m) if m.contains("spiffe://example.org/w")),
        "{err}"
    );
    assert_eq!(store.get_entry("u").await.unwrap(), Some(updated.clone()));

    // The next update from the current revision goes through.
    let again = store.update_entry(updated, NOW + 8).await.unwrap();
    assert_eq!(again.revision, 3);
}

async fn entry_deletion(store: &dyn Datastore) {
    let created = store
        .create_entry(entry("d", "spiffe://example.org/d", &["a:1"]), NOW)
        .await
        .unwrap();
    assert_eq!(store.delete_entry("d").await.unwrap(), created);
    assert_eq!(store.get_entry("d").await.unwrap(), None);
    assert_eq!(
        store.delete_entry("d").await.unwrap_err(),
        StoreError::NotFound {
            kind: "entry",
            id: "d".to_owned()
        }
    );
    // The identity is free again.
    store
        .create_entry(entry("d2", "spiffe://example.org/d", &["a:1"]), NOW)
        .await
        .unwrap();
}

async fn join_tokens(store: &dyn Datastore) {
    store
        .create_join_token(token("t1", NOW + 60))
        .await
        .unwrap();
    let err = store
        .create_join_token(token("t1", NOW + 120))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err}");

    let joined = store
        .join_node("t1", bare_node("node-1"), NOW)
        .await
        .unwrap();
    assert_eq!(
        joined.selectors,
        ["node:id:node-1", "node:label:gpu", "node:label:rack-7"]
    );
    assert_eq!(store.get_node("node-1").await.unwrap(), Some(joined));
    let refused = |r| StoreError::TokenRefused(r);
    let join =
        |digest: &'static str, id: &'static str, now| store.join_node(digest, bare_node(id), now);
    assert_eq!(
        join("t1", "node-2", NOW).await,
        Err(refused(TokenRefusal::Used))
    );
    assert_eq!(
        join("t9", "node-2", NOW).await,
        Err(refused(TokenRefusal::Unknown))
    );
    // A refused token records no node.
    assert_eq!(store.get_node("node-2").await.unwrap(), None);

    store.create_join_token(token("t2", NOW - 1)).await.unwrap();
    assert_eq!(
        join("t2", "node-3", NOW).await,
        Err(refused(TokenRefusal::Expired))
    );
    // Refused after its expiry, not at it.
    store.create_join_token(token("t3", NOW)).await.unwrap();
    join("t3", "node-3", NOW).await.unwrap();
    // A used token stays used once it has expired too.
    assert_eq!(
        join("t1", "node-2", NOW + 600).await,
        Err(refused(TokenRefusal::Used))
    );
}

/// A node record as the node API hands it to `join_node`: without label selectors.
fn bare_node(id: &str) -> NodeRecord {
    NodeRecord {
        selectors: vec![format!("node:id:{id}")],
        ..node(id, "0a")
    }
}

/// A token is spent only together with the node it admits: when the node cannot be recorded,
/// the token can still be used.
async fn token_survives_a_failed_join(store: &dyn Datastore) {
    store
        .create_join_token(token("t-ban", NOW + 60))
        .await
        .unwrap();
    store.attest_node(bare_node("banned-1")).await.unwrap();
    store
        .set_node_status("banned-1", NodeStatus::Banned)
        .await
        .unwrap();
    let err = store
        .join_node("t-ban", bare_node("banned-1"), NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NodeNotActive { .. }), "{err}");
    let joined = store
        .join_node("t-ban", bare_node("node-after-ban"), NOW)
        .await
        .unwrap();
    assert_eq!(joined.id, "node-after-ban");
}

async fn concurrent_token_use(store: &dyn Datastore) {
    for round in 0..10 {
        let digest = format!("race-{round}");
        store
            .create_join_token(token(&digest, NOW + 60))
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            store.join_node(&digest, bare_node(&format!("node-a{round}")), NOW),
            store.join_node(&digest, bare_node(&format!("node-b{round}")), NOW),
        );
        let used = StoreError::TokenRefused(TokenRefusal::Used);
        assert!(
            matches!((&a, &b), (Ok(_), Err(e)) | (Err(e), Ok(_)) if *e == used),
            "exactly one use must succeed: {a:?} {b:?}"
        );
    }
}

async fn node_attestation(store: &dyn Datastore) {
    let mut input = node("n2", "01");
    input.status = NodeStatus::Evicted; // ignored: an attested node is active
    let stored = store.attest_node(input).await.unwrap();
    assert_eq!(stored.status, NodeStatus::Active);
    assert_eq!(
        stored.selectors,
        ["node:id:n2", "node:label:a", "node:label:b"]
    );
    assert_eq!(store.get_node("n2").await.unwrap(), Some(stored.clone()));
    assert_eq!(store.get_node("absent").await.unwrap(), None);

    store.attest_node(node("n1", "02")).await.unwrap();
    store.attest_node(node("N3", "03")).await.unwrap();
    let ids: Vec<String> = store
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, ["N3", "n1", "n2"], "by id, bytewise");

    // An active node attesting again gets its new credentials recorded.
    let mut again = node("n2", "04");
    again.attested_at = NOW + 10;
    let stored = store.attest_node(again).await.unwrap();
    assert_eq!(
        (stored.svid_serial.as_str(), stored.attested_at),
        ("04", NOW + 10)
    );
}

async fn banned_node_stays_banned(store: &dyn Datastore) {
    store.attest_node(node("bad", "01")).await.unwrap();
    let banned = store
        .set_node_status("bad", NodeStatus::Banned)
        .await
        .unwrap();
    assert_eq!(banned.status, NodeStatus::Banned);

    let refusal = || StoreError::NodeNotActive {
        id: "bad".to_owned(),
        status: NodeStatus::Banned,
    };
    assert_eq!(store.attest_node(node("bad", "02")).await, Err(refusal()));
    assert_eq!(store.get_node("bad").await.unwrap(), Some(banned.clone()));
    for status in [NodeStatus::Evicted, NodeStatus::Active] {
        assert_eq!(store.set_node_status("bad", status).await, Err(refusal()));
    }
    assert_eq!(
        store.renew_node("bad", credentials("03"), NOW).await,
        Err(refusal())
    );
    // Banning again is harmless.
    assert_eq!(
        store.set_node_status("bad", NodeStatus::Banned).await,
        Ok(banned.clone())
    );
    assert_eq!(store.get_node("bad").await.unwrap(), Some(banned));
}

async fn evicted_node_attests_again(store: &dyn Datastore) {
    store.attest_node(node("ev", "01")).await.unwrap();
    let evicted = store
        .set_node_status("ev", NodeStatus::Evicted)
        .await
        .unwrap();
    assert_eq!(evicted.status, NodeStatus::Evicted);
    assert_eq!(
        store.renew_node("ev", credentials("02"), NOW).await,
        Err(StoreError::NodeNotActive {
            id: "ev".to_owned(),
            status: NodeStatus::Evicted
        })
    );
    let mut again = node("ev", "03");
    again.attestation = "x509pop".to_owned();
    again.attested_at = NOW + 30;
    let stored = store.attest_node(again).await.unwrap();
    assert_eq!(stored.status, NodeStatus::Active);
    assert_eq!(
        (
            stored.svid_serial.as_str(),
            stored.attestation.as_str(),
            stored.attested_at
        ),
        ("03", "x509pop", NOW + 30)
    );
    assert_eq!(store.get_node("ev").await.unwrap(), Some(stored));
}

async fn node_renewal_and_contact(store: &dyn Datastore) {
    let attested = store.attest_node(node("r", "01")).await.unwrap();
    let renewed = store
        .renew_node("r", credentials("02"), NOW + 100)
        .await
        .unwrap();
    assert_eq!(
        renewed,
        NodeRecord {
            svid_serial: "02".to_owned(),
            svid_not_after: NOW + 7200,
            ca_serial: "ca02".to_owned(),
            ca_not_after: NOW + 90_000,
            last_seen: NOW + 100,
            ..attested
        }
    );
    assert_eq!(store.get_node("r").await.unwrap(), Some(renewed.clone()));

    store.touch_node("r", NOW + 200).await.unwrap();
    let touched = store.get_node("r").await.unwrap().unwrap();
    assert_eq!(
        touched,
        NodeRecord {
            last_seen: NOW + 200,
            ..renewed
        }
    );

    let unknown = || StoreError::NotFound {
        kind: "node",
        id: "ghost".to_owned(),
    };
    assert_eq!(
        store.renew_node("ghost", credentials("03"), NOW).await,
        Err(unknown())
    );
    assert_eq!(store.touch_node("ghost", NOW).await, Err(unknown()));
    assert_eq!(
        store.set_node_status("ghost", NodeStatus::Evicted).await,
        Err(unknown())
    );
}

async fn bundle_roots(store: &dyn Datastore) {
    store
        .publish_root(root("s2", b"root-c", NOW + 50))
        .await
        .unwrap();
    store
        .publish_root(root("s1", b"root-b", NOW + 200))
        .await
        .unwrap();
    store
        .publish_root(root("s1", b"root-a", NOW + 100))
        .await
        .unwrap();
    store
        .publish_root(root("s3", b"root-old", NOW - 1))
        .await
        .unwrap();
    assert_eq!(
        store.bundle(NOW).await.unwrap(),
        [
            root("s1", b"root-a", NOW + 100),
            root("s1", b"root-b", NOW + 200),
            root("s2", b"root-c", NOW + 50),
        ],
        "expired roots are left out; by server id, then not-after"
    );

    // Publishing again is harmless; a new not-after replaces the old one.
    store
        .publish_root(root("s1", b"root-a", NOW + 100))
        .await
        .unwrap();
    store
        .publish_root(root("s2", b"root-c", NOW + 300))
        .await
        .unwrap();
    assert_eq!(
        store.bundle(NOW + 100).await.unwrap(),
        [
            root("s1", b"root-a", NOW + 100),
            root("s1", b"root-b", NOW + 200),
            root("s2", b"root-c", NOW + 300),
        ],
        "a root is in the bundle up to and including its not-after"
    );
    assert_eq!(
        store.bundle(NOW + 250).await.unwrap(),
        [root("s2", b"root-c", NOW + 300)]
    );
}

async fn changes_follow_writes(store: &dyn Datastore) {
    let created = expect_change(store, "create_entry", async {
        store
            .create_entry(entry("c", "spiffe://example.org/c", &["a:1"]), NOW)
            .await
            .unwrap()
    })
    .await;
    expect_change(store, "update_entry", async {
        store.update_entry(created, NOW + 1).await.unwrap()
    })
    .await;
    expect_change(store, "delete_entry", async {
        store.delete_entry("c").await.unwrap()
    })
    .await;
    expect_change(store, "attest_node", async {
        store.attest_node(node("cn", "01")).await.unwrap()
    })
    .await;
    expect_change(store, "set_node_status", async {
        store
            .set_node_status("cn", NodeStatus::Evicted)
            .await
            .unwrap()
    })
    .await;
    expect_change(store, "publish_root", async {
        store
            .publish_root(root("s1", b"root", NOW + 10))
            .await
            .unwrap()
    })
    .await;
}

async fn change_log_records_commits(store: &dyn Datastore) {
    let start = store.last_revision().await.unwrap();
    let created = store
        .create_entry(entry("c", "spiffe://example.org/c", &["a:1"]), NOW)
        .await
        .unwrap();
    store.update_entry(created, NOW + 1).await.unwrap();
    store
        .create_entry(entry("d", "spiffe://example.org/d", &["a:2"]), NOW)
        .await
        .unwrap();
    store.attest_node(node("cn", "01")).await.unwrap();
    // Contact and renewal change nothing a node is sent: not logged.
    store.touch_node("cn", NOW + 5).await.unwrap();
    store
        .renew_node("cn", credentials("02"), NOW + 6)
        .await
        .unwrap();
    store
        .set_node_status("cn", NodeStatus::Evicted)
        .await
        .unwrap();
    store
        .publish_root(root("s1", b"root", NOW + 10))
        .await
        .unwrap();
    store.delete_entry("c").await.unwrap();

    let log = store.changes_after(start, 100).await.unwrap();
    let seen: Vec<(ChangeKind, &str)> = log
        .iter()
        .map(|c| (c.kind.clone(), c.key.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (ChangeKind::Entry, "c"),
            (ChangeKind::Entry, "c"),
            (ChangeKind::Entry, "d"),
            (ChangeKind::Node, "cn"),
            (ChangeKind::Node, "cn"),
            (ChangeKind::Bundle, ""),
            (ChangeKind::Entry, "c"),
        ]
    );
    assert!(log.windows(2).all(|w| w[0].revision < w[1].revision));
    let last = log.last().unwrap().revision;
    assert_eq!(store.last_revision().await.unwrap(), last);
    let first_two = store.changes_after(start, 2).await.unwrap();
    assert_eq!(first_two, log[..2]);
    assert_eq!(store.changes_after(last, 10).await.unwrap(), []);
    let recent = store.recent_changes(3).await.unwrap();
    assert_eq!(recent, log[4..]);

    let mut entries: Vec<_> = store
        .entries_by_id(&["c".into(), "d".into(), "zz".into()])
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    entries.sort();
    assert_eq!(entries, ["d"]);
    let nodes = store
        .nodes_by_id(&["cn".into(), "nope".into()])
        .await
        .unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].status, NodeStatus::Evicted);

    // Pruning keeps the latest record, so the revision never goes back.
    let after_everything = crate::events::model::now_ms() + 60_000;
    store.prune_events(after_everything, NOW).await.unwrap();
    assert_eq!(store.last_revision().await.unwrap(), last);
    assert_eq!(store.recent_changes(100).await.unwrap(), log[6..]);
}

/// Concurrent writers each get their own revision, and every commit is in the log.
async fn change_log_under_concurrent_writers(store: &dyn Datastore) {
    let start = store.last_revision().await.unwrap();
    let write = |i: usize| async move {
        store
            .create_entry(
                entry(
                    &format!("w{i}"),
                    &format!("spiffe://example.org/w{i}"),
                    &["a:1"],
                ),
                NOW,
            )
            .await
            .unwrap()
    };
    for round in 0..4 {
        let i = round * 4;
        tokio::join!(write(i), write(i + 1), write(i + 2), write(i + 3));
    }
    let log = store.changes_after(start, 100).await.unwrap();
    let mut keys: Vec<&str> = log.iter().map(|c| c.key.as_str()).collect();
    keys.sort();
    let mut expected: Vec<String> = (0..16).map(|i| format!("w{i}")).collect();
    expected.sort();
    assert_eq!(keys, expected);
    assert!(log.windows(2).all(|w| w[0].revision < w[1].revision));
}

/// An SVID event about `serial` on node `n1`, entry `e1`, valid for an hour after [`NOW`].
fn event(id: &str, kind: &str, serial: &str, time_ms: i64) -> EventRecord {
    EventRecord {
        id: id.to_owned(),
        kind: kind.to_owned(),
        time_ms,
        node_id: "n1".to_owned(),
        entry_id: "e1".to_owned(),
        spiffe_id: "spiffe://example.org/w".to_owned(),
        serial: serial.to_owned(),
        not_after: Some(NOW + 3600),
        received_ms: time_ms + 5,
        ..EventRecord::default()
    }
}

/// An `svid_used` event: `count` deliveries, the last at `last_ms`.
fn used(id: &str, serial: &str, time_ms: i64, last_ms: i64, count: i64) -> EventRecord {
    EventRecord {
        first_ms: Some(time_ms - 100),
        last_ms: Some(last_ms),
        count: Some(count),
        caller: Some(caller()),
        ..event(id, event_kind::SVID_USED, serial, time_ms)
    }
}

fn revoked(id: &str, serial: &str, time_ms: i64, reason: &str) -> EventRecord {
    EventRecord {
        reason: Some(reason.to_owned()),
        ..event(id, event_kind::SVID_REVOKED, serial, time_ms)
    }
}

fn caller() -> CallerRecord {
    CallerRecord {
        pid: 4242,
        uid: 1000,
        gid: 100,
        exe_path: "/usr/bin/web".to_owned(),
        exe_sha256: "ab".repeat(32),
        unit: "web.service".to_owned(),
    }
}

fn stored(stored: u32, duplicates: u32) -> StoredCount {
    StoredCount { stored, duplicates }
}

fn ids(events: &[StoredEvent]) -> Vec<&str> {
    events.iter().map(|e| e.event.id.as_str()).collect()
}

/// Every stored event, in order.
async fn all_events(store: &dyn Datastore) -> Vec<StoredEvent> {
    store.list_events(EventFilter::default()).await.unwrap()
}

/// Everything the inventory holds.
async fn inventory(
    store: &dyn Datastore,
) -> (Vec<SvidRecord>, Vec<EntryActivity>, Vec<NodeActivity>) {
    (
        store.svids(None, None).await.unwrap(),
        store.entry_activity().await.unwrap(),
        store.node_activity().await.unwrap(),
    )
}

async fn events_round_trip(store: &dyn Datastore) {
    let mut denied = event("d", event_kind::ATTESTATION_DENIED, "", NOW_MS + 3);
    denied.entry_id = String::new();
    denied.spiffe_id = String::new();
    denied.not_after = None;
    denied.caller = Some(CallerRecord {
        unit: String::new(),
        ..caller()
    });
    denied.detail = "no entry matches\nthe caller".to_owned();
    let mut attested = event("a", event_kind::NODE_ATTESTED, "", NOW_MS + 4);
    attested.node_id = String::new();
    let batch = vec![
        event("i", event_kind::SVID_ISSUED, "0a1b", NOW_MS + 1),
        used("u", "0a1b", NOW_MS + 2, NOW_MS + 2, 7),
        denied,
        attested,
        revoked("r", "0a1b", NOW_MS, "entry_removed"),
    ];
    assert_eq!(
        store.store_events(batch.clone()).await.unwrap(),
        stored(5, 0)
    );
    let listed = all_events(store).await;
    let events: Vec<EventRecord> = listed.iter().map(|e| e.event.clone()).collect();
    assert_eq!(
        events, batch,
        "every field comes back, in the order of the batch"
    );
    assert!(
        listed.windows(2).all(|w| w[0].seq < w[1].seq),
        "positions increase: {listed:?}"
    );

    // A later batch comes after, even with earlier event times.
    let later = event("i2", event_kind::SVID_ISSUED, "0c", NOW_MS - 1_000);
    assert_eq!(store.store_events(vec![later]).await.unwrap(), stored(1, 0));
    let listed = all_events(store).await;
    assert_eq!(ids(&listed), ["i", "u", "d", "a", "r", "i2"]);
    assert!(listed[5].seq > listed[4].seq);

    // Nothing to store is no error.
    assert_eq!(store.store_events(vec![]).await.unwrap(), stored(0, 0));
}

async fn events_stored_once(store: &dyn Datastore) {
    let batch = vec![
        event("i", event_kind::SVID_ISSUED, "01", NOW_MS),
        used("u", "01", NOW_MS + 10, NOW_MS + 20, 3),
        revoked("r", "01", NOW_MS + 30, "superseded"),
    ];
    assert_eq!(
        store.store_events(batch.clone()).await.unwrap(),
        stored(3, 0)
    );
    let events = all_events(store).await;
    let derived = inventory(store).await;
    assert_eq!(derived.0[0].uses, 3);

    // A retry changes nothing, counts included.
    assert_eq!(
        store.store_events(batch.clone()).await.unwrap(),
        stored(0, 3)
    );
    assert_eq!(all_events(store).await, events);
    assert_eq!(inventory(store).await, derived);

    // Mixed: old and new events, and one repeated within the batch.
    let mixed = vec![
        batch[1].clone(),
        used("u2", "01", NOW_MS + 40, NOW_MS + 50, 2),
        batch[0].clone(),
        used("u2", "01", NOW_MS + 40, NOW_MS + 50, 2),
        event("i2", event_kind::SVID_ISSUED, "02", NOW_MS + 60),
    ];
    assert_eq!(
        store.store_events(mixed.clone()).await.unwrap(),
        stored(2, 3)
    );
    assert_eq!(ids(&all_events(store).await), ["i", "u", "r", "u2", "i2"]);
    let svids = store.svids(None, None).await.unwrap();
    assert_eq!(
        svids
            .iter()
            .map(|s| (s.serial.as_str(), s.uses))
            .collect::<Vec<_>>(),
        [("01", 5), ("02", 0)],
        "only newly stored uses count"
    );
    assert_eq!(svids[0].last_used_ms, Some(NOW_MS + 50));
    let derived = inventory(store).await;
    assert_eq!(store.store_events(mixed).await.unwrap(), stored(0, 5));
    assert_eq!(inventory(store).await, derived);
}

async fn invalid_batch_refused(store: &dyn Datastore) {
    let good = event("i", event_kind::SVID_ISSUED, "01", NOW_MS);
    let mut unknown = event("x", "svid_misplaced", "01", NOW_MS);
    unknown.node_id = "n9".to_owned();
    let err = store
        .store_events(vec![good.clone(), unknown])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid { reason: m, .. } if m.contains("svid_misplaced") && m.contains("\"x\"")),
        "{err}"
    );
    let no_serial = event("s", event_kind::SVID_USED, "", NOW_MS);
    let no_id = event("", event_kind::NODE_ATTESTED, "", NOW_MS);
    for bad in [no_serial, no_id] {
        let err = store
            .store_events(vec![good.clone(), bad])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
    }
    // Nothing of the refused batches was stored, not even the good event.
    assert!(all_events(store).await.is_empty());
    assert_eq!(inventory(store).await, (vec![], vec![], vec![]));
    // The good event on its own is stored as new.
    assert_eq!(store.store_events(vec![good]).await.unwrap(), stored(1, 0));

    let filter = EventFilter {
        kinds: vec!["svid_issued".to_owned(), "svid_lost".to_owned()],
        ..EventFilter::default()
    };
    let err = store.list_events(filter).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid { reason: m, .. } if m.contains("svid_lost")),
        "{err}"
    );
}

async fn revocation_before_issuance(store: &dyn Datastore) {
    let mut early = revoked("r", "0f", NOW_MS + 500, "node_evicted");
    early.not_after = None;
    early.node_id = String::new(); // revoked by the server
    store.store_events(vec![early]).await.unwrap();
    assert_eq!(
        store.svids(None, None).await.unwrap(),
        [SvidRecord {
            serial: "0f".to_owned(),
            entry_id: "e1".to_owned(),
            spiffe_id: "spiffe://example.org/w".to_owned(),
            node_id: String::new(),
            issued_ms: None,
            not_after: None,
            revoked_ms: Some(NOW_MS + 500),
            reason: Some("node_evicted".to_owned()),
            last_used_ms: None,
            uses: 0,
        }],
        "what the revocation said, and no more"
    );
    assert!(
        store.entry_activity().await.unwrap().is_empty(),
        "a revocation is no activity"
    );

    // The issuance arrives: it fills in what was not known and keeps the revocation.
    let issued = event("i", event_kind::SVID_ISSUED, "0f", NOW_MS);
    // A later revocation of the same SVID does not replace the first.
    let again = revoked("r2", "0f", NOW_MS + 900, "superseded");
    store.store_events(vec![issued, again]).await.unwrap();
    assert_eq!(
        store.svids(None, None).await.unwrap(),
        [SvidRecord {
            serial: "0f".to_owned(),
            entry_id: "e1".to_owned(),
            spiffe_id: "spiffe://example.org/w".to_owned(),
            node_id: "n1".to_owned(),
            issued_ms: Some(NOW_MS),
            not_after: Some(NOW + 3600),
            revoked_ms: Some(NOW_MS + 500),
            reason: Some("node_evicted".to_owned()),
            last_used_ms: None,
            uses: 0,
        }]
    );
    // An earlier revocation, arriving late, takes its place.
    store
        .store_events(vec![revoked("r0", "0f", NOW_MS + 100, "entry_changed")])
        .await
        .unwrap();
    let svid = &store.svids(None, None).await.unwrap()[0];
    assert_eq!(
        (svid.revoked_ms, svid.reason.as_deref()),
        (Some(NOW_MS + 100), Some("entry_changed"))
    );
}

/// Use counts saturate in SQL as they do when a batch is folded in memory: a node reporting
/// absurd counts cannot make every later batch about that SVID fail on an overflow.
async fn uses_saturate(store: &dyn Datastore) {
    store
        .store_events(vec![used("s1", "0f", NOW_MS, NOW_MS + 1, i64::MAX - 1)])
        .await
        .unwrap();
    store
        .store_events(vec![used("s2", "0f", NOW_MS + 2, NOW_MS + 3, 5)])
        .await
        .unwrap();
    let svids = store.svids(None, None).await.unwrap();
    assert_eq!(svids[0].uses, i64::MAX);
    assert_eq!(svids[0].last_used_ms, Some(NOW_MS + 3));
}

/// A node may report only on the SVIDs it issued: a batch about another node's serial is
/// refused whole, and that SVID's record is untouched.
async fn foreign_serials_refused(store: &dyn Datastore) {
    store
        .store_events(vec![event("f1", event_kind::SVID_ISSUED, "aa", NOW_MS)])
        .await
        .unwrap();
    let mut revocation = revoked("f2", "aa", NOW_MS + 1, "entry_removed");
    revocation.node_id = "n2".to_owned();
    let mut own = event("f3", event_kind::SVID_ISSUED, "bb", NOW_MS + 2);
    own.node_id = "n2".to_owned();
    let err = store.store_events(vec![own, revocation]).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid { reason: m, .. } if m.contains("serial aa") && m.contains("\"n1\"")),
        "{err}"
    );
    let svids = store.svids(None, None).await.unwrap();
    assert_eq!(svids.len(), 1, "nothing of the refused batch is stored");
    assert_eq!(svids[0].revoked_ms, None);
    // The issuing node's own report is taken.
    store
        .store_events(vec![revoked("f4", "aa", NOW_MS + 3, "entry_removed")])
        .await
        .unwrap();
}

/// Batches stored at once (SQLite writes them in one transaction) keep their own outcomes: a
/// refused one changes nothing and holds no other back; a duplicate counts once.
async fn concurrent_batches_keep_their_own_outcomes(store: &dyn Datastore) {
    store
        .store_events(vec![event("c0", event_kind::SVID_ISSUED, "cc", NOW_MS)])
        .await
        .unwrap();
    let mut foreign = revoked("c-bad", "cc", NOW_MS + 1, "entry_removed");
    foreign.node_id = "n2".to_owned();
    let batch = |i: usize| {
        vec![
            event(
                &format!("c{i}-a"),
                event_kind::SVID_ISSUED,
                &format!("d{i}"),
                NOW_MS,
            ),
            used(
                &format!("c{i}-b"),
                &format!("d{i}"),
                NOW_MS + 1,
                NOW_MS + 1,
                1,
            ),
        ]
    };
    let (a, b, bad, c, again) = tokio::join!(
        store.store_events(batch(1)),
        store.store_events(batch(2)),
        store.store_events(vec![foreign]),
        store.store_events(batch(3)),
        store.store_events(batch(1)),
    );
    assert!(matches!(bad, Err(StoreError::Invalid { .. })), "{bad:?}");
    let (a, again) = (a.unwrap(), again.unwrap());
    assert_eq!((b.unwrap(), c.unwrap()), (stored(2, 0), stored(2, 0)));
    // Whichever of the two copies was written first stored the events.
    assert_eq!(a.stored + again.stored, 2);
    assert_eq!(a.duplicates + again.duplicates, 2);
    let events = all_events(store).await;
    let mut stored_ids = ids(&events);
    stored_ids.sort();
    assert_eq!(
        stored_ids,
        ["c0", "c1-a", "c1-b", "c2-a", "c2-b", "c3-a", "c3-b"]
    );
    assert_eq!(store.svid("cc").await.unwrap().unwrap().revoked_ms, None);
}

/// A value the database cannot hold is refused as `Invalid` (the batch is at fault and the
/// node is told so), never `Unavailable` (which the node would retry for ever).
async fn unstorable_values_are_invalid(store: &dyn Datastore) {
    let mut event = event("z1", event_kind::SVID_ISSUED, "0c", NOW_MS);
    event.detail = "a\0b".to_owned();
    let err = store.store_events(vec![event]).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid { reason: m, .. } if m.contains("NUL")),
        "{err}"
    );
}

async fn uses_aggregate(store: &dyn Datastore) {
    let mut single = event("u0", event_kind::SVID_USED, "01", NOW_MS + 5);
    single.count = None; // one delivery, at time_ms
    store
        .store_events(vec![
            event("i", event_kind::SVID_ISSUED, "01", NOW_MS),
            used("u1", "01", NOW_MS + 1_000, NOW_MS + 9_000, 10),
            single,
        ])
        .await
        .unwrap();
    // Windows reported out of order: the latest use stays the latest.
    store
        .store_events(vec![
            used("u2", "01", NOW_MS + 500, NOW_MS + 800, 4),
            used("u3", "02", NOW_MS + 20_000, NOW_MS + 21_000, 2),
        ])
        .await
        .unwrap();
    let svids = store.svids(None, None).await.unwrap();
    assert_eq!(
        svids
            .iter()
            .map(|s| (s.serial.as_str(), s.issued_ms, s.uses, s.last_used_ms))
            .collect::<Vec<_>>(),
        [
            ("01", Some(NOW_MS), 15, Some(NOW_MS + 9_000)),
            ("02", None, 2, Some(NOW_MS + 21_000)),
        ],
        "by issuance, unknown issuance last"
    );

    let mut other_entry = event("i4", event_kind::SVID_ISSUED, "03", NOW_MS + 30_000);
    other_entry.entry_id = "e2".to_owned();
    other_entry.node_id = "n2".to_owned();
    store.store_events(vec![other_entry]).await.unwrap();
    assert_eq!(
        store.entry_activity().await.unwrap(),
        [
            EntryActivity {
                entry_id: "e1".to_owned(),
                last_issued_ms: Some(NOW_MS),
                last_used_ms: Some(NOW_MS + 21_000),
            },
            EntryActivity {
                entry_id: "e2".to_owned(),
                last_issued_ms: Some(NOW_MS + 30_000),
                last_used_ms: None,
            },
        ]
    );
    assert_eq!(
        store.node_activity().await.unwrap(),
        [
            NodeActivity {
                node_id: "n1".to_owned(),
                last_event_ms: NOW_MS + 20_000,
            },
            NodeActivity {
                node_id: "n2".to_owned(),
                last_event_ms: NOW_MS + 30_000,
            },
        ]
    );

    // The inventory of one entry, of one node, of both.
    let serials =
        |svids: Vec<SvidRecord>| -> Vec<String> { svids.into_iter().map(|s| s.serial).collect() };
    assert_eq!(
        serials(store.svids(Some("e1"), None).await.unwrap()),
        ["01", "02"]
    );
    assert_eq!(
        serials(store.svids(None, Some("n2")).await.unwrap()),
        ["03"]
    );
    assert_eq!(
        serials(store.svids(Some("e2"), Some("n2")).await.unwrap()),
        ["03"]
    );
    assert!(
        store
            .svids(Some("e1"), Some("n2"))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A node uploads late: arrival order is not the order things happened in. Event-time order
/// sorts by the event's time, ties by arrival, and a limit keeps the earliest events.
async fn events_listed_in_event_time_order(store: &dyn Datastore) {
    // Arrival order b3, b1, b2, b0; b1 and b2 happened at the same instant.
    store
        .store_events(vec![
            event("b3", event_kind::SVID_ISSUED, "s3", NOW_MS + 3_000),
            event("b1", event_kind::SVID_ISSUED, "s1", NOW_MS + 1_000),
            event("b2", event_kind::SVID_ISSUED, "s2", NOW_MS + 1_000),
        ])
        .await
        .unwrap();
    store
        .store_events(vec![event("b0", event_kind::SVID_ISSUED, "s0", NOW_MS)])
        .await
        .unwrap();
    let by_time = |limit| EventFilter {
        order: EventOrder::EventTime,
        limit,
        ..EventFilter::default()
    };
    let listed = store.list_events(by_time(0)).await.unwrap();
    assert_eq!(ids(&listed), ["b0", "b1", "b2", "b3"]);
    let first_two = store.list_events(by_time(2)).await.unwrap();
    assert_eq!(ids(&first_two), ["b0", "b1"]);
    let since = EventFilter {
        since_ms: Some(NOW_MS + 1_000),
        ..by_time(0)
    };
    assert_eq!(
        ids(&store.list_events(since).await.unwrap()),
        ["b1", "b2", "b3"]
    );
    // Arrival order, for paging and tailing, is unchanged.
    assert_eq!(ids(&all_events(store).await), ["b3", "b1", "b2", "b0"]);
}

async fn event_filters_and_paging(store: &dyn Datastore) {
    let mut db = event("a3", event_kind::SVID_ISSUED, "s2", NOW_MS + 3_000);
    db.node_id = "n2".to_owned();
    db.entry_id = "e2".to_owned();
    db.spiffe_id = "spiffe://example.org/db".to_owned();
    let mut denied = event("a4", event_kind::ATTESTATION_DENIED, "", NOW_MS + 4_000);
    denied.node_id = "n2".to_owned();
    denied.entry_id = String::new();
    denied.spiffe_id = String::new();
    let mut attested = event("a5", event_kind::NODE_ATTESTED, "", NOW_MS + 5_000);
    attested.node_id = String::new();
    attested.entry_id = String::new();
    attested.spiffe_id = String::new();
    store
        .store_events(vec![
            event("a1", event_kind::SVID_ISSUED, "s1", NOW_MS + 1_000),
            used("a2", "s1", NOW_MS + 2_000, NOW_MS + 2_000, 1),
            db,
        ])
        .await
        .unwrap();
    store
        .store_events(vec![
            denied,
            attested,
            revoked("a6", "s1", NOW_MS + 6_000, "superseded"),
        ])
        .await
        .unwrap();

    let list = |filter: EventFilter| async move {
        let events = store.list_events(filter.clone()).await.unwrap();
        ids(&events)
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let kinds = |kinds: &[&str]| kinds.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>();
    let some = |s: &str| Some(s.to_owned());
    let cases: Vec<(EventFilter, &[&str])> = vec![
        (
            EventFilter::default(),
            &["a1", "a2", "a3", "a4", "a5", "a6"],
        ),
        (
            EventFilter {
                since_ms: Some(NOW_MS + 3_000),
                ..EventFilter::default()
            },
            &["a3", "a4", "a5", "a6"],
        ),
        (
            EventFilter {
                until_ms: Some(NOW_MS + 3_000),
                ..EventFilter::default()
            },
            &["a1", "a2"],
        ),
        (
            EventFilter {
                kinds: kinds(&["svid_issued"]),
                ..EventFilter::default()
            },
            &["a1", "a3"],
        ),
        (
            EventFilter {
                kinds: kinds(&["svid_revoked", "svid_issued"]),
                ..EventFilter::default()
            },
            &["a1", "a3", "a6"],
        ),
        (
            EventFilter {
                spiffe_id: some("spiffe://example.org/w"),
                ..EventFilter::default()
            },
            &["a1", "a2", "a6"],
        ),
        (
            EventFilter {
                entry_id: some("e2"),
                ..EventFilter::default()
            },
            &["a3"],
        ),
        (
            EventFilter {
                node_id: some("n2"),
                ..EventFilter::default()
            },
            &["a3", "a4"],
        ),
        (
            EventFilter {
                node_id: some(""),
                ..EventFilter::default()
            },
            &["a5"],
        ),
        (
            EventFilter {
                serial: some("s1"),
                ..EventFilter::default()
            },
            &["a1", "a2", "a6"],
        ),
        (
            EventFilter {
                serial: some("zz"),
                ..EventFilter::default()
            },
            &[],
        ),
        (
            EventFilter {
                limit: 2,
                ..EventFilter::default()
            },
            &["a1", "a2"],
        ),
        // Combined.
        (
            EventFilter {
                node_id: some("n1"),
                kinds: kinds(&["svid_used"]),
                ..EventFilter::default()
            },
            &["a2"],
        ),
        (
            EventFilter {
                spiffe_id: some("spiffe://example.org/w"),
                since_ms: Some(NOW_MS + 2_000),
                until_ms: Some(NOW_MS + 6_000),
                ..EventFilter::default()
            },
            &["a2"],
        ),
        (
            EventFilter {
                serial: some("s1"),
                entry_id: some("e1"),
                node_id: some("n1"),
                kinds: kinds(&["svid_issued", "svid_revoked"]),
                since_ms: Some(NOW_MS),
                ..EventFilter::default()
            },
            &["a1", "a6"],
        ),
        (
            EventFilter {
                entry_id: some("e2"),
                kinds: kinds(&["svid_used"]),
                ..EventFilter::default()
            },
            &[],
        ),
    ];
    for (filter, expected) in cases {
        assert_eq!(list(filter.clone()).await, expected, "{filter:?}");
    }

    // Paging: each page starts after the last position of the previous one.
    for (filter, pages) in [
        (
            EventFilter {
                limit: 2,
                ..EventFilter::default()
            },
            vec![vec!["a1", "a2"], vec!["a3", "a4"], vec!["a5", "a6"], vec![]],
        ),
        (
            EventFilter {
                serial: some("s1"),
                limit: 1,
                ..EventFilter::default()
            },
            vec![vec!["a1"], vec!["a2"], vec!["a6"], vec![]],
        ),
        (
            EventFilter {
                node_id: some("n2"),
                limit: 5,
                ..EventFilter::default()
            },
            vec![vec!["a3", "a4"], vec![]],
        ),
    ] {
        let mut filter = filter;
        for page in pages {
            let events = store.list_events(filter.clone()).await.unwrap();
            assert_eq!(ids(&events), page, "{filter:?}");
            if let Some(last) = events.last() {
                filter.after_seq = Some(last.seq);
            }
        }
    }

    // Tailing: what is stored later follows the last position seen.
    let last = all_events(store).await.last().unwrap().seq;
    store
        .store_events(vec![event("a7", event_kind::SVID_ISSUED, "s3", NOW_MS)])
        .await
        .unwrap();
    let tail = EventFilter {
        after_seq: Some(last),
        ..EventFilter::default()
    };
    assert_eq!(list(tail).await, ["a7"]);
}

async fn events_appended_moves(store: &dyn Datastore) {
    let changes_before = *store.changes().borrow();
    let mut appended = store.events_appended();
    appended.borrow_and_update();
    let batch = vec![event("i", event_kind::SVID_ISSUED, "01", NOW_MS)];
    store.store_events(batch.clone()).await.unwrap();
    tokio::time::timeout(CHANGE_WAIT, appended.changed())
        .await
        .expect("events_appended() did not move after store_events")
        .unwrap();
    store
        .store_events(vec![used("u", "01", NOW_MS, NOW_MS, 1)])
        .await
        .unwrap();
    tokio::time::timeout(CHANGE_WAIT, appended.changed())
        .await
        .expect("events_appended() did not move after a second batch")
        .unwrap();
    // Whatever notification is still on its way has arrived after this.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        *store.changes().borrow(),
        changes_before,
        "storing events must not move changes()"
    );
}

async fn prune_keeps_valid_svids(store: &dyn Datastore) {
    let older_than = NOW_MS - 1_000_000;
    let old = older_than - 5_000;
    let expiring = |mut e: EventRecord, not_after: i64| {
        e.not_after = Some(not_after);
        e
    };
    // Expired before `older_than`: its events and its inventory row go.
    let gone_by = older_than / 1000 - 10;
    // Valid at NOW: its events stay however old, its revocation without a not-after too.
    let mut valid_revoked = revoked("valid-r", "valid", old + 10, "superseded");
    valid_revoked.not_after = None;
    // Expired at NOW but after `older_than`: its old events go, its inventory row stays.
    // Of unknown expiry: its old event goes, and so does its row.
    let mut unknown = revoked("unknown-r", "unknown", old, "entry_removed");
    unknown.not_after = None;
    let denied = |id: &str, time_ms| {
        let mut e = event(id, event_kind::ATTESTATION_DENIED, "", time_ms);
        e.not_after = None;
        e.entry_id = String::new();
        e
    };
    let mut elsewhere = event("else-i", event_kind::SVID_ISSUED, "else", old);
    elsewhere.entry_id = "e-gone".to_owned();
    elsewhere.node_id = "n-gone".to_owned();
    elsewhere.not_after = Some(gone_by);
    store
        .store_events(vec![
            expiring(
                event("gone-i", event_kind::SVID_ISSUED, "gone", old),
                gone_by,
            ),
            expiring(used("gone-u", "gone", old + 1, old + 1, 1), gone_by),
            expiring(
                event("valid-i", event_kind::SVID_ISSUED, "valid", old),
                NOW + 100,
            ),
            valid_revoked,
            expiring(
                event("recent-i", event_kind::SVID_ISSUED, "recent", old + 1),
                NOW - 10,
            ),
            expiring(
                used("recent-u", "recent", older_than, older_than, 1),
                NOW - 10,
            ),
            unknown,
            denied("denied-old", older_than - 1),
            denied("denied-new", older_than),
            elsewhere,
        ])
        .await
        .unwrap();
    store
        .create_entry(entry("e1", "spiffe://example.org/w", &["a:1"]), NOW)
        .await
        .unwrap();
    store.attest_node(node("n1", "01")).await.unwrap();

    let deleted = store.prune_events(older_than, NOW).await.unwrap();
    assert_eq!(
        ids(&all_events(store).await),
        ["valid-i", "valid-r", "recent-u", "denied-new"]
    );
    assert_eq!(deleted, 6);
    let serials: Vec<String> = store
        .svids(None, None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.serial)
        .collect();
    assert_eq!(serials, ["valid", "recent"]);
    // Activity stays for the entry and node that exist, and goes for those that do not.
    let entries: Vec<String> = store
        .entry_activity()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.entry_id)
        .collect();
    assert_eq!(entries, ["e1"]);
    let nodes: Vec<String> = store
        .node_activity()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.node_id)
        .collect();
    assert_eq!(nodes, ["n1"]);

    // Pruning again finds nothing more; later, the valid SVID has expired too.
    assert_eq!(store.prune_events(older_than, NOW).await.unwrap(), 0);
    assert_eq!(
        store
            .prune_events((NOW + 200) * 1000, NOW + 201)
            .await
            .unwrap(),
        4
    );
    assert!(all_events(store).await.is_empty());
    assert!(store.svids(None, None).await.unwrap().is_empty());
}

async fn prune_works_in_chunks(store: &dyn Datastore) {
    let total = 12_345;
    let batch: Vec<EventRecord> = (0..total)
        .map(|i| {
            let mut e = event(&format!("d{i}"), event_kind::ATTESTATION_DENIED, "", NOW_MS);
            e.not_after = None;
            e
        })
        .collect();
    for chunk in batch.chunks(1000) {
        store.store_events(chunk.to_vec()).await.unwrap();
    }
    store
        .store_events(vec![event(
            "later",
            event_kind::NODE_ATTESTED,
            "",
            NOW_MS + 1,
        )])
        .await
        .unwrap();
    assert_eq!(store.prune_events(NOW_MS + 1, NOW).await.unwrap(), total);
    assert_eq!(ids(&all_events(store).await), ["later"]);
}

/// Reopening runs the migrations again (nothing to do) and keeps the data; two stores opening
/// one database at the same moment both succeed.
async fn reopen_keeps_data(harness: &dyn Harness) {
    let (first, second) = tokio::join!(harness.open(), harness.open());
    let (first, second) = (first.unwrap(), second.unwrap());
    let created = first
        .create_entry(entry("kept", "spiffe://example.org/kept", &["a:1"]), NOW)
        .await
        .unwrap();
    drop((first, second));
    let reopened = harness.open().await.unwrap();
    assert_eq!(reopened.get_entry("kept").await.unwrap(), Some(created));
    drop(reopened);
    let again = harness.open().await.unwrap();
    assert_eq!(again.list_entries().await.unwrap().len(), 1);
}

/// A database migrated by a newer server is refused, with a message saying why.
async fn newer_schema_refused(harness: &dyn Harness) {
    drop(harness.open().await.unwrap());
    harness
        .execute("INSERT INTO schema_version (version, applied_at) VALUES (999, 0)")
        .await;
    let err = harness.open().await.err().unwrap();
    assert!(
        matches!(&err, StoreError::Corrupt { context: m, .. } if m.contains("version 999") && m.contains("older than the database")),
        "{err}"
    );
}

/// Rows that do not decode are reported as `Corrupt`, and a write that would act on one does
/// not happen.
async fn corrupt_rows_reported(harness: &dyn Harness) {
    let store = harness.open().await.unwrap();
    store
        .create_entry(entry("bad", "spiffe://example.org/bad", &["a:1"]), NOW)
        .await
        .unwrap();
    store.attest_node(node("bad", "01")).await.unwrap();
    store
        .create_join_token(token("bad", NOW + 60))
        .await
        .unwrap();
    harness
        .execute(
            "UPDATE entries SET selectors = 'not json';
             UPDATE nodes SET selectors = '{\"a\": 1}';
             UPDATE join_tokens SET labels = '[1]'",
        )
        .await;
    fn corrupt<T>(result: Result<T, StoreError>) -> bool {
        matches!(result, Err(StoreError::Corrupt { .. }))
    }
    let err = store.get_entry("bad").await.unwrap_err();
    let source = std::error::Error::source(&err).expect("no source");
    assert!(source.is::<serde_json::Error>(), "{err}: {source:?}");
    assert!(corrupt(store.get_entry("bad").await));
    assert!(corrupt(store.list_entries().await));
    assert!(corrupt(store.get_node("bad").await));
    assert!(corrupt(store.list_nodes().await));
    assert!(corrupt(store.join_node("bad", bare_node("n"), NOW).await));
    // The use was rolled back with the failed decoding: the token is still unused.
    assert!(corrupt(store.join_node("bad", bare_node("n"), NOW).await));
}

/// A database a version-1 server left is migrated, its data kept, and takes events.
async fn migrates_from_version_1(harness: &dyn Harness) {
    harness.create_at_version(1).await;
    let version = "SELECT MAX(version) FROM schema_version";
    assert_eq!(harness.query_i64(version).await, 1);
    harness
        .execute(
            "INSERT INTO entries (id, spiffe_id, selectors, selectors_sha256, node_selectors,
                x509_ttl_seconds, owner, purpose, dns_names, revision, created_at, updated_at)
             VALUES ('old', 'spiffe://example.org/old', '[\"a:1\"]', 'digest', '[]', 3600,
                'team-a', 'tests', '[]', 1, 1700000000, 1700000000)",
        )
        .await;

    let store = harness.open().await.unwrap();
    assert_eq!(harness.query_i64(version).await, 8);
    let old = store.get_entry("old").await.unwrap().unwrap();
    assert_eq!(old.spiffe_id, "spiffe://example.org/old");
    // Entries from before tasks are standing, with no delegation and no labels.
    assert_eq!(old.activation, "standing");
    assert!(old.delegates_to.is_empty() && old.labels.is_empty());
    let batch = vec![
        event("i", event_kind::SVID_ISSUED, "01", NOW_MS),
        used("u", "01", NOW_MS, NOW_MS, 2),
    ];
    assert_eq!(store.store_events(batch).await.unwrap(), stored(2, 0));
    drop(store);

    // Opening again migrates nothing and finds the events.
    let store = harness.open().await.unwrap();
    assert_eq!(harness.query_i64(version).await, 8);
    assert_eq!(ids(&all_events(&*store).await), ["i", "u"]);
    // Rows from before the change log are in no record of it; writes since are.
    assert_eq!(store.last_revision().await.unwrap(), 0);
    store.delete_entry("old").await.unwrap();
    let log = store.changes_after(0, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (&log[0].kind, log[0].key.as_str()),
        (&ChangeKind::Entry, "old")
    );
    assert_eq!(store.svids(None, None).await.unwrap()[0].uses, 2);
}

/// A task event on node `n1` about task `task` with `chain` (task ids; the last is `task`).
fn task_event(id: &str, kind: &str, chain: &[&str], time_ms: i64) -> EventRecord {
    let task = chain.last().copied().unwrap_or_default();
    EventRecord {
        id: id.to_owned(),
        kind: kind.to_owned(),
        time_ms,
        node_id: "n1".to_owned(),
        entry_id: format!("entry-{}", chain.len()),
        spiffe_id: format!("spiffe://example.org/agent/task/{task}"),
        not_after: Some(NOW + 600),
        received_ms: time_ms + 5,
        caller: (kind == event_kind::TASK_STARTED).then(caller),
        task: Some(EventTask {
            task_id: task.to_owned(),
            chain: chain
                .iter()
                .map(|t| {
                    (
                        (*t).to_owned(),
                        format!("spiffe://example.org/agent/task/{t}"),
                    )
                })
                .collect(),
            purpose: "fix it".to_owned(),
            owner: "team-a".to_owned(),
            pid: 77,
            end_reason: (kind == event_kind::TASK_ENDED).then(|| "ended".to_owned()),
        }),
        ..EventRecord::default()
    }
}

/// Task events keep the task inventory (an end arriving first is merged with its start), the
/// task travels through the stored event, and an order to end a task reaches its live
/// descendants once.
async fn tasks_follow_their_events_and_orders(store: &dyn Datastore) {
    let ms = NOW * 1000;
    let batch = vec![
        task_event("t1", event_kind::TASK_STARTED, &["a"], ms),
        task_event("t2", event_kind::TASK_STARTED, &["a", "b"], ms + 1),
        task_event("t3", event_kind::TASK_STARTED, &["a", "b", "c"], ms + 2),
        // An end stored before its start (another batch's order) is merged with it.
        task_event("t4", event_kind::TASK_ENDED, &["x"], ms + 9),
    ];
    assert_eq!(store.store_events(batch).await.unwrap(), stored(4, 0));
    store
        .store_events(vec![task_event(
            "t5",
            event_kind::TASK_STARTED,
            &["x"],
            ms + 3,
        )])
        .await
        .unwrap();
    let x = store.task("x").await.unwrap().unwrap();
    assert_eq!(
        (
            x.started_ms,
            x.ended_ms,
            x.end_reason.as_deref(),
            x.starter_uid
        ),
        (Some(ms + 3), Some(ms + 9), Some("ended"), Some(1000))
    );
    let c = store.task("c").await.unwrap().unwrap();
    assert_eq!(c.parent_id.as_deref(), Some("b"));
    assert_eq!(c.chain.len(), 3);
    assert_eq!(
        (c.purpose.as_str(), c.owner.as_str(), c.pid),
        ("fix it", "team-a", 77)
    );
    assert_eq!(c.deadline, NOW + 600);
    let live: Vec<String> = store
        .tasks(true)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert_eq!(live, ["a", "b", "c"]);
    assert_eq!(store.tasks(false).await.unwrap().len(), 4);
    let listed = store
        .list_events(EventFilter {
            kinds: vec![event_kind::TASK_STARTED.to_owned()],
            ..EventFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        listed.last().unwrap().event.task,
        task_event("t5", event_kind::TASK_STARTED, &["x"], 0).task
    );

    // Ordering "b" ended reaches "b" and "c", not "a"; a second order adds nothing.
    let mut changes = store.changes();
    changes.borrow_and_update();
    let ordered = store
        .order_task_end("b", "operator", "stop the review", ms + 20)
        .await
        .unwrap();
    let mut ids: Vec<&str> = ordered.iter().map(|t| t.task_id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["b", "c"]);
    assert!(changes.has_changed().unwrap());
    let b = store.task("b").await.unwrap().unwrap();
    assert_eq!(
        (
            b.end_ordered_ms,
            b.end_order_reason.as_deref(),
            b.end_order_detail.as_str()
        ),
        (Some(ms + 20), Some("operator"), "stop the review")
    );
    assert!(
        store
            .order_task_end("b", "operator", "again", ms + 30)
            .await
            .unwrap()
            .is_empty()
    );
    // An ended task takes no order.
    assert!(
        store
            .order_task_end("x", "operator", "", ms)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store.order_task_end("nosuch", "operator", "", ms).await,
        Err(StoreError::NotFound { kind: "task", .. })
    ));
    // Another node cannot end (or start) a task this one runs: the batch is refused.
    let mut foreign = task_event("t-foreign", event_kind::TASK_ENDED, &["a"], ms + 500);
    foreign.node_id = "n2".into();
    assert!(matches!(
        store.store_events(vec![foreign]).await,
        Err(StoreError::Invalid { .. })
    ));
}

/// A JWT-SVID event about `jti`, signed for node `n1`, expiring an hour after [`NOW`].
fn jwt_event(id: &str, kind: &str, jti: &str, time_ms: i64) -> EventRecord {
    EventRecord {
        jti: jti.to_owned(),
        serial: String::new(),
        ..event(id, kind, "", time_ms)
    }
}

/// JWT-SVIDs: issuance, uses from any node, revocation by the holder or the server only, the
/// revocations agents are sent, and a change announced when one is revoked.
async fn jwts_follow_their_events(store: &dyn Datastore) {
    let issued = EventRecord {
        audience: vec!["api".into(), "db".into()],
        ..jwt_event("j-1", event_kind::JWT_ISSUED, "jti-1", NOW * 1000)
    };
    let other = jwt_event("j-2", event_kind::JWT_ISSUED, "jti-2", NOW * 1000 + 1);
    assert_eq!(
        store.store_events(vec![issued, other]).await.unwrap(),
        stored(2, 0)
    );
    let mut validated = EventRecord {
        node_id: "n2".into(),
        count: Some(3),
        last_ms: Some(NOW * 1000 + 50),
        detail: "validated".into(),
        ..jwt_event("j-3", event_kind::JWT_USED, "jti-1", NOW * 1000 + 40)
    };
    store.store_events(vec![validated.clone()]).await.unwrap();
    validated.id = "j-4".into();
    validated.count = Some(2);
    store.store_events(vec![validated]).await.unwrap();
    let jwt = store.jwt("jti-1").await.unwrap().unwrap();
    assert_eq!(jwt.node_id, "n1", "a use elsewhere does not move the token");
    assert_eq!(jwt.audience, ["api", "db"]);
    assert_eq!((jwt.uses, jwt.last_used_ms), (5, Some(NOW * 1000 + 50)));
    assert_eq!(jwt.expires_at, Some(NOW + 3600));
    // Another node cannot revoke n1's token: nothing of the batch is stored.
    let foreign = EventRecord {
        node_id: "n2".into(),
        reason: Some("operator".into()),
        ..jwt_event("j-5", event_kind::JWT_REVOKED, "jti-1", NOW * 1000 + 60)
    };
    assert!(matches!(
        store.store_events(vec![foreign]).await,
        Err(StoreError::Invalid { .. })
    ));
    assert!(store.jwt_revocations(NOW).await.unwrap().is_empty());
    let mut changes = store.changes();
    changes.borrow_and_update();
    let by_server = EventRecord {
        node_id: String::new(),
        reason: Some("operator".into()),
        ..jwt_event("j-6", event_kind::JWT_REVOKED, "jti-1", NOW * 1000 + 70)
    };
    store.store_events(vec![by_server]).await.unwrap();
    assert!(changes.has_changed().unwrap(), "agents must be told");
    assert_eq!(
        store.jwt_revocations(NOW).await.unwrap(),
        [("jti-1".to_owned(), NOW + 3600)]
    );
    assert!(
        store.jwt_revocations(NOW + 3600).await.unwrap().is_empty(),
        "forgotten at exp"
    );
    let jwt = store.jwt("jti-1").await.unwrap().unwrap();
    assert_eq!(
        (jwt.revoked_ms, jwt.reason.as_deref()),
        (Some(NOW * 1000 + 70), Some("operator"))
    );
    let live = store
        .jwts(JwtFilter {
            entry_id: Some("e1".into()),
            live_at: Some(NOW),
            ..JwtFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        live.iter().map(|j| j.jti.as_str()).collect::<Vec<_>>(),
        ["jti-2"]
    );
    let all = store.jwts(JwtFilter::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|j| j.jti.as_str()).collect::<Vec<_>>(),
        ["jti-2", "jti-1"],
        "newest first"
    );
    let listed = store.list_events(EventFilter::default()).await.unwrap();
    let first = &listed.iter().find(|e| e.event.id == "j-1").unwrap().event;
    assert_eq!((first.jti.as_str(), first.audience.len()), ("jti-1", 2));
    // A node's report about a token the inventory does not hold is kept as an event only.
    let ghost = EventRecord {
        node_id: "n2".into(),
        count: Some(1),
        ..jwt_event("j-7", event_kind::JWT_USED, "ghost", NOW * 1000 + 80)
    };
    assert_eq!(store.store_events(vec![ghost]).await.unwrap(), stored(1, 0));
    assert!(store.jwt("ghost").await.unwrap().is_none());
    // Tokens are their entry's activity, as their own node reports it (n2's validations of
    // n1's token above do not count).
    let activity = store.entry_activity().await.unwrap();
    let e1 = activity.iter().find(|a| a.entry_id == "e1").unwrap();
    assert_eq!(e1.last_issued_ms, Some(NOW * 1000 + 1));
    assert_eq!(e1.last_used_ms, None);
    let own_use = EventRecord {
        count: Some(1),
        ..jwt_event("j-8", event_kind::JWT_USED, "jti-2", NOW * 1000 + 90)
    };
    store.store_events(vec![own_use]).await.unwrap();
    let activity = store.entry_activity().await.unwrap();
    let e1 = activity.iter().find(|a| a.entry_id == "e1").unwrap();
    assert_eq!(e1.last_used_ms, Some(NOW * 1000 + 90));
    // Pruning: kept while they may be live, gone once expired before the horizon.
    store.prune_events(NOW * 1000, NOW).await.unwrap();
    assert!(store.jwt("jti-1").await.unwrap().is_some());
    let later = NOW + 7200;
    store.prune_events(later * 1000, later).await.unwrap();
    assert!(store.jwt("jti-1").await.unwrap().is_none());
    assert!(store.jwts(JwtFilter::default()).await.unwrap().is_empty());
}

/// JWT signing keys: published once per kid, times updated in place, gone after not-after.
async fn jwt_keys_published(store: &dyn Datastore) {
    let key = |server: &str, kid: &str, from: i64| JwtKeyRecord {
        server_id: server.into(),
        kid: kid.into(),
        jwk: format!("{{\"kid\":\"{kid}\"}}"),
        active_from: from,
        not_after: from + 100,
    };
    let mut changes = store.changes();
    changes.borrow_and_update();
    store.publish_jwt_key(key("s1", "a", NOW)).await.unwrap();
    assert!(changes.has_changed().unwrap());
    store.publish_jwt_key(key("s1", "a", NOW)).await.unwrap();
    assert_eq!(
        store.jwt_keys(NOW).await.unwrap().len(),
        1,
        "publishing again adds nothing"
    );
    store
        .publish_jwt_key(key("s2", "b", NOW + 10))
        .await
        .unwrap();
    store
        .publish_jwt_key(key("s1", "a", NOW + 50))
        .await
        .unwrap();
    let keys = store.jwt_keys(NOW).await.unwrap();
    assert_eq!(
        keys.iter()
            .map(|k| (k.kid.as_str(), k.active_from))
            .collect::<Vec<_>>(),
        [("a", NOW + 50), ("b", NOW + 10)]
    );
    assert_eq!(
        store.jwt_keys(NOW + 115).await.unwrap().len(),
        1,
        "b is past its not-after"
    );
}

/// Policy versions: each change a new version, the same text again none, clearing one too.
async fn policy_versions(store: &dyn Datastore) {
    assert_eq!(store.policy().await.unwrap(), None);
    // Clearing a policy that was never set stores nothing.
    assert_eq!(store.set_policy("", 1).await.unwrap().version, 0);
    let mut changes = store.changes();
    changes.borrow_and_update();
    let first = store
        .set_policy("permit(principal, action, resource);", 10)
        .await
        .unwrap();
    assert_eq!((first.version, first.set_ms), (1, 10));
    assert_eq!(first.sha256.len(), 64);
    assert!(changes.has_changed().unwrap());
    let same = store
        .set_policy("permit(principal, action, resource);", 20)
        .await
        .unwrap();
    assert_eq!(same, first, "the same text is no new version");
    let second = store
        .set_policy("forbid(principal, action, resource);", 30)
        .await
        .unwrap();
    assert_eq!(second.version, 2);
    let cleared = store.set_policy("", 40).await.unwrap();
    assert_eq!((cleared.version, cleared.text.as_str()), (3, ""));
    assert_eq!(store.policy().await.unwrap(), Some(cleared));
    let versions: Vec<i64> = store
        .policy_history()
        .await
        .unwrap()
        .iter()
        .map(|p| p.version)
        .collect();
    assert_eq!(versions, [1, 2, 3]);
}

/// An event row that does not decode is reported as `Corrupt`.
async fn corrupt_events_reported(harness: &dyn Harness) {
    let store = harness.open().await.unwrap();
    store
        .store_events(vec![used("u", "01", NOW_MS, NOW_MS, 1)])
        .await
        .unwrap();
    harness
        .execute("UPDATE events SET caller_unit = NULL")
        .await;
    let err = store.list_events(EventFilter::default()).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { context: m, .. } if m.contains("caller")),
        "{err}"
    );
}

/// Stores `batches` batches of `size` events shaped like an agent's reports (an issuance, uses
/// and a revocation per SVID, random serials, time-ordered ids) and prints the rate.
async fn ingest_rate(store: &dyn Datastore, backend: &str, size: usize, batches: usize) {
    let mut serial = [0u8; 16];
    let mut batch_of = |b: usize| -> Vec<EventRecord> {
        (0..size)
            .map(|i| {
                let n = b * size + i;
                // Every tenth event starts the story of a new SVID.
                let step = n % 10;
                if step == 0 {
                    aws_lc_rs::rand::fill(&mut serial).unwrap();
                }
                let serial = hex::encode(serial);
                let id = format!("{:012x}-7000-8000-{n:012x}", NOW_MS + n as i64);
                let time = NOW_MS + n as i64;
                let mut e = match step {
                    0 => event(&id, event_kind::SVID_ISSUED, &serial, time),
                    9 => revoked(&id, &serial, time, "superseded"),
                    _ => used(&id, &serial, time, time, 3),
                };
                e.entry_id = format!("entry-{}", n % 50);
                e.node_id = format!("node-{}", n % 7);
                e
            })
            .collect()
    };
    let prepared: Vec<Vec<EventRecord>> = (0..batches).map(&mut batch_of).collect();
    let start = Instant::now();
    for batch in prepared {
        assert_eq!(
            store.store_events(batch).await.unwrap().stored as usize,
            size
        );
    }
    let elapsed = start.elapsed();
    let events = (size * batches) as f64;
    println!(
        "{backend}: {events} events in batches of {size}: {:.2} s, {:.0} events/s",
        elapsed.as_secs_f64(),
        events / elapsed.as_secs_f64()
    );
}

/// One generated test per case, for the backend whose module invokes it. Each module provides
/// `harness()`, `None` when the backend is not available.
/// Node CAs are kept until they expire, per node; recording one again changes nothing.
async fn node_cas_kept_until_expiry(store: &dyn Datastore) {
    let ca = |serial: &str, node: &str, not_after: i64| NodeCaRecord {
        serial: serial.into(),
        node_id: node.into(),
        server_id: "s1".into(),
        der: vec![1, 2, 3],
        not_after,
    };
    store
        .record_node_ca(ca("0a", "n1", NOW + 100))
        .await
        .unwrap();
    store
        .record_node_ca(ca("0a", "n1", NOW + 999))
        .await
        .unwrap();
    store
        .record_node_ca(ca("0b", "n1", NOW + 200))
        .await
        .unwrap();
    store
        .record_node_ca(ca("0c", "n2", NOW + 50))
        .await
        .unwrap();
    let serials = |cas: Vec<NodeCaRecord>| cas.into_iter().map(|c| c.serial).collect::<Vec<_>>();
    assert_eq!(
        serials(store.node_cas(Some("n1"), NOW).await.unwrap()),
        ["0a", "0b"]
    );
    assert_eq!(
        store.node_cas(Some("n1"), NOW).await.unwrap()[0].not_after,
        NOW + 100
    );
    assert_eq!(
        serials(store.node_cas(None, NOW + 60).await.unwrap()),
        ["0a", "0b"]
    );
    assert_eq!(
        serials(store.node_cas(None, NOW).await.unwrap()),
        ["0a", "0b", "0c"]
    );
    assert!(
        store
            .node_cas(Some("nobody"), NOW)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A revocation is recorded once; the first record wins; expired ones are not served; a
/// revocation moves `changes()`, revoking nothing new does not.
async fn revocations_recorded_once(store: &dyn Datastore) {
    let revocation =
        |serial: &str, root: Option<&str>, not_after: i64, detail: &str| RevocationRecord {
            serial: serial.into(),
            node_id: "n1".into(),
            root_server_id: root.map(str::to_owned),
            not_after,
            reason: "operator".into(),
            detail: detail.into(),
            revoked_ms: NOW_MS,
        };
    let mut changes = store.changes();
    changes.borrow_and_update();
    let first = store
        .revoke(vec![
            revocation("01", None, NOW + 100, "first"),
            revocation("02", Some("s1"), NOW + 10, "node CA"),
        ])
        .await
        .unwrap();
    assert_eq!(first, ["01", "02"]);
    assert!(changes.has_changed().unwrap());
    let again = store
        .revoke(vec![revocation("01", None, NOW + 100, "second")])
        .await
        .unwrap();
    // (Whether `changes()` moves now is not asserted: PostgreSQL's notification of the first
    // revocation may arrive at any time.)
    assert!(again.is_empty());
    let listed = store.revocations(NOW).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].detail, "first");
    assert_eq!(listed[1].root_server_id.as_deref(), Some("s1"));
    let later = store.revocations(NOW + 50).await.unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].serial, "01");
}

/// A CRL replaces its issuer's stored one only with a higher number; CRLs of expired issuers
/// are not served.
async fn crls_replaced_by_higher_numbers(store: &dyn Datastore) {
    let crl = |issuer: &str, number: i64, until: i64, der: &[u8]| CrlRecord {
        issuer: issuer.into(),
        publisher: "n1".into(),
        number,
        next_update: NOW + 3600,
        until,
        revoked: 1,
        der: der.to_vec(),
    };
    assert!(
        store
            .put_crl(crl("aa", 5, NOW + 100, b"five"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_crl(crl("aa", 4, NOW + 100, b"four"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_crl(crl("aa", 5, NOW + 100, b"five again"))
            .await
            .unwrap()
    );
    assert!(
        store
            .put_crl(crl("aa", 6, NOW + 100, b"six"))
            .await
            .unwrap()
    );
    assert!(
        store
            .put_crl(crl("bb", 1, NOW + 10, b"other"))
            .await
            .unwrap()
    );
    let stored = store.crls(NOW).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].der, b"six");
    assert_eq!(stored[0].number, 6);
    assert_eq!(store.crls(NOW + 50).await.unwrap().len(), 1);
}

/// An entry goes dormant once, wakes on activation, and can go dormant again.
async fn entries_go_dormant_and_wake(store: &dyn Datastore) {
    assert!(store.set_entry_dormant("e1", NOW_MS).await.unwrap());
    assert!(!store.set_entry_dormant("e1", NOW_MS + 5).await.unwrap());
    let standing = store.entry_standings().await.unwrap();
    assert_eq!(standing[0].dormant_since_ms, Some(NOW_MS));
    assert!(store.activate_entry("e1", NOW_MS + 10).await.unwrap());
    assert!(!store.activate_entry("e2", NOW_MS + 10).await.unwrap());
    let standing = store.entry_standings().await.unwrap();
    assert_eq!(standing.len(), 2);
    assert_eq!(standing[0].dormant_since_ms, None);
    assert_eq!(standing[0].activated_ms, Some(NOW_MS + 10));
    assert!(store.set_entry_dormant("e1", NOW_MS + 20).await.unwrap());
}

/// A revocation that took an SVID out of use is what the inventory keeps, even after a
/// rotation's earlier `superseded` record of it, in either arrival order.
async fn out_of_use_revocation_wins_over_a_rotation(store: &dyn Datastore) {
    store
        .store_events(vec![revoked("s1", "0a01", NOW_MS, "superseded")])
        .await
        .unwrap();
    store
        .store_events(vec![revoked("o1", "0a01", NOW_MS + 5, "operator")])
        .await
        .unwrap();
    let svid = store.svid("0a01").await.unwrap().unwrap();
    assert_eq!(
        (svid.reason.as_deref(), svid.revoked_ms),
        (Some("operator"), Some(NOW_MS + 5))
    );
    store
        .store_events(vec![
            revoked("o2", "0a02", NOW_MS + 5, "entry_removed"),
            revoked("s2", "0a02", NOW_MS, "superseded"),
        ])
        .await
        .unwrap();
    let svid = store.svid("0a02").await.unwrap().unwrap();
    assert_eq!(svid.reason.as_deref(), Some("entry_removed"));
    // Between two of one kind, the earliest.
    store
        .store_events(vec![revoked("o3", "0a03", NOW_MS + 9, "operator")])
        .await
        .unwrap();
    store
        .store_events(vec![revoked("o4", "0a03", NOW_MS + 1, "entry_removed")])
        .await
        .unwrap();
    let svid = store.svid("0a03").await.unwrap().unwrap();
    assert_eq!(svid.reason.as_deref(), Some("entry_removed"));
}

/// The SVID of one serial, as the inventory holds it.
async fn svid_by_serial(store: &dyn Datastore) {
    store
        .store_events(vec![event("i", event_kind::SVID_ISSUED, "0a0b", NOW_MS)])
        .await
        .unwrap();
    let svid = store.svid("0a0b").await.unwrap().unwrap();
    assert_eq!(svid.serial, "0a0b");
    assert!(store.svid("0c0d").await.unwrap().is_none());
}

macro_rules! suite_tests {
    (stores: $($case:ident),* ; harnesses: $($special:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let Some(harness) = harness().await else { return };
                let store = harness.open().await.unwrap();
                super::$case(&*store).await;
                drop(store);
                harness.finish().await;
            }
        )*
        $(
            #[tokio::test]
            async fn $special() {
                let Some(harness) = harness().await else { return };
                super::$special(&harness).await;
                harness.finish().await;
            }
        )*
    };
}

/// The suite on SQLite files in a temporary directory.
mod sqlite_suite {
    use super::*;

    /// A database file in its own temporary directory.
    struct Sqlite {
        /// Removed with the harness.
        dir: tempfile::TempDir,
    }

    impl Sqlite {
        fn path(&self) -> std::path::PathBuf {
            self.dir.path().join("tessera.db")
        }

        async fn finish(self) {}
    }

    #[async_trait::async_trait]
    impl Harness for Sqlite {
        async fn open(&self) -> Result<Arc<dyn Datastore>, StoreError> {
            Ok(Arc::new(SqliteStore::open(&self.path())?))
        }

        async fn execute(&self, sql: &str) {
            let conn = rusqlite::Connection::open(self.path()).unwrap();
            conn.busy_timeout(Duration::from_secs(5)).unwrap();
            conn.execute_batch(sql).unwrap();
        }

        async fn query_i64(&self, sql: &str) -> i64 {
            let conn = rusqlite::Connection::open(self.path()).unwrap();
            conn.query_row(sql, [], |row| row.get(0)).unwrap()
        }

        async fn create_at_version(&self, version: i64) {
            SqliteStore::create_at_version(&self.path(), version).unwrap();
        }
    }

    async fn harness() -> Option<Sqlite> {
        Some(Sqlite {
            dir: tempfile::tempdir().unwrap(),
        })
    }

    suite_tests!(
        stores: entries_round_trip, duplicate_entries_refused, entry_updates_check_revision,
            entry_deletion, join_tokens, token_survives_a_failed_join, concurrent_token_use,
            node_attestation,
            banned_node_stays_banned, evicted_node_attests_again, node_renewal_and_contact,
            bundle_roots, changes_follow_writes, change_log_records_commits,
            change_log_under_concurrent_writers, events_round_trip, events_stored_once,
            invalid_batch_refused, revocation_before_issuance, uses_aggregate, uses_saturate,
            foreign_serials_refused, unstorable_values_are_invalid,
            concurrent_batches_keep_their_own_outcomes,
            event_filters_and_paging, events_listed_in_event_time_order, events_appended_moves, prune_keeps_valid_svids,
            prune_works_in_chunks, node_cas_kept_until_expiry, revocations_recorded_once,
            crls_replaced_by_higher_numbers, svid_by_serial, entries_go_dormant_and_wake,
            out_of_use_revocation_wins_over_a_rotation, tasks_follow_their_events_and_orders,
            policy_versions, jwts_follow_their_events, jwt_keys_published;
        harnesses: reopen_keeps_data, newer_schema_refused, corrupt_rows_reported,
            migrates_from_version_1, corrupt_events_reported,
    );

    #[tokio::test]
    async fn database_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let harness = harness().await.unwrap();
        let store = harness.open().await.unwrap();
        store
            .create_entry(entry("e", "spiffe://example.org/e", &["a:1"]), NOW)
            .await
            .unwrap();
        // SQLite gives its journal files the database's mode.
        for suffix in ["", "-wal", "-shm"] {
            let mut path = harness.path().into_os_string();
            path.push(suffix);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{path:?}");
        }
    }

    #[tokio::test]
    #[ignore = "a measurement, not a check: run it with --ignored --nocapture"]
    async fn ingest_rate() {
        for size in [500, 1000] {
            let harness = harness().await.unwrap();
            let store = harness.open().await.unwrap();
            super::ingest_rate(&*store, "SQLite", size, 50_000 / size).await;
        }
    }

    #[tokio::test]
    async fn not_a_database_is_corrupt() {
        let harness = harness().await.unwrap();
        std::fs::write(harness.path(), vec![0x5a; 8192]).unwrap();
        let err = harness.open().await.err().unwrap();
        assert!(matches!(&err, StoreError::Corrupt { .. }), "{err}");
        // The driver's error stays reachable, not only its words.
        let source = std::error::Error::source(&err).expect("no source");
        assert!(source.is::<rusqlite::Error>(), "{source:?}");
        assert!(
            err.to_string()
                .contains(&harness.path().display().to_string()),
            "{err}"
        );
    }
}

/// The suite on scratch databases of the server named by `TESSERA_TEST_POSTGRES`, plus what
/// only a shared server has: several replicas, and connections lost under them.
mod postgres_suite {
    use super::*;

    /// A scratch database, dropped when a test passes.
    struct Postgres {
        /// Its connection string.
        conninfo: String,
    }

    impl Postgres {
        async fn connect(&self) -> Arc<PostgresStore> {
            Arc::new(PostgresStore::connect(&self.conninfo).await.unwrap())
        }

        async fn client(&self) -> tokio_postgres::Client {
            let (client, connection) =
                tokio_postgres::connect(&self.conninfo, tokio_postgres::NoTls)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            client
        }

        async fn finish(self) {
            tessera_harness::postgres::drop_scratch_database(&self.conninfo).await;
        }
    }

    #[async_trait::async_trait]
    impl Harness for Postgres {
        async fn open(&self) -> Result<Arc<dyn Datastore>, StoreError> {
            let store = PostgresStore::connect(&self.conninfo).await?;
            // Its first announcement must not pass for a change a test is waiting for.
            listening(&store).await;
            Ok(Arc::new(store))
        }

        async fn execute(&self, sql: &str) {
            self.client().await.batch_execute(sql).await.unwrap();
        }

        async fn query_i64(&self, sql: &str) -> i64 {
            self.client()
                .await
                .query_one(sql, &[])
                .await
                .unwrap()
                .get(0)
        }

        async fn create_at_version(&self, version: i64) {
            PostgresStore::create_at_version(&self.conninfo, version)
                .await
                .unwrap();
        }
    }

    async fn harness() -> Option<Postgres> {
        Some(Postgres {
            conninfo: tessera_harness::postgres::scratch_database_from_env().await?,
        })
    }

    suite_tests!(
        stores: entries_round_trip, duplicate_entries_refused, entry_updates_check_revision,
            entry_deletion, join_tokens, token_survives_a_failed_join, concurrent_token_use,
            node_attestation,
            banned_node_stays_banned, evicted_node_attests_again, node_renewal_and_contact,
            bundle_roots, changes_follow_writes, change_log_records_commits,
            change_log_under_concurrent_writers, events_round_trip, events_stored_once,
            invalid_batch_refused, revocation_before_issuance, uses_aggregate, uses_saturate,
            foreign_serials_refused, unstorable_values_are_invalid,
            concurrent_batches_keep_their_own_outcomes,
            event_filters_and_paging, events_listed_in_event_time_order, events_appended_moves, prune_keeps_valid_svids,
            prune_works_in_chunks, node_cas_kept_until_expiry, revocations_recorded_once,
            crls_replaced_by_higher_numbers, svid_by_serial, entries_go_dormant_and_wake,
            out_of_use_revocation_wins_over_a_rotation, tasks_follow_their_events_and_orders,
            policy_versions, jwts_follow_their_events, jwt_keys_published;
        harnesses: reopen_keeps_data, newer_schema_refused, corrupt_rows_reported,
            migrates_from_version_1, corrupt_events_reported,
    );

    /// Waits until the store's notification connection is up: it announces that by moving
    /// `changes()` and `events_appended()` on once.
    async fn listening(store: &PostgresStore) {
        tokio::time::timeout(Duration::from_secs(5), async {
            store.changes().wait_for(|n| *n >= 1).await.unwrap();
            store.events_appended().wait_for(|n| *n >= 1).await.unwrap();
        })
        .await
        .expect("the notification connection did not come up");
    }

    #[tokio::test]
    async fn replicas_see_each_others_events() {
        let Some(harness) = harness().await else {
            return;
        };
        let (a, b) = (harness.connect().await, harness.connect().await);
        listening(&a).await;
        listening(&b).await;
        let changes_before = *b.changes().borrow();
        let mut appended = b.events_appended();
        appended.borrow_and_update();

        let batch = vec![
            event("i", event_kind::SVID_ISSUED, "01", NOW_MS),
            used("u", "01", NOW_MS + 1, NOW_MS + 1, 4),
        ];
        assert_eq!(a.store_events(batch).await.unwrap(), stored(2, 0));
        tokio::time::timeout(CHANGE_WAIT, appended.changed())
            .await
            .expect("the other replica did not hear of the stored events")
            .unwrap();
        assert_eq!(ids(&all_events(&*b).await), ["i", "u"]);
        assert_eq!(b.svids(None, None).await.unwrap()[0].uses, 4);

        // Both replicas storing the same events at once: each is stored once.
        let batch: Vec<EventRecord> = (0..200)
            .map(|i| used(&format!("c{i}"), "01", NOW_MS + 10, NOW_MS + 10, 1))
            .collect();
        let (first, second) =
            tokio::join!(a.store_events(batch.clone()), b.store_events(batch.clone()));
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!(first.stored + second.stored, 200, "{first:?} {second:?}");
        assert_eq!(first.duplicates + second.duplicates, 200);
        assert_eq!(a.svids(None, None).await.unwrap()[0].uses, 204);

        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            *b.changes().borrow(),
            changes_before,
            "events must not move the other replica's changes()"
        );
        drop((a, b));
        harness.finish().await;
    }

    #[tokio::test]
    #[ignore = "a measurement, not a check: run it with --ignored --nocapture"]
    async fn ingest_rate() {
        for size in [500, 1000] {
            let Some(harness) = harness().await else {
                return;
            };
            let store = harness.open().await.unwrap();
            super::ingest_rate(&*store, "PostgreSQL", size, 50_000 / size).await;
            drop(store);
            harness.finish().await;
        }
    }

    /// Checks that `changes()` of `watcher` moves on after `op` on another replica.
    async fn sees_change<T>(watcher: &PostgresStore, what: &str, op: impl Future<Output = T>) -> T {
        let mut changes = watcher.changes();
        let out = op.await;
        tokio::time::timeout(CHANGE_WAIT, changes.changed())
            .await
            .unwrap_or_else(|_| panic!("the other replica did not see {what}"))
            .unwrap();
        out
    }

    #[tokio::test]
    async fn replicas_see_each_others_changes() {
        let Some(harness) = harness().await else {
            return;
        };
        let (a, b) = (harness.connect().await, harness.connect().await);
        listening(&b).await;

        // Only `a` writes and only `b` watches: every move of `b`'s counter is then one
        // notification of one of `a`'s writes.
        let created = sees_change(&b, "an entry created", async {
            a.create_entry(entry("e", "spiffe://example.org/e", &["a:1"]), NOW)
                .await
                .unwrap()
        })
        .await;
        assert_eq!(b.get_entry("e").await.unwrap(), Some(created.clone()));
        sees_change(&b, "an entry updated", async {
            a.update_entry(created, NOW + 1).await.unwrap()
        })
        .await;
        sees_change(&b, "an entry deleted", async {
            a.delete_entry("e").await.unwrap()
        })
        .await;
        sees_change(&b, "a node attested", async {
            a.attest_node(node("n", "01")).await.unwrap()
        })
        .await;
        sees_change(&b, "a node status change", async {
            a.set_node_status("n", NodeStatus::Evicted).await.unwrap()
        })
        .await;
        sees_change(&b, "a root published", async {
            a.publish_root(root("s", b"root", NOW + 10)).await.unwrap()
        })
        .await;

        // Two replicas using one token at once: one wins.
        a.create_join_token(token("shared", NOW + 60))
            .await
            .unwrap();
        let (first, second) = tokio::join!(
            a.join_node("shared", bare_node("node-a"), NOW),
            b.join_node("shared", bare_node("node-b"), NOW),
        );
        assert_eq!(
            [&first, &second].iter().filter(|r| r.is_ok()).count(),
            1,
            "{first:?} {second:?}"
        );

        drop((a, b));
        harness.finish().await;
    }

    /// Ends every connection to the test database but the caller's, as a server restart or a
    /// failover would, and waits until they are gone. Returns how many there were.
    async fn terminate_connections(harness: &Postgres) -> usize {
        let admin = harness.client().await;
        let rows = admin
            .query(
                "SELECT pid FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        let pids: Vec<i32> = rows.iter().map(|row| row.get(0)).collect();
        // A separate statement: in one, nothing stops the server from terminating its own
        // session before filtering it out.
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid",
                &[&pids],
            )
            .await
            .unwrap();
        let gone = async {
            loop {
                let row = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                        &[&pids],
                    )
                    .await
                    .unwrap();
                if row.get::<_, i64>(0) == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .expect("terminated connections did not go away");
        pids.len()
    }

    /// Retries `op` until it succeeds, allowing only `Unavailable` on the way.
    async fn recovers<T, F, Fut>(what: &str, mut op: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        for _ in 0..50 {
            match op().await {
                Ok(value) => return value,
                Err(e @ StoreError::Unavailable { .. }) => {
                    eprintln!("{what}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{what}: {e}"),
            }
        }
        panic!("{what} did not recover");
    }

    #[tokio::test]
    async fn survives_lost_connections() {
        let Some(harness) = harness().await else {
            return;
        };
        let (a, b) = (harness.connect().await, harness.connect().await);
        listening(&a).await;
        listening(&b).await;
        a.list_entries().await.unwrap();
        b.list_entries().await.unwrap();
        let before = *b.changes().borrow();
        let events_before = *b.events_appended().borrow();

        // Two stores, each with an operation connection and a notification connection.
        assert!(terminate_connections(&harness).await >= 4);

        // The first operation may find its connection gone; the next ones reconnect.
        match a.list_entries().await {
            Ok(_) | Err(StoreError::Unavailable { .. }) => {}
            Err(e) => panic!("unexpected error after the outage: {e}"),
        }
        recovers("list_entries", || a.list_entries()).await;
        recovers("get_entry on the other replica", || b.get_entry("x")).await;

        // Nothing was written since the outage, so the only thing that can move `b`'s counter
        // is its notification connection, announcing it is back.
        tokio::time::timeout(
            Duration::from_secs(10),
            b.changes().wait_for(|n| *n > before),
        )
        .await
        .expect("the notification connection did not come back")
        .unwrap();
        // Events may have been missed as well: tailing readers are told to look again.
        assert!(*b.events_appended().borrow() > events_before);

        // Writes work again, and the other replica hears of them again.
        let created = sees_change(&b, "an entry created after the outage", async {
            recovers("create_entry", || {
                a.create_entry(entry("after", "spiffe://example.org/a", &["a:1"]), NOW)
            })
            .await
        })
        .await;
        assert_eq!(b.get_entry("after").await.unwrap(), Some(created));

        drop((a, b));
        harness.finish().await;
    }

    #[tokio::test]
    async fn connection_lost_mid_operation_is_unavailable() {
        let Some(harness) = harness().await else {
            return;
        };
        let store = harness.connect().await;
        store.list_entries().await.unwrap();

        // Hold the operation up on a lock, then end its session while it waits.
        let mut locker = harness.client().await;
        let lock = locker.transaction().await.unwrap();
        lock.batch_execute("LOCK TABLE entries IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        let admin = harness.client().await;
        let terminate_waiter = async {
            loop {
                let rows = admin
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                        &[],
                    )
                    .await
                    .unwrap();
                if !rows.is_empty() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let (result, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(store.list_entries(), terminate_waiter)
        })
        .await
        .expect("the held-up operation was not cut off");
        assert!(
            matches!(&result, Err(StoreError::Unavailable { context, source: Some(_) }) if context.contains("lost the connection")),
            "{result:?}"
        );
        lock.rollback().await.unwrap();

        // The next operation opens a new connection; no retry is needed.
        store
            .create_entry(entry("e", "spiffe://example.org/e", &["a:1"]), NOW)
            .await
            .unwrap();
        assert_eq!(store.list_entries().await.unwrap().len(), 1);

        drop(store);
        harness.finish().await;
    }

    #[tokio::test]
    async fn listener_stops_with_the_store() {
        let Some(harness) = harness().await else {
            return;
        };
        let store = harness.connect().await;
        listening(&store).await;
        let admin = harness.client().await;
        let sessions = || async {
            admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        };
        assert!(sessions().await >= 2);
        drop(store);
        let closed = async {
            while sessions().await > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("connections stayed open after the store was dropped");
        harness.finish().await;
    }
}
