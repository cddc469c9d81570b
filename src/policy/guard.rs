//! A cheap test that lets a decision skip policies that cannot apply.
//!
//! Cedar weighs every policy it is handed, and that cost grows with the set. Most operator
//! policies open with a test of a plain fact against a literal (`resource.owner == "ci" && ...`,
//! `principal.uid == 1000`, `context.delegation_depth < 3`,
//! `resource.labels.contains("team:ci")`). Cedar evaluates `&&` left to right and stops at the
//! first false operand, and after strict validation reading a required attribute and comparing
//! it with a literal cannot fail. So when the leftmost operand of a policy's first `when` clause
//! is such a test and it is false for the request, Cedar would find the policy not satisfied
//! without error: leaving it out changes neither the decision, nor the determining policies,
//! nor the errors.

use serde_json::Value;

use super::Request;

/// A required attribute a guard compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    Uid,
    Gid,
    Time,
    DelegationDepth,
    NodeLabels,
    Labels,
    Exe,
    NodeId,
    EntryId,
    SpiffeId,
    Owner,
    Purpose,
    Activation,
}

impl Field {
    fn named(var: &str, attr: &str) -> Option<Self> {
        Some(match (var, attr) {
            ("principal", "uid") => Field::Uid,
            ("principal", "gid") => Field::Gid,
            ("context", "time") => Field::Time,
            ("context", "delegation_depth") => Field::DelegationDepth,
            ("principal", "node_labels") => Field::NodeLabels,
            ("resource", "labels") => Field::Labels,
            ("principal", "exe") => Field::Exe,
            ("principal", "node_id") => Field::NodeId,
            ("resource", "id") => Field::EntryId,
            ("resource", "spiffe_id") => Field::SpiffeId,
            ("resource", "owner") => Field::Owner,
            ("resource", "purpose") => Field::Purpose,
            ("resource", "activation") => Field::Activation,
            _ => return None,
        })
    }
}

/// How a `Long` attribute is compared with the literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Order {
    Eq,
    Less,
    LessEq,
    Greater,
    GreaterEq,
}

impl Order {
    fn named(op: &str) -> Option<Self> {
        Some(match op {
            "==" => Order::Eq,
            "<" => Order::Less,
            "<=" => Order::LessEq,
            ">" => Order::Greater,
            ">=" => Order::GreaterEq,
            _ => return None,
        })
    }

    /// The same test with its operands swapped: `3 > x` is `x < 3`.
    fn swapped(self) -> Self {
        match self {
            Order::Eq => Order::Eq,
            Order::Less => Order::Greater,
            Order::LessEq => Order::GreaterEq,
            Order::Greater => Order::Less,
            Order::GreaterEq => Order::LessEq,
        }
    }

    fn holds(self, actual: i64, literal: i64) -> bool {
        match self {
            Order::Eq => actual == literal,
            Order::Less => actual < literal,
            Order::LessEq => actual <= literal,
            Order::Greater => actual > literal,
            Order::GreaterEq => actual >= literal,
        }
    }
}

/// The first thing a policy's condition tests: a plain fact against a literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Guard {
    /// A `Long` attribute compared with a number.
    Long(Field, Order, i64),
    /// A `String` attribute equal to a string.
    Str(Field, String),
    /// A `Set<String>` attribute containing a string.
    Contains(Field, String),
}

impl Guard {
    /// The guard of a policy, from its JSON form (Cedar's public view of a policy's syntax);
    /// `None` when its condition does not open with one, and then it is always evaluated.
    pub(super) fn of(policy: &cedar_policy::Policy) -> Option<Guard> {
        let json = policy.to_json().ok()?;
        let first = json.get("conditions")?.as_array()?.first()?;
        if first.get("kind")?.as_str()? != "when" {
            return None;
        }
        let mut leftmost = first.get("body")?;
        while let Some(and) = leftmost.get("&&") {
            leftmost = and.get("left")?;
        }
        let (op, operands) = leftmost.as_object()?.iter().next()?;
        let (left, right) = (operands.get("left")?, operands.get("right")?);
        if op == "contains" {
            let field = Self::attribute(left)?;
            let Value::String(s) = right.get("Value")? else {
                return None;
            };
            return matches!(field, Field::NodeLabels | Field::Labels)
                .then(|| Guard::Contains(field, s.clone()));
        }
        let order = Order::named(op)?;
        Self::compare(left, order, right).or_else(|| Self::compare(right, order.swapped(), left))
    }

    /// The attribute `principal.x`, `resource.x` or `context.x` names, if it can be guarded.
    fn attribute(expression: &Value) -> Option<Field> {
        let dot = expression.get(".")?;
        let var = dot.get("left")?.get("Var")?.as_str()?;
        Field::named(var, dot.get("attr")?.as_str()?)
    }

    fn compare(attribute: &Value, order: Order, literal: &Value) -> Option<Guard> {
        let field = Self::attribute(attribute)?;
        let value = literal.get("Value")?;
        // The validator has matched the literal's type to the attribute's; a guard of another
        // shape is simply not taken.
        match (field, order, value) {
            (
                Field::Uid | Field::Gid | Field::Time | Field::DelegationDepth,
                _,
                Value::Number(n),
            ) => Some(Guard::Long(field, order, n.as_i64()?)),
            (
                Field::Exe
                | Field::NodeId
                | Field::EntryId
                | Field::SpiffeId
                | Field::Owner
                | Field::Purpose
                | Field::Activation,
                Order::Eq,
                Value::String(s),
            ) => Some(Guard::Str(field, s.clone())),
            _ => None,
        }
    }

    /// Whether the test holds for `request` (so the policy must be evaluated). A guard this
    /// code could not have built holds, which only costs an evaluation.
    pub(super) fn holds(&self, request: &Request<'_>) -> bool {
        let (p, r, c) = (&request.principal, &request.resource, &request.context);
        match self {
            Guard::Long(field, order, literal) => {
                let actual = match field {
                    Field::Uid => i64::from(p.uid),
                    Field::Gid => i64::from(p.gid),
                    Field::Time => c.time,
                    Field::DelegationDepth => i64::from(c.delegation_depth),
                    _ => return true,
                };
                order.holds(actual, *literal)
            }
            Guard::Str(field, literal) => {
                let actual = match field {
                    Field::Exe => p.exe,
                    Field::NodeId => p.node_id,
                    Field::EntryId => r.entry_id,
                    Field::SpiffeId => r.spiffe_id.as_str(),
                    Field::Owner => r.owner,
                    Field::Purpose => r.purpose,
                    Field::Activation => r.activation.name(),
                    _ => return true,
                };
                actual == literal
            }
            Guard::Contains(field, literal) => {
                let set = match field {
                    Field::NodeLabels => p.node_labels,
                    Field::Labels => r.labels,
                    _ => return true,
                };
                set.iter().any(|label| label == literal)
            }
        }
    }
}
