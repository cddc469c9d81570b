//! Scenario 8, CRL sizes: what the revocation lists add to every Workload API message as the
//! number of node CAs grows, under the server's distribution rule
//! (`tessera::ca::crl::distributed`), and what a CRL of many serials costs to sign and read.
//! In process, with the library's own signing: no server is needed to size what it would send.

use std::time::{Duration, Instant, SystemTime};

use super::chart::Chart;
use super::{BenchError, Plan, ScenarioResult, io_err};
use tessera::ca::crl::{
    CrlStanding, EMPTY_NODE_CRLS_SENT_UP_TO, Revoked, check_crl, distributed, parse_crl, sign_crl,
};
use tessera::ca::node::{key_and_csr, sign_node_ca, signing_ca_from_grant};
use tessera::ca::{LocalCaSource, SigningCa, load_or_create_local_ca};
use tessera::proto::tessera::RevocationReason;
use tessera::spiffe::TrustDomain;

fn fail(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |e| BenchError::Failed(format!("{what}: {e}"))
}

/// A CRL as the rule sees it, with its DER.
struct Crl {
    standing: CrlStanding,
    der: Vec<u8>,
}

/// The bytes the CRLs take in a Workload API message: each is one `bytes` element of the `crl`
/// field, a tag byte and a varint length before the DER.
fn field_bytes(ders: &[&[u8]]) -> usize {
    ders.iter()
        .map(|der| {
            let mut len = der.len();
            let mut varint = 1;
            while len >= 0x80 {
                len >>= 7;
                varint += 1;
            }
            1 + varint + der.len()
        })
        .sum()
}

/// What a relying party receives when `crls` are all there are.
fn sent_bytes(crls: &[&Crl]) -> (usize, usize) {
    let sent = distributed(crls, |c| c.standing);
    let ders: Vec<&[u8]> = sent.iter().map(|c| c.der.as_slice()).collect();
    (sent.len(), field_bytes(&ders))
}

/// The root's CRL and the first `n` of `nodes`.
fn with_root<'a>(root: &'a Crl, nodes: &'a [Crl], n: usize) -> Vec<&'a Crl> {
    std::iter::once(root).chain(&nodes[..n]).collect()
}

fn random_serial() -> Result<Vec<u8>, BenchError> {
    let mut serial = vec![0u8; 16];
    aws_lc_rs::rand::fill(&mut serial)
        .map_err(|_| BenchError::Failed("no randomness for a serial".into()))?;
    // As the CA's serials are: positive, and all 16 bytes kept in DER.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

/// A node CA as the server grants one to a join-token node.
fn node_ca(root: &SigningCa, td: &TrustDomain, now: SystemTime) -> Result<SigningCa, BenchError> {
    let mut id = [0u8; 8];
    aws_lc_rs::rand::fill(&mut id).map_err(|_| BenchError::Failed("no randomness".into()))?;
    let (key, csr) = key_and_csr().map_err(|e| fail("a node CA key")(e.to_string()))?;
    let granted = sign_node_ca(
        root,
        td,
        &format!("jt-{}", hex::encode(id)),
        &csr,
        Duration::from_secs(86400),
        now,
    )
    .map_err(|e| fail("granting a node CA")(e.to_string()))?;
    signing_ca_from_grant(&granted.der, key, root.bundle.clone())
        .map_err(|e| fail("a node CA from its grant")(e.to_string()))
}

fn median_ms(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}

/// 8. CRL sizes and the cost of a long CRL.
pub async fn crl_size(plan: Plan) -> Result<ScenarioResult, BenchError> {
    tokio::task::spawn_blocking(move || measure(plan))
        .await
        .map_err(|e| BenchError::Failed(format!("the CRL measurement panicked: {e}")))?
}

fn measure(plan: Plan) -> Result<ScenarioResult, BenchError> {
    let state = tempfile::tempdir().map_err(io_err("creating a temporary directory"))?;
    let td = TrustDomain::new(super::cluster::TRUST_DOMAIN)
        .map_err(|e| fail("trust domain")(e.to_string()))?;
    let root = load_or_create_local_ca(
        &LocalCaSource::Generated {
            state_dir: state.path().into(),
            ttl: Duration::from_secs(86400 * 30),
        },
        &td,
    )
    .map_err(|e| fail("a root CA")(e.to_string()))?;
    let now = SystemTime::now();
    let sign = |ca: &SigningCa, entries: &[Revoked]| {
        sign_crl(ca, 1, now, entries).map_err(|e| fail("signing a CRL")(e.to_string()))
    };
    let root_crl = Crl {
        standing: CrlStanding {
            root: true,
            lists_any: false,
            current: true,
        },
        der: sign(&root, &[])?,
    };

    let node_cas = plan.crl_node_cas;
    let (mut empty, mut listing) = (Vec::new(), Vec::new());
    for _ in 0..node_cas {
        let ca = node_ca(&root, &td, now)?;
        let one = Revoked {
            serial: random_serial()?,
            revoked_at: now,
            reason: RevocationReason::Operator,
        };
        let node = |lists_any| CrlStanding {
            root: false,
            lists_any,
            current: true,
        };
        empty.push(Crl {
            standing: node(false),
            der: sign(&ca, &[])?,
        });
        listing.push(Crl {
            standing: node(true),
            der: sign(&ca, &[one])?,
        });
    }
    let everything = |nodes: &[Crl], n: usize| {
        let ders: Vec<&[u8]> = with_root(&root_crl, nodes, n)
            .iter()
            .map(|c| c.der.as_slice())
            .collect();
        field_bytes(&ders)
    };
    let (none_count, none_bytes) = sent_bytes(&with_root(&root_crl, &empty, node_cas));
    let (one_count, one_bytes) = sent_bytes(&with_root(&root_crl, &listing, node_cas));
    let all_empty_bytes = everything(&empty, node_cas);
    let root_only = field_bytes(&[root_crl.der.as_slice()]);

    let mut levels: Vec<usize> = [0, 16, 32, 48, 64, 65, 80, 128, 256, 512, 768, 1000]
        .into_iter()
        .filter(|&n| n < node_cas)
        .collect();
    levels.push(node_cas);
    let kb = |bytes: usize| bytes as f64 / 1000.0;
    let line = |f: &dyn Fn(usize) -> usize| -> Vec<(f64, f64)> {
        levels.iter().map(|&n| (n as f64, kb(f(n)))).collect()
    };
    let series = vec![
        (
            "every node CA lists one SVID".to_owned(),
            line(&|n| sent_bytes(&with_root(&root_crl, &listing, n)).1),
        ),
        (
            "no node CA lists anything".to_owned(),
            line(&|n| sent_bytes(&with_root(&root_crl, &empty, n)).1),
        ),
        (
            "no node CA lists anything, every empty CRL sent".to_owned(),
            line(&|n| everything(&empty, n)),
        ),
    ];

    // The long CRL: one node CA that revoked many SVIDs.
    let ca = node_ca(&root, &td, now)?;
    let reasons = [
        RevocationReason::EntryRemoved,
        RevocationReason::EntryChanged,
        RevocationReason::NodeEvicted,
        RevocationReason::Superseded,
    ];
    let entries = (0..plan.crl_serials)
        .map(|i| {
            Ok(Revoked {
                serial: random_serial()?,
                revoked_at: now,
                reason: reasons[i % reasons.len()],
            })
        })
        .collect::<Result<Vec<_>, BenchError>>()?;
    let (mut signing, mut parsing, mut checking) = (Vec::new(), Vec::new(), Vec::new());
    let mut long = Vec::new();
    for _ in 0..plan.crl_repeats {
        let started = Instant::now();
        long = sign(&ca, &entries)?;
        signing.push(started.elapsed());
        let started = Instant::now();
        let info = parse_crl(&long).map_err(|e| fail("parsing the long CRL")(e.to_string()))?;
        parsing.push(started.elapsed());
        if info.revoked.len() != entries.len() {
            return Err(BenchError::Failed(format!(
                "the long CRL lists {} of {} serials",
                info.revoked.len(),
                entries.len()
            )));
        }
        let started = Instant::now();
        check_crl(&long, &ca.certificate)
            .map_err(|e| fail("checking the long CRL")(e.to_string()))?;
        checking.push(started.elapsed());
    }

    let serials = plan.crl_serials;
    let figures = vec![
        ("root CRL, empty (bytes)".into(), root_crl.der.len() as f64),
        (
            "node CA CRL, empty (bytes)".into(),
            empty[0].der.len() as f64,
        ),
        (
            "node CA CRL, one entry (bytes)".into(),
            listing[0].der.len() as f64,
        ),
        (
            format!("{node_cas} node CAs listing nothing: CRLs sent"),
            none_count as f64,
        ),
        (
            format!("{node_cas} node CAs listing nothing: crl field (bytes)"),
            none_bytes as f64,
        ),
        (
            format!("{node_cas} node CAs listing nothing, if every empty CRL were sent (bytes)"),
            all_empty_bytes as f64,
        ),
        (
            format!("{node_cas} node CAs listing one each: CRLs sent"),
            one_count as f64,
        ),
        (
            format!("{node_cas} node CAs listing one each: crl field (bytes)"),
            one_bytes as f64,
        ),
        (
            format!("CRL of {serials} serials (bytes)"),
            long.len() as f64,
        ),
        (
            format!("CRL of {serials} serials: bytes per entry"),
            (long.len() - empty[0].der.len()) as f64 / serials as f64,
        ),
        (
            format!("CRL of {serials} serials: sign, median (ms)"),
            median_ms(signing),
        ),
        (
            format!("CRL of {serials} serials: parse, median (ms)"),
            median_ms(parsing),
        ),
        (
            format!("CRL of {serials} serials: parse and check signature, median (ms)"),
            median_ms(checking),
        ),
    ];
    Ok(ScenarioResult {
        name: "crl_size".into(),
        description: format!(
            "CRLs signed in process with the library (ECDSA P-256, one root, {node_cas} node CAs granted as the server grants them to join-token nodes), sized as the `crl` field of a Workload API message under the server's rule: root CRLs, node CRLs that list something, and empty node CRLs only while there are at most {EMPTY_NODE_CRLS_SENT_UP_TO}. Then one node CA's CRL of {serials} revoked 16-byte serials with reason codes: its size, and the median of {} signings, parses and checked parses.",
            plan.crl_repeats
        ),
        target: format!("no growth from empty node CRLs past {EMPTY_NODE_CRLS_SENT_UP_TO} node CAs"),
        met: node_cas <= EMPTY_NODE_CRLS_SENT_UP_TO || none_bytes == root_only,
        figures,
        note: "Field bytes count each CRL's tag and length in the protobuf message as well as its DER. Serials, CA names and signatures vary in length by a byte or two, so sizes are of one run's CRLs.".into(),
        seconds: 0.0,
        charts: vec![Chart::Lines {
            file: "crl_size.png".into(),
            title: "CRLs in every Workload API message, by number of node CAs".into(),
            x_label: "node CAs".into(),
            y_label: "kB of CRLs per message".into(),
            series,
            limit: None,
        }],
    })
}
