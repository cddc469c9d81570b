//! Server mode end to end, with real processes: a server, agents that join with a token or with
//! x509pop, workloads using the `spiffe` crate and py-spiffe, and the operator's CLI.

// These tests make raw system calls (setuid in a child, raw socket options) to act as other
// users and hostile clients would.
#![allow(unsafe_code)]

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use tessera::proto::workload::X509svidResponse;
use tokio_stream::StreamExt;

fn spiffe_id(path: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}{path}")
}

fn create_entry(server: &ServerProcess, path: &str, extra: &[&str]) -> String {
    server.create_entry(path, extra)
}

async fn try_open_stream(
    agent: &AgentProcess,
) -> Result<tonic::Streaming<X509svidResponse>, tonic::Status> {
    let mut client = tessera::cli::client::connect(&agent.uri()).await.unwrap();
    Ok(client
        .fetch_x509svid(tessera::proto::workload::X509svidRequest {})
        .await?
        .into_inner())
}

async fn open_stream(agent: &AgentProcess) -> tonic::Streaming<X509svidResponse> {
    try_open_stream(agent).await.unwrap()
}

fn ids_of(response: &X509svidResponse) -> Vec<String> {
    let mut ids: Vec<String> = response.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    ids.sort();
    ids
}

/// The next stream message, waiting at most 10 s.
async fn next_message(
    stream: &mut tonic::Streaming<X509svidResponse>,
) -> Result<X509svidResponse, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a stream message within 10 s")
        .expect("stream still open")
}

/// Waits until an SVID for `id` is served on `agent` (entries arrive by sync).
async fn wait_for_identity(agent: &AgentProcess, id: &str) -> X509svidResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(2), try_open_stream(agent)).await
            && let Ok(Some(Ok(response))) =
                tokio::time::timeout(Duration::from_secs(2), stream.next()).await
            && response.svids.iter().any(|s| s.spiffe_id == id)
        {
            return response;
        }
        assert!(
            Instant::now() < deadline,
            "{id} not served:\n{}",
            agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn node_ids(server: &ServerProcess) -> Vec<(String, String, String)> {
    let nodes = server.admin_json(&["node", "list"]);
    nodes
        .as_array()
        .expect("node list is a JSON array")
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_owned(),
                n["attestation"].as_str().unwrap().to_owned(),
                n["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_created_changed_and_deleted_reach_workloads_on_both_nodes() {
    let dir = world_dir();
    let (ca, node_cert, node_key) = x509pop_files(dir.path(), "pop", "node-b.example");
    let server = ServerProcess::start(
        dir.path(),
        "server",
        &format!("[x509pop]\nca_bundle_file = \"{}\"\n", ca.display()),
    );
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let token = server.join_token();
    let agent_a = AgentProcess::start(
        dir.path(),
        "agent-a",
        &server.address,
        &bundle,
        &format!("join_token = \"{token}\""),
    );
    let agent_b = AgentProcess::start(
        dir.path(),
        "agent-b",
        &server.address,
        &bundle,
        &x509pop_attestation(&node_cert, &node_key),
    );

    let nodes = node_ids(&server);
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    let methods: Vec<&str> = nodes.iter().map(|n| n.1.as_str()).collect();
    assert!(
        methods.contains(&"join_token") && methods.contains(&"x509pop"),
        "{nodes:?}"
    );
    assert!(nodes.iter().all(|n| n.2 == "active"), "{nodes:?}");

    // A first identity, then a stream on each node.
    let first = create_entry(&server, "/first", &[]);
    let on_a = wait_for_identity(&agent_a, &spiffe_id("/first")).await;
    let on_b = wait_for_identity(&agent_b, &spiffe_id("/first")).await;
    for response in [&on_a, &on_b] {
        let chain = split_der(&response.svids[0].x509_svid);
        assert_eq!(chain.len(), 2, "leaf and the node's intermediate CA");
        check_x509_svid(
            &chain,
            &split_der(&response.svids[0].bundle),
            &spiffe_id("/first"),
        );
    }
    // The two nodes sign with different intermediates.
    assert_ne!(
        split_der(&on_a.svids[0].x509_svid)[1],
        split_der(&on_b.svids[0].x509_svid)[1]
    );

    let mut stream_a = open_stream(&agent_a).await;
    assert_eq!(
        ids_of(&next_message(&mut stream_a).await.unwrap()),
        [spiffe_id("/first")]
    );

    // Created: pushed down the open stream.
    let started = Instant::now();
    let second = create_entry(&server, "/second", &[]);
    let message = next_message(&mut stream_a).await.unwrap();
    let create_latency = started.elapsed();
    assert_eq!(
        ids_of(&message),
        [spiffe_id("/first"), spiffe_id("/second")]
    );

    // Changed: a new SVID with the new DNS name.
    let started = Instant::now();
    let out = server.admin(&["entry", "update", &second, "--dns-name", "second.internal"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let message = loop {
        let message = next_message(&mut stream_a).await.unwrap();
        let svid = message
            .svids
            .iter()
            .find(|s| s.spiffe_id == spiffe_id("/second"))
            .unwrap();
        let chain = split_der(&svid.x509_svid);
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let has_dns = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .any(|n| {
                matches!(
                    n,
                    x509_parser::extensions::GeneralName::DNSName("second.internal")
                )
            });
        if has_dns {
            break message;
        }
    };
    let update_latency = started.elapsed();
    assert_eq!(message.svids.len(), 2);

    // Deleted: gone from the stream; the last deletion ends it with PermissionDenied. Messages
    // that only carry new CRLs (the certificates the change and the deletion revoked) may come
    // in between.
    let started = Instant::now();
    assert!(server.admin(&["entry", "delete", &second]).status.success());
    while ids_of(&next_message(&mut stream_a).await.unwrap()) != [spiffe_id("/first")] {}
    let delete_latency = started.elapsed();
    assert!(server.admin(&["entry", "delete", &first]).status.success());
    let status = loop {
        match next_message(&mut stream_a).await {
            Ok(message) => assert_eq!(ids_of(&message), [spiffe_id("/first")]),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    eprintln!(
        "CLI return to stream update: create {create_latency:?}, update {update_latency:?}, delete {delete_latency:?}"
    );

    // py-spiffe on the x509pop node, unmodified.
    if let Some(python) = python() {
        create_entry(&server, "/python", &[]);
        wait_for_identity(&agent_b, &spiffe_id("/python")).await;
        let out = std::process::Command::new(python)
            .args(["-c", include_str!("python/fetch.py"), &agent_b.uri()])
            .output()
            .unwrap();
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["spiffe_id"], spiffe_id("/python"), "{got}");
        assert_eq!(got["chain_len"], 2, "{got}");
        assert_eq!(
            got["trust_domains"],
            serde_json::json!([TRUST_DOMAIN]),
            "{got}"
        );
    }

    // The spiffe crate's X509Source on the join-token node (its default identity is the first
    // match, so the only one left).
    for entry in server.admin_json(&["entry", "list"]).as_array().unwrap() {
        assert!(
            server
                .admin(&["entry", "delete", entry["id"].as_str().unwrap()])
                .status
                .success()
        );
    }
    create_entry(&server, "/rust", &[]);
    wait_for_identity(&agent_a, &spiffe_id("/rust")).await;
    let source = spiffe::X509Source::builder()
        .endpoint(agent_a.uri())
        .initial_sync_timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    assert_eq!(
        source.svid().unwrap().spiffe_id().to_string(),
        spiffe_id("/rust")
    );
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_pinned_to_a_node_are_served_by_that_node_only() {
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let a = AgentProcess::start(
        dir.path(),
        "a",
        &server.address,
        &bundle,
        &format!("join_token = \"{}\"", server.join_token()),
    );
    let b = AgentProcess::start(
        dir.path(),
        "b",
        &server.address,
        &bundle,
        &format!("join_token = \"{}\"", server.join_token()),
    );
    let nodes = node_ids(&server);
    let node_a = std::fs::read_to_string(a.state_dir.join("upstream/node_id")).unwrap();
    assert!(nodes.iter().any(|n| n.0 == node_a), "{nodes:?}");

    create_entry(&server, "/pinned", &["--node", &node_a]);
    create_entry(&server, "/everywhere", &[]);
    wait_for_identity(&b, &spiffe_id("/everywhere")).await;
    let on_a = wait_for_identity(&a, &spiffe_id("/pinned")).await;
    assert_eq!(
        ids_of(&on_a),
        [spiffe_id("/everywhere"), spiffe_id("/pinned")]
    );
    let mut stream_b = open_stream(&b).await;
    assert_eq!(
        ids_of(&next_message(&mut stream_b).await.unwrap()),
        [spiffe_id("/everywhere")]
    );

    // JWT-SVIDs: one per identity of the caller, signed by the server, checked on the other
    // node; a node never gets one for an identity pinned elsewhere.
    let mut client = tessera::cli::client::connect(&a.uri()).await.unwrap();
    let tokens = client
        .fetch_jwtsvid(tessera::proto::workload::JwtsvidRequest {
            audience: vec!["api".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .svids;
    let mut ids: Vec<String> = tokens.iter().map(|t| t.spiffe_id.clone()).collect();
    ids.sort();
    assert_eq!(ids, [spiffe_id("/everywhere"), spiffe_id("/pinned")]);
    let pinned = tokens
        .iter()
        .find(|t| t.spiffe_id == spiffe_id("/pinned"))
        .unwrap();
    let mut on_b = tessera::cli::client::connect(&b.uri()).await.unwrap();
    let valid = on_b
        .validate_jwtsvid(tessera::proto::workload::ValidateJwtsvidRequest {
            audience: "api".into(),
            svid: pinned.svid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(valid.spiffe_id, spiffe_id("/pinned"));
    // And offline, by the `spiffe` crate's verifier, with the JWT bundle node b serves.
    let b_client = spiffe::WorkloadApiClient::connect_to(b.uri())
        .await
        .unwrap();
    let bundles = b_client.fetch_jwt_bundles().await.unwrap();
    let checked = spiffe::JwtSvid::parse_and_validate(&pinned.svid, &bundles, &["api"]).unwrap();
    assert_eq!(checked.spiffe_id().to_string(), spiffe_id("/pinned"));
    let status = on_b
        .fetch_jwtsvid(tessera::proto::workload::JwtsvidRequest {
            audience: vec!["api".into()],
            spiffe_id: spiffe_id("/pinned"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_serve_through_a_server_outage_and_restart_then_resync() {
    let dir = world_dir();
    let mut server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let mut agent = AgentProcess::start(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &format!("join_token = \"{}\"", server.join_token()),
    );
    create_entry(&server, "/steady", &[]);
    wait_for_identity(&agent, &spiffe_id("/steady")).await;
    let jwt = |audience: &str| {
        let uri = agent.uri();
        let audience = audience.to_owned();
        async move {
            let mut client = tessera::cli::client::connect(&uri).await.unwrap();
            client
                .fetch_jwtsvid(tessera::proto::workload::JwtsvidRequest {
                    audience: vec![audience],
                    spiffe_id: String::new(),
                })
                .await
                .map(|r| r.into_inner().svids[0].svid.clone())
        }
    };
    let token = jwt("api").await.unwrap();

    // Server down: the agent keeps serving, also across its own restart (from disk).
    server.kill();
    wait_for_identity(&agent, &spiffe_id("/steady")).await;
    // A token it holds is still handed out; a new audience needs the server.
    assert_eq!(jwt("api").await.unwrap(), token);
    let status = jwt("new-audience").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    agent.kill();
    agent.spawn_again();
    agent.wait_ready();
    let response = wait_for_identity(&agent, &spiffe_id("/steady")).await;
    check_x509_svid(
        &split_der(&response.svids[0].x509_svid),
        &split_der(&response.svids[0].bundle),
        &spiffe_id("/steady"),
    );
    assert!(
        agent.logs().contains("serving from saved node state"),
        "{}",
        agent.logs()
    );
    // The server's JWT keys came back from disk too: the token still validates.
    let mut client = tessera::cli::client::connect(&agent.uri()).await.unwrap();
    client
        .validate_jwtsvid(tessera::proto::workload::ValidateJwtsvidRequest {
            audience: "api".into(),
            svid: token.clone(),
        })
        .await
        .unwrap();

    // Server back: the agent reconnects on its own and learns what changed meanwhile.
    server.restart();
    create_entry(&server, "/after-outage", &[]);
    wait_for_identity(&agent, &spiffe_id("/after-outage")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn evicted_nodes_lose_their_identities_and_cannot_renew() {
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let agent = AgentProcess::start(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &format!("join_token = \"{}\"", server.join_token()),
    );
    create_entry(&server, "/doomed", &[]);
    wait_for_identity(&agent, &spiffe_id("/doomed")).await;

    // Keep a copy of the node's credentials: the agent forgets them once evicted.
    let saved = dir.path().join("saved");
    copy_dir(&agent.state_dir, &saved);
    let node_id = std::fs::read_to_string(agent.state_dir.join("upstream/node_id")).unwrap();

    let mut stream = open_stream(&agent).await;
    next_message(&mut stream).await.unwrap();
    let evicted = server.admin_json(&["node", "evict", &node_id]);
    assert_eq!(evicted["status"], "evicted", "{evicted}");
    let status = next_message(&mut stream).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // The node's SVID no longer renews anything.
    let upstream = node_link(&server.address, &bundle, &saved);
    let credentials = upstream
        .saved_credentials()
        .expect("copied credentials load");
    let err = upstream
        .renew(&credentials)
        .await
        .err()
        .expect("renewal refused");
    assert!(
        matches!(err, tessera::agent::upstream::UpstreamError::Evicted(_)),
        "{err}"
    );
    assert!(
        server.logs().contains("node API request refused"),
        "audit line:\n{}",
        server.logs()
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            match std::fs::copy(entry.path(), target) {
                Ok(_) => {}
                // A temporary file the running agent renamed away meanwhile (its state is
                // replaced by write-then-rename): not part of the state being copied.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("copying {}: {e}", entry.path().display()),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_node_credentials_are_refused_with_clear_messages() {
    let dir = world_dir();
    let (ca, node_cert, node_key) = x509pop_files(dir.path(), "trusted", "node.example");
    let (_, stranger_cert, stranger_key) =
        x509pop_files(dir.path(), "untrusted", "stranger.example");
    let server = ServerProcess::start(
        dir.path(),
        "server",
        &format!("[x509pop]\nca_bundle_file = \"{}\"\n", ca.display()),
    );
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);

    let refused = |name: &str, attestation: &str, want: &str| {
        let mut agent =
            AgentProcess::spawn(dir.path(), name, &server.address, &bundle, attestation);
        let status = agent.wait_exit(Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "{name}: {}", agent.logs());
        assert!(
            agent.logs().contains(want),
            "{name}: want {want:?} in:\n{}",
            agent.logs()
        );
    };
    refused(
        "unknown-token",
        "join_token = \"not-a-token\"",
        "join token refused: unknown token",
    );
    let token = server.join_token();
    let _first = AgentProcess::start(
        dir.path(),
        "first",
        &server.address,
        &bundle,
        &format!("join_token = \"{token}\""),
    );
    refused(
        "reused-token",
        &format!("join_token = \"{token}\""),
        "join token refused: token already used",
    );
    let out = server.admin(&["token", "create", "--ttl", "1s"]);
    let short = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    // The server stores the expiry in whole seconds, usable through its last second: past it
    // once the wall clock has moved two whole seconds beyond the creation.
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let created = unix_now();
    let deadline = Instant::now() + Duration::from_secs(10);
    while unix_now() < created + 2 {
        assert!(Instant::now() < deadline, "the wall clock does not move");
        std::thread::sleep(Duration::from_millis(50));
    }
    refused(
        "expired-token",
        &format!("join_token = \"{short}\""),
        "join token refused: token expired",
    );
    refused(
        "untrusted-ca",
        &x509pop_attestation(&stranger_cert, &stranger_key),
        "x509pop certificate refused",
    );
    // A trusted certificate with someone else's key: the proof of possession fails.
    refused(
        "wrong-key",
        &x509pop_attestation(&node_cert, &stranger_key),
        "proof of possession refused",
    );

    // A banned node cannot come back, even with a valid certificate and key.
    let pop = AgentProcess::start(
        dir.path(),
        "pop",
        &server.address,
        &bundle,
        &x509pop_attestation(&node_cert, &node_key),
    );
    let pop_id = std::fs::read_to_string(pop.state_dir.join("upstream/node_id")).unwrap();
    drop(pop);
    assert_eq!(
        server.admin_json(&["node", "ban", &pop_id])["status"],
        "banned"
    );
    refused(
        "banned",
        &x509pop_attestation(&node_cert, &node_key),
        "is banned",
    );

    let log = server.logs();
    for want in [
        "unknown token",
        "token already used",
        "token expired",
        "x509pop certificate refused",
        "proof of possession refused",
        "banned",
    ] {
        assert!(
            log.contains(want),
            "audit line for {want:?} missing:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_entries_are_refused_naming_the_field() {
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    let base = |spiffe: &str, selector: &str, ttl: &str, owner: &str| -> Vec<String> {
        [
            "entry",
            "create",
            "--spiffe-id",
            spiffe,
            "--selector",
            selector,
            "--x509-ttl",
            ttl,
            "--owner",
            owner,
            "--purpose",
            "p",
            "--all-nodes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let cases = [
        (
            base("spiffe://example.org/a//b", "unix:uid:1", "5m", "o"),
            "spiffe-id",
        ),
        (
            base("spiffe://other.org/a", "unix:uid:1", "5m", "o"),
            "outside the trust domain",
        ),
        (
            base("spiffe://example.org/a", "k8s:pod:x", "5m", "o"),
            "k8s:pod",
        ),
        (
            base("spiffe://example.org/a", "unix:uid:1", "2h", "o"),
            "x509_ttl",
        ),
        (
            base("spiffe://example.org/a", "unix:uid:1", "5m", " "),
            "owner",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = server.admin(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: want {want:?} in {stderr:?}"
        );
    }
    let mut node_selector = base("spiffe://example.org/a", "unix:uid:1", "5m", "o");
    node_selector.pop();
    node_selector.extend(["--node-selector".into(), "rack:row:7".into()]);
    let args: Vec<&str> = node_selector.iter().map(String::as_str).collect();
    let out = server.admin(&args);
    assert_eq!(out.status.code(), Some(2));
    // The CLI applies the server's rule itself, naming the flag.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--node-selector \"rack:row:7\": unknown node selector type"),
        "{stderr}"
    );

    // The server checks too, for API callers that skip the CLI, naming the field.
    let channel = tessera::cli::client::channel(&server.admin_socket)
        .await
        .unwrap();
    let mut admin = tessera::proto::tessera::admin_client::AdminClient::new(channel);
    let good = tessera::proto::tessera::Entry {
        spiffe_id: "spiffe://example.org/api".into(),
        selectors: vec!["unix:uid:1".into()],
        x509_ttl_seconds: 300,
        owner: "o".into(),
        purpose: "p".into(),
        ..Default::default()
    };
    let api_cases = [
        (
            tessera::proto::tessera::Entry {
                spiffe_id: "spiffe://example.org/a//b".into(),
                ..good.clone()
            },
            "entry.spiffe_id",
        ),
        (
            tessera::proto::tessera::Entry {
                selectors: vec!["k8s:pod:x".into()],
                ..good.clone()
            },
            "entry.selectors[0]",
        ),
        (
            tessera::proto::tessera::Entry {
                selectors: vec![],
                ..good.clone()
            },
            "entry.selectors",
        ),
        (
            tessera::proto::tessera::Entry {
                x509_ttl_seconds: 7200,
                ..good.clone()
            },
            "entry.x509_ttl",
        ),
        (
            tessera::proto::tessera::Entry {
                purpose: String::new(),
                ..good.clone()
            },
            "entry.purpose",
        ),
        (
            tessera::proto::tessera::Entry {
                node_selectors: vec!["rack:7".into()],
                ..good.clone()
            },
            "entry.node_selectors[0]",
        ),
        (
            tessera::proto::tessera::Entry {
                expires_at: Some(1),
                ..good.clone()
            },
            "entry.expires_at",
        ),
        (
            tessera::proto::tessera::Entry {
                spiffe_id: "spiffe://example.org/tessera/node/x".into(),
                ..good.clone()
            },
            "entry.spiffe_id",
        ),
    ];
    for (entry, want) in api_cases {
        let status = admin
            .create_entry(tessera::proto::tessera::CreateEntryRequest { entry: Some(entry) })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(want),
            "want {want:?}: {status:?}"
        );
    }

    // The same SPIFFE ID for the same selectors twice.
    let args = base("spiffe://example.org/dup", "unix:uid:1", "5m", "o");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(server.admin(&args).status.success());
    let out = server.admin(&args);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        server
            .admin_json(&["entry", "list"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// Attests over the node API directly, as a misbehaving agent would.
async fn raw_attest(
    server: &ServerProcess,
    bundle: &std::path::Path,
    first: tessera::proto::tessera::AttestRequest,
) -> Result<tessera::proto::tessera::AttestResponse, tonic::Status> {
    let roots = tessera::ca::load_pem_certs(bundle).unwrap();
    let td = tessera::spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
    let tls = tessera::tls::client_config(&roots, &tessera::ca::node::server_spiffe_id(&td), None)
        .unwrap();
    let channel = tessera::tls::channel(&server.address, tls).unwrap();
    let mut client = tessera::proto::tessera::node_client::NodeClient::new(channel);
    let mut responses = client
        .attest(tokio_stream::iter([first]))
        .await?
        .into_inner();
    responses
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("no answer"))
}

#[tokio::test(flavor = "multi_thread")]
async fn csrs_asking_for_more_are_refused_without_spending_the_token() {
    use rcgen::{CertificateParams, KeyPair, SanType};
    use tessera::proto::tessera::{AttestRequest, Csrs, JoinTokenAttestation, attest_request};

    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let token = server.join_token();
    let request = |csrs: Csrs| AttestRequest {
        step: Some(attest_request::Step::JoinToken(JoinTokenAttestation {
            token: token.clone(),
        })),
        csrs: Some(csrs),
    };
    let (_, good_svid) = tessera::ca::node::key_and_csr().unwrap();
    let (_, good_ca) = tessera::ca::node::key_and_csr().unwrap();

    // A CA CSR naming a workload ID (a path) instead of the bare trust domain.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TRUST_DOMAIN}/admin").try_into().unwrap(),
    )];
    let path_bearing = params.serialize_request(&key).unwrap().der().to_vec();
    let status = raw_attest(
        &server,
        &bundle,
        request(Csrs {
            node_svid: good_svid.clone(),
            ca: path_bearing,
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("/admin"), "{status:?}");

    // A CA CSR asking to sign CAs below it.
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(3));
    let deep_ca = params.serialize_request(&key).unwrap().der().to_vec();
    let status = raw_attest(
        &server,
        &bundle,
        request(Csrs {
            node_svid: good_svid.clone(),
            ca: deep_ca,
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // Garbage.
    let status = raw_attest(
        &server,
        &bundle,
        request(Csrs {
            node_svid: b"junk".to_vec(),
            ca: good_ca.clone(),
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // The token was never spent: good CSRs still attest with it.
    let granted = raw_attest(
        &server,
        &bundle,
        request(Csrs {
            node_svid: good_svid,
            ca: good_ca,
        }),
    )
    .await
    .unwrap();
    assert!(matches!(
        granted.step,
        Some(tessera::proto::tessera::attest_response::Step::Credentials(
            _
        ))
    ));
    assert!(
        server.logs().contains("node API request refused"),
        "{}",
        server.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_ca_cannot_mint_its_way_into_another_node() {
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let a = AgentProcess::start(
        dir.path(),
        "a",
        &server.address,
        &bundle,
        &format!("join_token = \"{}\"", server.join_token()),
    );
    let b = AgentProcess::start(
        dir.path(),
        "b",
        &server.address,
        &bundle,
        &format!("join_token = \"{}\"", server.join_token()),
    );
    let victim = std::fs::read_to_string(b.state_dir.join("upstream/node_id")).unwrap();

    // Node A's intermediate can sign any ID of the trust domain, including B's node ID.
    let read_cert = |name: &str| {
        ::pem::parse(std::fs::read_to_string(a.state_dir.join("upstream").join(name)).unwrap())
            .unwrap()
            .into_contents()
    };
    let ca_der = read_cert("node_ca.pem");
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(a.state_dir.join("upstream/node_ca_key.pem")).unwrap(),
    )
    .unwrap();
    let roots = tessera::ca::load_pem_certs(&bundle).unwrap();
    let signing = tessera::ca::node::signing_ca_from_grant(&ca_der, ca_key, roots).unwrap();
    let td = tessera::spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
    let forged_id = tessera::ca::node::node_spiffe_id(&td, &victim).unwrap();
    let forged = tessera::ca::mint_x509_svid(
        &signing,
        &tessera::ca::LeafRequest {
            spiffe_id: &forged_id,
            ttl: Duration::from_secs(300),
            dns_names: &[],
            not_after_cap: None,
            task: None,
        },
        std::time::SystemTime::now(),
    )
    .unwrap();
    let mut client = node_client(&server, &bundle, &forged.chain_der, &forged.key_pkcs8);
    let status = client
        .sync(tessera::proto::tessera::SyncRequest::default())
        .await
        .map(|_| ())
        .expect_err("a forged node SVID is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("signed by a root"), "{status:?}");
}

/// Sets this process's soft descriptor limit, returning the previous one. Children inherit it.
fn set_descriptor_limit(soft: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit through valid pointers.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        let previous = limit.rlim_cur;
        limit.rlim_cur = soft.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        previous
    }
}

/// Descriptors `pid` holds.
fn descriptors_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// Keeps `size` TCP connections to `address` open from 127.0.0.2 without ever starting a TLS
/// handshake, opening a new one whenever the server closes one, until `stop` is set or a
/// minute has passed. `closed` counts the connections the server closed.
fn half_open_flood(
    address: std::net::SocketAddr,
    size: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    closed: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let mut attackers = Vec::new();
            for _ in 0..size {
                let (stop, closed) = (stop.clone(), closed.clone());
                attackers.push(tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && tokio::time::Instant::now() < deadline
                    {
                        let socket = tokio::net::TcpSocket::new_v4().unwrap();
                        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                        let Ok(mut connection) = socket.connect(address).await else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        };
                        // Held until the server closes it, looking at the clock twice a second.
                        let mut byte = [0u8; 1];
                        loop {
                            let read = tokio::io::AsyncReadExt::read(&mut connection, &mut byte);
                            match tokio::time::timeout(Duration::from_millis(500), read).await {
                                Ok(_) => {
                                    closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    // Reconnect soon, not in a busy loop on a shared machine.
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    break;
                                }
                                Err(_)
                                    if stop.load(std::sync::atomic::Ordering::Relaxed)
                                        || tokio::time::Instant::now() >= deadline =>
                                {
                                    return;
                                }
                                Err(_) => {}
                            }
                        }
                    }
                }));
            }
            for attacker in attackers {
                let _ = attacker.await;
            }
        })
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_half_open_tls_flood_neither_starves_the_server_nor_keeps_a_new_node_out() {
    let dir = world_dir();
    // The server gets 512 descriptors (as a small default would give it), so that 600 held
    // connections would exhaust them; this test process keeps its own, higher limit.
    let previous = set_descriptor_limit(512);
    let server = ServerProcess::start(dir.path(), "server", "");
    set_descriptor_limit(previous);
    let pid = server.child.as_ref().unwrap().id();
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let token = server.join_token();
    let idle = descriptors_of(pid);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let flood = half_open_flood(
        server.address.parse().unwrap(),
        600,
        stop.clone(),
        closed.clone(),
    );
    let closed_so_far = || closed.load(std::sync::atomic::Ordering::Relaxed);
    // The flood is at full strength once the server holds its share of it and has closed as
    // many connections as the flood keeps open, so every later call meets a server that is
    // already turning connections away.
    let deadline = Instant::now() + Duration::from_secs(30);
    while descriptors_of(pid) < idle + 8 || closed_so_far() < 600 {
        assert!(
            Instant::now() < deadline,
            "the flood never reached full strength: {} closed by the server",
            closed_so_far()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed_before_the_agent = closed_so_far();

    let mut most = 0;
    let mut sample = || {
        most = most.max(descriptors_of(pid));
    };
    for _ in 0..3 {
        let out = server.admin(&["node", "list"]);
        assert!(
            out.status.success(),
            "the admin socket answers during the flood: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        sample();
    }
    let agent = AgentProcess::start(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &format!("join_token = \"{token}\""),
    );
    sample();
    create_entry(&server, "/during-flood", &[]);
    wait_for_identity(&agent, &spiffe_id("/during-flood")).await;
    sample();

    // The attackers run until told to stop (or for a minute): still running, the flood lasted
    // through the join.
    assert!(
        !flood.is_finished(),
        "the flood ended before the agent joined"
    );
    let closed_during_the_join = closed_so_far() - closed_before_the_agent;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    eprintln!(
        "server descriptors: {idle} idle, at most {most} under a flood of 600 half-open connections ({} closed by the server, {closed_during_the_join} while the agent joined)",
        closed_so_far()
    );
    assert!(most < 256, "the server held {most} descriptors of its 512");
}

#[test]
fn an_admin_call_from_another_user_is_refused_with_the_rule() {
    use std::os::unix::fs::PermissionsExt;
    if !require_root("an_admin_call_from_another_user_is_refused_with_the_rule") {
        return;
    }
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    // The socket is 0600 by default, so another user could not even connect; open it up here
    // to reach the server's own check, as an operator widening the mode would.
    std::fs::set_permissions(&server.admin_socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket = server.admin_socket.display().to_string();
    // The build's own binary may sit under a directory only root can enter (a checkout in a
    // private temporary directory): the other user runs a copy it can reach.
    let tessera = dir.path().join("tessera-for-others");
    std::fs::copy(TESSERA, &tessera).unwrap();
    std::fs::set_permissions(&tessera, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = 65_534;
    let out = run_as(
        nobody,
        &tessera,
        &["entry", "list", "--admin-socket", &socket],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the admin API is for root and the server's user (uid 0); this caller runs as uid \
             {nobody}"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("run this command as root"), "{stderr}");
    assert!(!stderr.contains("broken pipe"), "{stderr}");
    // Root still administers over the same socket.
    assert!(server.admin(&["entry", "list"]).status.success());
}

/// The lines of `log` past its first `from` bytes at WARN or ERROR.
fn warnings_after(log: &str, from: usize) -> Vec<String> {
    log.get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_orderly_stop_of_agent_and_server_logs_no_warnings() {
    let dir = world_dir();
    let mut server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let mut agent = AgentProcess::start(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &format!("join_token = \"{}\"", server.join_token()),
    );
    // A workload holding an identity: the agent has a sync stream, an event upload and a
    // Workload API stream open when it is told to stop.
    create_entry(&server, "/stopping", &["--selector", &my_uid_selector()]);
    wait_for_identity(&agent, &spiffe_id("/stopping")).await;
    let mut held = open_stream(&agent).await;
    next_message(&mut held).await.unwrap();

    let agent_log_before = agent.logs().len();
    let server_log_before = server.logs().len();
    let term = nix::sys::signal::Signal::SIGTERM as i32;
    agent.child.as_ref().unwrap().signal(term).unwrap();
    assert!(agent.wait_exit(Duration::from_secs(30)).success());
    let server_process = server.child.as_mut().unwrap();
    server_process.signal(term).unwrap();
    assert!(
        server_process
            .wait_exit(Duration::from_secs(30))
            .unwrap()
            .success()
    );
    server.kill();

    let agent_warnings = warnings_after(&agent.logs(), agent_log_before);
    assert!(agent_warnings.is_empty(), "{agent_warnings:#?}");
    let server_warnings = warnings_after(&server.logs(), server_log_before);
    assert!(server_warnings.is_empty(), "{server_warnings:#?}");
    assert!(
        server.logs().contains("server stopped"),
        "{}",
        server.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn server_mode_wits_are_signed_by_the_server_and_accounted_for() {
    use tokio_stream::StreamExt;
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let mut agent = AgentProcess::spawn_with(
        dir.path(),
        "agent",
        &server.address,
        &bundle,
        &format!("join_token = \"{}\"", server.join_token()),
        "[wit]\nenabled = true\n\n[events]\nuse_window = \"1s\"",
    );
    agent.wait_ready();
    create_entry(&server, "/witness", &[]);
    wait_for_identity(&agent, &spiffe_id("/witness")).await;

    let mut client = tessera::cli::client::connect(&agent.uri()).await.unwrap();
    let wit = client
        .fetch_witsvid(tessera::proto::workload::WitsvidRequest::default())
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap()
        .svids
        .remove(0);
    let bundles = client
        .fetch_wit_bundles(tessera::proto::workload::WitBundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();
    let set: tessera::jwt::JwkSet =
        serde_json::from_str(bundles.bundles.values().next().unwrap()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let valid = tessera::jwt::wit::validate_wit(&wit.wit_svid, now, |_| Some(&set)).unwrap();
    assert_eq!(valid.spiffe_id.as_str(), spiffe_id("/witness"));
    // The server signed it (its key is the bundle's) and recorded it before handing it out.
    let listed = server.admin_json(&["jwt", "list"]);
    let record = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["jti"] == valid.jti.as_deref().unwrap())
        .unwrap_or_else(|| panic!("the WIT in the inventory: {listed}"));
    assert_eq!(record["audience"], serde_json::json!([]), "{record}");
    let issued = server.admin_json(&["events", "list", "--kind", "jwt_issued"]);
    assert!(
        issued.as_array().unwrap().iter().any(|e| e["detail"]
            .as_str()
            .unwrap()
            .starts_with("WIT-SVID signed by server")),
        "{issued}"
    );

    // Uses reach the inventory, aggregated: a JWT-SVID fetched once and validated twice.
    let token = client
        .fetch_jwtsvid(tessera::proto::workload::JwtsvidRequest {
            audience: vec!["api".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid;
    for _ in 0..2 {
        client
            .validate_jwtsvid(tessera::proto::workload::ValidateJwtsvidRequest {
                audience: "api".into(),
                svid: token.clone(),
            })
            .await
            .unwrap();
    }
    let jti = jws_part(&token, 1)["jti"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let listed = server.admin_json(&["jwt", "list"]);
        let uses = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["jti"] == jti.as_str())
            .map_or(0, |j| j["uses"].as_u64().unwrap());
        if uses == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "uses of {jti} not reported: {listed}\n{}",
            agent.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let used = server.admin_json(&["events", "list", "--kind", "jwt_used"]);
    let validated: Vec<_> = used
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["jti"] == jti.as_str() && e["detail"] == "validated")
        .collect();
    assert_eq!(validated.len(), 1, "aggregated: {used}");
    assert_eq!(validated[0]["count"], 2, "{used}");
}

/// A node API client of `server` presenting `chain` (leaf first) and its PKCS#8 `key`.
fn node_client(
    server: &ServerProcess,
    bundle: &std::path::Path,
    chain: &[Vec<u8>],
    key: &[u8],
) -> tessera::proto::tessera::node_client::NodeClient<tonic::transport::Channel> {
    let roots = tessera::ca::load_pem_certs(bundle).unwrap();
    let td = tessera::spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
    let tls = tessera::tls::client_config(
        &roots,
        &tessera::ca::node::server_spiffe_id(&td),
        Some((chain, key)),
    )
    .unwrap();
    tessera::proto::tessera::node_client::NodeClient::new(
        tessera::tls::channel(&server.address, tls).unwrap(),
    )
}

/// Opens a sync stream to `server` as the node of agent `agent`, with its own node SVID.
async fn sync_as(
    server: &ServerProcess,
    agent: &AgentProcess,
    bundle: &std::path::Path,
    since_revision: i64,
) -> tonic::Streaming<tessera::proto::tessera::SyncUpdate> {
    let upstream = agent.state_dir.join("upstream");
    let chain: Vec<Vec<u8>> =
        ::pem::parse_many(std::fs::read_to_string(upstream.join("node_svid.pem")).unwrap())
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents())
            .collect();
    let key = ::pem::parse(std::fs::read_to_string(upstream.join("node_svid_key.pem")).unwrap())
        .unwrap()
        .into_contents();
    node_client(server, bundle, &chain, &key)
        .sync(tessera::proto::tessera::SyncRequest { since_revision })
        .await
        .expect("sync stream")
        .into_inner()
}

fn entry_ids(update: &tessera::proto::tessera::SyncUpdate) -> Vec<String> {
    let mut ids: Vec<String> = update.upserted.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnecting_node_catches_up_from_its_revision_across_a_server_restart() {
    let dir = world_dir();
    let mut server = ServerProcess::start(dir.path(), "server", "");
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let agent = AgentProcess::start(
        dir.path(),
        "a",
        &server.address,
        &bundle,
        &format!("join_token = \"{}\"", server.join_token()),
    );
    let kept = server.create_entry("/kept", &[]);
    let removed = server.create_entry("/removed", &[]);

    let mut stream = sync_as(&server, &agent, &bundle, 0).await;
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.full);
    let mut expected = vec![kept.clone(), removed.clone()];
    expected.sort();
    assert_eq!(entry_ids(&first), expected);
    let revision = first.revision;
    assert!(revision > 0);
    drop(stream);

    // The server restarts; meanwhile one entry is added and one deleted.
    server.kill();
    server.restart();
    let added = server.create_entry("/added", &[]);
    assert!(
        server
            .admin(&["entry", "delete", &removed])
            .status
            .success()
    );

    let mut stream = sync_as(&server, &agent, &bundle, revision).await;
    let caught_up = stream.message().await.unwrap().unwrap();
    assert!(
        !caught_up.full,
        "only the changes since revision {revision}"
    );
    assert_eq!(entry_ids(&caught_up), std::slice::from_ref(&added));
    assert_eq!(caught_up.removed, std::slice::from_ref(&removed));
    assert!(caught_up.revision > revision);
    assert!(caught_up.bundle.is_some() && caught_up.crls.is_some());

    // A revision the server does not have (another database's): the full state.
    let mut stream = sync_as(&server, &agent, &bundle, caught_up.revision + 1000).await;
    let full = stream.message().await.unwrap().unwrap();
    assert!(full.full);
    let mut expected = vec![kept, added];
    expected.sort();
    assert_eq!(entry_ids(&full), expected);

    // The agent itself reconnected the same way: its stream after the restart caught up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.logs().contains("caught up with the server's changes") {
        assert!(Instant::now() < deadline, "{}", agent.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}
