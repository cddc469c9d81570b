//! A real consumer of `svid watch --out`: nginx serving mTLS from the files it writes, reloaded
//! by its `--exec`. A client sees the server's new certificate after a rotation; a client whose
//! SVID is revoked is refused through `ssl_crl`; a client of another trust domain is refused.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(command: &mut Command) -> Running {
    Running(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn nginx_binary() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("nginx is installed (scripts/test.sh installs nginx-light)")
}

/// nginx on `port`, serving mTLS with the files in `tls`, everything else under `prefix`.
fn nginx_config(prefix: &Path, tls: &Path, port: u16) -> String {
    let p = prefix.display();
    let t = tls.display();
    format!(
        "daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {t}/svid.pem;
        ssl_certificate_key {t}/svid_key.pem;
        ssl_client_certificate {t}/bundle.pem;
        ssl_crl {t}/crl.pem;
        ssl_verify_client on;
        ssl_verify_depth 4;
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
"
    )
}

/// One HTTPS request with `client`'s certificate and key: the HTTP status line nginx answered
/// (or what OpenSSL said), and the serial of the certificate nginx presented.
fn request(port: u16, client: &Path, bundle: &Path) -> (String, String) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(client.join("svid.pem"))
        .arg("-key")
        .arg(client.join("svid_key.pem"))
        .arg("-CAfile")
        .arg(bundle)
        .args(["-ign_eof", "-showcerts"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed by scripts/test.sh");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let Output { stdout, stderr, .. } = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&stdout).into_owned();
    let status = text
        .lines()
        .find(|l| l.starts_with("HTTP/"))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("no HTTP answer: {}", String::from_utf8_lossy(&stderr)));
    let serial = tessera::ca::certificates_from_pem(&text)
        .ok()
        .and_then(|chain| chain.into_iter().next())
        .map(|leaf| {
            let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
            hex::encode(cert.tbs_certificate.raw_serial())
        })
        .unwrap_or_default();
    (status, serial)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_serves_mtls_from_watched_files_and_refuses_revoked_and_foreign_clients() {
    let nginx = nginx_binary();
    let web = entry("/web", &[&my_uid_selector()], "4s", "");
    let client_entry = entry("/client", &[&my_uid_selector()], "1h", "");
    let agent = start_agent(&format!("{web}{client_entry}")).await;
    let root = tempfile::tempdir().unwrap();
    let prefix = root.path().join("nginx");
    for dir in ["tmp", "conf"] {
        std::fs::create_dir_all(prefix.join(dir)).unwrap();
    }
    let (tls, client) = (root.path().join("tls"), root.path().join("client"));
    let port = free_port();
    let config = prefix.join("conf/nginx.conf");
    std::fs::write(&config, nginx_config(&prefix, &tls, port)).unwrap();
    let start_nginx = || {
        let mut command = Command::new(&nginx);
        command.arg("-p").arg(&prefix).arg("-c").arg(&config);
        command.arg("-e").arg(prefix.join("error.log"));
        command
    };
    let reload = format!(
        "{} -p {} -c {} -e {} -s reload",
        nginx.display(),
        prefix.display(),
        config.display(),
        prefix.join("error.log").display()
    );

    let tessera = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tessera"));
        command.args(["svid", "watch", "--socket", &agent.uri()]);
        command
    };
    let _server_files = spawn(tessera().arg("--out").arg(&tls).args([
        "--spiffe-id",
        &format!("spiffe://{TRUST_DOMAIN}/web"),
        "--exec",
        &reload,
    ]));
    let _client_files = spawn(
        tessera()
            .arg("--out")
            .arg(&client)
            .args(["--spiffe-id", &format!("spiffe://{TRUST_DOMAIN}/client")]),
    );
    eventually(Duration::from_secs(10), || {
        (tls.join("crl.pem").exists() && client.join("svid_key.pem").exists()).then_some(())
    })
    .await;
    let _nginx = spawn(&mut start_nginx());
    let bundle = tls.join("bundle.pem");

    // Served, with the first certificate; then, after a rotation and the reload it runs, the next.
    let first = eventually(Duration::from_secs(10), || {
        let (status, serial) = request(port, &client, &bundle);
        status.contains(" 200 ").then_some(serial)
    })
    .await;
    assert!(!first.is_empty());
    eventually(Duration::from_secs(20), || {
        let (status, serial) = request(port, &client, &bundle);
        (status.contains(" 200 ") && serial != first).then_some(())
    })
    .await;

    // A client of another trust domain, however well formed, is refused.
    let foreign = root.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/O=Elsewhere"])
        .args([
            "-addext",
            "subjectAltName=URI:spiffe://elsewhere.test/intruder",
        ])
        .arg("-keyout")
        .arg(foreign.join("svid_key.pem"))
        .arg("-out")
        .arg(foreign.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let (status, _) = request(port, &foreign, &bundle);
    assert!(status.contains(" 400 "), "{status}");

    // The client's SVID, kept, then revoked by removing its entry: the agent lists it in its
    // CRL, the watcher writes the new crl.pem and reloads nginx, and nginx refuses it.
    let kept = root.path().join("kept");
    std::fs::create_dir_all(&kept).unwrap();
    for name in ["svid.pem", "svid_key.pem"] {
        std::fs::copy(client.join(name), kept.join(name)).unwrap();
    }
    let (status, _) = request(port, &kept, &bundle);
    assert!(status.contains(" 200 "), "{status}");
    agent.rewrite_entries(&web);
    eventually(Duration::from_secs(20), || {
        let (status, _) = request(port, &kept, &bundle);
        status.contains(" 400 ").then_some(())
    })
    .await;
    let log = std::fs::read_to_string(prefix.join("error.log")).unwrap();
    assert!(log.contains("certificate revoked"), "{log}");
}
