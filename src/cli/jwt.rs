//! `tessera jwt fetch|validate|bundle`: JWT-SVIDs from the Workload API, for scripts that call
//! HTTP APIs and for checking a token by hand.

use clap::{Args, Subcommand};
use serde::Serialize;

use super::admin::print_json;
use super::client::{connect, status_failure};
use super::svid::CommonArgs;
use super::{Failure, Output};
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
    }
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
