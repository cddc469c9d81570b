//! Revocation as relying parties see it: the CRLs on the Workload API stream (read by a raw
//! grpcio client, since py-spiffe ignores them), `tessera svid verify`, and OpenSSL's
//! `-crl_check_all` against the files `svid fetch --out` writes.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// Runs the tessera binary; on the blocking pool, since the agent it talks to runs on this
/// test's runtime.
async fn tessera(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

async fn fetch_to(agent: &TestAgent, dir: &Path) {
    let out = tessera(&[
        "svid",
        "fetch",
        "--socket",
        &agent.uri(),
        "--out",
        dir.to_str().unwrap(),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
}

async fn verify(agent: &TestAgent, cert: &Path) -> Output {
    tessera(&[
        "svid",
        "verify",
        "--socket",
        &agent.uri(),
        "--cert",
        cert.to_str().unwrap(),
    ])
    .await
}

#[tokio::test]
async fn a_removed_entry_is_revoked_for_every_relying_party() {
    let uid = my_uid_selector();
    let keep = entry("/keep", &[&uid], "5m", "");
    let gone = entry("/gone", &[&uid], "5m", "");
    let agent = start_agent(&[keep.clone(), gone].concat()).await;

    // A raw grpcio client on the stream, to see the crl field change.
    let watcher = python().map(|python| {
        let child = Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/crl_watch.py"
            ))
            .arg(agent.uri())
            .arg("5")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Its lines, read on a thread of their own.
        tokio::task::spawn_blocking(move || {
            let output = child.wait_with_output().unwrap();
            String::from_utf8_lossy(&output.stdout).into_owned()
        })
    });

    let before = tempfile::tempdir().unwrap();
    fetch_to(&agent, before.path()).await;
    let revoked_cert = before.path().join("svid.1.pem");
    let live_cert = before.path().join("svid.pem");
    let crl_pem = std::fs::read_to_string(before.path().join("crl.pem")).unwrap();
    assert_eq!(crl_pem.matches("BEGIN X509 CRL").count(), 1, "{crl_pem}");
    let valid = verify(&agent, &revoked_cert).await;
    assert!(valid.status.success(), "{valid:?}");
    assert!(
        String::from_utf8_lossy(&valid.stdout).contains("valid: spiffe://example.org/gone"),
        "{valid:?}"
    );
    let ok = openssl_verify(before.path(), &revoked_cert);
    assert!(ok.contains(": OK"), "{ok}");

    agent.rewrite_entries(&keep);

    // `svid verify` refuses it as soon as the agent's CRL lists it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        let out = verify(&agent, &revoked_cert).await;
        if out.status.code() == Some(1) {
            break out;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepted after 10 s: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = String::from_utf8_lossy(&refusal.stderr);
    assert!(
        stderr.contains("invalid: revoked: serial") && stderr.contains("cessationOfOperation"),
        "{stderr}"
    );
    let still = verify(&agent, &live_cert).await;
    assert!(still.status.success(), "{still:?}");

    // OpenSSL, with the files written after the revocation.
    let after = tempfile::tempdir().unwrap();
    fetch_to(&agent, after.path()).await;
    let refused = openssl_verify(after.path(), &revoked_cert);
    assert!(refused.contains("certificate revoked"), "{refused}");
    let accepted = openssl_verify(after.path(), &live_cert);
    assert!(accepted.contains(": OK"), "{accepted}");

    // The raw grpcio client saw a second message whose CRLs differ from the first.
    if let Some(watcher) = watcher {
        // It stops by itself at the first message with new CRLs (the SVID's removal may come
        // in a message of its own before it, or in the same one), or after its own 30 s.
        let stdout = watcher.await.unwrap();
        let seen: Vec<serde_json::Value> = stdout
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert!(seen.len() >= 2, "{stdout}");
        assert!(seen.iter().all(|m| m["crls"] == 1), "{seen:?}");
        let last = seen.last().unwrap();
        assert_ne!(seen[0]["crl_sha256"], last["crl_sha256"], "{seen:?}");
        assert_eq!(
            last["svids"],
            serde_json::json!(["spiffe://example.org/keep"])
        );
    }
}

#[tokio::test]
async fn verify_explains_bad_input_with_exit_code_2() {
    let agent = start_agent(&entry("/a", &[&my_uid_selector()], "5m", "")).await;
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let out = verify(&agent, &missing).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.pem"));
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let out = verify(&agent, &not_pem).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no PEM CERTIFICATE"));
}

#[tokio::test]
async fn an_operator_revokes_on_a_standalone_agents_admin_socket() {
    let uid = my_uid_selector();
    let dir = world_dir();
    let admin_socket = dir.path().join("admin.sock");
    let agent = start_agent_with(
        &[
            entry("/one", &[&uid], "5m", ""),
            entry("/two", &[&uid], "5m", ""),
        ]
        .concat(),
        &format!("admin_socket = \"{}\"", admin_socket.display()),
        Default::default(),
    )
    .await;
    let admin = admin_socket.to_str().unwrap().to_owned();
    let files = tempfile::tempdir().unwrap();
    fetch_to(&agent, files.path()).await;
    let cert = files.path().join("svid.pem");
    let serial = {
        let out = tessera(&[
            "svid",
            "fetch",
            "--socket",
            &agent.uri(),
            "--output",
            "json",
        ])
        .await;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["svids"][0]["serial"].as_str().unwrap().to_owned()
    };
    let revoke = |serial: String| {
        let admin = admin.clone();
        async move {
            tessera(&[
                "svid",
                "revoke",
                &serial,
                "--reason",
                "laptop stolen",
                "--admin-socket",
                &admin,
                "--output",
                "json",
            ])
            .await
        }
    };
    let out = revoke(serial.clone()).await;
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["revoked"][0]["serial"], serial.as_str(), "{json}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = verify(&agent, &cert).await;
        if out.status.code() == Some(1) {
            assert!(
                String::from_utf8_lossy(&out.stderr).contains(&serial),
                "{out:?}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{out:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = revoke(serial.clone()).await;
    let json: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(json["already_revoked"][0], serial.as_str(), "{json}");
    let unknown = revoke("0badc0de".into()).await;
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("0badc0de"));

    // An entry's revocation; the server's other calls are refused, saying whose they are.
    let entry_id = agent.handle.cache.entries().entries[1].id.clone();
    let out = tessera(&[
        "entry",
        "revoke",
        &entry_id,
        "--reason",
        "rotate",
        "--admin-socket",
        &admin,
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let list = tessera(&["entry", "list", "--admin-socket", &admin]).await;
    assert_eq!(list.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&list.stderr).contains("server's"),
        "{list:?}"
    );

    // The audit log has the operator's words.
    let log = std::fs::read_to_string(agent.dir.path().join("state/audit.jsonl")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("svid_revoked") && l.contains("laptop stolen")),
        "{log}"
    );
}
