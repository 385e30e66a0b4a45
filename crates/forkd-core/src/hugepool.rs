//! The huge-page pool forkd manages itself, so that sandboxes run on 2 MiB
//! pages by default with no host step: as root, forkd lets the kernel's
//! hugetlb pool grow on demand (`vm.nr_overcommit_hugepages`, "surplus"
//! pages taken from free memory when a guest touches them and given back
//! when its QEMU exits) by exactly the guest sizes of the sandboxes that run
//! on it, and puts the host's own value back when none is left.
//!
//! Host-wide, not per home: every forkd on the host (each test home, each
//! user's) writes the same sysctl, so the ledger lives in `/run` with one
//! entry per sandbox (`ID`: pages, QEMU pid and start time) under one
//! `flock`. An entry is held by the forkd process that claimed it, then by
//! its QEMU; one whose holder is gone (or that has none, after
//! [`UNCLAIMED_FOR`]) is dropped the next time anyone looks. The limit is the
//! host's value from before forkd first raised it, plus the live entries'
//! pages, plus the surplus pages in use when it is set ([`target_limit`]).
//! Raising the limit reserves no memory: a sandbox costs the host the 2 MiB
//! pages its guest has touched, nothing more.
//!
//! Never lowers the limit below what live entries need; never touches
//! `vm.nr_hugepages` (the static pool is the administrator's).

use std::fs::{self, File};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use forkd_vm::HugePages;

use crate::hugepages::HugePagePool;
use crate::CoreError;

/// The ledger's directory (tmpfs: it must not outlive a reboot, nor the
/// sysctl it describes).
pub const LEDGER_DIR: &str = "/run/forkd-hugepool";
/// Where the kernel takes the surplus limit for the default huge page size.
const OVERCOMMIT_SYSCTL: &str = "/proc/sys/vm/nr_overcommit_hugepages";
/// The host's limit from before forkd raised it.
const ORIGINAL: &str = "original";
/// An entry without a holder (from a forkd before claims had one, or a
/// claimer whose start time was unreadable) is dropped after this long.
pub const UNCLAIMED_FOR: Duration = Duration::from_secs(15 * 60);

/// One sandbox in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// 2 MiB pages its guest may take.
    pub pages: u64,
    /// Who holds it: the claiming forkd process, then its QEMU (0: nobody
    /// known, see [`UNCLAIMED_FOR`]).
    pub pid: u32,
    pub pid_start: u64,
}

impl Entry {
    /// Parses an entry file: `PAGES PID PID_START`.
    pub fn parse(s: &str) -> Option<Entry> {
        let mut w = s.split_whitespace().map(|x| x.parse::<u64>().ok());
        let pages = w.next()??;
        let pid = u32::try_from(w.next()??).ok()?;
        let pid_start = w.next()??;
        Some(Entry {
            pages,
            pid,
            pid_start,
        })
    }

    fn render(&self) -> String {
        format!("{} {} {}\n", self.pages, self.pid, self.pid_start)
    }
}

/// The limit the kernel should have: the host's own, plus every live
/// entry, plus `in_use` (the surplus pages taken right now). A QEMU forkd
/// has seen exit can hold its pages a moment longer: the kernel frees them
/// when the last reference to its memory goes, which may be another
/// process reading its `/proc` files. Counting only the live entries then
/// left the pool full for a moment, and a guest booting meanwhile was
/// killed by SIGBUS on its next new page (seen in CI; a watcher sampling
/// every 20 ms saw 65 surplus pages in use with no entry left, and 144 in
/// use against one entry of 128). Counting what is in use lets every live
/// entry take all its pages whatever the stragglers hold; the limit is a
/// cap, not a reservation, and forkd's own guests never exceed their
/// entries (each QEMU's RAM is a memfd of its guest's size).
pub fn target_limit(original: u64, live: &[Entry], in_use: u64) -> u64 {
    original
        .saturating_add(live.iter().map(|e| e.pages).sum())
        .saturating_add(in_use)
}

/// Surplus huge pages of the default size in use on the host now.
pub fn surplus_in_use() -> Result<u64, CoreError> {
    const MEMINFO: &str = "/proc/meminfo";
    let info = fs::read_to_string(MEMINFO).map_err(CoreError::host("reading", MEMINFO))?;
    info.lines()
        .find_map(|l| l.strip_prefix("HugePages_Surp:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| CoreError::HugePages(format!("{MEMINFO} has no HugePages_Surp")))
}

/// Set to `off` in forkd's environment: new sandboxes on 4 KiB pages.
pub const OPT_OUT_VAR: &str = "FORKD_HUGEPAGES";

/// Why new sandboxes do not get on-demand huge pages here (forkd cannot
/// manage the pool, or the host's owner said no), or `None` when they do.
pub fn unavailable() -> Option<String> {
    if std::env::var(OPT_OUT_VAR).is_ok_and(|v| v == "off") {
        return Some(format!("{OPT_OUT_VAR}=off is set"));
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "forkd is not root, so it cannot let the host's huge-page pool grow (vm.nr_overcommit_hugepages)"
                .into(),
        );
    }
    match HugePagePool::read() {
        Err(e) => Some(e.to_string()),
        Ok(p) if !p.is_default_size => Some(
            "2 MiB is not this host's default huge page size, and vm.nr_overcommit_hugepages sizes the default pool"
                .into(),
        ),
        Ok(_) if fs::metadata(OVERCOMMIT_SYSCTL).is_err() => {
            Some(format!("this kernel has no {OVERCOMMIT_SYSCTL}"))
        }
        Ok(_) => None,
    }
}

/// Which pages back a new sandbox's RAM: what was asked (`--hugepages`,
/// `--prealloc`) and whether forkd can manage the pool (`unavailable`, from
/// [`unavailable`]). Returns the choice and, when the default falls back to
/// 4 KiB pages, the one line that says why.
pub fn choose(
    requested: bool,
    prealloc: bool,
    mem_mib: u64,
    unavailable: Option<String>,
) -> (HugePages, Option<String>) {
    match (requested, prealloc) {
        // Asked for populated huge pages: the administrator's static pool.
        (true, true) => return (HugePages::Hugetlb, None),
        // Asked for populated 4 KiB pages.
        (false, true) => return (HugePages::Off, None),
        _ => {}
    }
    if !mem_mib.is_multiple_of(2) && !requested {
        return (
            HugePages::Off,
            Some(format!(
                "guest RAM on 4 KiB pages: {mem_mib} MiB is not a multiple of the 2 MiB huge page size; live-branch pauses will grow with guest size"
            )),
        );
    }
    match (unavailable, requested) {
        (None, _) => (HugePages::HugetlbOnDemand, None),
        // Asked for explicitly: the static pool (checked before launch).
        (Some(_), true) => (HugePages::Hugetlb, None),
        (Some(why), false) => (
            HugePages::Off,
            Some(format!(
                "guest RAM on 4 KiB pages: {why}; live-branch pauses will grow with guest size"
            )),
        ),
    }
}

/// The ledger, locked for as long as it lives.
struct Ledger {
    dir: PathBuf,
    _lock: File,
}

impl Ledger {
    fn open() -> Result<Ledger, CoreError> {
        let dir = PathBuf::from(LEDGER_DIR);
        fs::create_dir_all(&dir).map_err(CoreError::host("creating", &dir))?;
        let lock_path = dir.join("lock");
        let lock = File::create(&lock_path).map_err(CoreError::host("creating", &lock_path))?;
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(CoreError::host("locking", lock_path)(
                io::Error::last_os_error(),
            ));
        }
        Ok(Ledger { dir, _lock: lock })
    }

    fn entry_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("sb-{id}"))
    }

    fn write_entry(&self, id: &str, e: Entry) -> Result<(), CoreError> {
        let p = self.entry_path(id);
        fs::write(&p, e.render()).map_err(CoreError::host("writing", p))
    }

    /// The live entries; drops the dead ones.
    fn live(&self) -> Result<Vec<Entry>, CoreError> {
        let mut live = Vec::new();
        let rd = fs::read_dir(&self.dir).map_err(CoreError::host("reading", &self.dir))?;
        for f in rd.flatten() {
            if !f.file_name().to_string_lossy().starts_with("sb-") {
                continue;
            }
            let path = f.path();
            let entry = fs::read_to_string(&path)
                .ok()
                .and_then(|s| Entry::parse(&s));
            let alive = match entry {
                Some(e) if e.pid != 0 => forkd_vm::process::pid_alive(e.pid, e.pid_start),
                Some(_) => !older_than(&path, UNCLAIMED_FOR),
                None => false,
            };
            match (alive, entry) {
                (true, Some(e)) => live.push(e),
                _ => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(live)
    }

    /// Sets the kernel's limit from the live entries; once none is left,
    /// puts the host's own value back and forgets it.
    fn apply(&self) -> Result<u64, CoreError> {
        let live = self.live()?;
        let original_path = self.dir.join(ORIGINAL);
        let saved = fs::read_to_string(&original_path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if live.is_empty() {
            if let Some(orig) = saved {
                write_sysctl(orig)?;
                let _ = fs::remove_file(&original_path);
                return Ok(orig);
            }
            return read_sysctl();
        }
        let original = match saved {
            Some(o) => o,
            None => {
                let o = read_sysctl()?;
                fs::write(&original_path, format!("{o}\n"))
                    .map_err(CoreError::host("writing", &original_path))?;
                o
            }
        };
        let target = target_limit(original, &live, surplus_in_use()?);
        if read_sysctl()? != target {
            write_sysctl(target)?;
        }
        Ok(target)
    }
}

fn older_than(path: &Path, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|d| d > age)
}

fn read_sysctl() -> Result<u64, CoreError> {
    fs::read_to_string(OVERCOMMIT_SYSCTL)
        .map_err(CoreError::host("reading", OVERCOMMIT_SYSCTL))?
        .trim()
        .parse()
        .map_err(|_| CoreError::HugePages(format!("{OVERCOMMIT_SYSCTL} does not hold a number")))
}

fn write_sysctl(v: u64) -> Result<(), CoreError> {
    fs::write(OVERCOMMIT_SYSCTL, v.to_string())
        .map_err(CoreError::host("writing", OVERCOMMIT_SYSCTL))
}

/// Lets the pool grow by `pages` for sandbox `id`, before its QEMU starts.
/// The claim is this process's until [`bind`] hands it to the QEMU: a
/// claimer that dies first leaves a claim the next look at the ledger drops.
pub fn claim(id: &str, pages: u64) -> Result<(), CoreError> {
    let l = Ledger::open()?;
    let me = std::process::id();
    // Without a start time the entry has no holder and ages out instead.
    let (pid, pid_start) = match forkd_vm::process::process_start_time(me) {
        Some(start) => (me, start),
        None => (0, 0),
    };
    l.write_entry(
        id,
        Entry {
            pages,
            pid,
            pid_start,
        },
    )?;
    l.apply().map(drop)
}

/// Records the QEMU that now holds sandbox `id`'s claim: the claim ends
/// when that process does.
pub fn bind(id: &str, pages: u64, pid: u32, pid_start: u64) -> Result<(), CoreError> {
    let l = Ledger::open()?;
    l.write_entry(
        id,
        Entry {
            pages,
            pid,
            pid_start,
        },
    )
}

/// Drops sandbox `id`'s claim (its QEMU never started or is gone).
pub fn release(id: &str) -> Result<(), CoreError> {
    let l = Ledger::open()?;
    let _ = fs::remove_file(l.entry_path(id));
    l.apply().map(drop)
}

/// Drops the claims of sandboxes whose QEMU is gone and lowers the limit
/// accordingly; a no-op when forkd has never raised it.
pub fn settle() -> Result<(), CoreError> {
    if !Path::new(LEDGER_DIR).exists() {
        return Ok(());
    }
    Ledger::open()?.apply().map(drop)
}

/// What the ledger holds now, for `forkd doctor`: (the host's own limit when
/// forkd raised it, pages claimed by live sandboxes, how many).
pub fn status() -> Option<(u64, u64, usize)> {
    let dir = Path::new(LEDGER_DIR);
    let original = fs::read_to_string(dir.join(ORIGINAL))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let entries: Vec<Entry> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().starts_with("sb-"))
        .filter_map(|f| Entry::parse(&fs::read_to_string(f.path()).ok()?))
        .filter(|e| e.pid == 0 || forkd_vm::process::pid_alive(e.pid, e.pid_start))
        .collect();
    Some((
        original,
        entries.iter().map(|e| e.pages).sum(),
        entries.len(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_junk_is_refused() {
        let e = Entry {
            pages: 256,
            pid: 4242,
            pid_start: 99,
        };
        assert_eq!(Entry::parse(&e.render()), Some(e));
        for junk in ["", "1", "1 2", "a b c", "1 99999999999 3", "-1 2 3"] {
            assert_eq!(Entry::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn huge_pages_by_default_where_forkd_can_manage_the_pool() {
        let no = || Some("forkd is not root".to_string());
        assert_eq!(
            choose(false, false, 512, None),
            (HugePages::HugetlbOnDemand, None)
        );
        assert_eq!(
            choose(true, false, 512, None),
            (HugePages::HugetlbOnDemand, None)
        );
        let (p, note) = choose(false, false, 512, no());
        assert_eq!(p, HugePages::Off);
        assert!(note.unwrap().contains("4 KiB pages: forkd is not root"));
        assert_eq!(choose(true, false, 512, no()), (HugePages::Hugetlb, None));
        assert_eq!(choose(true, true, 512, None), (HugePages::Hugetlb, None));
        assert_eq!(choose(false, true, 512, None), (HugePages::Off, None));
        let (p, note) = choose(false, false, 257, None);
        assert_eq!(p, HugePages::Off);
        assert!(note.unwrap().contains("257 MiB is not a multiple"));
    }

    #[test]
    fn the_limit_is_the_hosts_own_plus_live_claims() {
        let e = |pages| Entry {
            pages,
            pid: 1,
            pid_start: 0,
        };
        assert_eq!(target_limit(0, &[], 0), 0);
        assert_eq!(target_limit(10, &[e(256), e(1024)], 0), 1290);
        // Pages still held by QEMUs already gone keep their room.
        assert_eq!(target_limit(0, &[e(128)], 65), 193);
        assert_eq!(target_limit(u64::MAX, &[e(1)], 7), u64::MAX);
    }
}
