//! The Workload API as real SPIFFE clients see it: the `spiffe` crate against an agent on a real
//! Unix socket, with this test process as the attested caller.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use spiffe::{TrustDomain, WorkloadApiClient, WorkloadApiError, X509Source};
use tessera::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tessera::proto::workload::{
    JwtsvidRequest, WitsvidRequest, X509BundlesRequest, X509svidRequest,
};
use tokio_stream::StreamExt;

fn this_exe() -> String {
    std::env::current_exe().unwrap().display().to_string()
}

fn is_no_identity(e: &WorkloadApiError) -> bool {
    matches!(
        e,
        WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_)
    )
}

#[tokio::test]
async fn spiffe_crate_gets_every_matching_identity_default_first() {
    let uid = my_uid_selector();
    let path = format!("unix:path:{}", this_exe());
    let entries = [
        entry("/by-uid", &[&uid], "5m", "hint = \"uid\""),
        entry("/by-uid-and-exe", &[&uid, &path], "5m", "hint = \"exe\""),
        // Same hint as the first: must be left out of the response.
        entry("/duplicate-hint", &[&uid], "5m", "hint = \"uid\""),
        entry("/other-user", &["unix:uid:4242"], "5m", ""),
    ]
    .concat();
    let agent = start_agent(&entries).await;
    let client = WorkloadApiClient::connect_to(agent.uri()).await.unwrap();

    let svids = client.fetch_all_x509_svids().await.unwrap();
    let ids: Vec<String> = svids.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://example.org/by-uid",
            "spiffe://example.org/by-uid-and-exe"
        ]
    );
    assert_eq!(svids[0].hint(), Some("uid"));
    let default = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        default.spiffe_id().to_string(),
        "spiffe://example.org/by-uid"
    );

    let bundles = client.fetch_x509_bundles().await.unwrap();
    let bundle = bundles
        .get(&TrustDomain::new(TRUST_DOMAIN).unwrap())
        .expect("bundle for example.org");
    let bundle_der: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(bundle_der.len(), 1);
    assert_eq!(bundle_der, agent.handle.cache.ca().bundle);

    for svid in &svids {
        let chain: Vec<Vec<u8>> = svid
            .cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        let not_after = check_x509_svid(&chain, &bundle_der, &svid.spiffe_id().to_string());
        let ttl = not_after - now_secs();
        assert!((290..=300).contains(&ttl), "5m TTL, got {ttl}s");
    }
    // A second caller matching the same entries shares the SVIDs.
    let again = WorkloadApiClient::connect_to(agent.uri()).await.unwrap();
    let svid = again.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.leaf().as_bytes(), default.leaf().as_bytes());
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn leaf_not_after(svid: &spiffe::X509Svid) -> i64 {
    let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).unwrap();
    cert.validity().not_after.timestamp()
}

#[tokio::test]
async fn x509_source_sees_each_rotation_before_expiry() {
    let agent = start_agent(&entry("/rotating", &[&my_uid_selector()], "4s", "")).await;
    let source = X509Source::builder()
        .endpoint(agent.uri())
        .initial_sync_timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let mut updates = source.updated();
    let mut current = source.svid().unwrap();
    for _ in 0..3 {
        let old_not_after = leaf_not_after(&current);
        tokio::time::timeout(Duration::from_secs(6), updates.changed())
            .await
            .expect("a rotation within the TTL")
            .unwrap();
        let received_at = now_secs();
        let next = source.svid().unwrap();
        assert_ne!(next.leaf().as_bytes(), current.leaf().as_bytes());
        assert!(
            received_at < old_not_after,
            "rotation arrived at {received_at}, old SVID expired at {old_not_after}"
        );
        current = next;
    }
    source.shutdown().await;
}

#[tokio::test]
async fn protocol_rules_headers_unimplemented_health_and_reflection() {
    let agent = start_agent(&entry("/w", &[&my_uid_selector()], "5m", "")).await;
    let channel = tessera::cli::client::channel(agent.socket()).await.unwrap();

    // No security header: InvalidArgument on every Workload API method.
    let mut bare = SpiffeWorkloadApiClient::new(channel.clone());
    let status = bare.fetch_x509svid(X509svidRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = bare
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let status = bare
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // With it: WIT methods are Unimplemented (JWT-SVIDs: tests/jwt.rs).
    let mut client = tessera::cli::client::connect(&agent.uri()).await.unwrap();
    let status = client
        .fetch_witsvid(WitsvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    // gRPC health reports the Workload API as serving, with no header needed.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "SpiffeWorkloadAPI"] {
        let response = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }

    // Server reflection lists the service.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    assert!(
        list.service.iter().any(|s| s.name == "SpiffeWorkloadAPI"),
        "{:?}",
        list.service
    );
}

#[tokio::test]
async fn a_caller_matching_nothing_is_denied() {
    let agent = start_agent(&entry("/someone-else", &["unix:uid:4242"], "5m", "")).await;
    let client = WorkloadApiClient::connect_to(agent.uri()).await.unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(is_no_identity(&err), "{err:?}");
    let err = client.fetch_x509_bundles().await.unwrap_err();
    assert!(is_no_identity(&err), "{err:?}");

    // A verifier-only workload gets bundles when the operator allows it.
    let open = start_agent_with(
        &entry("/someone-else", &["unix:uid:4242"], "5m", ""),
        "allow_unauthenticated_verifiers = true",
        Default::default(),
    )
    .await;
    let client = WorkloadApiClient::connect_to(open.uri()).await.unwrap();
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(
        bundles
            .get(&TrustDomain::new(TRUST_DOMAIN).unwrap())
            .is_some()
    );
    assert!(is_no_identity(&client.fetch_x509_svid().await.unwrap_err()));
}

#[tokio::test]
async fn entry_changes_reach_open_streams_and_removal_ends_them() {
    let uid = my_uid_selector();
    let first = entry("/first", &[&uid], "5m", "");
    let agent = start_agent(&first).await;
    let client = WorkloadApiClient::connect_to(agent.uri()).await.unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let initial = stream.next().await.unwrap().unwrap();
    assert_eq!(initial.svids().len(), 1);

    // Added entry: the stream carries both identities.
    agent.rewrite_entries(&[first.clone(), entry("/second", &[&uid], "5m", "")].concat());
    let both = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ids: Vec<String> = both
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/first", "spiffe://example.org/second"]
    );

    // A broken file is refused and the last good entries stay in force.
    let refused = agent.handle.entry_reloads.refused();
    std::fs::write(
        &agent.config_path,
        "trust_domain = \"example.org\"\n[[entry]]\nspiffe_id = 7\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.handle.entry_reloads.refused() == refused {
        assert!(Instant::now() < deadline, "the broken file was never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(client.fetch_all_x509_svids().await.unwrap().len(), 2);

    // Every matching entry removed: the stream ends with PermissionDenied.
    agent.rewrite_entries(&entry("/other", &["unix:uid:4242"], "5m", ""));
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    match end {
        Some(Err(e)) => assert!(is_no_identity(&e), "{e:?}"),
        other => panic!(
            "expected PermissionDenied, got {:?}",
            other.map(|r| r.map(|v| v.svids().len()))
        ),
    }
}

#[tokio::test]
async fn registration_expiry_caps_the_svid_and_ends_the_stream() {
    let expires = SystemTime::now() + Duration::from_secs(3);
    let expires_text = humantime::format_rfc3339_seconds(expires).to_string();
    let agent = start_agent(&entry(
        "/short-lived-registration",
        &[&my_uid_selector()],
        "5m",
        &format!("expires_at = \"{expires_text}\""),
    ))
    .await;
    let client = WorkloadApiClient::connect_to(agent.uri()).await.unwrap();
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let context = stream.next().await.unwrap().unwrap();
    let not_after = leaf_not_after(&context.svids()[0]);
    let expires_secs = expires
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        not_after <= expires_secs,
        "SVID outlives its registration: {not_after} > {expires_secs}"
    );

    loop {
        match tokio::time::timeout(Duration::from_secs(6), stream.next())
            .await
            .unwrap()
        {
            Some(Ok(_)) => continue, // a renewal before expiry is fine
            Some(Err(e)) => {
                assert!(is_no_identity(&e), "{e:?}");
                break;
            }
            None => panic!("stream ended without PermissionDenied"),
        }
    }
    assert!(now_secs() >= expires_secs - 1);
}

#[tokio::test]
async fn abusive_clients_do_not_disturb_rotation_for_others() {
    use tokio::io::AsyncWriteExt;
    let agent = start_agent(&entry("/steady", &[&my_uid_selector()], "4s", "")).await;
    let source = X509Source::builder()
        .endpoint(agent.uri())
        .build()
        .await
        .unwrap();
    let mut updates = source.updated();
    let before = leaf_not_after(&source.svid().unwrap());

    // 200 connections sending garbage, 100 that start a stream and vanish mid-way.
    let mut abusers = Vec::new();
    for i in 0..200u32 {
        let path = agent.socket().to_path_buf();
        abusers.push(tokio::spawn(async move {
            if let Ok(mut s) = tokio::net::UnixStream::connect(&path).await {
                let junk: Vec<u8> = (0..4096u32)
                    .map(|b| (b.wrapping_mul(31).wrapping_add(i)) as u8)
                    .collect();
                let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                let _ = s.write_all(&junk).await;
            }
        }));
    }
    for _ in 0..100 {
        let uri = agent.uri();
        abusers.push(tokio::spawn(async move {
            if let Ok(client) = WorkloadApiClient::connect_to(uri).await
                && let Ok(mut stream) = client.stream_x509_svids().await
            {
                let _ = stream.next().await;
            }
        }));
    }
    for a in abusers {
        a.await.unwrap();
    }

    tokio::time::timeout(Duration::from_secs(6), updates.changed())
        .await
        .expect("rotation still delivered")
        .unwrap();
    assert!(now_secs() < before);
    let fresh = WorkloadApiClient::connect_to(agent.uri()).await.unwrap();
    fresh.fetch_x509_svid().await.unwrap();
    source.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable_and_removes_the_socket() {
    let agent = start_agent(&entry("/w", &[&my_uid_selector()], "5m", "")).await;
    let mut stream = svid_stream(&agent).await;
    stream.message().await.unwrap().unwrap();
    let socket = agent.socket().to_path_buf();
    let stopping = tokio::spawn(agent.handle.stop());
    let status = tokio::time::timeout(Duration::from_secs(3), stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(status.message(), "agent is shutting down");
    tokio::time::timeout(Duration::from_secs(7), stopping)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!socket.exists());
}

#[tokio::test]
async fn streams_reattest_when_entries_start_selecting_on_the_executable_hash() {
    let uid = my_uid_selector();
    let plain = entry("/plain", &[&uid], "5m", "");
    let agent = start_agent(&plain).await;
    let mut stream = svid_stream(&agent).await;
    assert_eq!(stream.message().await.unwrap().unwrap().svids.len(), 1);

    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let digest = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &exe));
    let hashed = entry(
        "/hashed",
        &[&uid, &format!("unix:sha256:{digest}")],
        "5m",
        "",
    );
    agent.rewrite_entries(&[plain, hashed].concat());

    // The open stream was attested without the hash: it is told to reconnect.
    let status = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let mut stream = svid_stream(&agent).await;
    let ids: Vec<String> = stream
        .message()
        .await
        .unwrap()
        .unwrap()
        .svids
        .into_iter()
        .map(|s| s.spiffe_id)
        .collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/plain", "spiffe://example.org/hashed"]
    );
}

#[tokio::test]
async fn a_bundle_change_reaches_svid_and_bundle_streams() {
    let agent = start_agent(&entry("/w", &[&my_uid_selector()], "5m", "")).await;
    let client = WorkloadApiClient::connect_to(agent.uri()).await.unwrap();
    let mut bundles = client.stream_x509_bundles().await.unwrap();
    let mut svids = svid_stream(&agent).await;
    let td = TrustDomain::new(TRUST_DOMAIN).unwrap();
    let first_bundles = bundles.next().await.unwrap().unwrap();
    assert_eq!(first_bundles.get(&td).unwrap().authorities().len(), 1);
    let first = svids.message().await.unwrap().unwrap();

    // What the CA renewal publishes at half-life: the next root, ahead of its use.
    let source = tessera::ca::LocalCaSource::Generated {
        state_dir: agent.dir.path().join("state"),
        ttl: Duration::from_secs(365 * 24 * 3600),
    };
    let td_name = tessera::spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
    let current = agent.handle.cache.ca();
    let prepared = tessera::ca::renew_local_ca(
        &source,
        &td_name,
        &current,
        tessera::ca::RenewalStep::Prepare,
    )
    .unwrap()
    .unwrap();
    agent.handle.cache.set_ca(std::sync::Arc::new(prepared));

    let updated = tokio::time::timeout(Duration::from_secs(5), bundles.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(updated.get(&td).unwrap().authorities().len(), 2);
    let next = tokio::time::timeout(Duration::from_secs(5), svids.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        next.svids[0].x509_svid, first.svids[0].x509_svid,
        "same signer: same SVID"
    );
    assert_ne!(
        next.svids[0].bundle, first.svids[0].bundle,
        "the new root rides along"
    );
    assert_eq!(split_der(&next.svids[0].bundle).len(), 2);
}
