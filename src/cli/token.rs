//! `tessera token create`: one-time join tokens that let a new node attest.

use clap::{Args, Subcommand};
use serde::Serialize;

use super::admin::{Admin, AdminArgs, bad_flag, print_json, print_text, seconds};
use super::table::{duration, time_or};
use super::{Failure, Output};
use crate::events::model::JsonTime;
use crate::proto::tessera::{CreateJoinTokenRequest, JoinToken};

/// `tessera token ...`: the options every verb shares, then the verb.
#[derive(Args, Debug)]
pub(super) struct TokenArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a join token; in text output stdout carries only the token, so
    /// `TOKEN=$(tessera token create)` works, and the expiry goes to stderr.
    Create(CreateArgs),
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// How long the token may be used, e.g. 10m or 1h.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    ttl: String,
    /// A label for the node that uses the token, becoming its selector node:label:LABEL;
    /// repeat for several.
    #[arg(long = "label", value_name = "LABEL")]
    labels: Vec<String>,
}

impl CreateArgs {
    fn request(&self) -> Result<CreateJoinTokenRequest, Failure> {
        if let Some(bad) = self
            .labels
            .iter()
            .find(|l| l.is_empty() || l.contains(char::is_whitespace))
        {
            return Err(bad_flag(
                "--label",
                bad,
                "must be a non-empty word without spaces, e.g. gpu",
            ));
        }
        Ok(CreateJoinTokenRequest {
            ttl_seconds: seconds("--ttl", &self.ttl)?,
            labels: self.labels.clone(),
        })
    }
}

/// A join token as printed in JSON.
#[derive(Debug, Serialize)]
struct TokenView {
    token: String,
    #[serde(flatten)]
    expires_at: JsonTime,
    labels: Vec<String>,
}

impl From<&JoinToken> for TokenView {
    fn from(token: &JoinToken) -> Self {
        Self {
            token: token.token.clone(),
            expires_at: JsonTime::from_seconds("expires_at", token.expires_at),
            labels: token.labels.clone(),
        }
    }
}

/// Runs one `tessera token` verb.
pub(super) async fn run(args: TokenArgs, output: Output) -> Result<(), Failure> {
    let TokenCommand::Create(create) = args.command;
    let request = create.request()?;
    let ttl = request.ttl_seconds;
    let mut admin = Admin::connect(&args.admin).await?;
    let token = admin
        .client
        .create_join_token(request)
        .await
        .map_err(|s| admin.failure(s))?
        .into_inner();
    match output {
        Output::Json => print_json(&TokenView::from(&token)),
        Output::Text => {
            print_text(&format!("{}\n", token.token))?;
            eprintln!("{}", expiry_note(&token, ttl));
            Ok(())
        }
    }
}

/// The line printed on stderr next to the token in text output.
fn expiry_note(token: &JoinToken, ttl_seconds: i64) -> String {
    let labels = if token.labels.is_empty() {
        String::new()
    } else {
        format!("; labels {}", token.labels.join(","))
    };
    format!(
        "join token valid for one attestation until {} ({} from now){labels}; it is not shown again",
        time_or(token.expires_at, "(unknown)"),
        duration(ttl_seconds)
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn create(args: &[&str]) -> Result<CreateJoinTokenRequest, Failure> {
        let argv = ["tessera", "token", "create"].iter().chain(args);
        match Cli::try_parse_from(argv).expect("flags parse").command {
            Command::Token(TokenArgs {
                command: TokenCommand::Create(create),
                ..
            }) => create.request(),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn builds_requests() {
        assert_eq!(
            create(&[]).unwrap(),
            CreateJoinTokenRequest {
                ttl_seconds: 600,
                labels: vec![],
            }
        );
        assert_eq!(
            create(&["--ttl", "1h", "--label", "gpu", "--label", "rack-7"]).unwrap(),
            CreateJoinTokenRequest {
                ttl_seconds: 3600,
                labels: vec!["gpu".into(), "rack-7".into()],
            }
        );
    }

    #[test]
    fn refuses_bad_values() {
        for (args, named) in [
            (&["--ttl", "ten minutes"][..], "--ttl \"ten minutes\""),
            (&["--ttl", "0s"], "--ttl \"0s\""),
            (&["--label", "two words"], "--label \"two words\""),
            (&["--label", ""], "--label \"\""),
        ] {
            let failure = create(args).expect_err("refused");
            assert_eq!(failure.code, 2);
            assert!(failure.message.contains(named), "{}", failure.message);
        }
    }

    #[test]
    fn json_shape_and_note() {
        let token = JoinToken {
            token: "secret".into(),
            expires_at: 1_800_000_600,
            labels: vec!["gpu".into()],
        };
        assert_eq!(
            serde_json::to_value(TokenView::from(&token)).unwrap(),
            serde_json::json!({
                "token": "secret",
                "expires_at": "2027-01-15T08:10:00.000Z",
                "expires_at_ms": 1_800_000_600_000_i64,
                "labels": ["gpu"],
            })
        );
        let note = expiry_note(&token, 600);
        assert!(!note.contains("secret"), "{note}");
        assert!(
            note.contains("until 2027-01-15T08:10:00Z (10m from now); labels gpu"),
            "{note}"
        );
    }
}
