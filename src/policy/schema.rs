//! The Cedar schema that every policy set is validated against.

/// tessera's Cedar schema, in Cedar's human-readable schema syntax. Policies are validated
/// against it in strict mode, so a policy that names an attribute, an action or a type that is
/// not here, or compares values of different types, is refused when the set is loaded rather
/// than failing at decision time.
///
/// What a policy sees:
///
/// - `principal` is a `Tessera::Workload`: the attested caller. Its entity id is always
///   `"caller"`, so policies match on its attributes, not on `principal == ...`.
///   - `uid`, `gid`: the caller's effective uid and gid.
///   - `user`, `group` (optional): their names, when the node's name service knows them.
///   - `exe`: the path of the executable.
///   - `sha256` (optional): the executable's SHA-256 in lowercase hex, present only when some
///     entry asked for it.
///   - `systemd_unit` (optional): the systemd unit the process runs in.
///   - `node_id`, `node_labels`: the node the agent runs on and its labels (`"env:prod"`).
///   - `task` (optional): the task the caller runs in: `id`, `entry_id` and `spiffe_id`.
///   - `delegation_chain`: the SPIFFE IDs of the tasks from the root task down to the caller's;
///     empty outside a task. Cedar has no lists, so this is a set: ask whether an ID is in it
///     with `contains`, and use `context.delegation_depth` for how deep the caller is.
/// - `action` is one of `Tessera::Action::"Issue"` (issue an X.509-SVID, standing or for a
///   task), `"StartTask"` (start a task under an entry) and `"Delegate"` (hand a task on to a
///   sub-agent).
/// - `resource` is a `Tessera::Entry`: the registration entry in question, whose entity id is
///   the entry id (`resource == Tessera::Entry::"e-42"` works).
///   - `id`, `spiffe_id`, `owner`, `purpose`: as registered.
///   - `labels`: the entry's labels, `"key:value"` strings.
///   - `activation`: `"standing"` or `"task"`.
/// - `context`:
///   - `time`: now, in Unix seconds.
///   - `requested_ttl` (optional): the lifetime asked for, in seconds; absent outside tasks.
///   - `requested_purpose` (optional): the purpose the caller gave.
///   - `delegation_depth`: 0 for a standing issue or a root task, the parent's depth plus one
///     for a delegation.
///
/// Optional attributes must be tested with `has` before use (`principal has task &&
/// principal.task.entry_id == resource.id`); the validator refuses a policy that does not.
pub const SCHEMA: &str = r#"namespace Tessera {
    type Task = {
        id: String,
        entry_id: String,
        spiffe_id: String,
    };

    entity Workload = {
        uid: Long,
        gid: Long,
        user?: String,
        group?: String,
        exe: String,
        sha256?: String,
        systemd_unit?: String,
        node_id: String,
        node_labels: Set<String>,
        task?: Task,
        delegation_chain: Set<String>,
    };

    entity Entry = {
        id: String,
        spiffe_id: String,
        owner: String,
        purpose: String,
        labels: Set<String>,
        activation: String,
    };

    type RequestContext = {
        time: Long,
        requested_ttl?: Long,
        requested_purpose?: String,
        delegation_depth: Long,
    };

    action Issue, StartTask, Delegate appliesTo {
        principal: Workload,
        resource: Entry,
        context: RequestContext,
    };
}
"#;
