//! Admission: whether this host can take another guest, decided before any
//! QEMU starts, with the numbers in the refusal.
//!
//! Two resources are checked here, for every path that starts QEMUs
//! (`create`, `spawn`, the warm pool):
//! - **the runtime tmpfs**: a sandbox's RAM is a file there that grows to
//!   the whole guest as the guest touches it, and a write that finds the
//!   tmpfs full kills QEMU with SIGBUS. A new guest is admitted only if the
//!   free space, less what the running guests' RAM files may still claim
//!   (their size minus what they hold) and a headroom
//!   ([`forkd_ops::policy::TMPFS_HEADROOM_MIB`]), covers what it may need;
//! - **committed guest memory**: the sum of the memory sizes of the guests
//!   whose run directories exist in this runtime directory (every home that
//!   shares it), against a limit ([`forkd_ops::policy::GUEST_MEMORY_LIMIT_VAR`],
//!   default [`forkd_ops::policy::default_guest_memory_limit_mib`]).
//!
//! Admissions are serialised by a lock on the runtime directory that the
//! caller holds ([`Admitted`]) until the new run directory says what it
//! takes, so that two concurrent starts never both take the last room.
//! Other resources (cgroup limits, host networking) extend [`admit`].

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use forkd_ops::policy;

use crate::paths::{free_bytes, Env};
use crate::CoreError;

/// What a start needs.
#[derive(Debug, Clone)]
pub struct Need {
    /// The operation, for the refusal ("create", "spawn", "pool").
    pub what: &'static str,
    /// How many guests it starts.
    pub guests: u64,
    /// Memory of each, MiB.
    pub mem_mib: u64,
    /// Bytes it may claim on the runtime tmpfs, all guests together.
    pub tmpfs_bytes: u64,
}

/// Held while a start that was admitted records what it takes.
#[derive(Debug)]
pub struct Admitted {
    _lock: File,
}

/// What the runtime directory holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Sum of the memory sizes of guests with a run directory, MiB.
    pub committed_mib: u64,
    /// What the RAM files of those guests may still claim on the tmpfs.
    pub claimable_bytes: u64,
}

/// Why a start is refused, if it is: pure, over the numbers.
pub fn judge(
    need: &Need,
    usage: Usage,
    tmpfs_free: Option<u64>,
    mem_limit_mib: Option<u64>,
) -> Result<(), String> {
    const MIB: u64 = 1 << 20;
    if let Some(free) = tmpfs_free {
        let headroom = policy::TMPFS_HEADROOM_MIB * MIB;
        let available = free.saturating_sub(usage.claimable_bytes + headroom);
        if need.tmpfs_bytes > available {
            return Err(format!(
                "the runtime tmpfs cannot hold the guest RAM it may need: {} MiB needed, {} MiB free of which {} MiB may still be claimed by running guests and {} MiB is kept free",
                need.tmpfs_bytes.div_ceil(MIB),
                free / MIB,
                usage.claimable_bytes.div_ceil(MIB),
                policy::TMPFS_HEADROOM_MIB
            ));
        }
    }
    if let Some(limit) = mem_limit_mib {
        let asked = need.guests.saturating_mul(need.mem_mib);
        if usage.committed_mib.saturating_add(asked) > limit {
            return Err(format!(
                "committed guest memory would exceed its limit: {} MiB committed + {asked} MiB asked > {limit} MiB (set {} to change it, 0 for none)",
                usage.committed_mib,
                policy::GUEST_MEMORY_LIMIT_VAR
            ));
        }
    }
    Ok(())
}

/// Admits `need` or refuses it with the numbers. Hold the returned guard
/// until the new run directory's `owner.json` is written.
pub fn admit(env: &Env, need: &Need) -> Result<Admitted, CoreError> {
    std::fs::create_dir_all(&env.runtime).map_err(CoreError::host("creating", &env.runtime))?;
    let path = env.runtime.join("admission.lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(CoreError::host("opening", &path))?;
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a valid fd we own; blocks only while another start
    // of this runtime directory is being admitted (milliseconds).
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(CoreError::host("locking", &path)(
            std::io::Error::last_os_error(),
        ));
    }
    let tmpfs = crate::paths::is_tmpfs(&env.runtime)
        .then(|| free_bytes(&env.runtime))
        .flatten();
    judge(need, usage(env), tmpfs, memory_limit_mib()).map_err(|reason| CoreError::Admission {
        what: need.what,
        reason,
    })?;
    Ok(Admitted { _lock: lock })
}

/// What the run directories under `env.runtime` take (every home's).
pub fn usage(env: &Env) -> Usage {
    let mut u = Usage::default();
    let Ok(entries) = std::fs::read_dir(env.runtime.join("sandboxes")) else {
        return u;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if let Some(owner) = crate::fleet::starting::read_owner(&dir) {
            u.committed_mib += owner.mem_mib;
        }
        if let Ok(m) = std::fs::metadata(dir.join("ram")) {
            u.claimable_bytes += m.len().saturating_sub(m.blocks() * 512);
        }
    }
    u
}

/// The limit on committed guest memory: the variable, else the default
/// from the host's RAM; `None` for no limit.
pub fn memory_limit_mib() -> Option<u64> {
    match std::env::var(policy::GUEST_MEMORY_LIMIT_VAR)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        Some(0) => None,
        Some(n) => Some(n),
        None => host_ram_mib().map(policy::default_guest_memory_limit_mib),
    }
}

/// `MemTotal` from `/proc/meminfo`, MiB.
fn host_ram_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024)
}

/// Why a detached sandbox whose QEMU is gone most likely died, when the
/// host says so: its RAM file lives on a runtime tmpfs that is (nearly)
/// full, where a write of the guest ends in SIGBUS.
pub fn likely_death_cause(env: &Env, vm: &forkd_vm::VmConfig) -> Option<String> {
    let forkd_vm::MemoryBackend::SharedFile(ram) = &vm.memory else {
        return None;
    };
    if vm.ram_in_hugetlb_memfd() || !crate::paths::is_tmpfs(ram) {
        return None;
    }
    let free = free_bytes(ram.parent().unwrap_or(Path::new(&env.runtime)))?;
    (free < policy::TMPFS_HEADROOM_MIB << 20).then(|| {
        format!(
            "most likely killed by SIGBUS: the runtime tmpfs is full ({} MiB free)",
            free >> 20
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn need(mem: u64, tmpfs: u64) -> Need {
        Need {
            what: "create",
            guests: 1,
            mem_mib: mem,
            tmpfs_bytes: tmpfs * MIB,
        }
    }

    #[test]
    fn a_full_tmpfs_refuses_with_the_numbers() {
        let e = judge(&need(256, 256), Usage::default(), Some(18 * MIB), None).unwrap_err();
        assert_eq!(
            e,
            "the runtime tmpfs cannot hold the guest RAM it may need: 256 MiB needed, 18 MiB free of which 0 MiB may still be claimed by running guests and 64 MiB is kept free"
        );
        assert!(judge(&need(256, 256), Usage::default(), Some(400 * MIB), None).is_ok());
        // What running guests may still claim counts as taken.
        let busy = Usage {
            committed_mib: 0,
            claimable_bytes: 200 * MIB,
        };
        assert!(judge(&need(256, 256), busy, Some(400 * MIB), None).is_err());
        // Not on tmpfs (or unknown): not judged.
        assert!(judge(&need(256, 256), busy, None, None).is_ok());
        assert!(judge(&need(256, 0), busy, Some(0), None).is_ok());
    }

    #[test]
    fn committed_memory_is_held_to_its_limit() {
        let u = Usage {
            committed_mib: 900,
            claimable_bytes: 0,
        };
        assert!(judge(&need(100, 0), u, None, Some(1000)).is_ok());
        let e = judge(
            &Need {
                guests: 2,
                ..need(100, 0)
            },
            u,
            None,
            Some(1000),
        )
        .unwrap_err();
        assert!(
            e.starts_with("committed guest memory would exceed its limit: 900 MiB committed + 200 MiB asked > 1000 MiB"),
            "{e}"
        );
        assert!(judge(&need(100, 0), u, None, None).is_ok());
    }

    #[test]
    fn usage_counts_every_run_directory_and_unclaimed_ram() {
        let tmp = tempfile::tempdir().unwrap();
        let env = Env {
            home: tmp.path().join("home"),
            runtime: tmp.path().join("run"),
        };
        for (id, mem) in [("sb-a", 256u64), ("sb-b", 512)] {
            let dir = env.runtime.join("sandboxes").join(id);
            std::fs::create_dir_all(&dir).unwrap();
            crate::fleet::starting::write_owner(
                &dir,
                &crate::fleet::starting::RunDirOwner {
                    home: env.home.clone(),
                    mem_mib: mem,
                },
            )
            .unwrap();
            File::create(dir.join("ram"))
                .unwrap()
                .set_len(mem * MIB)
                .unwrap();
        }
        let u = usage(&env);
        assert_eq!(u.committed_mib, 768);
        assert_eq!(u.claimable_bytes, 768 * MIB);
    }
}
