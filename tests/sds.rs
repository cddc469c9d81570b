//! Envoy's Secret Discovery Service on the workload socket, driven by a client built from
//! Envoy's own API types (the `envoy-types` crate), checking what Envoy checks: resource types
//! and names, PEM contents, the SPIFFE validator's configuration, ACK and NACK, and pushes on
//! rotation, bundle and CRL changes. The CRLs it serves are checked the way Envoy's OpenSSL
//! checks them (every CA of the chain) with `openssl verify -crl_check_all`.

mod common;

use std::collections::BTreeMap;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use common::sds::*;
use common::*;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, SpiffeCertValidatorConfig,
};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tessera::agent::BuildOptions;
use tessera::agent::sds::{SECRET_TYPE_URL, SPIFFE_VALIDATOR, SPIFFE_VALIDATOR_TYPE_URL};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Checks a tls_certificate as Envoy would load it: a PEM chain whose leaf is an X.509-SVID
/// for `spiffe_id` under `bundle`, and a PKCS#8 key that is the leaf's. Returns the serial.
fn check_certificate(secret: &Secret, spiffe_id: &str, bundle: &[Vec<u8>]) -> String {
    let certificate = tls_certificate(secret);
    let chain = pem_blocks(inline(&certificate.certificate_chain), "CERTIFICATE");
    check_x509_svid(&chain, bundle, spiffe_id);
    let keys = pem_blocks(inline(&certificate.private_key), "PRIVATE KEY");
    assert_eq!(keys.len(), 1, "one PKCS#8 key");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &keys[0]).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        pair.public_key().as_ref(),
        "the key is the leaf's"
    );
    hex::encode(leaf.tbs_certificate.raw_serial())
}

/// The SPIFFE validator's trust bundle for `example.org`: its certificates and its CRLs.
fn spiffe_validator(secret: &Secret) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let context = validation_context(secret);
    assert!(context.trusted_ca.is_none(), "the SPIFFE validator form");
    let validator = context
        .custom_validator_config
        .as_ref()
        .expect("custom_validator_config");
    assert_eq!(validator.name, SPIFFE_VALIDATOR);
    let typed = validator.typed_config.as_ref().unwrap();
    assert_eq!(typed.type_url, SPIFFE_VALIDATOR_TYPE_URL);
    let config = SpiffeCertValidatorConfig::decode(typed.value.as_slice()).unwrap();
    assert_eq!(config.trust_domains.len(), 1);
    let domain = &config.trust_domains[0];
    assert_eq!(domain.name, TRUST_DOMAIN, "a name without spiffe://");
    let bytes = inline(&domain.trust_bundle);
    (
        pem_blocks(bytes, "CERTIFICATE"),
        pem_blocks(bytes, "X509 CRL"),
    )
}

fn two_entries(ttl: &str) -> String {
    let me = my_uid_selector();
    format!(
        "{}{}",
        entry("/front", &[&me], ttl, "hint = \"front\""),
        entry("/second", &[&me], "1h", "")
    )
}

#[tokio::test]
async fn stream_secrets_serves_svids_and_the_spiffe_validator_and_pushes_rotations() {
    // Rotated about every 5 s: the checks for silence below fit between two rotations.
    let agent = start_agent(&two_entries("10s")).await;
    let mut stream = stream_secrets(
        agent.socket(),
        DiscoveryRequest {
            node: Some(node("envoy-1", false)),
            ..request(&["default", "ROOTCA"], "", "")
        },
    )
    .await;

    let first = stream.next().await;
    assert!(!first.nonce.is_empty());
    let got = secrets(&first);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["ROOTCA", "default"],
        "secrets named as asked"
    );
    let (bundle, crls) = spiffe_validator(&got["ROOTCA"]);
    assert!(!bundle.is_empty());
    assert_eq!(crls.len(), 1, "a CRL for the one CA that signs");
    let serial = check_certificate(&got["default"], "spiffe://example.org/front", &bundle);

    // An ACK is not answered.
    stream
        .send(request(
            &["default", "ROOTCA"],
            &first.version_info,
            &first.nonce,
        ))
        .await;
    stream.quiet("an ACK asks for nothing").await;

    // A rotation is pushed, with a new version and nonce.
    let rotated = stream.next().await;
    assert_ne!(rotated.version_info, first.version_info);
    assert_ne!(rotated.nonce, first.nonce);
    let now = secrets(&rotated);
    let (bundle, _) = spiffe_validator(&now["ROOTCA"]);
    let new_serial = check_certificate(&now["default"], "spiffe://example.org/front", &bundle);
    assert_ne!(new_serial, serial, "the rotated SVID");

    // A NACK is logged, and the rejected version is not sent again.
    stream
        .send(DiscoveryRequest {
            error_detail: Some(RpcStatus {
                code: 3,
                message: "test: rejected on purpose".into(),
                details: Vec::new(),
            }),
            ..request(&["default", "ROOTCA"], &first.version_info, &rotated.nonce)
        })
        .await;
    stream.quiet("a NACK of the current version").await;

    // A request answering an older response is stale: even a change of names in it is ignored.
    stream
        .send(request(
            &["spiffe://example.org/second"],
            &first.version_info,
            &first.nonce,
        ))
        .await;
    stream.quiet("a stale request").await;

    // A change of names is answered at once, with exactly what is named now.
    stream
        .send(request(
            &["spiffe://example.org/second"],
            &rotated.version_info,
            &rotated.nonce,
        ))
        .await;
    let renamed = stream.next().await;
    let got = secrets(&renamed);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["spiffe://example.org/second"]
    );
    check_certificate(
        &got["spiffe://example.org/second"],
        "spiffe://example.org/second",
        &bundle,
    );
}

#[tokio::test]
async fn no_names_means_everything_and_unknown_names_wait() {
    let agent = start_agent(&two_entries("1h")).await;
    let mut all = stream_secrets(agent.socket(), request(&[], "", "")).await;
    let got = secrets(&all.next().await);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        [
            "spiffe://example.org",
            "spiffe://example.org/front",
            "spiffe://example.org/second"
        ]
    );
    spiffe_validator(&got["spiffe://example.org"]);

    // A name the caller may not have is not made up: nothing is sent until it can be.
    let mut unknown = stream_secrets(
        agent.socket(),
        request(&["spiffe://example.org/other"], "", ""),
    )
    .await;
    unknown.quiet("nothing named is available").await;

    // A type other than secrets is refused, naming it.
    let mut wrong = stream_secrets(
        agent.socket(),
        DiscoveryRequest {
            type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
            ..request(&["default"], "", "")
        },
    )
    .await;
    let status = wrong.within(EXPECT).await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("envoy.config.cluster.v3.Cluster"),
        "{status:?}"
    );
}

#[tokio::test]
async fn plain_trusted_ca_when_the_node_or_the_configuration_asks() {
    let agent = start_agent(&two_entries("1h")).await;
    // Asked by the node's metadata, on the first request.
    let mut stream = stream_secrets(
        agent.socket(),
        DiscoveryRequest {
            node: Some(node("envoy-plain", true)),
            ..request(&["spiffe://example.org", "ALL"], "", "")
        },
    )
    .await;
    let got = secrets(&stream.next().await);
    for name in ["spiffe://example.org", "ALL"] {
        let (roots, crls) = plain_validation(&got[name]);
        assert!(roots.contains("BEGIN CERTIFICATE"), "{roots}");
        assert_eq!(crls.matches("BEGIN X509 CRL").count(), 1, "{crls}");
    }

    // FetchSecrets: the same, unary; a name the caller may not have is NotFound.
    let mut fetch = client(agent.socket()).await;
    let response = fetch
        .fetch_secrets(DiscoveryRequest {
            node: Some(node("envoy-plain", true)),
            ..request(&["ROOTCA", "default"], "", "")
        })
        .await
        .unwrap()
        .into_inner();
    let got = secrets(&response);
    plain_validation(&got["ROOTCA"]);
    let (roots, _) = plain_validation(&got["ROOTCA"]);
    let bundle = tessera::ca::certificates_from_pem(roots.as_bytes()).unwrap();
    check_certificate(&got["default"], "spiffe://example.org/front", &bundle);
    let missing = fetch
        .fetch_secrets(request(&["spiffe://example.org/other"], "", ""))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("spiffe://example.org/other"));

    // Asked by the agent's configuration, for every caller.
    let configured = start_agent_with(
        &two_entries("1h"),
        "[sds]\ndisable_spiffe_cert_validation = true\n",
        BuildOptions::default(),
    )
    .await;
    let response = client(configured.socket())
        .await
        .fetch_secrets(request(&["ROOTCA"], "", ""))
        .await
        .unwrap()
        .into_inner();
    plain_validation(&secrets(&response)["ROOTCA"]);
}

#[tokio::test]
async fn a_caller_without_an_identity_is_refused() {
    let agent = start_agent(&entry("/someone-else", &["unix:uid:65534"], "1h", "")).await;
    let (requests, rx) = mpsc::channel(1);
    requests.send(request(&["default"], "", "")).await.unwrap();
    let refused = client(agent.socket())
        .await
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = client(agent.socket())
        .await
        .fetch_secrets(request(&["ROOTCA"], "", ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
}

#[tokio::test]
async fn delta_secrets_sends_only_what_the_client_lacks() {
    let agent = start_agent(&two_entries("1h")).await;
    let first = DeltaDiscoveryRequest {
        node: Some(node("envoy-delta", false)),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
        ..Default::default()
    };
    let mut stream = delta_secrets(agent.socket(), first.clone()).await;
    let response = stream.next().await;
    assert_eq!(response.type_url, SECRET_TYPE_URL);
    let held: BTreeMap<String, String> = response
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    assert_eq!(held.keys().collect::<Vec<_>>(), ["ROOTCA", "default"]);
    for resource in &response.resources {
        assert_eq!(
            unpack(resource.resource.as_ref().unwrap()).name,
            resource.name
        );
    }
    stream
        .send(DeltaDiscoveryRequest {
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    stream.quiet("an ACK asks for nothing").await;

    // A second client that connects holding the current versions is sent nothing.
    let mut again = delta_secrets(
        agent.socket(),
        DeltaDiscoveryRequest {
            initial_resource_versions: held.clone().into_iter().collect(),
            ..first.clone()
        },
    )
    .await;
    again.quiet("the client holds every current version").await;
    // One that holds an old version of one of them is sent that one.
    let mut stale = held.clone();
    stale.insert("default".into(), "0".into());
    let mut behind = delta_secrets(
        agent.socket(),
        DeltaDiscoveryRequest {
            initial_resource_versions: stale.into_iter().collect(),
            ..first
        },
    )
    .await;
    let caught_up = behind.next().await;
    let names: Vec<_> = caught_up
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["default"]);
    assert_eq!(caught_up.resources[0].version, held["default"]);

    // Subscribing to one more name sends that one alone.
    stream
        .send(DeltaDiscoveryRequest {
            resource_names_subscribe: vec!["spiffe://example.org/second".into()],
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await;
    let added = stream.next().await;
    let names: Vec<_> = added.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["spiffe://example.org/second"]);

    // The entry behind it goes: the client is told to forget it, and nothing else changes.
    agent.rewrite_entries(&entry("/front", &[&my_uid_selector()], "1h", ""));
    let removed = stream.next().await;
    assert_eq!(removed.removed_resources, ["spiffe://example.org/second"]);
    assert!(
        removed.resources.iter().all(|r| r.name == "ROOTCA"),
        "only the CRL set may change with it: {:?}",
        removed
            .resources
            .iter()
            .map(|r| &r.name)
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_revoked_svid_fails_chain_checking_with_the_crls_sds_serves() {
    let me = my_uid_selector();
    let keep = entry("/front", &[&me], "1h", "");
    let agent = start_agent(&format!("{keep}{}", entry("/gone", &[&me], "1h", ""))).await;
    let mut stream = stream_secrets(
        agent.socket(),
        DiscoveryRequest {
            node: Some(node("envoy-crl", true)),
            ..request(&["spiffe://example.org/gone", "ROOTCA"], "", "")
        },
    )
    .await;
    let first = stream.next().await;
    let got = secrets(&first);
    let chain =
        inline(&tls_certificate(&got["spiffe://example.org/gone"]).certificate_chain).to_vec();
    let files = tempfile::tempdir().unwrap();
    let write = |response: &BTreeMap<String, Secret>| {
        let (roots, crls) = plain_validation(&response["ROOTCA"]);
        std::fs::write(files.path().join("bundle.pem"), roots).unwrap();
        std::fs::write(files.path().join("crl.pem"), crls).unwrap();
    };
    write(&got);
    std::fs::write(files.path().join("gone.pem"), &chain).unwrap();
    let ok = openssl_verify(files.path(), &files.path().join("gone.pem"));
    assert!(ok.contains(": OK"), "live under the served CRLs: {ok}");
    stream
        .send(request(
            &["spiffe://example.org/gone", "ROOTCA"],
            &first.version_info,
            &first.nonce,
        ))
        .await;

    // The entry is deleted: its SVID is revoked, and the new CRL is pushed to the stream (the
    // SVID's removal and the new CRL may come in one response or two).
    agent.rewrite_entries(&keep);
    let deadline = tokio::time::Instant::now() + EXPECT;
    loop {
        let pushed = stream.next().await;
        let got = secrets(&pushed);
        assert!(
            !got.contains_key("spiffe://example.org/gone"),
            "the revoked SVID is no longer served"
        );
        write(&got);
        let verdict = openssl_verify(files.path(), &files.path().join("gone.pem"));
        if verdict.contains("certificate revoked") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepted: {verdict}"
        );
        stream
            .send(request(
                &["spiffe://example.org/gone", "ROOTCA"],
                &pushed.version_info,
                &pushed.nonce,
            ))
            .await;
    }
}

#[test]
fn an_unmodified_python_sds_client_run_by_another_user() {
    const UID: u32 = 65534;
    let Some(python) = python() else { return };
    if !require_root("an_unmodified_python_sds_client_run_by_another_user") {
        return;
    }
    let dir = world_dir();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        config_text(
            dir.path(),
            &entry("/py-envoy", &[&format!("unix:uid:{UID}")], "4s", ""),
            "",
        ),
    )
    .unwrap();
    let socket = dir.path().join("agent.sock");
    let mut command = tessera_harness::command(env!("CARGO_BIN_EXE_tessera"));
    command
        .args(["agent", "run", "--config"])
        .arg(&config)
        .env("TESSERA_LOG", "info");
    let mut agent = tessera_harness::Process::spawn_logged(
        &mut command,
        "tessera agent",
        &dir.path().join("agent.log"),
    )
    .unwrap();
    agent.wait_for_socket(&socket, EXPECT).unwrap();

    let uri = format!("unix://{}", socket.display());
    let report = python_report(UID, &python, include_str!("python/sds.py"), &[&uri]);
    assert_eq!(report["names"], serde_json::json!(["ROOTCA", "default"]));
    for svid in ["first", "rotated"] {
        assert_eq!(
            report[svid]["spiffe_ids"],
            serde_json::json!(["spiffe://example.org/py-envoy"]),
            "{report}"
        );
        assert_eq!(report[svid]["key_matches"], true, "{report}");
    }
    assert_ne!(
        report["first"]["serial"], report["rotated"]["serial"],
        "{report}"
    );
    assert_eq!(report["versions_differ"], true);
    assert_eq!(
        report["validator"],
        serde_json::json!({
            "name": SPIFFE_VALIDATOR,
            "trust_domains": [TRUST_DOMAIN],
            "roots": 1,
            "crls": 1,
        })
    );
    assert_eq!(report["after_nack_same_version"], false, "{report}");
    let logs = agent.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("NACK") && l.contains("py-envoy rejected it on purpose")),
        "the NACK is logged with its error: {logs}"
    );
}
