//! `tessera policy test`: a decision asked with the attributes an operator types
//! (`key=value` pairs), about a stored entry, against the current policy or a draft.

use std::time::Duration;

use crate::policy::{
    Action, Activation, Context, Decision, PolicySet, Principal, Request, Resource, Task,
};
use crate::spiffe::SpiffeId;
use crate::store::EntryRecord;

/// The principal keys `tessera policy test --principal` takes.
pub const PRINCIPAL_KEYS: &str = "uid, gid, user, group, path, sha256, unit, node_id, \
    node_label (repeatable), task_id, task_entry, task_spiffe_id, chain (repeatable, SPIFFE IDs)";
/// The context keys `--context` takes.
pub const CONTEXT_KEYS: &str = "time (Unix seconds), ttl (a duration), purpose, depth";

/// What `policy` decides for `action` on `entry` by a principal and context given as
/// `key=value` pairs; `Err` names the pair that is wrong and what would be right.
pub fn decide_from_pairs(
    policy: &PolicySet,
    principal: &[String],
    action: &str,
    entry: &EntryRecord,
    context: &[String],
) -> Result<Decision, String> {
    let action = match action {
        "Issue" => Action::Issue,
        "StartTask" => Action::StartTask,
        "Delegate" => Action::Delegate,
        other => {
            return Err(format!(
                "action {other:?}: must be Issue, StartTask or Delegate"
            ));
        }
    };
    let mut single = std::collections::HashMap::new();
    let mut node_labels = Vec::new();
    let mut chain = Vec::new();
    for pair in principal {
        let (key, value) = split(pair, "--principal", PRINCIPAL_KEYS)?;
        match key {
            "node_label" => node_labels.push(value.to_owned()),
            "chain" => chain.push(spiffe_id("chain", value)?),
            "uid" | "gid" | "user" | "group" | "path" | "sha256" | "unit" | "node_id"
            | "task_id" | "task_entry" | "task_spiffe_id" => {
                single.insert(key, value);
            }
            other => {
                return Err(format!(
                    "--principal {other}: unknown; the keys are {PRINCIPAL_KEYS}"
                ));
            }
        }
    }
    let number = |key: &str| -> Result<u32, String> {
        single.get(key).map_or(Ok(0), |v| {
            v.parse()
                .map_err(|_| format!("--principal {key}={v}: not a number"))
        })
    };
    let task_spiffe_id = single
        .get("task_spiffe_id")
        .map(|v| spiffe_id("task_spiffe_id", v))
        .transpose()?;
    let task = match (
        single.get("task_id"),
        single.get("task_entry"),
        &task_spiffe_id,
    ) {
        (Some(id), Some(entry_id), Some(spiffe_id)) => Some(Task {
            id,
            entry_id,
            spiffe_id,
        }),
        (None, None, None) => None,
        _ => {
            return Err(
                "--principal task_id, task_entry and task_spiffe_id go together".to_owned(),
            );
        }
    };
    let (mut time, mut ttl, mut purpose, mut depth) = (crate::clock::unix_now(), None, None, 0u32);
    for pair in context {
        let (key, value) = split(pair, "--context", CONTEXT_KEYS)?;
        match key {
            "time" => {
                time = value
                    .parse()
                    .map_err(|_| format!("--context time={value}: not Unix seconds"))?;
            }
            "ttl" => {
                ttl = Some(
                    crate::config::parse_duration(value)
                        .map_err(|e| format!("--context ttl={value}: {e}"))?,
                );
            }
            "purpose" => purpose = Some(value),
            "depth" => {
                depth = value
                    .parse()
                    .map_err(|_| format!("--context depth={value}: not a number"))?;
            }
            other => {
                return Err(format!(
                    "--context {other}: unknown; the keys are {CONTEXT_KEYS}"
                ));
            }
        }
    }
    let entry_spiffe_id = spiffe_id("the entry's spiffe_id", &entry.spiffe_id)?;
    let request = Request {
        principal: Principal {
            uid: number("uid")?,
            gid: number("gid")?,
            user: single.get("user").copied(),
            group: single.get("group").copied(),
            exe: single.get("path").copied().unwrap_or_default(),
            sha256: single.get("sha256").copied(),
            systemd_unit: single.get("unit").copied(),
            node_id: single.get("node_id").copied().unwrap_or_default(),
            node_labels: &node_labels,
            task,
            delegation_chain: &chain,
        },
        action,
        resource: Resource {
            entry_id: &entry.id,
            spiffe_id: &entry_spiffe_id,
            owner: &entry.owner,
            purpose: &entry.purpose,
            labels: &entry.labels,
            activation: if entry.activation == "task" {
                Activation::Task
            } else {
                Activation::Standing
            },
        },
        context: Context {
            time,
            requested_ttl: ttl.map(|t: Duration| t),
            requested_purpose: purpose,
            delegation_depth: depth,
        },
    };
    Ok(policy.decide(&request))
}

fn split<'a>(pair: &'a str, flag: &str, keys: &str) -> Result<(&'a str, &'a str), String> {
    pair.split_once('=')
        .ok_or_else(|| format!("{flag} {pair:?}: write key=value; the keys are {keys}"))
}

fn spiffe_id(what: &str, value: &str) -> Result<SpiffeId, String> {
    SpiffeId::parse_workload(value).map_err(|e| format!("{what} {value:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> EntryRecord {
        EntryRecord {
            id: "coder".into(),
            spiffe_id: "spiffe://td/coder".into(),
            owner: "team-a".into(),
            purpose: "code".into(),
            activation: "task".into(),
            ..EntryRecord::default()
        }
    }

    #[test]
    fn operators_ask_with_key_value_pairs() {
        let policy = PolicySet::parse(
            r#"@id("team-a starts") permit(principal, action == Tessera::Action::"StartTask", resource)
               when { principal.uid == 1001 && resource.owner == "team-a" };"#,
            3,
            "draft",
        )
        .unwrap();
        let allowed =
            decide_from_pairs(&policy, &["uid=1001".into()], "StartTask", &entry(), &[]).unwrap();
        assert!(allowed.allowed);
        assert_eq!(allowed.determining, ["team-a starts"]);
        assert_eq!(allowed.version, 3);
        let denied = decide_from_pairs(
            &policy,
            &["uid=1002".into()],
            "StartTask",
            &entry(),
            &["ttl=10m".into()],
        )
        .unwrap();
        assert!(!denied.allowed);
        for (principal, action, context, expect) in [
            ("uid=x", "StartTask", "depth=0", "not a number"),
            ("uid=1", "Start", "depth=0", "Issue, StartTask or Delegate"),
            ("colour=red", "Issue", "depth=0", "unknown"),
            ("uid", "Issue", "depth=0", "key=value"),
            ("task_id=t", "Issue", "depth=0", "go together"),
            ("uid=1", "Issue", "ttl=forever", "--context ttl"),
        ] {
            let err = decide_from_pairs(
                &policy,
                &[principal.into()],
                action,
                &entry(),
                &[context.into()],
            )
            .unwrap_err();
            assert!(
                err.contains(expect),
                "{principal} {action} {context}: {err}"
            );
        }
    }
}
