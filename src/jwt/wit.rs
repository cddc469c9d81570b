//! WIT-SVIDs (the SPIFFE Workload Identity Token profile, Incubating) and the Workload Proof
//! Tokens (IETF WIMSE WPT draft) that present them.
//!
//! A WIT is never a bearer token: it names its holder's public key (`cnf.jwk`), and a relying
//! party accepts it only with a WPT signed by that key for the request at hand. A WIT has `typ`
//! `wit+jwt`, `kid`, `sub`, `exp`, `cnf.jwk` and no `aud`; it is signed by the trust domain's
//! JWT signing keys, published in WIT bundles with `use: "wit-svid"`. The different `typ`s keep
//! a WIT from passing as a JWT-SVID and the other way round.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Map, Value};

use super::token::{Compact, seconds, sign_compact, split_compact, subject_and_key};
use super::{Jwk, JwkSet, JwtError, JwtKey};
use crate::spiffe::{SpiffeId, TrustDomain};

/// The `typ` of a WIT.
pub const WIT_TYP: &str = "wit+jwt";
/// The `typ` of a Workload Proof Token.
pub const WPT_TYP: &str = "wpt+jwt";
/// The JWK `use` of a WIT signing key.
pub const WIT_SVID_USE: &str = "wit-svid";
/// The longest a WPT may live: it proves one request.
pub const MAX_WPT_TTL: i64 = 300;

/// A WIT for `claims` (which must hold `sub`, `exp` and `cnf.jwk`, and no `aud`), signed by
/// `key`.
pub fn mint_wit(key: &JwtKey, claims: &Map<String, Value>) -> Result<String, JwtError> {
    for required in ["sub", "exp", "cnf"] {
        if !claims.contains_key(required) {
            return Err(JwtError::Claims(format!("{required} is required")));
        }
    }
    if claims.contains_key("aud") {
        return Err(JwtError::Claims("a WIT has no aud".into()));
    }
    sign_compact(key, WIT_TYP, claims, true)
}

/// A WIT that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedWit {
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// `jti`, when the token has one.
    pub jti: Option<String>,
    /// `cnf.jwk`: the holder's public key, which must sign the proof.
    pub holder: Jwk,
    /// Every claim.
    pub claims: Map<String, Value>,
}

/// Validates the WIT `token` at `now` (Unix seconds) against the WIT bundle `bundle_of` gives
/// for the trust domain of its `sub`.
pub fn validate_wit<'b>(
    token: &str,
    now: i64,
    bundle_of: impl FnOnce(&TrustDomain) -> Option<&'b JwkSet>,
) -> Result<ValidatedWit, JwtError> {
    let Compact {
        header,
        claims,
        signature,
        signed,
    } = split_compact(token)?;
    check_header(&header, WIT_TYP, true)?;
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Header("kid is required".into()))?;
    let (spiffe_id, key) = subject_and_key(&claims, kid, WIT_SVID_USE, bundle_of)?;
    if !key.verifies(&token.as_bytes()[..signed], &signature) {
        return Err(JwtError::Signature(kid.to_owned()));
    }
    if claims.contains_key("aud") {
        return Err(JwtError::Claims("a WIT has no aud".into()));
    }
    let expires_at =
        seconds(&claims, "exp")?.ok_or_else(|| JwtError::Claims("exp is required".into()))?;
    if expires_at <= now {
        return Err(JwtError::Expired(expires_at));
    }
    let holder = claims
        .get("cnf")
        .and_then(|cnf| cnf.get("jwk"))
        .cloned()
        .ok_or_else(|| JwtError::Claims("cnf.jwk is required".into()))
        .and_then(|jwk| {
            serde_json::from_value::<Jwk>(jwk)
                .map_err(|e| JwtError::Claims(format!("cnf.jwk is not an EC public key: {e}")))
        })?;
    let jti = claims.get("jti").and_then(Value::as_str).map(str::to_owned);
    Ok(ValidatedWit {
        spiffe_id,
        expires_at,
        jti,
        holder,
        claims,
    })
}

/// A Workload Proof Token: `holder` (the WIT's key) proves, for `audience` (the request's
/// target URI), that it holds `wit`; valid for `ttl` seconds from `now`.
pub fn mint_wpt(
    holder: &JwtKey,
    wit: &str,
    audience: &str,
    now: i64,
    ttl: i64,
    jti: &str,
) -> Result<String, JwtError> {
    let mut claims = Map::new();
    claims.insert("aud".into(), audience.into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + ttl.clamp(1, MAX_WPT_TTL)).into());
    claims.insert("jti".into(), jti.into());
    claims.insert("wth".into(), token_hash(wit).into());
    sign_compact(holder, WPT_TYP, &claims, false)
}

/// Checks the WPT `proof` presented with `wit` (already validated as `valid`) for `audience`
/// at `now`: its type, the holder's signature, the audience, a lifetime of at most
/// [`MAX_WPT_TTL`], and `wth` naming this very WIT. Returns the proof's `jti` and `exp`, for
/// the relying party's replay check.
pub fn validate_wpt(
    proof: &str,
    wit: &str,
    valid: &ValidatedWit,
    audience: &str,
    now: i64,
) -> Result<(String, i64), JwtError> {
    let Compact {
        header,
        claims,
        signature,
        signed,
    } = split_compact(proof)?;
    check_header(&header, WPT_TYP, false)?;
    if !valid
        .holder
        .verifies(&proof.as_bytes()[..signed], &signature)
    {
        return Err(JwtError::Signature("cnf.jwk".into()));
    }
    match claims.get("aud") {
        Some(Value::String(aud)) if aud == audience => {}
        other => {
            return Err(JwtError::Audience {
                wanted: audience.to_owned(),
                got: other.map(|v| vec![v.to_string()]).unwrap_or_default(),
            });
        }
    }
    let expires_at =
        seconds(&claims, "exp")?.ok_or_else(|| JwtError::Claims("exp is required".into()))?;
    if expires_at <= now {
        return Err(JwtError::Expired(expires_at));
    }
    let issued_at =
        seconds(&claims, "iat")?.ok_or_else(|| JwtError::Claims("iat is required".into()))?;
    if issued_at > now + 5 || expires_at - issued_at > MAX_WPT_TTL {
        return Err(JwtError::Claims(format!(
            "a proof is issued now and lives at most {MAX_WPT_TTL} s"
        )));
    }
    if claims.get("wth").and_then(Value::as_str) != Some(token_hash(wit).as_str()) {
        return Err(JwtError::Claims(
            "wth does not name the WIT presented with the proof".into(),
        ));
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty())
        .ok_or_else(|| JwtError::Claims("jti is required".into()))?;
    Ok((jti.to_owned(), expires_at))
}

/// base64url(SHA-256(token)): how a proof names the token it goes with.
pub fn token_hash(token: &str) -> String {
    B64.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ))
}

/// Checks a header holds `alg` ES256, `typ` `typ`, a `kid` when `kid_required`, and nothing
/// but `alg`, `kid` and `typ`.
fn check_header(
    header: &Map<String, Value>,
    typ: &str,
    kid_required: bool,
) -> Result<(), JwtError> {
    if let Some(other) = header
        .keys()
        .find(|k| !["alg", "kid", "typ"].contains(&k.as_str()))
    {
        return Err(JwtError::Header(format!(
            "{other:?} is not allowed (only alg, kid and typ)"
        )));
    }
    if kid_required && !header.get("kid").is_some_and(Value::is_string) {
        return Err(JwtError::Header("kid is required".into()));
    }
    if header.get("typ").and_then(Value::as_str) != Some(typ) {
        return Err(JwtError::Header(format!("typ must be {typ:?}")));
    }
    match header.get("alg").and_then(Value::as_str) {
        Some("ES256") => Ok(()),
        other => Err(JwtError::Header(format!(
            "alg {other:?} is not ES256, the only algorithm tessera's keys use"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn wit_claims(holder: &JwtKey) -> Map<String, Value> {
        serde_json::json!({
            "sub": "spiffe://example.org/agent",
            "exp": NOW + 300,
            "iat": NOW,
            "jti": "w1",
            "cnf": {"jwk": holder.public_jwk()},
        })
        .as_object()
        .unwrap()
        .clone()
    }

    fn wit_bundle(signer: &JwtKey) -> JwkSet {
        JwkSet {
            keys: vec![signer.public_jwk().with_use(WIT_SVID_USE)],
            spiffe_sequence: Some(1),
            spiffe_refresh_hint: None,
        }
    }

    #[test]
    fn a_wit_and_its_proof_validate_and_nothing_else_does() {
        let signer = JwtKey::generate().unwrap();
        let holder = JwtKey::generate().unwrap();
        let wit = mint_wit(&signer, &wit_claims(&holder)).unwrap();
        let bundle = wit_bundle(&signer);
        let valid = validate_wit(&wit, NOW, |_| Some(&bundle)).unwrap();
        assert_eq!(valid.holder.x, holder.public_jwk().x);
        assert_eq!(valid.spiffe_id.as_str(), "spiffe://example.org/agent");

        let wpt = mint_wpt(&holder, &wit, "https://api.example.com/x", NOW, 60, "p1").unwrap();
        let (jti, _) = validate_wpt(&wpt, &wit, &valid, "https://api.example.com/x", NOW).unwrap();
        assert_eq!(jti, "p1");
        // Another audience, another signer, another WIT, an expired proof: refused.
        assert!(validate_wpt(&wpt, &wit, &valid, "https://other/", NOW).is_err());
        let thief = JwtKey::generate().unwrap();
        let stolen = mint_wpt(&thief, &wit, "https://api.example.com/x", NOW, 60, "p2").unwrap();
        assert!(matches!(
            validate_wpt(&stolen, &wit, &valid, "https://api.example.com/x", NOW),
            Err(JwtError::Signature(_))
        ));
        let other_wit = mint_wit(&signer, &wit_claims(&holder)).unwrap();
        assert_ne!(other_wit, wit, "ECDSA signatures are randomised");
        let elsewhere = mint_wpt(
            &holder,
            &other_wit,
            "https://api.example.com/x",
            NOW,
            60,
            "p3",
        )
        .unwrap();
        assert!(
            validate_wpt(&elsewhere, &wit, &valid, "https://api.example.com/x", NOW).is_err(),
            "a proof for another WIT"
        );
        assert!(validate_wpt(&wpt, &wit, &valid, "https://api.example.com/x", NOW + 61).is_err());

        // A JWT-SVID bundle key does not validate a WIT, and a WIT is no JWT-SVID.
        let jwt_bundle = JwkSet {
            keys: vec![signer.public_jwk().clone()],
            spiffe_sequence: None,
            spiffe_refresh_hint: None,
        };
        assert!(matches!(
            validate_wit(&wit, NOW, |_| Some(&jwt_bundle)),
            Err(JwtError::UnknownKey(_))
        ));
        assert!(crate::jwt::validate(&wit, "x", NOW, |_| Some(&jwt_bundle)).is_err());
        // No aud in a WIT.
        let mut with_aud = wit_claims(&holder);
        with_aud.insert("aud".into(), "x".into());
        assert!(mint_wit(&signer, &with_aud).is_err());
    }

    #[test]
    fn a_holder_key_survives_its_private_jwk() {
        let holder = JwtKey::generate().unwrap();
        let jwk = holder.private_jwk().unwrap();
        let again = JwtKey::from_private_jwk(&jwk).unwrap();
        assert_eq!(again.public_jwk(), holder.public_jwk());
        assert!(JwtKey::from_private_jwk(r#"{"kty":"RSA"}"#).is_err());
        assert!(!format!("{again:?}").contains(jwk.as_str()));
    }
}
