//! File plumbing for snapshots: sparse copies that skip holes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Copies `src` to a new file `dst`, reading only the data extents
/// (`SEEK_DATA`/`SEEK_HOLE`) and leaving holes as holes. Returns the bytes of
/// data copied. Not fsynced: snapshot copies run inside the pause, and the
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
            to.write_all_at(&buf[..want], at)?;
            at += want as u64;
            copied += want as u64;
        }
        pos = hole;
    }
    Ok(copied)
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
        drop(f);
        let dst = dir.join("dst");
        let copied = copy_sparse(&src, &dst).unwrap();
        assert!(copied < 1 << 20, "copied {copied} bytes: holes were read");
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(copy_sparse(&src, &dst).is_err(), "must not overwrite");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
