//! The standalone agent's own CA: a self-signed P-256 root created once and kept in the state
//! directory (key file 0600), or an operator's CA given as PEM files.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use x509_parser::prelude::*;
use zeroize::Zeroizing;

use super::{BACKDATE, CaError, SigningCa, certificates_from_pem, random_serial, whole_seconds};
use crate::spiffe::TrustDomain;

const CERT_FILE: &str = "ca_cert.pem";
const KEY_FILE: &str = "ca_key.pem";
/// Every root workloads should trust: the current CA, the prepared next one, and earlier ones
/// still valid, so that SVIDs verify across a renewal on both sides of it.
const BUNDLE_FILE: &str = "bundle.pem";
/// The next CA, published in the bundle at half of the current one's life and used for signing
/// from 80%, so that verifiers learn its root before any SVID depends on it.
const NEXT_CERT_FILE: &str = "next_ca_cert.pem";
const NEXT_KEY_FILE: &str = "next_ca_key.pem";

/// What the renewal of a CA needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalStep {
    /// Create the next CA and publish its root (from half of the current CA's life).
    Prepare,
    /// Sign with the prepared CA from now on (from 80%).
    Activate,
    /// An operator's CA: the operator replaces it (warned about from 80%).
    OperatorRenews,
}

/// The next renewal step for `current` and when it is due.
pub fn next_renewal_step(source: &LocalCaSource, current: &SigningCa) -> (RenewalStep, SystemTime) {
    match source {
        LocalCaSource::Files { .. } => (RenewalStep::OperatorRenews, current.renewal_time()),
        LocalCaSource::Generated { state_dir, .. } => {
            if state_dir.join(NEXT_CERT_FILE).exists() {
                (RenewalStep::Activate, current.renewal_time())
            } else {
                (RenewalStep::Prepare, current.prepare_time())
            }
        }
    }
}

/// Where the standalone signing CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalCaSource {
    /// Created on first start and kept as `ca_cert.pem`/`ca_key.pem` in this directory.
    Generated {
        /// The agent's state directory.
        state_dir: PathBuf,
        /// Lifetime of a newly created CA.
        ttl: Duration,
    },
    /// An operator-provided CA certificate and PKCS#8 key, both PEM.
    Files {
        /// The CA certificate.
        cert: PathBuf,
        /// Its private key.
        key: PathBuf,
    },
}

/// Loads the standalone CA, creating and persisting one when the state directory has none or the
/// one it has is past 80% of its life.
pub fn load_or_create_local_ca(
    source: &LocalCaSource,
    trust_domain: &TrustDomain,
) -> Result<SigningCa, CaError> {
    match source {
        LocalCaSource::Files { cert, key } => {
            load_ca_files(cert, key, trust_domain, Expired::Refuse)
        }
        LocalCaSource::Generated { state_dir, ttl } => {
            let cert_path = state_dir.join(CERT_FILE);
            let key_path = state_dir.join(KEY_FILE);
            if !cert_path.exists() {
                return create_generated(state_dir, *ttl, trust_domain, Vec::new());
            }
            let bundle_file = state_dir.join(BUNDLE_FILE);
            let mut ca = match load_ca_files(&cert_path, &key_path, trust_domain, Expired::Allow) {
                Ok(ca) => ca,
                // The agent owns this CA: if a crash left its key and certificate apart (or
                // either unreadable as a CA), make a new one, as on first start.
                Err(e @ CaError::BadFile { .. }) => {
                    tracing::warn!(error = %e, "standalone CA is unusable; creating a new one");
                    let earlier = earlier_roots(&bundle_file, &[]);
                    return create_generated(state_dir, *ttl, trust_domain, earlier);
                }
                Err(e) => return Err(e),
            };
            ca.bundle.extend(earlier_roots(&bundle_file, &ca.bundle[0]));
            if nearly_expired(&ca, SystemTime::now()) {
                tracing::warn!(
                    cert = %cert_path.display(),
                    not_after = %humantime::format_rfc3339(ca.not_after),
                    "standalone CA is past 80% of its lifetime; creating a new one"
                );
                return activate_next(state_dir, *ttl, trust_domain, ca.bundle);
            }
            Ok(ca)
        }
    }
}

/// Carries out `step` for a generated CA and returns the CA to publish: after `Prepare` the same
/// signing CA with the next root added to its bundle; after `Activate` the next CA, whose bundle
/// keeps the old root. `None` for an operator's CA.
pub fn renew_local_ca(
    source: &LocalCaSource,
    trust_domain: &TrustDomain,
    current: &SigningCa,
    step: RenewalStep,
) -> Result<Option<SigningCa>, CaError> {
    let LocalCaSource::Generated { state_dir, ttl } = source else {
        return Ok(None);
    };
    match step {
        RenewalStep::OperatorRenews => Ok(None),
        RenewalStep::Prepare => {
            let (next, cert_pem, key_pem) =
                generate_self_signed(trust_domain, *ttl, SystemTime::now())?;
            write_atomically(&state_dir.join(NEXT_KEY_FILE), key_pem.as_bytes(), 0o600)?;
            write_atomically(&state_dir.join(NEXT_CERT_FILE), cert_pem.as_bytes(), 0o644)?;
            let mut bundle = current.bundle.clone();
            bundle.insert(1.min(bundle.len()), next.bundle[0].clone());
            write_bundle(state_dir, &bundle)?;
            let mut republished = load_ca_files(
                &state_dir.join(CERT_FILE),
                &state_dir.join(KEY_FILE),
                trust_domain,
                Expired::Allow,
            )?;
            republished.bundle = bundle;
            tracing::info!(
                next_not_after = %humantime::format_rfc3339(next.not_after),
                "prepared the next standalone CA; its root is now in the bundle"
            );
            Ok(Some(republished))
        }
        RenewalStep::Activate => {
            activate_next(state_dir, *ttl, trust_domain, current.bundle.clone()).map(Some)
        }
    }
}

/// Makes the prepared next CA the signing one (or, if none was prepared, creates one).
fn activate_next(
    state_dir: &Path,
    ttl: Duration,
    trust_domain: &TrustDomain,
    earlier: Vec<Vec<u8>>,
) -> Result<SigningCa, CaError> {
    let next_cert = state_dir.join(NEXT_CERT_FILE);
    let next_key = state_dir.join(NEXT_KEY_FILE);
    let prepared = next_cert.exists()
        && load_ca_files(&next_cert, &next_key, trust_domain, Expired::Refuse).is_ok();
    if !prepared {
        let _ = fs::remove_file(&next_cert);
        let _ = fs::remove_file(&next_key);
        return create_generated(state_dir, ttl, trust_domain, earlier);
    }
    let read = |path: &Path| fs::read(path).map_err(|source| io_error(path, source));
    let (cert_pem, key_pem) = (read(&next_cert)?, zeroize::Zeroizing::new(read(&next_key)?));
    write_atomically(&state_dir.join(KEY_FILE), &key_pem, 0o600)?;
    write_atomically(&state_dir.join(CERT_FILE), &cert_pem, 0o644)?;
    let mut ca = load_ca_files(
        &state_dir.join(CERT_FILE),
        &state_dir.join(KEY_FILE),
        trust_domain,
        Expired::Refuse,
    )?;
    let now = SystemTime::now();
    let active = ca.bundle[0].clone();
    ca.bundle.extend(
        earlier
            .into_iter()
            .filter(|der| *der != active && still_valid(der, now)),
    );
    write_bundle(state_dir, &ca.bundle)?;
    let _ = fs::remove_file(&next_cert);
    let _ = fs::remove_file(&next_key);
    tracing::info!(
        not_after = %humantime::format_rfc3339(ca.not_after),
        roots_in_bundle = ca.bundle.len(),
        "the prepared standalone CA now signs"
    );
    Ok(ca)
}

fn write_bundle(state_dir: &Path, bundle: &[Vec<u8>]) -> Result<(), CaError> {
    let bundle_pem = super::to_pem("CERTIFICATE", bundle);
    write_atomically(&state_dir.join(BUNDLE_FILE), bundle_pem.as_bytes(), 0o644)
}

fn create_generated(
    state_dir: &Path,
    ttl: Duration,
    trust_domain: &TrustDomain,
    earlier: Vec<Vec<u8>>,
) -> Result<SigningCa, CaError> {
    let now = SystemTime::now();
    let (mut ca, cert_pem, key_pem) = generate_self_signed(trust_domain, ttl, now)?;
    ca.bundle
        .extend(earlier.into_iter().filter(|der| still_valid(der, now)));
    fs::create_dir_all(state_dir).map_err(|source| io_error(state_dir, source))?;
    write_bundle(state_dir, &ca.bundle)?;
    write_atomically(&state_dir.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
    write_atomically(&state_dir.join(CERT_FILE), cert_pem.as_bytes(), 0o644)?;
    tracing::info!(
        cert = %state_dir.join(CERT_FILE).display(),
        not_after = %humantime::format_rfc3339(ca.not_after),
        roots_in_bundle = ca.bundle.len(),
        "created standalone CA"
    );
    Ok(ca)
}

/// Roots from an earlier bundle file that are still valid, other than `current`.
fn earlier_roots(bundle_file: &Path, current: &[u8]) -> Vec<Vec<u8>> {
    let Ok(text) = fs::read_to_string(bundle_file) else {
        return Vec::new();
    };
    let now = SystemTime::now();
    certificates_from_pem(&text)
        .unwrap_or_default()
        .into_iter()
        .filter(|der| der.as_slice() != current && still_valid(der, now))
        .collect()
}

fn still_valid(der: &[u8], now: SystemTime) -> bool {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    X509Certificate::from_der(der)
        .is_ok_and(|(_, cert)| cert.validity().not_after.timestamp() > now)
}

fn nearly_expired(ca: &SigningCa, now: SystemTime) -> bool {
    now >= ca.renewal_time()
}

/// Creates a self-signed CA for `trust_domain`: returns it with its certificate and key as PEM.
pub(crate) fn generate_self_signed(
    trust_domain: &TrustDomain,
    ttl: Duration,
    now: SystemTime,
) -> Result<(SigningCa, String, Zeroizing<String>), CaError> {
    // The standalone root signs leaves directly: no CA may sit below it.
    let name = format!("tessera standalone CA {trust_domain}");
    generate_root(trust_domain, ttl, now, 0, &name)
}

/// Creates a self-signed root allowing `path_len` CAs below it, named `common_name`.
pub(crate) fn generate_root(
    trust_domain: &TrustDomain,
    ttl: Duration,
    now: SystemTime,
    path_len: u8,
    common_name: &str,
) -> Result<(SigningCa, String, Zeroizing<String>), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let serial = random_serial()?;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let not_before = whole_seconds(now - BACKDATE);
    params.not_before = not_before.into();
    let not_after = whole_seconds(now + ttl);
    params.not_after = not_after.into();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "tessera");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    super::name_by_serial(&mut params.distinguished_name, &serial);
    params.subject_alt_names = vec![SanType::URI(trust_domain.id_string().try_into()?)];

    let cert = params.self_signed(&key)?;
    let cert_pem = cert.pem();
    let key_pem = Zeroizing::new(key.serialize_pem());
    let ca = SigningCa {
        issuer: Issuer::new(params, key),
        intermediates: Vec::new(),
        bundle: vec![cert.der().to_vec()],
        certificate: cert.der().to_vec(),
        not_before,
        not_after,
    };
    Ok((ca, cert_pem, key_pem))
}

/// Whether loading accepts an expired certificate (a generated CA is then replaced).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    Allow,
    Refuse,
}

pub(crate) fn load_ca_files(
    cert_path: &Path,
    key_path: &Path,
    trust_domain: &TrustDomain,
    expired: Expired,
) -> Result<SigningCa, CaError> {
    let bad = |path: &Path, reason: String| CaError::BadFile {
        path: path.display().to_string(),
        reason,
    };
    let cert_pem = fs::read_to_string(cert_path).map_err(|e| io_error(cert_path, e))?;
    let key_pem = Zeroizing::new(fs::read_to_string(key_path).map_err(|e| io_error(key_path, e))?);
    if let Ok(meta) = fs::metadata(key_path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            key = %key_path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "CA key file is readable by group or others; it should be 0600"
        );
    }

    let cert_der = certificates_from_pem(&cert_pem)
        .map_err(|e| bad(cert_path, format!("not PEM: {e}")))?
        .into_iter()
        .next()
        .ok_or_else(|| bad(cert_path, "holds no CERTIFICATE block".into()))?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| bad(key_path, format!("not a PEM PKCS#8 private key ({e})")))?;

    let (_, cert) = X509Certificate::from_der(&cert_der)
        .map_err(|e| bad(cert_path, format!("not an X.509 certificate: {e}")))?;
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    if !is_ca {
        return Err(bad(
            cert_path,
            "is not a CA certificate (BasicConstraints cA=true is required)".into(),
        ));
    }
    let can_sign = matches!(cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign());
    if !can_sign {
        return Err(bad(
            cert_path,
            "lacks the keyCertSign key usage a signing CA needs".into(),
        ));
    }
    if cert.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
        return Err(bad(
            key_path,
            format!("does not match the public key of {}", cert_path.display()),
        ));
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let want = trust_domain.id_string();
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && *uri != want
            {
                return Err(bad(
                    cert_path,
                    format!(
                        "has URI SAN {uri:?}, but a CA for this trust domain must have {want:?} or none"
                    ),
                ));
            }
        }
    }
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    let not_before = SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_before.timestamp().max(0) as u64);
    if expired == Expired::Refuse && not_after <= SystemTime::now() {
        return Err(bad(
            cert_path,
            format!("expired at {}", humantime::format_rfc3339(not_after)),
        ));
    }
    let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
        .map_err(|e| bad(cert_path, format!("cannot be used as an issuer: {e}")))?;
    Ok(SigningCa {
        issuer,
        intermediates: Vec::new(),
        bundle: vec![cert_der.clone()],
        certificate: cert_der,
        not_before,
        not_after,
    })
}

pub(crate) fn io_error(path: &Path, source: std::io::Error) -> CaError {
    CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Replaces `path` with `bytes` (created with `mode`) so that a crash never leaves a
/// half-written key or certificate, and the new one survives a power loss once this returns
/// (see [`crate::durable`]).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    crate::durable::write_atomically(path, bytes, mode).map_err(|e| io_error(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn created_once_then_reloaded_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let source = LocalCaSource::Generated {
            state_dir: dir.path().join("state"),
            ttl: Duration::from_secs(86400),
        };
        let first = load_or_create_local_ca(&source, &td()).unwrap();
        let mode = fs::metadata(dir.path().join("state").join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = load_or_create_local_ca(&source, &td()).unwrap();
        assert_eq!(first.bundle, second.bundle);
    }

    #[test]
    fn rejects_mismatched_key_and_foreign_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let (_, cert_pem, _) =
            generate_self_signed(&td(), Duration::from_secs(3600), SystemTime::now()).unwrap();
        let (_, _, other_key) =
            generate_self_signed(&td(), Duration::from_secs(3600), SystemTime::now()).unwrap();
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("key.pem");
        fs::write(&cert, &cert_pem).unwrap();
        fs::write(&key, other_key.as_bytes()).unwrap();
        let err = load_ca_files(&cert, &key, &td(), Expired::Refuse)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match the public key"), "{err}");

        let (_, cert_pem, key_pem) =
            generate_self_signed(&td(), Duration::from_secs(3600), SystemTime::now()).unwrap();
        fs::write(&cert, &cert_pem).unwrap();
        fs::write(&key, key_pem.as_bytes()).unwrap();
        let other_td = TrustDomain::new("other.org").unwrap();
        let err = load_ca_files(&cert, &key, &other_td, Expired::Refuse)
            .unwrap_err()
            .to_string();
        assert!(err.contains("spiffe://other.org"), "{err}");
        assert!(load_ca_files(&cert, &key, &td(), Expired::Refuse).is_ok());
    }

    #[test]
    fn renewal_publishes_the_next_root_before_signing_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let source = LocalCaSource::Generated {
            state_dir: dir.path().into(),
            ttl: Duration::from_secs(86400),
        };
        let first = load_or_create_local_ca(&source, &td()).unwrap();
        let (step, due) = next_renewal_step(&source, &first);
        assert_eq!(step, RenewalStep::Prepare);
        assert_eq!(due, first.prepare_time());

        // Prepared: same signer, next root already trusted.
        let prepared = renew_local_ca(&source, &td(), &first, step)
            .unwrap()
            .unwrap();
        assert_eq!(prepared.bundle.len(), 2);
        assert_eq!(
            prepared.bundle[0], first.bundle[0],
            "still signing with the first CA"
        );
        let next_root = prepared.bundle[1].clone();
        let (step, due) = next_renewal_step(&source, &prepared);
        assert_eq!(
            (step, due),
            (RenewalStep::Activate, prepared.renewal_time())
        );
        let restarted = load_or_create_local_ca(&source, &td()).unwrap();
        assert_eq!(
            restarted.bundle, prepared.bundle,
            "a restart keeps the prepared root"
        );

        // Activated: the prepared CA signs, the first root stays trusted.
        let active = renew_local_ca(&source, &td(), &prepared, step)
            .unwrap()
            .unwrap();
        assert_eq!(active.bundle[0], next_root);
        assert!(active.bundle.contains(&first.bundle[0]));
        assert_eq!(active.bundle.len(), 2);
        assert_eq!(next_renewal_step(&source, &active).0, RenewalStep::Prepare);
        let reloaded = load_or_create_local_ca(&source, &td()).unwrap();
        assert_eq!(reloaded.bundle, active.bundle);

        let files = LocalCaSource::Files {
            cert: "/c".into(),
            key: "/k".into(),
        };
        assert_eq!(
            next_renewal_step(&files, &active).0,
            RenewalStep::OperatorRenews
        );
        assert!(
            renew_local_ca(&files, &td(), &active, RenewalStep::Prepare)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_generated_ca_left_unusable_is_replaced_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let source = LocalCaSource::Generated {
            state_dir: dir.path().into(),
            ttl: Duration::from_secs(86400),
        };
        let first = load_or_create_local_ca(&source, &td()).unwrap();
        // A crash between the two renames of a renewal: a new key beside the old certificate.
        let (_, _, other_key) =
            generate_self_signed(&td(), Duration::from_secs(3600), SystemTime::now()).unwrap();
        fs::write(dir.path().join(KEY_FILE), other_key.as_bytes()).unwrap();
        let recovered = load_or_create_local_ca(&source, &td()).unwrap();
        assert_ne!(recovered.bundle[0], first.bundle[0]);
        assert!(
            recovered.bundle.contains(&first.bundle[0]),
            "the old root is still trusted"
        );

        // Expired while the agent was down: replaced, not refused.
        let (_, expired_cert, expired_key) = generate_self_signed(
            &td(),
            Duration::from_secs(3600),
            SystemTime::now() - Duration::from_secs(7200),
        )
        .unwrap();
        fs::write(dir.path().join(CERT_FILE), expired_cert).unwrap();
        fs::write(dir.path().join(KEY_FILE), expired_key.as_bytes()).unwrap();
        let fresh = load_or_create_local_ca(&source, &td()).unwrap();
        assert!(fresh.not_after > SystemTime::now());
    }

    #[test]
    fn replaces_a_nearly_expired_ca() {
        let (ca, _, _) =
            generate_self_signed(&td(), Duration::from_secs(1000), SystemTime::now()).unwrap();
        assert!(!nearly_expired(&ca, SystemTime::now()));
        assert!(nearly_expired(
            &ca,
            SystemTime::now() + Duration::from_secs(900)
        ));
    }
}
