//! JWT-SVIDs from a standalone agent, with unmodified clients: the Rust `spiffe` crate (fetch,
//! bundles, the agent's validation, and its own offline validation through `jsonwebtoken` on
//! aws-lc-rs), and py-spiffe with PyJWT run as another user.

mod common;

use common::*;
use spiffe::{JwtSvid, SpiffeId, TrustDomain, WorkloadApiClient};
use tessera::proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest};

const AUDIENCE: &str = "api.example.com";

fn two_entries(selector: &str) -> String {
    format!(
        "{}{}",
        entry("/caller", &[selector], "1h", "hint = \"caller\""),
        entry("/second", &[selector], "1h", "")
    )
}

#[tokio::test]
async fn the_spiffe_crate_fetches_and_validates_jwt_svids() {
    let agent = start_agent(&two_entries(&my_uid_selector())).await;
    let client = WorkloadApiClient::connect_to(agent.uri()).await.unwrap();

    let svid = client.fetch_jwt_svid([AUDIENCE], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/caller");
    assert_eq!(svid.audience(), [AUDIENCE]);
    let lifetime = svid.expiry().unix_timestamp() - time_now();
    assert!(
        (290..=300).contains(&lifetime),
        "5 minutes by default: {lifetime}"
    );
    assert_eq!(svid.hint(), Some("caller"));

    // Every identity when none is named; one by name; none the caller is not entitled to.
    let all = client.fetch_all_jwt_svids([AUDIENCE], None).await.unwrap();
    let ids: Vec<String> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/caller", "spiffe://example.org/second"]
    );
    let second = SpiffeId::new("spiffe://example.org/second").unwrap();
    let named = client
        .fetch_jwt_svid([AUDIENCE], Some(&second))
        .await
        .unwrap();
    assert_eq!(named.spiffe_id(), &second);
    let other = SpiffeId::new("spiffe://example.org/other").unwrap();
    assert!(
        client
            .fetch_jwt_svid([AUDIENCE], Some(&other))
            .await
            .is_err()
    );

    // A repeat is served from the agent's cache: the very same token.
    let again = client.fetch_jwt_svid([AUDIENCE], None).await.unwrap();
    assert_eq!(again.token(), svid.token());

    // Offline validation against the JWT bundle, by the crate's own verifier.
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let bundle = bundles.get(&td).expect("a bundle for example.org");
    assert!(bundle.find_jwt_authority(svid.key_id()).is_some());
    let checked = JwtSvid::parse_and_validate(svid.token(), &bundles, &[AUDIENCE]).unwrap();
    assert_eq!(checked.spiffe_id(), svid.spiffe_id());
    assert!(JwtSvid::parse_and_validate(svid.token(), &bundles, &["someone-else"]).is_err());

    // The agent's validation.
    let validated = client
        .validate_jwt_token(AUDIENCE, svid.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id(), svid.spiffe_id());
    assert!(
        client
            .validate_jwt_token("someone-else", svid.token())
            .await
            .is_err()
    );
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn requests_and_tokens_are_checked_as_the_standard_says() {
    let agent = start_agent(&two_entries(&my_uid_selector())).await;
    let mut raw = tessera::cli::client::connect(&agent.uri()).await.unwrap();
    let fetch = |audience: &[&str], spiffe_id: &str| JwtsvidRequest {
        audience: audience.iter().map(|a| a.to_string()).collect(),
        spiffe_id: spiffe_id.into(),
    };
    let status = raw.fetch_jwtsvid(fetch(&[], "")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("audience is required"),
        "{status:?}"
    );
    let status = raw
        .fetch_jwtsvid(fetch(&[AUDIENCE], "not-an-id"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("not-an-id"), "{status:?}");
    let status = raw
        .fetch_jwtsvid(fetch(&[AUDIENCE], "spiffe://example.org/other"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    let token = default_token(&mut raw).await;
    let validate = |audience: &str, svid: &str| ValidateJwtsvidRequest {
        audience: audience.into(),
        svid: svid.into(),
    };
    let valid = raw
        .validate_jwtsvid(validate(AUDIENCE, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(valid.spiffe_id, "spiffe://example.org/caller");
    let claims = serde_json::to_value(StructJson(valid.claims.unwrap())).unwrap();
    assert_eq!(claims["aud"], serde_json::json!([AUDIENCE]));
    assert_eq!(claims["tessera"]["owner"], "tests");
    assert_eq!(claims["tessera"]["purpose"], "end-to-end test");
    assert!(
        claims["jti"].as_str().is_some_and(|j| j.len() == 32),
        "{claims}"
    );
    for (audience, svid, says) in [
        ("", token.as_str(), "audience is required"),
        (AUDIENCE, "", "svid is required"),
        ("other", token.as_str(), "is not among"),
        (AUDIENCE, "a.b.c", "not a compact JWS"),
    ] {
        let status = raw
            .validate_jwtsvid(validate(audience, svid))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{says}");
        assert!(status.message().contains(says), "{says}: {status:?}");
    }

    // Another agent's token (another key) is refused: its kid is not in this bundle.
    let other = start_agent(&two_entries(&my_uid_selector())).await;
    let mut other_raw = tessera::cli::client::connect(&other.uri()).await.unwrap();
    let foreign = default_token(&mut other_raw).await;
    let status = raw
        .validate_jwtsvid(validate(AUDIENCE, &foreign))
        .await
        .unwrap_err();
    assert!(
        status.message().contains("not in the trust bundle"),
        "{status:?}"
    );
}

/// The caller's default JWT-SVID for [`AUDIENCE`], through a raw client.
async fn default_token(client: &mut tessera::cli::client::WorkloadClient) -> String {
    client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec![AUDIENCE.into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid
}

/// A protobuf Struct as JSON, for asserting on claims.
struct StructJson(prost_types::Struct);

impl serde::Serialize for StructJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        fn value(v: &prost_types::Value) -> serde_json::Value {
            use prost_types::value::Kind;
            match &v.kind {
                Some(Kind::BoolValue(b)) => (*b).into(),
                Some(Kind::NumberValue(n)) => (*n).into(),
                Some(Kind::StringValue(s)) => s.clone().into(),
                Some(Kind::ListValue(l)) => l.values.iter().map(value).collect(),
                Some(Kind::StructValue(s)) => object(s),
                _ => serde_json::Value::Null,
            }
        }
        fn object(s: &prost_types::Struct) -> serde_json::Value {
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), value(v)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        }
        object(&self.0).serialize(serializer)
    }
}

#[tokio::test]
async fn py_spiffe_and_pyjwt_as_another_user() {
    const UID: u32 = 65534;
    let Some(python) = python() else { return };
    if !require_root("py_spiffe_and_pyjwt_as_another_user") {
        return;
    }
    let agent = start_agent(&two_entries(&format!("unix:uid:{UID}"))).await;
    let uri = agent.uri();
    let report = tokio::task::spawn_blocking(move || {
        python_report(
            UID,
            &python,
            include_str!("python/jwt_clients.py"),
            &[&uri, AUDIENCE],
        )
    })
    .await
    .unwrap();
    assert_eq!(
        report["spiffe_id"], "spiffe://example.org/caller",
        "{report}"
    );
    assert_eq!(report["audience"], serde_json::json!([AUDIENCE]));
    assert_eq!(
        report["all"],
        serde_json::json!(["spiffe://example.org/caller", "spiffe://example.org/second"])
    );
    assert_eq!(report["py_spiffe_offline"], "spiffe://example.org/caller");
    assert_eq!(report["agent_validated"], "spiffe://example.org/caller");
    assert_eq!(report["wrong_audience_refused"], true);
    assert_eq!(report["pyjwt_sub"], "spiffe://example.org/caller");
    assert_eq!(report["pyjwt_owner"], "tests");
    assert_eq!(report["jwks_use"], serde_json::json!(["jwt-svid"]));
}

#[tokio::test]
async fn the_cli_fetches_validates_and_prints_the_bundle() {
    let agent = start_agent(&two_entries(&my_uid_selector())).await;
    let uri = agent.uri();
    let tessera = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
                .args(&args)
                .output()
                .unwrap()
        })
    };
    let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let fetched = tessera(args(&[
        "jwt",
        "fetch",
        "--socket",
        &uri,
        "--audience",
        AUDIENCE,
    ]))
    .await
    .unwrap();
    assert!(fetched.status.success(), "{fetched:?}");
    let token = String::from_utf8(fetched.stdout).unwrap().trim().to_owned();
    assert_eq!(token.matches('.').count(), 2, "{token}");

    let valid = tessera(args(&[
        "jwt",
        "validate",
        "--socket",
        &uri,
        "--audience",
        AUDIENCE,
        &token,
    ]))
    .await
    .unwrap();
    assert!(valid.status.success(), "{valid:?}");
    assert_eq!(
        String::from_utf8_lossy(&valid.stdout).trim(),
        "valid: spiffe://example.org/caller"
    );
    let invalid = tessera(args(&[
        "jwt",
        "validate",
        "--socket",
        &uri,
        "--audience",
        "other",
        &token,
    ]))
    .await
    .unwrap();
    assert_eq!(invalid.status.code(), Some(1), "{invalid:?}");
    assert!(
        String::from_utf8_lossy(&invalid.stderr).contains("invalid JWT-SVID: audience \"other\"")
    );

    let json = tessera(args(&[
        "jwt",
        "fetch",
        "--socket",
        &uri,
        "--audience",
        AUDIENCE,
        "--spiffe-id",
        "spiffe://example.org/second",
        "--output",
        "json",
    ]))
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["spiffe_id"], "spiffe://example.org/second", "{json}");

    let bundle = tessera(args(&["jwt", "bundle", "--socket", &uri]))
        .await
        .unwrap();
    let jwks: serde_json::Value = serde_json::from_slice(&bundle.stdout).unwrap();
    assert_eq!(jwks["keys"][0]["use"], "jwt-svid", "{jwks}");
    assert_eq!(jwks["keys"][0]["kty"], "EC");
    assert!(jwks["spiffe_sequence"].is_u64() && jwks["spiffe_refresh_hint"].is_u64());

    for bad in [
        args(&["jwt", "fetch", "--socket", &uri]),
        args(&["jwt", "fetch", "--socket", &uri, "--audience", " "]),
    ] {
        let out = tessera(bad.clone()).await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {out:?}");
    }
}

#[tokio::test]
async fn a_removed_entrys_tokens_are_refused_by_validation() {
    let me = my_uid_selector();
    let agent = start_agent(&two_entries(&me)).await;
    let client = WorkloadApiClient::connect_to(agent.uri()).await.unwrap();
    let second = SpiffeId::new("spiffe://example.org/second").unwrap();
    let doomed = client
        .fetch_jwt_svid([AUDIENCE], Some(&second))
        .await
        .unwrap();
    let kept = client.fetch_jwt_svid([AUDIENCE], None).await.unwrap();
    assert!(
        client
            .validate_jwt_token(AUDIENCE, doomed.token())
            .await
            .is_ok()
    );

    agent.rewrite_entries(&entry("/caller", &[&me], "1h", "hint = \"caller\""));
    let refusal = refused_within_10s(&agent, doomed.token()).await;
    assert_eq!(refusal.code(), tonic::Code::InvalidArgument);
    assert!(refusal.message().contains("revoked"), "{refusal:?}");
    // The entry still served keeps its token valid.
    assert!(
        client
            .validate_jwt_token(AUDIENCE, kept.token())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_task_token_carries_its_task_and_dies_with_it() {
    let me = my_uid_selector();
    let agent = start_agent(&format!(
        "{}{}",
        entry("/caller", &[&me], "1h", ""),
        entry(
            "/worker",
            &[&me],
            "5m",
            "id = \"worker\"\nactivation = \"task\""
        )
    ))
    .await;
    let uri = agent.uri();
    let tessera = env!("CARGO_BIN_EXE_tessera");
    let token_file = agent.dir.path().join("task-token");
    let script = format!(
        "{tessera} jwt fetch --socket {uri} --audience {AUDIENCE} > {}",
        token_file.display()
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(tessera)
            .args([
                "task",
                "run",
                "--socket",
                &uri,
                "--entry",
                "worker",
                "--purpose",
                "jwt test",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    let claims = JwtSvid::parse_insecure(&token).unwrap();
    assert!(
        claims
            .spiffe_id()
            .to_string()
            .starts_with("spiffe://example.org/worker/task/"),
        "{}",
        claims.spiffe_id()
    );

    // What the token says of its task (read without checking: the agent checks below).
    let payload = token.split('.').nth(1).unwrap();
    let payload: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap();
    let task_id = payload["tessera"]["task_id"].as_str().unwrap();
    assert!(
        claims.spiffe_id().to_string().ends_with(task_id),
        "{payload}"
    );
    assert_eq!(payload["tessera"]["purpose"], "jwt test", "{payload}");
    assert_eq!(payload["tessera"]["entry_id"], "worker", "{payload}");
    assert_eq!(
        payload["tessera"]["chain"][0]["task_id"], task_id,
        "{payload}"
    );
    assert!(
        payload.get("act").is_none(),
        "a root task acts for nobody: {payload}"
    );

    // The task ended when its command exited: its token is refused.
    let refusal = refused_within_10s(&agent, &token).await;
    assert!(refusal.message().contains("revoked"), "{refusal:?}");
}

/// Polls ValidateJWTSVID on `agent` until it refuses `token`, for at most 10 s; the refusal.
async fn refused_within_10s(agent: &TestAgent, token: &str) -> tonic::Status {
    let mut raw = tessera::cli::client::connect(&agent.uri()).await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let asked = ValidateJwtsvidRequest {
            audience: AUDIENCE.into(),
            svid: token.into(),
        };
        match raw.validate_jwtsvid(asked).await {
            Err(status) => return status,
            Ok(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still valid after 10 s"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
