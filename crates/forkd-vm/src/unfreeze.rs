//! Thawing a QEMU that a failed live snapshot left frozen.
//!
//! A background snapshot (`migrate` with `background-snapshot`) write-protects
//! guest RAM with userfaultfd; each write of the guest then waits in the
//! kernel until QEMU's migration thread has copied the page out and lifted
//! the protection. QEMU 7.2 lifts it for good only when the snapshot
//! *completes* (`bg_migration_completion` calls `ram_write_tracking_stop`):
//! when the stream fails (its consumer died, the socket broke, a
//! `migrate_cancel`), `bg_migration_thread` ends through
//! `bg_migration_iteration_finish`, which never calls it. The protection and
//! the registration stay, the migration thread is gone, and the next write
//! of the guest (a vCPU, or QEMU's main thread touching a virtqueue) blocks
//! in `handle_userfault` for ever: QMP stops answering, the agent too, and a
//! later background snapshot fails its compatibility check because the RAM
//! is still registered with the dead snapshot's userfaultfd.
//!
//! The userfaultfd is a file descriptor of QEMU, and its ioctls act on the
//! memory of the process that created it, whoever calls them. So another
//! process can take a duplicate (`pidfd_getfd`, which needs the right to
//! ptrace QEMU: the same user under the default Yama policy 0, or root),
//! lift the protection of every write-protected range (`UFFDIO_WRITEPROTECT`
//! without the protect bit, which also wakes the blocked threads) and
//! unregister it (`UFFDIO_UNREGISTER`). QEMU then runs on as if the
//! snapshot had never started, and can be snapshotted again. Which ranges:
//! the mappings whose `VmFlags` in `/proc/PID/smaps` carry `uw` (registered
//! for userfaultfd write-protect).
//!
//! Call it only when no background snapshot of this QEMU is in progress:
//! lifting the protection under a live snapshot would let the guest change
//! pages before they are copied.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::process::pid_alive;
use crate::VmError;

/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)` (24 bytes).
const UFFDIO_WRITEPROTECT: u64 = 0xC018_AA06;
/// `_IOR(0xAA, 0x01, struct uffdio_range)` (16 bytes).
const UFFDIO_UNREGISTER: u64 = 0x8010_AA01;

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// What [`release_write_protection`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// Mappings that were registered for write-protect, `(start, end)`.
    pub ranges: Vec<(u64, u64)>,
    /// Of their bytes, how many were lifted (all of them, unless QEMU
    /// exited meanwhile).
    pub bytes: u64,
}

impl Released {
    /// Whether anything was frozen.
    pub fn was_frozen(&self) -> bool {
        !self.ranges.is_empty()
    }
}

/// The `(start, end)` of every mapping in an `smaps` text whose `VmFlags`
/// carry `uw` (registered for userfaultfd write-protect).
pub fn write_protected_ranges(smaps: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut current = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if flags.split_whitespace().any(|f| f == "uw") {
                if let Some(r) = current.take() {
                    out.push(r);
                }
            }
            continue;
        }
        // A mapping's header: "start-end perms offset dev inode [path]".
        let Some(range) = line.split_whitespace().next() else {
            continue;
        };
        if let Some((a, b)) = range.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                if b > a && line.split_whitespace().count() >= 5 {
                    current = Some((a, b));
                }
            }
        }
    }
    out
}

/// Whether QEMU `pid` has guest memory registered for write-protect, i.e.
/// a background snapshot runs or a failed one left it frozen.
pub fn is_write_protected(pid: u32) -> io::Result<bool> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(!write_protected_ranges(&smaps).is_empty())
}

/// Lifts the userfaultfd write-protection a failed background snapshot left
/// on QEMU `pid` (started at `pid_start`), waking every thread blocked on
/// it, and unregisters the ranges so that QEMU can snapshot again. A QEMU
/// with nothing write-protected is left alone. See the module doc for why
/// and for when it is safe to call.
pub fn release_write_protection(pid: u32, pid_start: u64) -> Result<Released, VmError> {
    let err = |what: &str, e: io::Error| VmError::Thaw {
        pid,
        reason: format!("{what}: {e}"),
    };
    if !pid_alive(pid, pid_start) {
        return Err(VmError::NotRunning { pid });
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // no memory is passed.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if raw < 0 {
        return Err(err("pidfd_open", io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // The pidfd pins the process: check it is still the QEMU we mean.
    if !pid_alive(pid, pid_start) {
        return Err(VmError::NotRunning { pid });
    }
    let smaps =
        fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|e| err("reading smaps", e))?;
    let ranges = write_protected_ranges(&smaps);
    let mut out = Released {
        ranges: ranges.clone(),
        bytes: 0,
    };
    if ranges.is_empty() {
        return Ok(out);
    }
    let mut lifted = vec![false; ranges.len()];
    for target in userfaultfds(pid).map_err(|e| err("listing QEMU's file descriptors", e))? {
        // SAFETY: pidfd_getfd duplicates fd `target` of the process behind
        // `pidfd` into ours; no memory is passed.
        let raw = unsafe {
            libc::syscall(
                libc::SYS_pidfd_getfd,
                pidfd.as_raw_fd(),
                target as libc::c_int,
                0,
            )
        };
        if raw < 0 {
            return Err(err(
                "pidfd_getfd (taking QEMU's userfaultfd needs ptrace rights over it)",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: a fresh duplicate that nothing else owns.
        let uffd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        for (i, &(start, end)) in ranges.iter().enumerate() {
            let mut wp = UffdioWriteprotect {
                range: UffdioRange {
                    start,
                    len: end - start,
                },
                mode: 0, // neither WRITEPROTECT nor DONTWAKE: lift and wake
            };
            // SAFETY: UFFDIO_WRITEPROTECT reads and writes one
            // `struct uffdio_writeprotect`, which `wp` is and outlives the call.
            let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) };
            if rc != 0 {
                // Registered with another userfaultfd of QEMU: try the next.
                continue;
            }
            let mut range = UffdioRange {
                start,
                len: end - start,
            };
            // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`,
            // which `range` is and outlives the call.
            unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) };
            lifted[i] = true;
        }
    }
    out.bytes = ranges
        .iter()
        .zip(&lifted)
        .filter(|(_, l)| **l)
        .map(|((a, b), _)| b - a)
        .sum();
    if lifted.iter().any(|l| !l) && pid_alive(pid, pid_start) {
        return Err(VmError::Thaw {
            pid,
            reason: "some write-protected guest memory belongs to no userfaultfd of QEMU".into(),
        });
    }
    Ok(out)
}

/// QEMU's descriptors that are userfaultfds.
fn userfaultfds(pid: u32) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:[userfaultfd]") {
            out.push(fd);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7fce12400000-7fce12410000 rw-p 00000000 00:00 0 
Size:                 64 kB
VmFlags: rd wr mr mw me uw dc ac hg mg 
7fce12410000-7fce12420000 rw-p 00000000 00:00 0 
Size:                 64 kB
VmFlags: rd wr mr mw me ac 
7fce13fff000-7fce53fff000 rw-s 00000000 00:1b 1371                       /dev/shm/forkd/sandboxes/sb-1/ram
Size:            1048576 kB
VmFlags: rd wr sh mr mw me ms uw dc hg 
";

    #[test]
    fn write_protected_mappings_are_found_by_their_flags() {
        assert_eq!(
            write_protected_ranges(SMAPS),
            [
                (0x7fce_1240_0000, 0x7fce_1241_0000),
                (0x7fce_13ff_f000, 0x7fce_53ff_f000)
            ]
        );
        assert!(write_protected_ranges("").is_empty());
        assert!(write_protected_ranges("VmFlags: uw\n").is_empty());
        assert!(write_protected_ranges("garbage-line x\nVmFlags: uw\n").is_empty());
    }

    #[test]
    fn a_process_without_write_protect_is_left_alone() {
        let me = std::process::id();
        let start = crate::process::process_start_time(me).unwrap();
        assert!(!is_write_protected(me).unwrap());
        let r = release_write_protection(me, start).unwrap();
        assert!(!r.was_frozen());
        assert!(matches!(
            release_write_protection(me, start + 1),
            Err(VmError::NotRunning { .. })
        ));
    }
}
