//! The decision on a connection's first header block, taken without an HPACK decoder.
//!
//! Most clients send an authority `h2` accepts, and their connections pass through untouched.
//! Telling so from the first block needs only its `:authority` values: every other field is
//! skipped by its length prefixes, and only an authority coded with Huffman is decoded, by one
//! decoder table shared by the process. (A full decode rebuilds that table for every Huffman
//! string, which cost about as much as minting the caller's SVID.) Anything this scan does not
//! settle with certainty (a reference into the dynamic table, a refused authority, malformed
//! input) is left to the full decoder, which decides as before.

use std::sync::{LazyLock, Mutex};

use loona_hpack::huffman::HuffmanDecoder;

/// RFC 7541 Appendix A: static table index 1 is `:authority` with an empty value.
const STATIC_AUTHORITY: usize = 1;
/// RFC 7541 §2.3.3: indices above the static table's 61 entries name dynamic entries.
const STATIC_TABLE_LEN: usize = 61;
const AUTHORITY: &[u8] = b":authority";

static HUFFMAN: LazyLock<Mutex<HuffmanDecoder>> =
    LazyLock::new(|| Mutex::new(HuffmanDecoder::new()));

/// True when every `:authority` in `block` (the first header block of a connection, whole) is
/// one `h2` accepts, or there is none; false when only a full decode can tell.
pub(crate) fn authority_is_acceptable(block: &[u8]) -> bool {
    scan(block).unwrap_or(false)
}

/// `None`: malformed or outside what the scan settles.
fn scan(block: &[u8]) -> Option<bool> {
    let mut rest = block;
    while let Some(&first) = rest.first() {
        if first & 0x80 != 0 {
            // Indexed field (§6.1): the static `:authority` entry's value is empty, which `h2`
            // refuses; a dynamic entry could be anything.
            let index = integer(&mut rest, 7)?;
            if index == 0 || index == STATIC_AUTHORITY || index > STATIC_TABLE_LEN {
                return None;
            }
        } else if first & 0xe0 == 0x20 {
            // Dynamic table size update (§6.3): changes nothing in this block's fields.
            integer(&mut rest, 5)?;
        } else {
            // Literal field (§6.2), with incremental indexing (6-bit prefix) or without
            // indexing / never indexed (4-bit prefix).
            let prefix = if first & 0x40 != 0 { 6 } else { 4 };
            let name_index = integer(&mut rest, prefix)?;
            let is_authority = match name_index {
                0 => decoded(string(&mut rest)?)? == AUTHORITY,
                STATIC_AUTHORITY => true,
                i if i > STATIC_TABLE_LEN => return None,
                _ => false,
            };
            let value = string(&mut rest)?;
            if is_authority && !super::is_valid_authority(&decoded(value)?) {
                return None;
            }
        }
    }
    Some(true)
}

/// An HPACK integer with an `prefix`-bit prefix (RFC 7541 §5.1), advancing `rest` past it.
fn integer(rest: &mut &[u8], prefix: u32) -> Option<usize> {
    let (&first, mut tail) = rest.split_first()?;
    let max = (1usize << prefix) - 1;
    let mut value = usize::from(first) & max;
    if value == max {
        let mut shift = 0u32;
        loop {
            let (&byte, after) = tail.split_first()?;
            tail = after;
            // Longer than any length a 64 KiB block can hold: not worth reading on.
            if shift > 21 {
                return None;
            }
            value += usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    *rest = tail;
    Some(value)
}

/// A string literal (RFC 7541 §5.2): whether it is Huffman-coded, and its bytes as sent.
fn string<'a>(rest: &mut &'a [u8]) -> Option<(bool, &'a [u8])> {
    let huffman = rest.first()? & 0x80 != 0;
    let len = integer(rest, 7)?;
    if len > rest.len() {
        return None;
    }
    let (bytes, tail) = rest.split_at(len);
    *rest = tail;
    Some((huffman, bytes))
}

fn decoded((huffman, bytes): (bool, &[u8])) -> Option<Vec<u8>> {
    if !huffman {
        return Some(bytes.to_vec());
    }
    let mut decoder = HUFFMAN.lock().unwrap_or_else(|e| e.into_inner());
    decoder.decode(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7541 C.4.1: GET http://www.example.com/ with Huffman coding, the authority a
    /// literal with incremental indexing and the static `:authority` name.
    const RFC_REQUEST: &[u8] = &[
        0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90,
        0xf4, 0xff,
    ];

    fn literal_block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut encoder = loona_hpack::Encoder::new();
        encoder.encode(fields.iter().copied())
    }

    #[test]
    fn accepts_the_authorities_h2_accepts() {
        assert!(authority_is_acceptable(RFC_REQUEST));
        assert!(authority_is_acceptable(&literal_block(&[
            (b":method", b"POST"),
            (b":authority", b"[::1]:50051"),
            (b"workload.spiffe.io", b"true"),
        ])));
        // No authority at all, and an empty block.
        assert!(authority_is_acceptable(&[0x82, 0x86]));
        assert!(authority_is_acceptable(&[]));
        // A literal `:authority` name, not indexed, then a table size update.
        let mut block = vec![0x00, 10];
        block.extend(b":authority");
        block.extend([9]);
        block.extend(b"localhost");
        block.push(0x3f);
        block.push(0x01);
        assert!(authority_is_acceptable(&block));
    }

    #[test]
    fn leaves_everything_else_to_the_full_decoder() {
        let grpc_core = literal_block(&[(b":authority", b"run%2Ftessera%2Fagent.sock")]);
        assert!(!authority_is_acceptable(&grpc_core));
        // The static `:authority` entry itself carries an empty authority.
        assert!(!authority_is_acceptable(&[0x81]));
        // A dynamic reference, as a field and as a name.
        assert!(!authority_is_acceptable(&[0xbe]));
        assert!(!authority_is_acceptable(&[0x7f, 0x00, 0x01, b'x']));
        // Truncated at every length.
        for len in 0..RFC_REQUEST.len() {
            let cut = &RFC_REQUEST[..len];
            assert_eq!(authority_is_acceptable(cut), len <= 3, "cut at {len} bytes");
        }
        // Huffman data with an EOS inside, and an overlong integer.
        assert!(!authority_is_acceptable(&[
            0x41, 0x84, 0xff, 0xff, 0xff, 0xff
        ]));
        assert!(!authority_is_acceptable(&[
            0x41, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
        ]));
    }
}
