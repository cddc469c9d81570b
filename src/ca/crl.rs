//! Certificate revocation lists: what every issuing CA signs for the certificates it revoked
//! (X.509 v2, RFC 5280), and the one reader that checks a CRL before anything trusts it.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use super::{CaError, SigningCa, whole_seconds};
use crate::proto::tessera::RevocationReason;

/// How long a signed CRL stays current (its nextUpdate minus its thisUpdate). Issuers re-sign
/// at half of it, so a relying party that enforces nextUpdate never holds an outdated one while
/// the issuer runs.
pub const CRL_LIFETIME: Duration = Duration::from_secs(3600);

/// Node CRLs that list nothing are sent to every agent only while there are at most this many
/// of them: a strict verifier (OpenSSL `-crl_check_all`, Envoy once any CRL is configured)
/// needs a CRL for every CA of a chain, but beyond this the Workload API message would grow
/// with the number of nodes. Root CRLs and CRLs that list something are always sent.
pub const EMPTY_NODE_CRLS_SENT_UP_TO: usize = 64;

/// What the distribution rule ([`distributed`]) looks at in a CRL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrlStanding {
    /// Signed by a root of the trust domain rather than by a node's CA.
    pub root: bool,
    /// Lists at least one certificate.
    pub lists_any: bool,
    /// Before its nextUpdate.
    pub current: bool,
}

/// The CRLs of `crls` every agent is given, in their order: every root's, every node CRL that
/// lists something, and the current node CRLs that list nothing while there are at most
/// [`EMPTY_NODE_CRLS_SENT_UP_TO`] of them. An empty CRL past its nextUpdate is left out (it
/// revokes nothing, and a strict verifier would refuse the whole chain for it); one that lists
/// something is kept, stale or not. Public so that what the server sends and what the
/// benchmark sizes are one rule.
pub fn distributed<T>(crls: &[T], standing: impl Fn(&T) -> CrlStanding) -> Vec<&T> {
    let standings: Vec<CrlStanding> = crls.iter().map(standing).collect();
    let empty_nodes = standings
        .iter()
        .filter(|s| !s.root && !s.lists_any && s.current)
        .count();
    crls.iter()
        .zip(&standings)
        .filter(|(_, s)| {
            s.root || s.lists_any || (s.current && empty_nodes <= EMPTY_NODE_CRLS_SENT_UP_TO)
        })
        .map(|(crl, _)| crl)
        .collect()
}

/// Why a CRL was refused.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    /// The bytes are not a DER CRL.
    #[error("not a DER certificate revocation list: {0}")]
    Malformed(String),
    /// The CRL lacks a field every CRL tessera accepts must have.
    #[error("the CRL has no {0}")]
    Missing(&'static str),
    /// The issuer certificate given to check it against does not parse.
    #[error("the issuer certificate is not X.509: {0}")]
    BadIssuer(String),
    /// The CRL names another issuer than the certificate it is checked against.
    #[error("the CRL's issuer {crl} is not the CA {ca}")]
    WrongIssuer {
        /// The issuer the CRL names.
        crl: String,
        /// The subject of the CA it was checked against.
        ca: String,
    },
    /// The signature does not verify with the CA's key.
    #[error("the CRL's signature does not verify with the key of {0}")]
    BadSignature(String),
    /// The CRL number does not fit the 64 bits tessera counts in.
    #[error("the CRL number is larger than tessera issues")]
    NumberTooLarge,
}

/// One certificate a CRL revokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The certificate's serial, as bytes (lowercase hex elsewhere).
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// Why, as recorded in the events; mapped to an RFC 5280 reason code in the CRL.
    pub reason: RevocationReason,
}

/// The RFC 5280 reason code a CRL entry carries for `reason`.
pub fn crl_reason(reason: RevocationReason) -> rcgen::RevocationReason {
    use rcgen::RevocationReason as Code;
    match reason {
        RevocationReason::EntryRemoved
        | RevocationReason::RegistrationExpired
        | RevocationReason::TaskEnded => Code::CessationOfOperation,
        RevocationReason::EntryChanged => Code::AffiliationChanged,
        RevocationReason::NodeEvicted
        | RevocationReason::Inactive
        | RevocationReason::Anomaly
        | RevocationReason::PolicyChanged => Code::PrivilegeWithdrawn,
        RevocationReason::Superseded | RevocationReason::CaRotated => Code::Superseded,
        RevocationReason::Operator | RevocationReason::Unspecified => Code::Unspecified,
    }
}

/// The name RFC 5280 gives reason `code`, as people read it.
pub fn reason_code_name(code: u8) -> &'static str {
    match code {
        0 => "unspecified",
        1 => "keyCompromise",
        2 => "cACompromise",
        3 => "affiliationChanged",
        4 => "superseded",
        5 => "cessationOfOperation",
        6 => "certificateHold",
        8 => "removeFromCRL",
        9 => "privilegeWithdrawn",
        10 => "aACompromise",
        _ => "unknown",
    }
}

/// Signs CRL number `number` for `ca`, revoking `entries`, current from `now` for
/// [`CRL_LIFETIME`].
pub fn sign_crl(
    ca: &SigningCa,
    number: u64,
    now: SystemTime,
    entries: &[Revoked],
) -> Result<Vec<u8>, CaError> {
    let this_update = whole_seconds(now);
    let params = CertificateRevocationListParams {
        this_update: this_update.into(),
        next_update: (this_update + CRL_LIFETIME).into(),
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: entries
            .iter()
            .map(|entry| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&entry.serial),
                revocation_time: whole_seconds(entry.revoked_at).into(),
                reason_code: Some(crl_reason(entry.reason)),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&ca.issuer)?.der().to_vec())
}

/// A revoked certificate as a CRL lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    /// Lowercase hex serial.
    pub serial_hex: String,
    /// When it was revoked.
    pub revoked_at: SystemTime,
    /// The RFC 5280 reason code, if the entry has one.
    pub reason_code: Option<u8>,
}

/// What a CRL says, read from DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    /// The issuer's name as DER (compared byte for byte with a CA's subject).
    pub issuer_der: Vec<u8>,
    /// The issuer's name, as people read it.
    pub issuer: String,
    /// The authority key identifier, when present.
    pub key_id: Option<Vec<u8>>,
    /// The cRLNumber.
    pub number: u64,
    /// When it was signed.
    pub this_update: SystemTime,
    /// When the next one is due.
    pub next_update: SystemTime,
    /// The revoked certificates.
    pub revoked: Vec<RevokedEntry>,
}

impl CrlInfo {
    /// The entry for the certificate with lowercase hex serial `serial_hex`, if it is revoked.
    pub fn find(&self, serial_hex: &str) -> Option<&RevokedEntry> {
        self.revoked.iter().find(|r| r.serial_hex == serial_hex)
    }
}

fn seconds(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64)
}

fn read(der: &[u8]) -> Result<(CertificateRevocationList<'_>, CrlInfo), CrlError> {
    let (rest, crl) =
        CertificateRevocationList::from_der(der).map_err(|e| CrlError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CrlError::Malformed(format!(
            "{} bytes follow the CRL",
            rest.len()
        )));
    }
    let number = crl.crl_number().ok_or(CrlError::Missing("cRLNumber"))?;
    let number: u64 = number.try_into().map_err(|_| CrlError::NumberTooLarge)?;
    let next_update = crl.next_update().ok_or(CrlError::Missing("nextUpdate"))?;
    let key_id = crl
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        });
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| RevokedEntry {
            serial_hex: hex::encode(r.raw_serial()),
            revoked_at: seconds(r.revocation_date.timestamp()),
            reason_code: r.reason_code().map(|(_, code)| code.0),
        })
        .collect();
    let info = CrlInfo {
        issuer_der: crl.issuer().as_raw().to_vec(),
        issuer: crl.issuer().to_string(),
        key_id,
        number,
        this_update: seconds(crl.last_update().timestamp()),
        next_update: seconds(next_update.timestamp()),
        revoked,
    };
    Ok((crl, info))
}

/// Reads a DER CRL without checking who signed it (for display and for finding its issuer).
pub fn parse_crl(der: &[u8]) -> Result<CrlInfo, CrlError> {
    read(der).map(|(_, info)| info)
}

/// Reads a DER CRL and checks that the CA certificate `issuer_der` issued it: same name, and
/// a signature by its key.
pub fn check_crl(der: &[u8], issuer_der: &[u8]) -> Result<CrlInfo, CrlError> {
    let (crl, info) = read(der)?;
    let (_, issuer) =
        X509Certificate::from_der(issuer_der).map_err(|e| CrlError::BadIssuer(e.to_string()))?;
    if issuer.subject().as_raw() != info.issuer_der.as_slice() {
        return Err(CrlError::WrongIssuer {
            crl: info.issuer,
            ca: issuer.subject().to_string(),
        });
    }
    crl.verify_signature(issuer.public_key())
        .map_err(|_| CrlError::BadSignature(issuer.subject().to_string()))?;
    Ok(info)
}

/// The subject name of a DER certificate as DER, if it parses: what a CRL's issuer must equal.
pub fn subject_der(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    Some(cert.subject().as_raw().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::generate_root;
    use crate::spiffe::TrustDomain;

    fn root(name: &str) -> SigningCa {
        let td = TrustDomain::new("example.org").unwrap();
        generate_root(&td, Duration::from_secs(3600), SystemTime::now(), 0, name)
            .unwrap()
            .0
    }

    #[test]
    fn a_signed_crl_reads_back_with_its_entries_and_checks_against_its_ca() {
        let ca = root("crl test CA");
        let now = SystemTime::now();
        let entries = [
            Revoked {
                serial: vec![0x41, 0x02, 0x03],
                revoked_at: now,
                reason: RevocationReason::EntryRemoved,
            },
            Revoked {
                serial: vec![0x7f; 16],
                revoked_at: now,
                reason: RevocationReason::Operator,
            },
        ];
        let der = sign_crl(&ca, 7, now, &entries).unwrap();
        let info = check_crl(&der, &ca.certificate).unwrap();
        assert_eq!(info.number, 7);
        assert_eq!(info.revoked.len(), 2);
        assert_eq!(info.find("410203").unwrap().reason_code, Some(5));
        // RFC 5280 wants "unspecified" left out rather than written.
        assert_eq!(info.find(&"7f".repeat(16)).unwrap().reason_code, None);
        assert_eq!(
            info.next_update.duration_since(info.this_update).unwrap(),
            CRL_LIFETIME
        );
        assert!(info.key_id.is_some());
    }

    #[test]
    fn a_crl_is_refused_against_another_ca_and_when_damaged() {
        let ca = root("crl test CA");
        let other = root("another CA");
        let der = sign_crl(&ca, 1, SystemTime::now(), &[]).unwrap();
        assert!(matches!(
            check_crl(&der, &other.certificate),
            Err(CrlError::WrongIssuer { .. })
        ));
        // The last bytes are inside the signature's s value: still DER, no longer a signature.
        let mut damaged = der.clone();
        let last = damaged.len() - 3;
        damaged[last] ^= 0xff;
        assert!(matches!(
            check_crl(&damaged, &ca.certificate),
            Err(CrlError::BadSignature(_))
        ));
        assert!(matches!(
            parse_crl(&der[..der.len() / 2]),
            Err(CrlError::Malformed(_))
        ));
        assert!(parse_crl(b"").is_err());
    }
}
