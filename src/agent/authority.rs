//! Serving gRPC clients that send a Unix socket path as `:authority`.
//!
//! grpc-core clients (Python grpcio, and so py-spiffe; also grpc-java and grpc-swift) connecting
//! to `unix:///run/x/agent.sock` send `:authority: run%2Fx%2Fagent.sock`. The `http` crate's
//! authority parser refuses the percent signs, and the `h2` server answers every such request
//! with RST_STREAM(PROTOCOL_ERROR) before any application code runs.
//!
//! [`AuthorityFix`] sits between the accepted socket and the HTTP/2 server, on the read side
//! only. The connection's first header block decides what it needs:
//!
//! - an acceptable `:authority` (or none), as tonic, go-spiffe and rust-spiffe clients send: the
//!   first block and every byte after it pass through untouched, and the server's HPACK decoder
//!   follows the client's encoder on its own. Such connections pay nothing after their first
//!   request.
//! - an `:authority` the `http` crate would refuse: from then on every header block (HEADERS plus
//!   any CONTINUATION) is decoded with the client's HPACK state and re-encoded as literals
//!   without indexing, the authority replaced by `localhost`; other frames pass untouched.
//!   Because nothing is indexed on the way in, the server's HPACK decoder never needs the
//!   client's dynamic table.
//!
//! The choice is per connection because HPACK state is: once blocks reach the server unchanged,
//! rewriting a later one would leave the two tables out of step. A client that changes its
//! authority mid-connection to one `h2` refuses sees that stream refused, as it would without
//! this filter; gRPC clients use one authority per channel.

mod first_block;

pub(crate) use first_block::authority_is_acceptable as first_block_is_acceptable;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Every HTTP/2 peer must accept frames of this size (RFC 9113 §4.2).
const MAX_FRAME: usize = 16_384;
/// A header block larger than this closes the connection; gRPC requests need a few hundred bytes.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Decoded size limit of one header list (name + value + 32 per field, as RFC 9113 counts it).
/// HPACK lets a few bytes reference a large table entry many times; without this bound a 64 KiB
/// block could expand to hundreds of megabytes before anyone is attested.
const MAX_DECODED_HEADER_LIST: usize = 64 * 1024;
/// A header block split over more frames than this closes the connection. Every peer accepts
/// 16 KiB frames, so a block of the largest allowed size needs five; empty CONTINUATION frames
/// would otherwise keep a block open, and its bookkeeping growing, for ever.
const MAX_HEADER_BLOCK_FRAMES: usize = 64;
/// The HPACK table size the server advertises (the HTTP/2 default, which `h2` keeps).
const HPACK_TABLE_SIZE: usize = 4096;
/// The value used in place of an authority `h2` would reject.
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// Wraps a server-side connection so that its client's header blocks reach the server in a form
/// `h2` accepts. Writes pass straight through.
pub struct AuthorityFix<IO> {
    inner: IO,
    /// Raw bytes read from the client, not yet processed.
    raw: BytesMut,
    /// Processed bytes ready for the server.
    ready: BytesMut,
    /// Where the parser is in the client's byte stream.
    state: ReadState,
    /// What this connection's header blocks need, decided by the first one.
    mode: Mode,
    /// The client's HPACK encoder state, mirrored (used while deciding and when rewriting).
    decoder: loona_hpack::Decoder<'static>,
    /// An unfinished header block: stream id, flags of its HEADERS frame, fragments so far.
    pending: Option<(u32, u8, BytesMut)>,
    /// The client ended the connection.
    eof: bool,
    /// Bounds every header block the client sends, in every mode.
    limits: HeaderBlockLimits,
}

/// Follows the frame boundaries of the client's byte stream (headers only, never copying a
/// payload) and closes the connection when one header block runs over its limits in frames or
/// bytes. This holds on the pass-through path too, where `h2` alone would see the frames.
struct HeaderBlockLimits {
    /// How much of the connection preface is still expected.
    preface_seen: usize,
    /// Not HTTP/2 with prior knowledge: the server refuses the connection on its own.
    off: bool,
    /// The frame header being read.
    header: [u8; FRAME_HEADER_LEN],
    /// How many bytes of `header` have arrived.
    header_len: usize,
    /// Payload bytes of the current frame still to skip.
    payload_left: usize,
    /// The header block the client has opened and not yet ended.
    open: Option<OpenBlock>,
}

/// A header block in progress.
#[derive(Clone, Copy)]
struct OpenBlock {
    /// Frames so far (HEADERS and CONTINUATION).
    frames: usize,
    /// Payload bytes so far.
    bytes: usize,
    /// When its HEADERS frame arrived.
    since: std::time::Instant,
}

impl HeaderBlockLimits {
    fn new() -> Self {
        Self {
            preface_seen: 0,
            off: false,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            payload_left: 0,
            open: None,
        }
    }

    /// Follows `bytes`, the next bytes from the client.
    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() && !self.off {
            if self.preface_seen < PREFACE.len() {
                let n = (PREFACE.len() - self.preface_seen).min(bytes.len());
                if bytes[..n] != PREFACE[self.preface_seen..self.preface_seen + n] {
                    self.off = true;
                    return Ok(());
                }
                self.preface_seen += n;
                bytes = &bytes[n..];
                continue;
            }
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == FRAME_HEADER_LEN {
                self.header_len = 0;
                self.frame(self.header)?;
            }
        }
        Ok(())
    }

    fn frame(&mut self, header: [u8; FRAME_HEADER_LEN]) -> io::Result<()> {
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let (frame_type, flags) = (header[3], header[4]);
        self.payload_left = len;
        let block = match (frame_type, self.open) {
            (TYPE_HEADERS, None) => OpenBlock {
                frames: 1,
                bytes: len,
                since: std::time::Instant::now(),
            },
            (TYPE_CONTINUATION, Some(open)) => OpenBlock {
                frames: open.frames + 1,
                bytes: open.bytes + len,
                ..open
            },
            // Out of order: the HTTP/2 server (or the rewriting parser) refuses it.
            _ => {
                self.open = None;
                return Ok(());
            }
        };
        if block.frames > MAX_HEADER_BLOCK_FRAMES {
            return Err(invalid(&format!(
                "header block split over more than {MAX_HEADER_BLOCK_FRAMES} frames"
            )));
        }
        if block.bytes > MAX_HEADER_BLOCK {
            return Err(invalid("header block larger than 64 KiB"));
        }
        self.open = (flags & FLAG_END_HEADERS == 0).then_some(block);
        Ok(())
    }
}

enum Mode {
    /// No header block has ended yet; the frames of the first are kept as they came.
    Deciding {
        /// The first header block's frames, byte for byte.
        raw_frames: BytesMut,
    },
    /// The first block's authority was acceptable: bytes pass through untouched.
    Transparent,
    /// The first block's authority was not: every header block is rewritten.
    Rewriting,
}

enum ReadState {
    /// Expecting (the rest of) the client connection preface.
    Preface,
    /// Expecting a frame header.
    FrameHeader,
    /// Copying the payload of a frame that needs no rewriting.
    PassThrough { remaining: usize },
}

impl<IO> AuthorityFix<IO> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: IO) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        Self {
            inner,
            raw: BytesMut::with_capacity(8 * 1024),
            ready: BytesMut::with_capacity(8 * 1024),
            state: ReadState::Preface,
            mode: Mode::Deciding {
                raw_frames: BytesMut::new(),
            },
            decoder,
            pending: None,
            eof: false,
            limits: HeaderBlockLimits::new(),
        }
    }

    /// When the client opened the header block it has not finished yet, if any.
    pub fn header_block_open_since(&self) -> Option<std::time::Instant> {
        self.limits.open.map(|block| block.since)
    }

    /// Moves as many processed bytes as possible from `raw` to `ready`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.state {
                ReadState::Preface => {
                    if self.raw.len() < PREFACE.len() {
                        return Ok(());
                    }
                    if &self.raw[..PREFACE.len()] != PREFACE {
                        // Not HTTP/2 with prior knowledge: let the server reject it.
                        self.state = ReadState::PassThrough {
                            remaining: usize::MAX,
                        };
                        continue;
                    }
                    self.ready.put(self.raw.split_to(PREFACE.len()));
                    self.state = ReadState::FrameHeader;
                }
                ReadState::PassThrough { remaining: 0 } => self.state = ReadState::FrameHeader,
                ReadState::PassThrough { remaining } => {
                    let n = remaining.min(self.raw.len());
                    if n == 0 {
                        return Ok(());
                    }
                    self.ready.put(self.raw.split_to(n));
                    self.state = match remaining - n {
                        0 => ReadState::FrameHeader,
                        left => ReadState::PassThrough { remaining: left },
                    };
                }
                ReadState::FrameHeader => {
                    if self.raw.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let len =
                        u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
                    let frame_type = self.raw[3];
                    if self.pending.is_some() && frame_type != TYPE_CONTINUATION {
                        // RFC 9113 §6.10: nothing may interleave with an open header block.
                        return Err(invalid("frame interleaved into an open header block"));
                    }
                    if frame_type != TYPE_HEADERS && frame_type != TYPE_CONTINUATION {
                        self.ready.put(self.raw.split_to(FRAME_HEADER_LEN));
                        self.state = ReadState::PassThrough { remaining: len };
                        continue;
                    }
                    if len > MAX_HEADER_BLOCK {
                        return Err(invalid("header frame larger than 64 KiB"));
                    }
                    if self.raw.len() < FRAME_HEADER_LEN + len {
                        return Ok(());
                    }
                    let header = self.raw.split_to(FRAME_HEADER_LEN);
                    let payload = self.raw.split_to(len);
                    if let Mode::Deciding { raw_frames } = &mut self.mode {
                        raw_frames.put_slice(&header);
                        raw_frames.put_slice(&payload);
                    }
                    let flags = header[4];
                    let stream_id =
                        u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                            & 0x7fff_ffff;
                    self.header_frame(frame_type, flags, stream_id, payload)?;
                }
            }
        }
    }

    fn header_frame(
        &mut self,
        frame_type: u8,
        flags: u8,
        stream_id: u32,
        mut payload: BytesMut,
    ) -> io::Result<()> {
        match (frame_type, &mut self.pending) {
            (TYPE_HEADERS, None) => {
                let mut pad = 0;
                if flags & FLAG_PADDED != 0 {
                    if payload.is_empty() {
                        return Err(invalid("padded HEADERS frame without a pad length"));
                    }
                    pad = payload.get_u8() as usize;
                }
                if flags & FLAG_PRIORITY != 0 {
                    if payload.len() < 5 {
                        return Err(invalid("HEADERS frame too short for its priority fields"));
                    }
                    // Priority signals are deprecated (RFC 9113 §5.3.2); dropping them is allowed.
                    payload.advance(5);
                }
                if pad > payload.len() {
                    return Err(invalid("HEADERS padding longer than the frame"));
                }
                payload.truncate(payload.len() - pad);
                self.pending = Some((stream_id, flags, payload));
            }
            (TYPE_CONTINUATION, Some((pending_id, _, block))) if *pending_id == stream_id => {
                if block.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(invalid("header block larger than 64 KiB"));
                }
                block.put(payload);
            }
            _ => return Err(invalid("HEADERS/CONTINUATION frames out of order")),
        }
        if flags & FLAG_END_HEADERS != 0 {
            let (stream_id, first_flags, block) = self.pending.take().expect("set above");
            if matches!(self.mode, Mode::Deciding { .. })
                && first_block::authority_is_acceptable(&block)
            {
                self.pass_first_block_untouched();
                return Ok(());
            }
            let (rewritten, authority_replaced) = self.rewrite_block(&block)?;
            if matches!(self.mode, Mode::Deciding { .. }) && !authority_replaced {
                self.pass_first_block_untouched();
                return Ok(());
            }
            self.mode = Mode::Rewriting;
            write_header_frames(
                &mut self.ready,
                stream_id,
                first_flags & FLAG_END_STREAM,
                &rewritten,
            );
        }
        Ok(())
    }

    /// Hands the first header block's frames over as they came, and everything after them.
    fn pass_first_block_untouched(&mut self) {
        if let Mode::Deciding { raw_frames } = std::mem::replace(&mut self.mode, Mode::Transparent)
        {
            self.ready.put(raw_frames);
        }
        self.state = ReadState::PassThrough {
            remaining: usize::MAX,
        };
    }

    /// Decodes one header block and re-encodes it as literals without indexing; true when its
    /// authority had to be replaced.
    fn rewrite_block(&mut self, block: &[u8]) -> io::Result<(BytesMut, bool)> {
        let mut out = BytesMut::with_capacity(block.len() * 2 + 64);
        let mut decoded = 0usize;
        let mut replaced = false;
        self.decoder
            .decode_with_cb(block, |name, value| {
                decoded += name.len() + value.len() + 32;
                if decoded > MAX_DECODED_HEADER_LIST {
                    // Keep decoding (the table must stay in step) but stop producing output.
                    return;
                }
                let value: &[u8] = if &*name == b":authority" && !is_valid_authority(&value) {
                    replaced = true;
                    REPLACEMENT_AUTHORITY
                } else {
                    &value
                };
                encode_literal(&mut out, &name, value);
            })
            .map_err(|e| invalid(&format!("HPACK decoding failed: {e:?}")))?;
        if decoded > MAX_DECODED_HEADER_LIST {
            return Err(invalid("decoded header list larger than 64 KiB"));
        }
        Ok((out, replaced))
    }
}

pub(crate) fn is_valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// HPACK "literal header field without indexing, new name" (RFC 7541 §6.2.2), no Huffman.
fn encode_literal(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0x00);
    encode_string(out, name);
    encode_string(out, value);
}

/// An HPACK string literal with a 7-bit length prefix (RFC 7541 §5.1–5.2), H = 0.
fn encode_string(out: &mut BytesMut, bytes: &[u8]) {
    let mut len = bytes.len();
    if len < 0x7f {
        out.put_u8(len as u8);
    } else {
        out.put_u8(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.put_u8((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        out.put_u8(len as u8);
    }
    out.put_slice(bytes);
}

/// Writes `block` as one HEADERS frame and as many CONTINUATION frames as needed.
fn write_header_frames(out: &mut BytesMut, stream_id: u32, end_stream: u8, block: &[u8]) {
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut first = true;
    if block.is_empty() {
        put_frame_header(
            out,
            0,
            TYPE_HEADERS,
            end_stream | FLAG_END_HEADERS,
            stream_id,
        );
        return;
    }
    while let Some(chunk) = chunks.next() {
        let (frame_type, mut flags) = if first {
            (TYPE_HEADERS, end_stream)
        } else {
            (TYPE_CONTINUATION, 0)
        };
        if chunks.peek().is_none() {
            flags |= FLAG_END_HEADERS;
        }
        put_frame_header(out, chunk.len(), frame_type, flags, stream_id);
        out.put_slice(chunk);
        first = false;
    }
}

fn put_frame_header(out: &mut BytesMut, len: usize, frame_type: u8, flags: u8, stream_id: u32) {
    out.put_slice(&(len as u32).to_be_bytes()[1..]);
    out.put_u8(frame_type);
    out.put_u8(flags);
    out.put_u32(stream_id);
}

fn invalid(reason: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason.to_owned())
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityFix<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.mode, Mode::Transparent) && this.ready.is_empty() && this.raw.is_empty() {
            let before = buf.filled().len();
            let read = Pin::new(&mut this.inner).poll_read(cx, buf);
            if let Poll::Ready(Ok(())) = &read
                && let Err(e) = this.limits.observe(&buf.filled()[before..])
            {
                // Nothing of what broke the limits reaches the server.
                buf.set_filled(before);
                return Poll::Ready(Err(e));
            }
            return read;
        }
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read_buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read_buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read_buf.filled().is_empty() => {
                    // End of stream: hand over whatever is left so the server sees the truncation.
                    this.eof = true;
                    let rest = this.raw.split();
                    this.ready.put(rest);
                }
                Poll::Ready(Ok(())) => {
                    this.limits.observe(read_buf.filled())?;
                    this.raw.put_slice(read_buf.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(frame_type: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame_header(&mut out, payload.len(), frame_type, flags, stream_id);
        out.put_slice(payload);
        out.to_vec()
    }

    /// Feeds `input` through the filter and returns what the server would read.
    async fn filter(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await.unwrap();
        drop(client);
        let mut fix = AuthorityFix::new(server);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn decode_headers(bytes: &[u8]) -> Vec<(Vec<(String, String)>, u8)> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut rest = &bytes[PREFACE.len()..];
        let mut blocks = Vec::new();
        while rest.len() >= FRAME_HEADER_LEN {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (frame_type, flags) = (rest[3], rest[4]);
            let payload = &rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
            if frame_type == TYPE_HEADERS {
                let fields = decoder
                    .decode(payload)
                    .unwrap()
                    .into_iter()
                    .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                    .collect();
                blocks.push((fields, flags));
            }
            rest = &rest[FRAME_HEADER_LEN + len..];
        }
        blocks
    }

    #[tokio::test]
    async fn replaces_a_percent_encoded_authority_across_indexed_requests() {
        let mut encoder = loona_hpack::Encoder::new();
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", b"run%2Ftessera%2Fagent.sock"),
            (b"workload.spiffe.io", b"true"),
        ];
        let first = encoder.encode(headers.clone());
        // The second request is all dynamic-table references in a real client; the encoder
        // produces the same here.
        let second = encoder.encode(headers);
        assert!(second.len() < first.len());

        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(0x4, 0x1, 0, &[])); // SETTINGS ACK: an empty payload
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &first));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        // The next block split over HEADERS + CONTINUATION, with padding and priority.
        let (a, b) = second.split_at(second.len() / 2);
        let mut padded = vec![3u8];
        padded.extend([0, 0, 0, 0, 16]);
        padded.extend(a);
        padded.extend([0, 0, 0]);
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            3,
            &padded,
        ));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, b));

        let out = filter(input).await.unwrap();
        let blocks = decode_headers(&out);
        assert_eq!(blocks.len(), 2);
        for (fields, _) in &blocks {
            let authority = fields.iter().find(|(n, _)| n == ":authority").unwrap();
            assert_eq!(authority.1, "localhost");
            assert!(
                fields
                    .iter()
                    .any(|(n, v)| n == ":path" && v == "/SpiffeWorkloadAPI/FetchX509SVID")
            );
        }
        assert_eq!(blocks[1].1, FLAG_END_STREAM | FLAG_END_HEADERS);
        // Non-header frames are untouched.
        assert!(
            out.windows(14)
                .any(|w| w == frame(0x0, FLAG_END_STREAM, 1, b"\0\0\0\0\0").as_slice())
        );
    }

    #[tokio::test]
    async fn a_connection_whose_first_authority_is_valid_passes_untouched() {
        let mut encoder = loona_hpack::Encoder::new();
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
            (b":authority", b"localhost:8080"),
        ];
        let first = encoder.encode(headers.clone());
        let second = encoder.encode(headers);
        // A later authority `h2` refuses is not rewritten: the server's HPACK table follows the
        // client's from the first block on, and must go on doing so.
        let third = encoder.encode(vec![(&b":authority"[..], &b"run%2Fagent.sock"[..])]);
        let (a, b) = second.split_at(1);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &first,
        ));
        input.extend(frame(TYPE_HEADERS, 0, 3, a));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, b));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 5, &third));
        input.extend(frame(0x0, FLAG_END_STREAM, 5, b"\0\0\0\0\0"));
        assert_eq!(filter(input.clone()).await.unwrap(), input);
    }

    #[tokio::test]
    async fn rewrites_valid_authorities_once_rewriting_and_splits_large_blocks() {
        let mut encoder = loona_hpack::Encoder::new();
        let fixed = encoder.encode(vec![(&b":authority"[..], &b"run%2Fagent.sock"[..])]);
        let big = "x".repeat(20_000);
        let block = encoder.encode(vec![
            (&b":authority"[..], &b"localhost:8080"[..]),
            (&b"x-big"[..], big.as_bytes()),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &fixed));
        let fixed_len = FRAME_HEADER_LEN + 2 + ":authority".len() + 1 + "localhost".len();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &block));
        let mut out = filter(input).await.unwrap();
        let first_block = decode_headers(&out[..24 + fixed_len]);
        assert_eq!(
            first_block[0].0,
            [(":authority".into(), "localhost".into())]
        );
        out.drain(24..24 + fixed_len);
        // HEADERS + CONTINUATION, each within the 16 KiB every peer accepts.
        let first_len = u32::from_be_bytes([0, out[24], out[25], out[26]]) as usize;
        assert_eq!(first_len, MAX_FRAME);
        assert_eq!(out[24 + 3], TYPE_HEADERS);
        assert_eq!(out[24 + 4] & FLAG_END_HEADERS, 0);
        let second = 24 + FRAME_HEADER_LEN + first_len;
        assert_eq!(out[second + 3], TYPE_CONTINUATION);
        assert_eq!(out[second + 4], FLAG_END_HEADERS);
        let mut joined = out[24 + 9..24 + 9 + first_len].to_vec();
        joined.extend(&out[second + 9..]);
        let fields = loona_hpack::Decoder::new().decode(&joined).unwrap();
        assert_eq!(fields[0].1, b"localhost:8080");
        assert_eq!(fields[1].1.len(), 20_000);
    }

    #[tokio::test]
    async fn an_hpack_bomb_closes_the_connection() {
        // One 4000-byte table entry, then referenced (one byte each) thousands of times.
        let mut encoder = loona_hpack::Encoder::new();
        let big = "v".repeat(4000);
        let mut block = encoder.encode(vec![(&b"x-big"[..], big.as_bytes())]);
        block.extend(std::iter::repeat_n(0x80 | 62, 16_000));
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        let err = filter(input).await.unwrap_err();
        assert!(err.to_string().contains("larger than 64 KiB"), "{err}");
    }

    /// HEADERS without END_HEADERS, then `count` empty CONTINUATION frames on stream `id`.
    fn endless_block(id: u32, count: usize) -> Vec<u8> {
        let mut out = frame(TYPE_HEADERS, 0, id, &[0x82]);
        for _ in 0..count {
            out.extend(frame(TYPE_CONTINUATION, 0, id, &[]));
        }
        out
    }

    #[tokio::test]
    async fn a_header_block_of_endless_empty_frames_closes_the_connection() {
        // Before any block has ended (the filter is still deciding).
        let mut input = PREFACE.to_vec();
        input.extend(endless_block(1, 10_000));
        let err = filter(input).await.unwrap_err();
        assert!(err.to_string().contains("more than 64 frames"), "{err}");

        // After a first block that passes through untouched: the bytes go straight to the
        // server, and the bound holds there too.
        let mut encoder = loona_hpack::Encoder::new();
        let first = encoder.encode(vec![(&b":authority"[..], &b"localhost"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &first));
        input.extend(frame(0x0, 0, 1, &[0; 100_000 % MAX_FRAME]));
        input.extend(endless_block(3, 10_000));
        let err = filter(input).await.unwrap_err();
        assert!(err.to_string().contains("more than 64 frames"), "{err}");

        // A block that ends within the limits passes.
        let mut input = PREFACE.to_vec();
        input.extend(endless_block(1, MAX_HEADER_BLOCK_FRAMES - 2));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[]));
        assert!(filter(input).await.is_ok());
    }

    #[tokio::test]
    async fn a_large_block_in_small_frames_closes_the_passed_through_connection() {
        let mut encoder = loona_hpack::Encoder::new();
        let first = encoder.encode(vec![(&b":authority"[..], &b"localhost"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &first));
        input.extend(frame(TYPE_HEADERS, 0, 3, &[0x82; MAX_FRAME]));
        for _ in 0..4 {
            input.extend(frame(TYPE_CONTINUATION, 0, 3, &[0x82; MAX_FRAME]));
        }
        let err = filter(input).await.unwrap_err();
        assert!(err.to_string().contains("larger than 64 KiB"), "{err}");
    }

    #[tokio::test]
    async fn frames_interleaved_into_a_header_block_close_the_connection() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode(vec![(&b":authority"[..], &b"localhost"[..])]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, 0, 1, &block[..1]));
        input.extend(frame(0x8, 0, 0, &[0, 0, 1, 0])); // WINDOW_UPDATE inside the block
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block[1..]));
        let err = filter(input).await.unwrap_err();
        assert!(err.to_string().contains("interleaved"), "{err}");
    }

    #[tokio::test]
    async fn garbage_closes_the_connection_instead_of_panicking() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff],
        ));
        assert!(filter(input).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82]));
        assert!(filter(input).await.is_err());
        // A non-HTTP/2 client is passed through for the server to refuse.
        assert_eq!(
            filter(b"GET / HTTP/1.1\r\n\r\n".repeat(3))
                .await
                .unwrap()
                .len(),
            54
        );
    }
}
