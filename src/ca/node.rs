//! Credentials of a node: what the server signs for an attested agent (its node SVID and its
//! intermediate CA, each for a key the agent generated and sent as a CSR), the server's own TLS
//! certificate, and the agent's side: requests and the signing CA built from a grant.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PublicKeyData, SanType, SerialNumber,
};
use x509_parser::prelude::*;
use zeroize::Zeroizing;

use super::{BACKDATE, CaError, SigningCa, random_serial, whole_seconds};
use crate::spiffe::{SpiffeId, TrustDomain};

/// Prefix of the message an x509pop proof signs.
pub const X509POP_CONTEXT: &[u8] = b"tessera-x509pop-v1";

/// The message an x509pop proof signs: context, the server's nonce, and the SHA-256 digests of
/// both CSRs (node SVID, then CA), so that the proof is bound to these keys. The agent signs it;
/// the server checks the signature.
pub fn x509pop_message(nonce: &[u8], node_svid_csr: &[u8], ca_csr: &[u8]) -> Vec<u8> {
    let sha256 = |bytes: &[u8]| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut message = X509POP_CONTEXT.to_vec();
    message.extend_from_slice(nonce);
    message.extend_from_slice(sha256(node_svid_csr).as_ref());
    message.extend_from_slice(sha256(ca_csr).as_ref());
    message
}

/// A CSR the server will not sign.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The bytes are not a PKCS#10 request, or its signature does not verify.
    #[error("{which} CSR is not a valid, self-signed PKCS#10 request: {reason}")]
    Invalid {
        /// `node SVID` or `CA`.
        which: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// The key is not ECDSA P-256.
    #[error("{which} CSR has a key other than ECDSA P-256, the only kind accepted")]
    UnsupportedKey {
        /// `node SVID` or `CA`.
        which: &'static str,
    },
    /// The request names an identity the node may not have.
    #[error("{which} CSR asks for {name:?}; the node may only have {allowed:?}")]
    ForbiddenName {
        /// `node SVID` or `CA`.
        which: &'static str,
        /// The name asked for.
        name: String,
        /// The only name allowed.
        allowed: String,
    },
    /// The request asks for CA powers beyond a pathLen-0 intermediate, or for a CA where a
    /// leaf is due.
    #[error("{which} CSR asks for {asked}, which the node may not have")]
    ForbiddenCa {
        /// `node SVID` or `CA`.
        which: &'static str,
        /// What was asked.
        asked: &'static str,
    },
    /// Signing failed.
    #[error(transparent)]
    Signing(#[from] CaError),
}

/// A signed certificate with what the datastore records about it.
#[derive(Debug, Clone)]
pub struct Granted {
    /// DER.
    pub der: Vec<u8>,
    /// Lowercase hex serial.
    pub serial_hex: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The SPIFFE ID of node `node_id` in `trust_domain`: `spiffe://<td>/tessera/node/<id>`.
pub fn node_spiffe_id(trust_domain: &TrustDomain, node_id: &str) -> Result<SpiffeId, CaError> {
    let text = format!("{}/tessera/node/{node_id}", trust_domain.id_string());
    SpiffeId::parse(&text).map_err(|source| CaError::InvalidName { name: text, source })
}

/// The SPIFFE ID every server replica of `trust_domain` presents to agents.
pub fn server_spiffe_id(trust_domain: &TrustDomain) -> String {
    format!("{}/tessera/server", trust_domain.id_string())
}

/// The node id in a node SPIFFE ID of `trust_domain`, if it is one.
pub fn node_id_of<'a>(trust_domain: &TrustDomain, spiffe_id: &'a str) -> Option<&'a str> {
    let prefix = format!("{}/tessera/node/", trust_domain.id_string());
    spiffe_id
        .strip_prefix(&prefix)
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// Parses and checks a CSR: signature, key type, and requested names against `allowed_uri`.
/// `want_ca` says whether the certificate to sign is the node's intermediate CA.
fn check_csr(
    which: &'static str,
    der: &[u8],
    allowed_uri: &str,
    want_ca: bool,
) -> Result<CertificateSigningRequestParams, CsrError> {
    let csr = CertificateSigningRequestParams::from_der(&der.to_vec().into()).map_err(|e| {
        CsrError::Invalid {
            which,
            reason: e.to_string(),
        }
    })?;
    if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError::UnsupportedKey { which });
    }
    for san in &csr.params.subject_alt_names {
        let name = match san {
            SanType::URI(uri) => uri.as_str().to_owned(),
            SanType::DnsName(dns) => format!("dns:{}", dns.as_str()),
            other => format!("{other:?}"),
        };
        if name != allowed_uri {
            return Err(CsrError::ForbiddenName {
                which,
                name,
                allowed: allowed_uri.to_owned(),
            });
        }
    }
    match (&csr.params.is_ca, want_ca) {
        (IsCa::Ca(BasicConstraints::Unconstrained), true) => {
            return Err(CsrError::ForbiddenCa {
                which,
                asked: "a CA without a path length limit",
            });
        }
        (IsCa::Ca(BasicConstraints::Constrained(n)), true) if *n > 0 => {
            return Err(CsrError::ForbiddenCa {
                which,
                asked: "a CA that may have CAs below it",
            });
        }
        (IsCa::Ca(_), false) => {
            return Err(CsrError::ForbiddenCa {
                which,
                asked: "a CA certificate",
            });
        }
        _ => {}
    }
    Ok(csr)
}

/// Checks both CSRs of node `node_id` without signing anything.
pub fn check_csrs(
    trust_domain: &TrustDomain,
    node_id: &SpiffeId,
    node_svid_csr: &[u8],
    ca_csr: &[u8],
) -> Result<(), CsrError> {
    check_csr("node SVID", node_svid_csr, node_id.as_str(), false)?;
    check_csr("CA", ca_csr, &trust_domain.id_string(), true)?;
    Ok(())
}

/// Validity from a little before `now` to `now + ttl`, capped by the signer's not-after.
fn validity(
    root: &SigningCa,
    ttl: Duration,
    now: SystemTime,
) -> Result<(SystemTime, SystemTime), CaError> {
    let not_before = whole_seconds(now - BACKDATE);
    let not_after = whole_seconds(now + ttl).min(whole_seconds(root.not_after));
    if not_after <= whole_seconds(now) {
        return Err(CaError::NoValidityLeft(humantime::format_rfc3339(
            not_after,
        )));
    }
    Ok((not_before, not_after))
}

fn sign(
    params: &mut CertificateParams,
    key: &impl PublicKeyData,
    root: &SigningCa,
    ttl: Duration,
    now: SystemTime,
) -> Result<Granted, CaError> {
    let serial = random_serial()?;
    let (not_before, not_after) = validity(root, ttl, now)?;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(key, &root.issuer)?;
    Ok(Granted {
        der: cert.der().to_vec(),
        serial_hex: hex::encode(serial),
        not_after,
    })
}

/// Signs the node SVID for the key in `csr`: a leaf for TLS client authentication whose only
/// URI SAN is the node's SPIFFE ID.
pub fn sign_node_svid(
    root: &SigningCa,
    node_id: &SpiffeId,
    csr: &[u8],
    ttl: Duration,
    now: SystemTime,
) -> Result<Granted, CsrError> {
    let csr = check_csr("node SVID", csr, node_id.as_str(), false)?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tessera");
    params.subject_alt_names = vec![SanType::URI(
        node_id.as_str().try_into().map_err(CaError::Signing)?,
    )];
    Ok(sign(&mut params, &csr.public_key, root, ttl, now)?)
}

/// Signs the node's intermediate CA for the key in `csr`: pathLen 0, the trust domain as its
/// only URI SAN, the node id in its subject.
pub fn sign_node_ca(
    root: &SigningCa,
    trust_domain: &TrustDomain,
    node_id: &str,
    csr: &[u8],
    ttl: Duration,
    now: SystemTime,
) -> Result<Granted, CsrError> {
    let csr = check_csr("CA", csr, &trust_domain.id_string(), true)?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tessera");
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, "node CA");
    params.distinguished_name.push(DnType::CommonName, node_id);
    params.subject_alt_names = vec![SanType::URI(
        trust_domain
            .id_string()
            .try_into()
            .map_err(CaError::Signing)?,
    )];
    Ok(sign(&mut params, &csr.public_key, root, ttl, now)?)
}

/// The server's TLS certificate towards agents: a leaf for `spiffe://<td>/tessera/server`
/// with a fresh key, returned with the key as PKCS#8 DER.
pub fn sign_server_svid(
    root: &SigningCa,
    trust_domain: &TrustDomain,
    ttl: Duration,
    now: SystemTime,
) -> Result<(Granted, Zeroizing<Vec<u8>>), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tessera");
    params.subject_alt_names = vec![SanType::URI(server_spiffe_id(trust_domain).try_into()?)];
    let granted = sign(&mut params, &key, root, ttl, now)?;
    Ok((granted, Zeroizing::new(key.serialize_der())))
}

/// A fresh P-256 key and a CSR for it (no names: the server decides them).
pub fn key_and_csr() -> Result<(KeyPair, Vec<u8>), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// The agent's signing CA from a granted intermediate and its key: leaves chain through the
/// intermediate to one of `bundle`'s roots.
pub fn signing_ca_from_grant(
    ca_der: &[u8],
    key: KeyPair,
    bundle: Vec<Vec<u8>>,
) -> Result<SigningCa, CaError> {
    let bad = |reason: String| CaError::BadFile {
        path: "granted intermediate CA".into(),
        reason,
    };
    let (_, cert) = X509Certificate::from_der(ca_der)
        .map_err(|e| bad(format!("not an X.509 certificate: {e}")))?;
    if cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
        return Err(bad("does not certify this node's CA key".into()));
    }
    let seconds = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let not_before = seconds(cert.validity().not_before.timestamp());
    let not_after = seconds(cert.validity().not_after.timestamp());
    let issuer = Issuer::from_ca_cert_der(&ca_der.to_vec().into(), key)
        .map_err(|e| bad(format!("cannot be used as an issuer: {e}")))?;
    Ok(SigningCa {
        issuer,
        intermediates: vec![ca_der.to_vec()],
        bundle,
        certificate: ca_der.to_vec(),
        not_before,
        not_after,
    })
}

/// Validity end of a DER certificate, if it parses.
pub fn not_after_of(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let t = cert.validity().not_after.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64))
}

/// The URI SANs of a DER certificate (empty if it does not parse).
pub fn uri_sans_of(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::local::generate_root;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn root() -> SigningCa {
        generate_root(
            &td(),
            Duration::from_secs(86400),
            SystemTime::now(),
            1,
            "root",
        )
        .unwrap()
        .0
    }

    #[test]
    fn grants_chain_to_the_root_and_carry_the_right_names() {
        let root = root();
        let now = SystemTime::now();
        let node = node_spiffe_id(&td(), "n1").unwrap();
        let (svid_key, svid_csr) = key_and_csr().unwrap();
        let (ca_key, ca_csr) = key_and_csr().unwrap();
        let svid = sign_node_svid(&root, &node, &svid_csr, Duration::from_secs(600), now).unwrap();
        let ca = sign_node_ca(&root, &td(), "n1", &ca_csr, Duration::from_secs(3600), now).unwrap();
        assert_eq!(uri_sans_of(&svid.der), [node.as_str()]);
        assert_eq!(uri_sans_of(&ca.der), ["spiffe://example.org"]);
        drop(svid_key);
        let signing = signing_ca_from_grant(&ca.der, ca_key, root.bundle.clone()).unwrap();
        let (_, parsed) = X509Certificate::from_der(&ca.der).unwrap();
        let bc = parsed.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        assert!(parsed.subject().to_string().contains("CN=n1"));
        let root_cert = X509Certificate::from_der(&root.bundle[0]).unwrap().1;
        parsed
            .verify_signature(Some(root_cert.public_key()))
            .unwrap();
        let leaf = crate::ca::mint_x509_svid(
            &signing,
            &crate::ca::LeafRequest {
                spiffe_id: &SpiffeId::parse_workload("spiffe://example.org/w").unwrap(),
                ttl: Duration::from_secs(60),
                dns_names: &[],
                not_after_cap: None,
                task: None,
            },
            now,
        )
        .unwrap();
        assert_eq!(leaf.chain_der.len(), 2);
        assert_eq!(node_id_of(&td(), node.as_str()), Some("n1"));
        assert_eq!(
            node_id_of(&td(), "spiffe://example.org/tessera/node/a/b"),
            None
        );
    }

    #[test]
    fn csrs_asking_for_more_are_refused() {
        let root = root();
        let now = SystemTime::now();
        let node = node_spiffe_id(&td(), "n1").unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let csr_for =
            |params: CertificateParams| params.serialize_request(&key).unwrap().der().to_vec();

        let path_bearing = csr_for(
            CertificateParams::new(vec![])
                .map(|mut p| {
                    p.subject_alt_names = vec![SanType::URI(
                        "spiffe://example.org/admin".try_into().unwrap(),
                    )];
                    p
                })
                .unwrap(),
        );
        let err = sign_node_ca(
            &root,
            &td(),
            "n1",
            &path_bearing,
            Duration::from_secs(60),
            now,
        )
        .unwrap_err();
        assert!(matches!(err, CsrError::ForbiddenName { .. }), "{err}");
        assert!(
            err.to_string().contains("spiffe://example.org/admin"),
            "{err}"
        );

        let other_node = csr_for(
            CertificateParams::new(vec![])
                .map(|mut p| {
                    p.subject_alt_names = vec![SanType::URI(
                        "spiffe://example.org/tessera/node/n2".try_into().unwrap(),
                    )];
                    p
                })
                .unwrap(),
        );
        let err =
            sign_node_svid(&root, &node, &other_node, Duration::from_secs(60), now).unwrap_err();
        assert!(matches!(err, CsrError::ForbiddenName { .. }), "{err}");

        let deep_ca = csr_for({
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(2));
            p
        });
        let err =
            sign_node_ca(&root, &td(), "n1", &deep_ca, Duration::from_secs(60), now).unwrap_err();
        assert!(matches!(err, CsrError::ForbiddenCa { .. }), "{err}");

        let err =
            sign_node_svid(&root, &node, b"garbage", Duration::from_secs(60), now).unwrap_err();
        assert!(matches!(err, CsrError::Invalid { .. }), "{err}");
    }

    #[test]
    fn the_x509pop_message_binds_the_nonce_and_both_csrs_in_order() {
        let message = x509pop_message(b"nonce", b"svid csr", b"ca csr");
        assert!(message.starts_with(b"tessera-x509pop-v1nonce"));
        assert_eq!(message.len(), X509POP_CONTEXT.len() + 5 + 32 + 32);
        assert_ne!(message, x509pop_message(b"nonce", b"ca csr", b"svid csr"));
        assert_ne!(message, x509pop_message(b"other", b"svid csr", b"ca csr"));
    }
}
