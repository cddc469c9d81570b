//! Two server replicas sharing one real PostgreSQL database: an entry created through one
//! reaches a workload on an agent connected to the other.

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread")]
async fn an_entry_created_on_one_replica_reaches_agents_of_the_other() {
    let Some(connection) = tessera_harness::postgres::scratch_database_from_env().await else {
        return;
    };
    let dir = world_dir();
    let datastore = format!("[datastore]\nkind = \"postgres\"\nconnection = \"{connection}\"\n");
    let replica_a = ServerProcess::start(dir.path(), "replica-a", &datastore);
    let replica_b = ServerProcess::start(dir.path(), "replica-b", &datastore);

    // The bundle in the shared database holds both replicas' roots.
    let bundle = dir.path().join("bundle.pem");
    replica_b.write_bundle(&bundle);
    let roots = std::fs::read_to_string(&bundle)
        .unwrap()
        .matches("BEGIN CERTIFICATE")
        .count();
    assert_eq!(roots, 2, "one root per replica");

    // A token made on one replica is good on the other.
    let token = replica_a.join_token();
    let agent = AgentProcess::start(
        dir.path(),
        "agent",
        &replica_b.address,
        &bundle,
        &format!("join_token = \"{token}\""),
    );

    // A first identity so that a stream can stay open.
    let create = |server: &ServerProcess, path: &str| {
        server.create_entry(path, &[]);
        format!("spiffe://{TRUST_DOMAIN}{path}")
    };
    let first = create(&replica_b, "/on-b");
    let mut client = tessera::cli::client::connect(&agent.uri()).await.unwrap();
    // Until the entry has synced, the agent refuses the call (no identity yet).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        assert!(
            Instant::now() < deadline,
            "{first} not served:\n{}",
            agent.logs()
        );
        let Ok(response) = client
            .fetch_x509svid(tessera::proto::workload::X509svidRequest {})
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = response.into_inner();
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(message))) if message.svids.iter().any(|s| s.spiffe_id == first) => {
                break stream;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };

    let started = Instant::now();
    let second = create(&replica_a, "/on-a");
    let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("the entry arrives through the other replica")
        .unwrap()
        .unwrap();
    eprintln!(
        "replica A's admin CLI to a workload of replica B's agent: {:?}",
        started.elapsed()
    );
    let mut ids: Vec<_> = message.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, [second, first]);

    // The database drops every connection: calls fail with Unavailable meanwhile, and the
    // replicas recover by themselves.
    let admin_conninfo = std::env::var("TESSERA_TEST_POSTGRES").unwrap();
    let (admin, connection_task) = tokio_postgres::connect(&admin_conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection_task);
    let database = connection
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("dbname="))
        .unwrap()
        .to_owned();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&database],
        )
        .await
        .unwrap();
    let mut failures = Vec::new();
    let recovered = (0..50).any(|_| {
        let out = replica_a.admin(&["entry", "list", "--output", "json"]);
        if out.status.success() {
            return true;
        }
        failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
        std::thread::sleep(Duration::from_millis(200));
        false
    });
    assert!(recovered, "replica A did not recover: {failures:?}");
    for failure in &failures {
        assert!(failure.to_lowercase().contains("unavailable"), "{failure}");
    }
    // And sync still flows through the other replica afterwards.
    let third = create(&replica_a, "/after-reconnect");
    let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("changes flow again after the reconnection")
        .unwrap()
        .unwrap();
    assert!(message.svids.iter().any(|s| s.spiffe_id == third));

    drop(agent);
    drop(replica_a);
    drop(replica_b);
    tessera_harness::postgres::drop_scratch_database(&connection).await;
}
