//! File plumbing for snapshots: sparse copies that skip holes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Copies `src` to a new file `dst`, reading only the data extents
/// (`SEEK_DATA`/`SEEK_HOLE`) and leaving holes as holes; all-zero 4 KiB
/// pages inside data extents become holes too (a fresh guest's RAM is about
/// a quarter zero pages). Returns the bytes written. Not fsynced: snapshot copies run inside the pause, and the
/// store fsyncs everything when it publishes.
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<u64> {
    let mut from = File::open(src)?;
    let len = from.metadata()?.len();
    let to = OpenOptions::new().write(true).create_new(true).open(dst)?;
    to.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    let mut pos: i64 = 0;
    let fd = from.as_raw_fd();
    while (pos as u64) < len {
        // SAFETY: lseek on a valid fd; no memory effects.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        from.seek(SeekFrom::Start(data as u64))?;
        let mut at = data as u64;
        while at < hole as u64 {
            let want = ((hole as u64 - at) as usize).min(buf.len());
            from.read_exact(&mut buf[..want])?;
            copied += write_nonzero(&to, &buf[..want], at)?;
            at += want as u64;
        }
        pos = hole;
    }
    Ok(copied)
}

const PAGE: usize = 4096;

/// Writes the non-zero pages of `buf` (at file offset `at`), coalescing runs
/// into single writes. Returns the bytes written.
fn write_nonzero(to: &File, buf: &[u8], at: u64) -> io::Result<u64> {
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut off = 0;
    while off < buf.len() {
        let end = (off + PAGE).min(buf.len());
        let zero = buf[off..end].iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(off),
            (true, Some(start)) => {
                to.write_all_at(&buf[start..off], at + start as u64)?;
                written += (off - start) as u64;
                run_start = None;
            }
            _ => {}
        }
        off = end;
    }
    if let Some(start) = run_start {
        to.write_all_at(&buf[start..], at + start as u64)?;
        written += (buf.len() - start) as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let dir = std::env::temp_dir().join(format!("forkd-sparse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"hello", 4096 * 3).unwrap();
        f.write_all_at(&[7u8; 10000], 40 << 20).unwrap();
        // A data extent that is all zeros: copied as a hole.
        f.write_all_at(&vec![0u8; 1 << 20], 50 << 20).unwrap();
        drop(f);
        let dst = dir.join("dst");
        let copied = copy_sparse(&src, &dst).unwrap();
        assert!(
            copied <= 4 * PAGE as u64,
            "copied {copied} bytes: holes or zero pages were written"
        );
        let meta = std::fs::metadata(&dst).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 <= 8 * PAGE as u64,
            "destination is not sparse: {} blocks",
            meta.blocks()
        );
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(copy_sparse(&src, &dst).is_err(), "must not overwrite");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
