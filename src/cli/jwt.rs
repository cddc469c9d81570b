//! `tessera jwt fetch|validate|bundle`: JWT-SVIDs from the Workload API, for scripts that call
//! HTTP APIs and for checking a token by hand; `tessera jwt revoke|list`: the operator's side,
//! on the admin socket.

use clap::{Args, Subcommand};
use serde::Serialize;

use super::admin::{Admin, AdminArgs, print_json, print_text};
use super::client::{connect, status_failure};
use super::svid::CommonArgs;
use super::{Failure, Output};
use crate::events::model::JsonTime;
use crate::proto::tessera::{JwtInfo, ListJwtsRequest, RevokeJwtRequest};
use crate::proto::workload::{JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest};

#[derive(Subcommand, Debug)]
pub(super) enum JwtCommand {
    /// Fetch a JWT-SVID for an audience and print it (the token alone, or JSON with --output
    /// json): ready for `Authorization: Bearer`.
    Fetch(FetchArgs),
    /// Check a JWT-SVID through the agent: signature, expiry, audience. Exit 0 valid, 1 invalid.
    Validate(ValidateArgs),
    /// Print the JWT bundle of the trust domain (a JWK Set), for relying parties that validate
    /// offline.
    Bundle(BundleArgs),
    /// Revoke a JWT-SVID by its `jti`: every agent's ValidateJWTSVID refuses it within a second.
    Revoke(RevokeArgs),
    /// List the JWT-SVIDs of the server's inventory, newest first.
    List(ListArgs),
}

#[derive(Args, Debug)]
pub(super) struct RevokeArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// The token's `jti` (from `tessera jwt validate`, `jwt list` or the events).
    #[arg(value_name = "JTI")]
    jti: String,
    /// Why, in one line: recorded in the event.
    #[arg(long, value_name = "TEXT")]
    reason: String,
}

#[derive(Args, Debug)]
pub(super) struct ListArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Only tokens of this entry.
    #[arg(long, value_name = "ID")]
    entry: Option<String>,
    /// Only tokens signed for this node.
    #[arg(long, value_name = "ID")]
    node: Option<String>,
    /// Only tokens neither revoked nor expired.
    #[arg(long)]
    live: bool,
}

#[derive(Args, Debug)]
pub(super) struct FetchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Who the token is for (the `aud` claim); repeat for several.
    #[arg(long, value_name = "AUDIENCE", required = true)]
    audience: Vec<String>,
    /// The identity to fetch, when the caller has several (default: the first).
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
}

#[derive(Args, Debug)]
pub(super) struct ValidateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The audience this relying party is: the token's `aud` must hold it.
    #[arg(long, value_name = "AUDIENCE")]
    audience: String,
    /// The token (compact JWS).
    token: String,
}

#[derive(Args, Debug)]
pub(super) struct BundleArgs {
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Serialize)]
struct FetchedJson<'a> {
    spiffe_id: &'a str,
    token: &'a str,
    hint: &'a str,
}

pub(super) async fn run(command: JwtCommand, output: Output) -> Result<(), Failure> {
    match command {
        JwtCommand::Fetch(args) => fetch(args, output).await,
        JwtCommand::Validate(args) => validate(args, output).await,
        JwtCommand::Bundle(args) => bundle(args).await,
        JwtCommand::Revoke(args) => revoke(args, output).await,
        JwtCommand::List(args) => list(args, output).await,
    }
}

async fn revoke(args: RevokeArgs, output: Output) -> Result<(), Failure> {
    super::revoke::require_reason(&args.reason)?;
    let jti = args.jti.trim().to_owned();
    if jti.is_empty() {
        return Err(Failure::usage("JTI is empty: give the token's jti claim"));
    }
    let mut admin = Admin::connect(&args.admin).await?;
    let response = admin
        .client
        .revoke_jwt(RevokeJwtRequest {
            jti: jti.clone(),
            reason: args.reason,
        })
        .await
        .map_err(|status| super::revoke::revocation_failure(&admin, status))?
        .into_inner();
    match output {
        Output::Json => print_json(&jwt_json(response.jwt.as_ref(), response.already_revoked)),
        Output::Text if response.already_revoked => {
            print_text(&format!("JWT-SVID {jti} was already revoked\n"))
        }
        Output::Text => print_text(&format!("revoked JWT-SVID {jti}\n")),
    }
}

async fn list(args: ListArgs, output: Output) -> Result<(), Failure> {
    let mut admin = Admin::connect(&args.admin).await?;
    let response = admin
        .client
        .list_jwts(ListJwtsRequest {
            entry_id: args.entry.unwrap_or_default(),
            node_id: args.node.unwrap_or_default(),
            live_only: args.live,
            limit: 0,
        })
        .await
        .map_err(|status| admin.failure(status))?
        .into_inner();
    match output {
        Output::Json => {
            let all: Vec<_> = response
                .jwts
                .iter()
                .map(|j| jwt_json(Some(j), false))
                .collect();
            print_json(&all)
        }
        Output::Text => {
            let mut text = String::new();
            for j in &response.jwts {
                let state = if j.revoked_ms != 0 {
                    format!("revoked ({})", j.reason)
                } else {
                    "live until exp".into()
                };
                text.push_str(&format!(
                    "{}  {}  aud={}  node={}  exp={}  uses={}  {state}\n",
                    j.jti,
                    j.spiffe_id,
                    j.audience.join(","),
                    j.node_id,
                    j.expires_at,
                    j.uses
                ));
            }
            print_text(&text)
        }
    }
}

fn jwt_json(jwt: Option<&JwtInfo>, already_revoked: bool) -> serde_json::Value {
    let Some(j) = jwt else {
        return serde_json::json!({ "already_revoked": already_revoked });
    };
    let mut value = serde_json::json!({
        "jti": j.jti,
        "entry_id": j.entry_id,
        "spiffe_id": j.spiffe_id,
        "node_id": j.node_id,
        "task_id": j.task_id,
        "audience": j.audience,
        "expires_at": j.expires_at,
        "uses": j.uses,
        "already_revoked": already_revoked,
    });
    let set = |ms: i64| (ms != 0).then_some(ms);
    JsonTime::from_ms("issued", set(j.issued_ms)).put(&mut value);
    JsonTime::from_ms("revoked", set(j.revoked_ms)).put(&mut value);
    JsonTime::from_ms("last_used", set(j.last_used_ms)).put(&mut value);
    if !j.reason.is_empty() {
        value["reason"] = j.reason.clone().into();
    }
    value
}

async fn fetch(args: FetchArgs, output: Output) -> Result<(), Failure> {
    if let Some(empty) = args.audience.iter().find(|a| a.trim().is_empty()) {
        return Err(Failure::usage(format!(
            "--audience {empty:?}: an audience must not be empty"
        )));
    }
    let mut client = connect(args.common.socket()?).await?;
    let response = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: args.audience,
            spiffe_id: args.spiffe_id.unwrap_or_default(),
        })
        .await
        .map_err(status_failure)?
        .into_inner();
    let Some(svid) = response.svids.first() else {
        return Err(Failure::failed("the agent answered with no JWT-SVID"));
    };
    match output {
        Output::Text => println!("{}", svid.svid),
        Output::Json => print_json(&FetchedJson {
            spiffe_id: &svid.spiffe_id,
            token: &svid.svid,
            hint: &svid.hint,
        })?,
    }
    Ok(())
}

async fn validate(args: ValidateArgs, output: Output) -> Result<(), Failure> {
    let mut client = connect(args.common.socket()?).await?;
    let response = client
        .validate_jwtsvid(ValidateJwtsvidRequest {
            audience: args.audience,
            svid: args.token,
        })
        .await;
    match response {
        Ok(valid) => {
            let valid = valid.into_inner();
            match output {
                Output::Text => println!("valid: {}", valid.spiffe_id),
                Output::Json => print_json(&serde_json::json!({
                    "valid": true,
                    "spiffe_id": valid.spiffe_id,
                }))?,
            }
            Ok(())
        }
        // The agent's reason, e.g. "invalid JWT-SVID: expired at ...".
        Err(status) if status.code() == tonic::Code::InvalidArgument => {
            Err(Failure::failed(status.message()))
        }
        Err(status) => Err(status_failure(status)),
    }
}

async fn bundle(args: BundleArgs) -> Result<(), Failure> {
    let mut client = connect(args.common.socket()?).await?;
    let mut stream = client
        .fetch_jwt_bundles(JwtBundlesRequest {})
        .await
        .map_err(status_failure)?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(status_failure)?
        .ok_or_else(|| Failure::failed("the JWT bundle stream ended without a message"))?;
    let mut bundles = serde_json::Map::new();
    for (trust_domain, jwks) in first.bundles {
        let value: serde_json::Value = serde_json::from_slice(&jwks).map_err(|e| {
            Failure::failed(format!("the bundle of {trust_domain} is not JSON: {e}"))
        })?;
        bundles.insert(trust_domain, value);
    }
    // One trust domain (tessera does not federate): its JWK Set as it is, ready for a JWT
    // library; otherwise every set by trust domain.
    if bundles.len() == 1 {
        print_json(&bundles.into_iter().next().map(|(_, jwks)| jwks))
    } else {
        print_json(&bundles)
    }
}
