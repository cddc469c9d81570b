//! `tessera svid revoke` and `tessera entry revoke`: the operator's revocations, and how their
//! answer is shown.

use clap::Args;
use serde::Serialize;

use super::admin::{Admin, AdminArgs, print_json, print_text};
use super::{Failure, Output};
use crate::events::model::JsonTime;
use crate::proto::tessera::{RevokeEntryRequest, RevokeResponse, RevokeSvidRequest};

/// `tessera svid revoke SERIAL --reason TEXT`.
#[derive(Args, Debug)]
pub(super) struct RevokeSvidArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// The SVID's serial, lowercase hex, as `tessera inventory` and `tessera svid fetch` show it.
    #[arg(value_name = "SERIAL")]
    serial: String,
    /// Why, in one line: recorded in the event and the revocation.
    #[arg(long, value_name = "TEXT")]
    reason: String,
}

/// `--reason TEXT` of `tessera entry revoke`.
#[derive(Args, Debug)]
pub(super) struct ReasonArg {
    /// Why, in one line: recorded in the events and the revocations.
    #[arg(long, value_name = "TEXT")]
    pub(super) reason: String,
}

pub(super) fn require_reason(reason: &str) -> Result<(), Failure> {
    if reason.trim().is_empty() {
        return Err(Failure::usage(
            "--reason is empty; say why the credential is revoked, e.g. --reason \"key leaked in CI logs\"",
        ));
    }
    Ok(())
}

pub(super) async fn revoke_svid(args: RevokeSvidArgs, output: Output) -> Result<(), Failure> {
    require_reason(&args.reason)?;
    let serial = args.serial.trim().to_ascii_lowercase();
    if serial.is_empty() || hex::decode(&serial).is_err() {
        return Err(Failure::usage(format!(
            "serial {:?}: a certificate serial is hex of whole bytes, e.g. 4f3a09...",
            args.serial
        )));
    }
    let mut admin = Admin::connect(&args.admin).await?;
    let response = admin
        .client
        .revoke_svid(RevokeSvidRequest {
            serial,
            reason: args.reason,
        })
        .await
        .map_err(|status| revocation_failure(&admin, status))?
        .into_inner();
    print_revoked(output, &response)
}

/// How a revocation the server refused ends: a credential nobody issued, or a bad reason, is
/// the caller's mistake, like a bad flag (exit 2).
pub(super) fn revocation_failure(admin: &Admin, status: tonic::Status) -> Failure {
    match status.code() {
        tonic::Code::NotFound | tonic::Code::InvalidArgument => {
            Failure::usage(status.message().to_owned())
        }
        _ => admin.failure(status),
    }
}

pub(super) async fn revoke_entry(
    admin_args: &AdminArgs,
    id: &str,
    reason: ReasonArg,
    output: Output,
) -> Result<(), Failure> {
    require_reason(&reason.reason)?;
    let mut admin = Admin::connect(admin_args).await?;
    let response = admin
        .client
        .revoke_entry(RevokeEntryRequest {
            id: id.to_owned(),
            reason: reason.reason,
        })
        .await
        .map_err(|s| admin.lookup_failure(s, "entry", id))?
        .into_inner();
    print_revoked(output, &response)
}

#[derive(Serialize)]
struct RevokedView<'a> {
    serial: &'a str,
    spiffe_id: &'a str,
    entry_id: &'a str,
    node_id: &'a str,
    #[serde(flatten)]
    not_after: JsonTime,
}

fn print_revoked(output: Output, response: &RevokeResponse) -> Result<(), Failure> {
    match output {
        Output::Json => {
            let revoked: Vec<RevokedView<'_>> = response
                .revoked
                .iter()
                .map(|s| RevokedView {
                    serial: &s.serial,
                    spiffe_id: &s.spiffe_id,
                    entry_id: &s.entry_id,
                    node_id: &s.node_id,
                    not_after: JsonTime::from_seconds("not_after", s.not_after),
                })
                .collect();
            print_json(&serde_json::json!({
                "revoked": revoked,
                "already_revoked": response.already_revoked,
            }))
        }
        Output::Text => {
            let mut text = String::new();
            for s in &response.revoked {
                text.push_str(&format!(
                    "revoked {}  {}  (entry {}, node {}); its node's CRL lists it within a second while the node is connected\n",
                    s.serial, s.spiffe_id, s.entry_id, s.node_id
                ));
            }
            for serial in &response.already_revoked {
                text.push_str(&format!("{serial} was already revoked\n"));
            }
            if text.is_empty() {
                text.push_str("no live SVID to revoke\n");
            }
            print_text(&text)
        }
    }
}
