//! Entry points for the fuzz targets under `fuzz/` and for `tests/fuzz_regressions.rs`, which
//! replays every input a target ever crashed on, on the stable toolchain, in the normal suite.
//!
//! Each function takes arbitrary bytes and runs them through the code that meets such bytes in
//! production. Refusing the input is a normal answer; a panic means a bug, either in the code
//! under test or in an invariant checked here. Not API: hidden from the documentation, and the
//! one door the fuzz targets have into internals, so that those need not be public.

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use prost::Message;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SigningKey};
use tokio::io::{AsyncRead, ReadBuf};

use crate::agent::authority::{AuthorityFix, first_block_is_acceptable, is_valid_authority};
use crate::attest::Selector;
use crate::ca::SigningCa;
use crate::events::model::{MAX_BATCH_EVENTS, check_event, to_json};
use crate::events::spool::{Class, Spool, SpoolConfig};
use crate::proto::tessera::{EventBatch, EventKind};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::store::wire::{from_record, to_record};

/// `SpiffeId::parse` and `TrustDomain::new`: what they accept is canonical, and survives a
/// round trip through its parts.
pub fn spiffe_id(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(id) = SpiffeId::parse(&text) {
        assert_eq!(id.as_str(), text, "an accepted ID is kept as given");
        let domain = id.trust_domain();
        assert_eq!(TrustDomain::new(domain.name()).as_ref(), Ok(&domain));
        assert!(id.path().is_empty() || id.path().starts_with('/'));
        assert_eq!(
            format!("{}{}", domain.id_string(), id.path()),
            id.as_str(),
            "trust domain and path make up the ID"
        );
        assert_eq!(
            SpiffeId::parse_workload(&text).is_ok(),
            !id.path().is_empty()
        );
        assert_eq!(SpiffeId::parse(&id.to_string()).as_ref(), Ok(&id));
    }
    if let Ok(domain) = TrustDomain::new(&text) {
        assert_eq!(TrustDomain::new(domain.name()).as_ref(), Ok(&domain));
        let as_id = SpiffeId::parse(&domain.id_string());
        assert!(as_id.is_ok_and(|id| id.path().is_empty() && id.trust_domain() == domain));
    }
}

/// `Selector::from_str`: an accepted selector prints in canonical form, which parses back to
/// the same selector.
pub fn selector(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match text.parse::<Selector>() {
        Ok(selector) => {
            let canonical = selector.to_string();
            assert_eq!(canonical.parse::<Selector>().as_ref(), Ok(&selector));
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

/// `AgentConfig::parse`: any text is a configuration or an error that can be printed.
pub fn agent_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(error) = crate::agent::AgentConfig::parse("fuzz.toml", &text) {
        let _ = error.to_string();
    }
}

/// `ServerConfig::parse`: any text is a configuration or an error that can be printed.
pub fn server_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(error) = crate::server::config::ServerConfig::parse("fuzz.toml", &text) {
        let _ = error.to_string();
    }
}

/// The HPACK table size the agent's decoder allows (the HTTP/2 default).
const HPACK_TABLE_SIZE: usize = 4096;

/// The first-block scan of `AuthorityFix`: when it lets a block through untouched, a full HPACK
/// decode from a fresh table finds no authority `h2` would refuse.
pub fn first_block(block: &[u8]) {
    if !first_block_is_acceptable(block) {
        return;
    }
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
    let mut refused = None;
    let decoded = decoder.decode_with_cb(block, |name, value| {
        if &*name == b":authority" && !is_valid_authority(&value) {
            refused = Some(value.into_owned());
        }
    });
    // A block the full decoder rejects is left to hyper's decoder, which rejects it too.
    if decoded.is_ok() {
        assert_eq!(
            refused, None,
            "the scan passed an authority h2 refuses untouched"
        );
    }
}

/// `AuthorityFix` over a whole connection's client bytes. The first input byte says how the
/// rest arrives: its low 7 bits give the size of each read (1 to 127 bytes, or as much as fits
/// when all are set), and its top bit leaves out the HTTP/2 client preface that is otherwise
/// put in front. What the filter hands on, or whether it refuses the stream, must not depend on
/// how the bytes were split into reads.
pub fn authority_filter(data: &[u8]) {
    let Some((&how, rest)) = data.split_first() else {
        return;
    };
    let mut stream = Vec::with_capacity(rest.len() + 24);
    if how & 0x80 == 0 {
        stream.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    }
    stream.extend_from_slice(rest);
    let read_size = match how & 0x7f {
        0x7f => usize::MAX,
        n => usize::from(n) + 1,
    };
    let split = filtered(&stream, read_size, 1024);
    let whole = filtered(&stream, usize::MAX, 64 * 1024);
    match (&split, &whole) {
        (Ok(split), Ok(whole)) => assert!(split == whole, "output depends on read sizes"),
        (Err(_), Err(_)) => {}
        _ => panic!("refusal depends on read sizes: {split:?} vs {whole:?}"),
    }
}

/// Everything `AuthorityFix` yields for `stream` arriving `read_size` bytes at a time, read
/// through a buffer of `buffer_size`.
fn filtered(stream: &[u8], read_size: usize, buffer_size: usize) -> Result<Vec<u8>, String> {
    let mut fix = AuthorityFix::new(ChunkedReader {
        rest: stream,
        read_size,
    });
    let mut context = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut buffer = vec![0u8; buffer_size];
    loop {
        let mut read = ReadBuf::new(&mut buffer);
        match Pin::new(&mut fix).poll_read(&mut context, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => return Ok(out),
            Poll::Ready(Ok(())) => out.extend_from_slice(read.filled()),
            Poll::Ready(Err(error)) => return Err(error.to_string()),
            Poll::Pending => panic!("the filter waits although its input never does"),
        }
    }
}

/// An in-memory connection that hands out at most `read_size` bytes per read, then ends.
struct ChunkedReader<'a> {
    rest: &'a [u8],
    read_size: usize,
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.read_size.min(self.rest.len()).min(buf.remaining());
        let (now, later) = self.rest.split_at(n);
        buf.put_slice(now);
        self.rest = later;
        Poll::Ready(Ok(()))
    }
}

/// The node API's CSR checks (`check_csrs`, then signing as `grant` does) on two requests.
///
/// Input: one flag byte, a 2-byte big-endian length of the node SVID's CSR, that CSR, then the
/// CA's CSR. With the flag's low bit set, each CSR that has the shape of a PKCS#10 request gets
/// a fixed P-256 key and a valid signature first, so that the checks behind the signature see
/// mutated names and extensions rather than stopping at a broken signature.
pub fn node_csr(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((length, rest)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let (svid_csr, ca_csr) =
        rest.split_at(usize::from(u16::from_be_bytes(*length)).min(rest.len()));
    let (svid_csr, ca_csr) = if flags & 1 != 0 {
        (resigned(svid_csr), resigned(ca_csr))
    } else {
        (svid_csr.to_vec(), ca_csr.to_vec())
    };
    let fixture = &*CSR_FIXTURE;
    let checked =
        crate::ca::node::check_csrs(&fixture.trust_domain, &fixture.node_id, &svid_csr, &ca_csr);
    let now = SystemTime::now();
    let ttl = Duration::from_secs(3600);
    let svid =
        crate::ca::node::sign_node_svid(&fixture.root, &fixture.node_id, &svid_csr, ttl, now);
    let ca = crate::ca::node::sign_node_ca(
        &fixture.root,
        &fixture.trust_domain,
        "fuzz",
        &ca_csr,
        ttl,
        now,
    );
    if checked.is_ok() {
        // `attest` spends a join token between the check and the signing: a pair of CSRs that
        // passed must be signed.
        assert!(svid.is_ok(), "checked node SVID CSR not signed: {svid:?}");
        assert!(ca.is_ok(), "checked CA CSR not signed: {ca:?}");
    }
    for error in [svid.err(), ca.err()].into_iter().flatten() {
        let _ = error.to_string();
    }
}

/// What the CSR target signs with and checks against, made once per process.
struct CsrFixture {
    trust_domain: TrustDomain,
    node_id: SpiffeId,
    root: SigningCa,
    /// The key every re-signed CSR carries.
    key: KeyPair,
}

static CSR_FIXTURE: LazyLock<CsrFixture> = LazyLock::new(|| {
    let trust_domain = TrustDomain::new("example.org").expect("a valid trust domain");
    let node_id = crate::ca::node::node_spiffe_id(&trust_domain, "fuzz").expect("a valid node id");
    let (root, _, _) = crate::ca::generate_root(
        &trust_domain,
        Duration::from_secs(86400),
        SystemTime::now(),
        1,
        "fuzz root",
    )
    .expect("a root CA");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
    CsrFixture {
        trust_domain,
        node_id,
        root,
        key,
    }
});

/// `csr` with its key replaced by the fixture's and signed by it, when it has the outline of a
/// PKCS#10 request (RFC 2986: SEQUENCE { SEQUENCE { version, subject, key, [0] attributes },
/// algorithm, signature }); otherwise `csr` as it is.
fn resigned(csr: &[u8]) -> Vec<u8> {
    let outline = der_element(csr, 0x30)
        .and_then(|(request, _)| der_element(request, 0x30))
        .and_then(|(info, _)| {
            let (version, rest) = der_any(info)?;
            let (subject, rest) = der_any(rest)?;
            let (_key, attributes) = der_any(rest)?;
            Some((version, subject, attributes))
        });
    let Some((version, subject, attributes)) = outline else {
        return csr.to_vec();
    };
    let key = &CSR_FIXTURE.key;
    let mut info = Vec::new();
    info.extend_from_slice(version);
    info.extend_from_slice(subject);
    info.extend_from_slice(&key.subject_public_key_info());
    info.extend_from_slice(attributes);
    let info = der_wrap(0x30, &info);
    let Ok(signature) = key.sign(&info) else {
        return csr.to_vec();
    };
    // ecdsa-with-SHA256 (RFC 5758 §3.2).
    const ECDSA_SHA256: &[u8] = &[
        0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
    ];
    let mut bits = vec![0u8];
    bits.extend_from_slice(&signature);
    let mut request = info;
    request.extend_from_slice(ECDSA_SHA256);
    request.extend_from_slice(&der_wrap(0x03, &bits));
    der_wrap(0x30, &request)
}

/// The contents of the DER element at the start of `bytes` if its tag is `tag`, and what
/// follows it.
fn der_element(bytes: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *bytes.first()? != tag {
        return None;
    }
    let (whole, rest) = der_any(bytes)?;
    let header = whole.len() - der_content_len(whole)?;
    Some((&whole[header..], rest))
}

/// The whole DER element (header included) at the start of `bytes`, and what follows it.
fn der_any(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let content = der_content_len(bytes)?;
    let header = match *bytes.get(1)? {
        short if short < 0x80 => 2,
        long => 2 + usize::from(long & 0x7f),
    };
    let end = header.checked_add(content)?;
    (end <= bytes.len()).then(|| bytes.split_at(end))
}

/// The content length in the header of the DER element at the start of `bytes`.
fn der_content_len(bytes: &[u8]) -> Option<usize> {
    let first = *bytes.get(1)?;
    if first < 0x80 {
        return Some(usize::from(first));
    }
    let count = usize::from(first & 0x7f);
    if count == 0 || count > 3 {
        return None;
    }
    let digits = bytes.get(2..2 + count)?;
    Some(digits.iter().fold(0, |n, &d| (n << 8) | usize::from(d)))
}

/// `content` as a DER element with `tag`.
fn der_wrap(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let digits: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&d| d == 0)
            .collect();
        out.push(0x80 | digits.len() as u8);
        out.extend(digits);
    }
    out.extend_from_slice(content);
    out
}

/// An `EventBatch` as the node API's `ReportEvents` receives it: decoded, held to the batch
/// bound, each event checked (`check_event`) and turned into a record (`to_record`) as ingest
/// does; then each record read back (`from_record`) and printed (`to_json`) as the CLI shows it.
pub fn event_batch(data: &[u8]) {
    let Ok(batch) = EventBatch::decode(data) else {
        return;
    };
    if batch.events.len() > MAX_BATCH_EVENTS {
        return;
    }
    for (index, event) in batch.events.iter().enumerate() {
        let Ok(kind) = check_event(index, event) else {
            continue;
        };
        assert_ne!(kind, EventKind::Unspecified);
        let record = to_record(event, kind, "fuzz-node", 1);
        let shown = from_record(&record, "example.org");
        assert_eq!(shown.kind, kind as i32, "the kind survives storage");
        assert_eq!(shown.id, event.id);
        let _ = to_json(&shown, Some(1), Some(record.received_ms)).to_string();
    }
}

/// Recovery of the event spool from whatever files a crash, a full disk or a stray hand left
/// in its directory. The input describes the directory: a flag byte, then up to four segments,
/// each an 8-byte little-endian first sequence number (its file name), a 2-byte little-endian
/// length and its bytes; with the flag's low bit set, what is left is the `acked` cursor file.
///
/// The spool must open; give every surviving record once, in order, above the cursor; take a
/// new record; and open again with the same records plus the new one.
pub fn spool_recovery(data: &[u8]) {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    for _ in 0..4 {
        let Some((first_seq, after)) = rest.split_first_chunk::<8>() else {
            break;
        };
        let Some((length, after)) = after.split_first_chunk::<2>() else {
            break;
        };
        let length = usize::from(u16::from_le_bytes(*length)).min(after.len());
        let (bytes, after) = after.split_at(length);
        let name = format!("spool-{:020}.log", u64::from_le_bytes(*first_seq));
        std::fs::write(dir.path().join(name), bytes).expect("write a segment");
        rest = after;
    }
    if flags & 1 != 0 {
        std::fs::write(dir.path().join("acked"), rest).expect("write the cursor");
    }

    let config = SpoolConfig::default;
    let (spool, recovery) = Spool::open(dir.path(), config()).expect("a spool opens");
    let before = spool
        .read_unacked(0, usize::MAX, usize::MAX)
        .expect("records read");
    let acked = spool.acked();
    assert_eq!(acked, recovery.acked);
    for pair in before.windows(2) {
        assert!(pair[0].0 < pair[1].0, "records out of order");
    }
    assert!(before.iter().all(|(seq, _, _)| *seq > acked));
    let appended = match spool.append(Class::Critical, b"after recovery") {
        Ok(seq) => Some(seq),
        // Sequence numbers can run out; the spool must say so rather than wrap.
        Err(error) => {
            let _ = error.to_string();
            None
        }
    };
    if let Some(seq) = appended {
        assert!(before.last().is_none_or(|(last, _, _)| *last < seq));
    }
    drop(spool);

    let (spool, _) = Spool::open(dir.path(), config()).expect("the spool opens again");
    let after = spool
        .read_unacked(0, usize::MAX, usize::MAX)
        .expect("records read again");
    let mut expected = before;
    if let Some(seq) = appended {
        expected.push((seq, Class::Critical, b"after recovery".to_vec()));
    }
    assert_eq!(after, expected, "a second open finds what the first left");
}

/// What a CRL from elsewhere meets: `ca::crl::parse_crl`, the check against the CA it names
/// (`check_crl`), and a relying party's verification of a live SVID with it
/// (`verify::verify_svid`). A CRL that the fixture CA did not sign never verifies as its own,
/// and no CRL, however made, can make the verifier panic.
///
/// Input: one flag byte, then the CRL. With the flag's low bit set the bytes are taken as the
/// entries to revoke (serials of up to 20 bytes, split at zero bytes) and signed by the fixture
/// CA first, so that the checks past the signature see varied lists.
pub fn crl(data: &[u8]) {
    use crate::ca::crl::{Revoked, check_crl, parse_crl, sign_crl};
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let fixture = &*CRL_FIXTURE;
    let der = if flags & 1 != 0 {
        let entries: Vec<Revoked> = rest
            .split(|b| *b == 0)
            .filter(|serial| !serial.is_empty() && serial.len() <= 20)
            .map(|serial| Revoked {
                serial: serial.to_vec(),
                revoked_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                reason: crate::proto::tessera::RevocationReason::Operator,
            })
            .collect();
        match sign_crl(&fixture.ca, 1, SystemTime::now(), &entries) {
            Ok(der) => der,
            Err(_) => return,
        }
    } else {
        rest.to_vec()
    };
    let parsed = parse_crl(&der);
    let checked = check_crl(&der, &fixture.ca.certificate);
    if flags & 1 != 0 {
        let info = checked
            .as_ref()
            .expect("a CRL the fixture CA signed checks against it");
        assert!(parsed.is_ok());
        assert!(info.revoked.iter().all(|r| !r.serial_hex.is_empty()));
    }
    let verdict = crate::verify::verify_svid(
        &fixture.chain,
        &fixture.ca.bundle,
        std::slice::from_ref(&der),
        crate::verify::Usage::Client,
        SystemTime::now(),
    );
    // A CRL that is not the fixture CA's own can revoke nothing of its chain.
    if checked.is_err() {
        assert!(
            !matches!(verdict, Err(crate::verify::Rejection::Revoked { .. })),
            "a CRL that does not check revoked: {verdict:?}"
        );
    }
}

/// A standalone CA and one SVID it minted, for [`crl`].
struct CrlFixture {
    ca: SigningCa,
    chain: Vec<Vec<u8>>,
}

static CRL_FIXTURE: LazyLock<CrlFixture> = LazyLock::new(|| {
    let td = TrustDomain::new("example.org").expect("a valid trust domain");
    let (ca, _, _) = crate::ca::generate_root(
        &td,
        Duration::from_secs(3600),
        SystemTime::now(),
        0,
        "fuzz CA",
    )
    .expect("a CA");
    let id = SpiffeId::parse_workload("spiffe://example.org/fuzz").expect("a valid ID");
    let svid = crate::ca::mint_x509_svid(
        &ca,
        &crate::ca::LeafRequest {
            spiffe_id: &id,
            ttl: Duration::from_secs(600),
            dns_names: &[],
            not_after_cap: None,
            task: None,
        },
        SystemTime::now(),
    )
    .expect("an SVID");
    CrlFixture {
        chain: svid.chain_der.clone(),
        ca,
    }
});
