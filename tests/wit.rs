//! WIT-SVIDs from a standalone agent with the profile on: the token's form (`wit+jwt`,
//! `cnf.jwk` of the key handed over, no `aud`), its bundle, a fresh pair at half-life, the
//! profile off by default, `tessera wit fetch`, and the proof-of-possession example pair
//! (`examples/wit_server.rs`, `examples/wit_client.rs`) refusing a replayed proof and a WIT
//! presented by someone without its key.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tessera::jwt::wit::{WIT_SVID_USE, mint_wpt, validate_wit, validate_wpt};
use tessera::jwt::{JwkSet, JwtKey};
use tessera::proto::workload::{WitBundlesRequest, WitsvidRequest};
use tokio_stream::StreamExt;

const WIT_ON: &str = "[wit]\nenabled = true\n";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn wits_are_bound_to_their_key_and_renewed_at_half_life() {
    let entries = entry("/agent", &[&my_uid_selector()], "1h", "jwt_ttl = \"10s\"");
    let agent = start_agent_with(&entries, WIT_ON, Default::default()).await;
    let mut client = tessera::cli::client::connect(&agent.uri()).await.unwrap();

    let mut bundles = client
        .fetch_wit_bundles(WitBundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let bundle = bundles.next().await.unwrap().unwrap();
    let bundle: JwkSet = serde_json::from_str(&bundle.bundles["spiffe://example.org"]).unwrap();
    assert!(
        bundle
            .keys
            .iter()
            .all(|k| k.key_use.as_deref() == Some(WIT_SVID_USE))
    );

    let mut stream = client
        .fetch_witsvid(WitsvidRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    let svid = &first.svids[0];
    assert_eq!(svid.spiffe_id, "spiffe://example.org/agent");
    let (header, claims) = (jws_part(&svid.wit_svid, 0), jws_part(&svid.wit_svid, 1));
    assert_eq!(header["typ"], "wit+jwt");
    assert!(claims.get("aud").is_none(), "{claims}");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        10
    );
    let valid = validate_wit(&svid.wit_svid, now(), |_| Some(&bundle)).unwrap();
    let key = JwtKey::from_private_jwk(&svid.wit_svid_key).unwrap();
    assert_eq!(
        &valid.holder.x,
        &key.public_jwk().x,
        "cnf.jwk is the key handed over"
    );
    let proof = mint_wpt(&key, &svid.wit_svid, "https://api/x", now(), 30, "p").unwrap();
    validate_wpt(&proof, &svid.wit_svid, &valid, "https://api/x", now()).unwrap();
    // A WIT is no bearer JWT-SVID: the agent's JWT validation refuses it.
    let status = client
        .validate_jwtsvid(tessera::proto::workload::ValidateJwtsvidRequest {
            audience: "https://api/x".into(),
            svid: svid.wit_svid.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // Half of 10 s later, a new WIT with a new key.
    let second = tokio::time::timeout(Duration::from_secs(9), stream.next())
        .await
        .expect("a new WIT at half-life")
        .unwrap()
        .unwrap();
    let renewed = &second.svids[0];
    assert_ne!(renewed.wit_svid, svid.wit_svid);
    assert_ne!(
        renewed.wit_svid_key, svid.wit_svid_key,
        "a fresh key per WIT"
    );
}

#[tokio::test]
async fn the_profile_is_off_unless_enabled_and_the_cli_fetches_a_wit_with_its_key() {
    let entries = entry("/agent", &[&my_uid_selector()], "1h", "");
    let off = start_agent(&entries).await;
    let mut client = tessera::cli::client::connect(&off.uri()).await.unwrap();
    let status = client
        .fetch_witsvid(WitsvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("[wit] enabled"), "{status:?}");

    let on = start_agent_with(&entries, WIT_ON, Default::default()).await;
    let uri = on.uri();
    let tessera = |args: &[&str]| {
        let on_uri = uri.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_tessera"))
                .args(&args)
                .args(["--socket", &on_uri])
                .output()
                .unwrap()
        })
    };
    let out = tessera(&["wit", "fetch"]).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "no key out, no JSON: {out:?}");
    let out = tessera(&["--output", "json", "wit", "fetch"])
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["spiffe_id"], "spiffe://example.org/agent");
    assert_eq!(json["key"]["kty"], "EC");
    assert!(json["key"]["d"].is_string());
    let key_file = on.dir.path().join("wit-key.json");
    let out = tessera(&["wit", "fetch", "--key-out", key_file.to_str().unwrap()])
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    JwtKey::from_private_jwk(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
}

#[tokio::test]
async fn the_proof_of_possession_example_accepts_the_holder_only() {
    let entries = entry("/agent", &[&my_uid_selector()], "1h", "");
    let agent = start_agent_with(&entries, WIT_ON, Default::default()).await;
    let uri = agent.uri();
    let mut server = Command::new(example("wit_server"))
        .args(["--socket", &uri, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = server.stdout.take().unwrap();
    let address = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line.trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_owned()
    })
    .await
    .unwrap();
    let client = |flags: &[&str]| {
        let (uri, address) = (uri.clone(), address.clone());
        let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            Command::new(example("wit_client"))
                .args(["--socket", &uri, "--connect", &address])
                .args(&flags)
                .output()
                .unwrap()
        })
    };
    let honest = client(&[]).await.unwrap();
    assert!(honest.status.success(), "{honest:?}");
    assert_eq!(
        String::from_utf8_lossy(&honest.stdout),
        "200 hello spiffe://example.org/agent\n"
    );
    let replayed = client(&["--replay"]).await.unwrap();
    let lines = String::from_utf8_lossy(&replayed.stdout).into_owned();
    assert!(lines.starts_with("200 hello"), "{lines}");
    assert!(
        lines.contains("401 proof") && lines.contains("already used"),
        "{lines}"
    );
    assert_eq!(replayed.status.code(), Some(1));
    let stolen = client(&["--stolen"]).await.unwrap();
    let lines = String::from_utf8_lossy(&stolen.stdout).into_owned();
    assert!(lines.starts_with("401 proof: signature"), "{lines}");
    server.kill().unwrap();
    server.wait().unwrap();
}
