//! `tessera svid fetch|watch|verify|revoke`: a Workload API client for workloads, for servers
//! that read certificate files (`watch --out`, written by `agent::output`), and for debugging.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::client::{connect, status_failure};
use super::{Failure, Output};
use crate::agent::output::{self as certificate_files, FileOptions, OutDir};
use crate::events::model::JsonTime;
use crate::proto::workload::{X509BundlesRequest, X509svidRequest, X509svidResponse};

#[derive(Subcommand, Debug)]
pub(super) enum SvidCommand {
    /// Fetch the current X.509-SVIDs once; optionally write them as PEM files.
    Fetch(FetchArgs),
    /// Print every update of the X.509-SVIDs until interrupted; with --out, keep PEM files
    /// current for servers that read files, and run a command after each write.
    Watch(WatchArgs),
    /// Revoke one X.509-SVID by serial (server mode, on the server's admin socket): its node's
    /// CA lists it in its CRL until it expires.
    Revoke(super::revoke::RevokeSvidArgs),
    /// Check a certificate as a relying party would: chain to the bundle, SPIFFE ID, expiry and
    /// revocation in the CRLs, all taken from the Workload API. Exit 0 valid, 1 invalid.
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
pub(super) struct VerifyArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// PEM file with the certificate chain to check, leaf first (e.g. an svid.pem).
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
}

/// Where the Workload API is, for every command that is its client.
#[derive(Args, Debug)]
pub(super) struct CommonArgs {
    /// Workload API address (unix:///path); defaults to $SPIFFE_ENDPOINT_SOCKET.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET", value_name = "URI")]
    socket: Option<String>,
}

impl CommonArgs {
    /// The socket to use: `--socket`, else `SPIFFE_ENDPOINT_SOCKET`, else a usage error that
    /// says both.
    pub(super) fn socket(&self) -> Result<&str, Failure> {
        self.socket.as_deref().ok_or_else(|| {
            Failure::usage(
                "no Workload API socket: pass --socket unix:///path/to/agent.sock or set \
                 SPIFFE_ENDPOINT_SOCKET",
            )
        })
    }
}

#[derive(Args, Debug)]
pub(super) struct WatchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Keep svid.pem, svid_key.pem, bundle.pem and crl.pem in this directory current: each
    /// update is written whole, then swapped in at once (symlinks through DIR/..data).
    #[arg(long, value_name = "DIR", env = "TESSERA_SVID_OUT")]
    out: Option<PathBuf>,
    /// Run this shell command after each complete write (updates within half a second run it
    /// once), e.g. "nginx -s reload"; its exit status is printed.
    #[arg(long, value_name = "CMD", env = "TESSERA_SVID_EXEC", requires = "out")]
    exec: Option<String>,
    /// Write the SVID with this SPIFFE ID rather than the default (first) one.
    #[arg(
        long,
        value_name = "ID",
        env = "TESSERA_SVID_SPIFFE_ID",
        requires = "out"
    )]
    spiffe_id: Option<String>,
    /// Mode of svid.pem, bundle.pem and crl.pem.
    #[arg(
        long,
        value_name = "MODE",
        env = "TESSERA_SVID_CERT_MODE",
        default_value = "0644"
    )]
    cert_mode: String,
    /// Mode of svid_key.pem.
    #[arg(
        long,
        value_name = "MODE",
        env = "TESSERA_SVID_KEY_MODE",
        default_value = "0600"
    )]
    key_mode: String,
    /// Owner of the files (a user name or uid; changing it needs root).
    #[arg(
        long,
        value_name = "USER",
        env = "TESSERA_SVID_OWNER",
        requires = "out"
    )]
    owner: Option<String>,
    /// Group of the files (a group name or gid), e.g. the group a server reads the key as.
    #[arg(
        long,
        value_name = "GROUP",
        env = "TESSERA_SVID_GROUP",
        requires = "out"
    )]
    group: Option<String>,
}

#[derive(Args, Debug)]
pub(super) struct FetchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Write svid.pem, svid_key.pem (0600), bundle.pem and crl.pem into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// What is printed about one SVID.
#[derive(Serialize)]
struct SvidSummary {
    spiffe_id: String,
    serial: String,
    #[serde(flatten)]
    not_after: JsonTime,
    /// The same instant in Unix seconds, for the text output.
    #[serde(skip)]
    not_after_seconds: i64,
    /// Whole seconds from now until `not_after`; 0 once it has passed.
    expires_in_seconds: u64,
    hint: Option<String>,
}

pub(super) async fn run(command: SvidCommand, output: Output) -> Result<(), Failure> {
    match command {
        SvidCommand::Fetch(args) => fetch(args, output).await,
        SvidCommand::Watch(args) => watch(args, output).await,
        SvidCommand::Verify(args) => verify(args, output).await,
        SvidCommand::Revoke(args) => super::revoke::revoke_svid(args, output).await,
    }
}

async fn verify(args: VerifyArgs, output: Output) -> Result<(), Failure> {
    let text = std::fs::read(&args.cert).map_err(|e| {
        Failure::usage(format!(
            "--cert {}: cannot read it: {e}",
            args.cert.display()
        ))
    })?;
    let chain = crate::ca::certificates_from_pem(&text)
        .ok()
        .filter(|chain| !chain.is_empty())
        .ok_or_else(|| {
            Failure::usage(format!(
                "--cert {}: holds no PEM CERTIFICATE block; give the SVID's chain, leaf first",
                args.cert.display()
            ))
        })?;
    let mut client = connect(args.common.socket()?).await?;
    let response = client
        .fetch_x509_bundles(X509BundlesRequest {})
        .await
        .map_err(status_failure)?
        .into_inner()
        .message()
        .await
        .map_err(status_failure)?
        .ok_or_else(|| Failure::failed("the Workload API closed the stream without an answer"))?;
    let mut bundle = Vec::new();
    for der in response.bundles.values() {
        bundle.extend(split_der(der)?.into_iter().map(<[u8]>::to_vec));
    }
    let verdict = crate::verify::verify_svid(
        &chain,
        &bundle,
        &response.crl,
        crate::verify::Usage::Client,
        std::time::SystemTime::now(),
    );
    match (output, &verdict) {
        (Output::Json, Ok(v)) => println!(
            "{}",
            serde_json::json!({
                "valid": true,
                "spiffe_id": v.spiffe_id.as_str(),
                "serial": v.serial,
                "not_after": JsonTime::from_seconds("not_after", crate::clock::unix_seconds(v.not_after)),
                "crls": response.crl.len(),
            })
        ),
        (Output::Json, Err(e)) => println!(
            "{}",
            serde_json::json!({ "valid": false, "reason": e.to_string(), "crls": response.crl.len() })
        ),
        (Output::Text, Ok(v)) => println!(
            "valid: {}  serial {}  expires {}  (checked against {} CRLs)",
            v.spiffe_id,
            v.serial,
            humantime::format_rfc3339_seconds(v.not_after),
            response.crl.len()
        ),
        (Output::Text, Err(_)) => {}
    }
    verdict
        .map(|_| ())
        .map_err(|e| Failure::failed(format!("invalid: {e}")))
}

async fn fetch(args: FetchArgs, output: Output) -> Result<(), Failure> {
    let mut client = connect(args.common.socket()?).await?;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(status_failure)?
        .into_inner();
    let response = stream
        .message()
        .await
        .map_err(status_failure)?
        .ok_or_else(|| Failure::failed("the Workload API closed the stream without an answer"))?;
    let summaries = summarize(&response)?;
    if let Some(dir) = &args.out {
        write_pem_files(dir, &response)?;
    }
    print(output, &summaries);
    if let (Some(dir), Output::Text) = (&args.out, output) {
        println!(
            "wrote svid.pem, svid_key.pem, bundle.pem and crl.pem to {}",
            dir.display()
        );
    }
    Ok(())
}

async fn watch(args: WatchArgs, output: Output) -> Result<(), Failure> {
    if let Some(id) = &args.spiffe_id {
        crate::spiffe::SpiffeId::parse(id).map_err(|e| {
            Failure::usage(format!(
                "--spiffe-id {id}: {e}; give a SPIFFE ID such as spiffe://example.org/web"
            ))
        })?;
    }
    let mut out = match &args.out {
        Some(dir) => Some(OutDir::new(dir.clone(), file_options(&args)?)),
        None => None,
    };
    let mut client = connect(args.common.socket()?).await?;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(status_failure)?
        .into_inner();
    // When the command is next due: a while after the last complete write.
    let mut hook_due: Option<tokio::time::Instant> = None;
    loop {
        let hook_wait = async {
            match hook_due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let message = tokio::select! {
            message = stream.message() => message,
            () = hook_wait => {
                hook_due = None;
                run_hook(args.exec.as_deref(), output).await;
                continue;
            }
            _ = super::termination() => return Ok(()),
        };
        // The stream is over: files written but not yet followed by the command get it now.
        let response = match message {
            Ok(Some(response)) => response,
            ended => {
                if hook_due.is_some() {
                    run_hook(args.exec.as_deref(), output).await;
                }
                return Err(match ended {
                    Err(status) => status_failure(status),
                    _ => Failure::failed("the Workload API closed the stream"),
                });
            }
        };
        if output == Output::Text {
            println!(
                "update at {}",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            );
        }
        print(output, &summarize(&response)?);
        let Some(out) = &mut out else {
            continue;
        };
        let dir = args.out.as_deref().unwrap_or(Path::new("")).display();
        match out.write(&response, args.spiffe_id.as_deref()) {
            Ok(spiffe_id) => {
                match output {
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({ "wrote": dir.to_string(), "spiffe_id": spiffe_id })
                    ),
                    Output::Text => println!("wrote {spiffe_id} to {dir}"),
                }
                let _ = std::io::stdout().flush();
                if args.exec.is_some() {
                    hook_due = Some(tokio::time::Instant::now() + certificate_files::DEBOUNCE);
                }
            }
            // The previous files stay; the next update tries again.
            Err(error) => eprintln!("tessera: {error}"),
        }
    }
}

/// Runs `command`, if any, and prints how it ended.
async fn run_hook(command: Option<&str>, output: Output) {
    let Some(command) = command else {
        return;
    };
    let said = certificate_files::run_hook(command).await;
    match output {
        Output::Json => println!("{}", serde_json::json!({ "ran": command, "result": said })),
        Output::Text => println!("{said}"),
    }
    let _ = std::io::stdout().flush();
}

/// The files' modes and ownership from the options; a bad value is a usage error naming it.
fn file_options(args: &WatchArgs) -> Result<FileOptions, Failure> {
    let bad = |option: &str, value: &str, reason: String| {
        Failure::usage(format!("{option} {value}: {reason}"))
    };
    Ok(FileOptions {
        cert_mode: certificate_files::parse_mode(&args.cert_mode)
            .map_err(|r| bad("--cert-mode", &args.cert_mode, r))?,
        key_mode: certificate_files::parse_mode(&args.key_mode)
            .map_err(|r| bad("--key-mode", &args.key_mode, r))?,
        owner: match &args.owner {
            Some(owner) => {
                Some(certificate_files::parse_owner(owner).map_err(|r| bad("--owner", owner, r))?)
            }
            None => None,
        },
        group: match &args.group {
            Some(group) => {
                Some(certificate_files::parse_group(group).map_err(|r| bad("--group", group, r))?)
            }
            None => None,
        },
    })
}

fn print(output: Output, summaries: &[SvidSummary]) {
    match output {
        Output::Json => println!("{}", serde_json::json!({ "svids": summaries })),
        Output::Text => {
            for s in summaries {
                let hint = match &s.hint {
                    Some(hint) => format!("  hint {hint}"),
                    None => String::new(),
                };
                let left = match s.expires_in_seconds {
                    0 => "expired".to_owned(),
                    seconds => format!(
                        "in {}",
                        humantime::format_duration(std::time::Duration::from_secs(seconds))
                    ),
                };
                println!(
                    "{}  serial {}  expires {} ({left}){hint}",
                    s.spiffe_id,
                    s.serial,
                    super::table::time_or(s.not_after_seconds, "-")
                );
            }
        }
    }
    let _ = std::io::stdout().flush();
}

fn summarize(response: &X509svidResponse) -> Result<Vec<SvidSummary>, Failure> {
    response
        .svids
        .iter()
        .map(|svid| {
            let certs = split_der(&svid.x509_svid)?;
            let leaf = certs.first().ok_or_else(|| {
                Failure::failed("the Workload API sent an SVID without certificates")
            })?;
            let (_, cert) = x509_parser::parse_x509_certificate(leaf)
                .map_err(|e| Failure::failed(format!("unreadable SVID certificate: {e}")))?;
            let expiry = cert.validity().not_after;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            Ok(SvidSummary {
                spiffe_id: svid.spiffe_id.clone(),
                serial: hex::encode(cert.tbs_certificate.raw_serial()),
                not_after: JsonTime::from_seconds("not_after", expiry.timestamp()),
                not_after_seconds: expiry.timestamp(),
                expires_in_seconds: u64::try_from(expiry.timestamp().saturating_sub(now))
                    .unwrap_or(0),
                hint: Some(svid.hint.clone()).filter(|h| !h.is_empty()),
            })
        })
        .collect()
}

/// Splits concatenated DER certificates.
fn split_der(bytes: &[u8]) -> Result<Vec<&[u8]>, Failure> {
    crate::ca::split_der_certificates(bytes).map_err(|e| {
        Failure::failed(format!(
            "malformed certificate data from the Workload API: {e}"
        ))
    })
}

/// Writes the default SVID as svid.pem/svid_key.pem and its bundle as bundle.pem; further
/// SVIDs go to svid.N.pem/svid_key.N.pem. Each file is replaced atomically.
fn write_pem_files(dir: &Path, response: &X509svidResponse) -> Result<(), Failure> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Failure::failed(format!("cannot create {}: {e}", dir.display())))?;
    for (i, svid) in response.svids.iter().enumerate() {
        let suffix = if i == 0 {
            String::new()
        } else {
            format!(".{i}")
        };
        let chain = split_der(&svid.x509_svid)?;
        write_file(
            &dir.join(format!("svid{suffix}.pem")),
            crate::ca::to_pem("CERTIFICATE", &chain).as_bytes(),
            0o644,
        )?;
        let key = zeroize::Zeroizing::new(crate::ca::to_pem("PRIVATE KEY", &[&svid.x509_svid_key]));
        write_file(
            &dir.join(format!("svid_key{suffix}.pem")),
            key.as_bytes(),
            0o600,
        )?;
    }
    if let Some(first) = response.svids.first() {
        let bundle = split_der(&first.bundle)?;
        write_file(
            &dir.join("bundle.pem"),
            crate::ca::to_pem("CERTIFICATE", &bundle).as_bytes(),
            0o644,
        )?;
    }
    // Every CRL the agent sent, for relying parties that read a file (openssl -CRLfile,
    // nginx ssl_crl): an empty file when there are none.
    write_file(
        &dir.join("crl.pem"),
        crate::ca::to_pem("X509 CRL", &response.crl).as_bytes(),
        0o644,
    )?;
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Failure> {
    crate::durable::write_atomically(path, bytes, mode)
        .map_err(|e| Failure::failed(format!("cannot write {}: {e}", path.display())))
}
