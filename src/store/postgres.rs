//! The PostgreSQL backend, for several server replicas sharing one database.
//!
//! Operations run on a small pool of connections, opened when first needed. A connection that
//! fails in a way that means it is gone (closed, I/O error, server shutdown, no answer in time)
//! is dropped and the operation fails as `Unavailable`; the next operation opens a new one, so
//! the store outlives database restarts and failovers without being rebuilt.
//!
//! Every write is one transaction. Changes to entries, node status and the bundle also send a
//! notification on the `tessera_changes` channel inside that transaction, so it goes out only
//! if the change commits; batches of events that store something notify `tessera_events`
//! instead. One more connection per store `LISTEN`s on both channels and moves
//! [`Datastore::changes`] or [`Datastore::events_appended`] on for every notification, and both
//! after every (re)connection, since notifications may have been missed while it was down. It
//! reconnects with backoff for as long as the store lives.
//!
//! A batch of events is a handful of statements whatever its size: one insert of the whole
//! batch from arrays, then one upsert each into the SVID, entry and node inventories. Batches
//! take turns on an advisory lock held until they commit, so event positions (an identity
//! column, handed out at insert) follow commit order across replicas: a reader tailing by
//! position never finds an event appear behind one it has already seen.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{AsyncMessage, Client, Config, Row, Transaction};

use super::codec::{
    self, entry_activity_from_row, entry_from_row, event_from_row, node_activity_from_row,
    node_from_row, root_from_row, svid_from_row,
};
use super::events::{self, EVENT_COLUMNS, InventoryChanges, JWT_COLUMNS, JWT_MERGE, SVID_COLUMNS};
use super::pg_tls::{ConnectionString, PgTls};
use super::{
    BundleRoot, ChangeKind, ChangeRecord, CrlRecord, Datastore, EntryActivity, EntryRecord,
    EntryStanding, EventFilter, EventRecord, JoinTokenRecord, JwtFilter, JwtKeyRecord, JwtRecord,
    NodeActivity, NodeCaRecord, NodeCredentialsRecord, NodeRecord, NodeStatus, PolicyRecord,
    RevocationRecord, StoreError, StoredCount, StoredEvent, SvidRecord, TaskRecord, TokenRefusal,
    unix_now,
};

/// Connections for operations; a few let slow operations not hold up the others.
const POOL_SIZE: usize = 4;
/// How long opening a connection may take, unless the connection string says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one operation may take before its connection is taken for dead.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// First and longest wait between attempts to re-establish the notification connection.
const LISTEN_RETRY_MIN: Duration = Duration::from_millis(200);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);
/// How often an idle notification connection is checked: a connection lost without a word (a
/// network partition) would otherwise wait for notifications forever.
const LISTEN_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// The channel changes are announced on.
const CHANNEL: &str = "tessera_changes";
/// The channel stored events are announced on.
const EVENTS_CHANNEL: &str = "tessera_events";
/// The advisory lock held while migrating, so that replicas starting together take turns.
const MIGRATION_LOCK: i64 = 0x7465_7373_6572_6101;
/// The advisory lock a batch of events holds until it commits, so that batches commit in the
/// order their positions were handed out.
const EVENTS_LOCK: i64 = 0x7465_7373_6572_6102;

/// The schema, as ordered migrations: a database records the last one applied in
/// `schema_version` and gets the rest at connect. Never edit a released step; add one.
/// Identifiers compare bytewise (`COLLATE "C"`) so listings come in the same order as SQLite's.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"CREATE TABLE entries (
        id TEXT COLLATE "C" PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        selectors TEXT NOT NULL,
        selectors_sha256 TEXT NOT NULL,
        node_selectors TEXT NOT NULL,
        x509_ttl_seconds BIGINT NOT NULL,
        owner TEXT NOT NULL,
        purpose TEXT NOT NULL,
        expires_at BIGINT,
        inactivity_timeout_seconds BIGINT,
        hint TEXT,
        dns_names TEXT NOT NULL,
        revision BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        CONSTRAINT entries_identity UNIQUE (spiffe_id, selectors_sha256)
    );
    CREATE INDEX entries_by_creation ON entries (created_at, id);
    CREATE TABLE nodes (
        id TEXT COLLATE "C" PRIMARY KEY,
        attestation TEXT NOT NULL,
        selectors TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'evicted', 'banned')),
        attested_at BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        svid_serial TEXT NOT NULL,
        svid_not_after BIGINT NOT NULL,
        ca_serial TEXT NOT NULL,
        ca_not_after BIGINT NOT NULL
    );
    CREATE TABLE join_tokens (
        digest TEXT PRIMARY KEY,
        expires_at BIGINT NOT NULL,
        labels TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        used_at BIGINT,
        used_by TEXT
    );
    CREATE TABLE bundle_roots (
        server_id TEXT COLLATE "C" NOT NULL,
        der_sha256 TEXT COLLATE "C" NOT NULL,
        der BYTEA NOT NULL,
        not_after BIGINT NOT NULL,
        PRIMARY KEY (server_id, der_sha256)
    );"#,
    ),
    // Credential events and the inventory derived from them. The kind is checked by the code,
    // not by a constraint, so that a later kind needs no migration.
    (
        2,
        r#"CREATE TABLE events (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT COLLATE "C" NOT NULL UNIQUE,
        kind TEXT COLLATE "C" NOT NULL,
        time_ms BIGINT NOT NULL,
        node_id TEXT COLLATE "C" NOT NULL,
        entry_id TEXT COLLATE "C" NOT NULL,
        spiffe_id TEXT COLLATE "C" NOT NULL,
        serial TEXT COLLATE "C" NOT NULL,
        not_after BIGINT,
        reason TEXT,
        caller_pid BIGINT,
        caller_uid BIGINT,
        caller_gid BIGINT,
        caller_exe_path TEXT,
        caller_exe_sha256 TEXT,
        caller_unit TEXT,
        first_ms BIGINT,
        last_ms BIGINT,
        count BIGINT,
        detail TEXT NOT NULL,
        received_ms BIGINT NOT NULL
    );
    CREATE INDEX events_by_time ON events (time_ms);
    CREATE INDEX events_by_kind ON events (kind, seq);
    CREATE INDEX events_by_spiffe_id ON events (spiffe_id, seq);
    CREATE INDEX events_by_entry ON events (entry_id, seq);
    CREATE INDEX events_by_node ON events (node_id, seq);
    CREATE INDEX events_by_serial ON events (serial, seq);
    CREATE TABLE svids (
        serial TEXT COLLATE "C" PRIMARY KEY,
        entry_id TEXT COLLATE "C" NOT NULL,
        spiffe_id TEXT COLLATE "C" NOT NULL,
        node_id TEXT COLLATE "C" NOT NULL,
        issued_ms BIGINT,
        not_after BIGINT,
        revoked_ms BIGINT,
        reason TEXT,
        last_used_ms BIGINT,
        uses BIGINT NOT NULL
    );
    CREATE INDEX svids_by_entry ON svids (entry_id);
    CREATE INDEX svids_by_node ON svids (node_id);
    CREATE TABLE entry_activity (
        entry_id TEXT COLLATE "C" PRIMARY KEY,
        last_issued_ms BIGINT,
        last_used_ms BIGINT
    );
    CREATE TABLE node_activity (
        node_id TEXT COLLATE "C" PRIMARY KEY,
        last_event_ms BIGINT NOT NULL
    );"#,
    ),
    // Revocation: the node CAs each root granted, the certificates revoked (orders to their
    // issuers), and the latest CRL of every issuer.
    (
        3,
        r#"CREATE TABLE node_cas (
        serial TEXT COLLATE "C" PRIMARY KEY,
        node_id TEXT COLLATE "C" NOT NULL,
        server_id TEXT COLLATE "C" NOT NULL,
        der BYTEA NOT NULL,
        not_after BIGINT NOT NULL
    );
    CREATE INDEX node_cas_by_node ON node_cas (node_id);
    CREATE TABLE revocations (
        serial TEXT COLLATE "C" PRIMARY KEY,
        node_id TEXT COLLATE "C" NOT NULL,
        root_server_id TEXT COLLATE "C",
        not_after BIGINT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        revoked_ms BIGINT NOT NULL
    );
    CREATE TABLE crls (
        issuer TEXT COLLATE "C" PRIMARY KEY,
        publisher TEXT COLLATE "C" NOT NULL,
        number BIGINT NOT NULL,
        next_update BIGINT NOT NULL,
        until BIGINT NOT NULL,
        revoked BIGINT NOT NULL,
        der BYTEA NOT NULL
    );
    CREATE TABLE entry_standing (
        entry_id TEXT COLLATE "C" PRIMARY KEY,
        dormant_since_ms BIGINT,
        activated_ms BIGINT
    );"#,
    ),
    (
        4,
        "ALTER TABLE entries ADD COLUMN activation TEXT NOT NULL DEFAULT 'standing';
    ALTER TABLE entries ADD COLUMN delegates_to TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE entries ADD COLUMN labels TEXT NOT NULL DEFAULT '[]';",
    ),
    (
        5,
        r#"ALTER TABLE events ADD COLUMN task TEXT;
    CREATE TABLE tasks (
        task_id TEXT COLLATE "C" PRIMARY KEY,
        node_id TEXT NOT NULL,
        entry_id TEXT NOT NULL,
        spiffe_id TEXT NOT NULL,
        parent_id TEXT COLLATE "C",
        chain TEXT NOT NULL,
        purpose TEXT NOT NULL,
        owner TEXT NOT NULL,
        pid BIGINT NOT NULL,
        starter_uid BIGINT,
        started_ms BIGINT,
        deadline BIGINT NOT NULL,
        ended_ms BIGINT,
        end_reason TEXT,
        end_ordered_ms BIGINT,
        end_order_reason TEXT,
        end_order_detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX tasks_by_parent ON tasks (parent_id);
    CREATE INDEX tasks_by_end ON tasks (ended_ms);"#,
    ),
    (
        6,
        "CREATE TABLE policies (
        version BIGINT PRIMARY KEY,
        text TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        set_ms BIGINT NOT NULL
    );
    ALTER TABLE events ADD COLUMN policy_version BIGINT;
    ALTER TABLE events ADD COLUMN policies TEXT;",
    ),
    (
        7,
        "ALTER TABLE events ADD COLUMN jti TEXT;
    ALTER TABLE events ADD COLUMN audience TEXT;
    CREATE INDEX events_by_jti ON events (jti) WHERE jti IS NOT NULL;
    CREATE TABLE jwt_keys (
        server_id TEXT NOT NULL,
        kid TEXT NOT NULL,
        jwk TEXT NOT NULL,
        active_from BIGINT NOT NULL,
        not_after BIGINT NOT NULL,
        PRIMARY KEY (server_id, kid)
    );
    CREATE TABLE jwts (
        jti TEXT PRIMARY KEY,
        entry_id TEXT NOT NULL,
        spiffe_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        audience TEXT NOT NULL,
        issued_ms BIGINT,
        expires_at BIGINT,
        revoked_ms BIGINT,
        reason TEXT,
        last_used_ms BIGINT,
        uses BIGINT NOT NULL
    );
    CREATE INDEX jwts_by_entry ON jwts (entry_id);
    CREATE INDEX jwts_by_node ON jwts (node_id);
    CREATE INDEX jwts_by_task ON jwts (task_id);
    CREATE INDEX jwts_revoked ON jwts (revoked_ms) WHERE revoked_ms IS NOT NULL;
    ALTER TABLE entries ADD COLUMN jwt_ttl_seconds BIGINT;",
    ),
    // The change log (see the SQLite backend). Revisions follow commit order: the triggers run
    // at commit (deferred) and take turns on an advisory lock held until the commit, so a
    // reader that sees a revision has seen every smaller one. Taken last in a transaction, the
    // lock never waits on anything that waits on it.
    (
        8,
        r#"CREATE TABLE changes (
        revision BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        time_ms BIGINT NOT NULL
    );
    CREATE INDEX changes_by_time ON changes (time_ms);
    CREATE FUNCTION tessera_log_change() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        row_key TEXT := '';
    BEGIN
        IF TG_ARGV[1] <> '' THEN
            IF TG_OP = 'DELETE' THEN
                row_key := to_jsonb(OLD) ->> TG_ARGV[1];
            ELSE
                row_key := to_jsonb(NEW) ->> TG_ARGV[1];
            END IF;
        END IF;
        PERFORM pg_advisory_xact_lock(8387236820507844867);
        INSERT INTO changes (kind, key, time_ms) VALUES (TG_ARGV[0], COALESCE(row_key, ''),
            (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT);
        RETURN NULL;
    END $$;
    CREATE CONSTRAINT TRIGGER bundle_roots_logged AFTER INSERT OR UPDATE OR DELETE ON bundle_roots
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        EXECUTE FUNCTION tessera_log_change('bundle', '');
    CREATE CONSTRAINT TRIGGER jwt_keys_logged AFTER INSERT OR UPDATE OR DELETE ON jwt_keys
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        EXECUTE FUNCTION tessera_log_change('jwt_key', '');
    CREATE CONSTRAINT TRIGGER crls_logged AFTER INSERT OR UPDATE OR DELETE ON crls
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        EXECUTE FUNCTION tessera_log_change('crl', '');
    CREATE CONSTRAINT TRIGGER revocations_logged AFTER INSERT OR UPDATE OR DELETE ON revocations
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        EXECUTE FUNCTION tessera_log_change('revocation', 'node_id');
    CREATE CONSTRAINT TRIGGER tasks_logged AFTER INSERT OR UPDATE OR DELETE ON tasks
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        EXECUTE FUNCTION tessera_log_change('task', 'node_id');
    CREATE CONSTRAINT TRIGGER policies_logged AFTER INSERT OR UPDATE OR DELETE ON policies
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        EXECUTE FUNCTION tessera_log_change('policy', '');
    CREATE CONSTRAINT TRIGGER entries_logged AFTER INSERT OR UPDATE OR DELETE ON entries
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        EXECUTE FUNCTION tessera_log_change('entry', 'id');
    CREATE CONSTRAINT TRIGGER nodes_logged AFTER INSERT OR DELETE ON nodes
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        EXECUTE FUNCTION tessera_log_change('node', 'id');
    CREATE CONSTRAINT TRIGGER nodes_logged_update AFTER UPDATE ON nodes
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.selectors IS DISTINCT FROM NEW.selectors
            OR OLD.attested_at IS DISTINCT FROM NEW.attested_at)
        EXECUTE FUNCTION tessera_log_change('node', 'id');
    CREATE CONSTRAINT TRIGGER standing_logged AFTER INSERT OR DELETE ON entry_standing
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        EXECUTE FUNCTION tessera_log_change('standing', 'entry_id');
    CREATE CONSTRAINT TRIGGER standing_logged_update AFTER UPDATE ON entry_standing
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        WHEN (OLD.dormant_since_ms IS DISTINCT FROM NEW.dormant_since_ms)
        EXECUTE FUNCTION tessera_log_change('standing', 'entry_id');
    CREATE CONSTRAINT TRIGGER jwts_logged_insert AFTER INSERT ON jwts
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.revoked_ms IS NOT NULL)
        EXECUTE FUNCTION tessera_log_change('jwt_revocation', '');
    CREATE CONSTRAINT TRIGGER jwts_logged_update AFTER UPDATE ON jwts
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        WHEN (OLD.revoked_ms IS DISTINCT FROM NEW.revoked_ms)
        EXECUTE FUNCTION tessera_log_change('jwt_revocation', '');"#,
    ),
];

const ENTRY_COLUMNS: &str = "id, spiffe_id, selectors, node_selectors, x509_ttl_seconds, owner, \
    purpose, expires_at, inactivity_timeout_seconds, hint, dns_names, revision, created_at, \
    updated_at, activation, delegates_to, labels, jwt_ttl_seconds";

const NODE_COLUMNS: &str = "id, attestation, selectors, status, attested_at, last_seen, \
    svid_serial, svid_not_after, ca_serial, ca_not_after";

/// A [`Datastore`] in a PostgreSQL database, shared by every replica of the trust domain.
pub struct PostgresStore {
    /// Connections for operations.
    pool: Pool,
    /// Moves on after every change, by this replica or another.
    changes: Arc<watch::Sender<u64>>,
    /// Moves on after every batch of events stored, by this replica or another.
    events: Arc<watch::Sender<u64>>,
    /// The notification listener; stops when the store is dropped.
    _listener: AbortOnDrop,
}

impl PostgresStore {
    /// Connects with a libpq-style connection string (`host=... dbname=... user=...` or a
    /// `postgresql://` URL; TLS as `sslmode` and `sslrootcert` say, see [`super::pg_tls`]) and
    /// brings the schema up to date. `Unavailable` when the server cannot be reached or the
    /// string is unusable; `Corrupt` when a newer server has migrated the database.
    pub async fn connect(conninfo: &str) -> Result<Self, StoreError> {
        // The string itself may hold a password: only what is wrong with it is shown.
        let ConnectionString { mut config, tls } =
            ConnectionString::parse(conninfo).map_err(unusable_settings)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tessera");
        }
        let pool = Pool::new(config.clone(), tls.clone());
        pool.run(|client| Box::pin(migrate(client, None))).await?;
        let changes = Arc::new(watch::Sender::new(0));
        let events = Arc::new(watch::Sender::new(0));
        let listener = tokio::spawn(listen(
            config,
            tls,
            Arc::clone(&changes),
            Arc::clone(&events),
        ));
        Ok(Self {
            pool,
            changes,
            events,
            _listener: AbortOnDrop(listener),
        })
    }

    /// Brings the schema of the database at `conninfo` to `version` and no later, as a server
    /// of that version left it.
    #[cfg(test)]
    pub(super) async fn create_at_version(conninfo: &str, version: i64) -> Result<(), StoreError> {
        let ConnectionString { config, tls } =
            ConnectionString::parse(conninfo).map_err(unusable_settings)?;
        Pool::new(config, tls)
            .run(|client| Box::pin(migrate(client, Some(version))))
            .await
    }

    /// Tells this replica's `changes()` receivers at once, without waiting for the round trip
    /// through the notification connection.
    fn bump(&self) {
        bump(&self.changes);
    }
}

fn unusable_settings(e: super::pg_tls::TlsSettingError) -> StoreError {
    StoreError::unavailable_from("the PostgreSQL connection settings cannot be used", e)
}

fn bump(changes: &watch::Sender<u64>) {
    changes.send_modify(|n| *n = n.wrapping_add(1));
}

/// Aborts the task when dropped, so no listener outlives its store.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why an operation failed, before it is decided whether the connection survives.
enum Failure {
    /// From the driver or the server.
    Db(tokio_postgres::Error),
    /// Decided by the operation.
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// One operation on a connection.
type Op<'c, T> = Pin<Box<dyn Future<Output = Result<T, Failure>> + Send + 'c>>;

/// A few connections, each opened when first needed and replaced when lost. An operation
/// waits for a permit, first come first served, and takes whichever connection is free: it
/// never queues behind one busy connection while another stands idle.
struct Pool {
    /// Where to connect.
    config: Config,
    /// How.
    tls: PgTls,
    /// One per connection that may be open at once.
    permits: Semaphore,
    /// Open connections not in use.
    idle: std::sync::Mutex<Vec<Client>>,
}

impl Pool {
    fn new(config: Config, tls: PgTls) -> Self {
        Self {
            config,
            tls,
            permits: Semaphore::new(POOL_SIZE),
            idle: std::sync::Mutex::new(Vec::with_capacity(POOL_SIZE)),
        }
    }

    /// The idle connections; a panic elsewhere while they were held left them usable.
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `op` on a live connection. A connection that failed for good is not put back.
    async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send,
        F: for<'c> FnOnce(&'c mut Client) -> Op<'c, T> + Send,
    {
        // The semaphore is never closed.
        let _permit = self.permits.acquire().await.map_err(|e| {
            StoreError::unavailable_from("the PostgreSQL connection pool is closed", e)
        })?;
        // Out of the pool while in use: if the caller gives up half-way, the connection, in no
        // known state, is dropped with the operation.
        let reused = self.idle().pop().filter(|client| !client.is_closed());
        let mut client = match reused {
            Some(client) => client,
            None => connect(&self.config, &self.tls).await?,
        };
        let outcome = tokio::time::timeout(OPERATION_TIMEOUT, op(&mut client)).await;
        match outcome {
            Err(_) => {
                tracing::warn!("PostgreSQL did not answer in time; dropping the connection");
                Err(StoreError::unavailable(format!(
                    "PostgreSQL did not answer within {} s; the connection was dropped and is \
                     re-established on the next operation",
                    OPERATION_TIMEOUT.as_secs()
                )))
            }
            Ok(Ok(value)) => {
                self.idle().push(client);
                Ok(value)
            }
            Ok(Err(Failure::Store(e))) => {
                self.idle().push(client);
                Err(e)
            }
            Ok(Err(Failure::Db(e))) if connection_lost(&e) || client.is_closed() => {
                tracing::warn!(reason = %describe(&e), "lost a PostgreSQL connection");
                Err(StoreError::unavailable_from(
                    "lost the connection to PostgreSQL (re-established on the next operation)",
                    e,
                ))
            }
            Ok(Err(Failure::Db(e))) => {
                self.idle().push(client);
                Err(refusal(e))
            }
        }
    }
}

/// Opens a connection and drives it on its own task until it closes.
async fn connect(config: &Config, tls: &PgTls) -> Result<Client, StoreError> {
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(tls.clone()))
        .await
        .map_err(|_| {
            StoreError::unavailable(format!(
                "cannot connect to PostgreSQL: no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| StoreError::unavailable_from("cannot connect to PostgreSQL", e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %describe(&e), "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// True when the error means the connection can no longer be used.
fn connection_lost(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // Class 08: connection exceptions; 57P0x: the server is shutting down, crashed,
        // starting up, dropped the database or ended an idle session.
        Some(code) => code.code().starts_with("08") || code.code().starts_with("57P"),
        // Not a server's answer: I/O, a closed connection, or a protocol error. None of them
        // leaves a connection worth keeping.
        None => true,
    }
}

/// What a server error that leaves the connection usable means to the caller.
fn refusal(e: tokio_postgres::Error) -> StoreError {
    let code = e.code();
    if code == Some(&SqlState::T_R_SERIALIZATION_FAILURE)
        || code == Some(&SqlState::T_R_DEADLOCK_DETECTED)
    {
        StoreError::unavailable_from(
            "PostgreSQL aborted the transaction in favour of a concurrent one; retry",
            e,
        )
    } else if code == Some(&SqlState::UNIQUE_VIOLATION) {
        StoreError::AlreadyExists(format!(
            "the record clashes with a stored one ({})",
            describe(&e)
        ))
    } else if code.is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")) {
        // Class 22 (data exception) and 23 (integrity constraint violation): the values are at
        // fault, and sending them again would fail again.
        StoreError::invalid_from("PostgreSQL refused the values", e)
    } else {
        StoreError::unavailable_from("PostgreSQL refused the operation", e)
    }
}

/// One line about a driver error: the server's message and code, or the cause.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} [{}]", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Applies the migrations the database has not seen yet (up to `until`, when given), in one
/// transaction, holding a lock that other replicas migrating at the same moment wait for.
async fn migrate(client: &mut Client, until: Option<i64>) -> Result<(), Failure> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version BIGINT PRIMARY KEY,
            applied_at BIGINT NOT NULL
        )",
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT AS version FROM schema_version",
            &[],
        )
        .await?;
    let current: i64 = col(&row, "version")?;
    let known = MIGRATIONS.last().map_or(0, |(version, _)| *version);
    codec::check_schema_version(current, known)?;
    let wanted = |v: i64| v > current && until.is_none_or(|until| v <= until);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| wanted(*v)) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
            &[version, &unix_now()],
        )
        .await?;
        tracing::info!(version, "PostgreSQL datastore schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

/// Announces a change to every replica, once the transaction commits.
async fn notify(tx: &Transaction<'_>) -> Result<(), Failure> {
    tx.execute(&format!("SELECT pg_notify('{CHANNEL}', '')"), &[])
        .await?;
    Ok(())
}

/// Announces stored events to every replica, once the transaction commits.
async fn notify_events(tx: &Transaction<'_>) -> Result<(), Failure> {
    tx.execute(&format!("SELECT pg_notify('{EVENTS_CHANNEL}', '')"), &[])
        .await?;
    Ok(())
}

fn change_from_row(row: &Row) -> Result<ChangeRecord, StoreError> {
    Ok(ChangeRecord {
        revision: col(row, "revision")?,
        kind: ChangeKind::parse(col(row, "kind")?),
        key: col(row, "key")?,
        time_ms: col(row, "time_ms")?,
    })
}

fn col<'r, T: FromSql<'r>>(row: &'r Row, name: &str) -> Result<T, StoreError> {
    row.try_get(name)
        .map_err(|e| StoreError::corrupt_from(format!("column {name}"), e))
}

impl codec::ReadRow for Row {
    fn column<T: codec::Value>(&self, name: &str) -> Result<T, StoreError> {
        col(self, name)
    }
}

fn decode_all<T>(
    rows: &[Row],
    decode: fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, Failure> {
    Ok(rows.iter().map(decode).collect::<Result<_, _>>()?)
}

async fn insert_entry(client: &mut Client, entry: &EntryRecord) -> Result<(), Failure> {
    let tx = client.transaction().await?;
    let selectors = codec::encode_list(&entry.selectors);
    let inserted = tx
        .execute(
            "INSERT INTO entries (id, spiffe_id, selectors, selectors_sha256, node_selectors,
                x509_ttl_seconds, owner, purpose, expires_at, inactivity_timeout_seconds, hint,
                dns_names, revision, created_at, updated_at, activation, delegates_to, labels,
                jwt_ttl_seconds)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                $16, $17, $18, $19)
             ON CONFLICT DO NOTHING",
            &[
                &entry.id,
                &entry.spiffe_id,
                &selectors,
                &codec::selectors_key(&selectors),
                &codec::encode_list(&entry.node_selectors),
                &entry.x509_ttl_seconds,
                &entry.owner,
                &entry.purpose,
                &entry.expires_at,
                &entry.inactivity_timeout_seconds,
                &entry.hint,
                &codec::encode_list(&entry.dns_names),
                &entry.revision,
                &entry.created_at,
                &entry.updated_at,
                &entry.activation,
                &codec::encode_list(&entry.delegates_to),
                &codec::encode_list(&entry.labels),
                &entry.jwt_ttl_seconds,
            ],
        )
        .await?;
    if inserted == 0 {
        // One of the two unique keys is taken; say which.
        let id_taken = tx
            .query_opt("SELECT 1 FROM entries WHERE id = $1", &[&entry.id])
            .await?
            .is_some();
        return Err(Failure::Store(if id_taken {
            codec::entry_id_taken(&entry.id)
        } else {
            codec::entry_identity_taken(&entry.spiffe_id)
        }));
    }
    notify(&tx).await?;
    tx.commit().await?;
    Ok(())
}

async fn update_entry(
    client: &mut Client,
    entry: &EntryRecord,
    expected: i64,
) -> Result<EntryRecord, Failure> {
    let tx = client.transaction().await?;
    let selectors = codec::encode_list(&entry.selectors);
    let updated = tx
        .query_opt(
            &format!(
                "UPDATE entries SET spiffe_id = $3, selectors = $4, selectors_sha256 = $5,
                    node_selectors = $6, x509_ttl_seconds = $7, owner = $8, purpose = $9,
                    expires_at = $10, inactivity_timeout_seconds = $11, hint = $12,
                    dns_names = $13, revision = revision + 1, updated_at = $14,
                    activation = $15, delegates_to = $16, labels = $17, jwt_ttl_seconds = $18
                 WHERE id = $1 AND revision = $2
                 RETURNING {ENTRY_COLUMNS}"
            ),
            &[
                &entry.id,
                &expected,
                &entry.spiffe_id,
                &selectors,
                &codec::selectors_key(&selectors),
                &codec::encode_list(&entry.node_selectors),
                &entry.x509_ttl_seconds,
                &entry.owner,
                &entry.purpose,
                &entry.expires_at,
                &entry.inactivity_timeout_seconds,
                &entry.hint,
                &codec::encode_list(&entry.dns_names),
                &entry.updated_at,
                &entry.activation,
                &codec::encode_list(&entry.delegates_to),
                &codec::encode_list(&entry.labels),
                &entry.jwt_ttl_seconds,
            ],
        )
        .await;
    let row = match updated {
        Ok(row) => row,
        // Only the SPIFFE ID and selectors can clash: the id is the one updated.
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(codec::entry_identity_taken(&entry.spiffe_id).into());
        }
        Err(e) => return Err(e.into()),
    };
    let Some(row) = row else {
        // Nothing matched: the entry is gone, or moved on since the caller read it.
        let stored = tx
            .query_opt("SELECT revision FROM entries WHERE id = $1", &[&entry.id])
            .await?;
        return Err(Failure::Store(match stored {
            None => StoreError::NotFound {
                kind: "entry",
                id: entry.id.clone(),
            },
            Some(row) => StoreError::RevisionConflict {
                id: entry.id.clone(),
                expected,
                actual: col(&row, "revision")?,
            },
        }));
    };
    let stored = entry_from_row(&row)?;
    notify(&tx).await?;
    tx.commit().await?;
    Ok(stored)
}

async fn delete_entry(client: &mut Client, id: String) -> Result<EntryRecord, Failure> {
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            &format!("DELETE FROM entries WHERE id = $1 RETURNING {ENTRY_COLUMNS}"),
            &[&id],
        )
        .await?;
    let Some(row) = row else {
        return Err(StoreError::NotFound { kind: "entry", id }.into());
    };
    let deleted = entry_from_row(&row)?;
    notify(&tx).await?;
    tx.commit().await?;
    Ok(deleted)
}

/// Spends the token inside `tx` and returns its labels.
async fn consume_join_token(
    tx: &Transaction<'_>,
    digest: &str,
    node_id: &str,
    now: i64,
) -> Result<Vec<String>, Failure> {
    // A concurrent use waits for this row lock, then finds the token used.
    let row = tx
        .query_opt(
            "UPDATE join_tokens SET used_at = $3, used_by = $2
             WHERE digest = $1 AND used_at IS NULL AND expires_at >= $3
             RETURNING labels",
            &[&digest, &node_id, &now],
        )
        .await?;
    if let Some(row) = row {
        return Ok(codec::decode_list(
            col(&row, "labels")?,
            "join token labels",
        )?);
    }
    let stored = tx
        .query_opt(
            "SELECT used_at FROM join_tokens WHERE digest = $1",
            &[&digest],
        )
        .await?;
    let refusal = match stored {
        None => TokenRefusal::Unknown,
        Some(row) => match col::<Option<i64>>(&row, "used_at")? {
            Some(_) => TokenRefusal::Used,
            None => TokenRefusal::Expired,
        },
    };
    Err(StoreError::TokenRefused(refusal).into())
}

/// Spends the token and records the node in one transaction.
async fn join_node(
    client: &mut Client,
    digest: &str,
    node: NodeRecord,
    now: i64,
) -> Result<NodeRecord, Failure> {
    let tx = client.transaction().await?;
    let labels = consume_join_token(&tx, digest, &node.id, now).await?;
    let stored = upsert_node(&tx, &codec::joined_node(node, &labels)).await?;
    notify(&tx).await?;
    tx.commit().await?;
    Ok(stored)
}

async fn attest_node(client: &mut Client, node: &NodeRecord) -> Result<NodeRecord, Failure> {
    let tx = client.transaction().await?;
    let stored = upsert_node(&tx, node).await?;
    notify(&tx).await?;
    tx.commit().await?;
    Ok(stored)
}

/// Inserts or replaces the node's record inside `tx`; a banned node stays banned.
async fn upsert_node(tx: &Transaction<'_>, node: &NodeRecord) -> Result<NodeRecord, Failure> {
    // The WHERE of the upsert keeps a banned node as it is; then nothing is returned.
    let row = tx
        .query_opt(
            &format!(
                "INSERT INTO nodes ({NODE_COLUMNS})
                 VALUES ($1, $2, $3, 'active', $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (id) DO UPDATE SET attestation = EXCLUDED.attestation,
                    selectors = EXCLUDED.selectors, status = 'active',
                    attested_at = EXCLUDED.attested_at, last_seen = EXCLUDED.last_seen,
                    svid_serial = EXCLUDED.svid_serial, svid_not_after = EXCLUDED.svid_not_after,
                    ca_serial = EXCLUDED.ca_serial, ca_not_after = EXCLUDED.ca_not_after
                 WHERE nodes.status <> 'banned'
                 RETURNING {NODE_COLUMNS}"
            ),
            &[
                &node.id,
                &node.attestation,
                &codec::encode_list(&node.selectors),
                &node.attested_at,
                &node.last_seen,
                &node.svid_serial,
                &node.svid_not_after,
                &node.ca_serial,
                &node.ca_not_after,
            ],
        )
        .await?;
    let Some(row) = row else {
        return Err(StoreError::NodeNotActive {
            id: node.id.clone(),
            status: NodeStatus::Banned,
        }
        .into());
    };
    Ok(node_from_row(&row)?)
}

/// The error for a conditional node update that matched nothing: the node is unknown, or in
/// the wrong state.
async fn node_refusal(tx: &Transaction<'_>, id: &str) -> Result<StoreError, Failure> {
    let row = tx
        .query_opt("SELECT status FROM nodes WHERE id = $1", &[&id])
        .await?;
    Ok(match row {
        None => StoreError::NotFound {
            kind: "node",
            id: id.to_owned(),
        },
        Some(row) => StoreError::NodeNotActive {
            id: id.to_owned(),
            status: codec::decode_status(col(&row, "status")?)?,
        },
    })
}

async fn renew_node(
    client: &mut Client,
    id: &str,
    credentials: &NodeCredentialsRecord,
    now: i64,
) -> Result<NodeRecord, Failure> {
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            &format!(
                "UPDATE nodes SET svid_serial = $2, svid_not_after = $3, ca_serial = $4,
                    ca_not_after = $5, last_seen = $6
                 WHERE id = $1 AND status = 'active'
                 RETURNING {NODE_COLUMNS}"
            ),
            &[
                &id,
                &credentials.svid_serial,
                &credentials.svid_not_after,
                &credentials.ca_serial,
                &credentials.ca_not_after,
                &now,
            ],
        )
        .await?;
    let Some(row) = row else {
        return Err(node_refusal(&tx, id).await?.into());
    };
    let stored = node_from_row(&row)?;
    tx.commit().await?;
    Ok(stored)
}

async fn set_node_status(
    client: &mut Client,
    id: &str,
    status: NodeStatus,
) -> Result<NodeRecord, Failure> {
    let tx = client.transaction().await?;
    // Banned is final: only a ban may be applied to a banned node.
    let row = tx
        .query_opt(
            &format!(
                "UPDATE nodes SET status = $2
                 WHERE id = $1 AND (status <> 'banned' OR $2 = 'banned')
                 RETURNING {NODE_COLUMNS}"
            ),
            &[&id, &status.as_str()],
        )
        .await?;
    let Some(row) = row else {
        return Err(node_refusal(&tx, id).await?.into());
    };
    let stored = node_from_row(&row)?;
    notify(&tx).await?;
    tx.commit().await?;
    Ok(stored)
}

/// True when the bundle changed: the root is new, or its not-after moved.
async fn publish_root(client: &mut Client, root: &BundleRoot) -> Result<bool, Failure> {
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "INSERT INTO bundle_roots (server_id, der_sha256, der, not_after)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (server_id, der_sha256) DO UPDATE SET not_after = EXCLUDED.not_after
             WHERE bundle_roots.not_after <> EXCLUDED.not_after
             RETURNING 1",
            &[
                &root.server_id,
                &codec::sha256_hex(&root.der),
                &root.der,
                &root.not_after,
            ],
        )
        .await?;
    let changed = row.is_some();
    if changed {
        notify(&tx).await?;
    }
    tx.commit().await?;
    Ok(changed)
}

/// Stores the events whose ids are new, and what they change in the inventory, in one
/// transaction that waits for batches committing before it. Returns how many were stored, and
/// whether one revoked a JWT-SVID.
async fn store_events(
    client: &mut Client,
    batch: &[EventRecord],
) -> Result<(usize, bool), Failure> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&EVENTS_LOCK])
        .await?;
    let mut holders = std::collections::HashMap::new();
    for owned in events::Owned::ALL {
        let (table, key) = owned.table_and_key();
        let rows = tx
            .query(
                &format!("SELECT {key} AS key, node_id FROM {table} WHERE {key} = ANY($1)"),
                &[&owned.keys(batch)],
            )
            .await?;
        let owners = rows
            .iter()
            .map(|row| Ok((col(row, "key")?, col(row, "node_id")?)))
            .collect::<Result<_, StoreError>>()?;
        owned.check(batch, &owners)?;
        if owned == events::Owned::Jwt {
            holders = owners;
        }
    }
    let inserted = insert_events(&tx, batch).await?;
    let new: Vec<&EventRecord> = batch.iter().filter(|e| inserted.contains(&e.id)).collect();
    let mut jwt_revoked = false;
    if !new.is_empty() {
        let changes = InventoryChanges::of_known(new.iter().copied(), &holders);
        apply_inventory_changes(&tx, &changes).await?;
        notify_events(&tx).await?;
        if changes.jwt_revoked {
            notify(&tx).await?;
            jwt_revoked = true;
        }
    }
    tx.commit().await?;
    Ok((new.len(), jwt_revoked))
}

/// Inserts the batch (without repeated ids) in one statement, in order; returns the ids that
/// were new.
async fn insert_events(
    tx: &Transaction<'_>,
    batch: &[EventRecord],
) -> Result<std::collections::HashSet<String>, Failure> {
    fn column<'a, T>(batch: &'a [EventRecord], value: impl Fn(&'a EventRecord) -> T) -> Vec<T> {
        batch.iter().map(value).collect()
    }
    let callers: Vec<events::CallerColumns> = batch
        .iter()
        .map(|e| events::caller_columns(e.caller.as_ref()))
        .collect();
    let caller = |value: fn(&events::CallerColumns) -> Option<i64>| -> Vec<Option<i64>> {
        callers.iter().map(value).collect()
    };
    let caller_text = |value: fn(&events::CallerColumns) -> &Option<String>| -> Vec<Option<&str>> {
        callers.iter().map(|c| value(c).as_deref()).collect()
    };
    let rows = tx
        .query(
            &format!(
                "INSERT INTO events ({EVENT_COLUMNS})
                 SELECT {EVENT_COLUMNS} FROM unnest($1::text[], $2::text[], $3::int8[],
                    $4::text[], $5::text[], $6::text[], $7::text[], $8::int8[], $9::text[],
                    $10::int8[], $11::int8[], $12::int8[], $13::text[], $14::text[], $15::text[],
                    $16::int8[], $17::int8[], $18::int8[], $19::text[], $20::int8[],
                    $21::text[], $22::int8[], $23::text[], $24::text[], $25::text[])
                    WITH ORDINALITY AS batch ({EVENT_COLUMNS}, position)
                 ORDER BY position
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id"
            ),
            &[
                &column(batch, |e| e.id.as_str()),
                &column(batch, |e| e.kind.as_str()),
                &column(batch, |e| e.time_ms),
                &column(batch, |e| e.node_id.as_str()),
                &column(batch, |e| e.entry_id.as_str()),
                &column(batch, |e| e.spiffe_id.as_str()),
                &column(batch, |e| e.serial.as_str()),
                &column(batch, |e| e.not_after),
                &column(batch, |e| e.reason.as_deref()),
                &caller(|c| c.0),
                &caller(|c| c.1),
                &caller(|c| c.2),
                &caller_text(|c| &c.3),
                &caller_text(|c| &c.4),
                &caller_text(|c| &c.5),
                &column(batch, |e| e.first_ms),
                &column(batch, |e| e.last_ms),
                &column(batch, |e| e.count),
                &column(batch, |e| e.detail.as_str()),
                &column(batch, |e| e.received_ms),
                &column(batch, |e| codec::encode_event_task(e.task.as_ref())),
                &column(batch, |e| e.policy_version),
                &column(batch, |e| codec::encode_policies(&e.policies)),
                &column(batch, |e| (!e.jti.is_empty()).then_some(e.jti.as_str())),
                &column(batch, |e| codec::encode_audience(&e.audience)),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| col::<String>(row, "id"))
        .collect::<Result<_, _>>()?)
}

async fn apply_inventory_changes(
    tx: &Transaction<'_>,
    changes: &InventoryChanges,
) -> Result<(), Failure> {
    let svids = &changes.svids;
    if !svids.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO svids ({SVID_COLUMNS})
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                    $5::int8[], $6::int8[], $7::int8[], $8::text[], $9::int8[], $10::int8[])
                 ON CONFLICT (serial) DO UPDATE SET {}",
                events::SVID_MERGE
            ),
            &[
                &svids.iter().map(|s| s.serial.as_str()).collect::<Vec<_>>(),
                &svids
                    .iter()
                    .map(|s| s.entry_id.as_str())
                    .collect::<Vec<_>>(),
                &svids
                    .iter()
                    .map(|s| s.spiffe_id.as_str())
                    .collect::<Vec<_>>(),
                &svids.iter().map(|s| s.node_id.as_str()).collect::<Vec<_>>(),
                &svids.iter().map(|s| s.issued_ms).collect::<Vec<_>>(),
                &svids.iter().map(|s| s.not_after).collect::<Vec<_>>(),
                &svids.iter().map(|s| s.revoked_ms).collect::<Vec<_>>(),
                &svids
                    .iter()
                    .map(|s| s.reason.as_deref())
                    .collect::<Vec<_>>(),
                &svids.iter().map(|s| s.last_used_ms).collect::<Vec<_>>(),
                &svids.iter().map(|s| s.uses).collect::<Vec<_>>(),
            ],
        )
        .await?;
    }
    let entries = &changes.entries;
    if !entries.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO entry_activity (entry_id, last_issued_ms, last_used_ms)
                 SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[])
                 ON CONFLICT (entry_id) DO UPDATE SET {}",
                events::ENTRY_ACTIVITY_MERGE
            ),
            &[
                &entries
                    .iter()
                    .map(|e| e.entry_id.as_str())
                    .collect::<Vec<_>>(),
                &entries.iter().map(|e| e.last_issued_ms).collect::<Vec<_>>(),
                &entries.iter().map(|e| e.last_used_ms).collect::<Vec<_>>(),
            ],
        )
        .await?;
    }
    let nodes = &changes.nodes;
    if !nodes.is_empty() {
        tx.execute(
            &format!(
                "INSERT INTO node_activity (node_id, last_event_ms)
                 SELECT * FROM unnest($1::text[], $2::int8[])
                 ON CONFLICT (node_id) DO UPDATE SET {}",
                events::NODE_ACTIVITY_MERGE
            ),
            &[
                &nodes.iter().map(|n| n.node_id.as_str()).collect::<Vec<_>>(),
                &nodes.iter().map(|n| n.last_event_ms).collect::<Vec<_>>(),
            ],
        )
        .await?;
    }
    let jwts = &changes.jwts;
    if !jwts.is_empty() {
        fn column<'a, T>(jwts: &'a [JwtRecord], value: impl Fn(&'a JwtRecord) -> T) -> Vec<T> {
            jwts.iter().map(value).collect()
        }
        tx.execute(
            &format!(
                "INSERT INTO jwts ({JWT_COLUMNS})
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                    $5::text[], $6::text[], $7::int8[], $8::int8[], $9::int8[], $10::text[],
                    $11::int8[], $12::int8[])
                 ON CONFLICT (jti) DO UPDATE SET {JWT_MERGE}"
            ),
            &[
                &column(jwts, |j| j.jti.as_str()),
                &column(jwts, |j| j.entry_id.as_str()),
                &column(jwts, |j| j.spiffe_id.as_str()),
                &column(jwts, |j| j.node_id.as_str()),
                &column(jwts, |j| j.task_id.as_str()),
                &column(jwts, |j| codec::encode_list(&j.audience)),
                &column(jwts, |j| j.issued_ms),
                &column(jwts, |j| j.expires_at),
                &column(jwts, |j| j.revoked_ms),
                &column(jwts, |j| j.reason.as_deref()),
                &column(jwts, |j| j.last_used_ms),
                &column(jwts, |j| j.uses),
            ],
        )
        .await?;
    }
    // Few tasks per batch: one statement each.
    let sql = format!(
        "INSERT INTO tasks ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
            $14, NULL, NULL, '')
         ON CONFLICT (task_id) DO UPDATE SET {}",
        events::TASK_COLUMNS,
        events::TASK_MERGE
    );
    for t in &changes.tasks {
        tx.execute(
            &sql,
            &[
                &t.task_id,
                &t.node_id,
                &t.entry_id,
                &t.spiffe_id,
                &t.parent_id,
                &codec::encode_chain(&t.chain),
                &t.purpose,
                &t.owner,
                &t.pid,
                &t.starter_uid,
                &t.started_ms,
                &t.deadline,
                &t.ended_ms,
                &t.end_reason,
            ],
        )
        .await?;
    }
    Ok(())
}

/// Tasks, live ones only when `live_only`, ordered by start (unknown starts last), then id.
async fn select_tasks(
    client: &impl tokio_postgres::GenericClient,
    live_only: bool,
) -> Result<Vec<TaskRecord>, Failure> {
    let filter = if live_only {
        "WHERE ended_ms IS NULL"
    } else {
        ""
    };
    let rows = client
        .query(
            &format!(
                "SELECT {} FROM tasks {filter}
                 ORDER BY started_ms IS NULL, started_ms, task_id",
                events::TASK_COLUMNS
            ),
            &[],
        )
        .await?;
    decode_all(&rows, task_from_row)
}

fn task_from_row(row: &Row) -> Result<TaskRecord, StoreError> {
    codec::task_from_row(row)
}

fn policy_from_row(row: &Row) -> Result<PolicyRecord, StoreError> {
    codec::policy_from_row(row)
}

/// The current policy version.
async fn select_policy(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<PolicyRecord>, Failure> {
    let sql = format!(
        "SELECT {} FROM policies ORDER BY version DESC LIMIT 1",
        codec::POLICY_COLUMNS
    );
    let rows = client.query(&sql, &[]).await?;
    Ok(decode_all(&rows, policy_from_row)?.pop())
}

/// The events matching `filter`: its conditions become a `WHERE` clause with one parameter
/// each.
async fn list_events(
    client: &mut Client,
    filter: &EventFilter,
) -> Result<Vec<StoredEvent>, Failure> {
    let mut conditions: Vec<String> = Vec::new();
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut condition = |sql: &str, value: Box<dyn ToSql + Sync + Send>| {
        params.push(value);
        conditions.push(format!("{sql} ${}", params.len()));
    };
    if let Some(since) = filter.since_ms {
        condition("time_ms >=", Box::new(since));
    }
    if let Some(until) = filter.until_ms {
        condition("time_ms <", Box::new(until));
    }
    for (column, value) in [
        ("spiffe_id", &filter.spiffe_id),
        ("entry_id", &filter.entry_id),
        ("node_id", &filter.node_id),
        ("serial", &filter.serial),
    ] {
        if let Some(value) = value {
            condition(&format!("{column} ="), Box::new(value.clone()));
        }
    }
    if let Some(after) = filter.after_seq {
        condition("seq >", Box::new(after));
    }
    if !filter.kinds.is_empty() {
        params.push(Box::new(filter.kinds.clone()));
        conditions.push(format!("kind = ANY(${}::text[])", params.len()));
    }
    params.push(Box::new(events::limit(filter)));
    let sql = format!(
        "SELECT seq, {EVENT_COLUMNS} FROM events {} {} ORDER BY {} LIMIT ${}",
        if conditions.is_empty() { "" } else { "WHERE" },
        conditions.join(" AND "),
        filter.order.sql(),
        params.len()
    );
    let params: Vec<&(dyn ToSql + Sync)> = params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect();
    decode_all(&client.query(&sql, &params).await?, event_from_row)
}

/// Deletes one chunk of prunable events; returns how many.
async fn prune_event_chunk(
    client: &mut Client,
    older_than_ms: i64,
    now: i64,
) -> Result<u64, Failure> {
    Ok(client
        .execute(
            "DELETE FROM events WHERE seq IN (
                SELECT seq FROM events AS e
                WHERE e.time_ms < $1 AND (e.not_after IS NULL OR e.not_after < $2)
                    AND NOT EXISTS (
                        SELECT 1 FROM svids AS s WHERE s.serial = e.serial AND s.not_after >= $2
                    )
                LIMIT $3
            )",
            &[&older_than_ms, &now, &events::PRUNE_CHUNK],
        )
        .await?)
}

/// Deletes the inventory rows that pruning leaves behind, in one transaction. It takes turns
/// with batches of events, which upsert the same rows in another order.
async fn prune_inventory(client: &mut Client, older_than_ms: i64) -> Result<(), Failure> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&EVENTS_LOCK])
        .await?;
    tx.execute(
        "DELETE FROM svids
         WHERE not_after < $2
            OR (not_after IS NULL
                AND (issued_ms IS NULL OR issued_ms < $1)
                AND (revoked_ms IS NULL OR revoked_ms < $1)
                AND (last_used_ms IS NULL OR last_used_ms < $1))",
        &[&older_than_ms, &events::seconds_before(older_than_ms)],
    )
    .await?;
    tx.execute(
        "DELETE FROM jwts
         WHERE expires_at < $2
            OR (expires_at IS NULL
                AND (issued_ms IS NULL OR issued_ms < $1)
                AND (revoked_ms IS NULL OR revoked_ms < $1)
                AND (last_used_ms IS NULL OR last_used_ms < $1))",
        &[&older_than_ms, &events::seconds_before(older_than_ms)],
    )
    .await?;
    tx.execute(
        "DELETE FROM jwt_keys WHERE not_after < $1",
        &[&events::seconds_before(older_than_ms)],
    )
    .await?;
    tx.execute(
        "DELETE FROM entry_activity
         WHERE NOT EXISTS (SELECT 1 FROM entries WHERE entries.id = entry_activity.entry_id)
            AND (last_issued_ms IS NULL OR last_issued_ms < $1)
            AND (last_used_ms IS NULL OR last_used_ms < $1)",
        &[&older_than_ms],
    )
    .await?;
    tx.execute(
        "DELETE FROM node_activity
         WHERE NOT EXISTS (SELECT 1 FROM nodes WHERE nodes.id = node_activity.node_id)
            AND last_event_ms < $1",
        &[&older_than_ms],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

#[async_trait::async_trait]
impl Datastore for PostgresStore {
    async fn create_entry(&self, entry: EntryRecord, now: i64) -> Result<EntryRecord, StoreError> {
        let entry = codec::new_entry(entry, now);
        let stored = entry.clone();
        self.pool
            .run(move |c| Box::pin(async move { insert_entry(c, &entry).await }))
            .await?;
        self.bump();
        Ok(stored)
    }

    async fn update_entry(&self, entry: EntryRecord, now: i64) -> Result<EntryRecord, StoreError> {
        let expected = entry.revision;
        let entry = codec::updated_entry(entry, now);
        let stored = self
            .pool
            .run(move |c| Box::pin(async move { update_entry(c, &entry, expected).await }))
            .await?;
        self.bump();
        Ok(stored)
    }

    async fn delete_entry(&self, id: &str) -> Result<EntryRecord, StoreError> {
        let id = id.to_owned();
        let deleted = self
            .pool
            .run(move |c| Box::pin(delete_entry(c, id)))
            .await?;
        self.bump();
        Ok(deleted)
    }

    async fn get_entry(&self, id: &str) -> Result<Option<EntryRecord>, StoreError> {
        let id = id.to_owned();
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let sql = format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE id = $1");
                    let row = c.query_opt(&sql, &[&id]).await?;
                    Ok(row.as_ref().map(entry_from_row).transpose()?)
                })
            })
            .await
    }

    async fn list_entries(&self) -> Result<Vec<EntryRecord>, StoreError> {
        self.pool
            .run(|c| {
                Box::pin(async move {
                    let sql =
                        format!("SELECT {ENTRY_COLUMNS} FROM entries ORDER BY created_at, id");
                    decode_all(&c.query(&sql, &[]).await?, entry_from_row)
                })
            })
            .await
    }

    async fn create_join_token(&self, token: JoinTokenRecord) -> Result<(), StoreError> {
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let inserted = c
                        .execute(
                            "INSERT INTO join_tokens (digest, expires_at, labels, created_at)
                             VALUES ($1, $2, $3, $4)
                             ON CONFLICT DO NOTHING",
                            &[
                                &token.digest,
                                &token.expires_at,
                                &codec::encode_list(&token.labels),
                                &token.created_at,
                            ],
                        )
                        .await?;
                    if inserted == 0 {
                        return Err(codec::join_token_taken().into());
                    }
                    Ok(())
                })
            })
            .await
    }

    async fn join_node(
        &self,
        digest: &str,
        node: NodeRecord,
        now: i64,
    ) -> Result<NodeRecord, StoreError> {
        let digest = digest.to_owned();
        let stored = self
            .pool
            .run(move |c| Box::pin(async move { join_node(c, &digest, node, now).await }))
            .await?;
        self.bump();
        Ok(stored)
    }

    async fn attest_node(&self, node: NodeRecord) -> Result<NodeRecord, StoreError> {
        let node = codec::attested_node(node);
        let stored = self
            .pool
            .run(move |c| Box::pin(async move { attest_node(c, &node).await }))
            .await?;
        self.bump();
        Ok(stored)
    }

    async fn renew_node(
        &self,
        id: &str,
        credentials: NodeCredentialsRecord,
        now: i64,
    ) -> Result<NodeRecord, StoreError> {
        let id = id.to_owned();
        self.pool
            .run(move |c| Box::pin(async move { renew_node(c, &id, &credentials, now).await }))
            .await
    }

    async fn touch_node(&self, id: &str, now: i64) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let touched = c
                        .execute(
                            "UPDATE nodes SET last_seen = $2 WHERE id = $1",
                            &[&id, &now],
                        )
                        .await?;
                    if touched == 0 {
                        return Err(StoreError::NotFound { kind: "node", id }.into());
                    }
                    Ok(())
                })
            })
            .await
    }

    async fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let id = id.to_owned();
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1");
                    let row = c.query_opt(&sql, &[&id]).await?;
                    Ok(row.as_ref().map(node_from_row).transpose()?)
                })
            })
            .await
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.pool
            .run(|c| {
                Box::pin(async move {
                    let sql = format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id");
                    decode_all(&c.query(&sql, &[]).await?, node_from_row)
                })
            })
            .await
    }

    async fn set_node_status(
        &self,
        id: &str,
        status: NodeStatus,
    ) -> Result<NodeRecord, StoreError> {
        let id = id.to_owned();
        let stored = self
            .pool
            .run(move |c| Box::pin(async move { set_node_status(c, &id, status).await }))
            .await?;
        self.bump();
        Ok(stored)
    }

    async fn publish_root(&self, root: BundleRoot) -> Result<(), StoreError> {
        let changed = self
            .pool
            .run(move |c| Box::pin(async move { publish_root(c, &root).await }))
            .await?;
        if changed {
            self.bump();
        }
        Ok(())
    }

    async fn bundle(&self, now: i64) -> Result<Vec<BundleRoot>, StoreError> {
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT server_id, der, not_after FROM bundle_roots
                             WHERE not_after >= $1
                             ORDER BY server_id, not_after, der_sha256",
                            &[&now],
                        )
                        .await?;
                    decode_all(&rows, root_from_row)
                })
            })
            .await
    }

    async fn publish_jwt_key(&self, key: JwtKeyRecord) -> Result<(), StoreError> {
        let changed = self
            .pool
            .run(move |c| {
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    let row = tx
                        .query_opt(
                            "INSERT INTO jwt_keys (server_id, kid, jwk, active_from, not_after)
                             VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (server_id, kid) DO UPDATE
                                SET active_from = EXCLUDED.active_from,
                                    not_after = EXCLUDED.not_after
                             WHERE jwt_keys.active_from <> EXCLUDED.active_from
                                OR jwt_keys.not_after <> EXCLUDED.not_after
                             RETURNING 1",
                            &[
                                &key.server_id,
                                &key.kid,
                                &key.jwk,
                                &key.active_from,
                                &key.not_after,
                            ],
                        )
                        .await?;
                    let changed = row.is_some();
                    if changed {
                        notify(&tx).await?;
                    }
                    tx.commit().await?;
                    Ok(changed)
                })
            })
            .await?;
        if changed {
            self.bump();
        }
        Ok(())
    }

    async fn jwt_keys(&self, now: i64) -> Result<Vec<JwtKeyRecord>, StoreError> {
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT server_id, kid, jwk, active_from, not_after FROM jwt_keys
                             WHERE not_after >= $1 ORDER BY server_id, active_from, kid",
                            &[&now],
                        )
                        .await?;
                    decode_all(&rows, codec::jwt_key_from_row::<Row>)
                })
            })
            .await
    }

    async fn jwts(&self, filter: JwtFilter) -> Result<Vec<JwtRecord>, StoreError> {
        self.pool
            .run(move |c| {
                let (sql, values) = events::jwts_query(&filter, |i| format!("${i}"));
                Box::pin(async move {
                    let params: Vec<Box<dyn ToSql + Sync + Send>> = values
                        .into_iter()
                        .map(|v| -> Box<dyn ToSql + Sync + Send> {
                            match v {
                                events::QueryValue::Text(t) => Box::new(t),
                                events::QueryValue::Int(n) => Box::new(n),
                            }
                        })
                        .collect();
                    let refs: Vec<&(dyn ToSql + Sync)> = params
                        .iter()
                        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                        .collect();
                    let rows = c.query(&sql, &refs).await?;
                    decode_all(&rows, codec::jwt_from_row::<Row>)
                })
            })
            .await
    }

    async fn jwt(&self, jti: &str) -> Result<Option<JwtRecord>, StoreError> {
        let jti = jti.to_owned();
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let sql = format!("SELECT {JWT_COLUMNS} FROM jwts WHERE jti = $1");
                    let found =
                        decode_all(&c.query(&sql, &[&jti]).await?, codec::jwt_from_row::<Row>)?;
                    Ok(found.into_iter().next())
                })
            })
            .await
    }

    async fn jwt_revocations(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT jti, expires_at FROM jwts
                             WHERE revoked_ms IS NOT NULL AND expires_at > $1 ORDER BY jti",
                            &[&now],
                        )
                        .await?;
                    Ok(rows
                        .iter()
                        .map(|row| Ok((col(row, "jti")?, col(row, "expires_at")?)))
                        .collect::<Result<Vec<_>, StoreError>>()?)
                })
            })
            .await
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    async fn changes_after(
        &self,
        revision: i64,
        limit: usize,
    ) -> Result<Vec<ChangeRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT revision, kind, key, time_ms FROM changes \
                             WHERE revision > $1 ORDER BY revision LIMIT $2",
                            &[&revision, &limit],
                        )
                        .await?;
                    decode_all(&rows, change_from_row)
                })
            })
            .await
    }

    async fn recent_changes(&self, limit: usize) -> Result<Vec<ChangeRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT revision, kind, key, time_ms FROM changes \
                             ORDER BY revision DESC LIMIT $1",
                            &[&limit],
                        )
                        .await?;
                    let mut newest_first = decode_all(&rows, change_from_row)?;
                    newest_first.reverse();
                    Ok(newest_first)
                })
            })
            .await
    }

    async fn last_revision(&self) -> Result<i64, StoreError> {
        self.pool
            .run(|c| {
                Box::pin(async move {
                    let row = c
                        .query_one(
                            "SELECT COALESCE(MAX(revision), 0)::BIGINT AS revision FROM changes",
                            &[],
                        )
                        .await?;
                    Ok(col(&row, "revision")?)
                })
            })
            .await
    }

    async fn entries_by_id(&self, ids: &[String]) -> Result<Vec<EntryRecord>, StoreError> {
        let ids = ids.to_vec();
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let sql = format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE id = ANY($1)");
                    decode_all(&c.query(&sql, &[&ids]).await?, entry_from_row)
                })
            })
            .await
    }

    async fn nodes_by_id(&self, ids: &[String]) -> Result<Vec<NodeRecord>, StoreError> {
        let ids = ids.to_vec();
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ANY($1)");
                    decode_all(&c.query(&sql, &[&ids]).await?, node_from_row)
                })
            })
            .await
    }

    async fn store_events(&self, events: Vec<EventRecord>) -> Result<StoredCount, StoreError> {
        events::check_batch(&events)?;
        let total = events.len();
        let (unique, _) = events::without_repeats(events);
        if unique.is_empty() {
            return Ok(StoredCount::default());
        }
        let (stored, jwt_revoked) = self
            .pool
            .run(move |c| Box::pin(async move { store_events(c, &unique).await }))
            .await?;
        if stored > 0 {
            // This replica's readers need not wait for the notification.
            bump(&self.events);
        }
        if jwt_revoked {
            self.bump();
        }
        Ok(StoredCount {
            stored: events::count(stored),
            duplicates: events::count(total - stored),
        })
    }

    async fn list_events(&self, filter: EventFilter) -> Result<Vec<StoredEvent>, StoreError> {
        events::check_filter(&filter)?;
        self.pool
            .run(move |c| Box::pin(async move { list_events(c, &filter).await }))
            .await
    }

    async fn svids(
        &self,
        entry_id: Option<&str>,
        node_id: Option<&str>,
    ) -> Result<Vec<SvidRecord>, StoreError> {
        let sql = events::svids_query(entry_id.is_some(), node_id.is_some(), |i| format!("${i}"));
        let params: Vec<String> = entry_id
            .into_iter()
            .chain(node_id)
            .map(str::to_owned)
            .collect();
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let params: Vec<&(dyn ToSql + Sync)> =
                        params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                    decode_all(&c.query(&sql, &params).await?, svid_from_row)
                })
            })
            .await
    }

    async fn entry_activity(&self) -> Result<Vec<EntryActivity>, StoreError> {
        self.pool
            .run(|c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT entry_id, last_issued_ms, last_used_ms FROM entry_activity
                             ORDER BY entry_id",
                            &[],
                        )
                        .await?;
                    decode_all(&rows, entry_activity_from_row)
                })
            })
            .await
    }

    async fn node_activity(&self) -> Result<Vec<NodeActivity>, StoreError> {
        self.pool
            .run(|c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT node_id, last_event_ms FROM node_activity ORDER BY node_id",
                            &[],
                        )
                        .await?;
                    decode_all(&rows, node_activity_from_row)
                })
            })
            .await
    }

    async fn prune_events(&self, older_than_ms: i64, now: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let chunk = self
                .pool
                .run(move |c| Box::pin(prune_event_chunk(c, older_than_ms, now)))
                .await?;
            deleted += chunk;
            if chunk < events::PRUNE_CHUNK as u64 {
                break;
            }
        }
        self.pool
            .run(move |c| Box::pin(prune_inventory(c, older_than_ms)))
            .await?;
        let changes_before = events::change_log_horizon(older_than_ms, now);
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    c.execute(
                        "DELETE FROM changes WHERE time_ms < $1
                            AND revision < (SELECT MAX(revision) FROM changes)",
                        &[&changes_before],
                    )
                    .await?;
                    Ok(())
                })
            })
            .await?;
        Ok(deleted)
    }

    fn events_appended(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    async fn svid(&self, serial: &str) -> Result<Option<SvidRecord>, StoreError> {
        let serial = serial.to_owned();
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let sql = format!("SELECT {SVID_COLUMNS} FROM svids WHERE serial = $1");
                    let found = decode_all(&c.query(&sql, &[&serial]).await?, svid_from_row)?;
                    Ok(found.into_iter().next())
                })
            })
            .await
    }

    async fn record_node_ca(&self, ca: NodeCaRecord) -> Result<(), StoreError> {
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    c.execute(
                        &format!(
                            "INSERT INTO node_cas ({}) VALUES ($1, $2, $3, $4, $5) \
                             ON CONFLICT (serial) DO NOTHING",
                            codec::NODE_CA_COLUMNS
                        ),
                        &[
                            &ca.serial,
                            &ca.node_id,
                            &ca.server_id,
                            &ca.der,
                            &ca.not_after,
                        ],
                    )
                    .await?;
                    Ok(())
                })
            })
            .await
    }

    async fn node_cas(
        &self,
        node_id: Option<&str>,
        now: i64,
    ) -> Result<Vec<NodeCaRecord>, StoreError> {
        let node_id = node_id.map(str::to_owned);
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let sql = format!(
                        "SELECT {} FROM node_cas WHERE not_after > $1 \
                         AND ($2::TEXT IS NULL OR node_id = $2) ORDER BY node_id, not_after, serial",
                        codec::NODE_CA_COLUMNS
                    );
                    decode_all(
                        &c.query(&sql, &[&now, &node_id]).await?,
                        node_ca_from_row,
                    )
                })
            })
            .await
    }

    async fn revoke(&self, records: Vec<RevocationRecord>) -> Result<Vec<String>, StoreError> {
        let revoked = self
            .pool
            .run(move |c| {
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    let stmt = tx
                        .prepare(&format!(
                            "INSERT INTO revocations ({}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                             ON CONFLICT (serial) DO NOTHING",
                            codec::REVOCATION_COLUMNS
                        ))
                        .await?;
                    let mut revoked = Vec::new();
                    for r in &records {
                        let inserted = tx
                            .execute(
                                &stmt,
                                &[
                                    &r.serial,
                                    &r.node_id,
                                    &r.root_server_id,
                                    &r.not_after,
                                    &r.reason,
                                    &r.detail,
                                    &r.revoked_ms,
                                ],
                            )
                            .await?;
                        if inserted > 0 {
                            revoked.push(r.serial.clone());
                        }
                    }
                    if !revoked.is_empty() {
                        notify(&tx).await?;
                    }
                    tx.commit().await?;
                    Ok(revoked)
                })
            })
            .await?;
        if !revoked.is_empty() {
            self.bump();
        }
        Ok(revoked)
    }

    async fn revocations(&self, now: i64) -> Result<Vec<RevocationRecord>, StoreError> {
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let sql = format!(
                        "SELECT {} FROM revocations WHERE not_after > $1 ORDER BY serial",
                        codec::REVOCATION_COLUMNS
                    );
                    decode_all(&c.query(&sql, &[&now]).await?, revocation_from_row)
                })
            })
            .await
    }

    async fn put_crl(&self, crl: CrlRecord) -> Result<bool, StoreError> {
        let stored = self
            .pool
            .run(move |c| {
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    let changed = tx
                        .execute(
                            &format!(
                                "INSERT INTO crls ({}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                                 ON CONFLICT (issuer) DO UPDATE SET publisher = EXCLUDED.publisher, \
                                 number = EXCLUDED.number, next_update = EXCLUDED.next_update, \
                                 until = EXCLUDED.until, revoked = EXCLUDED.revoked, der = EXCLUDED.der \
                                 WHERE EXCLUDED.number > crls.number",
                                codec::CRL_COLUMNS
                            ),
                            &[
                                &crl.issuer,
                                &crl.publisher,
                                &crl.number,
                                &crl.next_update,
                                &crl.until,
                                &crl.revoked,
                                &crl.der,
                            ],
                        )
                        .await?;
                    if changed > 0 {
                        notify(&tx).await?;
                    }
                    tx.commit().await?;
                    Ok(changed > 0)
                })
            })
            .await?;
        if stored {
            self.bump();
        }
        Ok(stored)
    }

    async fn set_entry_dormant(&self, entry_id: &str, since_ms: i64) -> Result<bool, StoreError> {
        let entry_id = entry_id.to_owned();
        let changed = self
            .pool
            .run(move |c| {
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    let sql = codec::dormant_sql(|i| format!("${i}"));
                    let changed = tx.execute(&sql, &[&entry_id, &since_ms]).await? > 0;
                    if changed {
                        notify(&tx).await?;
                    }
                    tx.commit().await?;
                    Ok(changed)
                })
            })
            .await?;
        if changed {
            self.bump();
        }
        Ok(changed)
    }

    async fn activate_entry(&self, entry_id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let entry_id = entry_id.to_owned();
        let was_dormant = self
            .pool
            .run(move |c| {
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    let was = tx
                        .query_opt(
                            "SELECT dormant_since_ms FROM entry_standing WHERE entry_id = $1 FOR UPDATE",
                            &[&entry_id],
                        )
                        .await?
                        .map(|row| row.try_get::<_, Option<i64>>(0))
                        .transpose()?
                        .flatten();
                    let sql = codec::activate_sql(|i| format!("${i}"));
                    tx.execute(&sql, &[&entry_id, &now_ms]).await?;
                    notify(&tx).await?;
                    tx.commit().await?;
                    Ok(was.is_some())
                })
            })
            .await?;
        self.bump();
        Ok(was_dormant)
    }

    async fn entry_standings(&self) -> Result<Vec<EntryStanding>, StoreError> {
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let rows = c
                        .query(
                            "SELECT entry_id, dormant_since_ms, activated_ms FROM entry_standing ORDER BY entry_id",
                            &[],
                        )
                        .await?;
                    decode_all(&rows, entry_standing_from_row)
                })
            })
            .await
    }

    async fn set_policy(&self, text: &str, now_ms: i64) -> Result<PolicyRecord, StoreError> {
        let text = text.to_owned();
        let (record, changed) = self
            .pool
            .run(move |c| {
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    let current = select_policy(&tx).await?;
                    if current.as_ref().is_some_and(|c| c.text == text)
                        || (current.is_none() && text.is_empty())
                    {
                        return Ok((current.unwrap_or_default(), false));
                    }
                    let record = PolicyRecord {
                        version: current.map_or(1, |c| c.version + 1),
                        sha256: codec::sha256_hex(text.as_bytes()),
                        text,
                        set_ms: now_ms,
                    };
                    let inserted = tx
                        .execute(
                            "INSERT INTO policies (version, text, sha256, set_ms)
                             VALUES ($1, $2, $3, $4) ON CONFLICT (version) DO NOTHING",
                            &[
                                &record.version,
                                &record.text,
                                &record.sha256,
                                &record.set_ms,
                            ],
                        )
                        .await?;
                    if inserted == 0 {
                        // Another replica stored this version meanwhile.
                        return Err(Failure::Store(StoreError::RevisionConflict {
                            id: "policy".to_owned(),
                            expected: record.version - 1,
                            actual: record.version,
                        }));
                    }
                    notify(&tx).await?;
                    tx.commit().await?;
                    Ok((record, true))
                })
            })
            .await?;
        if changed {
            self.bump();
        }
        Ok(record)
    }

    async fn policy(&self) -> Result<Option<PolicyRecord>, StoreError> {
        self.pool
            .run(|c| Box::pin(async move { select_policy(c).await }))
            .await
    }

    async fn policy_history(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        self.pool
            .run(|c| {
                Box::pin(async move {
                    let sql = format!(
                        "SELECT {} FROM policies ORDER BY version",
                        codec::POLICY_COLUMNS
                    );
                    let rows = c.query(&sql, &[]).await?;
                    decode_all(&rows, policy_from_row)
                })
            })
            .await
    }

    async fn tasks(&self, live_only: bool) -> Result<Vec<TaskRecord>, StoreError> {
        self.pool
            .run(move |c| Box::pin(async move { select_tasks(c, live_only).await }))
            .await
    }

    async fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let task_id = task_id.to_owned();
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let sql = format!(
                        "SELECT {} FROM tasks WHERE task_id = $1",
                        events::TASK_COLUMNS
                    );
                    let rows = c.query(&sql, &[&task_id]).await?;
                    Ok(decode_all(&rows, task_from_row)?.pop())
                })
            })
            .await
    }

    async fn order_task_end(
        &self,
        task_id: &str,
        reason: &str,
        detail: &str,
        now_ms: i64,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let (task_id, reason, detail) = (task_id.to_owned(), reason.to_owned(), detail.to_owned());
        let ordered = self
            .pool
            .run(move |c| {
                Box::pin(async move {
                    let tx = c.transaction().await?;
                    if tx
                        .query_opt("SELECT 1 FROM tasks WHERE task_id = $1", &[&task_id])
                        .await?
                        .is_none()
                    {
                        return Err(Failure::Store(StoreError::NotFound {
                            kind: "task",
                            id: task_id,
                        }));
                    }
                    let sql = codec::order_task_sql(|i| format!("${i}"));
                    let mut ordered = Vec::new();
                    let live = select_tasks(&tx, true).await?;
                    for mut task in codec::task_and_descendants(live, &task_id) {
                        if tx
                            .execute(&sql, &[&task.task_id, &now_ms, &reason, &detail])
                            .await?
                            > 0
                        {
                            task.end_ordered_ms = Some(now_ms);
                            task.end_order_reason = Some(reason.clone());
                            task.end_order_detail = detail.clone();
                            ordered.push(task);
                        }
                    }
                    if !ordered.is_empty() {
                        notify(&tx).await?;
                    }
                    tx.commit().await?;
                    Ok(ordered)
                })
            })
            .await?;
        if !ordered.is_empty() {
            self.bump();
        }
        Ok(ordered)
    }

    async fn crls(&self, now: i64) -> Result<Vec<CrlRecord>, StoreError> {
        self.pool
            .run(move |c| {
                Box::pin(async move {
                    let sql = format!(
                        "SELECT {} FROM crls WHERE until > $1 ORDER BY issuer",
                        codec::CRL_COLUMNS
                    );
                    decode_all(&c.query(&sql, &[&now]).await?, crl_from_row)
                })
            })
            .await
    }
}

fn entry_standing_from_row(row: &Row) -> Result<EntryStanding, StoreError> {
    codec::entry_standing_from_row(row)
}

fn node_ca_from_row(row: &Row) -> Result<NodeCaRecord, StoreError> {
    codec::node_ca_from_row(row)
}

fn revocation_from_row(row: &Row) -> Result<RevocationRecord, StoreError> {
    codec::revocation_from_row(row)
}

fn crl_from_row(row: &Row) -> Result<CrlRecord, StoreError> {
    codec::crl_from_row(row)
}

/// Keeps a notification connection up for as long as the store lives, waiting longer (with
/// jitter, so replicas do not reconnect in lockstep) after each failed attempt.
async fn listen(
    config: Config,
    tls: PgTls,
    changes: Arc<watch::Sender<u64>>,
    events: Arc<watch::Sender<u64>>,
) {
    let mut backoff = crate::runtime::Backoff::new(LISTEN_RETRY_MIN, LISTEN_RETRY_MAX);
    loop {
        match listen_once(&config, &tls, &changes, &events).await {
            Ok(reason) => {
                tracing::warn!(%reason, "lost the PostgreSQL notification connection");
                backoff.reset();
            }
            Err(reason) => {
                tracing::warn!(%reason, "cannot listen for PostgreSQL notifications; retrying");
            }
        }
        tokio::time::sleep(backoff.next_pause()).await;
    }
}

/// One notification connection, until it fails. `Ok(why it ended)` once it was established,
/// `Err(why not)` when it could not be; both `Unavailable`, with the driver's error when there
/// is one.
async fn listen_once(
    config: &Config,
    tls: &PgTls,
    changes: &watch::Sender<u64>,
    events: &watch::Sender<u64>,
) -> Result<StoreError, StoreError> {
    let (client, mut connection) =
        tokio::time::timeout(CONNECT_TIMEOUT, config.connect(tls.clone()))
            .await
            .map_err(|_| {
                StoreError::unavailable(format!(
                    "cannot connect to PostgreSQL: no answer within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| StoreError::unavailable_from("cannot connect to PostgreSQL", e))?;
    // The connection is driven here rather than on a task of its own: notifications arrive
    // through it, and so do the answers to the requests below.
    let messages = async {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == EVENTS_CHANNEL => {
                    bump(events)
                }
                Some(Ok(AsyncMessage::Notification(_))) => bump(changes),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return StoreError::unavailable_from("the notification connection failed", e);
                }
                None => return StoreError::unavailable("the server closed the connection"),
            }
        }
    };
    let session = async {
        if let Err(e) = client
            .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {EVENTS_CHANNEL}"))
            .await
        {
            return StoreError::unavailable_from("LISTEN failed", e);
        }
        tracing::debug!("listening for PostgreSQL change notifications");
        // Only now is every later change announced; those before may have been missed.
        bump(changes);
        bump(events);
        loop {
            tokio::time::sleep(LISTEN_PROBE_INTERVAL).await;
            match tokio::time::timeout(CONNECT_TIMEOUT, client.simple_query("")).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return StoreError::unavailable_from("the liveness probe failed", e),
                Err(_) => return StoreError::unavailable("the server stopped answering"),
            }
        }
    };
    tokio::select! {
        reason = messages => Ok(reason),
        reason = session => Ok(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tessera_harness::postgres::{
        admin_client, drop_scratch_database, scratch_database_from_env, test_server_from_env,
    };

    #[tokio::test]
    async fn unreachable_server_is_unavailable() {
        let err = PostgresStore::connect("host=/nonexistent/dir user=x connect_timeout=1")
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, StoreError::Unavailable { context, source: Some(_) } if context.contains("cannot connect")),
            "{err}"
        );
        let source = std::error::Error::source(&err).expect("no source");
        assert!(source.is::<tokio_postgres::Error>(), "{source:?}");
    }

    #[tokio::test]
    async fn invalid_connection_string_is_refused() {
        let err = PostgresStore::connect("host=a port=notaport")
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, StoreError::Unavailable { .. })
                && err.to_string().contains("connection string"),
            "{err}"
        );
    }

    /// Blocks until `released` fires: an operation that holds its connection.
    fn held(
        released: tokio::sync::oneshot::Receiver<()>,
    ) -> impl for<'c> FnOnce(&'c mut Client) -> Op<'c, ()> + Send {
        move |_client| {
            Box::pin(async move {
                let _ = released.await;
                Ok(())
            })
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn pool_hands_out_the_first_free_connection() {
        let Some(conninfo) = scratch_database_from_env().await else {
            return;
        };
        let ConnectionString { config, tls } = ConnectionString::parse(&conninfo).unwrap();
        let pool = Arc::new(Pool::new(config, tls));
        let mut releases = Vec::new();
        let mut holders = Vec::new();
        for _ in 0..POOL_SIZE {
            let (release, released) = tokio::sync::oneshot::channel();
            releases.push(release);
            let pool = Arc::clone(&pool);
            holders.push(tokio::spawn(async move { pool.run(held(released)).await }));
        }
        // Every connection is in use once no permit is left.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while pool.permits.available_permits() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the holders never started"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let waiter = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                pool.run(|client| {
                    Box::pin(async move { Ok(client.simple_query("SELECT 1").await.map(|_| ())?) })
                })
                .await
            })
        };
        // Free every connection but the first: the waiter must take one of them, whichever
        // it would have queued behind.
        let first = releases.remove(0);
        for release in releases {
            release.send(()).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(60), waiter)
            .await
            .expect("the waiter queued behind the one busy connection")
            .unwrap()
            .unwrap();
        first.send(()).unwrap();
        for holder in holders {
            holder.await.unwrap().unwrap();
        }
        drop_scratch_database(&conninfo).await;
    }

    /// What a TLS test needs of the local cluster: a certificate for `localhost` signed by a CA
    /// of its own, and a role that logs in with a password over TCP.
    struct TlsCluster {
        dir: PathBuf,
        port: u16,
        password: String,
    }

    const TLS_ROLE: &str = "tessera_tls_test";

    /// Sets up TLS on the local cluster that TESSERA_TEST_POSTGRES names, once: later runs find
    /// it in place. Test processes take turns on a lock file while they look.
    async fn tls_cluster(admin: &Client) -> TlsCluster {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let show = |name: &'static str| async move {
            let row = admin
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .unwrap_or_else(|e| panic!("SHOW {name}: {}", describe(&e)));
            row.get::<_, String>(0)
        };
        let data_dir = PathBuf::from(show("data_directory").await);
        let port: u16 = show("port").await.parse().unwrap();
        let owner = std::fs::metadata(&data_dir).unwrap_or_else(|e| {
            panic!(
                "the TLS test sets up the local cluster and needs to see its data directory {}: {e}",
                data_dir.display()
            )
        });
        // Beside the cluster's data, in a place its server may read.
        let dir = data_dir.parent().unwrap().join("tessera-test-tls");
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(owner.uid()), Some(owner.gid())).unwrap();
        let lock = std::fs::File::create(dir.join("lock")).unwrap();
        let _lock = tokio::task::spawn_blocking(move || {
            nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, e)| e)
                .unwrap()
        })
        .await
        .unwrap();

        let (cert, key, ca) = (
            dir.join("server.pem"),
            dir.join("server.key"),
            dir.join("ca.pem"),
        );
        let password_file = dir.join("password");
        if !(cert.exists() && key.exists() && ca.exists()) {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "tessera test PostgreSQL CA");
            ca_params.not_after = rcgen::date_time_ymd(2100, 1, 1);
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let server_key = rcgen::KeyPair::generate().unwrap();
            let mut server_params =
                rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            server_params.not_after = rcgen::date_time_ymd(2100, 1, 1);
            let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
            let write = |path: &PathBuf, text: String, mode: u32| {
                std::fs::write(path, text).unwrap();
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
                std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid())).unwrap();
            };
            write(&key, server_key.serialize_pem(), 0o600);
            write(&cert, server_cert.pem(), 0o644);
            write(&ca, ca_cert.pem(), 0o644);
        }
        if !password_file.exists() {
            let mut secret = [0u8; 18];
            aws_lc_rs::rand::fill(&mut secret).unwrap();
            std::fs::write(&password_file, hex::encode(secret)).unwrap();
            std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600))
                .unwrap();
        }
        let password = std::fs::read_to_string(&password_file).unwrap();
        admin
            .batch_execute(&format!(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{TLS_ROLE}') THEN
                     CREATE ROLE {TLS_ROLE} LOGIN;
                   END IF;
                 END $$;
                 ALTER ROLE {TLS_ROLE} PASSWORD '{password}'"
            ))
            .await
            .unwrap_or_else(|e| panic!("cannot set up role {TLS_ROLE}: {}", describe(&e)));
        let wanted = cert.display().to_string();
        if show("ssl").await != "on" || show("ssl_cert_file").await != wanted {
            // One statement at a time: ALTER SYSTEM refuses to run inside a transaction.
            for statement in [
                "ALTER SYSTEM SET ssl = on".to_owned(),
                format!("ALTER SYSTEM SET ssl_cert_file = '{wanted}'"),
                format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
                "SELECT pg_reload_conf()".to_owned(),
            ] {
                admin
                    .simple_query(&statement)
                    .await
                    .unwrap_or_else(|e| panic!("{statement}: {}", describe(&e)));
            }
        }
        TlsCluster {
            dir,
            port,
            password,
        }
    }

    impl TlsCluster {
        fn conninfo(&self, host: &str, dbname: &str, tls: &str) -> String {
            format!(
                "host={host} port={} user={TLS_ROLE} password={} dbname={dbname} {tls}",
                self.port, self.password
            )
        }

        fn ca(&self) -> String {
            self.dir.join("ca.pem").display().to_string()
        }
    }

    /// Whether the connection made by `conninfo` runs over TLS, as the server sees it.
    async fn uses_tls(conninfo: &str) -> Result<bool, StoreError> {
        let ConnectionString { config, tls } = ConnectionString::parse(conninfo).unwrap();
        let client = connect(&config, &tls).await?;
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        Ok(row.get(0))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn tls_to_the_database_honours_sslmode_and_sslrootcert() {
        let Some(admin_conninfo) = test_server_from_env() else {
            return;
        };
        let admin = admin_client(&admin_conninfo).await;
        let cluster = tls_cluster(&admin).await;
        let conninfo = scratch_database_from_env().await.unwrap();
        let dbname = ConnectionString::parse(&conninfo)
            .unwrap()
            .config
            .get_dbname()
            .unwrap()
            .to_owned();
        admin
            .batch_execute(&format!("ALTER DATABASE {dbname} OWNER TO {TLS_ROLE}"))
            .await
            .unwrap();
        let verify_full = cluster.conninfo(
            "localhost",
            &dbname,
            &format!("sslmode=verify-full sslrootcert='{}'", cluster.ca()),
        );
        // The server takes up a new certificate at its reload, a moment after it is asked to.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match uses_tls(&verify_full).await {
                Ok(tls) => {
                    assert!(tls, "verify-full must run over TLS");
                    break;
                }
                Err(e) => assert!(
                    std::time::Instant::now() < deadline,
                    "verify-full never connected: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The whole store works over it.
        let store = PostgresStore::connect(&verify_full).await.unwrap();
        assert_eq!(store.list_entries().await.unwrap(), []);
        drop(store);

        // require: encrypted, the certificate unchecked.
        let require = cluster.conninfo("localhost", &dbname, "sslmode=require");
        assert!(uses_tls(&require).await.unwrap());
        // verify-ca: the chain is checked, the name is not.
        let by_address = cluster.conninfo(
            "127.0.0.1",
            &dbname,
            &format!("sslmode=verify-ca sslrootcert='{}'", cluster.ca()),
        );
        assert!(uses_tls(&by_address).await.unwrap());
        // verify-full: the name must be the host's.
        let wrong_name = cluster.conninfo(
            "127.0.0.1",
            &dbname,
            &format!("sslmode=verify-full sslrootcert='{}'", cluster.ca()),
        );
        let err = uses_tls(&wrong_name).await.unwrap_err().to_string();
        assert!(err.contains("certificate"), "{err}");
        assert!(!err.contains(&cluster.password), "{err}");
        // A root that did not sign the server's certificate.
        let other = tempfile::tempdir().unwrap();
        let other_ca = other.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&other_ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let wrong_root = cluster.conninfo(
            "localhost",
            &dbname,
            &format!("sslmode=verify-full sslrootcert='{}'", other_ca.display()),
        );
        let err = PostgresStore::connect(&wrong_root)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("certificate"), "{err}");
        // disable: plain text, as asked.
        let plain = cluster.conninfo("localhost", &dbname, "sslmode=disable");
        assert!(!uses_tls(&plain).await.unwrap());

        drop_scratch_database(&conninfo).await;
    }
}
