//! What both backends share: how lists are stored, how records are put in canonical form before
//! they are written, how rows are decoded into records, the wording of clashes, and the
//! schema-version check.

use super::{
    BundleRoot, CrlRecord, EntryActivity, EntryRecord, EntryStanding, EventRecord, EventTask,
    JwtKeyRecord, JwtRecord, NodeActivity, NodeCaRecord, NodeRecord, NodeStatus, PolicyRecord,
    RevocationRecord, StoreError, StoredEvent, SvidRecord, TaskRecord, canonical,
};

/// Stores a list of strings as a JSON array: unambiguous for any string content, and readable
/// with the database's own tools.
pub(crate) fn encode_list(items: &[String]) -> String {
    serde_json::Value::from(items.to_vec()).to_string()
}

/// Reads a list stored by [`encode_list`]; `what` names the column in the error.
pub(crate) fn decode_list(text: &str, what: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::corrupt_from(format!("{what} is not a JSON list of strings"), e))
}

/// Reads a stored node status.
pub(crate) fn decode_status(text: &str) -> Result<NodeStatus, StoreError> {
    NodeStatus::parse(text)
        .ok_or_else(|| StoreError::corrupt(format!("unknown node status {text:?}")))
}

/// Lowercase hex SHA-256.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes))
}

/// The unique key of an entry's selectors. The uniqueness constraint is on this digest rather
/// than on the selectors themselves because a long selector list would not fit in an index
/// entry.
pub(crate) fn selectors_key(encoded_selectors: &str) -> String {
    sha256_hex(encoded_selectors.as_bytes())
}

/// An entry as it is first stored: canonical selectors, revision 1, both timestamps `now`.
pub(crate) fn new_entry(mut entry: EntryRecord, now: i64) -> EntryRecord {
    entry.selectors = canonical(entry.selectors);
    entry.node_selectors = canonical(entry.node_selectors);
    entry.revision = 1;
    entry.created_at = now;
    entry.updated_at = now;
    entry
}

/// An entry as an update stores it (the revision and creation time are the database's).
pub(crate) fn updated_entry(mut entry: EntryRecord, now: i64) -> EntryRecord {
    entry.selectors = canonical(entry.selectors);
    entry.node_selectors = canonical(entry.node_selectors);
    entry.updated_at = now;
    entry
}

/// A node as an attestation stores it: canonical selectors, active.
pub(crate) fn attested_node(mut node: NodeRecord) -> NodeRecord {
    node.selectors = canonical(node.selectors);
    node.status = NodeStatus::Active;
    node
}

/// `node` as a join token with `labels` attests it: one `node:label:` selector per label.
pub(crate) fn joined_node(mut node: NodeRecord, labels: &[String]) -> NodeRecord {
    node.selectors
        .extend(labels.iter().map(|label| format!("node:label:{label}")));
    attested_node(node)
}

/// The clash of a new entry's id with a stored one.
pub(crate) fn entry_id_taken(id: &str) -> StoreError {
    StoreError::AlreadyExists(format!("an entry with id {id:?} already exists"))
}

/// The clash of an entry's SPIFFE ID and selectors with another entry's.
pub(crate) fn entry_identity_taken(spiffe_id: &str) -> StoreError {
    StoreError::AlreadyExists(format!(
        "an entry already grants {spiffe_id} to the same selectors"
    ))
}

/// The clash of a new join token with a stored one.
pub(crate) fn join_token_taken() -> StoreError {
    StoreError::AlreadyExists("a join token with this digest already exists".to_owned())
}

/// Refuses to run against a database migrated by a newer server: its schema may mean things
/// this code does not know.
pub(crate) fn check_schema_version(found: i64, known: i64) -> Result<(), StoreError> {
    if found > known {
        return Err(StoreError::corrupt(format!(
            "the database schema is at version {found}, but this server knows versions up to \
             {known}: the server is older than the database; upgrade the server"
        )));
    }
    Ok(())
}

/// A column value both backends read: what rusqlite and tokio-postgres can both convert.
pub(crate) trait Value:
    rusqlite::types::FromSql + for<'a> tokio_postgres::types::FromSql<'a>
{
}

impl<T> Value for T where T: rusqlite::types::FromSql + for<'a> tokio_postgres::types::FromSql<'a> {}

/// A row of either backend, read by column name. A value that cannot be read as `T` is
/// [`StoreError::Corrupt`], naming the column.
pub(crate) trait ReadRow {
    /// The value of `name`.
    fn column<T: Value>(&self, name: &str) -> Result<T, StoreError>;
}

// Rows decoded alike by both backends: the columns are the same, and so are the records.

/// An entry from its row.
pub(crate) fn entry_from_row<R: ReadRow + ?Sized>(row: &R) -> Result<EntryRecord, StoreError> {
    Ok(EntryRecord {
        id: row.column("id")?,
        spiffe_id: row.column("spiffe_id")?,
        selectors: decode_list(&row.column::<String>("selectors")?, "entry selectors")?,
        node_selectors: decode_list(
            &row.column::<String>("node_selectors")?,
            "entry node selectors",
        )?,
        x509_ttl_seconds: row.column("x509_ttl_seconds")?,
        owner: row.column("owner")?,
        purpose: row.column("purpose")?,
        expires_at: row.column("expires_at")?,
        inactivity_timeout_seconds: row.column("inactivity_timeout_seconds")?,
        jwt_ttl_seconds: row.column("jwt_ttl_seconds")?,
        hint: row.column("hint")?,
        dns_names: decode_list(&row.column::<String>("dns_names")?, "entry DNS names")?,
        revision: row.column("revision")?,
        created_at: row.column("created_at")?,
        updated_at: row.column("updated_at")?,
        activation: row.column("activation")?,
        delegates_to: decode_list(&row.column::<String>("delegates_to")?, "entry delegates_to")?,
        labels: decode_list(&row.column::<String>("labels")?, "entry labels")?,
    })
}

/// A node from its row.
pub(crate) fn node_from_row<R: ReadRow + ?Sized>(row: &R) -> Result<NodeRecord, StoreError> {
    Ok(NodeRecord {
        id: row.column("id")?,
        attestation: row.column("attestation")?,
        selectors: decode_list(&row.column::<String>("selectors")?, "node selectors")?,
        status: decode_status(&row.column::<String>("status")?)?,
        attested_at: row.column("attested_at")?,
        last_seen: row.column("last_seen")?,
        svid_serial: row.column("svid_serial")?,
        svid_not_after: row.column("svid_not_after")?,
        ca_serial: row.column("ca_serial")?,
        ca_not_after: row.column("ca_not_after")?,
    })
}

/// A bundle root from its row.
pub(crate) fn root_from_row<R: ReadRow + ?Sized>(row: &R) -> Result<BundleRoot, StoreError> {
    Ok(BundleRoot {
        server_id: row.column("server_id")?,
        der: row.column("der")?,
        not_after: row.column("not_after")?,
    })
}

/// A JWT signing key from its row.
pub(crate) fn jwt_key_from_row<R: ReadRow + ?Sized>(row: &R) -> Result<JwtKeyRecord, StoreError> {
    Ok(JwtKeyRecord {
        server_id: row.column("server_id")?,
        kid: row.column("kid")?,
        jwk: row.column("jwk")?,
        active_from: row.column("active_from")?,
        not_after: row.column("not_after")?,
    })
}

/// A JWT-SVID from its row (the columns of `events::JWT_COLUMNS`).
pub(crate) fn jwt_from_row<R: ReadRow + ?Sized>(row: &R) -> Result<JwtRecord, StoreError> {
    Ok(JwtRecord {
        jti: row.column("jti")?,
        entry_id: row.column("entry_id")?,
        spiffe_id: row.column("spiffe_id")?,
        node_id: row.column("node_id")?,
        task_id: row.column("task_id")?,
        audience: decode_list(&row.column::<String>("audience")?, "a JWT-SVID's audience")?,
        issued_ms: row.column("issued_ms")?,
        expires_at: row.column("expires_at")?,
        revoked_ms: row.column("revoked_ms")?,
        reason: row.column("reason")?,
        last_used_ms: row.column("last_used_ms")?,
        uses: row.column("uses")?,
    })
}

/// An event's audience as stored: `NULL` for none.
pub(crate) fn encode_audience(audience: &[String]) -> Option<String> {
    (!audience.is_empty()).then(|| encode_list(audience))
}

/// The columns of `node_cas`, in the order the insert binds them.
pub(crate) const NODE_CA_COLUMNS: &str = "serial, node_id, server_id, der, not_after";

/// A node CA from its row.
pub(crate) fn node_ca_from_row<R: ReadRow + ?Sized>(row: &R) -> Result<NodeCaRecord, StoreError> {
    Ok(NodeCaRecord {
        serial: row.column("serial")?,
        node_id: row.column("node_id")?,
        server_id: row.column("server_id")?,
        der: row.column("der")?,
        not_after: row.column("not_after")?,
    })
}

/// The columns of `revocations`, in the order the insert binds them.
pub(crate) const REVOCATION_COLUMNS: &str =
    "serial, node_id, root_server_id, not_after, reason, detail, revoked_ms";

/// A revocation from its row.
pub(crate) fn revocation_from_row<R: ReadRow + ?Sized>(
    row: &R,
) -> Result<RevocationRecord, StoreError> {
    Ok(RevocationRecord {
        serial: row.column("serial")?,
        node_id: row.column("node_id")?,
        root_server_id: row.column("root_server_id")?,
        not_after: row.column("not_after")?,
        reason: row.column("reason")?,
        detail: row.column("detail")?,
        revoked_ms: row.column("revoked_ms")?,
    })
}

/// The columns of `crls`, in the order the insert binds them.
pub(crate) const CRL_COLUMNS: &str = "issuer, publisher, number, next_update, until, revoked, der";

/// A CRL from its row.
pub(crate) fn crl_from_row<R: ReadRow + ?Sized>(row: &R) -> Result<CrlRecord, StoreError> {
    Ok(CrlRecord {
        issuer: row.column("issuer")?,
        publisher: row.column("publisher")?,
        number: row.column("number")?,
        next_update: row.column("next_update")?,
        until: row.column("until")?,
        revoked: row.column("revoked")?,
        der: row.column("der")?,
    })
}

/// An entry's standing from its row.
pub(crate) fn entry_standing_from_row<R: ReadRow + ?Sized>(
    row: &R,
) -> Result<EntryStanding, StoreError> {
    Ok(EntryStanding {
        entry_id: row.column("entry_id")?,
        dormant_since_ms: row.column("dormant_since_ms")?,
        activated_ms: row.column("activated_ms")?,
    })
}

/// Makes an entry dormant unless it is: `?1`/`$1` the entry, `?2`/`$2` since when.
pub(crate) fn dormant_sql(p: impl Fn(usize) -> String) -> String {
    format!(
        "INSERT INTO entry_standing (entry_id, dormant_since_ms, activated_ms) VALUES ({}, {}, NULL)
         ON CONFLICT (entry_id) DO UPDATE SET dormant_since_ms = excluded.dormant_since_ms
         WHERE entry_standing.dormant_since_ms IS NULL",
        p(1),
        p(2)
    )
}

/// Wakes an entry: `?1`/`$1` the entry, `?2`/`$2` now; returns the previous dormancy.
pub(crate) fn activate_sql(p: impl Fn(usize) -> String) -> String {
    format!(
        "INSERT INTO entry_standing (entry_id, dormant_since_ms, activated_ms) VALUES ({}, NULL, {})
         ON CONFLICT (entry_id) DO UPDATE SET dormant_since_ms = NULL,
             activated_ms = excluded.activated_ms",
        p(1),
        p(2)
    )
}

/// A stored event from its row (`seq` and the event columns).
pub(crate) fn event_from_row<R: ReadRow + ?Sized>(row: &R) -> Result<StoredEvent, StoreError> {
    Ok(StoredEvent {
        seq: row.column("seq")?,
        event: EventRecord {
            id: row.column("id")?,
            kind: row.column("kind")?,
            time_ms: row.column("time_ms")?,
            node_id: row.column("node_id")?,
            entry_id: row.column("entry_id")?,
            spiffe_id: row.column("spiffe_id")?,
            serial: row.column("serial")?,
            not_after: row.column("not_after")?,
            reason: row.column("reason")?,
            caller: super::events::caller_from_columns((
                row.column("caller_pid")?,
                row.column("caller_uid")?,
                row.column("caller_gid")?,
                row.column("caller_exe_path")?,
                row.column("caller_exe_sha256")?,
                row.column("caller_unit")?,
            ))?,
            first_ms: row.column("first_ms")?,
            last_ms: row.column("last_ms")?,
            count: row.column("count")?,
            detail: row.column("detail")?,
            received_ms: row.column("received_ms")?,
            task: row
                .column::<Option<String>>("task")?
                .map(|text| decode_event_task(&text))
                .transpose()?,
            policy_version: row.column("policy_version")?,
            policies: row
                .column::<Option<String>>("policies")?
                .map(|text| decode_list(&text, "an event's policies"))
                .transpose()?
                .unwrap_or_default(),
            jti: row.column::<Option<String>>("jti")?.unwrap_or_default(),
            audience: row
                .column::<Option<String>>("audience")?
                .map(|text| decode_list(&text, "an event's audience"))
                .transpose()?
                .unwrap_or_default(),
        },
    })
}

/// An event's determining policies as stored: `NULL` for none.
pub(crate) fn encode_policies(policies: &[String]) -> Option<String> {
    (!policies.is_empty()).then(|| encode_list(policies))
}

/// An event's task as stored (JSON).
pub(crate) fn encode_event_task(task: Option<&EventTask>) -> Option<String> {
    // A struct of strings and numbers always serialises.
    task.and_then(|t| serde_json::to_string(t).ok())
}

fn decode_event_task(text: &str) -> Result<EventTask, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::corrupt_from("an event's task is not the JSON stored", e))
}

/// A delegation chain as stored: a JSON list of `[task id, SPIFFE ID]` pairs.
pub(crate) fn encode_chain(chain: &[(String, String)]) -> String {
    serde_json::to_string(chain).unwrap_or_else(|_| "[]".to_owned())
}

/// The stored columns of a policy version.
pub(crate) const POLICY_COLUMNS: &str = "version, text, sha256, set_ms";

/// A policy version from its row.
pub(crate) fn policy_from_row<R: ReadRow + ?Sized>(row: &R) -> Result<PolicyRecord, StoreError> {
    Ok(PolicyRecord {
        version: row.column("version")?,
        text: row.column("text")?,
        sha256: row.column("sha256")?,
        set_ms: row.column("set_ms")?,
    })
}

/// A task from its row.
pub(crate) fn task_from_row<R: ReadRow + ?Sized>(row: &R) -> Result<TaskRecord, StoreError> {
    Ok(TaskRecord {
        task_id: row.column("task_id")?,
        node_id: row.column("node_id")?,
        entry_id: row.column("entry_id")?,
        spiffe_id: row.column("spiffe_id")?,
        parent_id: row.column("parent_id")?,
        chain: serde_json::from_str(&row.column::<String>("chain")?)
            .map_err(|e| StoreError::corrupt_from("a task's chain is not the JSON stored", e))?,
        purpose: row.column("purpose")?,
        owner: row.column("owner")?,
        pid: row.column("pid")?,
        starter_uid: row.column("starter_uid")?,
        started_ms: row.column("started_ms")?,
        deadline: row.column("deadline")?,
        ended_ms: row.column("ended_ms")?,
        end_reason: row.column("end_reason")?,
        end_ordered_ms: row.column("end_ordered_ms")?,
        end_order_reason: row.column("end_order_reason")?,
        end_order_detail: row.column("end_order_detail")?,
    })
}

/// Live tasks whose chain passes through `task_id` (the task itself included), from `live`.
pub(crate) fn task_and_descendants(live: Vec<TaskRecord>, task_id: &str) -> Vec<TaskRecord> {
    live.into_iter()
        .filter(|t| t.chain.iter().any(|(id, _)| id == task_id) || t.task_id == task_id)
        .collect()
}

/// Orders one live task ended unless it already is: `1` the task, `2` when, `3` the reason,
/// `4` the detail.
pub(crate) fn order_task_sql(p: impl Fn(usize) -> String) -> String {
    format!(
        "UPDATE tasks SET end_ordered_ms = {}, end_order_reason = {}, end_order_detail = {}
         WHERE task_id = {} AND end_ordered_ms IS NULL AND ended_ms IS NULL",
        p(2),
        p(3),
        p(4),
        p(1)
    )
}

/// An SVID of the inventory from its row.
pub(crate) fn svid_from_row<R: ReadRow + ?Sized>(row: &R) -> Result<SvidRecord, StoreError> {
    Ok(SvidRecord {
        serial: row.column("serial")?,
        entry_id: row.column("entry_id")?,
        spiffe_id: row.column("spiffe_id")?,
        node_id: row.column("node_id")?,
        issued_ms: row.column("issued_ms")?,
        not_after: row.column("not_after")?,
        revoked_ms: row.column("revoked_ms")?,
        reason: row.column("reason")?,
        last_used_ms: row.column("last_used_ms")?,
        uses: row.column("uses")?,
    })
}

/// An entry's activity from its row.
pub(crate) fn entry_activity_from_row<R: ReadRow + ?Sized>(
    row: &R,
) -> Result<EntryActivity, StoreError> {
    Ok(EntryActivity {
        entry_id: row.column("entry_id")?,
        last_issued_ms: row.column("last_issued_ms")?,
        last_used_ms: row.column("last_used_ms")?,
    })
}

/// A node's activity from its row.
pub(crate) fn node_activity_from_row<R: ReadRow + ?Sized>(
    row: &R,
) -> Result<NodeActivity, StoreError> {
    Ok(NodeActivity {
        node_id: row.column("node_id")?,
        last_event_ms: row.column("last_event_ms")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_round_trip_any_content() {
        let items = vec!["a\nb".to_owned(), "\"quoted\"".to_owned(), String::new()];
        assert_eq!(decode_list(&encode_list(&items), "x").unwrap(), items);
        assert_eq!(encode_list(&[]), "[]");
    }

    #[test]
    fn unreadable_list_is_corrupt() {
        assert!(matches!(
            decode_list("not json", "selectors"),
            Err(e @ StoreError::Corrupt { .. }) if e.to_string().contains("selectors")
        ));
    }

    #[test]
    fn newer_schema_is_refused() {
        assert!(check_schema_version(1, 1).is_ok());
        assert!(check_schema_version(0, 1).is_ok());
        let err = check_schema_version(2, 1).unwrap_err();
        assert!(err.to_string().contains("older than the database"), "{err}");
    }
}
