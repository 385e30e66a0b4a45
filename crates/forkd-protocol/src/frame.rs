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
//! data and replies to the request that caused them. This module is pure: it
//! reads from any `Read` and never allocates more than [`MAX_PAYLOAD`] for one frame.

use std::io::{self, Read, Write};

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"FK";
/// Protocol version carried in every frame header.
pub const VERSION: u8 = 1;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload either side accepts; a larger frame is skipped and answered
/// with an error, never buffered.
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// Size of the data chunks (stdout, stderr, stdin, file contents) senders use.
pub const CHUNK: usize = 64 * 1024;

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
            _ => return None,
        })
    }
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
/// reader has consumed the bad frame (or byte) and the stream can be read on.
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
        "frame {id} payload is {len} bytes, larger than the {MAX_PAYLOAD}-byte limit; skipped"
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

/// Reads frames from a byte stream, resynchronising on the magic after garbage.
pub struct FrameReader<R> {
    inner: R,
    /// Bytes read ahead while hunting for a magic; consumed before `inner`.
    pushback: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            pushback: Vec::new(),
        }
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads exactly `buf.len()` bytes; a clean EOF before the first byte is `Eof`.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<(), FrameError> {
        let mut done = 0;
        if !self.pushback.is_empty() {
            let n = self.pushback.len().min(buf.len());
            buf[..n].copy_from_slice(&self.pushback[..n]);
            self.pushback.drain(..n);
            done = n;
        }
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(if done == 0 {
                        FrameError::Eof
                    } else {
                        FrameError::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed in the middle of a frame",
                        ))
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Discards `n` bytes.
    fn skip(&mut self, mut n: u64) -> Result<(), FrameError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            self.read_full(&mut buf[..want])?;
            n -= want as u64;
        }
        Ok(())
    }

    /// Reads one frame.
    ///
    /// On a bad magic the reader consumes bytes up to the next `"FK"` and returns
    /// `BadMagic`; the next call reads the frame that starts there. Oversized,
    /// unknown-kind and wrong-version frames are consumed whole, so every error
    /// but `Eof` and `Io` leaves the stream readable.
    pub fn read_frame(&mut self) -> Result<Frame, FrameError> {
        let mut hb = [0u8; HEADER_LEN];
        self.read_full(&mut hb)?;
        let header = match Header::parse(&hb) {
            Some(h) => h,
            None => {
                let found = [hb[0], hb[1]];
                self.resync(&hb[1..])?;
                return Err(FrameError::BadMagic { found });
            }
        };
        if header.len > MAX_PAYLOAD {
            self.skip(u64::from(header.len))?;
            return Err(FrameError::Oversized {
                id: header.id,
                len: header.len,
            });
        }
        let mut payload = vec![0u8; header.len as usize];
        self.read_full(&mut payload)?;
        if header.version != VERSION {
            return Err(FrameError::BadVersion {
                id: header.id,
                version: header.version,
            });
        }
        let kind = Kind::from_u8(header.kind).ok_or(FrameError::UnknownKind {
            id: header.id,
            kind: header.kind,
        })?;
        Ok(Frame {
            kind,
            id: header.id,
            payload,
        })
    }

    /// Consumes bytes until a magic is next in the stream (it stays unread).
    fn resync(&mut self, seen: &[u8]) -> Result<(), FrameError> {
        let mut window: Vec<u8> = seen.to_vec();
        window.append(&mut self.pushback);
        loop {
            if let Some(pos) = window.windows(2).position(|w| w == MAGIC) {
                self.pushback = window.split_off(pos);
                return Ok(());
            }
            // Keep the last byte: it may be the 'F' of a magic split across reads.
            let last = window.last().copied();
            window.clear();
            window.extend(last);
            let mut b = [0u8; 256];
            let n = loop {
                match self.inner.read(&mut b) {
                    Ok(0) => return Err(FrameError::Eof),
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            };
            window.extend_from_slice(&b[..n]);
        }
    }
}
