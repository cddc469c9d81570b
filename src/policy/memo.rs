//! Decisions remembered. Cedar's answer is a function of the policies and the request alone, so
//! while a set is in force, the same request gets the same decision; only `context.time` moves
//! by itself. For an action none of whose policies reads the time, a decision is kept under the
//! request without its time, and a workload that asks again (every cached FetchX509SVID asks
//! `Issue`) is answered without building Cedar's entities again.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use serde_json::Value;

use super::{Action, Activation, Context, Decision, Principal, Request, Resource, Task};

/// Decisions kept at most; when full, all are dropped and the set fills again with what is
/// asked now (workloads ask again within their stream's life, so a cold memo warms at once).
pub(super) const CAPACITY: usize = 4096;

/// Decisions of one policy set, by [`key`].
#[derive(Default)]
pub(super) struct Memo {
    decisions: Mutex<HashMap<Vec<u8>, Decision>>,
}

impl Memo {
    pub(super) fn get(&self, key: &[u8]) -> Option<Decision> {
        self.lock().get(key).cloned()
    }

    pub(super) fn put(&self, key: Vec<u8>, decision: &Decision) {
        let mut decisions = self.lock();
        if decisions.len() >= CAPACITY {
            decisions.clear();
        }
        decisions.insert(key, decision.clone());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Decision>> {
        self.decisions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl fmt::Debug for Memo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memo")
            .field("decisions", &self.lock().len())
            .finish()
    }
}

/// Everything `request` says but the time, encoded so that two requests that differ in any
/// field never share a key: every string is preceded by its length and every optional value by
/// whether it is there. Each struct is taken apart field by field, so a field added to a request
/// type does not compile until it is encoded here.
pub(super) fn key(request: &Request<'_>) -> Vec<u8> {
    let Request {
        principal,
        action,
        resource,
        context,
    } = request;
    let mut key = Key(Vec::with_capacity(256));
    key.principal(principal);
    key.byte(match action {
        Action::Issue => 0,
        Action::StartTask => 1,
        Action::Delegate => 2,
    });
    key.resource(resource);
    let Context {
        time: _,
        requested_ttl,
        requested_purpose,
        delegation_depth,
    } = context;
    match requested_ttl {
        Some(ttl) => {
            key.byte(1);
            key.number(ttl.as_secs());
            key.number(u64::from(ttl.subsec_nanos()));
        }
        None => key.byte(0),
    }
    key.optional(*requested_purpose);
    key.number(u64::from(*delegation_depth));
    key.0
}

/// A key being encoded.
struct Key(Vec<u8>);

impl Key {
    fn byte(&mut self, byte: u8) {
        self.0.push(byte);
    }

    fn number(&mut self, number: u64) {
        self.0.extend_from_slice(&number.to_le_bytes());
    }

    fn text(&mut self, text: &str) {
        self.number(text.len() as u64);
        self.0.extend_from_slice(text.as_bytes());
    }

    fn optional(&mut self, text: Option<&str>) {
        match text {
            Some(text) => {
                self.byte(1);
                self.text(text);
            }
            None => self.byte(0),
        }
    }

    fn texts<'a>(&mut self, texts: impl ExactSizeIterator<Item = &'a str>) {
        self.number(texts.len() as u64);
        for text in texts {
            self.text(text);
        }
    }

    fn principal(&mut self, principal: &Principal<'_>) {
        let Principal {
            uid,
            gid,
            user,
            group,
            exe,
            sha256,
            systemd_unit,
            node_id,
            node_labels,
            task,
            delegation_chain,
        } = principal;
        self.number(u64::from(*uid));
        self.number(u64::from(*gid));
        self.optional(*user);
        self.optional(*group);
        self.text(exe);
        self.optional(*sha256);
        self.optional(*systemd_unit);
        self.text(node_id);
        self.texts(node_labels.iter().map(String::as_str));
        match task {
            Some(Task {
                id,
                entry_id,
                spiffe_id,
            }) => {
                self.byte(1);
                self.text(id);
                self.text(entry_id);
                self.text(spiffe_id.as_str());
            }
            None => self.byte(0),
        }
        self.texts(delegation_chain.iter().map(|id| id.as_str()));
    }

    fn resource(&mut self, resource: &Resource<'_>) {
        let Resource {
            entry_id,
            spiffe_id,
            owner,
            purpose,
            labels,
            activation,
        } = resource;
        self.text(entry_id);
        self.text(spiffe_id.as_str());
        self.text(owner);
        self.text(purpose);
        self.texts(labels.iter().map(String::as_str));
        self.byte(match activation {
            Activation::Standing => 0,
            Activation::Task => 1,
        });
    }
}

/// Whether `policy` reads `context.time` (or tests for it, or uses the whole context): then its
/// answer may change with nothing else changing. A policy Cedar cannot render is assumed to.
pub(super) fn reads_time(policy: &cedar_policy::Policy) -> bool {
    policy.to_json().map_or(true, |json| mentions_time(&json))
}

fn mentions_time(value: &Value) -> bool {
    match value {
        Value::Object(map) => {
            for access in [".", "has"] {
                if let Some(Value::Object(operands)) = map.get(access)
                    && is_context(operands.get("left"))
                {
                    return operands.get("attr").and_then(Value::as_str) == Some("time");
                }
            }
            // `context` itself anywhere else: compared, or handed to an extension whole.
            is_context(Some(value)) || map.values().any(mentions_time)
        }
        Value::Array(items) => items.iter().any(mentions_time),
        _ => false,
    }
}

fn is_context(value: Option<&Value>) -> bool {
    value
        .and_then(|v| v.get("Var"))
        .and_then(Value::as_str)
        .is_some_and(|var| var == "context")
}
