//! What a relying party checks before it accepts an X.509-SVID: the chain to the trust
//! domain's bundle, the SPIFFE ID, validity at a given time, and revocation in every CRL it
//! was given. Used by `tessera svid verify` and by the mTLS example pair.
//!
//! Revocation is checked for every certificate of the chain (the leaf against its node CA's
//! CRL, the node CA against its root's). An issuer with no CRL among those given passes, as
//! with rustls' `allow_unknown_revocation_status`: the Workload API carries the CRLs of every
//! issuer that has revoked anything. A CRL past its nextUpdate is refused.

use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use webpki::{
    BorrowedCertRevocationList, CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

use crate::ca::crl::{CrlInfo, parse_crl, reason_code_name};
use crate::spiffe::{SpiffeId, TrustDomain};

/// Why a certificate is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// No certificate was given.
    #[error("no certificate to verify")]
    Empty,
    /// The leaf is not an X.509-SVID (no single SPIFFE ID URI SAN, or not parseable).
    #[error("not an X.509-SVID: {0}")]
    NotAnSvid(String),
    /// The SVID belongs to another trust domain than the bundle's.
    #[error("{id} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// The SVID's SPIFFE ID.
        id: String,
        /// The bundle's trust domain.
        expected: String,
    },
    /// The certificate was revoked.
    #[error("revoked: serial {serial}, reason {reason}, at {revoked_at} (CRL of {issuer})")]
    Revoked {
        /// Lowercase hex serial of the revoked certificate (the leaf or a CA above it).
        serial: String,
        /// The CRL entry's reason code, by name.
        reason: &'static str,
        /// When it was revoked, RFC 3339.
        revoked_at: String,
        /// The CRL's issuer.
        issuer: String,
    },
    /// The certificate expired or is not valid yet.
    #[error("not valid at {at}: {detail}")]
    Validity {
        /// The time of the check, RFC 3339.
        at: String,
        /// What the verifier said.
        detail: String,
    },
    /// A CRL given was unreadable.
    #[error("CRL {index}: {detail}")]
    BadCrl {
        /// Its position among those given, from 0.
        index: usize,
        /// What is wrong with it.
        detail: String,
    },
    /// The chain does not lead to the bundle, or some other check failed.
    #[error("{0}")]
    Untrusted(String),
}

/// An accepted SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Lowercase hex serial of the leaf.
    pub serial: String,
    /// The leaf's not-after.
    pub not_after: SystemTime,
}

/// Whether a certificate is checked as a server's or as a client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// TLS server authentication.
    Server,
    /// TLS client authentication.
    Client,
}

/// Verifies `chain` (leaf first, then intermediates) for `usage` at `now` against the trust
/// domain's `bundle` (DER roots) and `crls` (DER).
pub fn verify_svid(
    chain: &[Vec<u8>],
    bundle: &[Vec<u8>],
    crls: &[Vec<u8>],
    usage: Usage,
    now: SystemTime,
) -> Result<Verified, Rejection> {
    let leaf = chain.first().ok_or(Rejection::Empty)?;
    let (spiffe_id, serial, not_after) = svid_facts(leaf)?;
    let trust_domain = bundle_trust_domain(bundle);
    if let Some(expected) = &trust_domain
        && spiffe_id.trust_domain() != *expected
    {
        return Err(Rejection::WrongTrustDomain {
            id: spiffe_id.to_string(),
            expected: expected.to_string(),
        });
    }
    let anchors: Vec<_> = bundle
        .iter()
        .filter_map(|der| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                .ok()
                .map(|a| a.to_owned())
        })
        .collect();
    if anchors.is_empty() {
        return Err(Rejection::Untrusted(
            "the bundle holds no usable root".into(),
        ));
    }
    let crl_ders: Vec<CertificateRevocationListDer<'_>> = crls
        .iter()
        .map(|der| CertificateRevocationListDer::from(der.as_slice()))
        .collect();
    let mut parsed = Vec::with_capacity(crls.len());
    for (index, der) in crl_ders.iter().enumerate() {
        let crl = BorrowedCertRevocationList::from_der(der).map_err(|e| Rejection::BadCrl {
            index,
            detail: format!("{e:?}"),
        })?;
        parsed.push(CertRevocationList::from(crl));
    }
    let refs: Vec<&CertRevocationList<'_>> = parsed.iter().collect();
    let revocation = RevocationOptionsBuilder::new(&refs).ok().map(|builder| {
        builder
            .with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(UnknownStatusPolicy::Allow)
            .with_expiration_policy(ExpirationPolicy::Enforce)
            .build()
    });
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let end_entity =
        EndEntityCert::try_from(&leaf_der).map_err(|e| Rejection::NotAnSvid(format!("{e:?}")))?;
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    let seconds = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let key_usage = match usage {
        Usage::Server => KeyUsage::server_auth(),
        Usage::Client => KeyUsage::client_auth(),
    };
    let outcome = end_entity.verify_for_usage(
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all,
        &anchors,
        &intermediates,
        UnixTime::since_unix_epoch(Duration::from_secs(seconds)),
        key_usage,
        revocation,
        None,
    );
    match outcome {
        Ok(_) => Ok(Verified {
            spiffe_id,
            serial,
            not_after,
        }),
        Err(webpki::Error::CertRevoked) => Err(revoked_in(chain, crls)),
        Err(e @ (webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. })) => {
            Err(Rejection::Validity {
                at: humantime::format_rfc3339_seconds(now).to_string(),
                detail: format!("{e:?}"),
            })
        }
        Err(e) => Err(Rejection::Untrusted(format!("{e:?}"))),
    }
}

/// The SPIFFE ID, serial and not-after of an X.509-SVID leaf.
fn svid_facts(leaf: &[u8]) -> Result<(SpiffeId, String, SystemTime), Rejection> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| Rejection::NotAnSvid(e.to_string()))?;
    let uris = crate::ca::node::uri_sans_of(leaf);
    let [uri] = uris.as_slice() else {
        return Err(Rejection::NotAnSvid(format!(
            "{} URI SANs, an X.509-SVID has exactly one",
            uris.len()
        )));
    };
    let spiffe_id =
        SpiffeId::parse_workload(uri).map_err(|e| Rejection::NotAnSvid(e.to_string()))?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    Ok((
        spiffe_id,
        hex::encode(cert.tbs_certificate.raw_serial()),
        not_after,
    ))
}

/// The trust domain the bundle's roots name in their URI SAN, if they name one.
fn bundle_trust_domain(bundle: &[Vec<u8>]) -> Option<TrustDomain> {
    bundle.iter().find_map(|der| {
        let uris = crate::ca::node::uri_sans_of(der);
        let uri = uris.first()?;
        TrustDomain::new(uri.strip_prefix("spiffe://")?).ok()
    })
}

/// The CRL entry that revoked a certificate of `chain`, for the message.
fn revoked_in(chain: &[Vec<u8>], crls: &[Vec<u8>]) -> Rejection {
    let infos: Vec<CrlInfo> = crls.iter().filter_map(|der| parse_crl(der).ok()).collect();
    for cert in chain {
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
            continue;
        };
        let serial = hex::encode(parsed.tbs_certificate.raw_serial());
        let issuer = parsed.issuer().as_raw();
        if let Some((info, entry)) = infos
            .iter()
            .filter(|info| info.issuer_der == issuer)
            .find_map(|info| info.find(&serial).map(|entry| (info, entry)))
        {
            return Rejection::Revoked {
                serial,
                reason: entry.reason_code.map_or("unspecified", reason_code_name),
                revoked_at: humantime::format_rfc3339_seconds(entry.revoked_at).to_string(),
                issuer: info.issuer.clone(),
            };
        }
    }
    Rejection::Untrusted("revoked, by a CRL entry that could not be read back".into())
}
