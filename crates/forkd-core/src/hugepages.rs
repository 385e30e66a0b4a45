//! The host's static pool of 2 MiB huge pages, which sandboxes take their
//! RAM from when forkd cannot manage an on-demand pool (not root) or when
//! asked to preallocate (`memory-backend-memfd,hugetlb=on,hugetlbsize=2M`).
//!
//! Reads the pool and checks it before a launch, so that a short pool is
//! refused with the `sysctl` that fixes it instead of QEMU's "unable to map
//! backing store". It never changes the static pool: reserving memory for
//! huge pages is the host administrator's decision. The on-demand (surplus)
//! pool forkd does manage is [`crate::hugepool`].

use serde::Serialize;

use crate::CoreError;

/// Size of the huge pages forkd asks QEMU for (`hugetlbsize=2M`).
pub const HUGE_PAGE_KIB: u64 = 2048;

const SYSFS_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// The 2 MiB huge-page pool, in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HugePagePool {
    /// Pages in the pool (`HugePages_Total`; `vm.nr_hugepages`).
    pub total: u64,
    /// Pages not faulted in by anyone (`HugePages_Free`).
    pub free: u64,
    /// Free pages already promised to a mapping (`HugePages_Rsvd`): a
    /// running hugetlb sandbox without prealloc holds its whole size here.
    pub reserved: u64,
    /// Whether 2 MiB is the host's default huge page size, so that
    /// `vm.nr_hugepages` sizes this pool.
    pub is_default_size: bool,
}

impl HugePagePool {
    /// Parses `/proc/meminfo`. Its `HugePages_*` lines describe the default
    /// huge page size (`Hugepagesize`); `None` when they are missing.
    pub fn parse_meminfo(meminfo: &str) -> Option<HugePagePool> {
        let field = |name: &str| -> Option<u64> {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        };
        Some(HugePagePool {
            total: field("HugePages_Total")?,
            free: field("HugePages_Free")?,
            reserved: field("HugePages_Rsvd")?,
            is_default_size: field("Hugepagesize")? == HUGE_PAGE_KIB,
        })
    }

    /// The host's 2 MiB pool: `/proc/meminfo`, or sysfs when the default
    /// huge page size is another one.
    pub fn read() -> Result<HugePagePool, CoreError> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")
            .map_err(CoreError::host("reading", "/proc/meminfo"))?;
        let pool = HugePagePool::parse_meminfo(&meminfo).ok_or_else(|| {
            CoreError::HugePages(
                "/proc/meminfo has no HugePages_* lines: this kernel has no hugetlb support".into(),
            )
        })?;
        if pool.is_default_size {
            return Ok(pool);
        }
        let read = |name: &str| -> Result<u64, CoreError> {
            let path = format!("{SYSFS_2M}/{name}");
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    CoreError::HugePages(format!(
                        "this host has no 2 MiB huge pages ({path} is unreadable)"
                    ))
                })
        };
        Ok(HugePagePool {
            total: read("nr_hugepages")?,
            free: read("free_hugepages")?,
            reserved: read("resv_hugepages")?,
            is_default_size: false,
        })
    }

    /// Pages a new mapping can still get.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// Pages a guest of `mem_mib` MiB needs.
    pub fn pages_for(mem_mib: u64) -> u64 {
        (mem_mib * 1024).div_ceil(HUGE_PAGE_KIB)
    }

    /// The command that grows the pool to `pages`.
    pub fn reserve_command(&self, pages: u64) -> String {
        if self.is_default_size {
            format!("sysctl -w vm.nr_hugepages={pages}")
        } else {
            format!("echo {pages} > {SYSFS_2M}/nr_hugepages")
        }
    }

    /// Whether a hugetlb guest of `mem_mib` MiB fits; if not, why and the
    /// command that makes it fit.
    pub fn check(&self, mem_mib: u64) -> Result<(), String> {
        let need = HugePagePool::pages_for(mem_mib);
        let available = self.available();
        if available >= need {
            return Ok(());
        }
        let target = self.total + (need - available);
        Err(format!(
            "--hugepages needs {need} free 2 MiB huge pages for a {mem_mib} MiB guest, but the host has {available} \
             (HugePages_Total {}, HugePages_Free {}, of which {} are reserved by running sandboxes). \
             Reserve more as root: `{}` (then check HugePages_Total in /proc/meminfo: the kernel reserves fewer \
             when memory is fragmented), or create the sandbox without --hugepages",
            self.total,
            self.free,
            self.reserved,
            self.reserve_command(target)
        ))
    }
}

/// Refuses to launch a hugetlb guest of `mem_mib` MiB that the host's pool
/// cannot hold.
pub fn preflight(mem_mib: u64) -> Result<(), CoreError> {
    HugePagePool::read()?
        .check(mem_mib)
        .map_err(CoreError::HugePages)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24576000 kB\n\
        AnonHugePages:         0 kB\n\
        ShmemHugePages:        0 kB\n\
        HugePages_Total:     300\n\
        HugePages_Free:      200\n\
        HugePages_Rsvd:       50\n\
        HugePages_Surp:        0\n\
        Hugepagesize:       2048 kB\n\
        Hugetlb:          614400 kB\n";

    #[test]
    fn parses_the_pool_and_counts_reserved_pages_as_taken() {
        let pool = HugePagePool::parse_meminfo(MEMINFO).unwrap();
        assert_eq!(
            pool,
            HugePagePool {
                total: 300,
                free: 200,
                reserved: 50,
                is_default_size: true
            }
        );
        assert_eq!(pool.available(), 150);
        assert_eq!(HugePagePool::pages_for(256), 128);
        assert_eq!(HugePagePool::pages_for(8192), 4096);
        assert!(pool.check(300).is_ok());
        let e = pool.check(512).unwrap_err();
        assert!(e.contains("needs 256 free 2 MiB huge pages"), "{e}");
        assert!(e.contains("the host has 150"), "{e}");
        // 106 more pages than the pool has now.
        assert!(e.contains("`sysctl -w vm.nr_hugepages=406`"), "{e}");
    }

    #[test]
    fn an_empty_pool_and_other_page_sizes() {
        let empty = MEMINFO
            .replace("300\n", "0\n")
            .replace("200\n", "0\n")
            .replace("   50\n", "    0\n");
        let pool = HugePagePool::parse_meminfo(&empty).unwrap();
        assert_eq!((pool.total, pool.available()), (0, 0));
        assert!(pool
            .check(256)
            .unwrap_err()
            .contains("`sysctl -w vm.nr_hugepages=128`"));
        let gig = MEMINFO.replace("2048 kB", "1048576 kB");
        let pool = HugePagePool::parse_meminfo(&gig).unwrap();
        assert!(!pool.is_default_size);
        assert_eq!(
            pool.reserve_command(7),
            "echo 7 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
        );
        assert_eq!(HugePagePool::parse_meminfo("MemTotal: 1 kB\n"), None);
        // `HugePages_Total` must not match a longer name that starts with it.
        assert_eq!(
            HugePagePool::parse_meminfo(&MEMINFO.replace("HugePages_Rsvd", "HugePages_RsvdX")),
            None
        );
    }
}
