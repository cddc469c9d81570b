//! `tessera wit fetch|bundle`: WIT-SVIDs from the Workload API (the Incubating profile, served
//! when the agent's `[wit] enabled`), for trying proof of possession by hand.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use tokio_stream::StreamExt;

use super::admin::print_json;
use super::client::{connect, status_failure};
use super::svid::CommonArgs;
use super::{Failure, Output};
use crate::proto::workload::{WitBundlesRequest, WitsvidRequest};

#[derive(Subcommand, Debug)]
pub(super) enum WitCommand {
    /// Fetch a WIT-SVID and the private key it is bound to. Text: the token alone (the key goes
    /// to --key-out); JSON: the SPIFFE ID, the token, the key (a private JWK) and the hint.
    Fetch(FetchArgs),
    /// Print the WIT bundle of the trust domain (a JWK Set with `use: "wit-svid"` keys).
    Bundle(BundleArgs),
}

#[derive(Args, Debug)]
pub(super) struct FetchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The identity to fetch, when the caller has several (default: the first).
    #[arg(long, value_name = "ID")]
    spiffe_id: Option<String>,
    /// Write the private key (a JWK) to this file, mode 0600.
    #[arg(long, value_name = "FILE")]
    key_out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(super) struct BundleArgs {
    #[command(flatten)]
    common: CommonArgs,
}

pub(super) async fn run(command: WitCommand, output: Output) -> Result<(), Failure> {
    match command {
        WitCommand::Fetch(args) => fetch(args, output).await,
        WitCommand::Bundle(args) => bundle(args).await,
    }
}

async fn fetch(args: FetchArgs, output: Output) -> Result<(), Failure> {
    if output == Output::Text && args.key_out.is_none() {
        return Err(Failure::usage(
            "a WIT is useless without its key: give --key-out FILE, or --output json",
        ));
    }
    let mut client = connect(args.common.socket()?).await?;
    let stream = client
        .fetch_witsvid(WitsvidRequest {
            spiffe_id: args.spiffe_id.unwrap_or_default(),
        })
        .await;
    let message = first_message(stream, "a WIT-SVID").await?;
    let Some(svid) = message.svids.first() else {
        return Err(Failure::failed("the agent answered with no WIT-SVID"));
    };
    if let Some(path) = &args.key_out {
        crate::durable::write_atomically(path, svid.wit_svid_key.as_bytes(), 0o600).map_err(
            |e| Failure::failed(format!("cannot write the key to {}: {e}", path.display())),
        )?;
    }
    match output {
        Output::Text => {
            println!("{}", svid.wit_svid);
            Ok(())
        }
        Output::Json => print_json(&serde_json::json!({
            "spiffe_id": svid.spiffe_id,
            "wit": svid.wit_svid,
            "key": serde_json::from_str::<serde_json::Value>(&svid.wit_svid_key)
                .unwrap_or(serde_json::Value::Null),
            "hint": svid.hint,
        })),
    }
}

async fn bundle(args: BundleArgs) -> Result<(), Failure> {
    let mut client = connect(args.common.socket()?).await?;
    let stream = client.fetch_wit_bundles(WitBundlesRequest {}).await;
    let message = first_message(stream, "a bundle").await?;
    let Some(json) = message.bundles.values().next() else {
        return Err(Failure::failed("the agent sent no WIT bundle"));
    };
    println!("{json}");
    Ok(())
}

/// The first message of a stream the agent opened (or refused), which should carry `what`.
async fn first_message<T>(
    opened: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
    what: &str,
) -> Result<T, Failure> {
    opened
        .map_err(status_failure)?
        .into_inner()
        .next()
        .await
        .ok_or_else(|| Failure::failed(format!("the agent ended the stream without {what}")))?
        .map_err(status_failure)
}
