//! `tessera events list|tail|export` (the audit trail) and `tessera inventory` (who may be what,
//! and what came of it).

use clap::{Args, Subcommand};
use tokio_stream::StreamExt;

use super::admin::{Admin, AdminArgs, bad_flag, print_json, print_text};
use super::table::{Table, duration, time_or};
use super::{Failure, Output};
use crate::events::model::{JsonTime, KIND_NAMES, kind_from_name, to_json};
use crate::proto::tessera::{EventFilter, GetInventoryRequest, Inventory, StoredEvent};

/// `tessera events ...`.
#[derive(Args, Debug)]
pub(super) struct EventsArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: EventsCommand,
}

#[derive(Subcommand, Debug)]
enum EventsCommand {
    /// Stored events matching the filters, oldest first (by the time they happened).
    List(FilterArgs),
    /// Stored events matching the filters, then new ones as they arrive, until interrupted.
    Tail(FilterArgs),
    /// Every matching event as JSON lines, for a SIEM (pages through the whole store).
    Export(FilterArgs),
}

#[derive(Args, Debug, Clone)]
struct FilterArgs {
    /// Only events at or after this instant (RFC 3339) or this long ago (e.g. 1h).
    #[arg(long, value_name = "TIME|DURATION")]
    since: Option<String>,
    /// Only events before this instant (RFC 3339) or this long ago.
    #[arg(long, value_name = "TIME|DURATION")]
    until: Option<String>,
    /// Only events of this kind (repeatable).
    #[arg(long = "kind", value_name = "KIND")]
    kinds: Vec<String>,
    /// Only events about this SPIFFE ID.
    #[arg(long, value_name = "SPIFFE_ID")]
    spiffe_id: Option<String>,
    /// Only events about this entry.
    #[arg(long = "entry", value_name = "ENTRY_ID")]
    entry: Option<String>,
    /// Only events from or about this node.
    #[arg(long = "node", value_name = "NODE_ID")]
    node: Option<String>,
    /// Only events about the SVID with this serial (hex).
    #[arg(long, value_name = "HEX")]
    serial: Option<String>,
    /// At most this many events (list only; at most 9999, `export` has no limit).
    #[arg(long, default_value_t = 1000)]
    limit: u32,
}

/// `tessera inventory`.
#[derive(Args, Debug)]
pub(super) struct InventoryArgs {
    #[command(flatten)]
    admin: AdminArgs,
}

fn instant_ms(flag: &str, text: &str) -> Result<i64, Failure> {
    if let Ok(ago) = crate::config::parse_duration(text) {
        return Ok(crate::events::model::now_ms() - ago.as_millis() as i64);
    }
    crate::config::parse_rfc3339(text)
        .map(|t| crate::clock::unix_seconds(t) * 1000)
        .map_err(|_| {
            bad_flag(
                flag,
                text,
                "not a time; write an RFC 3339 instant (2027-01-31T18:00:00Z) or how long ago (90m)",
            )
        })
}

impl FilterArgs {
    fn to_filter(&self) -> Result<EventFilter, Failure> {
        for kind in &self.kinds {
            if kind_from_name(kind).is_none() {
                return Err(bad_flag(
                    "--kind",
                    kind,
                    &format!("not an event kind; one of {}", KIND_NAMES.join(", ")),
                ));
            }
        }
        if self.limit == 0 {
            return Err(bad_flag("--limit", "0", "must be at least 1"));
        }
        Ok(EventFilter {
            since_ms: self
                .since
                .as_deref()
                .map(|t| instant_ms("--since", t))
                .transpose()?
                .unwrap_or(0),
            until_ms: self
                .until
                .as_deref()
                .map(|t| instant_ms("--until", t))
                .transpose()?
                .unwrap_or(0),
            kinds: self.kinds.clone(),
            spiffe_id: self.spiffe_id.clone().unwrap_or_default(),
            entry_id: self.entry.clone().unwrap_or_default(),
            node_id: self.node.clone().unwrap_or_default(),
            serial: self.serial.clone().unwrap_or_default(),
            after_seq: 0,
            limit: self.limit,
            by_event_time: false,
        })
    }
}

fn event_json(event: &StoredEvent) -> serde_json::Value {
    match &event.event {
        Some(e) => to_json(e, Some(event.seq), Some(event.received_ms)),
        None => serde_json::Value::Null,
    }
}

fn event_row(event: &StoredEvent) -> Vec<String> {
    let json = event_json(event);
    let text = |key: &str| json[key].as_str().unwrap_or_default().to_owned();
    let caller = match &json["caller"] {
        serde_json::Value::Null => String::new(),
        c => format!(
            "pid {} uid {} {}",
            c["pid"],
            c["uid"],
            c["exe_path"].as_str().unwrap_or_default()
        ),
    };
    let what = match text("kind").as_str() {
        "svid_revoked" => text("reason"),
        "svid_used" => format!("{} deliveries", json["count"]),
        _ => text("detail"),
    };
    let serial = text("serial");
    // A time RFC 3339 cannot show is shown as the number stored.
    let time = json["time"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("unix_ms {}", json["time_ms"]));
    vec![
        time,
        text("kind"),
        text("node_id"),
        text("spiffe_id"),
        serial.chars().take(12).collect(),
        caller,
        what,
    ]
}

const EVENT_HEADER: &[&str] = &[
    "TIME",
    "KIND",
    "NODE",
    "SPIFFE ID",
    "SERIAL",
    "CALLER",
    "DETAIL",
];

/// The largest `--limit` of `events list`: one less than the server lists at once, so that
/// asking for one more tells whether the limit cut the list.
const MAX_LISTED: u32 = crate::store::MAX_EVENTS_LISTED as u32 - 1;

/// Runs one `tessera events` verb.
pub(super) async fn run(args: EventsArgs, output: Output) -> Result<(), Failure> {
    let mut admin = Admin::connect(&args.admin).await?;
    match args.command {
        EventsCommand::List(filter) => {
            let limit = filter.limit;
            if limit > MAX_LISTED {
                return Err(bad_flag(
                    "--limit",
                    &limit.to_string(),
                    &format!("at most {MAX_LISTED}; `tessera events export` lists them all"),
                ));
            }
            let mut request = filter.to_filter()?;
            request.by_event_time = true;
            // One more than shown tells whether the limit cut the list.
            request.limit = limit + 1;
            let mut events = admin
                .client
                .list_events(request)
                .await
                .map_err(|s| admin.failure(s))?
                .into_inner()
                .events;
            if events.len() > limit as usize {
                events.truncate(limit as usize);
                eprintln!(
                    "showing the first {limit} matching events; narrow with --since/--until or \
                     raise --limit"
                );
            }
            match output {
                Output::Json => print_json(&events.iter().map(event_json).collect::<Vec<_>>()),
                Output::Text => {
                    if events.is_empty() {
                        eprintln!("no events");
                        return Ok(());
                    }
                    let mut table = Table::new(EVENT_HEADER);
                    for event in &events {
                        table.row(event_row(event));
                    }
                    print_text(&table.render())
                }
            }
        }
        EventsCommand::Export(filter) => {
            let mut filter = filter.to_filter()?;
            filter.limit = 10_000;
            loop {
                let events = admin
                    .client
                    .list_events(filter.clone())
                    .await
                    .map_err(|s| admin.failure(s))?
                    .into_inner()
                    .events;
                let Some(last) = events.last().map(|e| e.seq) else {
                    return Ok(());
                };
                let lines: String = events
                    .iter()
                    .map(|e| format!("{}\n", event_json(e)))
                    .collect();
                print_text(&lines)?;
                filter.after_seq = last;
            }
        }
        EventsCommand::Tail(filter) => {
            let mut stream = admin
                .client
                .tail_events(filter.to_filter()?)
                .await
                .map_err(|s| admin.failure(s))?
                .into_inner();
            let interrupted = super::termination();
            tokio::pin!(interrupted);
            loop {
                let event = tokio::select! {
                    _ = &mut interrupted => return Ok(()),
                    event = stream.next() => event,
                };
                match event {
                    None => return Ok(()),
                    Some(Err(status)) => return Err(admin.failure(status)),
                    Some(Ok(event)) => match output {
                        Output::Json => print_text(&format!("{}\n", event_json(&event)))?,
                        Output::Text => print_text(&format!("{}\n", event_row(&event).join("  ")))?,
                    },
                }
            }
        }
    }
}

/// Runs `tessera inventory`.
pub(super) async fn inventory(args: InventoryArgs, output: Output) -> Result<(), Failure> {
    let mut admin = Admin::connect(&args.admin).await?;
    let inventory = admin
        .client
        .get_inventory(GetInventoryRequest {})
        .await
        .map_err(|s| admin.failure(s))?
        .into_inner();
    match output {
        Output::Json => print_json(&inventory_json(&inventory)),
        Output::Text => print_text(&inventory_text(&inventory)),
    }
}

fn inventory_json(inventory: &Inventory) -> serde_json::Value {
    // The API sends 0 for a time never set.
    let set = |ms: i64| (ms != 0).then_some(ms);
    let identities: Vec<serde_json::Value> = inventory
        .identities
        .iter()
        .map(|i| {
            let entry = i.entry.clone().unwrap_or_default();
            let svid_json = |s: &crate::proto::tessera::SvidInfo| {
                let mut svid = serde_json::json!({
                    "serial": s.serial,
                    "node_id": s.node_id,
                    "uses": s.uses,
                });
                JsonTime::from_ms("issued", set(s.issued_ms)).put(&mut svid);
                JsonTime::from_seconds("not_after", s.not_after).put(&mut svid);
                JsonTime::from_ms("last_used", s.last_used_ms).put(&mut svid);
                if s.revoked_ms.is_some() {
                    JsonTime::from_ms("revoked", s.revoked_ms).put(&mut svid);
                    svid["reason"] = s.reason.clone().into();
                }
                svid
            };
            let live_svids: Vec<serde_json::Value> = i.live_svids.iter().map(svid_json).collect();
            let revoked_svids: Vec<serde_json::Value> =
                i.revoked_svids.iter().map(svid_json).collect();
            let mut identity = serde_json::json!({
                "entry_id": entry.id,
                "spiffe_id": entry.spiffe_id,
                "owner": entry.owner,
                "purpose": entry.purpose,
                "inactivity_timeout_seconds": entry.inactivity_timeout_seconds,
                "registration_expired": i.registration_expired,
                "unused_past_timeout": i.unused_past_timeout,
                "dormant": i.dormant,
                "live_svids": live_svids,
                "revoked_svids": revoked_svids,
            });
            JsonTime::from_seconds("expires_at", entry.expires_at.unwrap_or(0)).put(&mut identity);
            JsonTime::from_ms("last_issued", i.last_issued_ms).put(&mut identity);
            JsonTime::from_ms("last_used", i.last_used_ms).put(&mut identity);
            identity
        })
        .collect();
    let nodes: Vec<serde_json::Value> = inventory
        .nodes
        .iter()
        .map(|n| {
            let node = n.node.clone().unwrap_or_default();
            let mut node_json = serde_json::json!({
                "node_id": node.id,
                "status": node.status,
                "attestation": node.attestation,
                "live_svids": n.live_serials,
                "revoked_svids": n.revoked_serials,
            });
            JsonTime::from_ms("last_contact", set(n.last_contact_ms)).put(&mut node_json);
            node_json
        })
        .collect();
    let tasks: Vec<serde_json::Value> = inventory
        .tasks
        .iter()
        .map(|t| serde_json::to_value(super::task::view(t)).unwrap_or_default())
        .collect();
    serde_json::json!({ "identities": identities, "nodes": nodes, "tasks": tasks })
}

fn inventory_text(inventory: &Inventory) -> String {
    let mut identities = Table::new(&[
        "SPIFFE ID",
        "OWNER",
        "PURPOSE",
        "LIVE",
        "REVOKED",
        "LAST ISSUED",
        "LAST USED",
        "FLAGS",
    ]);
    for i in &inventory.identities {
        let entry = i.entry.clone().unwrap_or_default();
        let mut flags = Vec::new();
        if i.registration_expired {
            flags.push("EXPIRED".to_owned());
        }
        if i.dormant {
            flags.push("DORMANT".to_owned());
        }
        if i.unused_past_timeout {
            flags.push(format!(
                "UNUSED>{}",
                duration(entry.inactivity_timeout_seconds.unwrap_or(0))
            ));
        }
        let when = |ms: Option<i64>| ms.map(|ms| time_or(ms / 1000, "-")).unwrap_or("-".into());
        identities.row(vec![
            entry.spiffe_id,
            entry.owner,
            entry.purpose,
            i.live_svids.len().to_string(),
            i.revoked_svids.len().to_string(),
            when(i.last_issued_ms),
            when(i.last_used_ms),
            flags.join(" "),
        ]);
    }
    let mut nodes = Table::new(&[
        "NODE",
        "STATUS",
        "ATTESTATION",
        "LAST CONTACT",
        "LIVE SVIDS",
    ]);
    for n in &inventory.nodes {
        let node = n.node.clone().unwrap_or_default();
        nodes.row(vec![
            node.id,
            node.status,
            node.attestation,
            time_or(n.last_contact_ms / 1000, "-"),
            n.live_serials.len().to_string(),
        ]);
    }
    format!(
        "IDENTITIES\n{}\nNODES\n{}\nTASKS\n{}",
        identities.render(),
        nodes.render(),
        super::task::task_table(&inventory.tasks)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::tessera::{Entry, IdentityInventory, NodeInfo, NodeInventory, SvidInfo};

    #[test]
    fn inventory_json_times_are_strings_with_milliseconds_and_null_when_absent() {
        let inventory = Inventory {
            identities: vec![IdentityInventory {
                entry: Some(Entry {
                    id: "e-1".into(),
                    expires_at: None,
                    ..Default::default()
                }),
                live_svids: vec![SvidInfo {
                    serial: "0a0b".into(),
                    issued_ms: 1_800_000_000_000,
                    not_after: 1_800_003_600,
                    last_used_ms: None,
                    ..Default::default()
                }],
                last_issued_ms: Some(1_800_000_000_000),
                last_used_ms: None,
                ..Default::default()
            }],
            nodes: vec![NodeInventory {
                node: Some(NodeInfo::default()),
                live_serials: vec![],
                last_contact_ms: 0,
                ..Default::default()
            }],
            tasks: vec![],
        };
        let json = inventory_json(&inventory);
        let identity = &json["identities"][0];
        assert_eq!(identity["expires_at"], serde_json::Value::Null, "{json}");
        assert_eq!(identity["expires_at_ms"], serde_json::Value::Null, "{json}");
        assert_eq!(
            identity["last_issued"], "2027-01-15T08:00:00.000Z",
            "{json}"
        );
        assert_eq!(identity["last_issued_ms"], 1_800_000_000_000_i64, "{json}");
        assert_eq!(identity["last_used"], serde_json::Value::Null, "{json}");
        let svid = &identity["live_svids"][0];
        assert_eq!(svid["not_after"], "2027-01-15T09:00:00.000Z", "{json}");
        assert_eq!(svid["not_after_ms"], 1_800_003_600_000_i64, "{json}");
        assert_eq!(svid["issued_ms"], 1_800_000_000_000_i64, "{json}");
        assert_eq!(svid["last_used_ms"], serde_json::Value::Null, "{json}");
        let node = &json["nodes"][0];
        assert_eq!(node["last_contact"], serde_json::Value::Null, "{json}");
        assert_eq!(node["last_contact_ms"], serde_json::Value::Null, "{json}");
    }
}
