//! A snapshot's RAM image copied into 2 MiB hugetlb pages, for children
//! that map it privately on huge pages ([`crate::VmConfig::private_hugetlb`]).
//!
//! A child maps its image `MAP_PRIVATE`: pages it never writes are shared
//! with the image and its siblings, a page it writes is copied. On the tmpfs
//! image those pages are 4 KiB, so the child's own live branches pay a
//! write-protect walk over every 4 KiB entry (time that grows with guest
//! size). Mapped from a hugetlb copy, they are 2 MiB: the walk is 512 times
//! shorter, at the price of a 2 MiB copy for the first write into each huge
//! page.
//!
//! The copy lives in an anonymous hugetlb memfd (no mount, no file to clean
//! up): QEMU inherits the descriptor and maps it through `/proc/self/fd/N`;
//! the pages go when the last child mapping them exits and the spawner has
//! closed its descriptor. Each huge page is allocated with `fallocate`
//! before it is written, so a pool that runs dry is an error here, never a
//! SIGBUS in forkd. All-zero 2 MiB blocks and holes stay holes. Once
//! written, the copy is sealed (no write, no hole, no resize): the
//! siblings that share it cannot change it for one another.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// The huge page size of the copy.
pub const HUGE_PAGE: u64 = 2 << 20;
/// The name QEMU's `/proc/PID/maps` shows for the copy (`/memfd:NAME`).
pub const MEMFD_NAME: &str = "forkd-child-ram";

/// Fault point ([`crate::faultpoint`]): inside [`HugeRam::copy_of`], once
/// its first page is allocated and copied.
pub const COPY_STARTED: &str = "hugeram:copying";

/// Why the copy could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HugeRamError {
    #[error("this host cannot make hugetlb memory (memfd_create MFD_HUGETLB): {0}")]
    Unsupported(std::io::Error),
    #[error(
        "the huge-page pool could not give page {page} of {pages} for the RAM image copy: {source}"
    )]
    PoolExhausted {
        page: u64,
        pages: u64,
        source: std::io::Error,
    },
    #[error("RAM image {path}: {source}")]
    Image {
        path: String,
        source: std::io::Error,
    },
    #[error("the RAM image {path} is {actual} bytes, not the guest's {expected}")]
    WrongSize {
        path: String,
        actual: u64,
        expected: u64,
    },
}

/// A RAM image held in hugetlb pages.
#[derive(Debug)]
pub struct HugeRam {
    fd: OwnedFd,
    /// Huge pages the copy holds (its non-zero 2 MiB blocks).
    pub pages: u64,
}

impl HugeRam {
    /// The descriptor QEMU inherits.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Copies the `len`-byte image at `image` (a multiple of 2 MiB) into a
    /// new hugetlb memfd, reading only its data (holes are skipped) and
    /// leaving all-zero blocks unallocated.
    pub fn copy_of(image: &Path, len: u64) -> Result<HugeRam, HugeRamError> {
        let image_err = |source| HugeRamError::Image {
            path: image.display().to_string(),
            source,
        };
        let mut src = File::open(image).map_err(image_err)?;
        let actual = src.metadata().map_err(image_err)?.len();
        if actual != len || !len.is_multiple_of(HUGE_PAGE) {
            return Err(HugeRamError::WrongSize {
                path: image.display().to_string(),
                actual,
                expected: len,
            });
        }
        let name = std::ffi::CString::new(MEMFD_NAME).expect("no NUL");
        // SAFETY: `name` is a valid C string that outlives the call.
        let raw = unsafe {
            libc::memfd_create(
                name.as_ptr(),
                libc::MFD_CLOEXEC
                    | libc::MFD_ALLOW_SEALING
                    | libc::MFD_HUGETLB
                    | libc::MFD_HUGE_2MB,
            )
        };
        if raw < 0 {
            return Err(HugeRamError::Unsupported(std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a plain syscall on the descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(HugeRamError::Unsupported(std::io::Error::last_os_error()));
        }
        if len == 0 {
            return Ok(HugeRam { fd, pages: 0 });
        }
        // No reservation (MAP_NORESERVE): a reserving shared mapping would
        // take the whole guest size from the pool up front and keep it with
        // the memfd; each page is taken by `fallocate` below instead.
        // SAFETY: a new shared mapping of the memfd we own, `len` bytes (its
        // size); unmapped by `Mapping`'s drop before `fd` closes.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(HugeRamError::Unsupported(std::io::Error::last_os_error()));
        }
        let map = Mapping {
            addr: addr.cast(),
            len: len as usize,
        };
        let total = len / HUGE_PAGE;
        let mut pages = 0;
        let mut block = vec![0u8; HUGE_PAGE as usize];
        let mut offset = 0u64;
        while offset < len {
            // Jump over holes: a sparse image reads only its data.
            let data = seek_data(&src, offset).map_err(image_err)?;
            let Some(data) = data else { break };
            let start = data - data % HUGE_PAGE;
            src.seek(SeekFrom::Start(start)).map_err(image_err)?;
            src.read_exact(&mut block).map_err(image_err)?;
            offset = start + HUGE_PAGE;
            if block.iter().all(|&b| b == 0) {
                continue;
            }
            // Take the page now: a pool that cannot give it fails here
            // with ENOSPC/ENOMEM instead of a SIGBUS on the write below.
            // SAFETY: a plain syscall on the descriptor we own.
            let r = unsafe {
                libc::fallocate(
                    fd.as_raw_fd(),
                    0,
                    start as libc::off_t,
                    HUGE_PAGE as libc::off_t,
                )
            };
            if r != 0 {
                return Err(HugeRamError::PoolExhausted {
                    page: start / HUGE_PAGE,
                    pages: total,
                    source: std::io::Error::last_os_error(),
                });
            }
            // SAFETY: `start + HUGE_PAGE <= len`, so the destination lies in
            // the mapping, whose page there was just allocated; `block`
            // holds HUGE_PAGE bytes and does not overlap the mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    block.as_ptr(),
                    map.addr.add(start as usize),
                    HUGE_PAGE as usize,
                );
            }
            pages += 1;
            if pages == 1 {
                crate::faultpoint::reached(COPY_STARTED);
            }
        }
        drop(map);
        seal(&fd)?;
        Ok(HugeRam { fd, pages })
    }
}

/// Seals the copy: no write, no hole punched, no size change, by anyone
/// holding it (QEMU maps it privately, copy-on-write, which seals allow).
/// Every sibling of a spawn maps the same copy, so one must never change
/// what the others read.
fn seal(fd: &OwnedFd) -> Result<(), HugeRamError> {
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: a plain fcntl on the descriptor we own; no writable shared
    // mapping of it is left (the copy's was unmapped), as F_SEAL_WRITE needs.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(HugeRamError::Unsupported(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The next offset at or after `from` that holds data, `None` past the last.
fn seek_data(f: &File, from: u64) -> std::io::Result<Option<u64>> {
    // SAFETY: a plain syscall on a descriptor `f` owns.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// A shared mapping, unmapped on drop.
struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly what mmap returned and nothing
        // refers to the mapping after this.
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn wrong_sizes_are_refused_before_any_huge_page() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ram");
        std::fs::write(&p, vec![1u8; 4096]).unwrap();
        let e = HugeRam::copy_of(&p, HUGE_PAGE).unwrap_err();
        assert!(
            matches!(e, HugeRamError::WrongSize { actual: 4096, .. }),
            "{e}"
        );
        let mut f = File::create(&p).unwrap();
        f.write_all(&[0u8; 3 << 20]).unwrap();
        let e = HugeRam::copy_of(&p, 3 << 20).unwrap_err();
        assert!(matches!(e, HugeRamError::WrongSize { .. }), "{e}");
        let e = HugeRam::copy_of(&dir.path().join("absent"), HUGE_PAGE).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
    }
}
