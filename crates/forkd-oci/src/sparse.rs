//! Sparse files: finding where data lives (`SEEK_DATA`/`SEEK_HOLE`) so holes
//! are neither read nor sent, and writing chunks back so zero blocks stay
//! holes. Plumbing over file descriptors; the chunk logic is in
//! [`crate::chunking`].

use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The block size holes are kept at when writing.
pub(crate) const BLOCK: usize = 4096;

/// Whether every byte of `buf` is zero.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    // Compare in u128 words: an order of magnitude faster than byte by byte.
    let (head, words, tail) = {
        // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the slice.
        unsafe { buf.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The ranges of `file` (of `size` bytes) that may hold data, in order. A
/// filesystem without `SEEK_DATA` reports the whole file as data.
pub(crate) fn data_extents(file: &File, size: u64) -> io::Result<Vec<Range<u64>>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on an open descriptor; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // No data at or after pos: the rest is a hole.
                Some(libc::ENXIO) => break,
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if extents.is_empty() => {
                    return Ok(std::iter::once(0..size).collect());
                }
                _ => return Err(e),
            }
        }
        let data = data as u64;
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = (hole as u64).min(size);
        extents.push(data..hole);
        pos = hole.max(data + 1);
    }
    Ok(extents)
}

/// Reads a file as its full logical length, filling holes with zeros from
/// memory instead of asking the filesystem.
pub(crate) struct SparseReader<'a> {
    file: &'a File,
    size: u64,
    extents: Vec<Range<u64>>,
    pos: u64,
    /// Index of the first extent that ends after `pos`.
    next: usize,
}

impl<'a> SparseReader<'a> {
    pub(crate) fn new(file: &'a File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        let extents = data_extents(file, size)?;
        Ok(SparseReader {
            file,
            size,
            extents,
            pos: 0,
            next: 0,
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Whether `range` lies entirely in holes.
    pub(crate) fn is_hole(&self, range: &Range<u64>) -> bool {
        let i = self.extents.partition_point(|e| e.end <= range.start);
        self.extents.get(i).is_none_or(|e| e.start >= range.end)
    }

    /// Fills `buf` with the bytes at `offset` (zeros in holes and past the end).
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        let first = self.extents.partition_point(|e| e.end <= offset);
        for extent in &self.extents[first..] {
            if extent.start >= end {
                break;
            }
            let from = extent.start.max(offset);
            let to = extent.end.min(end);
            let slice = &mut buf[(from - offset) as usize..(to - offset) as usize];
            self.file.read_exact_at(slice, from)?;
        }
        Ok(())
    }
}

impl Read for SparseReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        while self.next < self.extents.len() && self.extents[self.next].end <= self.pos {
            self.next += 1;
        }
        let want = (buf.len() as u64).min(self.size - self.pos);
        let n = match self.extents.get(self.next) {
            // In a hole: zeros up to the next extent.
            Some(e) if e.start > self.pos => (e.start - self.pos).min(want),
            None => want,
            Some(e) => {
                let n = (e.end - self.pos).min(want) as usize;
                self.file.read_exact_at(&mut buf[..n], self.pos)?;
                self.pos += n as u64;
                return Ok(n);
            }
        } as usize;
        buf[..n].fill(0);
        self.pos += n as u64;
        Ok(n)
    }
}

/// Writes `data` at `offset`, skipping aligned 4 KiB blocks that are all zero
/// so they stay holes. The range is punched first, so stale bytes from an
/// interrupted earlier write cannot survive under a skipped block. Returns
/// the bytes actually written.
pub(crate) fn write_sparse(file: &File, offset: u64, data: &[u8]) -> io::Result<u64> {
    let punched = punch_hole(file, offset, data.len() as u64)?;
    let mut written = 0u64;
    let mut pos = 0usize;
    while pos < data.len() {
        // Blocks are aligned to the file, not to the chunk.
        let abs = offset + pos as u64;
        let block_end = ((abs / BLOCK as u64 + 1) * BLOCK as u64 - offset) as usize;
        let end = block_end.min(data.len());
        let block = &data[pos..end];
        if !punched || !is_zero(block) {
            file.write_all_at(block, abs)?;
            written += block.len() as u64;
        }
        pos = end;
    }
    Ok(written)
}

/// Deallocates `len` bytes at `offset`; false when the filesystem cannot.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    // SAFETY: fallocate on an open descriptor; KEEP_SIZE never changes the length.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(e),
    }
}

/// Bytes the filesystem allocated for `path` (`st_blocks` × 512).
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sparse_file(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let path = dir.join("f");
        let mut f = File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        let mut expected = vec![0u8; 1 << 20];
        for (off, byte) in [(8192u64, 7u8), (512 * 1024, 9)] {
            f.write_all_at(&[byte; 5000], off).unwrap();
            expected[off as usize..off as usize + 5000].fill(byte);
        }
        f.flush().unwrap();
        (path, expected)
    }

    #[test]
    fn extents_and_reads_match_content() {
        let dir = tempfile::tempdir().unwrap();
        let (path, expected) = sparse_file(dir.path());
        let f = File::open(&path).unwrap();
        let reader = SparseReader::new(&f).unwrap();
        assert!(!reader.extents.is_empty());
        assert!(reader.is_hole(&(600 * 1024..700 * 1024)));
        assert!(!reader.is_hole(&(0..12_000)));
        let mut buf = vec![1u8; 20_000];
        reader.read_at(4000, &mut buf).unwrap();
        assert_eq!(buf, expected[4000..24_000]);
        let mut all = Vec::new();
        SparseReader::new(&f)
            .unwrap()
            .read_to_end(&mut all)
            .unwrap();
        assert_eq!(all, expected);
    }

    #[test]
    fn sparse_write_keeps_zero_blocks_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let f = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(64 * 1024).unwrap();
        let mut data = vec![0u8; 32 * 1024];
        data[100] = 1;
        data[20_000] = 2;
        let written = write_sparse(&f, 8192, &data).unwrap();
        assert_eq!(written, 2 * BLOCK as u64);
        let mut back = vec![0u8; 32 * 1024];
        f.read_exact_at(&mut back, 8192).unwrap();
        assert_eq!(back, data);
        assert!(allocated_bytes(&path).unwrap() <= 4 * BLOCK as u64);
        // Rewriting over stale bytes leaves none behind.
        f.write_all_at(&[5u8; 4096], 16384).unwrap();
        write_sparse(&f, 8192, &data).unwrap();
        f.read_exact_at(&mut back, 8192).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn zero_check() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 1000]));
        let mut v = vec![0u8; 1001];
        v[1000] = 1;
        assert!(!is_zero(&v));
        assert!(!is_zero(&v[1..]));
    }
}
