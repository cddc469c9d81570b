//! Revocation in server mode, end to end with real processes: an operator revokes an SVID one
//! node issued, or evicts that node, and a relying party on another node stops accepting the
//! credential (`tessera svid verify` on that node's Workload API, and OpenSSL with the files
//! `svid fetch --out` writes there).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;

/// A server and two join-token agents, `a` and `b`, both serving `/svc` to this test's uid.
struct Cluster {
    dir: tempfile::TempDir,
    server: ServerProcess,
    a: AgentProcess,
    b: AgentProcess,
}

fn cluster(extra_server_config: &str) -> Cluster {
    let dir = world_dir();
    let server = ServerProcess::start(dir.path(), "server", extra_server_config);
    let bundle = dir.path().join("bundle.pem");
    server.write_bundle(&bundle);
    let join = |name: &str| {
        AgentProcess::start(
            dir.path(),
            name,
            &server.address,
            &bundle,
            &format!("join_token = \"{}\"", server.join_token()),
        )
    };
    let (a, b) = (join("agent-a"), join("agent-b"));
    server.create_entry("/svc", &[]);
    Cluster { dir, server, a, b }
}

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .unwrap()
}

/// `svid fetch --out` on `agent` into a new directory; the directory and the leaf's serial.
fn fetch(agent: &AgentProcess, root: &Path, name: &str) -> (PathBuf, String) {
    let out_dir = root.join(name);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = tessera(&[
            "svid",
            "fetch",
            "--socket",
            &agent.uri(),
            "--out",
            out_dir.to_str().unwrap(),
            "--output",
            "json",
        ]);
        if out.status.success() {
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let serial = json["svids"][0]["serial"].as_str().unwrap().to_owned();
            return (out_dir, serial);
        }
        assert!(
            Instant::now() < deadline,
            "no SVID on {}: {out:?}\n{}",
            agent.uri(),
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn verify_on(agent: &AgentProcess, cert: &Path) -> Output {
    tessera(&[
        "svid",
        "verify",
        "--socket",
        &agent.uri(),
        "--cert",
        cert.to_str().unwrap(),
    ])
}

/// Polls `svid verify` on `agent` until it refuses `cert` (exit 1), for at most 10 s; the
/// refusal's message.
fn refused_on(agent: &AgentProcess, cert: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = verify_on(agent, cert);
        if out.status.code() == Some(1) {
            return String::from_utf8_lossy(&out.stderr).into_owned();
        }
        assert!(
            out.status.success(),
            "verify failed otherwise: {out:?}\n{}",
            agent.logs()
        );
        assert!(
            Instant::now() < deadline,
            "still accepted after 10 s\n{}",
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `tessera svid revoke` until the server knows the serial (its issuance event arrives
/// from the node within a moment of the fetch).
fn revoke_serial(server: &ServerProcess, serial: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = server.admin(&[
            "svid",
            "revoke",
            serial,
            "--reason",
            "key leaked in CI logs",
            "--output",
            "json",
        ]);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("no SVID with serial") && Instant::now() < deadline,
            "{out:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_operator_revocation_reaches_a_relying_party_on_another_node() {
    let c = cluster("");
    let (issued, serial) = fetch(&c.a, c.dir.path(), "a-before");
    let cert = issued.join("svid.pem");
    let accepted = verify_on(&c.b, &cert);
    assert!(accepted.status.success(), "{accepted:?}");

    let revoked = revoke_serial(&c.server, &serial);
    assert_eq!(revoked["revoked"][0]["serial"], serial, "{revoked}");

    // Node b's Workload API soon carries node a's CRL with the serial.
    let refusal = refused_on(&c.b, &cert);
    assert!(
        refusal.contains(&format!("revoked: serial {serial}")),
        "{refusal}"
    );
    // The holder on node a got a fresh SVID at once, which b accepts.
    let (fresh, fresh_serial) = fetch(&c.a, c.dir.path(), "a-after");
    assert_ne!(fresh_serial, serial);
    let ok = verify_on(&c.b, &fresh.join("svid.pem"));
    assert!(ok.status.success(), "{ok:?}");

    // OpenSSL with node b's files: the revoked chain refused, the fresh one accepted.
    let (files, _) = fetch(&c.b, c.dir.path(), "b-files");
    let refused = openssl_verify(&files, &cert);
    assert!(refused.contains("certificate revoked"), "{refused}");
    let fine = openssl_verify(&files, &fresh.join("svid.pem"));
    assert!(fine.contains(": OK"), "{fine}");

    // Again: a no-op. An unknown serial: exit 2, naming it.
    let again = revoke_serial(&c.server, &serial);
    assert_eq!(again["already_revoked"][0], serial, "{again}");
    let unknown = c
        .server
        .admin(&["svid", "revoke", "0badc0de", "--reason", "test"]);
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("0badc0de"));

    // The audit trail has the operator's reason.
    let events = c
        .server
        .admin_json(&["events", "list", "--kind", "svid_revoked"]);
    let text = events.to_string();
    assert!(
        text.contains(&serial) && text.contains("key leaked in CI logs"),
        "{text}"
    );
}

#[test]
fn an_evicted_nodes_credentials_are_refused_on_the_other_node() {
    let c = cluster("");
    let (issued, serial) = fetch(&c.a, c.dir.path(), "a");
    let cert = issued.join("svid.pem");
    assert!(verify_on(&c.b, &cert).status.success());
    let (token, _) = fetch_jwt(&c.a, "api");
    // The issuance is on record before the node goes.
    revoke_wait_for_inventory(&c.server, &serial);

    let node_a = std::fs::read_to_string(c.a.state_dir.join("upstream/node_id")).unwrap();
    let evicted = c.server.admin_json(&["node", "evict", node_a.trim()]);
    assert_eq!(evicted["status"], "evicted", "{evicted}");

    // The root's CRL now lists node a's intermediate: its whole chain is refused on b.
    let refusal = refused_on(&c.b, &cert);
    assert!(refusal.contains("revoked: serial"), "{refusal}");
    assert!(
        !refusal.contains(&serial),
        "the CA is revoked, not the leaf: {refusal}"
    );
    let (files, _) = fetch(&c.b, c.dir.path(), "b-files");
    let refused = openssl_verify(&files, &cert);
    assert!(refused.contains("certificate revoked"), "{refused}");
    // And the JWT-SVIDs signed for it.
    jwt_refused_on(&c.b, "api", &token);

    // The node reported what it recorded up to its eviction before forgetting its credentials.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c
        .a
        .logs()
        .contains("reported every event recorded before the eviction")
    {
        assert!(Instant::now() < deadline, "{}", c.a.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // And the inventory shows the node's SVID revoked for the eviction, once.
    let revocations = c
        .server
        .admin_json(&["events", "list", "--kind", "svid_revoked"]);
    assert_eq!(
        revocations.as_array().unwrap().len(),
        1,
        "the server's record and the node's are one: {revocations}"
    );
    let inventory = c.server.admin_json(&["inventory"]);
    let revoked = &inventory["identities"][0]["revoked_svids"][0];
    assert_eq!(revoked["serial"], serial, "{inventory}");
    assert_eq!(revoked["reason"], "node_evicted", "{inventory}");
}

/// Waits until the server's inventory knows `serial`.
fn revoke_wait_for_inventory(server: &ServerProcess, serial: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server
        .admin_json(&["inventory"])
        .to_string()
        .contains(serial)
    {
        assert!(
            Instant::now() < deadline,
            "{serial} never reached the inventory"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn revoking_an_entry_rotates_its_holders_on_every_node() {
    let c = cluster("");
    let (on_a, serial_a) = fetch(&c.a, c.dir.path(), "a");
    let (on_b, serial_b) = fetch(&c.b, c.dir.path(), "b");
    revoke_wait_for_inventory(&c.server, &serial_a);
    revoke_wait_for_inventory(&c.server, &serial_b);
    let entries = c.server.admin_json(&["entry", "list"]);
    let id = entries[0]["id"].as_str().unwrap().to_owned();
    let out = c
        .server
        .admin_json(&["entry", "revoke", &id, "--reason", "rotate after incident"]);
    let revoked: Vec<&str> = out["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["serial"].as_str().unwrap())
        .collect();
    assert!(
        revoked.contains(&serial_a.as_str()) && revoked.contains(&serial_b.as_str()),
        "{out}"
    );
    // Each node's SVID is refused on the other node; both got fresh ones.
    refused_on(&c.b, &on_a.join("svid.pem"));
    refused_on(&c.a, &on_b.join("svid.pem"));
    let (_, fresh_a) = fetch(&c.a, c.dir.path(), "a2");
    assert_ne!(fresh_a, serial_a);
    let unknown = c
        .server
        .admin(&["entry", "revoke", "no-such-entry", "--reason", "x"]);
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no-such-entry"));
}

#[test]
fn a_revocation_reaches_an_absent_agent_when_it_returns_and_outlives_a_restart_without_server() {
    let mut c = cluster("");
    let (issued, serial) = fetch(&c.a, c.dir.path(), "a");
    let cert = issued.join("svid.pem");
    revoke_wait_for_inventory(&c.server, &serial);

    // Node a is away when the operator revokes: only its CA can list the serial, so the order
    // waits at the server.
    c.a.kill();
    revoke_serial(&c.server, &serial);
    c.a.spawn_again();
    c.a.wait_ready();
    let refusal = refused_on(&c.b, &cert);
    assert!(refusal.contains(&serial), "{refusal}");

    // With the server gone, node b restarts from its own state and still refuses it.
    c.server.kill();
    c.b.kill();
    c.b.spawn_again();
    c.b.wait_ready();
    let out = verify_on(&c.b, &cert);
    assert_eq!(out.status.code(), Some(1), "{out:?}\n{}", c.b.logs());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&serial),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_on_postgresql_pass_revocations_between_their_nodes() {
    let Some(connection) = tessera_harness::postgres::scratch_database_from_env().await else {
        return;
    };
    let dir = world_dir();
    let datastore = format!("[datastore]\nkind = \"postgres\"\nconnection = \"{connection}\"\n");
    let replica_a = ServerProcess::start(dir.path(), "replica-a", &datastore);
    let replica_b = ServerProcess::start(dir.path(), "replica-b", &datastore);
    let bundle = dir.path().join("bundle.pem");
    replica_b.write_bundle(&bundle);
    let a = AgentProcess::start(
        dir.path(),
        "agent-a",
        &replica_a.address,
        &bundle,
        &format!("join_token = \"{}\"", replica_a.join_token()),
    );
    let b = AgentProcess::start(
        dir.path(),
        "agent-b",
        &replica_b.address,
        &bundle,
        &format!("join_token = \"{}\"", replica_b.join_token()),
    );
    replica_a.create_entry("/svc", &[]);

    // An SVID node a issued, revoked on the other replica, refused on node b.
    let (issued, serial) = fetch(&a, dir.path(), "a");
    revoke_serial(&replica_b, &serial);
    let refusal = refused_on(&b, &issued.join("svid.pem"));
    assert!(refusal.contains(&serial), "{refusal}");

    // Node a evicted on replica b: replica a's root, which granted node a's intermediate,
    // lists it, and node b refuses node a's fresh SVID too.
    let (fresh, _) = fetch(&a, dir.path(), "a-fresh");
    let node_a = std::fs::read_to_string(a.state_dir.join("upstream/node_id")).unwrap();
    replica_b.admin_json(&["node", "evict", node_a.trim()]);
    let refusal = refused_on(&b, &fresh.join("svid.pem"));
    assert!(refusal.contains("revoked: serial"), "{refusal}");
    drop((a, b, replica_a, replica_b));
    tessera_harness::postgres::drop_scratch_database(&connection).await;
}

#[test]
fn an_envoy_on_another_node_refuses_a_revoked_svid_with_the_crls_sds_pushes() {
    use common::sds::{node, plain_validation, request, secrets, stream_secrets};
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

    let c = cluster("");
    let (issued, serial) = fetch(&c.a, c.dir.path(), "a");
    let cert = issued.join("svid.pem");
    let files = c.dir.path().join("envoy-b");
    std::fs::create_dir_all(&files).unwrap();
    // What an Envoy on node b validates peers with: the bundle and every CA's CRL, from SDS.
    let write = |response: &DiscoveryResponse| {
        let (roots, crls) = plain_validation(&secrets(response)["ROOTCA"]);
        std::fs::write(files.join("bundle.pem"), roots).unwrap();
        std::fs::write(files.join("crl.pem"), crls).unwrap();
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let socket = PathBuf::from(c.b.uri().trim_start_matches("unix://"));
        let mut envoy = stream_secrets(
            &socket,
            DiscoveryRequest {
                node: Some(node("envoy-on-b", true)),
                ..request(&["ROOTCA"], "", "")
            },
        )
        .await;
        let first = envoy.next().await;
        write(&first);
        // Node a's chain passes full chain checking on b: its root and its intermediate each
        // have a CRL in what b's SDS serves.
        let accepted = openssl_verify(&files, &cert);
        assert!(accepted.contains(": OK"), "{accepted}");
        envoy
            .send(request(&["ROOTCA"], &first.version_info, &first.nonce))
            .await;

        revoke_serial(&c.server, &serial);
        let revoked_at = Instant::now();
        loop {
            let pushed = envoy.next().await;
            write(&pushed);
            let verdict = openssl_verify(&files, &cert);
            if verdict.contains("certificate revoked") {
                eprintln!("revoked on node b's SDS after {:?}", revoked_at.elapsed());
                break;
            }
            assert!(verdict.contains(": OK"), "{verdict}");
            envoy
                .send(request(&["ROOTCA"], &pushed.version_info, &pushed.nonce))
                .await;
        }
    });
}

/// `tessera jwt fetch` on `agent` for `audience`, retried while the node has no entries yet;
/// the token and its `jti`.
fn fetch_jwt(agent: &AgentProcess, audience: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = tessera(&[
            "jwt",
            "fetch",
            "--socket",
            &agent.uri(),
            "--audience",
            audience,
            "--output",
            "json",
        ]);
        if out.status.success() {
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let token = json["token"].as_str().unwrap().to_owned();
            let jti = jws_part(&token, 1)["jti"].as_str().unwrap().to_owned();
            return (token, jti);
        }
        assert!(
            Instant::now() < deadline,
            "no JWT-SVID on {}: {out:?}\n{}",
            agent.uri(),
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `exp - iat` of `token`.
fn lifetime(token: &str) -> i64 {
    let claims = jws_part(token, 1);
    claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap()
}

/// `tessera jwt validate` on `agent`: its exit code and what it printed.
fn validate_jwt_on(agent: &AgentProcess, audience: &str, token: &str) -> (Option<i32>, String) {
    let out = tessera(&[
        "jwt",
        "validate",
        "--socket",
        &agent.uri(),
        "--audience",
        audience,
        token,
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Polls validation on `agent` until it refuses `token` as revoked, for at most 10 s; how long
/// that took.
fn jwt_refused_on(agent: &AgentProcess, audience: &str, token: &str) -> Duration {
    let start = Instant::now();
    loop {
        let (code, text) = validate_jwt_on(agent, audience, token);
        if code == Some(1) {
            assert!(text.contains("revoked"), "{text}");
            return start.elapsed();
        }
        assert_eq!(code, Some(0), "{text}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still valid after 10 s\n{}",
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn server_signed_jwts_are_revoked_by_jti_and_with_their_entry_on_every_node() {
    let c = cluster("");
    let (token, jti) = fetch_jwt(&c.a, "api");
    // Signed by the server: node b knows the key from its own sync stream.
    assert_eq!(validate_jwt_on(&c.b, "api", &token).0, Some(0));
    assert_eq!(
        fetch_jwt(&c.a, "api").1,
        jti,
        "a repeat fetch is served from the cache"
    );
    let (other, other_jti) = fetch_jwt(&c.a, "db");
    assert_ne!(other_jti, jti);
    assert_eq!(
        lifetime(&token),
        300,
        "the agent's [jwt] ttl, under the server's max_ttl"
    );

    // An entry's own jwt_ttl wins; the server's max_ttl bounds it.
    let entries = c.server.admin_json(&["entry", "list"]);
    let entry_id = entries[0]["id"].as_str().unwrap().to_owned();
    let too_long = c
        .server
        .admin(&["entry", "update", &entry_id, "--jwt-ttl", "2h"]);
    assert_eq!(too_long.status.code(), Some(2), "{too_long:?}");
    assert!(
        String::from_utf8_lossy(&too_long.stderr).contains("jwt.max_ttl"),
        "{too_long:?}"
    );
    c.server
        .admin_json(&["entry", "update", &entry_id, "--jwt-ttl", "90s"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    while lifetime(&fetch_jwt(&c.a, &format!("short-{n}")).0) != 90 {
        assert!(
            Instant::now() < deadline,
            "the entry's jwt_ttl never applied"
        );
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }

    let revoked = c
        .server
        .admin_json(&["jwt", "revoke", &jti, "--reason", "leaked in a log"]);
    assert_eq!(revoked["already_revoked"], false, "{revoked}");
    let took = jwt_refused_on(&c.b, "api", &token);
    eprintln!("revocation by jti reached node b's validation in {took:?}");
    // The holder's agent stops handing it out: the next fetch gets a new token.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fetch_jwt(&c.a, "api").1 == jti {
        assert!(
            Instant::now() < deadline,
            "the revoked token is still served"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        validate_jwt_on(&c.b, "db", &other).0,
        Some(0),
        "only that token is revoked"
    );
    let again = c
        .server
        .admin_json(&["jwt", "revoke", &jti, "--reason", "twice"]);
    assert_eq!(again["already_revoked"], true, "{again}");
    let unknown = c
        .server
        .admin(&["jwt", "revoke", "no-such-jti", "--reason", "typo"]);
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");

    // Deleting the entry revokes its other tokens everywhere.
    let deleted = c.server.admin(&["entry", "delete", &entry_id]);
    assert!(deleted.status.success(), "{deleted:?}");
    jwt_refused_on(&c.b, "db", &other);

    // Issuance and revocation are on record once each, with the jti.
    let issued = c
        .server
        .admin_json(&["events", "list", "--kind", "jwt_issued"]);
    let issued = issued.as_array().unwrap();
    assert_eq!(issued.len(), 4 + n, "one event per token: {issued:?}");
    assert!(issued.iter().any(|e| e["jti"] == jti.as_str()));
    let revocations = c
        .server
        .admin_json(&["events", "list", "--kind", "jwt_revoked"]);
    let reasons: Vec<(&str, &str)> = revocations
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["jti"].as_str().unwrap(), e["reason"].as_str().unwrap()))
        .collect();
    assert!(reasons.contains(&(jti.as_str(), "operator")), "{reasons:?}");
    assert!(
        reasons.contains(&(other_jti.as_str(), "entry_removed")),
        "{reasons:?}"
    );
    let listed = c.server.admin_json(&["jwt", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 4 + n, "{listed}");
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["reason"].is_string()),
        "{listed}"
    );
}
