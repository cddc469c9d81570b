//! Credential events end to end: every issuance, use and revocation reaches the server exactly
//! once with the caller's facts, through agent crashes, server outages and a cut spool; the
//! server flags issuances a node may not make; standalone agents keep a JSON-lines audit log.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use tokio_stream::StreamExt;

/// Every stored event of `kind` (all kinds when empty), via `tessera events export`.
fn events(server: &ServerProcess, kind: &str) -> Vec<serde_json::Value> {
    let mut args = vec!["events", "export"];
    if !kind.is_empty() {
        args.extend(["--kind", kind]);
    }
    let out = server.admin(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until `check` holds for the stored events of `kind`; returns them.
fn wait_events(
    server: &ServerProcess,
    kind: &str,
    what: &str,
    check: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = events(server, kind);
        if check(&found) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: got {} {kind} events: {found:?}",
            found.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET /metrics` from the agent's metrics port.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response
}

/// The agent's spool backlog (records not yet acknowledged by the server), from its metrics.
fn spool_pending(metrics_port: u16) -> u64 {
    let metrics = scrape(metrics_port);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tessera_spool_pending_records "))
        .expect("spool backlog metric")
        .parse()
        .unwrap()
}

/// Polls the agent's spool backlog until `check` accepts it.
fn wait_spool(metrics_port: u16, what: &str, check: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending = spool_pending(metrics_port);
        if check(pending) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {pending} records pending"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_unique_ids(events: &[serde_json::Value]) {
    let ids: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), events.len(), "an event was stored twice");
}

/// `[server]` lines for a join token, then a short use window.
fn joined(server: &ServerProcess) -> String {
    format!(
        "join_token = \"{}\"\n\n[events]\nuse_window = \"1s\"\n",
        server.join_token()
    )
}

/// One Workload API call that the agent refuses (the caller matches no entry): one
/// `attestation_denied` event each.
async fn refused_calls(agent: &AgentProcess, count: usize) {
    let mut client = tessera::cli::client::connect(&agent.uri()).await.unwrap();
    for _ in 0..count {
        let status = client
            .fetch_x509svid(tessera::proto::workload::X509svidRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_issuance_use_and_revocation_reaches_the_server_once() {
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let agent = AgentProcess::start(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &joined(&server),
    );
    let node_id = std::fs::read_to_string(agent.state_dir.join("upstream/node_id")).unwrap();
    let id = format!("spiffe://{TRUST_DOMAIN}/evented");
    let selector = my_uid_selector();
    let entry_id = server.admin_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &id,
        "--selector",
        &selector,
        "--x509-ttl",
        "4s",
        "--owner",
        "auditors",
        "--purpose",
        "event test",
        "--all-nodes",
    ])["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Fetch, and keep the stream until the SVID has rotated once.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = loop {
        let mut client = tessera::cli::client::connect(&agent.uri()).await.unwrap();
        if let Ok(response) = client
            .fetch_x509svid(tessera::proto::workload::X509svidRequest {})
            .await
        {
            break response.into_inner();
        }
        assert!(Instant::now() < deadline, "entry never synced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let serial_of = |m: &tessera::proto::workload::X509svidResponse| {
        let chain = split_der(&m.svids[0].x509_svid);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        hex::encode(leaf.tbs_certificate.raw_serial())
    };
    let first = serial_of(&stream.next().await.unwrap().unwrap());
    let second = serial_of(
        &tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap(),
    );
    assert_ne!(first, second);
    drop(stream);

    // The inventory knows the identity, its owner, its live SVIDs and their use, and the node
    // that holds them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (identity, inventory) = loop {
        let inventory = server.admin_json(&["inventory"]);
        let identity = inventory["identities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["entry_id"] == entry_id.as_str())
            .expect("identity in the inventory")
            .clone();
        let live: Vec<&str> = identity["live_svids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["serial"].as_str().unwrap())
            .collect();
        if live.contains(&second.as_str()) && !identity["last_used"].is_null() {
            break (identity, inventory);
        }
        assert!(
            Instant::now() < deadline,
            "inventory never caught up: {identity}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(identity["owner"], "auditors", "{identity}");
    assert_eq!(identity["purpose"], "event test");
    assert_eq!(identity["registration_expired"], false);
    assert!(!identity["last_issued"].is_null(), "{identity}");
    let node = inventory["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == node_id.as_str())
        .expect("node in the inventory")
        .clone();
    assert!(
        node["live_svids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == second.as_str()),
        "{node}"
    );
    let text = server.admin(&["inventory"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("auditors"));

    assert!(
        server
            .admin(&["entry", "delete", &entry_id])
            .status
            .success()
    );

    // Issued twice (the fetch, then the rotation), each once.
    let issued = wait_events(&server, "svid_issued", "issuances", |e| e.len() >= 2);
    assert_unique_ids(&issued);
    let by_serial: HashMap<&str, &serde_json::Value> = issued
        .iter()
        .map(|e| (e["serial"].as_str().unwrap(), e))
        .collect();
    assert_eq!(by_serial.len(), 2, "{issued:?}");
    let fetched = by_serial[first.as_str()];
    assert_eq!(fetched["spiffe_id"], id.as_str());
    assert_eq!(fetched["entry_id"], entry_id.as_str());
    assert_eq!(fetched["node_id"], node_id.as_str());
    assert_eq!(fetched["caller"]["pid"], std::process::id());
    assert_eq!(fetched["caller"]["uid"], nix::unistd::geteuid().as_raw());
    assert_eq!(
        fetched["caller"]["exe_path"],
        std::env::current_exe().unwrap().display().to_string()
    );
    assert!(
        by_serial[second.as_str()]["caller"].is_null(),
        "a rotation has no caller"
    );

    // Both revoked once, because the entry was removed: the one served, and the one the
    // rotation replaced, which had not expired and which its holder may still present.
    let revoked = wait_events(&server, "svid_revoked", "revocations", |e| e.len() >= 2);
    assert_unique_ids(&revoked);
    assert_eq!(revoked.len(), 2, "{revoked:?}");
    let serials: HashSet<&str> = revoked
        .iter()
        .map(|e| e["serial"].as_str().unwrap())
        .collect();
    assert_eq!(serials, HashSet::from([first.as_str(), second.as_str()]));
    assert!(
        revoked.iter().all(|e| e["reason"] == "entry_removed"),
        "{revoked:?}"
    );

    // Used: both SVIDs were delivered to this process.
    let used = wait_events(&server, "svid_used", "uses", |e| {
        let serials: HashSet<&str> = e.iter().map(|u| u["serial"].as_str().unwrap()).collect();
        serials.contains(first.as_str()) && serials.contains(second.as_str())
    });
    assert_unique_ids(&used);
    for u in &used {
        assert!(u["count"].as_u64().unwrap() >= 1);
        assert_eq!(u["caller"]["pid"], std::process::id());
    }

    // Issuances uploaded after their entry was deleted are not mistaken for anomalies.
    assert!(events(&server, "issuance_anomaly").is_empty());

    let attested = events(&server, "node_attested");
    assert!(
        attested.iter().any(|e| e["node_id"] == node_id.as_str()),
        "{attested:?}"
    );

    // Filters work together, and the table form prints.
    let filtered = server.admin_json(&[
        "events",
        "list",
        "--serial",
        &first,
        "--kind",
        "svid_issued",
    ]);
    assert_eq!(filtered.as_array().unwrap().len(), 1, "{filtered}");
    let table = server.admin(&["events", "list", "--spiffe-id", &id]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("svid_revoked"));
}

#[tokio::test(flavor = "multi_thread")]
async fn crashes_and_outages_lose_nothing_and_double_nothing() {
    let dir = world_dir();
    let mut server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let mut agent = AgentProcess::spawn_with(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &joined(&server),
        "metrics_address = \"127.0.0.1:0\"",
    );
    agent.wait_ready();

    // Server away: events pile up in the spool, across a kill -9 and restart of the agent.
    server.kill();
    refused_calls(&agent, 400).await;
    wait_spool(agent.metrics_port(), "the refusals reach the spool", |p| {
        p >= 400
    });
    agent.kill();
    agent.spawn_again();
    agent.wait_ready();
    refused_calls(&agent, 400).await;
    // The backlog shows in the agent's metrics.
    let metrics = scrape(agent.metrics_port());
    assert!(
        metrics.contains("tessera_events_recorded_total{kind=\"attestation_denied\"} 400"),
        "{metrics}"
    );
    let pending: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tessera_spool_pending_records "))
        .expect("spool backlog metric")
        .parse()
        .unwrap();
    assert!(pending >= 400, "{metrics}");

    // Server back: the upload starts; kill -9 the agent in the middle of it.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while events(&server, "attestation_denied").is_empty() {
        assert!(Instant::now() < deadline, "no upload:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.kill();
    agent.spawn_again();
    agent.wait_ready();
    refused_calls(&agent, 200).await;

    wait_events(&server, "attestation_denied", "all refusals", |e| {
        e.len() >= 1000
    });
    // Nothing left to upload: whatever the server stores now is all it will ever get.
    wait_spool(agent.metrics_port(), "the spool drains", |p| p == 0);
    let denied = events(&server, "attestation_denied");
    assert_unique_ids(&denied);
    assert_eq!(denied.len(), 1000, "exactly the refusals made");
    for event in &denied {
        assert_eq!(event["caller"]["pid"], std::process::id());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_spool_tail_keeps_the_good_prefix() {
    let dir = world_dir();
    let mut server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let mut agent = AgentProcess::spawn_with(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &joined(&server),
        "metrics_address = \"127.0.0.1:0\"",
    );
    agent.wait_ready();
    server.kill();
    refused_calls(&agent, 50).await;
    wait_spool(agent.metrics_port(), "the refusals reach the spool", |p| {
        p >= 50
    });
    agent.kill();

    // Cut the last record of the newest segment in the middle.
    let spool = agent.state_dir.join("spool");
    let mut segments: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    let newest = segments.last().expect("a spool segment");
    let len = std::fs::metadata(newest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(newest)
        .unwrap()
        .set_len(len - 5)
        .unwrap();

    agent.spawn_again();
    agent.wait_ready();
    server.restart();
    let denied = wait_events(&server, "attestation_denied", "the good prefix", |e| {
        e.len() >= 49
    });
    // Nothing left to upload: whatever the server stores now is all it will ever get.
    wait_spool(agent.metrics_port(), "the spool drains", |p| p == 0);
    let denied_after = events(&server, "attestation_denied");
    assert_eq!(
        denied_after.len(),
        49,
        "all but the cut record: {}",
        denied.len()
    );
    assert_unique_ids(&denied_after);
    let log = agent.logs();
    assert!(
        log.contains("spool") && log.contains("lost"),
        "the loss is logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn issuance_anomalies_and_bad_batches_are_flagged_without_blocking_the_stream() {
    use tessera::proto::tessera::{Event, EventBatch, EventKind};
    // Speak for the node with its own credentials, as a compromised node would.
    let (_dir, server, _agent, node_id, mut client) = node_speaking_for_its_agent();
    let forged = |serial: &str| Event {
        id: tessera::events::model::new_event_id(),
        kind: EventKind::SvidIssued as i32,
        time_ms: tessera::events::model::now_ms(),
        trust_domain: TRUST_DOMAIN.into(),
        entry_id: "none".into(),
        spiffe_id: format!("spiffe://{TRUST_DOMAIN}/admin"),
        serial: serial.into(),
        not_after: 2_000_000_000,
        ..Default::default()
    };
    let bad = Event {
        id: "not-a-uuid".into(),
        ..forged("bb")
    };
    let batches = vec![
        EventBatch {
            sequence: 1,
            events: vec![bad],
        },
        EventBatch {
            sequence: 2,
            events: vec![forged("aa")],
        },
    ];
    let mut acks = client
        .report_events(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    let first = acks.message().await.unwrap().unwrap();
    assert_eq!(first.sequence, 1);
    assert!(first.error.contains("lowercase UUID"), "{first:?}");
    let second = acks.message().await.unwrap().unwrap();
    assert_eq!(
        (second.sequence, second.error.as_str()),
        (2, ""),
        "{second:?}"
    );
    assert_eq!(second.stored, 2, "the issuance and its anomaly");

    let anomalies = events(&server, "issuance_anomaly");
    assert_eq!(anomalies.len(), 1, "{anomalies:?}");
    assert_eq!(anomalies[0]["node_id"], node_id.as_str());
    assert_eq!(anomalies[0]["serial"], "aa");
    assert!(anomalies[0]["detail"].as_str().unwrap().contains("/admin"));
    assert!(server.logs().contains("issuance anomaly"));
}

#[tokio::test]
async fn a_standalone_agent_keeps_a_json_lines_audit_log() {
    let agent = start_agent(&entry("/audited", &[&my_uid_selector()], "5m", "")).await;
    let mut stream = svid_stream(&agent).await;
    stream.next().await.unwrap().unwrap();
    let log = agent.dir.path().join("state/audit.jsonl");
    let deadline = Instant::now() + Duration::from_secs(10);
    let issued = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let found = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|e| e["kind"] == "svid_issued");
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no issuance in {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        issued["spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/audited")
    );
    assert_eq!(issued["caller"]["pid"], std::process::id());
}

#[tokio::test(flavor = "multi_thread")]
async fn events_tail_follows_new_events_and_expired_registrations_are_flagged() {
    use std::io::BufRead;
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let mut tail = tessera_harness::command(TESSERA);
    tail.args([
        "events",
        "tail",
        "--kind",
        "node_attested",
        "--output",
        "json",
        "--admin-socket",
    ])
    .arg(&server.admin_socket)
    .stdout(std::process::Stdio::piped());
    let mut tail = tessera_harness::Process::spawn(&mut tail, "tessera events tail").unwrap();
    let stdout = tail.child_mut().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // No need to wait for the tail to connect: it prints stored events before new ones.
    let agent = AgentProcess::start(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &joined(&server),
    );
    let node_id = std::fs::read_to_string(agent.state_dir.join("upstream/node_id")).unwrap();
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("tail prints the new event");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["kind"], "node_attested");
    assert_eq!(event["node_id"], node_id.as_str());
    drop(tail);

    let selector = my_uid_selector();
    let id = format!("spiffe://{TRUST_DOMAIN}/short-lived-registration");
    let entry = server.admin_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &id,
        "--selector",
        &selector,
        "--owner",
        "o",
        "--purpose",
        "p",
        "--all-nodes",
        "--expires-in",
        "2s",
        "--inactivity-timeout",
        "1m",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let identity = loop {
        let inventory = server.admin_json(&["inventory"]);
        let identity = inventory["identities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["entry_id"] == entry["id"])
            .unwrap()
            .clone();
        if identity["registration_expired"] == true {
            break identity;
        }
        assert!(Instant::now() < deadline, "never expired: {identity}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(identity["unused_past_timeout"], false, "{identity}");
    assert!(String::from_utf8_lossy(&server.admin(&["inventory"]).stdout).contains("EXPIRED"));
}

#[tokio::test(flavor = "multi_thread")]
async fn events_list_is_in_event_time_order_and_says_when_the_limit_cut_it() {
    use tessera::proto::tessera::{Event, EventBatch, EventKind};
    // A node reports events late and out of order: arrival order is not event-time order.
    let (_dir, server, _agent, node_id, mut client) = node_speaking_for_its_agent();
    let now = tessera::events::model::now_ms();
    let denied = |ago_ms: i64| Event {
        id: tessera::events::model::new_event_id(),
        kind: EventKind::AttestationDenied as i32,
        time_ms: now - ago_ms,
        trust_domain: TRUST_DOMAIN.into(),
        detail: format!("{ago_ms} ms ago"),
        ..Default::default()
    };
    let batch = EventBatch {
        sequence: 1,
        events: vec![denied(1_000), denied(3_000), denied(2_000)],
    };
    let mut acks = client
        .report_events(tokio_stream::iter(vec![batch]))
        .await
        .unwrap()
        .into_inner();
    let ack = acks.message().await.unwrap().unwrap();
    assert_eq!((ack.error.as_str(), ack.stored), ("", 3), "{ack:?}");

    let list = |extra: &[&str]| {
        let mut args = vec![
            "events",
            "list",
            "--node",
            node_id.as_str(),
            "--kind",
            "attestation_denied",
            "--output",
            "json",
        ];
        args.extend(extra);
        let out = server.admin(&args);
        assert!(out.status.success(), "{out:?}");
        let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let details: Vec<String> = listed
            .iter()
            .map(|e| e["detail"].as_str().unwrap().to_owned())
            .collect();
        (details, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (all, note) = list(&[]);
    assert_eq!(all, ["3000 ms ago", "2000 ms ago", "1000 ms ago"]);
    assert!(!note.contains("showing the first"), "{note}");
    let (exact, note) = list(&["--limit", "3"]);
    assert_eq!(exact.len(), 3, "{exact:?}");
    assert!(!note.contains("showing the first"), "{note}");
    let (cut, note) = list(&["--limit", "2"]);
    assert_eq!(cut, ["3000 ms ago", "2000 ms ago"]);
    assert!(
        note.contains("showing the first 2 matching events"),
        "{note}"
    );

    let too_many = server.admin(&["events", "list", "--limit", "10000"]);
    assert_eq!(too_many.status.code(), Some(2), "{too_many:?}");
    assert!(String::from_utf8_lossy(&too_many.stderr).contains("10000"));
}

/// A server, an agent joined to it, the agent's node id, and a node API client holding that
/// agent's own credentials: whatever a compromised node could send.
fn node_speaking_for_its_agent() -> (
    tempfile::TempDir,
    ServerProcess,
    AgentProcess,
    String,
    tessera::proto::tessera::node_client::NodeClient<tonic::transport::Channel>,
) {
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let agent = AgentProcess::start(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &joined(&server),
    );
    let node_id = std::fs::read_to_string(agent.state_dir.join("upstream/node_id")).unwrap();
    let upstream = node_link(&server.address, &bundle, &agent.state_dir);
    let credentials = upstream.saved_credentials().unwrap();
    let client = tessera::proto::tessera::node_client::NodeClient::new(
        upstream.channel(Some(&credentials)).unwrap(),
    );
    (dir, server, agent, node_id, client)
}
