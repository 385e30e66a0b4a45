//! BLAKE3 of whole files, fast on sparse RAM images: holes are found with
//! `SEEK_DATA`/`SEEK_HOLE` and fed to the hasher from a static zero buffer
//! instead of being read, so the digest is that of the full logical contents.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{io_err, Result};

/// Read size for data regions: large enough that `Hasher::update` runs its
/// SIMD multi-chunk path and syscalls are few.
const READ_BUF: usize = 1 << 20;

/// Zeros standing in for holes; lives in `.bss`, costs no I/O.
static ZEROS: [u8; READ_BUF] = [0; READ_BUF];

/// Hex BLAKE3 of the full contents of the file at `path`.
pub fn hash_file(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let size = file.metadata().map_err(io_err("stat", path))?.len();
    let hash = hash_open_file(&file, size).map_err(io_err("hash", path))?;
    Ok(hash.to_hex().to_string())
}

/// BLAKE3 of the first `size` bytes of `file`, which must be at least that long.
pub(crate) fn hash_open_file(file: &File, size: u64) -> io::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; READ_BUF];
    let mut pos = 0;
    while pos < size {
        let (data_start, data_end) = next_data(file, pos, size)?.unwrap_or((size, size));
        feed_zeros(&mut hasher, data_start - pos);
        feed_range(file, &mut hasher, &mut buf, data_start, data_end)?;
        pos = data_end;
    }
    Ok(hasher.finalize())
}

/// The next data region `[start, end)` at or after `pos`, clamped to `size`;
/// `None` when only a hole remains.
fn next_data(file: &File, pos: u64, size: u64) -> io::Result<Option<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let Ok(offset) = libc::off_t::try_from(pos) else {
        return Ok(Some((pos, size)));
    };
    // SAFETY: lseek only moves the offset of an fd that `file` keeps open for
    // the duration of the call; no memory is passed. We read with pread, so
    // the moved offset does not matter.
    let start = unsafe { libc::lseek(fd, offset, libc::SEEK_DATA) };
    if start < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            // No data after `pos`: the rest is one hole.
            Some(libc::ENXIO) => Ok(None),
            // The filesystem cannot report holes: treat everything as data.
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((pos, size))),
            _ => Err(err),
        };
    }
    let start = (start as u64).clamp(pos, size);
    if start == size {
        return Ok(None);
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
    if end < 0 {
        return Ok(Some((start, size)));
    }
    // Guarantee progress even if the filesystem answers oddly.
    let end = (end as u64).clamp(start + 1, size);
    Ok(Some((start, end)))
}

fn feed_zeros(hasher: &mut blake3::Hasher, mut len: u64) {
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        hasher.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

fn feed_range(
    file: &File,
    hasher: &mut blake3::Hasher,
    buf: &mut [u8],
    mut pos: u64,
    end: u64,
) -> io::Result<()> {
    while pos < end {
        let want = (end - pos).min(buf.len() as u64) as usize;
        let got = match file.read_at(&mut buf[..want], pos) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while it was being hashed",
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..got]);
        pos += got as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_sparse(path: &Path, size: u64, blocks: &[(u64, &[u8])]) -> Vec<u8> {
        let file = File::create(path).unwrap();
        file.set_len(size).unwrap();
        let mut full = vec![0u8; size as usize];
        for (offset, data) in blocks {
            file.write_all_at(data, *offset).unwrap();
            full[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        full
    }

    #[test]
    fn sparse_file_hash_equals_hash_of_full_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram.img");
        let block = vec![0xA5u8; 4096];
        let odd: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let size = 64 << 20;
        let full = write_sparse(
            &path,
            size,
            &[
                (0, &block),
                (1 << 20, &odd),
                (33 * (1 << 20) + 17, &block),
                (size - 4096, &block),
            ],
        );
        // The file really is sparse here (on filesystems that support holes),
        // so the hole-skipping path is what we test.
        let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
        assert!(allocated * 512 < size, "test file is not sparse");
        assert_eq!(
            hash_file(&path).unwrap(),
            blake3::hash(&full).to_hex().to_string()
        );
    }

    #[test]
    fn hash_of_file_ending_in_a_hole_and_of_empty_and_dense_files() {
        let dir = tempfile::tempdir().unwrap();
        let tail_hole = dir.path().join("tail");
        let full = write_sparse(&tail_hole, 5 << 20, &[(12345, b"hello")]);
        assert_eq!(
            hash_file(&tail_hole).unwrap(),
            blake3::hash(&full).to_hex().to_string()
        );

        let empty = dir.path().join("empty");
        File::create(&empty).unwrap();
        assert_eq!(
            hash_file(&empty).unwrap(),
            blake3::hash(b"").to_hex().to_string()
        );

        let dense = dir.path().join("dense");
        let data: Vec<u8> = (0..(3 * READ_BUF + 123)).map(|i| (i % 251) as u8).collect();
        File::create(&dense).unwrap().write_all(&data).unwrap();
        assert_eq!(
            hash_file(&dense).unwrap(),
            blake3::hash(&data).to_hex().to_string()
        );
    }

    #[test]
    fn hash_of_missing_file_names_it() {
        let err = hash_file(Path::new("/nonexistent/forkd/ram.img")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/forkd/ram.img"),
            "{err}"
        );
    }
}
