//! The embedded SQLite backend, the default for a single server.
//!
//! One connection serves every operation, run on tokio's blocking pool so the database never
//! stalls the async workers. The file is opened in WAL mode with `synchronous=FULL`: a committed
//! write survives a power cut. Every write runs in one `IMMEDIATE` transaction, which takes the
//! write lock up front so a transaction never fails half-way for lack of it.
//!
//! [`Datastore::changes`] and [`Datastore::events_appended`] only see writes made through this
//! [`SqliteStore`]: one process owns a SQLite file. Several servers sharing state need the
//! PostgreSQL backend.
//!
//! A batch of events is written with prepared statements: one insert per event, then one
//! upsert per SVID, entry and node it concerns. Batches that arrive while the connection is busy
//! are written together in one transaction (one commit for many uploads); when one of them
//! fails, each is written again alone, so a bad batch fails by itself. Event positions come from an `AUTOINCREMENT`
//! key, so a position is never handed out twice, not even after the newest events are pruned,
//! and the single writer makes them follow commit order.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, Transaction, TransactionBehavior};
use tokio::sync::watch;

use super::codec;
use super::events::{self, EVENT_COLUMNS, InventoryChanges, JWT_COLUMNS, JWT_MERGE, SVID_COLUMNS};
use super::{
    BundleRoot, ChangeKind, ChangeRecord, CrlRecord, Datastore, EntryActivity, EntryRecord,
    EntryStanding, EventFilter, EventRecord, JoinTokenRecord, JwtFilter, JwtKeyRecord, JwtRecord,
    NodeActivity, NodeCaRecord, NodeCredentialsRecord, NodeRecord, NodeStatus, PolicyRecord,
    RevocationRecord, StoreError, StoredCount, StoredEvent, SvidRecord, TaskRecord, TokenRefusal,
    unix_now,
};

/// How long a statement waits for a lock held by another connection (a backup tool, the
/// `sqlite3` shell) before the operation fails as unavailable.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, as ordered migrations: a database records the last one applied in
/// `schema_version` and gets the rest at open. Never edit a released step; add one.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE entries (
        id TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        selectors TEXT NOT NULL,
        selectors_sha256 TEXT NOT NULL,
        node_selectors TEXT NOT NULL,
        x509_ttl_seconds INTEGER NOT NULL,
        owner TEXT NOT NULL,
        purpose TEXT NOT NULL,
        expires_at INTEGER,
        inactivity_timeout_seconds INTEGER,
        hint TEXT,
        dns_names TEXT NOT NULL,
        revision INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        CONSTRAINT entries_identity UNIQUE (spiffe_id, selectors_sha256)
    ) STRICT;
    CREATE INDEX entries_by_creation ON entries (created_at, id);
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        attestation TEXT NOT NULL,
        selectors TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('active', 'evicted', 'banned')),
        attested_at INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        svid_serial TEXT NOT NULL,
        svid_not_after INTEGER NOT NULL,
        ca_serial TEXT NOT NULL,
        ca_not_after INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE join_tokens (
        digest TEXT PRIMARY KEY,
        expires_at INTEGER NOT NULL,
        labels TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        used_at INTEGER,
        used_by TEXT
    ) STRICT;
    CREATE TABLE bundle_roots (
        server_id TEXT NOT NULL,
        der_sha256 TEXT NOT NULL,
        der BLOB NOT NULL,
        not_after INTEGER NOT NULL,
        PRIMARY KEY (server_id, der_sha256)
    ) STRICT;",
    ),
    // Credential events and the inventory derived from them. The kind is checked by the code,
    // not by a constraint, so that a later kind needs no table rebuild. SQLite appends the
    // rowid (`seq`) to every index, so the single-column indexes also serve `ORDER BY seq`
    // within one value.
    (
        2,
        "CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        time_ms INTEGER NOT NULL,
        node_id TEXT NOT NULL,
        entry_id TEXT NOT NULL,
        spiffe_id TEXT NOT NULL,
        serial TEXT NOT NULL,
        not_after INTEGER,
        reason TEXT,
        caller_pid INTEGER,
        caller_uid INTEGER,
        caller_gid INTEGER,
        caller_exe_path TEXT,
        caller_exe_sha256 TEXT,
        caller_unit TEXT,
        first_ms INTEGER,
        last_ms INTEGER,
        count INTEGER,
        detail TEXT NOT NULL,
        received_ms INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX events_by_time ON events (time_ms);
    CREATE INDEX events_by_kind ON events (kind);
    CREATE INDEX events_by_spiffe_id ON events (spiffe_id);
    CREATE INDEX events_by_entry ON events (entry_id);
    CREATE INDEX events_by_node ON events (node_id);
    CREATE INDEX events_by_serial ON events (serial);
    CREATE TABLE svids (
        serial TEXT PRIMARY KEY,
        entry_id TEXT NOT NULL,
        spiffe_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        issued_ms INTEGER,
        not_after INTEGER,
        revoked_ms INTEGER,
        reason TEXT,
        last_used_ms INTEGER,
        uses INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX svids_by_entry ON svids (entry_id);
    CREATE INDEX svids_by_node ON svids (node_id);
    CREATE TABLE entry_activity (
        entry_id TEXT PRIMARY KEY,
        last_issued_ms INTEGER,
        last_used_ms INTEGER
    ) STRICT;
    CREATE TABLE node_activity (
        node_id TEXT PRIMARY KEY,
        last_event_ms INTEGER NOT NULL
    ) STRICT;",
    ),
    // Revocation: the node CAs each root granted, the certificates revoked (orders to their
    // issuers), and the latest CRL of every issuer.
    (
        3,
        "CREATE TABLE node_cas (
        serial TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        server_id TEXT NOT NULL,
        der BLOB NOT NULL,
        not_after INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX node_cas_by_node ON node_cas (node_id);
    CREATE TABLE revocations (
        serial TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        root_server_id TEXT,
        not_after INTEGER NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        revoked_ms INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE crls (
        issuer TEXT PRIMARY KEY,
        publisher TEXT NOT NULL,
        number INTEGER NOT NULL,
        next_update INTEGER NOT NULL,
        until INTEGER NOT NULL,
        revoked INTEGER NOT NULL,
        der BLOB NOT NULL
    ) STRICT;
    CREATE TABLE entry_standing (
        entry_id TEXT PRIMARY KEY,
        dormant_since_ms INTEGER,
        activated_ms INTEGER
    ) STRICT;",
    ),
    (
        4,
        "ALTER TABLE entries ADD COLUMN activation TEXT NOT NULL DEFAULT 'standing';
    ALTER TABLE entries ADD COLUMN delegates_to TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE entries ADD COLUMN labels TEXT NOT NULL DEFAULT '[]';",
    ),
    (
        5,
        "ALTER TABLE events ADD COLUMN task TEXT;
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        entry_id TEXT NOT NULL,
        spiffe_id TEXT NOT NULL,
        parent_id TEXT,
        chain TEXT NOT NULL,
        purpose TEXT NOT NULL,
        owner TEXT NOT NULL,
        pid INTEGER NOT NULL,
        starter_uid INTEGER,
        started_ms INTEGER,
        deadline INTEGER NOT NULL,
        ended_ms INTEGER,
        end_reason TEXT,
        end_ordered_ms INTEGER,
        end_order_reason TEXT,
        end_order_detail TEXT NOT NULL DEFAULT ''
    ) STRICT;
    CREATE INDEX tasks_by_parent ON tasks (parent_id);
    CREATE INDEX tasks_by_end ON tasks (ended_ms);",
    ),
    (
        6,
        "CREATE TABLE policies (
        version INTEGER PRIMARY KEY,
        text TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        set_ms INTEGER NOT NULL
    ) STRICT;
    ALTER TABLE events ADD COLUMN policy_version INTEGER;
    ALTER TABLE events ADD COLUMN policies TEXT;",
    ),
    // JWT-SVIDs: the replicas' signing keys and the tokens' inventory (kept from their events).
    (
        7,
        "ALTER TABLE events ADD COLUMN jti TEXT;
    ALTER TABLE events ADD COLUMN audience TEXT;
    CREATE INDEX events_by_jti ON events (jti) WHERE jti IS NOT NULL;
    CREATE TABLE jwt_keys (
        server_id TEXT NOT NULL,
        kid TEXT NOT NULL,
        jwk TEXT NOT NULL,
        active_from INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        PRIMARY KEY (server_id, kid)
    ) STRICT;
    CREATE TABLE jwts (
        jti TEXT PRIMARY KEY,
        entry_id TEXT NOT NULL,
        spiffe_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        audience TEXT NOT NULL,
        issued_ms INTEGER,
        expires_at INTEGER,
        revoked_ms INTEGER,
        reason TEXT,
        last_used_ms INTEGER,
        uses INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX jwts_by_entry ON jwts (entry_id);
    CREATE INDEX jwts_by_node ON jwts (node_id);
    CREATE INDEX jwts_by_task ON jwts (task_id);
    CREATE INDEX jwts_revoked ON jwts (revoked_ms) WHERE revoked_ms IS NOT NULL;
    ALTER TABLE entries ADD COLUMN jwt_ttl_seconds INTEGER;",
    ),
    // The change log: every committed change to what sync streams send, one row each, in
    // commit order (one writer at a time). Triggers write it, so no write path can forget to.
    (
        8,
        "CREATE TABLE changes (
        revision INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        time_ms INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX changes_by_time ON changes (time_ms);
    CREATE TRIGGER entries_logged_insert AFTER INSERT ON entries BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('entry', NEW.id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER entries_logged_update AFTER UPDATE ON entries BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('entry', NEW.id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER entries_logged_delete AFTER DELETE ON entries BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('entry', OLD.id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER nodes_logged_insert AFTER INSERT ON nodes BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('node', NEW.id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER nodes_logged_update AFTER UPDATE ON nodes
    WHEN OLD.status IS NOT NEW.status OR OLD.selectors IS NOT NEW.selectors
        OR OLD.attested_at IS NOT NEW.attested_at BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('node', NEW.id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER nodes_logged_delete AFTER DELETE ON nodes BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('node', OLD.id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER standing_logged_insert AFTER INSERT ON entry_standing BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('standing', NEW.entry_id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER standing_logged_update AFTER UPDATE ON entry_standing
    WHEN OLD.dormant_since_ms IS NOT NEW.dormant_since_ms BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('standing', NEW.entry_id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER standing_logged_delete AFTER DELETE ON entry_standing BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('standing', OLD.entry_id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER jwts_logged_insert AFTER INSERT ON jwts WHEN NEW.revoked_ms IS NOT NULL BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('jwt_revocation', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER jwts_logged_update AFTER UPDATE ON jwts
    WHEN OLD.revoked_ms IS NOT NEW.revoked_ms BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('jwt_revocation', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER bundle_roots_logged_insert AFTER INSERT ON bundle_roots BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('bundle', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER bundle_roots_logged_update AFTER UPDATE ON bundle_roots BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('bundle', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER bundle_roots_logged_delete AFTER DELETE ON bundle_roots BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('bundle', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER jwt_keys_logged_insert AFTER INSERT ON jwt_keys BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('jwt_key', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER jwt_keys_logged_update AFTER UPDATE ON jwt_keys BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('jwt_key', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER jwt_keys_logged_delete AFTER DELETE ON jwt_keys BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('jwt_key', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER crls_logged_insert AFTER INSERT ON crls BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('crl', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER crls_logged_update AFTER UPDATE ON crls BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('crl', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER crls_logged_delete AFTER DELETE ON crls BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('crl', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER revocations_logged_insert AFTER INSERT ON revocations BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('revocation', NEW.node_id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER revocations_logged_update AFTER UPDATE ON revocations BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('revocation', NEW.node_id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER revocations_logged_delete AFTER DELETE ON revocations BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('revocation', OLD.node_id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER tasks_logged_insert AFTER INSERT ON tasks BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('task', NEW.node_id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER tasks_logged_update AFTER UPDATE ON tasks BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('task', NEW.node_id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER tasks_logged_delete AFTER DELETE ON tasks BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('task', OLD.node_id, CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER policies_logged_insert AFTER INSERT ON policies BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('policy', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER policies_logged_update AFTER UPDATE ON policies BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('policy', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;
    CREATE TRIGGER policies_logged_delete AFTER DELETE ON policies BEGIN
        INSERT INTO changes (kind, key, time_ms)
        VALUES ('policy', '', CAST(unixepoch('subsec') * 1000 AS INTEGER));
    END;",
    ),
];

const ENTRY_COLUMNS: &str = "id, spiffe_id, selectors, node_selectors, x509_ttl_seconds, owner, \
    purpose, expires_at, inactivity_timeout_seconds, hint, dns_names, revision, created_at, \
    updated_at, activation, delegates_to, labels, jwt_ttl_seconds";

const NODE_COLUMNS: &str = "id, attestation, selectors, status, attested_at, last_seen, \
    svid_serial, svid_not_after, ca_serial, ca_not_after";

/// A [`Datastore`] in one SQLite file, for one server process.
pub struct SqliteStore {
    /// The only connection to the file. A std mutex: it is only taken on the blocking pool.
    conn: Arc<Mutex<Connection>>,
    /// Moves on after every committed change to entries, node status or the bundle.
    changes: watch::Sender<u64>,
    /// Moves on after every batch of events that stored something.
    events: watch::Sender<u64>,
    /// Batches of events waiting for the connection, each with where its outcome goes.
    pending_events: Arc<Mutex<Vec<PendingBatch>>>,
}

/// A batch of events waiting to be written, and the caller waiting for its outcome: how many
/// were stored, and whether one revoked a JWT-SVID.
struct PendingBatch {
    events: Vec<EventRecord>,
    outcome: tokio::sync::oneshot::Sender<Result<(usize, bool), StoreError>>,
}

impl SqliteStore {
    /// Opens the database at `path`, creating it (mode 0600) when absent, and brings its schema
    /// up to date. Fails with `Corrupt` when the file is not a database or was migrated by a
    /// newer server. Blocks while it works: call it at start-up, before serving.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        create_private(path)?;
        let mut conn = Connection::open(path).map_err(|e| opening_error(path, e))?;
        configure(&conn).map_err(|e| opening_error(path, e))?;
        migrate(&mut conn, None)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            changes: watch::Sender::new(0),
            events: watch::Sender::new(0),
            pending_events: Arc::default(),
        })
    }

    /// Creates the database at `path` with the schema of `version` and no later, as a server of
    /// that version left it.
    #[cfg(test)]
    pub(super) fn create_at_version(path: &Path, version: i64) -> Result<(), StoreError> {
        create_private(path)?;
        let mut conn = Connection::open(path).map_err(|e| opening_error(path, e))?;
        configure(&conn).map_err(|e| opening_error(path, e))?;
        migrate(&mut conn, Some(version))
    }

    /// Runs `work` on the connection, on the blocking pool.
    async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a transaction open (it rolls back
            // as it unwinds), so the connection is still usable.
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut conn)
        })
        .await
        .map_err(|e| StoreError::unavailable_from("the SQLite task failed", e))?
    }

    /// Runs `work` in one `IMMEDIATE` transaction, committed when it succeeds.
    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.run(move |conn| immediate(conn, work)).await
    }

    /// Tells every `changes()` receiver that something changed.
    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Tells every `events_appended()` receiver that events were stored.
    fn bump_events(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Creates the file readable by its owner only, so the database never exists world-readable,
/// not even for a moment.
fn create_private(path: &Path) -> Result<(), StoreError> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::unavailable_from(
            format!("cannot create the database file {}", path.display()),
            e,
        )),
    }
}

fn opening_error(path: &Path, e: rusqlite::Error) -> StoreError {
    match db_error(e) {
        e @ StoreError::Unavailable { .. } => {
            e.within(format_args!("cannot open {}", path.display()))
        }
        e => e.within(path.display()),
    }
}

/// Durable, consistent settings; they hold for the connection's life.
fn configure(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!(
                "the file system refused WAL journal mode (got {mode})"
            )),
        ));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Every event touches seven B-trees (the table and six indexes); with SQLite's default
    // 2 MiB page cache their pages are read back from the OS for each batch. 64 MiB (filled only
    // as pages are used) took ingest from about 23,000 to 27,000 events/s in the benchmark.
    conn.pragma_update(None, "cache_size", -64 * 1024)?;
    Ok(())
}

/// Applies the migrations the database has not seen yet (up to `until`, when given), all in
/// one transaction.
fn migrate(conn: &mut Connection, until: Option<i64>) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_error)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version INTEGER PRIMARY KEY,
            applied_at INTEGER NOT NULL
        ) STRICT",
    )
    .map_err(db_error)?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |row| row.get(0),
        )
        .map_err(db_error)?;
    let known = MIGRATIONS.last().map_or(0, |(version, _)| *version);
    codec::check_schema_version(current, known)?;
    let wanted = |v: i64| v > current && until.is_none_or(|until| v <= until);
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| wanted(*v)) {
        tx.execute_batch(sql).map_err(db_error)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
            (version, unix_now()),
        )
        .map_err(db_error)?;
        tracing::info!(version, "SQLite datastore schema migrated");
    }
    tx.commit().map_err(db_error)
}

/// What a SQLite failure means to the caller.
fn db_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::Error as E;
    match &e {
        E::SqliteFailure(failure, _) => match failure.code {
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                StoreError::corrupt_from("the SQLite file is damaged", e)
            }
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => StoreError::unavailable_from(
                "the SQLite database is locked by another connection",
                e,
            ),
            _ => StoreError::unavailable_from("SQLite failed", e),
        },
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::Utf8Error(..)
        | E::InvalidColumnType(..) => StoreError::corrupt_from("SQLite cannot read the value", e),
        _ => StoreError::unavailable_from("SQLite failed", e),
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    e.sqlite_error().is_some_and(|f| {
        f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    })
}

impl codec::ReadRow for Row<'_> {
    fn column<T: codec::Value>(&self, name: &str) -> Result<T, StoreError> {
        self.get(name).map_err(|e| match db_error(e) {
            e @ StoreError::Corrupt { .. } => e.within(format_args!("column {name}")),
            other => other,
        })
    }
}

// The shared decoders as plain functions of rusqlite's row, for `query_all` and `query_first`
// (a generic function cannot stand for every lifetime of `Row<'_>`).

fn entry_from_row(row: &Row<'_>) -> Result<EntryRecord, StoreError> {
    codec::entry_from_row(row)
}

fn node_from_row(row: &Row<'_>) -> Result<NodeRecord, StoreError> {
    codec::node_from_row(row)
}

fn root_from_row(row: &Row<'_>) -> Result<BundleRoot, StoreError> {
    codec::root_from_row(row)
}

/// Every row `sql` returns, decoded.
fn query_all<T, P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    decode: fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_error)?;
    let mut rows = stmt.query(params).map_err(db_error)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(db_error)? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// The first row `sql` returns, decoded.
fn query_first<T, P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    decode: fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_error)?;
    let mut rows = stmt.query(params).map_err(db_error)?;
    rows.next().map_err(db_error)?.map(decode).transpose()
}

fn change_from_row(row: &Row<'_>) -> Result<ChangeRecord, StoreError> {
    let kind: String = row.get("kind").map_err(db_error)?;
    Ok(ChangeRecord {
        revision: row.get("revision").map_err(db_error)?,
        kind: ChangeKind::parse(&kind),
        key: row.get("key").map_err(db_error)?,
        time_ms: row.get("time_ms").map_err(db_error)?,
    })
}

fn select_entry(conn: &Connection, id: &str) -> Result<Option<EntryRecord>, StoreError> {
    query_first(
        conn,
        &format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE id = ?1"),
        [id],
        entry_from_row,
    )
}

fn select_node(conn: &Connection, id: &str) -> Result<Option<NodeRecord>, StoreError> {
    query_first(
        conn,
        &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1"),
        [id],
        node_from_row,
    )
}

fn insert_entry(tx: &Transaction<'_>, entry: &EntryRecord) -> Result<(), StoreError> {
    let selectors = codec::encode_list(&entry.selectors);
    let inserted = tx
        .execute(
            "INSERT INTO entries (id, spiffe_id, selectors, selectors_sha256, node_selectors,
                x509_ttl_seconds, owner, purpose, expires_at, inactivity_timeout_seconds, hint,
                dns_names, revision, created_at, updated_at, activation, delegates_to, labels,
                jwt_ttl_seconds)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                ?16, ?17, ?18, ?19)
             ON CONFLICT DO NOTHING",
            rusqlite::params![
                entry.id,
                entry.spiffe_id,
                selectors,
                codec::selectors_key(&selectors),
                codec::encode_list(&entry.node_selectors),
                entry.x509_ttl_seconds,
                entry.owner,
                entry.purpose,
                entry.expires_at,
                entry.inactivity_timeout_seconds,
                entry.hint,
                codec::encode_list(&entry.dns_names),
                entry.revision,
                entry.created_at,
                entry.updated_at,
                entry.activation,
                codec::encode_list(&entry.delegates_to),
                codec::encode_list(&entry.labels),
                entry.jwt_ttl_seconds,
            ],
        )
        .map_err(db_error)?;
    if inserted == 1 {
        return Ok(());
    }
    // Nothing inserted: one of the two unique keys is taken; say which.
    if select_entry(tx, &entry.id)?.is_some() {
        Err(codec::entry_id_taken(&entry.id))
    } else {
        Err(codec::entry_identity_taken(&entry.spiffe_id))
    }
}

fn update_entry(
    tx: &Transaction<'_>,
    entry: &EntryRecord,
    expected: i64,
) -> Result<EntryRecord, StoreError> {
    // Only the SPIFFE ID and selectors can clash: the id is the one updated.
    let clash = |e: rusqlite::Error| {
        if is_unique_violation(&e) {
            codec::entry_identity_taken(&entry.spiffe_id)
        } else {
            db_error(e)
        }
    };
    let selectors = codec::encode_list(&entry.selectors);
    let mut stmt = tx
        .prepare_cached(&format!(
            "UPDATE entries SET spiffe_id = ?3, selectors = ?4, selectors_sha256 = ?5,
                node_selectors = ?6, x509_ttl_seconds = ?7, owner = ?8, purpose = ?9,
                expires_at = ?10, inactivity_timeout_seconds = ?11, hint = ?12, dns_names = ?13,
                revision = revision + 1, updated_at = ?14, activation = ?15, delegates_to = ?16,
                labels = ?17, jwt_ttl_seconds = ?18
             WHERE id = ?1 AND revision = ?2
             RETURNING {ENTRY_COLUMNS}"
        ))
        .map_err(db_error)?;
    let mut rows = stmt
        .query(rusqlite::params![
            entry.id,
            expected,
            entry.spiffe_id,
            selectors,
            codec::selectors_key(&selectors),
            codec::encode_list(&entry.node_selectors),
            entry.x509_ttl_seconds,
            entry.owner,
            entry.purpose,
            entry.expires_at,
            entry.inactivity_timeout_seconds,
            entry.hint,
            codec::encode_list(&entry.dns_names),
            entry.updated_at,
            entry.activation,
            codec::encode_list(&entry.delegates_to),
            codec::encode_list(&entry.labels),
            entry.jwt_ttl_seconds,
        ])
        .map_err(clash)?;
    if let Some(row) = rows.next().map_err(clash)? {
        return entry_from_row(row);
    }
    // Nothing matched: the entry is gone, or moved on since the caller read it.
    match select_entry(tx, &entry.id)? {
        None => Err(StoreError::NotFound {
            kind: "entry",
            id: entry.id.clone(),
        }),
        Some(stored) => Err(StoreError::RevisionConflict {
            id: entry.id.clone(),
            expected,
            actual: stored.revision,
        }),
    }
}

fn consume_token(
    tx: &Transaction<'_>,
    digest: &str,
    node_id: &str,
    now: i64,
) -> Result<Vec<String>, StoreError> {
    let labels: Option<String> = tx
        .query_row(
            "UPDATE join_tokens SET used_at = ?3, used_by = ?2
             WHERE digest = ?1 AND used_at IS NULL AND expires_at >= ?3
             RETURNING labels",
            (digest, node_id, now),
            |row| row.get(0),
        )
        .optional()
        .map_err(db_error)?;
    if let Some(labels) = labels {
        return codec::decode_list(&labels, "join token labels");
    }
    let used: Option<Option<i64>> = tx
        .query_row(
            "SELECT used_at FROM join_tokens WHERE digest = ?1",
            [digest],
            |row| row.get(0),
        )
        .optional()
        .map_err(db_error)?;
    Err(StoreError::TokenRefused(match used {
        None => TokenRefusal::Unknown,
        Some(Some(_)) => TokenRefusal::Used,
        Some(None) => TokenRefusal::Expired,
    }))
}

fn upsert_node(tx: &Transaction<'_>, node: &NodeRecord) -> Result<NodeRecord, StoreError> {
    // The WHERE of the upsert keeps a banned node as it is; then nothing is returned.
    let stored = query_first(
        tx,
        &format!(
            "INSERT INTO nodes ({NODE_COLUMNS})
             VALUES (?1, ?2, ?3, 'active', ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (id) DO UPDATE SET attestation = excluded.attestation,
                selectors = excluded.selectors, status = 'active',
                attested_at = excluded.attested_at, last_seen = excluded.last_seen,
                svid_serial = excluded.svid_serial, svid_not_after = excluded.svid_not_after,
                ca_serial = excluded.ca_serial, ca_not_after = excluded.ca_not_after
             WHERE nodes.status <> 'banned'
             RETURNING {NODE_COLUMNS}"
        ),
        rusqlite::params![
            node.id,
            node.attestation,
            codec::encode_list(&node.selectors),
            node.attested_at,
            node.last_seen,
            node.svid_serial,
            node.svid_not_after,
            node.ca_serial,
            node.ca_not_after,
        ],
        node_from_row,
    )?;
    stored.ok_or_else(|| StoreError::NodeNotActive {
        id: node.id.clone(),
        status: NodeStatus::Banned,
    })
}

/// The error for a conditional node update that matched nothing: the node is unknown, or in
/// the wrong state.
fn node_refusal(tx: &Transaction<'_>, id: &str) -> StoreError {
    match select_node(tx, id) {
        Ok(None) => StoreError::NotFound {
            kind: "node",
            id: id.to_owned(),
        },
        Ok(Some(node)) => StoreError::NodeNotActive {
            id: id.to_owned(),
            status: node.status,
        },
        Err(e) => e,
    }
}

fn renew(
    tx: &Transaction<'_>,
    id: &str,
    credentials: &NodeCredentialsRecord,
    now: i64,
) -> Result<NodeRecord, StoreError> {
    let stored = query_first(
        tx,
        &format!(
            "UPDATE nodes SET svid_serial = ?2, svid_not_after = ?3, ca_serial = ?4,
                ca_not_after = ?5, last_seen = ?6
             WHERE id = ?1 AND status = 'active'
             RETURNING {NODE_COLUMNS}"
        ),
        rusqlite::params![
            id,
            credentials.svid_serial,
            credentials.svid_not_after,
            credentials.ca_serial,
            credentials.ca_not_after,
            now,
        ],
        node_from_row,
    )?;
    stored.ok_or_else(|| node_refusal(tx, id))
}

fn set_status(
    tx: &Transaction<'_>,
    id: &str,
    status: NodeStatus,
) -> Result<NodeRecord, StoreError> {
    // Banned is final: only a ban may be applied to a banned node.
    let stored = query_first(
        tx,
        &format!(
            "UPDATE nodes SET status = ?2
             WHERE id = ?1 AND (status <> 'banned' OR ?2 = 'banned')
             RETURNING {NODE_COLUMNS}"
        ),
        (id, status.as_str()),
        node_from_row,
    )?;
    stored.ok_or_else(|| node_refusal(tx, id))
}

fn upsert_root(tx: &Transaction<'_>, root: &BundleRoot) -> Result<bool, StoreError> {
    // Returns a row only when the root is new or its not-after moved: only then did the
    // bundle change.
    let changed = tx
        .query_row(
            "INSERT INTO bundle_roots (server_id, der_sha256, der, not_after)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (server_id, der_sha256) DO UPDATE SET not_after = excluded.not_after
             WHERE bundle_roots.not_after <> excluded.not_after
             RETURNING 1",
            rusqlite::params![
                root.server_id,
                codec::sha256_hex(&root.der),
                root.der,
                root.not_after
            ],
            |_| Ok(()),
        )
        .optional()
        .map_err(db_error)?;
    Ok(changed.is_some())
}

fn jwt_key_from_row(row: &Row<'_>) -> Result<JwtKeyRecord, StoreError> {
    codec::jwt_key_from_row(row)
}

fn jwt_from_row(row: &Row<'_>) -> Result<JwtRecord, StoreError> {
    codec::jwt_from_row(row)
}

fn policy_from_row(row: &Row<'_>) -> Result<PolicyRecord, StoreError> {
    codec::policy_from_row(row)
}

/// The current policy version.
fn select_policy(conn: &Connection) -> Result<Option<PolicyRecord>, StoreError> {
    Ok(query_all(
        conn,
        &format!(
            "SELECT {} FROM policies ORDER BY version DESC LIMIT 1",
            codec::POLICY_COLUMNS
        ),
        [],
        policy_from_row,
    )?
    .pop())
}

fn task_from_row(row: &Row<'_>) -> Result<TaskRecord, StoreError> {
    codec::task_from_row(row)
}

/// Tasks, live ones only when `live_only`, ordered by start (unknown starts last), then id.
fn select_tasks(conn: &Connection, live_only: bool) -> Result<Vec<TaskRecord>, StoreError> {
    let filter = if live_only {
        "WHERE ended_ms IS NULL"
    } else {
        ""
    };
    query_all(
        conn,
        &format!(
            "SELECT {} FROM tasks {filter}
             ORDER BY started_ms IS NULL, started_ms, task_id",
            events::TASK_COLUMNS
        ),
        [],
        task_from_row,
    )
}

fn event_from_row(row: &Row<'_>) -> Result<StoredEvent, StoreError> {
    codec::event_from_row(row)
}

fn svid_from_row(row: &Row<'_>) -> Result<SvidRecord, StoreError> {
    codec::svid_from_row(row)
}

fn entry_activity_from_row(row: &Row<'_>) -> Result<EntryActivity, StoreError> {
    codec::entry_activity_from_row(row)
}

fn node_activity_from_row(row: &Row<'_>) -> Result<NodeActivity, StoreError> {
    codec::node_activity_from_row(row)
}

/// The nodes owning the records of kind `owned` that `batch` is about, by key.
fn owners_of(
    tx: &Transaction<'_>,
    owned: events::Owned,
    batch: &[EventRecord],
) -> Result<std::collections::HashMap<String, String>, StoreError> {
    let (table, key) = owned.table_and_key();
    let mut lookup = tx
        .prepare_cached(&format!("SELECT node_id FROM {table} WHERE {key} = ?1"))
        .map_err(db_error)?;
    let mut owners = std::collections::HashMap::new();
    for key in owned.keys(batch) {
        let node: Option<String> = lookup
            .query_row([&key], |row| row.get(0))
            .optional()
            .map_err(db_error)?;
        if let Some(node) = node {
            owners.insert(key, node);
        }
    }
    Ok(owners)
}

/// Runs `work` in one `IMMEDIATE` transaction, committed when it succeeds.
fn immediate<T>(
    conn: &mut Connection,
    work: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_error)?;
    let value = work(&tx)?;
    tx.commit().map_err(db_error)?;
    Ok(value)
}

fn lock_pending(
    pending: &Mutex<Vec<PendingBatch>>,
) -> std::sync::MutexGuard<'_, Vec<PendingBatch>> {
    // A list of waiting batches holds no invariant a panic could break.
    pending
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes `batches` in one transaction and tells each caller its outcome. When any of them
/// fails, none is kept and each is written again in a transaction of its own, so a bad batch
/// fails alone.
fn write_event_batches(conn: &mut Connection, batches: Vec<PendingBatch>) {
    if batches.is_empty() {
        return;
    }
    let together = immediate(conn, |tx| {
        batches
            .iter()
            .map(|batch| insert_events(tx, &batch.events))
            .collect::<Result<Vec<_>, _>>()
    });
    match together {
        Ok(outcomes) => {
            for (batch, outcome) in batches.into_iter().zip(outcomes) {
                let _ = batch.outcome.send(Ok(outcome));
            }
        }
        Err(_) if batches.len() > 1 => {
            for batch in batches {
                let alone = immediate(conn, |tx| insert_events(tx, &batch.events));
                let _ = batch.outcome.send(alone);
            }
        }
        Err(e) => {
            if let Some(batch) = batches.into_iter().next() {
                let _ = batch.outcome.send(Err(e));
            }
        }
    }
}

/// Stores the batch; the number of events new, and whether one revoked a JWT-SVID.
fn insert_events(tx: &Transaction<'_>, batch: &[EventRecord]) -> Result<(usize, bool), StoreError> {
    let mut holders = std::collections::HashMap::new();
    for owned in events::Owned::ALL {
        let owners = owners_of(tx, owned, batch)?;
        owned.check(batch, &owners)?;
        if owned == events::Owned::Jwt {
            holders = owners;
        }
    }
    let mut insert = tx
        .prepare_cached(&format!(
            "INSERT INTO events ({EVENT_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)
             ON CONFLICT (id) DO NOTHING"
        ))
        .map_err(db_error)?;
    let mut new = Vec::with_capacity(batch.len());
    for event in batch {
        let (pid, uid, gid, exe_path, exe_sha256, unit) =
            events::caller_columns(event.caller.as_ref());
        let inserted = insert
            .execute(rusqlite::params![
                event.id,
                event.kind,
                event.time_ms,
                event.node_id,
                event.entry_id,
                event.spiffe_id,
                event.serial,
                event.not_after,
                event.reason,
                pid,
                uid,
                gid,
                exe_path,
                exe_sha256,
                unit,
                event.first_ms,
                event.last_ms,
                event.count,
                event.detail,
                event.received_ms,
                codec::encode_event_task(event.task.as_ref()),
                event.policy_version,
                codec::encode_policies(&event.policies),
                (!event.jti.is_empty()).then_some(&event.jti),
                codec::encode_audience(&event.audience),
            ])
            .map_err(db_error)?;
        if inserted == 1 {
            new.push(event);
        }
    }
    let changes = InventoryChanges::of_known(new.iter().copied(), &holders);
    apply_inventory_changes(tx, &changes)?;
    Ok((new.len(), changes.jwt_revoked))
}

fn apply_inventory_changes(
    tx: &Transaction<'_>,
    changes: &InventoryChanges,
) -> Result<(), StoreError> {
    let mut svid = tx
        .prepare_cached(&format!(
            "INSERT INTO svids ({SVID_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT (serial) DO UPDATE SET {}",
            events::SVID_MERGE
        ))
        .map_err(db_error)?;
    for s in &changes.svids {
        svid.execute(rusqlite::params![
            s.serial,
            s.entry_id,
            s.spiffe_id,
            s.node_id,
            s.issued_ms,
            s.not_after,
            s.revoked_ms,
            s.reason,
            s.last_used_ms,
            s.uses,
        ])
        .map_err(db_error)?;
    }
    let mut entry = tx
        .prepare_cached(&format!(
            "INSERT INTO entry_activity (entry_id, last_issued_ms, last_used_ms)
             VALUES (?1, ?2, ?3)
             ON CONFLICT (entry_id) DO UPDATE SET {}",
            events::ENTRY_ACTIVITY_MERGE
        ))
        .map_err(db_error)?;
    for e in &changes.entries {
        entry
            .execute((&e.entry_id, e.last_issued_ms, e.last_used_ms))
            .map_err(db_error)?;
    }
    let mut node = tx
        .prepare_cached(&format!(
            "INSERT INTO node_activity (node_id, last_event_ms) VALUES (?1, ?2)
             ON CONFLICT (node_id) DO UPDATE SET {}",
            events::NODE_ACTIVITY_MERGE
        ))
        .map_err(db_error)?;
    for n in &changes.nodes {
        node.execute((&n.node_id, n.last_event_ms))
            .map_err(db_error)?;
    }
    let mut task = tx
        .prepare_cached(&format!(
            "INSERT INTO tasks ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12,
                ?13, ?14, NULL, NULL, '')
             ON CONFLICT (task_id) DO UPDATE SET {}",
            events::TASK_COLUMNS,
            events::TASK_MERGE
        ))
        .map_err(db_error)?;
    let mut jwt = tx
        .prepare_cached(&format!(
            "INSERT INTO jwts ({JWT_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (jti) DO UPDATE SET {JWT_MERGE}"
        ))
        .map_err(db_error)?;
    for j in &changes.jwts {
        jwt.execute(rusqlite::params![
            j.jti,
            j.entry_id,
            j.spiffe_id,
            j.node_id,
            j.task_id,
            codec::encode_list(&j.audience),
            j.issued_ms,
            j.expires_at,
            j.revoked_ms,
            j.reason,
            j.last_used_ms,
            j.uses,
        ])
        .map_err(db_error)?;
    }
    for t in &changes.tasks {
        task.execute(rusqlite::params![
            t.task_id,
            t.node_id,
            t.entry_id,
            t.spiffe_id,
            t.parent_id,
            codec::encode_chain(&t.chain),
            t.purpose,
            t.owner,
            t.pid,
            t.starter_uid,
            t.started_ms,
            t.deadline,
            t.ended_ms,
            t.end_reason,
        ])
        .map_err(db_error)?;
    }
    Ok(())
}

/// The events matching `filter`: its conditions become a `WHERE` clause with one parameter
/// each.
fn select_events(conn: &Connection, filter: &EventFilter) -> Result<Vec<StoredEvent>, StoreError> {
    use rusqlite::types::Value;
    let mut conditions: Vec<String> = Vec::new();
    let mut params: Vec<Value> = Vec::new();
    let mut condition = |sql: &str, value: Value| {
        params.push(value);
        conditions.push(format!("{sql} ?{}", params.len()));
    };
    if let Some(since) = filter.since_ms {
        condition("time_ms >=", since.into());
    }
    if let Some(until) = filter.until_ms {
        condition("time_ms <", until.into());
    }
    for (column, value) in [
        ("spiffe_id", &filter.spiffe_id),
        ("entry_id", &filter.entry_id),
        ("node_id", &filter.node_id),
        ("serial", &filter.serial),
    ] {
        if let Some(value) = value {
            condition(&format!("{column} ="), value.clone().into());
        }
    }
    if let Some(after) = filter.after_seq {
        condition("seq >", after.into());
    }
    if !filter.kinds.is_empty() {
        let first = params.len() + 1;
        params.extend(filter.kinds.iter().cloned().map(Value::from));
        let placeholders: Vec<String> = (first..=params.len()).map(|i| format!("?{i}")).collect();
        conditions.push(format!("kind IN ({})", placeholders.join(", ")));
    }
    params.push(events::limit(filter).into());
    let sql = format!(
        "SELECT seq, {EVENT_COLUMNS} FROM events {} {} ORDER BY {} LIMIT ?{}",
        if conditions.is_empty() { "" } else { "WHERE" },
        conditions.join(" AND "),
        filter.order.sql(),
        params.len()
    );
    query_all(
        conn,
        &sql,
        rusqlite::params_from_iter(params),
        event_from_row,
    )
}

/// Deletes one chunk of prunable events; returns how many.
fn prune_event_chunk(
    tx: &Transaction<'_>,
    older_than_ms: i64,
    now: i64,
) -> Result<u64, StoreError> {
    let deleted = tx
        .execute(
            "DELETE FROM events WHERE seq IN (
                SELECT seq FROM events AS e
                WHERE e.time_ms < ?1 AND (e.not_after IS NULL OR e.not_after < ?2)
                    AND NOT EXISTS (
                        SELECT 1 FROM svids AS s WHERE s.serial = e.serial AND s.not_after >= ?2
                    )
                LIMIT ?3
            )",
            (older_than_ms, now, events::PRUNE_CHUNK),
        )
        .map_err(db_error)?;
    Ok(deleted as u64)
}

/// Deletes the inventory rows that pruning leaves behind.
fn prune_inventory(tx: &Transaction<'_>, older_than_ms: i64) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM svids
         WHERE not_after < ?2
            OR (not_after IS NULL
                AND (issued_ms IS NULL OR issued_ms < ?1)
                AND (revoked_ms IS NULL OR revoked_ms < ?1)
                AND (last_used_ms IS NULL OR last_used_ms < ?1))",
        (older_than_ms, events::seconds_before(older_than_ms)),
    )
    .map_err(db_error)?;
    tx.execute(
        "DELETE FROM jwts
         WHERE expires_at < ?2
            OR (expires_at IS NULL
                AND (issued_ms IS NULL OR issued_ms < ?1)
                AND (revoked_ms IS NULL OR revoked_ms < ?1)
                AND (last_used_ms IS NULL OR last_used_ms < ?1))",
        (older_than_ms, events::seconds_before(older_than_ms)),
    )
    .map_err(db_error)?;
    tx.execute(
        "DELETE FROM jwt_keys WHERE not_after < ?1",
        [events::seconds_before(older_than_ms)],
    )
    .map_err(db_error)?;
    tx.execute(
        "DELETE FROM entry_activity
         WHERE NOT EXISTS (SELECT 1 FROM entries WHERE entries.id = entry_activity.entry_id)
            AND (last_issued_ms IS NULL OR last_issued_ms < ?1)
            AND (last_used_ms IS NULL OR last_used_ms < ?1)",
        [older_than_ms],
    )
    .map_err(db_error)?;
    tx.execute(
        "DELETE FROM node_activity
         WHERE NOT EXISTS (SELECT 1 FROM nodes WHERE nodes.id = node_activity.node_id)
            AND last_event_ms < ?1",
        [older_than_ms],
    )
    .map_err(db_error)?;
    Ok(())
}

#[async_trait::async_trait]
impl Datastore for SqliteStore {
    async fn create_entry(&self, entry: EntryRecord, now: i64) -> Result<EntryRecord, StoreError> {
        let entry = codec::new_entry(entry, now);
        let stored = entry.clone();
        self.write(move |tx| insert_entry(tx, &entry)).await?;
        self.bump();
        Ok(stored)
    }

    async fn update_entry(&self, entry: EntryRecord, now: i64) -> Result<EntryRecord, StoreError> {
        let expected = entry.revision;
        let entry = codec::updated_entry(entry, now);
        let stored = self
            .write(move |tx| update_entry(tx, &entry, expected))
            .await?;
        self.bump();
        Ok(stored)
    }

    async fn delete_entry(&self, id: &str) -> Result<EntryRecord, StoreError> {
        let id = id.to_owned();
        let deleted = self
            .write(move |tx| {
                query_first(
                    tx,
                    &format!("DELETE FROM entries WHERE id = ?1 RETURNING {ENTRY_COLUMNS}"),
                    [&id],
                    entry_from_row,
                )?
                .ok_or(StoreError::NotFound { kind: "entry", id })
            })
            .await?;
        self.bump();
        Ok(deleted)
    }

    async fn get_entry(&self, id: &str) -> Result<Option<EntryRecord>, StoreError> {
        let id = id.to_owned();
        self.run(move |conn| select_entry(conn, &id)).await
    }

    async fn list_entries(&self) -> Result<Vec<EntryRecord>, StoreError> {
        self.run(|conn| {
            query_all(
                conn,
                &format!("SELECT {ENTRY_COLUMNS} FROM entries ORDER BY created_at, id"),
                [],
                entry_from_row,
            )
        })
        .await
    }

    async fn create_join_token(&self, token: JoinTokenRecord) -> Result<(), StoreError> {
        self.write(move |tx| {
            let inserted = tx
                .execute(
                    "INSERT INTO join_tokens (digest, expires_at, labels, created_at)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT DO NOTHING",
                    (
                        &token.digest,
                        token.expires_at,
                        codec::encode_list(&token.labels),
                        token.created_at,
                    ),
                )
                .map_err(db_error)?;
            if inserted == 0 {
                return Err(codec::join_token_taken());
            }
            Ok(())
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
            .write(move |tx| {
                let labels = consume_token(tx, &digest, &node.id, now)?;
                upsert_node(tx, &codec::joined_node(node, &labels))
            })
            .await?;
        self.bump();
        Ok(stored)
    }

    async fn attest_node(&self, node: NodeRecord) -> Result<NodeRecord, StoreError> {
        let node = codec::attested_node(node);
        let stored = self.write(move |tx| upsert_node(tx, &node)).await?;
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
        self.write(move |tx| renew(tx, &id, &credentials, now))
            .await
    }

    async fn touch_node(&self, id: &str, now: i64) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |tx| {
            let touched = tx
                .execute("UPDATE nodes SET last_seen = ?2 WHERE id = ?1", (&id, now))
                .map_err(db_error)?;
            if touched == 0 {
                return Err(StoreError::NotFound { kind: "node", id });
            }
            Ok(())
        })
        .await
    }

    async fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let id = id.to_owned();
        self.run(move |conn| select_node(conn, &id)).await
    }

    async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.run(|conn| {
            query_all(
                conn,
                &format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY id"),
                [],
                node_from_row,
            )
        })
        .await
    }

    async fn set_node_status(
        &self,
        id: &str,
        status: NodeStatus,
    ) -> Result<NodeRecord, StoreError> {
        let id = id.to_owned();
        let stored = self.write(move |tx| set_status(tx, &id, status)).await?;
        self.bump();
        Ok(stored)
    }

    async fn publish_root(&self, root: BundleRoot) -> Result<(), StoreError> {
        if self.write(move |tx| upsert_root(tx, &root)).await? {
            self.bump();
        }
        Ok(())
    }

    async fn bundle(&self, now: i64) -> Result<Vec<BundleRoot>, StoreError> {
        self.run(move |conn| {
            query_all(
                conn,
                "SELECT server_id, der, not_after FROM bundle_roots
                 WHERE not_after >= ?1
                 ORDER BY server_id, not_after, der_sha256",
                [now],
                root_from_row,
            )
        })
        .await
    }

    async fn publish_jwt_key(&self, key: JwtKeyRecord) -> Result<(), StoreError> {
        let changed = self
            .write(move |tx| {
                let changed = tx
                    .query_row(
                        "INSERT INTO jwt_keys (server_id, kid, jwk, active_from, not_after)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (server_id, kid) DO UPDATE
                            SET active_from = excluded.active_from, not_after = excluded.not_after
                         WHERE jwt_keys.active_from <> excluded.active_from
                            OR jwt_keys.not_after <> excluded.not_after
                         RETURNING 1",
                        rusqlite::params![
                            key.server_id,
                            key.kid,
                            key.jwk,
                            key.active_from,
                            key.not_after
                        ],
                        |_| Ok(()),
                    )
                    .optional()
                    .map_err(db_error)?;
                Ok(changed.is_some())
            })
            .await?;
        if changed {
            self.bump();
        }
        Ok(())
    }

    async fn jwt_keys(&self, now: i64) -> Result<Vec<JwtKeyRecord>, StoreError> {
        self.run(move |conn| {
            query_all(
                conn,
                "SELECT server_id, kid, jwk, active_from, not_after FROM jwt_keys
                 WHERE not_after >= ?1 ORDER BY server_id, active_from, kid",
                [now],
                jwt_key_from_row,
            )
        })
        .await
    }

    async fn jwts(&self, filter: JwtFilter) -> Result<Vec<JwtRecord>, StoreError> {
        self.run(move |conn| {
            let (sql, values) = events::jwts_query(&filter, |i| format!("?{i}"));
            let params: Vec<Box<dyn rusqlite::ToSql>> = values
                .into_iter()
                .map(|v| -> Box<dyn rusqlite::ToSql> {
                    match v {
                        events::QueryValue::Text(t) => Box::new(t),
                        events::QueryValue::Int(n) => Box::new(n),
                    }
                })
                .collect();
            query_all(conn, &sql, rusqlite::params_from_iter(params), jwt_from_row)
        })
        .await
    }

    async fn jwt(&self, jti: &str) -> Result<Option<JwtRecord>, StoreError> {
        let jti = jti.to_owned();
        self.run(move |conn| {
            query_first(
                conn,
                &format!("SELECT {JWT_COLUMNS} FROM jwts WHERE jti = ?1"),
                [jti],
                jwt_from_row,
            )
        })
        .await
    }

    async fn jwt_revocations(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.run(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT jti, expires_at FROM jwts
                     WHERE revoked_ms IS NOT NULL AND expires_at > ?1 ORDER BY jti",
                )
                .map_err(db_error)?;
            let rows = stmt
                .query_map([now], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(db_error)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_error)
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
        self.run(move |conn| {
            query_all(
                conn,
                "SELECT revision, kind, key, time_ms FROM changes WHERE revision > ?1 \
                 ORDER BY revision LIMIT ?2",
                (revision, limit),
                change_from_row,
            )
        })
        .await
    }

    async fn recent_changes(&self, limit: usize) -> Result<Vec<ChangeRecord>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |conn| {
            let mut newest_first = query_all(
                conn,
                "SELECT revision, kind, key, time_ms FROM changes \
                 ORDER BY revision DESC LIMIT ?1",
                [limit],
                change_from_row,
            )?;
            newest_first.reverse();
            Ok(newest_first)
        })
        .await
    }

    async fn last_revision(&self) -> Result<i64, StoreError> {
        self.run(|conn| {
            conn.query_row(
                "SELECT COALESCE(MAX(revision), 0) FROM changes",
                [],
                |row| row.get(0),
            )
            .map_err(db_error)
        })
        .await
    }

    async fn entries_by_id(&self, ids: &[String]) -> Result<Vec<EntryRecord>, StoreError> {
        let ids =
            serde_json::to_string(ids).map_err(|e| StoreError::corrupt_from("entry ids", e))?;
        self.run(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {ENTRY_COLUMNS} FROM entries \
                     WHERE id IN (SELECT value FROM json_each(?1))"
                ),
                [ids],
                entry_from_row,
            )
        })
        .await
    }

    async fn nodes_by_id(&self, ids: &[String]) -> Result<Vec<NodeRecord>, StoreError> {
        let ids =
            serde_json::to_string(ids).map_err(|e| StoreError::corrupt_from("node ids", e))?;
        self.run(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {NODE_COLUMNS} FROM nodes WHERE id IN (SELECT value FROM json_each(?1))"
                ),
                [ids],
                node_from_row,
            )
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
        // Batches that arrive while another is being written wait together, and whoever gets
        // the connection next writes them all in one transaction: one commit (one WAL fsync)
        // for many nodes' uploads.
        let (outcome, answer) = tokio::sync::oneshot::channel();
        lock_pending(&self.pending_events).push(PendingBatch {
            events: unique,
            outcome,
        });
        let pending = self.pending_events.clone();
        self.run(move |conn| {
            let batches = std::mem::take(&mut *lock_pending(&pending));
            write_event_batches(conn, batches);
            Ok(())
        })
        .await?;
        let (stored, jwt_revoked) = answer.await.map_err(|e| {
            StoreError::unavailable_from("the batch was dropped before it was written", e)
        })??;
        if stored > 0 {
            self.bump_events();
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
        self.run(move |conn| select_events(conn, &filter)).await
    }

    async fn svids(
        &self,
        entry_id: Option<&str>,
        node_id: Option<&str>,
    ) -> Result<Vec<SvidRecord>, StoreError> {
        let sql = events::svids_query(entry_id.is_some(), node_id.is_some(), |i| format!("?{i}"));
        let params: Vec<String> = entry_id
            .into_iter()
            .chain(node_id)
            .map(str::to_owned)
            .collect();
        self.run(move |conn| {
            query_all(
                conn,
                &sql,
                rusqlite::params_from_iter(params),
                svid_from_row,
            )
        })
        .await
    }

    async fn entry_activity(&self) -> Result<Vec<EntryActivity>, StoreError> {
        self.run(|conn| {
            query_all(
                conn,
                "SELECT entry_id, last_issued_ms, last_used_ms FROM entry_activity
                 ORDER BY entry_id",
                [],
                entry_activity_from_row,
            )
        })
        .await
    }

    async fn node_activity(&self) -> Result<Vec<NodeActivity>, StoreError> {
        self.run(|conn| {
            query_all(
                conn,
                "SELECT node_id, last_event_ms FROM node_activity ORDER BY node_id",
                [],
                node_activity_from_row,
            )
        })
        .await
    }

    async fn prune_events(&self, older_than_ms: i64, now: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let chunk = self
                .write(move |tx| prune_event_chunk(tx, older_than_ms, now))
                .await?;
            deleted += chunk;
            if chunk < events::PRUNE_CHUNK as u64 {
                break;
            }
        }
        self.write(move |tx| prune_inventory(tx, older_than_ms))
            .await?;
        let changes_before = events::change_log_horizon(older_than_ms, now);
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM changes WHERE time_ms < ?1
                    AND revision < (SELECT MAX(revision) FROM changes)",
                [changes_before],
            )
            .map_err(db_error)
        })
        .await?;
        Ok(deleted)
    }

    fn events_appended(&self) -> watch::Receiver<u64> {
        self.events.subscribe()
    }

    async fn svid(&self, serial: &str) -> Result<Option<SvidRecord>, StoreError> {
        let serial = serial.to_owned();
        self.run(move |conn| {
            let found = query_all(
                conn,
                &format!("SELECT {SVID_COLUMNS} FROM svids WHERE serial = ?1"),
                [serial],
                svid_from_row,
            )?;
            Ok(found.into_iter().next())
        })
        .await
    }

    async fn record_node_ca(&self, ca: NodeCaRecord) -> Result<(), StoreError> {
        self.write(move |tx| {
            tx.execute(
                &format!(
                    "INSERT INTO node_cas ({}) VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (serial) DO NOTHING",
                    codec::NODE_CA_COLUMNS
                ),
                (
                    &ca.serial,
                    &ca.node_id,
                    &ca.server_id,
                    &ca.der,
                    ca.not_after,
                ),
            )
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn node_cas(
        &self,
        node_id: Option<&str>,
        now: i64,
    ) -> Result<Vec<NodeCaRecord>, StoreError> {
        let node_id = node_id.map(str::to_owned);
        self.run(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {} FROM node_cas WHERE not_after > ?1 \
                     AND (?2 IS NULL OR node_id = ?2) ORDER BY node_id, not_after, serial",
                    codec::NODE_CA_COLUMNS
                ),
                (now, node_id),
                node_ca_from_row,
            )
        })
        .await
    }

    async fn revoke(&self, records: Vec<RevocationRecord>) -> Result<Vec<String>, StoreError> {
        let revoked = self
            .write(move |tx| {
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "INSERT INTO revocations ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                         ON CONFLICT (serial) DO NOTHING",
                        codec::REVOCATION_COLUMNS
                    ))
                    .map_err(db_error)?;
                let mut revoked = Vec::new();
                for r in &records {
                    let inserted = stmt
                        .execute((
                            &r.serial,
                            &r.node_id,
                            &r.root_server_id,
                            r.not_after,
                            &r.reason,
                            &r.detail,
                            r.revoked_ms,
                        ))
                        .map_err(db_error)?;
                    if inserted > 0 {
                        revoked.push(r.serial.clone());
                    }
                }
                Ok(revoked)
            })
            .await?;
        if !revoked.is_empty() {
            self.bump();
        }
        Ok(revoked)
    }

    async fn revocations(&self, now: i64) -> Result<Vec<RevocationRecord>, StoreError> {
        self.run(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {} FROM revocations WHERE not_after > ?1 ORDER BY serial",
                    codec::REVOCATION_COLUMNS
                ),
                [now],
                revocation_from_row,
            )
        })
        .await
    }

    async fn put_crl(&self, crl: CrlRecord) -> Result<bool, StoreError> {
        let stored = self
            .write(move |tx| {
                let changed = tx
                    .execute(
                        &format!(
                            "INSERT INTO crls ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                             ON CONFLICT (issuer) DO UPDATE SET publisher = excluded.publisher, \
                             number = excluded.number, next_update = excluded.next_update, \
                             until = excluded.until, revoked = excluded.revoked, der = excluded.der \
                             WHERE excluded.number > crls.number",
                            codec::CRL_COLUMNS
                        ),
                        (
                            &crl.issuer,
                            &crl.publisher,
                            crl.number,
                            crl.next_update,
                            crl.until,
                            crl.revoked,
                            &crl.der,
                        ),
                    )
                    .map_err(db_error)?;
                Ok(changed > 0)
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
            .write(move |tx| {
                let sql = codec::dormant_sql(|i| format!("?{i}"));
                Ok(tx.execute(&sql, (&entry_id, since_ms)).map_err(db_error)? > 0)
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
            .write(move |tx| {
                let was: Option<Option<i64>> = tx
                    .query_row(
                        "SELECT dormant_since_ms FROM entry_standing WHERE entry_id = ?1",
                        [&entry_id],
                        |row| row.get(0),
                    )
                    .optional()
                    .map_err(db_error)?;
                let sql = codec::activate_sql(|i| format!("?{i}"));
                tx.execute(&sql, (&entry_id, now_ms)).map_err(db_error)?;
                Ok(was.flatten().is_some())
            })
            .await?;
        self.bump();
        Ok(was_dormant)
    }

    async fn entry_standings(&self) -> Result<Vec<EntryStanding>, StoreError> {
        self.run(move |conn| {
            query_all(
                conn,
                "SELECT entry_id, dormant_since_ms, activated_ms FROM entry_standing ORDER BY entry_id",
                [],
                entry_standing_from_row,
            )
        })
        .await
    }

    async fn set_policy(&self, text: &str, now_ms: i64) -> Result<PolicyRecord, StoreError> {
        let text = text.to_owned();
        let (record, changed) = self
            .write(move |tx| {
                let current = select_policy(tx)?;
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
                tx.execute(
                    "INSERT INTO policies (version, text, sha256, set_ms) VALUES (?1, ?2, ?3, ?4)",
                    (record.version, &record.text, &record.sha256, record.set_ms),
                )
                .map_err(db_error)?;
                Ok((record, true))
            })
            .await?;
        if changed {
            self.bump();
        }
        Ok(record)
    }

    async fn policy(&self) -> Result<Option<PolicyRecord>, StoreError> {
        self.run(|conn| select_policy(conn)).await
    }

    async fn policy_history(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        self.run(|conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {} FROM policies ORDER BY version",
                    codec::POLICY_COLUMNS
                ),
                [],
                policy_from_row,
            )
        })
        .await
    }

    async fn tasks(&self, live_only: bool) -> Result<Vec<TaskRecord>, StoreError> {
        self.run(move |conn| select_tasks(conn, live_only)).await
    }

    async fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let task_id = task_id.to_owned();
        self.run(move |conn| {
            let mut found = query_all(
                conn,
                &format!(
                    "SELECT {} FROM tasks WHERE task_id = ?1",
                    events::TASK_COLUMNS
                ),
                [&task_id],
                task_from_row,
            )?;
            Ok(found.pop())
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
            .write(move |tx| {
                let known: Option<i64> = tx
                    .query_row("SELECT 1 FROM tasks WHERE task_id = ?1", [&task_id], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(db_error)?;
                if known.is_none() {
                    return Err(StoreError::NotFound {
                        kind: "task",
                        id: task_id,
                    });
                }
                let sql = codec::order_task_sql(|i| format!("?{i}"));
                let mut ordered = Vec::new();
                for mut task in codec::task_and_descendants(select_tasks(tx, true)?, &task_id) {
                    if tx
                        .execute(&sql, (&task.task_id, now_ms, &reason, &detail))
                        .map_err(db_error)?
                        > 0
                    {
                        task.end_ordered_ms = Some(now_ms);
                        task.end_order_reason = Some(reason.clone());
                        task.end_order_detail = detail.clone();
                        ordered.push(task);
                    }
                }
                Ok(ordered)
            })
            .await?;
        if !ordered.is_empty() {
            self.bump();
        }
        Ok(ordered)
    }

    async fn crls(&self, now: i64) -> Result<Vec<CrlRecord>, StoreError> {
        self.run(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {} FROM crls WHERE until > ?1 ORDER BY issuer",
                    codec::CRL_COLUMNS
                ),
                [now],
                crl_from_row,
            )
        })
        .await
    }
}

fn entry_standing_from_row(row: &Row<'_>) -> Result<EntryStanding, StoreError> {
    codec::entry_standing_from_row(row)
}

fn node_ca_from_row(row: &Row<'_>) -> Result<NodeCaRecord, StoreError> {
    codec::node_ca_from_row(row)
}

fn revocation_from_row(row: &Row<'_>) -> Result<RevocationRecord, StoreError> {
    codec::revocation_from_row(row)
}

fn crl_from_row(row: &Row<'_>) -> Result<CrlRecord, StoreError> {
    codec::crl_from_row(row)
}
