//! The standalone audit log under abuse: a flood of refused calls adds one line per caller,
//! not one per call, and a disk that takes no more writes is counted, never a reason to refuse
//! identities.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tessera::agent::{AgentConfig, BuildOptions};

/// Refused calls made in the flood; bounded, one connection.
const FLOOD: u64 = 2000;

fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_refusals_adds_one_audit_line_per_caller() {
    // The only entry is for another uid: every call of this process is refused.
    let agent = start_agent_with(
        &entry("/someone-else", &["unix:uid:4242"], "5m", ""),
        "[events]\nuse_window = \"1h\"\n",
        BuildOptions::default(),
    )
    .await;
    let mut client = tessera::cli::client::connect(&agent.uri()).await.unwrap();
    for _ in 0..FLOOD {
        let status = client
            .fetch_x509svid(tessera::proto::workload::X509svidRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }
    // Shutdown reports the counts still in their window.
    agent.handle.shutdown();
    let log = agent.dir.path().join("state/audit.jsonl");
    let deadline = Instant::now() + Duration::from_secs(30);
    let denied = loop {
        let denied: Vec<serde_json::Value> = audit_lines(&log)
            .into_iter()
            .filter(|l| l["kind"] == "attestation_denied")
            .collect();
        if !denied.is_empty() {
            break denied;
        }
        assert!(Instant::now() < deadline, "no refusal in {}", log.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(denied.len(), 1, "{denied:?}");
    let line = &denied[0];
    assert_eq!(line["count"], FLOOD, "{line}");
    assert_eq!(line["caller"]["pid"], std::process::id());
    assert!(line["first_ms"].as_i64().unwrap() <= line["last_ms"].as_i64().unwrap());
    let bytes = std::fs::metadata(&log).unwrap().len();
    eprintln!("audit log after {FLOOD} refused calls: {bytes} bytes");
    assert!(bytes < 4096, "{bytes} bytes");
}

fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_counted_and_identities_are_still_issued() {
    let dir = world_dir();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // /dev/full refuses every write with ENOSPC, as a full file system does.
    std::os::unix::fs::symlink("/dev/full", state.join("audit.jsonl")).unwrap();
    let config_path = dir.path().join("agent.toml");
    std::fs::write(
        &config_path,
        config_text(
            dir.path(),
            &entry("/kept-going", &[&my_uid_selector()], "5m", ""),
            "metrics_address = \"127.0.0.1:0\"",
        ),
    )
    .unwrap();
    let config = AgentConfig::load(&config_path).unwrap();
    let handle = tessera::agent::build(config, BuildOptions::default())
        .await
        .unwrap();

    let mut client = tessera::cli::client::connect(&handle.socket_uri())
        .await
        .unwrap();
    let message = client
        .fetch_x509svid(tessera::proto::workload::X509svidRequest {})
        .await
        .expect("an identity despite the full disk")
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        message.svids[0].spiffe_id,
        format!("spiffe://{TRUST_DOMAIN}/kept-going")
    );
    let metrics = scrape(handle.metrics_address.expect("metrics bound").port());
    assert!(
        metrics.contains("tessera_events_not_recorded_total{kind=\"svid_issued\"} 1"),
        "{metrics}"
    );
    handle.shutdown();
}
