//! The server replica's root CA and stable id. Each replica has its own root; the datastore's
//! bundle holds all of them.

use std::fs;
use std::path::Path;
use std::time::SystemTime;

use x509_parser::prelude::*;

use super::config::RootSource;
use crate::ca::{
    CaError, Expired, SigningCa, generate_root, io_error, load_ca_files, write_atomically,
};
use crate::spiffe::TrustDomain;

const ROOT_CERT_FILE: &str = "root_cert.pem";
const ROOT_KEY_FILE: &str = "root_key.pem";
const SERVER_ID_FILE: &str = "server_id";

/// The replica's id: created once in the state directory, then kept.
pub fn load_or_create_server_id(state_dir: &Path) -> Result<String, CaError> {
    let path = state_dir.join(SERVER_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(id.to_owned());
            }
            Err(CaError::BadFile {
                path: path.display().to_string(),
                reason: "should hold 16 hex digits; remove it to let the server make a new id"
                    .into(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 8];
            aws_lc_rs::rand::fill(&mut bytes)
                .map_err(|_| CaError::Signing(rcgen::Error::RingUnspecified))?;
            let id = hex::encode(bytes);
            write_atomically(&path, format!("{id}\n").as_bytes(), 0o644)?;
            Ok(id)
        }
        Err(e) => Err(io_error(&path, e)),
    }
}

/// Loads the root CA, creating and persisting one (key file 0600) on first start.
pub fn load_or_create_root(
    source: &RootSource,
    state_dir: &Path,
    trust_domain: &TrustDomain,
    server_id: &str,
) -> Result<SigningCa, CaError> {
    let root = match source {
        RootSource::Files { cert, key } => load_ca_files(cert, key, trust_domain, Expired::Refuse)?,
        RootSource::Generated { ttl } => {
            let cert = state_dir.join(ROOT_CERT_FILE);
            let key = state_dir.join(ROOT_KEY_FILE);
            if cert.exists() {
                load_ca_files(&cert, &key, trust_domain, Expired::Refuse).map_err(|e| match e {
                    CaError::BadFile { path, reason } => CaError::BadFile {
                        path,
                        reason: format!(
                            "{reason}; agents trust this root, so the server will not replace it by itself: restore it, or remove {} and {} to start a new root",
                            cert.display(),
                            key.display()
                        ),
                    },
                    other => other,
                })?
            } else {
                let name = format!("tessera root CA {trust_domain} {server_id}");
                let (root, cert_pem, key_pem) =
                    generate_root(trust_domain, *ttl, SystemTime::now(), 1, &name)?;
                write_atomically(&key, key_pem.as_bytes(), 0o600)?;
                write_atomically(&cert, cert_pem.as_bytes(), 0o644)?;
                tracing::info!(
                    cert = %cert.display(),
                    not_after = %humantime::format_rfc3339(root.not_after),
                    "created the root CA"
                );
                root
            }
        }
    };
    check_allows_node_cas(&root)?;
    if SystemTime::now() >= root.renewal_time() {
        tracing::warn!(
            not_after = %humantime::format_rfc3339(root.not_after),
            "the root CA is past 80% of its lifetime; node CAs are cut short as it nears expiry. Replace it"
        );
    }
    Ok(root)
}

/// Node intermediates sit below the root: its path length must allow one CA.
fn check_allows_node_cas(root: &SigningCa) -> Result<(), CaError> {
    let Some(der) = root.bundle.first() else {
        return Err(CaError::BadFile {
            path: "root CA".into(),
            reason: "no certificate".into(),
        });
    };
    let path_len = X509Certificate::from_der(der).ok().and_then(|(_, c)| {
        c.basic_constraints()
            .ok()
            .flatten()
            .map(|bc| bc.value.path_len_constraint)
    });
    match path_len {
        Some(Some(0)) => Err(CaError::BadFile {
            path: "root CA".into(),
            reason: "has pathLen 0, so it cannot sign node CAs; use a root with pathLen of at least 1 or none".into(),
        }),
        _ => Ok(()),
    }
}
