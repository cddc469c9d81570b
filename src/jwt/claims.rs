//! The claims of a JWT-SVID as tessera writes them, whoever signs: the standard's (`sub`, `aud`,
//! `exp`, `iat`, `jti`), tessera's own under `tessera` (owner, purpose, entry id; for a task,
//! its id and chain), and for a delegated task the chain as nested RFC 8693 `act` claims.

use serde_json::{Map, Value};

/// What one token says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SvidClaims {
    /// `sub`: the SPIFFE ID (for a task, the task's).
    pub subject: String,
    /// `aud`, sorted and without repeats.
    pub audience: Vec<String>,
    /// `iat`, Unix seconds.
    pub issued_at: i64,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// `jti`.
    pub jti: String,
    /// Who answers for the identity.
    pub owner: String,
    /// What it is for (for a task, the task's purpose).
    pub purpose: String,
    /// The registration entry (for a task, the task entry).
    pub entry_id: String,
    /// For a task's token: the task id and the chain from the root task down to this one, as
    /// (task id, SPIFFE ID).
    pub task: Option<(String, Vec<(String, String)>)>,
}

impl SvidClaims {
    /// The claims as a JSON object, ready to sign.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut tessera = Map::new();
        tessera.insert("owner".into(), self.owner.clone().into());
        tessera.insert("purpose".into(), self.purpose.clone().into());
        tessera.insert("entry_id".into(), self.entry_id.clone().into());
        let mut claims = Map::new();
        claims.insert("sub".into(), self.subject.clone().into());
        claims.insert("aud".into(), self.audience.clone().into());
        claims.insert("exp".into(), self.expires_at.into());
        claims.insert("iat".into(), self.issued_at.into());
        claims.insert("jti".into(), self.jti.clone().into());
        if let Some((task_id, chain)) = &self.task {
            tessera.insert("task_id".into(), task_id.clone().into());
            let links: Vec<Value> = chain
                .iter()
                .map(|(task_id, sub)| serde_json::json!({"task_id": task_id, "sub": sub}))
                .collect();
            tessera.insert("chain".into(), links.into());
            // The chain runs from the root down to this task; `act` nests from the parent up,
            // so the outermost actor is the most recent one.
            let mut act: Option<Value> = None;
            for (task_id, sub) in chain.iter().take(chain.len().saturating_sub(1)) {
                let mut actor = serde_json::json!({"sub": sub, "task_id": task_id});
                if let Some(outer) = act.take() {
                    actor["act"] = outer;
                }
                act = Some(actor);
            }
            if let Some(act) = act {
                claims.insert("act".into(), act);
            }
        }
        claims.insert("tessera".into(), Value::Object(tessera));
        claims
    }

    /// The claims of a WIT-SVID for `holder`: the same without `aud`, with `cnf.jwk`.
    pub fn to_wit_json(&self, holder: &super::Jwk) -> Map<String, Value> {
        let mut claims = self.to_json();
        claims.remove("aud");
        let mut holder = serde_json::to_value(holder).unwrap_or_default();
        if let Value::Object(jwk) = &mut holder {
            // The holder's key has no `use`: it signs proofs, not tokens.
            jwk.remove("use");
        }
        claims.insert("cnf".into(), serde_json::json!({ "jwk": holder }));
        claims
    }
}

/// A new `jti`: a UUIDv7 in simple form, unique and ordered by time.
pub fn new_jti() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delegated_task_nests_its_ancestors_as_act_claims_parent_outermost() {
        let claims = SvidClaims {
            subject: "spiffe://td/c/task/3".into(),
            audience: vec!["api".into()],
            issued_at: 10,
            expires_at: 20,
            jti: "j".into(),
            owner: "team".into(),
            purpose: "p".into(),
            entry_id: "c".into(),
            task: Some((
                "3".into(),
                vec![
                    ("1".into(), "spiffe://td/a/task/1".into()),
                    ("2".into(), "spiffe://td/b/task/2".into()),
                    ("3".into(), "spiffe://td/c/task/3".into()),
                ],
            )),
        }
        .to_json();
        assert_eq!(claims["act"]["sub"], "spiffe://td/b/task/2");
        assert_eq!(claims["act"]["act"]["sub"], "spiffe://td/a/task/1");
        assert!(claims["act"]["act"].get("act").is_none());
        assert_eq!(claims["tessera"]["chain"][2]["task_id"], "3");
        assert_eq!(claims["tessera"]["task_id"], "3");
    }

    #[test]
    fn a_standing_identity_has_no_task_and_no_act() {
        let claims = SvidClaims {
            subject: "spiffe://td/a".into(),
            audience: vec!["x".into(), "y".into()],
            entry_id: "a".into(),
            ..SvidClaims::default()
        }
        .to_json();
        assert!(claims.get("act").is_none());
        assert!(claims["tessera"].get("task_id").is_none());
        assert_eq!(claims["aud"], serde_json::json!(["x", "y"]));
    }
}
