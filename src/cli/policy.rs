//! `tessera policy set|clear|show|history|test`: the trust domain's authorisation policy, on
//! the server's admin socket.

use std::io::Read;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde::Serialize;

use super::admin::{Admin, AdminArgs, print_json, print_text};
use super::table::{Table, time_or};
use super::{Failure, Output};
use crate::events::model::JsonTime;
use crate::proto::tessera::{
    GetPolicyRequest, ListPolicyVersionsRequest, Policy, SetPolicyRequest, TestPolicyRequest,
};

#[derive(Args, Debug)]
pub(super) struct PolicyArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Replace the policy with the Cedar policies in FILE (`-`: standard input); checked against
    /// tessera's schema first, and refused with line and column, the old policy staying.
    Set {
        /// The Cedar file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Remove the policy: entries alone decide again.
    Clear,
    /// Print the current policy (or one version of it).
    Show {
        /// The version to show (default: the one in force).
        #[arg(value_name = "VERSION")]
        number: Option<i64>,
    },
    /// List every version: number, when, digest.
    History,
    /// Ask what the policy decides, e.g. `--principal uid=1001 --action StartTask --resource coder`.
    Test {
        /// A principal attribute as key=value (repeatable): uid, gid, user, group, path,
        /// sha256, unit, node_id, node_label, task_id, task_entry, task_spiffe_id, chain.
        #[arg(long, value_name = "KEY=VALUE")]
        principal: Vec<String>,
        /// Issue, StartTask or Delegate.
        #[arg(long)]
        action: String,
        /// The entry's id.
        #[arg(long, value_name = "ENTRY_ID")]
        resource: String,
        /// A context value as key=value (repeatable): time, ttl, purpose, depth.
        #[arg(long, value_name = "KEY=VALUE")]
        context: Vec<String>,
        /// Test this Cedar file instead of the current policy.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

fn read_policy(file: &PathBuf) -> Result<String, Failure> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Failure::failed(format!("cannot read the policy from stdin: {e}")))?;
        return Ok(text);
    }
    std::fs::read_to_string(file)
        .map_err(|e| Failure::usage(format!("{}: cannot read: {e}", file.display())))
}

#[derive(Serialize)]
struct PolicyView<'a> {
    version: i64,
    sha256: &'a str,
    #[serde(flatten)]
    set: JsonTime,
    text: &'a str,
}

fn view(policy: &Policy) -> PolicyView<'_> {
    PolicyView {
        version: policy.version,
        sha256: &policy.sha256,
        set: JsonTime::from_ms("set_at", (policy.set_ms != 0).then_some(policy.set_ms)),
        text: &policy.text,
    }
}

fn describe(policy: &Policy) -> String {
    match (policy.version, policy.text.is_empty()) {
        (0, _) => "no policy is set: entries alone decide".to_owned(),
        (v, true) => format!("policy version {v}: cleared, entries alone decide"),
        (v, false) => format!(
            "policy version {v} ({})",
            policy.sha256.chars().take(12).collect::<String>()
        ),
    }
}

/// Runs a policy command.
pub(super) async fn run(args: PolicyArgs, output: Output) -> Result<(), Failure> {
    let mut admin = Admin::connect(&args.admin).await?;
    match args.command {
        PolicyCommand::Set { file } => {
            let text = read_policy(&file)?;
            if text.trim().is_empty() {
                return Err(Failure::usage(format!(
                    "{} holds no policy; to let entries alone decide, run `tessera policy clear`",
                    file.display()
                )));
            }
            let set = admin
                .client
                .set_policy(SetPolicyRequest { text })
                .await
                .map_err(|s| {
                    if s.code() == tonic::Code::InvalidArgument {
                        // The server names line and column in "policy"; the operator's file is
                        // what they edit.
                        Failure::usage(format!(
                            "{}:{} (refused; the policy in force stays)",
                            file.display(),
                            s.message().trim_start_matches("policy:")
                        ))
                    } else {
                        admin.failure(s)
                    }
                })?
                .into_inner();
            print_policy(output, &set, false)
        }
        PolicyCommand::Clear => {
            let set = admin
                .client
                .set_policy(SetPolicyRequest {
                    text: String::new(),
                })
                .await
                .map_err(|s| admin.failure(s))?
                .into_inner();
            print_policy(output, &set, false)
        }
        PolicyCommand::Show { number } => {
            let policy = admin
                .client
                .get_policy(GetPolicyRequest {
                    version: number.unwrap_or(0),
                })
                .await
                .map_err(|s| admin.failure(s))?
                .into_inner();
            print_policy(output, &policy, true)
        }
        PolicyCommand::History => {
            let versions = admin
                .client
                .list_policy_versions(ListPolicyVersionsRequest {})
                .await
                .map_err(|s| admin.failure(s))?
                .into_inner()
                .versions;
            match output {
                Output::Json => print_json(&versions.iter().map(view).collect::<Vec<_>>()),
                Output::Text => {
                    let mut table = Table::new(&["VERSION", "SET AT", "SHA-256", "STATEMENTS"]);
                    for v in &versions {
                        table.row(vec![
                            v.version.to_string(),
                            time_or(v.set_ms / 1000, "-"),
                            v.sha256.chars().take(16).collect(),
                            if v.text.is_empty() {
                                "(cleared)".into()
                            } else {
                                v.text.matches(';').count().to_string()
                            },
                        ]);
                    }
                    print_text(&table.render())
                }
            }
        }
        PolicyCommand::Test {
            principal,
            action,
            resource,
            context,
            file,
        } => {
            let text = file.as_ref().map(read_policy).transpose()?;
            let answer = admin
                .client
                .test_policy(TestPolicyRequest {
                    principal,
                    action,
                    resource,
                    context,
                    text,
                })
                .await
                .map_err(|s| admin.failure(s))?
                .into_inner();
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "allowed": answer.allowed,
                    "version": answer.version,
                    "determining": answer.determining,
                    "errors": answer.errors,
                })),
                Output::Text => {
                    let mut text = format!(
                        "{} by policy version {}",
                        if answer.allowed { "ALLOW" } else { "DENY" },
                        answer.version
                    );
                    if answer.determining.is_empty() {
                        if !answer.allowed {
                            text.push_str(" (no permit applies)");
                        }
                    } else {
                        text.push_str(&format!(": {}", answer.determining.join(", ")));
                    }
                    for error in &answer.errors {
                        text.push_str(&format!("\nerror: {error}"));
                    }
                    print_text(&format!("{text}\n"))
                }
            }
        }
    }
}

fn print_policy(output: Output, policy: &Policy, with_text: bool) -> Result<(), Failure> {
    match output {
        Output::Json => print_json(&view(policy)),
        Output::Text if with_text && !policy.text.is_empty() => print_text(&format!(
            "// {}\n{}{}",
            describe(policy),
            policy.text,
            if policy.text.ends_with('\n') {
                ""
            } else {
                "\n"
            }
        )),
        Output::Text => print_text(&format!("{}\n", describe(policy))),
    }
}
