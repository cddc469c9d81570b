//! X509-SVID leaf minting, exactly per the X509-SVID standard §3–4.

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use zeroize::Zeroizing;

use super::task::{TASK_EXTENSION_OID, TaskClaims};
use super::{BACKDATE, CaError, SigningCa, random_serial, whole_seconds};
use crate::spiffe::SpiffeId;

/// What to mint.
#[derive(Debug, Clone)]
pub struct LeafRequest<'a> {
    /// The identity; must have a path.
    pub spiffe_id: &'a SpiffeId,
    /// Requested lifetime from now.
    pub ttl: Duration,
    /// Optional DNS SANs; the first also becomes the subject CN.
    pub dns_names: &'a [String],
    /// An extra upper bound on not-after (e.g. the registration's own expiry).
    pub not_after_cap: Option<SystemTime>,
    /// For a task SVID: the task it names, carried in the task extension.
    pub task: Option<&'a TaskClaims>,
}

/// A minted X509-SVID. The private key is zeroized on drop and never printed.
pub struct X509Svid {
    /// The identity in the leaf's single URI SAN.
    pub spiffe_id: SpiffeId,
    /// DER chain, leaf first, then the signing CA's intermediates.
    pub chain_der: Vec<Vec<u8>>,
    /// Unencrypted PKCS#8 DER private key of the leaf.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// Serial number as lowercase hex.
    pub serial_hex: String,
    /// Start of validity (back-dated a little).
    pub not_before: SystemTime,
    /// When it was minted; its usable lifetime runs from here to `not_after`.
    pub issued_at: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id.as_str())
            .field("serial", &self.serial_hex)
            .field("not_after", &humantime::format_rfc3339(self.not_after))
            .field("key_pkcs8", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl X509Svid {
    /// The chain as the Workload API carries it: DER certificates concatenated, leaf first.
    pub fn chain_concat(&self) -> Vec<u8> {
        self.chain_der.concat()
    }

    /// The usable lifetime: from minting to not-after.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.issued_at)
            .unwrap_or_default()
    }
}

/// Mints a fresh P-256 key and a leaf for it under `ca`, valid from a little before `now` until
/// the earliest of `now + ttl`, the CA's not-after and the request's cap.
pub fn mint_x509_svid(
    ca: &SigningCa,
    request: &LeafRequest<'_>,
    now: SystemTime,
) -> Result<X509Svid, CaError> {
    let not_before = whole_seconds(now - BACKDATE);
    let mut not_after = whole_seconds(now + request.ttl).min(whole_seconds(ca.not_after));
    if let Some(cap) = request.not_after_cap {
        not_after = not_after.min(whole_seconds(cap));
    }
    if not_after <= whole_seconds(now) {
        return Err(CaError::NoValidityLeft(humantime::format_rfc3339(
            not_after,
        )));
    }

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let serial = random_serial()?;

    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tessera");
    // RFC 5280 caps a CN at 64 characters; longer names stay in the SAN only.
    if let Some(first_dns) = request.dns_names.first().filter(|d| d.len() <= 64) {
        params
            .distinguished_name
            .push(DnType::CommonName, first_dns.as_str());
    }
    params.subject_alt_names = vec![SanType::URI(
        request
            .spiffe_id
            .as_str()
            .try_into()
            .map_err(CaError::Signing)?,
    )];
    for dns in request.dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(dns.as_str().try_into()?));
    }

    if let Some(task) = request.task {
        // Non-critical (rcgen's default): a relying party that does not know it still accepts
        // the certificate on its SPIFFE ID.
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                TASK_EXTENSION_OID,
                task.to_extension_value(),
            ));
    }

    let leaf = params.signed_by(&key, &ca.issuer)?;
    let mut chain_der = Vec::with_capacity(1 + ca.intermediates.len());
    chain_der.push(leaf.der().to_vec());
    chain_der.extend(ca.intermediates.iter().cloned());

    Ok(X509Svid {
        spiffe_id: request.spiffe_id.clone(),
        chain_der,
        key_pkcs8: Zeroizing::new(key.serialize_der()),
        serial_hex: hex::encode(serial),
        not_before,
        issued_at: now,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::local::generate_self_signed;
    use crate::spiffe::TrustDomain;
    use x509_parser::prelude::*;

    fn test_ca() -> SigningCa {
        let td = TrustDomain::new("example.org").unwrap();
        generate_self_signed(&td, Duration::from_secs(3600), SystemTime::now())
            .unwrap()
            .0
    }

    #[test]
    fn leaf_follows_the_x509_svid_rules() {
        let ca = test_ca();
        let id = SpiffeId::parse_workload("spiffe://example.org/agent/coder").unwrap();
        let svid = mint_x509_svid(
            &ca,
            &LeafRequest {
                spiffe_id: &id,
                ttl: Duration::from_secs(300),
                dns_names: &[],
                not_after_cap: None,
                task: None,
            },
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(svid.chain_der.len(), 1);
        let (_, cert) = X509Certificate::from_der(&svid.chain_der[0]).unwrap();

        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && !bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);

        let san = cert.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        assert_eq!(uris, vec!["spiffe://example.org/agent/coder"]);

        assert!(cert.tbs_certificate.serial.bits() > 120);
        assert!(!cert.tbs_certificate.raw_serial().is_empty());
        assert_eq!(
            cert.tbs_certificate.raw_serial()[0] & 0x80,
            0,
            "serial is positive"
        );
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 310);

        // The key is PKCS#8 and matches the leaf.
        let key = KeyPair::try_from(svid.key_pkcs8.as_slice()).unwrap();
        assert_eq!(
            rcgen::PublicKeyData::subject_public_key_info(&key),
            cert.tbs_certificate.subject_pki.raw
        );
        // Signed by the CA.
        let (_, ca_cert) = X509Certificate::from_der(&ca.bundle[0]).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        let shown = format!("{svid:?}");
        assert!(shown.contains("key_pkcs8: \"<redacted>\""), "{shown}");
        let key_bytes = format!("{:?}", &svid.key_pkcs8[..]);
        assert!(!shown.contains(&key_bytes[1..20]), "{shown}");
    }

    #[test]
    fn not_after_is_capped_by_ca_and_registration() {
        let ca = test_ca();
        let id = SpiffeId::parse_workload("spiffe://example.org/w").unwrap();
        let now = SystemTime::now();
        let long = mint_x509_svid(
            &ca,
            &LeafRequest {
                spiffe_id: &id,
                ttl: Duration::from_secs(10 * 3600),
                dns_names: &[],
                not_after_cap: None,
                task: None,
            },
            now,
        )
        .unwrap();
        assert_eq!(long.not_after, whole_seconds(ca.not_after));

        let cap = now + Duration::from_secs(60);
        let capped = mint_x509_svid(
            &ca,
            &LeafRequest {
                spiffe_id: &id,
                ttl: Duration::from_secs(300),
                dns_names: &["web.internal".into()],
                not_after_cap: Some(cap),
                task: None,
            },
            now,
        )
        .unwrap();
        assert_eq!(capped.not_after, whole_seconds(cap));

        let expired = mint_x509_svid(
            &ca,
            &LeafRequest {
                spiffe_id: &id,
                ttl: Duration::from_secs(300),
                dns_names: &[],
                not_after_cap: Some(now - Duration::from_secs(1)),
                task: None,
            },
            now,
        );
        assert!(matches!(expired, Err(CaError::NoValidityLeft(_))));
    }
}
