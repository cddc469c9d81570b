//! `tessera node list|show|evict|ban`: the nodes that attested to the server.

use clap::{Args, Subcommand};
use serde::Serialize;

use super::admin::{Admin, AdminArgs, print_json, print_text, require_id};
use super::table::{Table, fields, time_or};
use super::{Failure, Output};
use crate::events::model::JsonTime;
use crate::proto::tessera::{ListNodesRequest, NodeInfo, NodeRequest};

/// `tessera node ...`: the options every verb shares, then the verb.
#[derive(Args, Debug)]
pub(super) struct NodeArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// List the nodes that attested, whatever their status.
    List,
    /// Print every field of one node.
    Show(IdArg),
    /// End a node's credentials: it must attest again, where its method allows.
    Evict(IdArg),
    /// Evict a node and refuse it for good.
    Ban(IdArg),
}

#[derive(Args, Debug)]
struct IdArg {
    /// The node's id, as `tessera node list` shows it.
    #[arg(value_name = "NODE_ID")]
    id: String,
}

/// Runs one `tessera node` verb.
pub(super) async fn run(args: NodeArgs, output: Output) -> Result<(), Failure> {
    if let NodeCommand::Show(IdArg { id })
    | NodeCommand::Evict(IdArg { id })
    | NodeCommand::Ban(IdArg { id }) = &args.command
    {
        require_id("node", id)?;
    }
    let mut admin = Admin::connect(&args.admin).await?;
    match args.command {
        NodeCommand::List => {
            let nodes = admin
                .client
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(|s| admin.failure(s))?
                .into_inner()
                .nodes;
            print_nodes(output, &nodes)
        }
        NodeCommand::Show(IdArg { id }) => {
            let node = admin
                .client
                .get_node(NodeRequest { id: id.clone() })
                .await
                .map_err(|s| admin.lookup_failure(s, "node", &id))?
                .into_inner();
            print_node(output, &node)
        }
        NodeCommand::Evict(IdArg { id }) => {
            let node = admin
                .client
                .evict_node(NodeRequest { id: id.clone() })
                .await
                .map_err(|s| admin.lookup_failure(s, "node", &id))?
                .into_inner();
            print_changed(
                output,
                &node,
                "evicted: its credentials are ended; it must attest again",
            )
        }
        NodeCommand::Ban(IdArg { id }) => {
            let node = admin
                .client
                .ban_node(NodeRequest { id: id.clone() })
                .await
                .map_err(|s| admin.lookup_failure(s, "node", &id))?
                .into_inner();
            print_changed(output, &node, "banned: it is refused for good")
        }
    }
}

/// A node as printed in JSON.
#[derive(Debug, Serialize)]
struct NodeView {
    id: String,
    spiffe_id: String,
    attestation: String,
    selectors: Vec<String>,
    status: String,
    #[serde(flatten)]
    attested_at: JsonTime,
    #[serde(flatten)]
    last_seen: JsonTime,
    svid_serial: String,
    #[serde(flatten)]
    svid_not_after: JsonTime,
    ca_serial: String,
    #[serde(flatten)]
    ca_not_after: JsonTime,
}

impl From<&NodeInfo> for NodeView {
    fn from(node: &NodeInfo) -> Self {
        Self {
            id: node.id.clone(),
            spiffe_id: node.spiffe_id.clone(),
            attestation: node.attestation.clone(),
            selectors: node.selectors.clone(),
            status: node.status.clone(),
            attested_at: JsonTime::from_seconds("attested_at", node.attested_at),
            last_seen: JsonTime::from_seconds("last_seen", node.last_seen),
            svid_serial: node.svid_serial.clone(),
            svid_not_after: JsonTime::from_seconds("svid_not_after", node.svid_not_after),
            ca_serial: node.ca_serial.clone(),
            ca_not_after: JsonTime::from_seconds("ca_not_after", node.ca_not_after),
        }
    }
}

fn print_node(output: Output, node: &NodeInfo) -> Result<(), Failure> {
    match output {
        Output::Json => print_json(&NodeView::from(node)),
        Output::Text => print_text(&node_block(node)),
    }
}

fn print_nodes(output: Output, nodes: &[NodeInfo]) -> Result<(), Failure> {
    match output {
        Output::Json => print_json(&nodes.iter().map(NodeView::from).collect::<Vec<_>>()),
        Output::Text if nodes.is_empty() => {
            eprintln!("no nodes");
            Ok(())
        }
        Output::Text => print_text(&node_table(nodes)),
    }
}

/// After evict or ban: the node in JSON, one sentence in text.
fn print_changed(output: Output, node: &NodeInfo, what: &str) -> Result<(), Failure> {
    match output {
        Output::Json => print_json(&NodeView::from(node)),
        Output::Text => print_text(&format!(
            "node {} {what} (status {})\n",
            node.id, node.status
        )),
    }
}

/// Every field of a node, for `show`.
fn node_block(node: &NodeInfo) -> String {
    let one = |value: String| vec![value];
    let selectors = if node.selectors.is_empty() {
        vec!["(none)".to_owned()]
    } else {
        node.selectors.clone()
    };
    fields(&[
        ("id", one(node.id.clone())),
        ("spiffe id", one(node.spiffe_id.clone())),
        ("status", one(node.status.clone())),
        ("attestation", one(node.attestation.clone())),
        ("selectors", selectors),
        ("attested at", one(time_or(node.attested_at, "(never)"))),
        ("last seen", one(time_or(node.last_seen, "(never)"))),
        ("svid serial", one(node.svid_serial.clone())),
        (
            "svid not after",
            one(time_or(node.svid_not_after, "(none)")),
        ),
        ("ca serial", one(node.ca_serial.clone())),
        ("ca not after", one(time_or(node.ca_not_after, "(none)"))),
    ])
}

fn node_table(nodes: &[NodeInfo]) -> String {
    let mut table = Table::new(&["ID", "STATUS", "ATTESTATION", "LAST SEEN", "SVID NOT AFTER"]);
    for node in nodes {
        table.row(vec![
            node.id.clone(),
            node.status.clone(),
            node.attestation.clone(),
            time_or(node.last_seen, "never"),
            time_or(node.svid_not_after, "-"),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeInfo {
        NodeInfo {
            id: "x509pop-1f2e".into(),
            spiffe_id: "spiffe://example.org/spire/agent/x509pop-1f2e".into(),
            attestation: "x509pop".into(),
            selectors: vec!["node:id:x509pop-1f2e".into(), "node:label:gpu".into()],
            status: "active".into(),
            attested_at: 1_800_000_000,
            last_seen: 1_800_000_060,
            svid_serial: "0a1b".into(),
            svid_not_after: 1_800_003_600,
            ca_serial: "2c3d".into(),
            ca_not_after: 0,
        }
    }

    #[test]
    fn json_shape() {
        let json = serde_json::to_value(NodeView::from(&node())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "x509pop-1f2e",
                "spiffe_id": "spiffe://example.org/spire/agent/x509pop-1f2e",
                "attestation": "x509pop",
                "selectors": ["node:id:x509pop-1f2e", "node:label:gpu"],
                "status": "active",
                "attested_at": "2027-01-15T08:00:00.000Z",
                "attested_at_ms": 1_800_000_000_000_i64,
                "last_seen": "2027-01-15T08:01:00.000Z",
                "last_seen_ms": 1_800_000_060_000_i64,
                "svid_serial": "0a1b",
                "svid_not_after": "2027-01-15T09:00:00.000Z",
                "svid_not_after_ms": 1_800_003_600_000_i64,
                "ca_serial": "2c3d",
                "ca_not_after": null,
                "ca_not_after_ms": null,
            })
        );
    }

    #[test]
    fn text_block_and_table() {
        let block = node_block(&node());
        assert!(
            block.contains(
                "selectors:       node:id:x509pop-1f2e\n                 node:label:gpu\n"
            ),
            "{block}"
        );
        assert!(block.contains("ca not after:    (none)\n"), "{block}");
        let table = node_table(&[node()]);
        assert_eq!(
            table,
            "ID            STATUS  ATTESTATION  LAST SEEN             SVID NOT AFTER\n\
             x509pop-1f2e  active  x509pop      2027-01-15T08:01:00Z  2027-01-15T09:00:00Z\n"
        );
    }
}
