//! `tessera entry create|list|show|update|delete`: registration entries on the server.
//!
//! Flags are checked here, before any call, so mistakes exit 2 naming the flag; the server
//! checks again and has the last word.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::admin::{
    Admin, AdminArgs, bad_flag, positive_seconds, print_json, print_text, require_id, seconds,
};
use super::table::{Table, duration, fields, list_or, time_or};
use super::{Failure, Output};
use crate::attest::Selector;
use crate::entry::check_node_selector;
use crate::events::model::JsonTime;
use crate::proto::tessera::{
    CreateEntryRequest, Entry, EntryRequest, ListEntriesRequest, UpdateEntryRequest,
};
use crate::spiffe::SpiffeId;

/// `tessera entry ...`: the options every verb shares, then the verb.
#[derive(Args, Debug)]
pub(super) struct EntryArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: EntryCommand,
}

#[derive(Subcommand, Debug)]
enum EntryCommand {
    /// Register an identity: who may have it, on which nodes, owned by whom, for what.
    Create(CreateArgs),
    /// List entries, all or those matching the filters.
    List(ListArgs),
    /// Print every field of one entry.
    Show(IdArg),
    /// Change fields of an entry; fields not named keep their values.
    Update(UpdateArgs),
    /// Remove an entry: nothing more is issued for it.
    Delete(IdArg),
    /// Revoke every live X.509-SVID of an entry; holders that still match get fresh ones at
    /// once (a forced rotation).
    Revoke(RevokeArgs),
    /// Wake an entry its inactivity timeout made dormant: it is issued again, and its
    /// inactivity is counted from now.
    Activate(IdArg),
}

#[derive(Args, Debug)]
struct RevokeArgs {
    /// The entry's id, as `tessera entry list` shows it.
    #[arg(value_name = "ENTRY_ID")]
    id: String,
    #[command(flatten)]
    reason: super::revoke::ReasonArg,
}

#[derive(Args, Debug)]
struct IdArg {
    /// The entry's id, as `tessera entry list` shows it.
    #[arg(value_name = "ENTRY_ID")]
    id: String,
}

#[derive(Args, Debug)]
struct ListArgs {
    /// Only entries granting this SPIFFE ID.
    #[arg(long, value_name = "SPIFFE_ID")]
    spiffe_id: Option<String>,
    /// Only entries with this owner.
    #[arg(long)]
    owner: Option<String>,
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// The identity granted, e.g. spiffe://example.org/agent/coder.
    #[arg(long, value_name = "SPIFFE_ID")]
    spiffe_id: String,
    /// A workload selector callers must show, e.g. unix:uid:1001; repeat to require several.
    #[arg(long = "selector", value_name = "SEL", required = true)]
    selectors: Vec<String>,
    /// Lifetime of each X.509-SVID, e.g. 90s, 10m or 1h.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    x509_ttl: String,
    /// Who answers for the identity, e.g. a team or a person.
    #[arg(long)]
    owner: String,
    /// What the identity is for.
    #[arg(long)]
    purpose: String,
    #[command(flatten)]
    shared: SharedFlags,
    /// The entry's id; the server derives one from the SPIFFE ID and selectors when omitted.
    #[arg(long, value_name = "ENTRY_ID")]
    id: Option<String>,
}

#[derive(Args, Debug)]
struct UpdateArgs {
    /// The entry's id, as `tessera entry list` shows it.
    #[arg(value_name = "ENTRY_ID")]
    id: String,
    /// A new SPIFFE ID.
    #[arg(long, value_name = "SPIFFE_ID")]
    spiffe_id: Option<String>,
    /// Replaces all workload selectors; repeat for several.
    #[arg(long = "selector", value_name = "SEL")]
    selectors: Vec<String>,
    /// A new X.509-SVID lifetime, e.g. 90s, 10m or 1h.
    #[arg(long, value_name = "DURATION")]
    x509_ttl: Option<String>,
    /// A new owner.
    #[arg(long)]
    owner: Option<String>,
    /// A new purpose.
    #[arg(long)]
    purpose: Option<String>,
    #[command(flatten)]
    shared: SharedFlags,
    /// Remove the expiry: the entry never expires.
    #[arg(long, conflicts_with_all = ["expires_at", "expires_in"])]
    clear_expires_at: bool,
    /// Remove the inactivity timeout.
    #[arg(long, conflicts_with = "inactivity_timeout")]
    clear_inactivity_timeout: bool,
    /// Remove the JWT-SVID lifetime: the agent's [jwt] ttl applies.
    #[arg(long, conflicts_with = "jwt_ttl")]
    clear_jwt_ttl: bool,
    /// Remove the hint.
    #[arg(long, conflicts_with = "hint")]
    clear_hint: bool,
    /// Remove all extra DNS names.
    #[arg(long, conflicts_with = "dns_names")]
    clear_dns_names: bool,
    /// Remove every delegation target.
    #[arg(long, conflicts_with = "delegates_to")]
    clear_delegates: bool,
    /// Remove every label.
    #[arg(long, conflicts_with = "labels")]
    clear_labels: bool,
}

/// Optional flags of both create and update.
#[derive(Args, Debug, Default)]
struct SharedFlags {
    #[command(flatten)]
    nodes: NodeFlags,
    #[command(flatten)]
    expiry: ExpiryFlags,
    /// Flag the identity as unused after this long without use, e.g. 30d.
    #[arg(long, value_name = "DURATION")]
    inactivity_timeout: Option<String>,
    /// Lifetime of each JWT-SVID, e.g. 5m (at most the server's jwt.max_ttl); default: the
    /// agent's [jwt] ttl.
    #[arg(long, value_name = "DURATION")]
    jwt_ttl: Option<String>,
    /// A hint passed to workloads to tell their identities apart.
    #[arg(long)]
    hint: Option<String>,
    /// An extra DNS name in the SVIDs; repeat for several (on update: replaces them all).
    #[arg(long = "dns-name", value_name = "NAME")]
    dns_names: Vec<String>,
    /// `standing` (whoever matches holds the identity; the default) or `task` (issued only
    /// inside tasks: `tessera task run`).
    #[arg(long, value_name = "MODE", value_parser = ["standing", "task"])]
    activation: Option<String>,
    /// An entry id this entry's tasks may start child tasks under; repeat for several (on
    /// update: replaces them all).
    #[arg(long = "delegate-to", value_name = "ENTRY_ID")]
    delegates_to: Vec<String>,
    /// A key:value label, e.g. team:payments; repeat for several (on update: replaces them all).
    #[arg(long = "label", value_name = "KEY:VALUE")]
    labels: Vec<String>,
}

/// Which nodes serve the entry.
#[derive(Args, Debug, Default)]
struct NodeFlags {
    /// Serve the entry on this node only (node selector node:id:NODE_ID).
    #[arg(long = "node", value_name = "NODE_ID")]
    nodes: Vec<String>,
    /// Serve the entry on nodes showing this selector, e.g. node:label:gpu; repeat to require
    /// several (on update: replaces them all).
    #[arg(long = "node-selector", value_name = "SEL")]
    node_selectors: Vec<String>,
    /// Serve the entry on every node of the trust domain.
    #[arg(long)]
    all_nodes: bool,
}

/// When the entry stops being issued.
#[derive(Args, Debug, Default)]
struct ExpiryFlags {
    /// Issue nothing after this time, e.g. 2027-01-31T18:00:00Z.
    #[arg(long, value_name = "RFC3339", conflicts_with = "expires_in")]
    expires_at: Option<String>,
    /// Issue nothing after this long from now, e.g. 90d.
    #[arg(long, value_name = "DURATION")]
    expires_in: Option<String>,
}

/// New field values parsed from flags; `None` leaves a field as it is.
#[derive(Debug, Default, PartialEq, Eq)]
struct Changes {
    spiffe_id: Option<String>,
    selectors: Option<Vec<String>>,
    node_selectors: Option<Vec<String>>,
    x509_ttl_seconds: Option<i64>,
    owner: Option<String>,
    purpose: Option<String>,
    /// `Some(None)` removes the expiry.
    expires_at: Option<Option<i64>>,
    /// `Some(None)` removes the timeout.
    inactivity_timeout_seconds: Option<Option<i64>>,
    /// `Some(None)` removes the JWT-SVID lifetime.
    jwt_ttl_seconds: Option<Option<i64>>,
    /// `Some("")` removes the hint.
    hint: Option<String>,
    dns_names: Option<Vec<String>>,
    activation: Option<String>,
    delegates_to: Option<Vec<String>>,
    labels: Option<Vec<String>>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Writes the new values into `entry`; lists are replaced whole.
    fn apply(self, entry: &mut Entry) {
        let Self {
            spiffe_id,
            selectors,
            node_selectors,
            x509_ttl_seconds,
            owner,
            purpose,
            expires_at,
            inactivity_timeout_seconds,
            jwt_ttl_seconds,
            hint,
            dns_names,
            activation,
            delegates_to,
            labels,
        } = self;
        set(&mut entry.spiffe_id, spiffe_id);
        set(&mut entry.selectors, selectors);
        set(&mut entry.node_selectors, node_selectors);
        set(&mut entry.x509_ttl_seconds, x509_ttl_seconds);
        set(&mut entry.owner, owner);
        set(&mut entry.purpose, purpose);
        set(&mut entry.expires_at, expires_at);
        set(
            &mut entry.inactivity_timeout_seconds,
            inactivity_timeout_seconds,
        );
        set(&mut entry.jwt_ttl_seconds, jwt_ttl_seconds);
        set(&mut entry.hint, hint);
        set(&mut entry.dns_names, dns_names);
        set(&mut entry.activation, activation);
        set(&mut entry.delegates_to, delegates_to);
        set(&mut entry.labels, labels);
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

impl SharedFlags {
    /// The changes these flags ask for.
    fn changes(&self, now: SystemTime) -> Result<Changes, Failure> {
        Ok(Changes {
            node_selectors: self.nodes.node_selectors()?,
            expires_at: self.expiry.expires_at(now)?.map(Some),
            inactivity_timeout_seconds: self
                .inactivity_timeout
                .as_deref()
                .map(|v| seconds("--inactivity-timeout", v))
                .transpose()?
                .map(Some),
            jwt_ttl_seconds: self
                .jwt_ttl
                .as_deref()
                .map(|v| seconds("--jwt-ttl", v))
                .transpose()?
                .map(Some),
            hint: self.hint.as_deref().map(hint).transpose()?,
            dns_names: dns_names(&self.dns_names)?,
            activation: self.activation.clone(),
            delegates_to: listed("--delegate-to", &self.delegates_to, |ids| {
                crate::entry::check_delegates(ids)
            })?,
            labels: listed("--label", &self.labels, |labels| {
                crate::entry::check_labels(labels)
            })?,
            ..Changes::default()
        })
    }
}

impl NodeFlags {
    /// The node selectors asked for: `None` when no node flag was given, empty for all nodes.
    fn node_selectors(&self) -> Result<Option<Vec<String>>, Failure> {
        let mut selectors = Vec::new();
        for node in &self.nodes {
            selectors.push(node_id_selector(node)?);
        }
        for selector in &self.node_selectors {
            selectors.push(node_selector(selector)?);
        }
        let mut seen = std::collections::HashSet::new();
        selectors.retain(|s| seen.insert(s.clone()));
        check_one_node_id(&selectors)?;
        match (self.all_nodes, selectors.is_empty()) {
            (true, true) => Ok(Some(Vec::new())),
            (true, false) => Err(Failure::usage(format!(
                "--all-nodes cannot be combined with --node or --node-selector; {NODE_CHOICES}"
            ))),
            (false, false) => Ok(Some(selectors)),
            (false, true) => Ok(None),
        }
    }
}

/// The three ways to place an entry, for messages.
const NODE_CHOICES: &str = "say which nodes serve the entry with one of: --node NODE_ID (one \
    node, as `tessera node list` shows it), --node-selector SEL (nodes showing the selector, \
    e.g. node:label:gpu; repeatable, all must match), or --all-nodes (every node of the trust \
    domain: the entry is stored with empty node_selectors)";

fn node_id_selector(node: &str) -> Result<String, Failure> {
    if node.starts_with("node:") {
        return Err(bad_flag(
            "--node",
            node,
            "takes a bare node id; write the full selector with --node-selector instead",
        ));
    }
    if node.is_empty() || node.contains(char::is_whitespace) {
        return Err(bad_flag(
            "--node",
            node,
            "must be a node id without spaces, as `tessera node list` shows it",
        ));
    }
    Ok(format!("node:id:{node}"))
}

/// A node selector, checked by the rule the server applies.
fn node_selector(selector: &str) -> Result<String, Failure> {
    check_node_selector(selector).map_err(|reason| {
        bad_flag(
            "--node-selector",
            selector,
            &format!("{reason} (e.g. node:label:gpu or node:id:NODE_ID)"),
        )
    })?;
    Ok(selector.to_owned())
}

/// A node has exactly one id and must show every node selector of an entry, so two different
/// ids would make an entry no node can ever serve.
fn check_one_node_id(selectors: &[String]) -> Result<(), Failure> {
    let ids: Vec<&String> = selectors
        .iter()
        .filter(|s| s.starts_with("node:id:"))
        .collect();
    if let [first, second, ..] = ids.as_slice() {
        return Err(Failure::usage(format!(
            "{first} and {second} cannot both match: a node has one id and must show every node \
             selector; create one entry per node, or give the nodes a common label and use \
             --node-selector node:label:LABEL"
        )));
    }
    Ok(())
}

impl ExpiryFlags {
    /// The expiry asked for, in Unix seconds; `None` when neither flag was given.
    fn expires_at(&self, now: SystemTime) -> Result<Option<i64>, Failure> {
        if let Some(at) = &self.expires_at {
            return rfc3339_seconds("--expires-at", at).map(Some);
        }
        let Some(text) = &self.expires_in else {
            return Ok(None);
        };
        let within = Duration::from_secs(positive_seconds("--expires-in", text)?);
        now.checked_add(within)
            .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            .and_then(|since| i64::try_from(since.as_secs()).ok())
            .map(Some)
            .ok_or_else(|| bad_flag("--expires-in", text, "is too far ahead"))
    }
}

impl CreateArgs {
    /// The entry to create, from the flags.
    fn entry(&self, now: SystemTime) -> Result<Entry, Failure> {
        let mut changes = self.shared.changes(now)?;
        if changes.node_selectors.is_none() {
            return Err(Failure::usage(format!(
                "no nodes named for the entry; {NODE_CHOICES}"
            )));
        }
        changes.spiffe_id = Some(spiffe_id(&self.spiffe_id)?);
        changes.selectors = Some(selectors(&self.selectors)?);
        changes.x509_ttl_seconds = Some(seconds("--x509-ttl", &self.x509_ttl)?);
        changes.owner = Some(required_text("--owner", &self.owner)?);
        changes.purpose = Some(required_text("--purpose", &self.purpose)?);
        let id = match &self.id {
            Some(id) if id.trim().is_empty() => {
                return Err(bad_flag(
                    "--id",
                    id,
                    "is empty; leave --id out to let the server derive one",
                ));
            }
            id => id.clone().unwrap_or_default(),
        };
        let mut entry = Entry {
            id,
            ..Entry::default()
        };
        changes.apply(&mut entry);
        Ok(entry)
    }
}

impl UpdateArgs {
    /// The changes the flags ask for; at least one.
    fn changes(&self, now: SystemTime) -> Result<Changes, Failure> {
        let mut changes = self.shared.changes(now)?;
        changes.spiffe_id = self.spiffe_id.as_deref().map(spiffe_id).transpose()?;
        if !self.selectors.is_empty() {
            changes.selectors = Some(selectors(&self.selectors)?);
        }
        changes.x509_ttl_seconds = self
            .x509_ttl
            .as_deref()
            .map(|v| seconds("--x509-ttl", v))
            .transpose()?;
        changes.owner = self
            .owner
            .as_deref()
            .map(|v| required_text("--owner", v))
            .transpose()?;
        changes.purpose = self
            .purpose
            .as_deref()
            .map(|v| required_text("--purpose", v))
            .transpose()?;
        self.clears(&mut changes);
        if changes.is_empty() {
            return Err(Failure::usage(
                "nothing to change: give at least one field, e.g. --owner TEAM or \
                 --expires-in 30d (see `tessera entry update --help`)",
            ));
        }
        Ok(changes)
    }

    fn clears(&self, changes: &mut Changes) {
        if self.clear_expires_at {
            changes.expires_at = Some(None);
        }
        if self.clear_inactivity_timeout {
            changes.inactivity_timeout_seconds = Some(None);
        }
        if self.clear_jwt_ttl {
            changes.jwt_ttl_seconds = Some(None);
        }
        if self.clear_hint {
            changes.hint = Some(String::new());
        }
        if self.clear_dns_names {
            changes.dns_names = Some(Vec::new());
        }
        if self.clear_delegates {
            changes.delegates_to = Some(Vec::new());
        }
        if self.clear_labels {
            changes.labels = Some(Vec::new());
        }
    }
}

fn spiffe_id(value: &str) -> Result<String, Failure> {
    SpiffeId::parse_workload(value)
        .map(|id| id.to_string())
        .map_err(|e| {
            bad_flag(
                "--spiffe-id",
                value,
                &format!("{e}; write e.g. spiffe://example.org/agent/coder"),
            )
        })
}

/// Workload selectors in canonical form, in the order given.
fn selectors(values: &[String]) -> Result<Vec<String>, Failure> {
    values
        .iter()
        .map(|value| {
            value
                .parse::<Selector>()
                .map(|s| s.to_string())
                .map_err(|e| bad_flag("--selector", value, &e.to_string()))
        })
        .collect()
}

fn rfc3339_seconds(flag: &str, value: &str) -> Result<i64, Failure> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map(|at| at.unix_timestamp())
        .map_err(|e| {
            bad_flag(
                flag,
                value,
                &format!("not an RFC 3339 time ({e}); write e.g. 2027-01-31T18:00:00Z"),
            )
        })
}

fn required_text(flag: &str, value: &str) -> Result<String, Failure> {
    if value.trim().is_empty() {
        return Err(bad_flag(flag, value, "must not be empty"));
    }
    Ok(value.to_owned())
}

fn hint(value: &str) -> Result<String, Failure> {
    if value.is_empty() {
        return Err(bad_flag(
            "--hint",
            value,
            "is empty; leave --hint out for no hint (update: use --clear-hint)",
        ));
    }
    Ok(value.to_owned())
}

/// A repeated flag's values checked as a list: `None` when the flag was not given.
fn listed(
    flag: &str,
    values: &[String],
    check: impl Fn(&[String]) -> Result<Vec<String>, crate::entry::FieldError>,
) -> Result<Option<Vec<String>>, Failure> {
    if values.is_empty() {
        return Ok(None);
    }
    check(values)
        .map(Some)
        .map_err(|e| bad_flag(flag, &e.value, &e.reason))
}

fn dns_names(values: &[String]) -> Result<Option<Vec<String>>, Failure> {
    if values.is_empty() {
        return Ok(None);
    }
    if let Some(empty) = values.iter().find(|v| v.trim().is_empty()) {
        return Err(bad_flag(
            "--dns-name",
            empty,
            "must be a DNS name, e.g. coder.internal",
        ));
    }
    Ok(Some(values.to_vec()))
}

/// Runs one `tessera entry` verb.
pub(super) async fn run(args: EntryArgs, output: Output) -> Result<(), Failure> {
    match args.command {
        EntryCommand::Create(create) => {
            let entry = create.entry(SystemTime::now())?;
            let admin = Admin::connect(&args.admin).await?;
            print_entry(output, &create_entry(admin, entry).await?)
        }
        EntryCommand::List(list) => {
            let mut admin = Admin::connect(&args.admin).await?;
            let request = ListEntriesRequest {
                spiffe_id: list.spiffe_id.unwrap_or_default(),
                owner: list.owner.unwrap_or_default(),
            };
            let entries = admin
                .client
                .list_entries(request)
                .await
                .map_err(|s| admin.failure(s))?
                .into_inner()
                .entries;
            print_entries(output, &entries)
        }
        EntryCommand::Show(IdArg { id }) => {
            require_id("entry", &id)?;
            let mut admin = Admin::connect(&args.admin).await?;
            print_entry(output, &get_entry(&mut admin, &id).await?)
        }
        EntryCommand::Update(update) => {
            require_id("entry", &update.id)?;
            let changes = update.changes(SystemTime::now())?;
            let admin = Admin::connect(&args.admin).await?;
            print_entry(output, &update_entry(admin, &update.id, changes).await?)
        }
        EntryCommand::Activate(IdArg { id }) => {
            require_id("entry", &id)?;
            let mut admin = Admin::connect(&args.admin).await?;
            let entry = admin
                .client
                .activate_entry(EntryRequest { id: id.clone() })
                .await
                .map_err(|s| admin.lookup_failure(s, "entry", &id))?
                .into_inner();
            match output {
                Output::Json => print_json(&EntryView::from(&entry)),
                Output::Text => print_text(&format!(
                    "activated entry {} ({}); its inactivity is counted from now\n",
                    entry.id, entry.spiffe_id
                )),
            }
        }
        EntryCommand::Revoke(RevokeArgs { id, reason }) => {
            require_id("entry", &id)?;
            super::revoke::revoke_entry(&args.admin, &id, reason, output).await
        }
        EntryCommand::Delete(IdArg { id }) => {
            require_id("entry", &id)?;
            let mut admin = Admin::connect(&args.admin).await?;
            let deleted = admin
                .client
                .delete_entry(EntryRequest { id: id.clone() })
                .await
                .map_err(|s| admin.lookup_failure(s, "entry", &id))?
                .into_inner();
            match output {
                Output::Json => print_json(&EntryView::from(&deleted)),
                Output::Text => print_text(&format!(
                    "deleted entry {} ({})\n",
                    deleted.id, deleted.spiffe_id
                )),
            }
        }
    }
}

async fn create_entry(mut admin: Admin, entry: Entry) -> Result<Entry, Failure> {
    let spiffe_id = entry.spiffe_id.clone();
    let result = admin
        .client
        .create_entry(CreateEntryRequest { entry: Some(entry) })
        .await;
    match result {
        Ok(response) => Ok(response.into_inner()),
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            Err(Failure::failed(format!(
                "{}; see `tessera entry list --spiffe-id {spiffe_id}`, and change an existing \
                 entry with `tessera entry update`",
                status.message()
            )))
        }
        Err(status) => Err(admin.failure(status)),
    }
}

async fn get_entry(admin: &mut Admin, id: &str) -> Result<Entry, Failure> {
    admin
        .client
        .get_entry(EntryRequest { id: id.to_owned() })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| admin.lookup_failure(s, "entry", id))
}

/// Reads the entry, applies `changes` and writes it back at the revision read.
async fn update_entry(mut admin: Admin, id: &str, changes: Changes) -> Result<Entry, Failure> {
    let mut entry = get_entry(&mut admin, id).await?;
    changes.apply(&mut entry);
    let result = admin
        .client
        .update_entry(UpdateEntryRequest { entry: Some(entry) })
        .await;
    match result {
        Ok(response) => Ok(response.into_inner()),
        Err(status) if status.code() == tonic::Code::Aborted => Err(Failure::failed(format!(
            "entry {id:?} was changed by someone else while this update ran ({}); nothing was \
             written: run the command again",
            status.message()
        ))),
        Err(status) => Err(admin.lookup_failure(status, "entry", id)),
    }
}

/// An entry as printed in JSON.
#[derive(Debug, Serialize)]
struct EntryView {
    id: String,
    spiffe_id: String,
    selectors: Vec<String>,
    /// Empty: every node.
    node_selectors: Vec<String>,
    x509_ttl_seconds: i64,
    owner: String,
    purpose: String,
    #[serde(flatten)]
    expires_at: JsonTime,
    inactivity_timeout_seconds: Option<i64>,
    jwt_ttl_seconds: Option<i64>,
    hint: Option<String>,
    dns_names: Vec<String>,
    activation: String,
    delegates_to: Vec<String>,
    labels: Vec<String>,
    revision: i64,
    #[serde(flatten)]
    created_at: JsonTime,
    #[serde(flatten)]
    updated_at: JsonTime,
}

impl From<&Entry> for EntryView {
    fn from(entry: &Entry) -> Self {
        Self {
            id: entry.id.clone(),
            spiffe_id: entry.spiffe_id.clone(),
            selectors: entry.selectors.clone(),
            node_selectors: entry.node_selectors.clone(),
            x509_ttl_seconds: entry.x509_ttl_seconds,
            owner: entry.owner.clone(),
            purpose: entry.purpose.clone(),
            expires_at: JsonTime::from_seconds("expires_at", entry.expires_at.unwrap_or(0)),
            inactivity_timeout_seconds: entry.inactivity_timeout_seconds,
            jwt_ttl_seconds: entry.jwt_ttl_seconds,
            hint: Some(entry.hint.clone()).filter(|h| !h.is_empty()),
            dns_names: entry.dns_names.clone(),
            activation: activation_name(entry).to_owned(),
            delegates_to: entry.delegates_to.clone(),
            labels: entry.labels.clone(),
            revision: entry.revision,
            created_at: JsonTime::from_seconds("created_at", entry.created_at),
            updated_at: JsonTime::from_seconds("updated_at", entry.updated_at),
        }
    }
}

/// An entry's activation as shown: the server stores `standing` for entries made before tasks.
fn activation_name(entry: &Entry) -> &str {
    if entry.activation.is_empty() {
        "standing"
    } else {
        &entry.activation
    }
}

fn print_entry(output: Output, entry: &Entry) -> Result<(), Failure> {
    match output {
        Output::Json => print_json(&EntryView::from(entry)),
        Output::Text => print_text(&entry_block(entry)),
    }
}

fn print_entries(output: Output, entries: &[Entry]) -> Result<(), Failure> {
    match output {
        Output::Json => print_json(&entries.iter().map(EntryView::from).collect::<Vec<_>>()),
        Output::Text if entries.is_empty() => {
            eprintln!("no entries");
            Ok(())
        }
        Output::Text => print_text(&entry_table(entries)),
    }
}

/// Every field of an entry, for `show`, `create` and `update`.
fn entry_block(entry: &Entry) -> String {
    let one = |value: String| vec![value];
    let or_none = |values: &[String], none: &str| {
        if values.is_empty() {
            vec![none.to_owned()]
        } else {
            values.to_vec()
        }
    };
    let hint: Vec<String> = Some(entry.hint.clone())
        .filter(|h| !h.is_empty())
        .into_iter()
        .collect();
    fields(&[
        ("id", one(entry.id.clone())),
        ("spiffe id", one(entry.spiffe_id.clone())),
        ("selectors", or_none(&entry.selectors, "(none)")),
        (
            "node selectors",
            or_none(&entry.node_selectors, "(all nodes)"),
        ),
        ("x509 ttl", one(duration(entry.x509_ttl_seconds))),
        (
            "jwt ttl",
            one(entry
                .jwt_ttl_seconds
                .map_or("(the agent's [jwt] ttl)".into(), duration)),
        ),
        ("owner", one(entry.owner.clone())),
        ("purpose", one(entry.purpose.clone())),
        (
            "expires at",
            one(entry
                .expires_at
                .map_or("(never)".into(), |at| time_or(at, "(never)"))),
        ),
        (
            "inactivity timeout",
            one(entry
                .inactivity_timeout_seconds
                .map_or("(none)".into(), duration)),
        ),
        ("hint", or_none(&hint, "(none)")),
        ("dns names", or_none(&entry.dns_names, "(none)")),
        ("activation", one(activation_name(entry).to_owned())),
        ("delegates to", or_none(&entry.delegates_to, "(none)")),
        ("labels", or_none(&entry.labels, "(none)")),
        ("revision", one(entry.revision.to_string())),
        ("created at", one(time_or(entry.created_at, "(unknown)"))),
        ("updated at", one(time_or(entry.updated_at, "(unknown)"))),
    ])
}

fn entry_table(entries: &[Entry]) -> String {
    let mut table = Table::new(&[
        "ID",
        "SPIFFE ID",
        "SELECTORS",
        "NODES",
        "X509 TTL",
        "OWNER",
        "PURPOSE",
        "EXPIRES",
    ]);
    for entry in entries {
        table.row(vec![
            entry.id.clone(),
            entry.spiffe_id.clone(),
            list_or(&entry.selectors, "-"),
            list_or(&entry.node_selectors, "all"),
            duration(entry.x509_ttl_seconds),
            entry.owner.clone(),
            entry.purpose.clone(),
            entry
                .expires_at
                .map_or("never".into(), |at| time_or(at, "never")),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    const CODER: &str = "spiffe://example.org/agent/coder";

    fn parse(args: &[&str]) -> Result<EntryArgs, clap::Error> {
        let argv = ["tessera", "entry"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Entry(args) => Ok(*args),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000_000)
    }

    fn create(extra: &[&str]) -> Result<Entry, Failure> {
        let mut args = vec![
            "create",
            "--spiffe-id",
            CODER,
            "--selector",
            "unix:uid:01001",
            "--owner",
            "ops",
            "--purpose",
            "code review",
        ];
        args.extend(extra);
        match parse(&args).expect("flags parse").command {
            EntryCommand::Create(create) => create.entry(now()),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn update(args: &[&str]) -> Result<Changes, Failure> {
        let mut argv = vec!["update", "e-1"];
        argv.extend(args);
        match parse(&argv).expect("flags parse").command {
            EntryCommand::Update(update) => update.changes(now()),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn usage_error(result: Result<impl std::fmt::Debug, Failure>) -> String {
        let failure = result.expect_err("a usage error");
        assert_eq!(failure.code, 2, "{}", failure.message);
        failure.message
    }

    fn stored() -> Entry {
        Entry {
            id: "e-1".into(),
            spiffe_id: CODER.into(),
            selectors: vec!["unix:uid:1001".into()],
            node_selectors: vec!["node:id:n1".into()],
            x509_ttl_seconds: 600,
            owner: "ops".into(),
            purpose: "code review".into(),
            expires_at: Some(1_801_418_400),
            inactivity_timeout_seconds: Some(86_400),
            jwt_ttl_seconds: None,
            hint: "coder".into(),
            dns_names: vec!["coder.internal".into()],
            revision: 7,
            created_at: 1_800_000_000,
            updated_at: 1_800_000_060,
            activation: "standing".into(),
            delegates_to: vec![],
            labels: vec![],
        }
    }

    #[test]
    fn node_selectors_are_checked_by_the_servers_rule() {
        // A common name may hold spaces: such a node selector is one a real node has.
        let entry = create(&["--node-selector", "x509pop:subject:cn:web server 1"]).unwrap();
        assert_eq!(entry.node_selectors, ["x509pop:subject:cn:web server 1"]);
        for (selector, reason) in [
            ("x509pop:subject:cn:", "needs a value"),
            ("rack:row:7", "unknown node selector type"),
            ("node:attestation:tpm", "join_token or x509pop"),
        ] {
            let message = usage_error(create(&["--node-selector", selector]));
            assert!(
                message.contains(&format!("--node-selector {selector:?}"))
                    && message.contains(reason),
                "{selector}: {message}"
            );
        }
    }

    #[test]
    fn create_flags_become_an_entry() {
        let entry = create(&[
            "--selector",
            "systemd:unit:coder.service",
            "--node",
            "n1",
            "--node-selector",
            "node:label:gpu",
            "--x509-ttl",
            "1h",
            "--expires-at",
            "2027-01-31T18:00:00Z",
            "--inactivity-timeout",
            "30d",
            "--hint",
            "coder",
            "--dns-name",
            "coder.internal",
            "--id",
            "e-1",
        ])
        .unwrap();
        assert_eq!(
            entry,
            Entry {
                id: "e-1".into(),
                spiffe_id: CODER.into(),
                selectors: vec!["unix:uid:1001".into(), "systemd:unit:coder.service".into()],
                node_selectors: vec!["node:id:n1".into(), "node:label:gpu".into()],
                x509_ttl_seconds: 3600,
                owner: "ops".into(),
                purpose: "code review".into(),
                expires_at: Some(1_801_418_400),
                inactivity_timeout_seconds: Some(30 * 86_400),
                hint: "coder".into(),
                dns_names: vec!["coder.internal".into()],
                revision: 0,
                created_at: 0,
                updated_at: 0,
                ..Entry::default()
            }
        );
    }

    #[test]
    fn create_defaults() {
        let entry = create(&["--all-nodes"]).unwrap();
        assert_eq!(entry.id, "");
        assert_eq!(entry.x509_ttl_seconds, 600);
        assert!(entry.node_selectors.is_empty());
        assert_eq!(entry.expires_at, None);
        assert_eq!(entry.inactivity_timeout_seconds, None);
        assert_eq!(entry.hint, "");
    }

    #[test]
    fn create_expires_in_counts_from_now() {
        let entry = create(&["--all-nodes", "--expires-in", "1h"]).unwrap();
        assert_eq!(entry.expires_at, Some(1_000_003_600));
    }

    #[test]
    fn create_needs_exactly_one_node_choice() {
        let message = usage_error(create(&[]));
        for choice in [
            "--node NODE_ID",
            "--node-selector SEL",
            "--all-nodes",
            "empty node_selectors",
        ] {
            assert!(message.contains(choice), "{message}");
        }
        let message = usage_error(create(&["--all-nodes", "--node", "n1"]));
        assert!(message.contains("cannot be combined"), "{message}");
        let message = usage_error(create(&["--all-nodes", "--node-selector", "node:label:a"]));
        assert!(message.contains("--all-nodes"), "{message}");
    }

    #[test]
    fn two_node_ids_can_never_match() {
        let message = usage_error(create(&["--node", "n1", "--node", "n2"]));
        assert!(
            message.contains("node:id:n1") && message.contains("node:id:n2"),
            "{message}"
        );
        let message = usage_error(create(&["--node", "n1", "--node-selector", "node:id:n2"]));
        assert!(message.contains("one entry per node"), "{message}");
        // The same node twice is harmless.
        let entry = create(&["--node", "n1", "--node", "n1"]).unwrap();
        assert_eq!(entry.node_selectors, ["node:id:n1"]);
        let entry = create(&[
            "--node",
            "n1",
            "--node-selector",
            "node:label:gpu",
            "--node-selector",
            "node:id:n1",
        ])
        .unwrap();
        assert_eq!(entry.node_selectors, ["node:id:n1", "node:label:gpu"]);
    }

    #[test]
    fn bad_values_name_flag_and_value() {
        let cases: &[(&[&str], &str, &str)] = &[
            (
                &["--all-nodes", "--x509-ttl", "5 parsecs"],
                "--x509-ttl \"5 parsecs\"",
                "e.g.",
            ),
            (
                &["--all-nodes", "--x509-ttl", "0s"],
                "--x509-ttl \"0s\"",
                "longer than zero",
            ),
            (
                &["--all-nodes", "--x509-ttl", "1500ms"],
                "--x509-ttl \"1500ms\"",
                "whole seconds",
            ),
            (
                &["--all-nodes", "--expires-in", "soon"],
                "--expires-in \"soon\"",
                "e.g.",
            ),
            (
                &["--all-nodes", "--expires-at", "tomorrow"],
                "--expires-at \"tomorrow\"",
                "2027-01-31T18:00:00Z",
            ),
            (
                &["--all-nodes", "--inactivity-timeout", "x"],
                "--inactivity-timeout \"x\"",
                "e.g.",
            ),
            (
                &["--all-nodes", "--hint", ""],
                "--hint \"\"",
                "leave --hint out",
            ),
            (
                &["--all-nodes", "--dns-name", " "],
                "--dns-name \" \"",
                "e.g.",
            ),
            (&["--all-nodes", "--id", ""], "--id \"\"", "derive"),
            (
                &["--node", "node:id:n1"],
                "--node \"node:id:n1\"",
                "--node-selector",
            ),
            (&["--node", "a b"], "--node \"a b\"", "node id"),
            (
                &["--node-selector", "gpu"],
                "--node-selector \"gpu\"",
                "node:label:gpu",
            ),
            (
                &["--all-nodes", "--selector", "unix:uid:x"],
                "--selector \"unix:uid:x\"",
                "decimal",
            ),
        ];
        for (flags, named, hint) in cases {
            let message = usage_error(create(flags));
            assert!(message.contains(named), "{flags:?}: {message}");
            assert!(message.contains(hint), "{flags:?}: {message}");
        }
    }

    #[test]
    fn bad_spiffe_id_and_empty_owner_are_usage_errors() {
        let create_with = |spiffe_id: &str, owner: &str| {
            let argv = [
                "create",
                "--spiffe-id",
                spiffe_id,
                "--selector",
                "unix:uid:1",
                "--owner",
                owner,
                "--purpose",
                "p",
                "--all-nodes",
            ];
            match parse(&argv).expect("flags parse").command {
                EntryCommand::Create(create) => create.entry(now()),
                other => panic!("parsed as {other:?}"),
            }
        };
        let message = usage_error(create_with("spiffe://example.org", "ops"));
        assert!(
            message.contains("--spiffe-id \"spiffe://example.org\": has no path"),
            "{message}"
        );
        let message = usage_error(create_with(CODER, " "));
        assert!(
            message.contains("--owner \" \": must not be empty"),
            "{message}"
        );
    }

    #[test]
    fn missing_required_flags_are_refused_by_the_parser() {
        let error = parse(&[
            "create",
            "--spiffe-id",
            CODER,
            "--owner",
            "o",
            "--purpose",
            "p",
        ])
        .expect_err("no selector");
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("--selector"), "{error}");
    }

    #[test]
    fn update_needs_a_change() {
        let message = usage_error(update(&[]));
        assert!(message.contains("nothing to change"), "{message}");
    }

    #[test]
    fn update_replaces_only_the_fields_given() {
        let changes = update(&["--owner", "platform", "--selector", "unix:gid:10"]).unwrap();
        let mut entry = stored();
        changes.apply(&mut entry);
        let expected = Entry {
            owner: "platform".into(),
            selectors: vec!["unix:gid:10".into()],
            ..stored()
        };
        assert_eq!(entry, expected);
        assert_eq!(entry.revision, 7, "the revision read is sent back");
    }

    #[test]
    fn update_clears_and_moves_to_all_nodes() {
        let changes = update(&[
            "--all-nodes",
            "--clear-expires-at",
            "--clear-inactivity-timeout",
            "--clear-hint",
            "--clear-dns-names",
        ])
        .unwrap();
        let mut entry = stored();
        changes.apply(&mut entry);
        assert!(entry.node_selectors.is_empty());
        assert_eq!(entry.expires_at, None);
        assert_eq!(entry.inactivity_timeout_seconds, None);
        assert_eq!(entry.hint, "");
        assert!(entry.dns_names.is_empty());
        assert_eq!(entry.spiffe_id, CODER);
    }

    #[test]
    fn update_sets_times_and_lists() {
        let changes = update(&[
            "--expires-in",
            "2h",
            "--x509-ttl",
            "5m",
            "--node-selector",
            "node:label:gpu",
            "--dns-name",
            "a.internal",
            "--dns-name",
            "b.internal",
        ])
        .unwrap();
        let mut entry = stored();
        changes.apply(&mut entry);
        assert_eq!(entry.expires_at, Some(1_000_007_200));
        assert_eq!(entry.x509_ttl_seconds, 300);
        assert_eq!(entry.node_selectors, ["node:label:gpu"]);
        assert_eq!(entry.dns_names, ["a.internal", "b.internal"]);
    }

    #[test]
    fn update_refuses_setting_and_clearing_together() {
        for flags in [
            &["--hint", "h", "--clear-hint"][..],
            &["--expires-in", "1h", "--clear-expires-at"],
            &["--expires-at", "2027-01-31T18:00:00Z", "--expires-in", "1h"],
            &["--dns-name", "a.internal", "--clear-dns-names"],
        ] {
            let mut argv = vec!["update", "e-1"];
            argv.extend(flags);
            let error = parse(&argv).expect_err("conflicting flags");
            assert_eq!(error.exit_code(), 2, "{flags:?}");
        }
    }

    #[test]
    fn admin_options_go_before_or_after_the_verb() {
        for argv in [
            &["--admin-socket", "/tmp/a.sock", "--output", "json", "list"][..],
            &["list", "--admin-socket", "/tmp/a.sock", "--output", "json"],
        ] {
            let args = parse(argv).unwrap();
            assert_eq!(args.admin.admin_socket, std::path::Path::new("/tmp/a.sock"));
        }
    }

    #[test]
    fn json_shape() {
        let json = serde_json::to_value(EntryView::from(&stored())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "e-1",
                "spiffe_id": CODER,
                "selectors": ["unix:uid:1001"],
                "node_selectors": ["node:id:n1"],
                "x509_ttl_seconds": 600,
                "owner": "ops",
                "purpose": "code review",
                "expires_at": "2027-01-31T18:00:00.000Z",
                "expires_at_ms": 1_801_418_400_000_i64,
                "inactivity_timeout_seconds": 86_400,
                "jwt_ttl_seconds": null,
                "hint": "coder",
                "dns_names": ["coder.internal"],
                "activation": "standing",
                "delegates_to": [],
                "labels": [],
                "revision": 7,
                "created_at": "2027-01-15T08:00:00.000Z",
                "created_at_ms": 1_800_000_000_000_i64,
                "updated_at": "2027-01-15T08:01:00.000Z",
                "updated_at_ms": 1_800_000_060_000_i64,
            })
        );
        let bare = Entry {
            expires_at: None,
            inactivity_timeout_seconds: None,
            hint: String::new(),
            ..stored()
        };
        let json = serde_json::to_value(EntryView::from(&bare)).unwrap();
        assert_eq!(json["expires_at"], serde_json::Value::Null);
        assert_eq!(json["expires_at_ms"], serde_json::Value::Null);
        assert_eq!(json["inactivity_timeout_seconds"], serde_json::Value::Null);
        assert_eq!(json["hint"], serde_json::Value::Null);
    }

    #[test]
    fn text_block_and_table() {
        let block = entry_block(&Entry {
            node_selectors: vec![],
            hint: String::new(),
            ..stored()
        });
        assert!(block.starts_with("id:                  e-1\n"), "{block}");
        assert!(
            block.contains("node selectors:      (all nodes)\n"),
            "{block}"
        );
        assert!(block.contains("x509 ttl:            10m\n"), "{block}");
        assert!(block.contains("inactivity timeout:  1day\n"), "{block}");
        assert!(block.contains("hint:                (none)\n"), "{block}");
        assert!(
            block.contains("expires at:          2027-01-31T18:00:00Z\n"),
            "{block}"
        );
        assert!(block.contains("activation:          standing\n"), "{block}");
        assert!(
            block.contains("jwt ttl:             (the agent's [jwt] ttl)\n"),
            "{block}"
        );
        assert_eq!(block.lines().count(), 18, "{block}");

        let table = entry_table(&[
            stored(),
            Entry {
                id: "e-22".into(),
                node_selectors: vec![],
                expires_at: None,
                ..stored()
            },
        ]);
        assert_eq!(
            table,
            "ID    SPIFFE ID                         SELECTORS      NODES       X509 TTL  OWNER  PURPOSE      EXPIRES\n\
             e-1   spiffe://example.org/agent/coder  unix:uid:1001  node:id:n1  10m       ops    code review  2027-01-31T18:00:00Z\n\
             e-22  spiffe://example.org/agent/coder  unix:uid:1001  all         10m       ops    code review  never\n"
        );
    }
}
