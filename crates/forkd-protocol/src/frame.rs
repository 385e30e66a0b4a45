//! Framing: every message on the agent channel is a 12-byte header and a payload.
//!
//! ```text
//! 0      2        3      4          8           12
//! | "FK" | version | kind | id (BE)  | len (BE)  | payload (len bytes) ...
//! ```
//!
//! The magic lets a reader resynchronise after garbage (a stale half-frame left
//! in the virtio-serial pipe by an earlier connection, or a malformed frame); the
//! version byte lets both sides refuse a peer they do not understand; `id` ties
//! data and replies to the request that caused them.
//!
//! This module is pure. [`FrameDecoder`] turns bytes pushed into it into frames
//! and never holds more than [`DECODER_CAPACITY`] bytes, whatever it is fed: a
//! header announcing more than [`MAX_PAYLOAD`] is reported and treated as
//! garbage (never an allocation, never a skip of the announced length), and
//! garbage is discarded as it is scanned. [`FrameReader`] drives a decoder from
//! any `Read`. Policies that need a clock (how long a half frame may wait, how
//! much garbage a session tolerates) belong to the callers; the decoder exposes
//! what they need to decide.

use std::io::{self, Read, Write};

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"FK";
/// Protocol version carried in every frame header.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload either side accepts; a header announcing more is reported
/// as an error and its bytes are scanned as garbage, never buffered or skipped.
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// Most bytes a [`FrameDecoder`] ever buffers: one frame of the largest size.
pub const DECODER_CAPACITY: usize = HEADER_LEN + MAX_PAYLOAD as usize;
/// Size of the data chunks (stdout, stderr, stdin, file contents) senders use.
pub const CHUNK: usize = 64 * 1024;
/// Flow-control window of a windowed request (see
/// [`crate::Request::is_windowed`]): data bytes a sender may have in flight
/// for one request before the receiver grants more with a `Window` frame.
pub const WINDOW: u32 = 256 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// host -> agent: start of a session (JSON [`crate::Hello`]).
    Hello = 1,
    /// agent -> host: answer to `Hello`, echoing its nonce (JSON [`crate::HelloAck`]).
    HelloAck = 2,
    /// host -> agent: a request (JSON [`crate::Request`]).
    Request = 3,
    /// agent -> host: the last frame for a request id (JSON [`crate::Response`]).
    Response = 4,
    /// agent -> host: bytes a command wrote to stdout.
    Stdout = 5,
    /// agent -> host: bytes a command wrote to stderr.
    Stderr = 6,
    /// host -> agent: bytes for a command's stdin; an empty payload closes it.
    Stdin = 7,
    /// either way: file contents; an empty payload ends the file.
    Data = 8,
    /// agent -> host: a notice within a streaming request (JSON [`crate::Event`]).
    Event = 9,
    /// either way: flow control for a windowed request; the payload is a
    /// 4-byte big-endian count of further data bytes the sender of this frame
    /// is ready to receive for the request (see [`WINDOW`]).
    Window = 10,
    /// agent -> host: bytes a process wrote to its pseudo-terminal.
    Pty = 11,
}

impl Kind {
    /// Decodes a kind byte, `None` when unknown.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Request,
            4 => Kind::Response,
            5 => Kind::Stdout,
            6 => Kind::Stderr,
            7 => Kind::Stdin,
            8 => Kind::Data,
            9 => Kind::Event,
            10 => Kind::Window,
            11 => Kind::Pty,
            _ => return None,
        })
    }

    /// Whether frames of this kind carry stream bytes that count against a
    /// windowed request's flow-control window.
    pub fn is_data(self) -> bool {
        matches!(
            self,
            Kind::Stdout | Kind::Stderr | Kind::Stdin | Kind::Data | Kind::Pty
        )
    }
}

/// The payload of a `Window` frame granting `bytes`.
pub fn window_payload(bytes: u32) -> [u8; 4] {
    bytes.to_be_bytes()
}

/// The grant a `Window` frame's payload carries; `None` unless it is exactly
/// 4 bytes.
pub fn parse_window(payload: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(payload.try_into().ok()?))
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub id: u32,
    pub payload: Vec<u8>,
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub kind: u8,
    pub id: u32,
    pub len: u32,
}

impl Header {
    /// Encodes the header bytes.
    pub fn encode(kind: Kind, id: u32, len: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&MAGIC);
        h[2] = VERSION;
        h[3] = kind as u8;
        h[4..8].copy_from_slice(&id.to_be_bytes());
        h[8..12].copy_from_slice(&len.to_be_bytes());
        h
    }

    /// Parses header bytes; `None` when the magic is wrong.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Option<Header> {
        if b[0..2] != MAGIC {
            return None;
        }
        Some(Header {
            version: b[2],
            kind: b[3],
            id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            len: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        })
    }
}

/// Why a frame could not be read. All but `Io` and `Eof` are recoverable: the
/// decoder has consumed the bad frame (or bytes) and the stream can be read on.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Eof,
    #[error("i/o error on the agent channel: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame magic {found:02x?}: stream out of sync; skipping to the next frame")]
    BadMagic { found: [u8; 2] },
    #[error("frame {id} has protocol version {version}, this side speaks {VERSION}")]
    BadVersion { id: u32, version: u8 },
    #[error("frame {id} has unknown kind {kind}")]
    UnknownKind { id: u32, kind: u8 },
    #[error(
        "frame {id} payload is {len} bytes, larger than the {MAX_PAYLOAD}-byte limit; its header is treated as garbage"
    )]
    Oversized { id: u32, len: u32 },
}

impl FrameError {
    /// True when the stream can still be read after this error.
    pub fn is_recoverable(&self) -> bool {
        !matches!(self, FrameError::Eof | FrameError::Io(_))
    }

    /// The request id the bad frame carried, when known.
    pub fn frame_id(&self) -> Option<u32> {
        match self {
            FrameError::BadVersion { id, .. }
            | FrameError::UnknownKind { id, .. }
            | FrameError::Oversized { id, .. } => Some(*id),
            _ => None,
        }
    }
}

/// Writes one frame. Payloads larger than [`MAX_PAYLOAD`] are a caller bug and
/// are refused with `InvalidInput`.
pub fn write_frame<W: Write + ?Sized>(
    w: &mut W,
    kind: Kind,
    id: u32,
    payload: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame payload of {} bytes exceeds the limit", payload.len()),
            )
        })?;
    // One write for header and payload: the channel is shared by several writer
    // threads behind a mutex, and fewer syscalls is cheaper over virtio-serial.
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&Header::encode(kind, id, len));
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// Turns a byte stream into frames, resynchronising on the magic after garbage.
///
/// Push bytes with [`Self::push`], take frames with [`Self::next_frame`] until
/// it returns `None`, push more. Memory stays below [`DECODER_CAPACITY`]:
/// `push` takes only what fits, and a full decoder always has a frame or an
/// error to give, so taking them always makes room.
///
/// Garbage (bytes before a magic, a header announcing more than
/// [`MAX_PAYLOAD`]) is reported once per run as `BadMagic` or `Oversized` and
/// then discarded silently until the next frame; [`Self::discarded`] counts
/// it for callers that bound how much garbage they tolerate.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// The bytes being discarded belong to a run already reported.
    in_garbage: bool,
    /// Bytes discarded or rejected since the last frame decoded whole.
    discarded: u64,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes; returns how many were taken: fewer than `bytes.len()`
    /// only when the decoder is full (take frames out, then push the rest).
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.space());
        self.buf.extend_from_slice(&bytes[..n]);
        n
    }

    /// How many bytes [`Self::push`] would take now.
    pub fn space(&self) -> usize {
        DECODER_CAPACITY - self.buf.len()
    }

    /// Bytes held: the start of a frame that has not arrived whole, or a
    /// trailing `F` that may begin a magic.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes thrown away or rejected (garbage, oversized headers, frames of
    /// another version or an unknown kind) since the last good frame.
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Whether the held bytes begin with a frame magic (a frame cut short
    /// when the stream ends here).
    pub fn holds_frame_start(&self) -> bool {
        self.buf.len() >= MAGIC.len() && self.buf[..MAGIC.len()] == MAGIC
    }

    /// The header of the incomplete frame held, once its 12 bytes are in.
    pub fn pending_header(&self) -> Option<Header> {
        let hb: &[u8; HEADER_LEN] = self.buf.get(..HEADER_LEN)?.try_into().ok()?;
        Header::parse(hb)
    }

    /// The next frame or error the pushed bytes hold; `None` when more bytes
    /// are needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        loop {
            let first = *self.buf.first()?;
            if first != MAGIC[0] || self.buf.get(1).is_some_and(|b| *b != MAGIC[1]) {
                // Garbage up to the next byte that may start a magic.
                let next = magic_candidate(&self.buf[1..]).map_or(self.buf.len(), |i| i + 1);
                let found = [first, self.buf.get(1).copied().unwrap_or(0)];
                self.consume(next, true);
                if !self.in_garbage {
                    self.in_garbage = true;
                    return Some(Err(FrameError::BadMagic { found }));
                }
                continue;
            }
            let hb: &[u8; HEADER_LEN] = self.buf.get(..HEADER_LEN)?.try_into().ok()?;
            let header = Header::parse(hb)?;
            if header.len > MAX_PAYLOAD {
                // Not a frame we will ever read: drop the `F` and scan on, so
                // a forged or corrupted header swallows nothing that follows.
                self.consume(1, true);
                self.in_garbage = true;
                return Some(Err(FrameError::Oversized {
                    id: header.id,
                    len: header.len,
                }));
            }
            let total = HEADER_LEN + header.len as usize;
            if self.buf.len() < total {
                return None;
            }
            let payload = self.buf[HEADER_LEN..total].to_vec();
            self.in_garbage = false;
            if header.version != VERSION {
                self.consume(total, true);
                return Some(Err(FrameError::BadVersion {
                    id: header.id,
                    version: header.version,
                }));
            }
            let Some(kind) = Kind::from_u8(header.kind) else {
                self.consume(total, true);
                return Some(Err(FrameError::UnknownKind {
                    id: header.id,
                    kind: header.kind,
                }));
            };
            self.consume(total, false);
            self.discarded = 0;
            return Some(Ok(Frame {
                kind,
                id: header.id,
                payload,
            }));
        }
    }

    /// Forgets everything held (a new connection starts from nothing).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.in_garbage = false;
        self.discarded = 0;
    }

    fn consume(&mut self, n: usize, discard: bool) {
        self.buf.drain(..n);
        if discard {
            self.discarded = self.discarded.saturating_add(n as u64);
        }
    }
}

/// Index of the first byte that may start a magic: an `F` followed by `K`
/// or by the end of `bytes`.
fn magic_candidate(bytes: &[u8]) -> Option<usize> {
    bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == MAGIC[0])
        .map(|(i, _)| i)
        .find(|&i| bytes.get(i + 1).is_none_or(|b| *b == MAGIC[1]))
}

/// Reads frames from a byte stream through a [`FrameDecoder`].
///
/// A read that fails (a timeout included) loses nothing: the decoder keeps the
/// part of a frame read so far and the next call goes on from there.
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    chunk: Box<[u8]>,
}

/// Bytes asked of the underlying reader at once.
const READ_CHUNK: usize = 64 * 1024;

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            decoder: FrameDecoder::new(),
            chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
        }
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The reader and the decoder with the bytes read ahead.
    pub fn into_parts(self) -> (R, FrameDecoder) {
        (self.inner, self.decoder)
    }

    /// Reads one frame.
    ///
    /// Garbage is reported once as `BadMagic` and skipped; a header announcing
    /// more than [`MAX_PAYLOAD`] is reported as `Oversized` and scanned past
    /// as garbage; frames of another version or an unknown kind are consumed
    /// whole. Every error but `Eof` and `Io` leaves the stream readable, and
    /// so does an `Io` timeout.
    pub fn read_frame(&mut self) -> Result<Frame, FrameError> {
        loop {
            if let Some(r) = self.decoder.next_frame() {
                return r;
            }
            let want = self.decoder.space().min(self.chunk.len());
            match self.inner.read(&mut self.chunk[..want]) {
                Ok(0) if self.decoder.holds_frame_start() => {
                    return Err(FrameError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of a frame",
                    )))
                }
                Ok(0) => return Err(FrameError::Eof),
                Ok(n) => {
                    self.decoder.push(&self.chunk[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
