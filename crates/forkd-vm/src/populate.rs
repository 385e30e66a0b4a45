//! Populating a running QEMU's guest-RAM mapping from outside, so that a live
//! snapshot's pause does not contain it.
//!
//! QEMU 7.2's background snapshot reads one byte of every guest page
//! (`ram_write_tracking_prepare`) before it write-protects RAM, because
//! userfaultfd write-protect skips page-table entries that do not exist yet.
//! That read faults in every page not mapped yet: seconds per GiB on 4 KiB
//! pages. forkd stops the guest before `migrate` (the disk and RAM freeze at
//! one instant), so the population would land inside the pause. Reading the
//! same pages first, through `process_vm_readv` while the guest still runs,
//! installs the very page-table entries in QEMU's address space (the kernel
//! faults them in on QEMU's behalf); QEMU's own pass inside the pause then
//! finds them present. Memory cost is the one QEMU's pass would have had.
//!
//! Finding the mapping ([`find_guest_ram`]) is pure and tested on text; the
//! read is the plumbing. Never writes to the guest, never holds more than one
//! page-sized batch of bytes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where QEMU maps a guest's RAM in its own address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamMapping {
    pub start: u64,
    pub len: u64,
}

/// What backs the mapping, to recognise it in `/proc/PID/maps`.
#[derive(Debug, Clone, Copy)]
pub enum RamName<'a> {
    /// A file QEMU mapped (`memory-backend-file`), by path.
    File(&'a Path),
    /// A memfd QEMU made (`memory-backend-memfd`): maps show `/memfd:NAME`.
    Memfd,
    /// The hugetlb copy of a RAM image a child maps ([`crate::hugeram`]).
    ChildMemfd,
}

/// QEMU names the memfd of `memory-backend-memfd` after the backend type.
const QEMU_MEMFD_NAME: &str = "/memfd:memory-backend-memfd";

/// Finds the mapping of `len` bytes of guest RAM named `name` in the text of
/// `/proc/PID/maps`. QEMU maps each RAM block once; an entry of another size
/// (e.g. a guard page) is not it.
pub fn find_guest_ram(maps: &str, name: RamName<'_>, len: u64) -> Option<RamMapping> {
    maps.lines().find_map(|line| {
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        // perms, offset, dev, inode, then the path after padding.
        let path = fields.nth(4).map(str::trim_start).unwrap_or("");
        let matches = match name {
            RamName::File(p) => {
                let p = p.to_str()?;
                path == p || path.strip_suffix(" (deleted)") == Some(p)
            }
            RamName::Memfd => path.starts_with(QEMU_MEMFD_NAME),
            RamName::ChildMemfd => path
                .strip_prefix("/memfd:")
                .is_some_and(|n| n.starts_with(crate::hugeram::MEMFD_NAME)),
        };
        if !matches {
            return None;
        }
        let (a, b) = range.split_once('-')?;
        let start = u64::from_str_radix(a, 16).ok()?;
        let end = u64::from_str_radix(b, 16).ok()?;
        (end.checked_sub(start)? == len).then_some(RamMapping { start, len })
    })
}

/// Why populating failed.
#[derive(Debug, thiserror::Error)]
pub enum PopulateError {
    #[error("reading QEMU's (pid {pid}) memory map or file descriptors in /proc: {source}")]
    Maps { pid: u32, source: std::io::Error },
    #[error("QEMU (pid {pid}) holds no guest-RAM memfd (no /proc/{pid}/fd entry names one)")]
    NoMemfd { pid: u32 },
    #[error("QEMU (pid {pid}) has no mapping of its {len}-byte guest RAM in /proc/{pid}/maps")]
    NotMapped { pid: u32, len: u64 },
    #[error(
        "the host could not give QEMU (pid {pid}) guest RAM at offset {offset:#x}: {source} \
         (for huge-page RAM: the huge-page pool is exhausted)"
    )]
    Fault {
        pid: u32,
        offset: u64,
        source: std::io::Error,
    },
}

/// Pages read per `process_vm_readv` call (the kernel's `IOV_MAX`).
const BATCH: usize = 1024;

/// Reads one byte of every `page`-sized page of `map` in process `pid`, which
/// makes the kernel populate that process's page tables for it. Returns how
/// long it took.
pub fn populate(pid: u32, map: RamMapping, page: u64) -> Result<Duration, PopulateError> {
    let t0 = Instant::now();
    let mut sink = [0u8; BATCH];
    let mut offset = 0u64;
    while offset < map.len {
        let n = (((map.len - offset) / page) as usize).clamp(1, BATCH);
        let local = libc::iovec {
            iov_base: sink.as_mut_ptr().cast(),
            iov_len: n,
        };
        let remote: Vec<libc::iovec> = (0..n as u64)
            .map(|i| libc::iovec {
                iov_base: (map.start + offset + i * page) as *mut libc::c_void,
                iov_len: 1,
            })
            .collect();
        // SAFETY: `local` points at `sink`, which outlives the call and holds
        // `n` bytes; the remote iovecs name addresses in another process,
        // which the kernel checks and never dereferences in ours.
        let got = unsafe {
            libc::process_vm_readv(
                pid as libc::pid_t,
                &local,
                1,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if got < 0 {
            return Err(PopulateError::Fault {
                pid,
                offset,
                source: std::io::Error::last_os_error(),
            });
        }
        // A short read stops at the first page the kernel could not fault
        // in: report that page.
        if (got as usize) < n {
            return Err(PopulateError::Fault {
                pid,
                offset: offset + got as u64 * page,
                source: std::io::Error::from_raw_os_error(libc::EFAULT),
            });
        }
        offset += n as u64 * page;
    }
    Ok(t0.elapsed())
}

/// A path that opens QEMU's hugetlb guest-RAM memfd (`/proc/PID/fd/N`), so
/// that a full snapshot can read it like the RAM file of other sandboxes.
pub fn memfd_path(pid: u32) -> Result<PathBuf, PopulateError> {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let entries = std::fs::read_dir(&dir).map_err(|source| PopulateError::Maps { pid, source })?;
    for e in entries.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.to_string_lossy().starts_with(QEMU_MEMFD_NAME) {
            return Ok(e.path());
        }
    }
    Err(PopulateError::NoMemfd { pid })
}

/// Finds QEMU's guest-RAM mapping in `/proc/PID/maps`.
pub fn locate(pid: u32, name: RamName<'_>, len: u64) -> Result<RamMapping, PopulateError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| PopulateError::Maps { pid, source })?;
    find_guest_ram(&maps, name, len).ok_or(PopulateError::NotMapped { pid, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c8a00000-55d0c8b00000 r--p 00000000 08:01 1234        /usr/bin/qemu-system-x86_64
7f0000000000-7f0000001000 ---p 00000000 00:00 0 
7f0000200000-7f0020200000 rw-s 00000000 00:19 77          /dev/shm/forkd/sb-1/ram
7f1000000000-7f1000200000 rw-s 00000000 00:19 78          /dev/shm/forkd/sb-1/ram
7f2000000000-7f2020000000 rw-s 00000000 00:0f 4242        /memfd:memory-backend-memfd (deleted)
7f3000000000-7f3010000000 rw-p 00000000 00:19 99          /dev/shm/snap/ram.img (deleted)
7f4000000000-7f4008000000 rw-p 00000000 00:0f 5151        /memfd:forkd-child-ram (deleted)
";

    #[test]
    fn finds_the_guest_ram_mapping_by_name_and_size() {
        let file = Path::new("/dev/shm/forkd/sb-1/ram");
        assert_eq!(
            find_guest_ram(MAPS, RamName::File(file), 512 << 20),
            Some(RamMapping {
                start: 0x7f00_0020_0000,
                len: 512 << 20
            })
        );
        // The same file mapped at another size is not guest RAM.
        assert_eq!(find_guest_ram(MAPS, RamName::File(file), 1 << 30), None);
        assert_eq!(
            find_guest_ram(MAPS, RamName::Memfd, 512 << 20),
            Some(RamMapping {
                start: 0x7f20_0000_0000,
                len: 512 << 20
            })
        );
        // A child's hugetlb copy is found by its own memfd name only.
        assert_eq!(
            find_guest_ram(MAPS, RamName::ChildMemfd, 128 << 20),
            Some(RamMapping {
                start: 0x7f40_0000_0000,
                len: 128 << 20
            })
        );
        assert_eq!(find_guest_ram(MAPS, RamName::ChildMemfd, 512 << 20), None);
        assert_eq!(find_guest_ram(MAPS, RamName::Memfd, 128 << 20), None);
        // A deleted image still names its mapping.
        let img = Path::new("/dev/shm/snap/ram.img");
        assert!(find_guest_ram(MAPS, RamName::File(img), 256 << 20).is_some());
        assert_eq!(
            find_guest_ram(
                MAPS,
                RamName::File(Path::new("/dev/shm/forkd/sb")),
                512 << 20
            ),
            None
        );
    }

    #[test]
    fn odd_lines_are_skipped_not_trusted() {
        for junk in [
            "",
            "zz-7f rw-s 0 0 0 /dev/shm/x",
            "7f-7e rw-s 0 0 0 /dev/shm/x",
            "7f",
        ] {
            assert_eq!(
                find_guest_ram(junk, RamName::File(Path::new("/dev/shm/x")), 1),
                None
            );
        }
    }

    #[test]
    fn populates_a_mapping_of_this_process_and_reports_holes() {
        let page = 4096u64;
        let len = 64 * page;
        // SAFETY: a fresh anonymous mapping, unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let map = RamMapping {
            start: p as u64,
            len,
        };
        populate(std::process::id(), map, page).unwrap();
        // A range that runs past the mapping fails and says where.
        // SAFETY: unmapping the upper half of our own mapping.
        unsafe {
            libc::munmap(
                (p as u64 + len / 2) as *mut libc::c_void,
                (len / 2) as usize,
            )
        };
        let e = populate(std::process::id(), map, page).unwrap_err();
        match e {
            PopulateError::Fault { offset, .. } => assert_eq!(offset, len / 2),
            other => panic!("{other}"),
        }
        // SAFETY: the lower half is still ours.
        unsafe { libc::munmap(p, (len / 2) as usize) };
    }
}
