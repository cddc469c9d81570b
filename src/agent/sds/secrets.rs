//! What a caller's SDS resource names resolve to, and the secrets Envoy receives for them.
//!
//! Names follow what Envoy deployments already use with SPIRE: a SPIFFE ID, or `default` (the
//! caller's first identity), is a `tls_certificate`; the trust domain's ID, `ROOTCA` or `ALL` is
//! a `validation_context`. No name at all means every SVID under its SPIFFE ID and the bundle
//! under the trust domain ID.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prost::Message;

use crate::agent::revocation::CrlSet;
use crate::ca::{SigningCa, X509Svid, to_pem};
use crate::entry::RegistrationEntry;
use crate::proto::envoy::config::core::v3::{DataSource, TypedExtensionConfig, data_source};
use crate::proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use crate::spiffe::TrustDomain;

/// The type of every resource SDS serves.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The name under which Envoy knows its SPIFFE certificate validator.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
/// The type of the SPIFFE validator's configuration.
pub const SPIFFE_VALIDATOR_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// The caller's first identity.
pub const DEFAULT_SVID: &str = "default";
/// The bundle of the agent's own trust domain.
pub const ROOT_CA: &str = "ROOTCA";
/// The bundles of every trust domain the agent knows (its own: tessera does not federate).
pub const ALL_BUNDLES: &str = "ALL";

/// One secret a caller may have now, not yet encoded.
#[derive(Clone)]
pub(super) enum Source {
    /// An X.509-SVID and the entry it was issued for.
    Svid(Arc<RegistrationEntry>, Arc<X509Svid>),
    /// The trust bundle and CRLs.
    Validation(Arc<ValidationContexts>),
}

/// A resolved name: its version (changes exactly when its content does) and what it holds.
#[derive(Clone)]
pub(super) struct Item {
    /// An SVID's serial, or a hash of the bundle and CRLs with the validator's form.
    pub version: String,
    /// What to encode when the item is sent.
    pub source: Source,
}

/// A caller's resolved secrets by resource name.
pub(super) type Items = BTreeMap<String, Item>;

/// Names to versions: what a client holds, or was last sent.
pub(super) type Versions = BTreeMap<String, String>;

/// The versions of `items`.
pub(super) fn versions(items: &Items) -> Versions {
    items
        .iter()
        .map(|(name, item)| (name.clone(), item.version.clone()))
        .collect()
}

/// A trust bundle and its CRLs as both forms of validation context, built once per CA and CRL
/// set and shared by every stream.
pub(super) struct ValidationContexts {
    /// `custom_validator_config` naming the SPIFFE validator; CRLs inside the trust bundle.
    spiffe: CertificateValidationContext,
    /// `trusted_ca` and `crl`.
    plain: CertificateValidationContext,
    /// A hash of the bundle and CRLs.
    digest: String,
}

impl ValidationContexts {
    /// Both forms for `ca`'s bundle and `crls`. Every CA a chain may contain has a CRL in
    /// `crls`, so an OpenSSL that checks the whole chain accepts a live certificate.
    fn build(trust_domain: &TrustDomain, ca: &SigningCa, crls: &CrlSet) -> Self {
        let bundle = to_pem("CERTIFICATE", &ca.bundle);
        let crl = to_pem("X509 CRL", &crls.ders);
        let inline = |text: String| DataSource {
            specifier: Some(data_source::Specifier::InlineBytes(text.into_bytes())),
        };
        let validator = SpiffeCertValidatorConfig {
            trust_domains: vec![spiffe_cert_validator_config::TrustDomain {
                name: trust_domain.name().to_owned(),
                trust_bundle: Some(inline(format!("{bundle}{crl}"))),
            }],
        };
        let spiffe = CertificateValidationContext {
            custom_validator_config: Some(TypedExtensionConfig {
                name: SPIFFE_VALIDATOR.to_owned(),
                typed_config: Some(prost_types::Any {
                    type_url: SPIFFE_VALIDATOR_TYPE_URL.to_owned(),
                    value: validator.encode_to_vec(),
                }),
            }),
            ..Default::default()
        };
        let digest = short_digest(&[bundle.as_bytes(), b"\0", crl.as_bytes()]);
        let plain = CertificateValidationContext {
            trusted_ca: Some(inline(bundle)),
            crl: (!crls.ders.is_empty()).then(|| inline(crl)),
            ..Default::default()
        };
        Self {
            spiffe,
            plain,
            digest,
        }
    }

    /// The context in the form asked for.
    fn form(&self, plain: bool) -> &CertificateValidationContext {
        if plain { &self.plain } else { &self.spiffe }
    }
}

/// The first 16 hex digits of the SHA-256 of `parts`, concatenated.
pub(super) fn short_digest(parts: &[&[u8]]) -> String {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in parts {
        context.update(part);
    }
    hex::encode(&context.finish().as_ref()[..8])
}

/// The validation contexts of the latest CA and CRL set, kept while they are current.
#[derive(Default)]
pub(super) struct ContextMemo {
    /// The contexts last built.
    latest: Mutex<Option<Built>>,
}

/// Validation contexts and what they were built from.
struct Built {
    /// The CA and CRL set, held so that neither address can be reused by a newer one while the
    /// memo compares against it.
    ca: Arc<SigningCa>,
    crls: Arc<CrlSet>,
    contexts: Arc<ValidationContexts>,
}

impl ContextMemo {
    /// The contexts for `ca` and `crls`, built now unless they are the latest.
    pub fn get(
        &self,
        trust_domain: &TrustDomain,
        ca: &Arc<SigningCa>,
        crls: &Arc<CrlSet>,
    ) -> Arc<ValidationContexts> {
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(built) = latest.as_ref()
            && Arc::ptr_eq(&built.ca, ca)
            && Arc::ptr_eq(&built.crls, crls)
        {
            return built.contexts.clone();
        }
        let contexts = Arc::new(ValidationContexts::build(trust_domain, ca, crls));
        *latest = Some(Built {
            ca: ca.clone(),
            crls: crls.clone(),
            contexts: contexts.clone(),
        });
        contexts
    }
}

/// Everything a caller's names resolve against at one moment.
pub(super) struct Available<'a> {
    /// The caller's SVIDs, its default first; empty for a verifier without an identity.
    pub svids: &'a [(Arc<RegistrationEntry>, Arc<X509Svid>)],
    /// The bundle and CRLs.
    pub contexts: Arc<ValidationContexts>,
    /// The agent's trust domain.
    pub trust_domain: &'a TrustDomain,
    /// Validation contexts as plain `trusted_ca` rather than the SPIFFE validator.
    pub plain: bool,
}

impl Available<'_> {
    /// What `name` resolves to, if the caller may have it.
    pub fn resolve(&self, name: &str) -> Option<Item> {
        match name {
            DEFAULT_SVID => self.svids.first().map(svid_item),
            ROOT_CA | ALL_BUNDLES => Some(self.validation_item()),
            _ if name == self.trust_domain.id_string() => Some(self.validation_item()),
            _ => self
                .svids
                .iter()
                .find(|(_, svid)| svid.spiffe_id.as_str() == name)
                .map(svid_item),
        }
    }

    /// `names` resolved, leaving out those the caller may not have; no names: everything, by
    /// SPIFFE ID and trust domain ID.
    pub fn items<'n>(&self, names: impl IntoIterator<Item = &'n str>, wildcard: bool) -> Items {
        let mut items: Items = names
            .into_iter()
            .filter_map(|name| Some((name.to_owned(), self.resolve(name)?)))
            .collect();
        if wildcard {
            for pair in self.svids {
                items
                    .entry(pair.1.spiffe_id.to_string())
                    .or_insert_with(|| svid_item(pair));
            }
            items
                .entry(self.trust_domain.id_string())
                .or_insert_with(|| self.validation_item());
        }
        items
    }

    fn validation_item(&self) -> Item {
        let form = if self.plain { "ca" } else { "spiffe" };
        Item {
            version: format!("{}-{form}", self.contexts.digest),
            source: Source::Validation(self.contexts.clone()),
        }
    }
}

fn svid_item((entry, svid): &(Arc<RegistrationEntry>, Arc<X509Svid>)) -> Item {
    Item {
        version: svid.serial_hex.clone(),
        source: Source::Svid(entry.clone(), svid.clone()),
    }
}

/// The `Secret` named `name` holding `item`, packed as Envoy expects it.
pub(super) fn encode(name: &str, item: &Item, plain: bool) -> prost_types::Any {
    let inline = |bytes: Vec<u8>| DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
    };
    let r#type = match &item.source {
        Source::Svid(_, svid) => secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(to_pem("CERTIFICATE", &svid.chain_der).into_bytes())),
            private_key: Some(inline(
                to_pem("PRIVATE KEY", &[svid.key_pkcs8.as_slice()]).into_bytes(),
            )),
        }),
        Source::Validation(contexts) => {
            secret::Type::ValidationContext(contexts.form(plain).clone())
        }
    };
    let secret = Secret {
        name: name.to_owned(),
        r#type: Some(r#type),
    };
    prost_types::Any {
        type_url: SECRET_TYPE_URL.to_owned(),
        value: secret.encode_to_vec(),
    }
}

/// A version for a whole response: a digest of every name and version in it.
pub(super) fn response_version(versions: &Versions) -> String {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(versions.len() * 4);
    for (name, version) in versions {
        parts.extend([name.as_bytes(), b"=", version.as_bytes(), b"\n"]);
    }
    short_digest(&parts)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::ca::{LeafRequest, generate_root, mint_x509_svid};
    use crate::entry::tests::entry;

    struct Fixture {
        td: TrustDomain,
        ca: Arc<SigningCa>,
        svids: Vec<(Arc<RegistrationEntry>, Arc<X509Svid>)>,
    }

    fn fixture() -> Fixture {
        let td = TrustDomain::new("example.org").unwrap();
        let now = SystemTime::now();
        let (ca, _, _) = generate_root(&td, Duration::from_secs(3600), now, 0, "t").unwrap();
        let svids = ["spiffe://example.org/front", "spiffe://example.org/back"]
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let entry = entry(&format!("e{i}"), id, &["unix:uid:1"]);
                let request = LeafRequest {
                    spiffe_id: &entry.spiffe_id,
                    ttl: entry.x509_ttl,
                    dns_names: &[],
                    not_after_cap: None,
                    task: None,
                };
                let svid = mint_x509_svid(&ca, &request, now).unwrap();
                (Arc::new(entry), Arc::new(svid))
            })
            .collect();
        Fixture {
            td,
            ca: Arc::new(ca),
            svids,
        }
    }

    fn available<'a>(f: &'a Fixture, memo: &ContextMemo, plain: bool) -> Available<'a> {
        Available {
            svids: &f.svids,
            contexts: memo.get(&f.td, &f.ca, &Arc::new(CrlSet::default())),
            trust_domain: &f.td,
            plain,
        }
    }

    fn decode(any: &prost_types::Any) -> Secret {
        assert_eq!(any.type_url, SECRET_TYPE_URL);
        Secret::decode(any.value.as_slice()).unwrap()
    }

    #[test]
    fn names_resolve_as_envoy_deployments_use_them() {
        let f = fixture();
        let memo = ContextMemo::default();
        let available = available(&f, &memo, false);
        let serial = |i: usize| f.svids[i].1.serial_hex.clone();
        let version = |name: &str| available.resolve(name).map(|item| item.version);
        assert_eq!(version("default"), Some(serial(0)), "the first identity");
        assert_eq!(version("spiffe://example.org/back"), Some(serial(1)));
        assert_eq!(version("spiffe://example.org/other"), None);
        assert_eq!(version("spiffe://other.org"), None, "no federation");
        let bundle = version(ROOT_CA).unwrap();
        assert_eq!(version(ALL_BUNDLES), Some(bundle.clone()));
        assert_eq!(version("spiffe://example.org"), Some(bundle));

        let everything = available.items([], true);
        assert_eq!(
            everything.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "spiffe://example.org",
                "spiffe://example.org/back",
                "spiffe://example.org/front"
            ]
        );
        let named = available.items(["default", "nothing-here"], false);
        assert_eq!(named.keys().collect::<Vec<_>>(), ["default"]);
    }

    #[test]
    fn a_secret_is_named_as_asked_and_holds_a_matching_pem_pair() {
        let f = fixture();
        let memo = ContextMemo::default();
        let available = available(&f, &memo, false);
        let item = available.resolve("default").unwrap();
        let secret = decode(&encode("default", &item, false));
        assert_eq!(secret.name, "default");
        let Some(secret::Type::TlsCertificate(certificate)) = secret.r#type else {
            panic!("a tls_certificate");
        };
        let bytes = |source: Option<DataSource>| match source.and_then(|s| s.specifier) {
            Some(data_source::Specifier::InlineBytes(bytes)) => bytes,
            other => panic!("inline bytes, not {other:?}"),
        };
        let chain = crate::ca::certificates_from_pem(bytes(certificate.certificate_chain)).unwrap();
        assert_eq!(chain, f.svids[0].1.chain_der);
        let key = ::pem::parse(bytes(certificate.private_key)).unwrap();
        assert_eq!(key.tag(), "PRIVATE KEY");
        assert_eq!(key.contents(), f.svids[0].1.key_pkcs8.as_slice());
        assert!(
            !format!("{:?}", TlsCertificate::default()).contains("PRIVATE"),
            "Debug leaves the key out"
        );
    }

    #[test]
    fn validation_contexts_come_in_both_forms_with_their_own_versions() {
        let f = fixture();
        let memo = ContextMemo::default();
        let spiffe = available(&f, &memo, false).resolve(ROOT_CA).unwrap();
        let plain = available(&f, &memo, true).resolve(ROOT_CA).unwrap();
        assert_ne!(
            spiffe.version, plain.version,
            "a change of form is a new version"
        );

        let Some(secret::Type::ValidationContext(context)) =
            decode(&encode(ROOT_CA, &spiffe, false)).r#type
        else {
            panic!("a validation context");
        };
        let validator = context.custom_validator_config.unwrap();
        assert_eq!(validator.name, SPIFFE_VALIDATOR);
        let typed = validator.typed_config.unwrap();
        assert_eq!(typed.type_url, SPIFFE_VALIDATOR_TYPE_URL);
        let config = SpiffeCertValidatorConfig::decode(typed.value.as_slice()).unwrap();
        assert_eq!(config.trust_domains[0].name, "example.org");
        assert!(context.trusted_ca.is_none() && context.crl.is_none());

        let Some(secret::Type::ValidationContext(context)) =
            decode(&encode(ROOT_CA, &plain, true)).r#type
        else {
            panic!("a validation context");
        };
        assert!(context.custom_validator_config.is_none());
        assert!(context.trusted_ca.is_some());
        assert!(context.crl.is_none(), "no CRL field without CRLs");
    }

    #[test]
    fn contexts_are_built_once_per_bundle_and_crl_set() {
        let f = fixture();
        let memo = ContextMemo::default();
        let crls = Arc::new(CrlSet::default());
        let first = memo.get(&f.td, &f.ca, &crls);
        assert!(Arc::ptr_eq(&first, &memo.get(&f.td, &f.ca, &crls)));
        let crl = crate::ca::crl::sign_crl(&f.ca, 1, SystemTime::now(), &[]).unwrap();
        let newer = Arc::new(CrlSet {
            ders: vec![crl],
            own: Vec::new(),
        });
        let second = memo.get(&f.td, &f.ca, &newer);
        assert!(!Arc::ptr_eq(&first, &second));
        assert_ne!(first.digest, second.digest, "new CRLs, new version");
    }
}
