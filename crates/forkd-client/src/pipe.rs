//! An in-process pipe of byte chunks between two threads: one side reads
//! (`Read`) what the other writes (`Write`), a few chunks ahead at most.
//! Unlike an OS pipe, a side that gives up early never raises SIGPIPE: the
//! writer just gets `BrokenPipe`, and the reader sees the end (or the error
//! the writer [`PipeWriter::fail`]ed with).

use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// Chunks a writer gathers before it hands them over.
const CHUNK: usize = 256 << 10;

/// A connected reader and writer, `depth` chunks of slack between them.
pub fn pipe(depth: usize) -> (PipeReader, PipeWriter) {
    let (tx, rx) = sync_channel(depth);
    (
        PipeReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        },
        PipeWriter {
            tx,
            buf: Vec::new(),
        },
    )
}

/// The reading end.
pub struct PipeReader {
    rx: Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The writing end; dropping it (after a flush) is the end of the stream.
pub struct PipeWriter {
    tx: SyncSender<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl PipeWriter {
    /// Ends the stream with an error the reader will see.
    pub fn fail(mut self, e: io::Error) {
        self.buf.clear();
        let _ = self.tx.send(Err(e));
    }
}

impl Write for PipeWriter {
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
        self.tx
            .send(Ok(std::mem::take(&mut self.buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reading side stopped"))
    }
}

impl Drop for PipeWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_pass_in_order_and_errors_and_early_ends_are_seen() {
        let (mut r, mut w) = pipe(2);
        let t = std::thread::spawn(move || {
            for i in 0..1000u32 {
                w.write_all(&i.to_le_bytes()).unwrap();
            }
        });
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        t.join().unwrap();
        assert_eq!(all.len(), 4000);
        assert_eq!(&all[3996..], &999u32.to_le_bytes());

        let (mut r, mut w) = pipe(2);
        w.write_all(b"partial").unwrap();
        w.flush().unwrap();
        w.fail(io::Error::other("source broke"));
        let mut all = Vec::new();
        assert_eq!(
            r.read_to_end(&mut all).unwrap_err().to_string(),
            "source broke"
        );

        let (r, mut w) = pipe(1);
        drop(r);
        w.write_all(&[0; CHUNK]).unwrap_err();
    }
}
