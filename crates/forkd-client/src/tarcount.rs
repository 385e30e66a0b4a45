//! Counting the entries of a tar stream as it passes, so a download reports
//! what the guest packed without buffering or unpacking it.
//!
//! Entries are counted as the guest's agent counts them: every header but
//! the extension headers that describe the next one (GNU long names and
//! link names, pax headers). Headers are 512-byte blocks; the size field is
//! octal, or base-256 when its first byte has the high bit set; two zero
//! blocks end the archive.

use std::io::{self, Write};

const BLOCK: u64 = 512;

/// A writer that passes bytes on to `inner` and counts tar entries.
pub struct TarCounter<W> {
    inner: W,
    header: Vec<u8>,
    /// Bytes of content (rounded up to whole blocks) still to skip.
    skip: u64,
    ended: bool,
    entries: u64,
    bytes: u64,
}

impl<W: Write> TarCounter<W> {
    pub fn new(inner: W) -> TarCounter<W> {
        TarCounter {
            inner,
            header: Vec::with_capacity(BLOCK as usize),
            skip: 0,
            ended: false,
            entries: 0,
            bytes: 0,
        }
    }

    /// Entries seen so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Bytes passed on so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn header(&mut self) {
        if self.header.iter().all(|&b| b == 0) {
            self.ended = true;
            return;
        }
        let size = field_size(&self.header[124..136]);
        self.skip = size.div_ceil(BLOCK) * BLOCK;
        if !matches!(self.header[156], b'L' | b'K' | b'x' | b'g') {
            self.entries += 1;
        }
        self.header.clear();
    }

    fn observe(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.ended {
            if self.skip > 0 {
                let n = (self.skip.min(data.len() as u64)) as usize;
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            let need = BLOCK as usize - self.header.len();
            let n = need.min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() == BLOCK as usize {
                self.header();
            }
        }
    }
}

fn field_size(f: &[u8]) -> u64 {
    if f[0] & 0x80 != 0 {
        // base-256: the remaining bits, big-endian.
        let mut v: u64 = u64::from(f[0] & 0x7f);
        for &b in &f[1..] {
            v = v.saturating_mul(256).saturating_add(u64::from(b));
        }
        return v;
    }
    let text = f
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| (b'0'..=b'7').contains(b));
    text.fold(0u64, |v, b| {
        v.saturating_mul(8).saturating_add(u64::from(b - b'0'))
    })
}

impl<W: Write> Write for TarCounter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.observe(&data[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &str, size: u64, kind: u8) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let s = format!("{size:011o}\0");
        h[124..136].copy_from_slice(s.as_bytes());
        h[156] = kind;
        h
    }

    fn archive() -> Vec<u8> {
        let mut a = Vec::new();
        a.extend(header("dir/", 0, b'5'));
        a.extend(header("././@LongLink", 600, b'L'));
        a.extend(vec![b'n'; 1024]);
        a.extend(header("dir/file", 700, b'0'));
        a.extend(vec![0u8; 1024]); // 700 bytes of zeros, padded
        a.extend(header("dir/link", 0, b'2'));
        a.extend(vec![0u8; 1024]);
        a
    }

    #[test]
    fn counts_entries_in_any_chunking_and_skips_extension_headers() {
        let a = archive();
        for chunk in [1, 7, 511, 512, 513, 4096, a.len()] {
            let mut c = TarCounter::new(Vec::new());
            for piece in a.chunks(chunk) {
                c.write_all(piece).unwrap();
            }
            assert_eq!(c.entries(), 3, "chunk {chunk}");
            assert_eq!(c.bytes(), a.len() as u64);
            assert_eq!(c.inner, a);
        }
    }

    #[test]
    fn content_that_looks_like_a_header_is_skipped() {
        let mut a = header("f", 512, b'0');
        a.extend(header("fake", 0, b'0')); // the file's content
        a.extend(vec![0u8; 1024]);
        let mut c = TarCounter::new(std::io::sink());
        c.write_all(&a).unwrap();
        assert_eq!(c.entries(), 1);
    }

    #[test]
    fn sizes_parse_in_octal_and_base_256() {
        assert_eq!(field_size(b"00000001000\0"), 512);
        assert_eq!(field_size(b"    1000 \0\0\0"), 512);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 2;
        big[10] = 1;
        assert_eq!(field_size(&big), 258);
    }
}
