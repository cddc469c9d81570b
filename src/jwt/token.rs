//! Minting a JWT-SVID and validating one.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Map, Value};

use super::{JWT_SVID_USE, JwkSet, JwtError, JwtKey};
use crate::spiffe::{SpiffeId, TrustDomain};

/// The algorithms the JWT-SVID standard allows; any other (`none`, HS*, EdDSA) is malformed.
const ALLOWED_ALGORITHMS: [&str; 9] = [
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
];

/// A JWT-SVID for `claims` (which must hold `sub`, `aud` and `exp`), signed by `key`.
pub fn mint(key: &JwtKey, claims: &Map<String, Value>) -> Result<String, JwtError> {
    for required in ["sub", "aud", "exp"] {
        if !claims.contains_key(required) {
            return Err(JwtError::Claims(format!("{required} is required")));
        }
    }
    sign_compact(key, "JWT", claims, true)
}

/// `claims` as a compact JWS of type `typ`, signed ES256 by `key` (its `kid` in the header
/// when `with_kid`).
pub(super) fn sign_compact(
    key: &JwtKey,
    typ: &str,
    claims: &Map<String, Value>,
    with_kid: bool,
) -> Result<String, JwtError> {
    let header = if with_kid {
        serde_json::json!({ "alg": "ES256", "kid": key.kid(), "typ": typ })
    } else {
        serde_json::json!({ "alg": "ES256", "typ": typ })
    };
    let claims = serde_json::to_vec(claims)
        .map_err(|e| JwtError::Claims(format!("cannot be serialised: {e}")))?;
    let signing_input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims));
    let signature = key.sign(signing_input.as_bytes())?;
    Ok(format!("{signing_input}.{}", B64.encode(signature)))
}

/// A compact JWS, decoded.
pub(super) struct Compact {
    /// The protected header.
    pub header: Map<String, Value>,
    /// The claims.
    pub claims: Map<String, Value>,
    /// The signature.
    pub signature: Vec<u8>,
    /// How many leading bytes of the token were signed.
    pub signed: usize,
}

/// The three parts of a compact JWS, decoded.
pub(super) fn split_compact(token: &str) -> Result<Compact, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let signed = header.len() + 1 + payload.len();
    let header = json_object(header, "header")?;
    let claims = json_object(payload, "claims")?;
    let signature = B64
        .decode(signature)
        .map_err(|_| JwtError::Malformed("signature is not base64url".into()))?;
    Ok(Compact {
        header,
        claims,
        signature,
        signed,
    })
}

/// A token that passed validation.
#[derive(Debug, Clone)]
pub struct Validated {
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// `aud`, as a list.
    pub audience: Vec<String>,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// `nbf`, Unix seconds, when the token has one.
    pub not_before: Option<i64>,
    /// `jti`, when the token has one.
    pub jti: Option<String>,
    /// Every claim (with `aud` as a list).
    pub claims: Map<String, Value>,
}

/// Validates `token` for `audience` at `now` (Unix seconds), with the JWT bundle `bundle_of`
/// gives for the trust domain of its `sub` (`None`: no bundle, refused).
pub fn validate<'b>(
    token: &str,
    audience: &str,
    now: i64,
    bundle_of: impl FnOnce(&TrustDomain) -> Option<&'b JwkSet>,
) -> Result<Validated, JwtError> {
    let valid = verify(token, now, bundle_of)?;
    valid.check(audience, now)?;
    Ok(valid)
}

/// Everything [`validate`] checks but the audience: the form, the signature, and that the
/// token is within its validity at `now`. A token that passed may be checked again later for
/// any audience and time with [`Validated::check`] alone.
pub fn verify<'b>(
    token: &str,
    now: i64,
    bundle_of: impl FnOnce(&TrustDomain) -> Option<&'b JwkSet>,
) -> Result<Validated, JwtError> {
    let Compact {
        header,
        mut claims,
        signature,
        signed,
    } = split_compact(token)?;
    let (alg, kid) = check_header(&header)?;
    let (spiffe_id, key) = subject_and_key(&claims, &kid, JWT_SVID_USE, bundle_of)?;
    if alg != "ES256" || key.kty != "EC" || key.crv != "P-256" {
        return Err(JwtError::Algorithm { alg, kid });
    }
    if !key.verifies(&token.as_bytes()[..signed], &signature) {
        return Err(JwtError::Signature(kid));
    }

    let got = match claims.get("aud") {
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(many)) if !many.is_empty() => many
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| JwtError::Claims("aud must hold strings".into()))?,
        _ => return Err(JwtError::Claims("aud is required".into())),
    };
    claims.insert("aud".into(), Value::from(got.clone()));
    let expires_at =
        seconds(&claims, "exp")?.ok_or_else(|| JwtError::Claims("exp is required".into()))?;
    let not_before = seconds(&claims, "nbf")?;
    let jti = claims.get("jti").and_then(Value::as_str).map(str::to_owned);
    let valid = Validated {
        spiffe_id,
        audience: got,
        expires_at,
        not_before,
        jti,
        claims,
    };
    valid.check_time(now)?;
    Ok(valid)
}

impl Validated {
    /// Checks that the token is for `audience` and valid at `now` (Unix seconds).
    pub fn check(&self, audience: &str, now: i64) -> Result<(), JwtError> {
        if !self.audience.iter().any(|a| a == audience) {
            return Err(JwtError::Audience {
                wanted: audience.to_owned(),
                got: self.audience.clone(),
            });
        }
        self.check_time(now)
    }

    fn check_time(&self, now: i64) -> Result<(), JwtError> {
        if self.expires_at <= now {
            return Err(JwtError::Expired(self.expires_at));
        }
        if let Some(not_before) = self.not_before
            && not_before > now
        {
            return Err(JwtError::NotYetValid(not_before));
        }
        Ok(())
    }
}

/// The token's `sub` as a SPIFFE ID, and the key `kid` of its trust domain's bundle for
/// `key_use`.
pub(super) fn subject_and_key<'b>(
    claims: &Map<String, Value>,
    kid: &str,
    key_use: &str,
    bundle_of: impl FnOnce(&TrustDomain) -> Option<&'b JwkSet>,
) -> Result<(SpiffeId, &'b super::Jwk), JwtError> {
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Claims("sub is required and must be a string".into()))?;
    let spiffe_id = SpiffeId::parse_workload(sub)
        .map_err(|e| JwtError::Claims(format!("sub {sub:?} is not a SPIFFE ID: {e}")))?;
    let key = bundle_of(&spiffe_id.trust_domain())
        .and_then(|bundle| bundle.key_for(kid, key_use))
        .ok_or_else(|| JwtError::UnknownKey(kid.to_owned()))?;
    Ok((spiffe_id, key))
}

/// The JSON object encoded in one base64url part.
fn json_object(part: &str, what: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = B64
        .decode(part)
        .map_err(|_| JwtError::Malformed(format!("{what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Malformed(format!("{what} is not a JSON object"))),
    }
}

/// The header's `alg` and `kid`, once it is shown to hold only what the standard allows.
fn check_header(header: &Map<String, Value>) -> Result<(String, String), JwtError> {
    if let Some(other) = header
        .keys()
        .find(|k| !["alg", "kid", "typ"].contains(&k.as_str()))
    {
        return Err(JwtError::Header(format!(
            "{other:?} is not allowed (only alg, kid and typ)"
        )));
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Header("alg is required".into()))?;
    if !ALLOWED_ALGORITHMS.contains(&alg) {
        return Err(JwtError::Header(format!(
            "alg {alg:?} is not allowed (RS, ES or PS with 256, 384 or 512)"
        )));
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) if typ == "JWT" || typ == "JOSE" => {}
        Some(other) => {
            return Err(JwtError::Header(format!(
                "typ {other} is not allowed (JWT or JOSE)"
            )));
        }
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Header("kid is required".into()))?;
    Ok((alg.to_owned(), kid.to_owned()))
}

/// A NumericDate claim, whole seconds.
pub(super) fn seconds(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value
            .as_i64()
            .or_else(|| value.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| JwtError::Claims(format!("{name} must be a number of seconds"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::JwkSet;

    const NOW: i64 = 1_800_000_000;

    fn claims(extra: Value) -> Map<String, Value> {
        let mut claims = serde_json::json!({
            "sub": "spiffe://example.org/agent",
            "aud": ["api.example.com"],
            "exp": NOW + 300,
            "iat": NOW,
            "jti": "0f1e",
        })
        .as_object()
        .unwrap()
        .clone();
        if let Value::Object(extra) = extra {
            claims.extend(extra);
        }
        claims
    }

    fn bundle(key: &JwtKey) -> JwkSet {
        JwkSet {
            keys: vec![key.public_jwk().clone()],
            spiffe_sequence: Some(1),
            spiffe_refresh_hint: None,
        }
    }

    fn check(token: &str, audience: &str, set: &JwkSet) -> Result<Validated, JwtError> {
        validate(token, audience, NOW, |td| {
            (td.name() == "example.org").then_some(set)
        })
    }

    /// `token` with its header or claims replaced, re-signed by `key`.
    fn forged(key: &JwtKey, header: Value, claims: Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let signature = key.sign(input.as_bytes()).unwrap();
        format!("{input}.{}", B64.encode(signature))
    }

    #[test]
    fn a_minted_token_validates_with_its_claims() {
        let key = JwtKey::generate().unwrap();
        let token = mint(&key, &claims(serde_json::json!({"owner": "team"}))).unwrap();
        let valid = check(&token, "api.example.com", &bundle(&key)).unwrap();
        assert_eq!(valid.spiffe_id.as_str(), "spiffe://example.org/agent");
        assert_eq!(valid.audience, ["api.example.com"]);
        assert_eq!(valid.expires_at, NOW + 300);
        assert_eq!(valid.jti.as_deref(), Some("0f1e"));
        assert_eq!(valid.claims["owner"], "team");
        let header: Value =
            serde_json::from_slice(&B64.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(
            header,
            serde_json::json!({"alg": "ES256", "kid": key.kid(), "typ": "JWT"})
        );
    }

    #[test]
    fn every_rule_of_the_standard_is_enforced() {
        let key = JwtKey::generate().unwrap();
        let set = bundle(&key);
        let good_header = serde_json::json!({"alg": "ES256", "kid": key.kid(), "typ": "JWT"});
        let good = Value::Object(claims(Value::Null));
        let refused = |header: Value, claims: Value, says: &str| {
            let token = forged(&key, header, claims);
            let error = check(&token, "api.example.com", &set)
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{says}: {error}");
        };
        let with = |name: &str, value: Value| {
            let mut header = good_header.clone();
            header[name] = value;
            header
        };
        refused(with("alg", "none".into()), good.clone(), "not allowed");
        refused(with("alg", "HS256".into()), good.clone(), "not allowed");
        refused(
            with("alg", "ES384".into()),
            good.clone(),
            "cannot be verified",
        );
        refused(with("typ", "jwt+at".into()), good.clone(), "typ");
        refused(
            with("x5c", "[]".into()),
            good.clone(),
            "\"x5c\" is not allowed",
        );
        refused(
            with("kid", "other".into()),
            good.clone(),
            "not in the trust bundle",
        );
        refused(
            serde_json::json!({"alg": "ES256", "typ": "JWT"}),
            good.clone(),
            "kid is required",
        );
        let claim = |name: &str, value: Value| {
            let mut claims = good.clone();
            if value.is_null() {
                claims.as_object_mut().unwrap().remove(name);
            } else {
                claims[name] = value;
            }
            claims
        };
        refused(
            good_header.clone(),
            claim("aud", Value::Null),
            "aud is required",
        );
        refused(
            good_header.clone(),
            claim("aud", "other".into()),
            "is not among",
        );
        refused(
            good_header.clone(),
            claim("exp", Value::Null),
            "exp is required",
        );
        refused(
            good_header.clone(),
            claim("exp", (NOW - 1).into()),
            "expired",
        );
        refused(
            good_header.clone(),
            claim("nbf", (NOW + 60).into()),
            "not valid before",
        );
        refused(
            good_header.clone(),
            claim("sub", "user@example.org".into()),
            "not a SPIFFE ID",
        );
        refused(
            good_header.clone(),
            claim("sub", "spiffe://elsewhere.test/x".into()),
            "not in the trust bundle",
        );

        // A string audience is taken as a list of one.
        let token = forged(
            &key,
            good_header.clone(),
            claim("aud", "api.example.com".into()),
        );
        assert_eq!(
            check(&token, "api.example.com", &set).unwrap().audience,
            ["api.example.com"]
        );

        // A good token with a tampered payload, or signed by another key.
        let token = mint(&key, &claims(Value::Null)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(claim("sub", "spiffe://example.org/root".into()).to_string()),
            parts[2]
        );
        let error = check(&tampered, "api.example.com", &set).unwrap_err();
        assert!(matches!(error, JwtError::Signature(_)), "{error}");
        let other = JwtKey::generate().unwrap();
        let stolen_kid = forged(&other, good_header, good);
        assert!(matches!(
            check(&stolen_kid, "api.example.com", &set).unwrap_err(),
            JwtError::Signature(_)
        ));
        for malformed in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.e30.e30",
            &format!("{}.{}", parts[0], parts[1]),
        ] {
            assert!(
                matches!(
                    check(malformed, "a", &set).unwrap_err(),
                    JwtError::Malformed(_)
                ),
                "{malformed}"
            );
        }
        // An empty bundle makes every token invalid.
        let empty = JwkSet {
            keys: vec![],
            spiffe_sequence: Some(2),
            spiffe_refresh_hint: None,
        };
        assert!(check(&token, "api.example.com", &empty).is_err());
    }
}
