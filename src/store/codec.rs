//! What both backends share: how lists are stored, how records are put in canonical form before
//! they are written, the wording of clashes, and the schema-version check.

use super::{EntryRecord, NodeRecord, NodeStatus, StoreError, canonical};

/// Stores a list of strings as a JSON array: unambiguous for any string content, and readable
/// with the database's own tools.
pub(crate) fn encode_list(items: &[String]) -> String {
    serde_json::Value::from(items.to_vec()).to_string()
}

/// Reads a list stored by [`encode_list`]; `what` names the column in the error.
pub(crate) fn decode_list(text: &str, what: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("{what} is not a JSON list of strings: {e}")))
}

/// Reads a stored node status.
pub(crate) fn decode_status(text: &str) -> Result<NodeStatus, StoreError> {
    NodeStatus::parse(text)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown node status {text:?}")))
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
        return Err(StoreError::Corrupt(format!(
            "the database schema is at version {found}, but this server knows versions up to \
             {known}: the server is older than the database; upgrade the server"
        )));
    }
    Ok(())
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
            Err(StoreError::Corrupt(m)) if m.contains("selectors")
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
