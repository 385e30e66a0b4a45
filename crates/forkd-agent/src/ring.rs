//! The output backlog of an agent process: a byte ring with absolute
//! offsets, so that each attachment is just a cursor into it.
//!
//! Pure data structure, no I/O. Bytes are kept in the order they were read,
//! each chunk tagged with the stream it came from; when the ring is over its
//! capacity the oldest bytes go (a chunk may be cut at its front). A reader
//! whose cursor points at bytes already gone learns how many it lost and
//! where to go on.

use std::collections::VecDeque;

/// Which descriptor a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Stdout,
    Stderr,
    Pty,
}

/// What a reader at some cursor gets next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    /// The bytes at the cursor are gone: `lost` bytes, go on at `resume`.
    Gap { lost: u64, resume: u64 },
    /// Bytes from one source starting at the cursor.
    Data(Source, &'a [u8]),
    /// Nothing beyond the cursor yet.
    Empty,
}

/// A bounded backlog of output.
#[derive(Debug)]
pub struct Ring {
    cap: usize,
    chunks: VecDeque<(Source, Vec<u8>)>,
    /// Absolute offset of the first byte held.
    start: u64,
    /// Bytes held.
    len: usize,
}

impl Ring {
    /// A ring that holds at most `cap` bytes (at least 1).
    pub fn new(cap: usize) -> Ring {
        Ring {
            cap: cap.max(1),
            chunks: VecDeque::new(),
            start: 0,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Offset of the oldest byte held.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Offset one past the newest byte.
    pub fn end(&self) -> u64 {
        self.start + self.len as u64
    }

    /// Appends `bytes`; returns how many old bytes were dropped for room.
    pub fn push(&mut self, source: Source, bytes: &[u8]) -> u64 {
        if bytes.is_empty() {
            return 0;
        }
        // More than fits at once: only its tail can stay.
        let keep = bytes.len().min(self.cap);
        let cut = (bytes.len() - keep) as u64;
        let tail = &bytes[bytes.len() - keep..];
        let mut dropped = 0u64;
        while self.len + tail.len() > self.cap {
            let excess = self.len + tail.len() - self.cap;
            let Some((_, front)) = self.chunks.front_mut() else {
                break;
            };
            if front.len() <= excess {
                let n = front.len();
                self.chunks.pop_front();
                self.advance(n);
                dropped += n as u64;
            } else {
                front.drain(..excess);
                self.advance(excess);
                dropped += excess as u64;
            }
        }
        if cut > 0 {
            // The cut-off head of `bytes` was never held: it starts and ends
            // before the tail, which is all that remains.
            self.start = self.end() + cut;
            debug_assert_eq!(self.len, 0);
            dropped += cut;
        }
        match self.chunks.back_mut() {
            // Merge small writes of the same source to bound chunk count.
            Some((s, last)) if *s == source && last.len() + tail.len() <= 32 * 1024 => {
                last.extend_from_slice(tail)
            }
            _ => self.chunks.push_back((source, tail.to_vec())),
        }
        self.len += tail.len();
        dropped
    }

    fn advance(&mut self, n: usize) {
        self.start += n as u64;
        self.len -= n;
    }

    /// Up to `max` bytes at `cursor`, all from one source.
    pub fn read(&self, cursor: u64, max: usize) -> Next<'_> {
        if cursor < self.start {
            return Next::Gap {
                lost: self.start - cursor,
                resume: self.start,
            };
        }
        if cursor >= self.end() || max == 0 {
            return Next::Empty;
        }
        let mut at = self.start;
        for (source, data) in &self.chunks {
            let next = at + data.len() as u64;
            if cursor < next {
                let from = (cursor - at) as usize;
                let to = data.len().min(from + max);
                return Next::Data(*source, &data[from..to]);
            }
            at = next;
        }
        Next::Empty
    }

    /// Bytes that can be pushed before any byte at or after `cursor` would
    /// be dropped (how far a writer may go ahead of a reader that must not
    /// lose anything).
    pub fn room_before(&self, cursor: u64) -> usize {
        let pending = self.end().saturating_sub(cursor.max(self.start)) as usize;
        self.cap.saturating_sub(pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(r: &Ring, mut cursor: u64) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        let mut lost = 0;
        loop {
            match r.read(cursor, 3) {
                Next::Gap { lost: l, resume } => {
                    lost += l;
                    cursor = resume;
                }
                Next::Data(_, b) => {
                    out.extend_from_slice(b);
                    cursor += b.len() as u64;
                }
                Next::Empty => return (out, lost),
            }
        }
    }

    #[test]
    fn keeps_everything_under_capacity() {
        let mut r = Ring::new(16);
        assert_eq!(r.push(Source::Stdout, b"hello "), 0);
        assert_eq!(r.push(Source::Stderr, b"world"), 0);
        assert_eq!(drain(&r, 0), (b"hello world".to_vec(), 0));
        assert_eq!(r.read(0, 100), Next::Data(Source::Stdout, b"hello "));
        assert_eq!(r.read(6, 100), Next::Data(Source::Stderr, b"world"));
        assert_eq!(r.read(11, 100), Next::Empty);
    }

    #[test]
    fn drops_the_oldest_and_reports_the_gap() {
        let mut r = Ring::new(8);
        r.push(Source::Stdout, b"0123");
        r.push(Source::Stderr, b"4567");
        assert_eq!(r.push(Source::Stdout, b"89"), 2);
        assert_eq!(r.start(), 2);
        assert_eq!(r.end(), 10);
        assert_eq!(r.read(0, 10), Next::Gap { lost: 2, resume: 2 });
        assert_eq!(drain(&r, 0), (b"23456789".to_vec(), 2));
        // A write larger than the ring keeps only its tail.
        assert_eq!(r.push(Source::Pty, b"abcdefghijkl"), 8 + 4);
        assert_eq!((r.start(), r.end()), (14, 22));
        assert_eq!(drain(&r, 10), (b"efghijkl".to_vec(), 4));
        assert_eq!(r.read(14, 100), Next::Data(Source::Pty, b"efghijkl"));
    }

    #[test]
    fn room_is_what_a_reader_at_a_cursor_allows() {
        let mut r = Ring::new(10);
        r.push(Source::Stdout, b"abcdef");
        assert_eq!(r.room_before(0), 4);
        assert_eq!(r.room_before(6), 10);
        assert_eq!(r.room_before(3), 7);
    }

    #[test]
    fn offsets_stay_consistent_under_random_pushes() {
        // A deterministic walk: the ring always holds the newest bytes.
        let mut r = Ring::new(100);
        let mut all = Vec::new();
        let mut x = 7u32;
        for i in 0..2000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let n = (x >> 16) as usize % 150;
            let bytes: Vec<u8> = (0..n).map(|j| (i + j) as u8).collect();
            all.extend_from_slice(&bytes);
            r.push(
                if i % 2 == 0 {
                    Source::Stdout
                } else {
                    Source::Stderr
                },
                &bytes,
            );
            assert_eq!(r.end(), all.len() as u64);
            assert!(r.end() - r.start() <= 100);
            let (held, _) = drain(&r, r.start());
            assert_eq!(held, all[r.start() as usize..]);
        }
    }
}
