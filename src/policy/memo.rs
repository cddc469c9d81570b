//! Decisions remembered. Cedar's answer is a function of the policies and the request alone, so
//! while a set is in force, the same request gets the same decision; only `context.time` moves
//! by itself. For an action none of whose policies reads the time, a decision is kept under the
//! request without its time, and a workload that asks again (every cached FetchX509SVID asks
//! `Issue`) is answered without building Cedar's entities again.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use serde_json::Value;

use super::{Decision, Request};

/// Decisions kept at most; when full, all are dropped and the set fills again with what is
/// asked now (workloads ask again within their stream's life, so a cold memo warms at once).
pub(super) const CAPACITY: usize = 4096;

/// Decisions of one policy set, by [`key`].
#[derive(Default)]
pub(super) struct Memo {
    decisions: Mutex<HashMap<String, Decision>>,
}

impl Memo {
    pub(super) fn get(&self, key: &str) -> Option<Decision> {
        self.lock().get(key).cloned()
    }

    pub(super) fn put(&self, key: String, decision: &Decision) {
        let mut decisions = self.lock();
        if decisions.len() >= CAPACITY {
            decisions.clear();
        }
        decisions.insert(key, decision.clone());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Decision>> {
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

/// Everything `request` says but the time. Debug output quotes every string, so two requests
/// that differ in any field never share a key.
pub(super) fn key(request: &Request<'_>) -> String {
    let mut timeless = *request;
    timeless.context.time = 0;
    format!("{timeless:?}")
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
