//! The ES256 key that signs JWT-SVIDs, its public JWK (RFC 7517) named by its RFC 7638
//! thumbprint, and the JWK Set of a trust domain with the SPIFFE bundle members.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{JWT_SVID_USE, JwtError};

/// An ES256 signing key. Its private half is zeroized on drop and never printed.
pub struct JwtKey {
    pair: EcdsaKeyPair,
    pkcs8: Zeroizing<Vec<u8>>,
    public: Jwk,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.public.kid)
            .finish_non_exhaustive()
    }
}

impl JwtKey {
    /// A new random key.
    pub fn generate() -> Result<Self, JwtError> {
        let document =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|e| JwtError::Key(format!("generating a P-256 key: {e}")))?;
        Self::from_pkcs8(document.as_ref())
    }

    /// The key in `der` (PKCS#8, P-256).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, JwtError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|e| JwtError::Key(format!("not a PKCS#8 P-256 key: {e}")))?;
        let public = Jwk::p256(pair.public_key().as_ref())?;
        Ok(Self {
            pair,
            pkcs8: Zeroizing::new(der.to_vec()),
            public,
        })
    }

    /// The private key as PKCS#8 DER, for saving.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The key id: the RFC 7638 thumbprint of the public key.
    pub fn kid(&self) -> &str {
        &self.public.kid
    }

    /// The public key as bundles publish it.
    pub fn public_jwk(&self) -> &Jwk {
        &self.public
    }

    /// The key as a private JWK (JSON, with `d`), for handing a holder its key. Zeroized on
    /// drop; never logged.
    pub fn private_jwk(&self) -> Result<Zeroizing<String>, JwtError> {
        use aws_lc_rs::encoding::AsBigEndian;
        let d = self
            .pair
            .private_key()
            .as_be_bytes()
            .map_err(|_| JwtError::Key("cannot export the private key".into()))?;
        let d = Zeroizing::new(B64.encode(d.as_ref()));
        Ok(Zeroizing::new(format!(
            r#"{{"kty":"EC","crv":"P-256","x":"{}","y":"{}","d":"{}","kid":"{}"}}"#,
            self.public.x,
            self.public.y,
            d.as_str(),
            self.public.kid
        )))
    }

    /// The key of a private JWK (JSON with `kty` EC, `crv` P-256, `x`, `y`, `d`).
    pub fn from_private_jwk(json: &str) -> Result<Self, JwtError> {
        #[derive(Deserialize)]
        struct Private {
            kty: String,
            crv: String,
            x: String,
            y: String,
            d: String,
        }
        let private: Private = serde_json::from_str(json)
            .map_err(|e| JwtError::Key(format!("not a private EC JWK: {e}")))?;
        if private.kty != "EC" || private.crv != "P-256" {
            return Err(JwtError::Key(format!(
                "a {} {} key; only EC P-256 is used",
                private.kty, private.crv
            )));
        }
        let decode = |name: &str, text: &str| {
            B64.decode(text)
                .ok()
                .filter(|bytes| bytes.len() == 32)
                .map(Zeroizing::new)
                .ok_or_else(|| JwtError::Key(format!("{name} is not 32 bytes of base64url")))
        };
        let (x, y, d) = (
            decode("x", &private.x)?,
            decode("y", &private.y)?,
            decode("d", &private.d)?,
        );
        let point = [&[4u8][..], &x, &y].concat();
        let pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &d,
            &point,
        )
        .map_err(|e| JwtError::Key(format!("inconsistent EC key: {e}")))?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| JwtError::Key("cannot encode the key".into()))?;
        Self::from_pkcs8(pkcs8.as_ref())
    }

    /// The ES256 signature of `message`, as JWS wants it (r and s, 32 bytes each).
    pub(super) fn sign(&self, message: &[u8]) -> Result<Vec<u8>, JwtError> {
        self.pair
            .sign(&SystemRandom::new(), message)
            .map(|signature| signature.as_ref().to_vec())
            .map_err(|e| JwtError::Key(format!("signing: {e}")))
    }
}

/// A public EC P-256 key as a JWK with the members SPIFFE bundles carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// `EC`.
    pub kty: String,
    /// `P-256`.
    pub crv: String,
    /// The point's x coordinate, base64url.
    pub x: String,
    /// The point's y coordinate, base64url.
    pub y: String,
    /// The key id.
    pub kid: String,
    /// `jwt-svid` in JWT bundles.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
}

impl Jwk {
    /// The JWK of an uncompressed P-256 point (`04 || x || y`).
    fn p256(point: &[u8]) -> Result<Self, JwtError> {
        let (x, y) = match point {
            [4, rest @ ..] if rest.len() == 64 => rest.split_at(32),
            _ => return Err(JwtError::Key("not an uncompressed P-256 point".into())),
        };
        let (x, y) = (B64.encode(x), B64.encode(y));
        // RFC 7638: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = B64.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            canonical.as_bytes(),
        ));
        Ok(Self {
            kty: "EC".into(),
            crv: "P-256".into(),
            x,
            y,
            kid,
            key_use: Some(JWT_SVID_USE.into()),
        })
    }

    /// This key for another use (`wit-svid` in WIT bundles).
    pub fn with_use(&self, key_use: &str) -> Self {
        Self {
            key_use: Some(key_use.to_owned()),
            ..self.clone()
        }
    }

    /// Whether `signature` over `message` verifies with this key (ES256).
    pub(super) fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        if self.kty != "EC" || self.crv != "P-256" {
            return false;
        }
        let (Ok(x), Ok(y)) = (B64.decode(&self.x), B64.decode(&self.y)) else {
            return false;
        };
        if x.len() != 32 || y.len() != 32 {
            return false;
        }
        let point = [&[4u8][..], &x, &y].concat();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(message, signature)
            .is_ok()
    }
}

/// A trust domain's JWT bundle: a JWK Set of its JWT-SVID signing keys, with the SPIFFE bundle
/// members. An empty key set means every JWT-SVID of the trust domain is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    /// The signing keys.
    pub keys: Vec<Jwk>,
    /// Changes with every change of content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_sequence: Option<u64>,
    /// How often a holder should look for a newer bundle, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_refresh_hint: Option<u64>,
}

impl JwkSet {
    /// The key named `kid`, if the set holds it for JWT-SVIDs (or for no stated use).
    pub fn key(&self, kid: &str) -> Option<&Jwk> {
        self.key_for(kid, JWT_SVID_USE)
    }

    /// The key named `kid`, if the set holds it for `key_use` (or for no stated use).
    pub fn key_for(&self, kid: &str, key_use: &str) -> Option<&Jwk> {
        self.keys
            .iter()
            .find(|key| key.kid == kid && key.key_use.as_deref().is_none_or(|u| u == key_use))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_survives_saving_and_is_named_by_its_thumbprint() {
        let key = JwtKey::generate().unwrap();
        let again = JwtKey::from_pkcs8(key.pkcs8()).unwrap();
        assert_eq!(key.public_jwk(), again.public_jwk());
        assert_eq!(key.kid().len(), 43, "base64url of 32 bytes");
        assert!(!format!("{key:?}").contains(&B64.encode(key.pkcs8())));
        let other = JwtKey::generate().unwrap();
        assert_ne!(key.kid(), other.kid());
        assert!(JwtKey::from_pkcs8(b"not a key").is_err());
    }

    #[test]
    fn a_signature_verifies_with_its_own_public_key_only() {
        let key = JwtKey::generate().unwrap();
        let signature = key.sign(b"message").unwrap();
        assert_eq!(signature.len(), 64);
        assert!(key.public_jwk().verifies(b"message", &signature));
        assert!(!key.public_jwk().verifies(b"massage", &signature));
        let other = JwtKey::generate().unwrap();
        assert!(!other.public_jwk().verifies(b"message", &signature));
    }

    #[test]
    fn a_bundle_holds_only_jwt_svid_keys() {
        let key = JwtKey::generate().unwrap();
        let mut jwk = key.public_jwk().clone();
        let set = JwkSet {
            keys: vec![jwk.clone()],
            spiffe_sequence: Some(1),
            spiffe_refresh_hint: Some(300),
        };
        let json = serde_json::to_value(&set).unwrap();
        assert_eq!(json["keys"][0]["use"], "jwt-svid");
        assert_eq!(json["spiffe_sequence"], 1);
        assert!(set.key(key.kid()).is_some());
        jwk.key_use = Some("x509-svid".into());
        let set = JwkSet {
            keys: vec![jwk],
            spiffe_sequence: None,
            spiffe_refresh_hint: None,
        };
        assert!(set.key(key.kid()).is_none());
    }
}
