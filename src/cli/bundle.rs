//! `tessera bundle show`: the trust domain's X.509 roots, for relying parties outside tessera.

use clap::{Args, Subcommand};
use serde::Serialize;

use super::admin::{Admin, AdminArgs, print_json, print_text};
use super::{Failure, Output};
use crate::proto::tessera::{Bundle, GetBundleRequest};

/// `tessera bundle ...`: the options every verb shares, then the verb.
#[derive(Args, Debug)]
pub(super) struct BundleArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: BundleCommand,
}

#[derive(Subcommand, Debug)]
enum BundleCommand {
    /// Print the root certificates: PEM in text output, so `> bundle.pem` makes a CA file.
    Show,
}

/// The bundle as printed in JSON.
#[derive(Debug, Serialize, PartialEq, Eq)]
struct BundleView {
    trust_domain: String,
    /// One PEM `CERTIFICATE` block per root.
    roots: Vec<String>,
}

impl From<&Bundle> for BundleView {
    fn from(bundle: &Bundle) -> Self {
        Self {
            trust_domain: bundle.trust_domain.clone(),
            roots: bundle
                .roots
                .iter()
                .map(|der| crate::ca::to_pem("CERTIFICATE", &[der]))
                .collect(),
        }
    }
}

/// Runs one `tessera bundle` verb.
pub(super) async fn run(args: BundleArgs, output: Output) -> Result<(), Failure> {
    let BundleCommand::Show = args.command;
    let mut admin = Admin::connect(&args.admin).await?;
    let bundle = admin
        .client
        .get_bundle(GetBundleRequest {})
        .await
        .map_err(|s| admin.failure(s))?
        .into_inner();
    // An empty CA file would make every later TLS check fail far from here; say so now.
    if bundle.roots.is_empty() {
        return Err(Failure::failed(format!(
            "the server's bundle for {:?} holds no roots",
            bundle.trust_domain
        )));
    }
    match output {
        Output::Json => print_json(&BundleView::from(&bundle)),
        Output::Text => print_text(&crate::ca::to_pem("CERTIFICATE", &bundle.roots)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let bundle = Bundle {
            trust_domain: "example.org".into(),
            roots: vec![vec![1, 2, 3], vec![4, 5, 6]],
            jwt_keys: Vec::new(),
        };
        assert_eq!(
            serde_json::to_value(BundleView::from(&bundle)).unwrap(),
            serde_json::json!({
                "trust_domain": "example.org",
                "roots": [
                    "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n",
                    "-----BEGIN CERTIFICATE-----\nBAUG\n-----END CERTIFICATE-----\n",
                ],
            })
        );
    }
}
