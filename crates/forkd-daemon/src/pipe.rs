//! Streams between a blocking operation and an HTTP body, both ways.
//!
//! A download runs its operation on a thread of its own, writing into a
//! [`Sink`]; the answer waits for the first piece, so an operation that
//! fails before it produced anything (no such file, no such process) still
//! answers with a proper error status, while one that fails half-way breaks
//! the body off (raw bytes) or ends it with an error line (NDJSON), which
//! a client can tell from a complete answer. An upload arrives as a
//! [`BodyReader`], which the server feeds from the request body as the
//! operation reads, so neither direction is buffered whole.

use std::io::{self, Read, Write};

use forkd_api::ApiError;
use forkd_ops::OpError;
use tokio::sync::mpsc;

/// One piece of a streamed answer.
pub enum Piece {
    Data(Vec<u8>),
    /// The operation failed after the answer started: break the body off.
    Failed(OpError),
}

/// A streamed answer, once its first piece is known.
pub struct Streamed {
    pub content_type: &'static str,
    pub first: Option<Vec<u8>>,
    pub rest: mpsc::Receiver<Piece>,
}

/// Chunks a [`Sink`] sends at most (and gathers at least, between flushes).
const CHUNK: usize = 64 << 10;

/// Where a streaming operation writes. Writes fail with `BrokenPipe` once
/// the client has gone, which stops the operation.
pub struct Sink {
    tx: mpsc::Sender<Piece>,
    buf: Vec<u8>,
    sent: bool,
}

impl Sink {
    /// Sends one whole piece now (an NDJSON line); false when the client
    /// has gone.
    pub fn send(&mut self, data: Vec<u8>) -> bool {
        if self.flush().is_err() {
            return false;
        }
        self.sent = true;
        self.tx.blocking_send(Piece::Data(data)).is_ok()
    }

    /// Whether the client has gone (the answer's body was dropped).
    pub fn closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Whether anything reached the answer yet.
    pub fn started(&self) -> bool {
        self.sent || !self.buf.is_empty()
    }
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.sent = true;
        let piece = Piece::Data(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(piece)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

/// Makes the last piece of a body from an error that came after the body
/// started (`None`: break the body off instead).
pub type LateError = fn(&OpError) -> Option<Vec<u8>>;

/// Runs `op` on a thread of its own, writing into a [`Sink`]; answers once
/// the first piece exists (or `op` ended). When `op` fails after the answer
/// started, `late_error` makes the body's last piece (an NDJSON error
/// line), or, when it gives none, the body breaks off. Must be called from
/// a blocking thread.
pub fn produce<F>(
    name: String,
    content_type: &'static str,
    late_error: LateError,
    op: F,
) -> Result<Streamed, ApiError>
where
    F: FnOnce(&mut Sink) -> Result<(), OpError> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Piece>(8);
    let (first_tx, first_rx) = std::sync::mpsc::sync_channel::<Result<(), OpError>>(1);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut sink = Sink {
                tx,
                buf: Vec::new(),
                sent: false,
            };
            let result = op(&mut sink).and_then(|()| {
                sink.flush()
                    .map_err(|e| OpError::internal(format!("sending the answer: {e}")))
            });
            match result {
                Ok(()) => {
                    let _ = first_tx.send(Ok(()));
                }
                Err(e) if !sink.started() => {
                    let _ = first_tx.send(Err(e));
                }
                Err(e) => {
                    // What was produced before the failure still goes out.
                    let _ = sink.flush();
                    let piece = match late_error(&e) {
                        Some(line) => Piece::Data(line),
                        None => Piece::Failed(e),
                    };
                    let _ = sink.tx.blocking_send(piece);
                }
            }
        })
        .map_err(|e| ApiError::Internal(format!("starting a stream: {e}")))?;
    // The first piece, or the end of an operation that produced none.
    match rx.blocking_recv() {
        Some(Piece::Data(d)) => Ok(Streamed {
            content_type,
            first: Some(d),
            rest: rx,
        }),
        Some(Piece::Failed(e)) => Err(e.into()),
        None => match first_rx.recv() {
            Ok(Ok(())) => Ok(Streamed {
                content_type,
                first: None,
                rest: rx,
            }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ApiError::Internal(
                "the operation's thread ended without an answer".into(),
            )),
        },
    }
}

/// A request body as a blocking reader, fed by the server.
pub struct BodyReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl BodyReader {
    /// A reader and the sender the server feeds it with (an `Err` ends it
    /// with that error: the client broke the upload off).
    pub fn new() -> (BodyReader, mpsc::Sender<io::Result<Vec<u8>>>) {
        let (tx, rx) = mpsc::channel(8);
        (
            BodyReader {
                rx,
                cur: Vec::new(),
                pos: 0,
            },
            tx,
        )
    }
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces after the first: bytes, or the failure's message.
    type Rest = Vec<Result<Vec<u8>, String>>;

    fn collect(s: Streamed) -> (Option<Vec<u8>>, Rest) {
        let Streamed {
            first, mut rest, ..
        } = s;
        let mut pieces = Vec::new();
        while let Some(p) = rest.blocking_recv() {
            pieces.push(match p {
                Piece::Data(d) => Ok(d),
                Piece::Failed(e) => Err(e.message),
            });
        }
        (first, pieces)
    }

    #[test]
    fn an_operation_that_fails_at_once_is_an_error_answer() {
        let r = produce(
            "t".into(),
            "x",
            |_| None,
            |_| Err(OpError::bad_input("no such file")),
        );
        assert_eq!(r.err().unwrap().status(), 400);
    }

    #[test]
    fn bytes_arrive_in_order_and_a_late_failure_breaks_the_body_off() {
        let s = produce(
            "t".into(),
            "x",
            |_| None,
            |sink| {
                sink.write_all(&vec![1u8; CHUNK + 10]).unwrap();
                sink.write_all(b"tail").unwrap();
                Err(OpError::internal("the guest died"))
            },
        )
        .unwrap();
        let (first, rest) = collect(s);
        assert_eq!(first.unwrap().len(), CHUNK + 10);
        assert_eq!(rest[0].as_deref().unwrap(), b"tail");
        assert_eq!(rest[1].as_ref().unwrap_err(), "the guest died");
    }

    #[test]
    fn a_late_failure_can_end_with_a_line_instead() {
        let s = produce(
            "t".into(),
            "x",
            |e| Some(e.message.clone().into_bytes()),
            |sink| {
                assert!(sink.send(b"line\n".to_vec()));
                Err(OpError::internal("gone"))
            },
        )
        .unwrap();
        let (first, rest) = collect(s);
        assert_eq!(first.unwrap(), b"line\n");
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].as_deref().unwrap(), b"gone");
    }

    #[test]
    fn an_empty_answer_is_fine() {
        let s = produce("t".into(), "x", |_| None, |_| Ok(())).unwrap();
        let (first, rest) = collect(s);
        assert!(first.is_none() && rest.is_empty());
    }

    #[test]
    fn the_body_reader_reads_across_chunks_and_reports_a_broken_upload() {
        let (mut r, tx) = BodyReader::new();
        std::thread::spawn(move || {
            tx.blocking_send(Ok(b"ab".to_vec())).unwrap();
            tx.blocking_send(Ok(b"cde".to_vec())).unwrap();
        });
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"abcde");
        let (mut r, tx) = BodyReader::new();
        std::thread::spawn(move || {
            tx.blocking_send(Ok(b"ab".to_vec())).unwrap();
            tx.blocking_send(Err(io::Error::other("reset"))).unwrap();
        });
        let mut all = Vec::new();
        assert!(r.read_to_end(&mut all).is_err());
    }
}
