//! JWT-SVIDs: the ES256 signing key and its public JWK, the JWK Set a trust domain publishes,
//! minting a token and validating one per the JWT-SVID standard.
//!
//! Only what the standard allows is accepted: JWS Compact Serialization; the headers `alg`,
//! `kid` and `typ` (`JWT` or `JOSE`) and no others; `kid` required (every SPIFFE library needs
//! it); `sub` a SPIFFE ID, `aud` present and holding the audience asked for, `exp` present and in
//! the future. tessera signs with ES256 only, so a token in any other algorithm, even one of the
//! eight others the standard names, is refused as one no key of the bundle can have signed.

mod claims;
mod file;
mod key;
mod token;
pub mod wit;

pub use claims::{SvidClaims, new_jti};
pub use file::{KeyFileError, load_key, load_or_create_key, save_key};
pub use key::{Jwk, JwkSet, JwtKey};
pub use token::{Validated, mint, validate, verify};

/// The JWK `use` of a JWT-SVID signing key.
pub const JWT_SVID_USE: &str = "jwt-svid";

/// Why a token could not be minted or was refused.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The token is not three base64url parts of JSON (compact serialization).
    #[error("not a compact JWS: {0}")]
    Malformed(String),
    /// The protected header breaks the JWT-SVID rules.
    #[error("header: {0}")]
    Header(String),
    /// The header names a key no bundle holds.
    #[error("signed by key {0:?}, which is not in the trust bundle")]
    UnknownKey(String),
    /// The header's algorithm is not the one of the key it names.
    #[error("algorithm {alg} cannot be verified with key {kid:?} (an EC P-256 key: ES256)")]
    Algorithm {
        /// The algorithm in the header.
        alg: String,
        /// The key it names.
        kid: String,
    },
    /// The signature does not verify.
    #[error("signature does not verify with key {0:?}")]
    Signature(String),
    /// A claim is missing or malformed.
    #[error("claims: {0}")]
    Claims(String),
    /// The audience asked for is not among the token's.
    #[error("audience {wanted:?} is not among the token's {got:?}")]
    Audience {
        /// The audience the validator asked for.
        wanted: String,
        /// The token's `aud`.
        got: Vec<String>,
    },
    /// `exp` has passed.
    #[error("expired at {0} (Unix seconds)")]
    Expired(i64),
    /// `nbf` has not come yet.
    #[error("not valid before {0} (Unix seconds)")]
    NotYetValid(i64),
    /// The token was revoked before its expiry (its `jti`).
    #[error("revoked: token {0} is no longer valid (its registration entry or task is gone)")]
    Revoked(String),
    /// A key could not be made, read or used.
    #[error("signing key: {0}")]
    Key(String),
    /// The signer (the server) cannot be reached now.
    #[error("the server cannot sign now: {0}")]
    Unavailable(String),
    /// The signer (the server) refused to sign.
    #[error("{0}")]
    Refused(String),
}
