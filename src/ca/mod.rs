//! Certificate authority work shared by agent and (later) server: the signing authority a
//! leaf is minted under, X509-SVID minting, and the standalone self-signed CA.

pub mod crl;
mod leaf;
mod local;
pub mod node;
pub mod task;

pub use leaf::{LeafRequest, X509Svid, mint_x509_svid};
pub(crate) use local::{Expired, generate_root, io_error, load_ca_files, write_atomically};
pub use local::{
    LocalCaSource, RenewalStep, load_or_create_local_ca, next_renewal_step, renew_local_ca,
};

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{Issuer, KeyPair};

/// Every certificate this code signs starts this long before it was made (its not-before is
/// back-dated), so that a relying party whose clock lags a little accepts it at once: X509-SVIDs,
/// node SVIDs and intermediates, the server's certificate and roots. The node API relies on it
/// too, to tell when a node SVID was really issued.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Errors from minting and from loading or creating a CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The crypto library refused to generate a key or sign.
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
    /// The leaf's validity would already be over: the signing CA or the registration expired.
    #[error(
        "validity would end at {0}, which is not in the future (the CA or the registration has expired)"
    )]
    NoValidityLeft(humantime::Rfc3339Timestamp),
    /// A CA or key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A name to be certified is not a valid SPIFFE ID.
    #[error("invalid name: {name}: {source}")]
    InvalidName {
        /// The name as built.
        name: String,
        /// What the SPIFFE ID parser refused.
        #[source]
        source: crate::spiffe::IdError,
    },
    /// A CA certificate or key file does not hold what it should.
    #[error("{path}: {reason}")]
    BadFile {
        /// The file involved.
        path: String,
        /// What is wrong and what would be right.
        reason: String,
    },
}

/// The CA that signs this agent's leaves, with what clients need to build and check chains.
///
/// Published whole through a `watch` channel: a new value means a new CA (and so a new bundle),
/// and every SVID minted under the old one must be replaced.
pub struct SigningCa {
    /// Signs leaves. Holds the CA's private key for as long as this CA is current.
    pub issuer: Issuer<'static, KeyPair>,
    /// DER of the CA certificates sent after the leaf, in order (empty for a root that signs
    /// leaves directly; the node intermediate once an upstream server grants one).
    pub intermediates: Vec<Vec<u8>>,
    /// DER of every trust anchor of the trust domain: the bundle handed to workloads.
    pub bundle: Vec<Vec<u8>>,
    /// DER of this CA's own certificate (the root itself, or the node intermediate): what its
    /// CRLs are checked against.
    pub certificate: Vec<u8>,
    /// The signing certificate's own not-before.
    pub not_before: SystemTime,
    /// The signing certificate's own not-after; no leaf outlives it.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCa")
            .field("intermediates", &self.intermediates.len())
            .field("bundle", &self.bundle.len())
            .field("not_after", &humantime::format_rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

impl SigningCa {
    /// The bundle as the Workload API carries it: the DER certificates concatenated.
    pub fn bundle_der(&self) -> Vec<u8> {
        self.bundle.concat()
    }

    /// When the next CA should be prepared and its root published: at half of this one's life.
    pub fn prepare_time(&self) -> SystemTime {
        self.at_fraction_of_life(0.5)
    }

    /// When this CA should be replaced: at 80% of its lifetime.
    pub fn renewal_time(&self) -> SystemTime {
        self.at_fraction_of_life(0.8)
    }

    fn at_fraction_of_life(&self, fraction: f64) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life.mul_f64(fraction)
    }
}

/// DER blocks as PEM with `tag` (e.g. `CERTIFICATE`), LF line endings as people expect in files.
pub fn to_pem<D: AsRef<[u8]>>(tag: &str, ders: &[D]) -> String {
    let config = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ders.iter()
        .map(|der| ::pem::encode_config(&::pem::Pem::new(tag, der.as_ref().to_vec()), config))
        .collect()
}

/// The certificates of `bytes`, DER certificates one after another (as the Workload API sends
/// a chain or a bundle), each as its own slice; the parser's message when one does not parse.
pub fn split_der_certificates(mut bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut certs = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(bytes).map_err(|e| e.to_string())?;
        certs.push(&bytes[..bytes.len() - rest.len()]);
        bytes = rest;
    }
    Ok(certs)
}

/// The DER of every CERTIFICATE block of PEM `text`, in order; blocks of other kinds are
/// skipped. The one PEM reader of certificates: bundles, chains, CA and node files.
pub fn certificates_from_pem(text: impl AsRef<[u8]>) -> Result<Vec<Vec<u8>>, ::pem::PemError> {
    Ok(::pem::parse_many(text)?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(::pem::Pem::into_contents)
        .collect())
}

/// Every CERTIFICATE block of the PEM file at `path`, as DER. Fails, naming the file, when it
/// cannot be read, is not PEM, or holds no certificate.
pub fn load_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let text = std::fs::read(path).map_err(|e| io_error(path, e))?;
    let certs = certificates_from_pem(&text).map_err(|e| CaError::BadFile {
        path: path.display().to_string(),
        reason: format!("not PEM: {e}"),
    })?;
    if certs.is_empty() {
        return Err(CaError::BadFile {
            path: path.display().to_string(),
            reason: "holds no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// A random, positive, 16-byte certificate serial number.
pub(crate) fn random_serial() -> Result<[u8; 16], CaError> {
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial)
        .map_err(|_| CaError::Signing(rcgen::Error::RingUnspecified))?;
    // Clear the sign bit so the DER INTEGER stays positive, and set the next one so the encoding
    // keeps all 16 bytes (no leading-zero stripping, never zero).
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

/// Adds the certificate serial to a CA's subject, so that every CA certificate has a name of
/// its own: a CRL names its issuer, and a renewed CA must not be taken for its predecessor.
pub(crate) fn name_by_serial(name: &mut rcgen::DistinguishedName, serial: &[u8]) {
    // serialNumber (2.5.4.5)
    name.push(
        rcgen::DnType::CustomDnType(vec![2, 5, 4, 5]),
        hex::encode(serial),
    );
}

/// `t` rounded down to whole seconds, the precision of X.509 validity times.
pub(crate) fn whole_seconds(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_read_in_order_and_other_blocks_skipped() {
        let text = to_pem("CERTIFICATE", &[b"one"])
            + &to_pem("PRIVATE KEY", &[b"key"])
            + &to_pem("CERTIFICATE", &[b"two"]);
        assert_eq!(
            certificates_from_pem(&text).unwrap(),
            [b"one".to_vec(), b"two".to_vec()]
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bundle.pem");
        std::fs::write(&file, &text).unwrap();
        assert_eq!(load_pem_certs(&file).unwrap().len(), 2);
        std::fs::write(&file, to_pem("PRIVATE KEY", &[b"key"])).unwrap();
        let error = load_pem_certs(&file).unwrap_err().to_string();
        assert!(
            error.ends_with("bundle.pem: holds no CERTIFICATE block"),
            "{error}"
        );
        std::fs::write(
            &file,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let error = load_pem_certs(&file).unwrap_err().to_string();
        assert!(error.contains("bundle.pem: not PEM"), "{error}");
        let missing = load_pem_certs(&dir.path().join("missing.pem")).unwrap_err();
        assert!(missing.to_string().contains("missing.pem"), "{missing}");
    }
}
