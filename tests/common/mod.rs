//! Helpers shared by the end-to-end tests: agents on temporary sockets, copies of the binary
//! that other uids can run, and the X509-SVID checks every issued certificate must pass.
#![allow(dead_code)]

pub mod cluster;
pub mod sds;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tessera::agent::{AgentConfig, AgentHandle, BuildOptions};
use x509_parser::prelude::*;

pub const TRUST_DOMAIN: &str = "example.org";

/// A temporary directory every local user can traverse (sockets and binaries go here).
pub fn world_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("tessera-test-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// True when running as root. Otherwise: in CI a failure, elsewhere a loud notice and `false`.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        !tessera_harness::in_ci(),
        "{test} needs root (it runs clients as other uids), and CI runs as root"
    );
    eprintln!("\n*** {test}: NOT RUN: needs root to start clients as other uids ***\n");
    false
}

/// The Python interpreter of the venv with py-spiffe (set up by scripts/test.sh).
pub fn python() -> Option<PathBuf> {
    match std::env::var_os("TESSERA_TEST_PYTHON") {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            assert!(
                !tessera_harness::in_ci(),
                "TESSERA_TEST_PYTHON is not set; run the suite through scripts/test.sh"
            );
            eprintln!(
                "\n*** py-spiffe tests NOT RUN: run through scripts/test.sh to set TESSERA_TEST_PYTHON ***\n"
            );
            None
        }
    }
}

/// An agent running in this process, with its directory and config file.
pub struct TestAgent {
    pub handle: AgentHandle,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl TestAgent {
    pub fn socket(&self) -> &Path {
        &self.handle.socket_path
    }

    pub fn uri(&self) -> String {
        self.handle.socket_uri()
    }

    /// Rewrites the entries in the config file (the agent reloads on change).
    pub fn rewrite_entries(&self, entries: &str) {
        std::fs::write(&self.config_path, config_text(self.dir.path(), entries, "")).unwrap();
    }

    /// Copies the tessera binary into the agent's directory as `name`, runnable by anyone.
    pub fn tessera_copy(&self, name: &str) -> PathBuf {
        let target = self.dir.path().join(name);
        std::fs::copy(env!("CARGO_BIN_EXE_tessera"), &target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        target
    }
}

pub fn config_text(dir: &Path, entries: &str, extra: &str) -> String {
    format!(
        "trust_domain = \"{TRUST_DOMAIN}\"\nsocket_path = \"{}\"\nstate_dir = \"{}\"\n{extra}\n{entries}",
        dir.join("agent.sock").display(),
        dir.join("state").display(),
    )
}

/// One `[[entry]]` table.
pub fn entry(path: &str, selectors: &[&str], ttl: &str, extra: &str) -> String {
    let selectors: Vec<String> = selectors.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "\n[[entry]]\nspiffe_id = \"spiffe://{TRUST_DOMAIN}{path}\"\nselectors = [{}]\nx509_ttl = \"{ttl}\"\nowner = \"tests\"\npurpose = \"end-to-end test\"\n{extra}\n",
        selectors.join(", ")
    )
}

/// Starts an agent in this process serving `entries`.
pub async fn start_agent(entries: &str) -> TestAgent {
    start_agent_with(entries, "", BuildOptions::default()).await
}

pub async fn start_agent_with(entries: &str, extra: &str, options: BuildOptions) -> TestAgent {
    let dir = world_dir();
    let config_path = dir.path().join("agent.toml");
    std::fs::write(&config_path, config_text(dir.path(), entries, extra)).unwrap();
    let config = AgentConfig::load(&config_path).unwrap();
    let handle = tessera::agent::build(config, options).await.unwrap();
    TestAgent {
        handle,
        dir,
        config_path,
    }
}

/// An example program, as `cargo build --examples` leaves it (scripts/test.sh builds them
/// first: the `NAME-<hash>` file a test build leaves is the example's test harness, not the
/// program).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/TEST-HASH -> target/<profile>/examples/NAME
    let path = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the examples first (cargo build --examples; scripts/test.sh does)",
        path.display()
    );
    path.canonicalize().unwrap()
}

/// Part `index` of a compact JWS (0: the header, 1: the claims), decoded as JSON.
pub fn jws_part(token: &str, index: usize) -> serde_json::Value {
    use base64::Engine;
    let part = token.split('.').nth(index).expect("a compact JWS");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .expect("base64url"),
    )
    .expect("JSON")
}

/// Selector naming this test process's uid.
pub fn my_uid_selector() -> String {
    format!("unix:uid:{}", nix::unistd::geteuid())
}

/// Runs `program args` as `uid` (gid = uid) with a minimal environment.
pub fn run_as(uid: u32, program: &Path, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir("/");
    if nix::unistd::geteuid().as_raw() != uid {
        command.uid(uid).gid(uid);
    }
    command.output().unwrap()
}

/// Runs the Python `script` as `uid` with `args` and returns the one JSON object it prints,
/// failing the test if the script fails or reports an `error`.
pub fn python_report(uid: u32, python: &Path, script: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    let out = run_as(uid, python, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.get("error").is_none(), "{report}");
    report
}

/// Splits concatenated DER certificates.
pub fn split_der(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) = parse_x509_certificate(bytes).expect("valid DER certificate");
        out.push(bytes[..bytes.len() - rest.len()].to_vec());
        bytes = rest;
    }
    out
}

/// Checks a chain (leaf first) against the X509-SVID rules and, with `openssl verify`, against
/// the bundle. Returns the leaf's not-after (Unix seconds).
pub fn check_x509_svid(chain: &[Vec<u8>], bundle: &[Vec<u8>], spiffe_id: &str) -> i64 {
    let (_, leaf) = parse_x509_certificate(&chain[0]).unwrap();
    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("BasicConstraints present");
    assert!(
        bc.critical && !bc.value.ca,
        "leaf: critical BasicConstraints cA=false"
    );
    let ku = leaf.key_usage().unwrap().expect("KeyUsage present");
    assert!(
        ku.critical && ku.value.digital_signature(),
        "leaf: critical digitalSignature"
    );
    assert!(
        !ku.value.key_cert_sign() && !ku.value.crl_sign(),
        "leaf: no CA key usages"
    );
    let eku = leaf.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    let san = leaf
        .subject_alternative_name()
        .unwrap()
        .expect("SAN present");
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![spiffe_id], "exactly one URI SAN, the SPIFFE ID");
    assert_eq!(
        leaf.tbs_certificate.raw_serial()[0] & 0x80,
        0,
        "positive serial"
    );
    for ca in bundle {
        let (_, ca) = parse_x509_certificate(ca).unwrap();
        assert!(ca.basic_constraints().unwrap().unwrap().value.ca);
        assert!(ca.key_usage().unwrap().unwrap().value.key_cert_sign());
    }

    let dir = tempfile::tempdir().unwrap();
    let pem = |ders: &[Vec<u8>]| -> String {
        ders.iter()
            .map(|d| ::pem::encode(&::pem::Pem::new("CERTIFICATE", d.clone())))
            .collect()
    };
    std::fs::write(dir.path().join("bundle.pem"), pem(bundle)).unwrap();
    std::fs::write(dir.path().join("leaf.pem"), pem(&chain[..1])).unwrap();
    std::fs::write(dir.path().join("chain.pem"), pem(&chain[1..])).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-x509_strict")
        .arg("-CAfile")
        .arg(dir.path().join("bundle.pem"))
        .args(if chain.len() > 1 {
            vec![
                "-untrusted".to_string(),
                dir.path().join("chain.pem").display().to_string(),
            ]
        } else {
            vec![]
        })
        .arg(dir.path().join("leaf.pem"))
        .output()
        .expect("openssl is installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    leaf.validity().not_after.timestamp()
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a FetchX509SVID stream to `agent` (with the security header).
pub async fn svid_stream(
    agent: &TestAgent,
) -> tonic::Streaming<tessera::proto::workload::X509svidResponse> {
    let mut client = tessera::cli::client::connect(&agent.uri()).await.unwrap();
    client
        .fetch_x509svid(tessera::proto::workload::X509svidRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// `openssl verify -crl_check_all` of the leaf of `chain` (a PEM file, leaf first, its other
/// certificates offered as intermediates) against `bundle.pem` and `crl.pem` in `files` (as
/// `tessera svid fetch --out` writes them); stdout and stderr together.
pub fn openssl_verify(files: &Path, chain: &Path) -> String {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-crl_check_all")
        .arg("-CAfile")
        .arg(files.join("bundle.pem"))
        .arg("-CRLfile")
        .arg(files.join("crl.pem"))
        .arg("-untrusted")
        .arg(chain)
        .arg(chain)
        .output()
        .expect("openssl is installed by scripts/test.sh");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The SPIFFE ID of the leaf in `dir/svid.pem` and its task claims, if it is a task's.
pub fn leaf_identity(dir: &Path) -> (String, Option<tessera::ca::task::TaskClaims>) {
    let pem = std::fs::read(dir.join("svid.pem")).unwrap();
    let leaf = ::pem::parse_many(&pem).unwrap().remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.contents()).unwrap();
    let spiffe_id = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .unwrap();
    let claims = tessera::ca::task::TaskClaims::from_certificate(leaf.contents()).unwrap();
    (spiffe_id, claims)
}

/// The lifetime, in seconds, of the leaf in `dir/svid.pem`.
pub fn leaf_lifetime(dir: &Path) -> i64 {
    let pem = std::fs::read(dir.join("svid.pem")).unwrap();
    let leaf = ::pem::parse_many(&pem).unwrap().remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.contents()).unwrap();
    cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()
}
