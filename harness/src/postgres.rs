//! Scratch PostgreSQL databases for the datastore suite, the replica tests and the benchmark's
//! ingest scenario, on the server named by `TESSERA_TEST_POSTGRES`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::{Client, Config, NoTls};

/// How long connecting to the test server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates an empty database for one test on the server named by `TESSERA_TEST_POSTGRES` (a
/// libpq connection string for a role that may create databases, e.g.
/// `host=/var/run/postgresql user=postgres dbname=postgres`) and returns the connection string
/// for it. Without the variable: `None` after a loud notice, or a panic in CI, where PostgreSQL
/// is mandatory.
///
/// # Panics
///
/// In CI without the variable, and whenever the server refuses.
pub async fn scratch_database_from_env() -> Option<String> {
    let admin = test_server_from_env()?;
    let mut suffix = [0u8; 6];
    aws_lc_rs::rand::fill(&mut suffix).expect("the system random generator failed");
    // The creation time in the name lets a clean-up drop what failed runs left behind.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = format!("tessera_test_{now}_{}", hex::encode(suffix));
    let client = admin_client(&admin).await;
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {}", describe(&e)));
    Some(with_dbname(&admin, &name))
}

/// Drops a database made by [`scratch_database_from_env`], best effort (a failure is only
/// reported): tests call it when they pass.
pub async fn drop_scratch_database(conninfo: &str) {
    let Some(admin) = test_server_from_env() else {
        return;
    };
    let name = conninfo
        .parse::<Config>()
        .ok()
        .and_then(|c| c.get_dbname().map(str::to_owned));
    // Never anything but a scratch database, whatever the caller passed.
    let Some(name) = name.filter(|n| {
        n.starts_with("tessera_test_") && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    }) else {
        eprintln!("not dropping {conninfo:?}: not a scratch database");
        return;
    };
    let client = admin_client(&admin).await;
    if let Err(e) = client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
    {
        eprintln!("could not drop test database {name}: {}", describe(&e));
    }
}

/// The test server's connection string, or `None` (outside CI) when there is none.
pub fn test_server_from_env() -> Option<String> {
    match std::env::var("TESSERA_TEST_POSTGRES") {
        Ok(conninfo) if !conninfo.trim().is_empty() => Some(conninfo),
        _ => {
            assert!(
                !crate::in_ci(),
                "PostgreSQL is mandatory in CI: set TESSERA_TEST_POSTGRES to a libpq connection \
                 string for a role that may create databases, e.g. \
                 TESSERA_TEST_POSTGRES='host=/var/run/postgresql user=root dbname=postgres' \
                 (scripts/test.sh sets up a local server and exports it)"
            );
            eprintln!(
                "\n*** PostgreSQL datastore tests NOT RUN: TESSERA_TEST_POSTGRES is not set \
                 (scripts/test.sh sets it up) ***\n"
            );
            None
        }
    }
}

/// A client of the test server named by `conninfo`, for set-up that needs its administrator.
pub async fn admin_client(conninfo: &str) -> Client {
    let mut config: Config = conninfo
        .parse()
        .unwrap_or_else(|e| panic!("TESSERA_TEST_POSTGRES is not a connection string: {e}"));
    if config.get_dbname().is_none() {
        config.dbname("postgres");
    }
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls))
        .await
        .unwrap_or_else(|_| panic!("TESSERA_TEST_POSTGRES: no answer within {CONNECT_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("TESSERA_TEST_POSTGRES: {}", describe(&e)));
    tokio::spawn(connection);
    client
}

/// A PostgreSQL error with the server's message and code, or its cause.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} [{}]", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// `conninfo` with its database replaced by `dbname` (a plain identifier).
fn with_dbname(conninfo: &str, dbname: &str) -> String {
    let conninfo = conninfo.trim();
    if conninfo.starts_with("postgres://") || conninfo.starts_with("postgresql://") {
        // A query parameter overrides the URL's path.
        let separator = if conninfo.contains('?') { '&' } else { '?' };
        format!("{conninfo}{separator}dbname={dbname}")
    } else {
        // In key=value form the last setting of a key wins.
        format!("{conninfo} dbname={dbname}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dbname_is_overridden_in_both_forms() {
        for (conninfo, expected) in [
            ("host=/run/pg user=root dbname=postgres", Some("t1")),
            ("host=/run/pg user=root", Some("t1")),
            ("postgresql://root@localhost/postgres", Some("t1")),
            (
                "postgresql://root@localhost/postgres?sslmode=disable",
                Some("t1"),
            ),
        ] {
            let config: Config = with_dbname(conninfo, "t1").parse().unwrap();
            assert_eq!(config.get_dbname(), expected, "{conninfo}");
        }
    }
}
