//! How a QEMU process is confined: its seccomp filter (`-sandbox`) and,
//! when forkd runs as root, the unprivileged user it drops to (`-runas`).
//! The decisions are pure ([`seccomp_option`], [`parse_passwd`],
//! [`RunAs::parse`], [`pick_uid`]); [`run_as_for`] reads the environment
//! and records each VM's uid in its run directory.
//!
//! As root, each QEMU runs as a uid and gid of its own (default range
//! [`DEFAULT_UIDS`], no passwd entry needed): one QEMU cannot signal, trace
//! or write to another, and its run directory is `root:<its gid> 0710`.
//!
//! QEMU 7.2 installs its seccomp filter while it parses its options and
//! drops to the `-runas` user only afterwards, so `elevateprivileges=deny`
//! kills it with SIGSYS at its own `setuid` (measured). Under `-runas` the
//! filter therefore allows the set*id calls; by then QEMU has given up every
//! uid, gid and capability (all four uids are the user's, CapEff 0,
//! NoNewPrivs 1, measured), so they cannot elevate anything.

use std::path::Path;

/// The `-sandbox` value for a QEMU that runs unprivileged from the start.
pub const SECCOMP_STRICT: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The `-sandbox` value for a QEMU started as root that drops to `-runas`
/// (see the module doc for why set*id stays allowed).
pub const SECCOMP_RUNAS: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

/// The environment variable naming one user every QEMU runs as when forkd
/// is root (a user name or `UID:GID`), instead of a uid of its own per VM.
pub const USER_VAR: &str = "FORKD_QEMU_USER";
/// The environment variable with the range of per-VM uids, `START:COUNT`.
pub const UIDS_VAR: &str = "FORKD_QEMU_UIDS";
/// The default range of per-VM uids (and gids of the same numbers): high
/// enough to be nobody's on a normal host, below 2^31 for tools that read
/// uids as signed numbers.
pub const DEFAULT_UIDS: (u32, u32) = (2_100_000_000, 1 << 20);
/// The file in a VM's run directory that records the uid it was given, so
/// that its network gateway and its QEMU agree.
pub const UID_FILE: &str = "qemu.uid";

/// The unprivileged identity a QEMU started by root drops to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// How a QEMU binary is told which user to drop to: QEMU 7.2 knows only
/// `-runas UID:GID`; QEMU 9.1 added `-run-with user=UID:GID` and 10.0
/// removed `-runas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UserOption {
    #[default]
    Runas,
    RunWith,
}

impl UserOption {
    /// Which option a QEMU whose `-help` text is `help` accepts.
    pub fn from_help(help: &str) -> UserOption {
        let run_with_user = help
            .lines()
            .any(|l| l.trim_start().starts_with("-run-with") && l.contains("user="));
        if run_with_user {
            UserOption::RunWith
        } else {
            UserOption::Runas
        }
    }

    /// The arguments that make QEMU drop to `r`.
    pub fn args(self, r: RunAs) -> [String; 2] {
        match self {
            UserOption::Runas => ["-runas".into(), r.arg()],
            UserOption::RunWith => ["-run-with".into(), format!("user={}", r.arg())],
        }
    }

    /// The option `qemu` accepts, asked once per binary path and process
    /// (`qemu -help`); `-runas` when the binary cannot be asked.
    pub fn of(qemu: &Path) -> UserOption {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        static SEEN: OnceLock<Mutex<HashMap<std::path::PathBuf, UserOption>>> = OnceLock::new();
        let seen = SEEN.get_or_init(Default::default);
        if let Some(o) = seen.lock().ok().and_then(|m| m.get(qemu).copied()) {
            return o;
        }
        let option = std::process::Command::new(qemu)
            .arg("-help")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .map(|o| UserOption::from_help(&String::from_utf8_lossy(&o.stdout)))
            .unwrap_or_default();
        if let Ok(mut m) = seen.lock() {
            m.insert(qemu.to_path_buf(), option);
        }
        option
    }
}

impl RunAs {
    /// `UID:GID` (both numbers, neither 0).
    pub fn parse(s: &str) -> Option<RunAs> {
        let (u, g) = s.split_once(':')?;
        let r = RunAs {
            uid: u.trim().parse().ok()?,
            gid: g.trim().parse().ok()?,
        };
        (r.uid != 0 && r.gid != 0).then_some(r)
    }

    /// QEMU's `-runas` value: numeric, so no name lookup happens in QEMU.
    pub fn arg(&self) -> String {
        format!("{}:{}", self.uid, self.gid)
    }
}

/// The `-sandbox` value for a QEMU that drops to `run_as` (or not).
pub fn seccomp_option(run_as: Option<RunAs>) -> &'static str {
    if run_as.is_some() {
        SECCOMP_RUNAS
    } else {
        SECCOMP_STRICT
    }
}

/// The uid and gid of `user` in passwd(5) text.
pub fn parse_passwd(text: &str, user: &str) -> Option<RunAs> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[0] == user {
            Some(RunAs {
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        } else {
            None
        }
    })
}

/// `START:COUNT` of [`UIDS_VAR`]: a non-empty range above root that does
/// not wrap.
pub fn parse_uid_range(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    let (start, count): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (start > 0 && count > 0 && start.checked_add(count).is_some()).then_some((start, count))
}

/// The uid of VM `name` in `range`: where its name hashes to, or the next
/// one up that `in_use` says no process has (a uid of its own, so that one
/// QEMU cannot signal, trace or write to another).
pub fn pick_uid(name: &str, (start, count): (u32, u32), in_use: impl Fn(u32) -> bool) -> u32 {
    // FNV-1a: stable across runs and builds.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let first = (hash % u64::from(count)) as u32;
    (0..count.min(4096))
        .map(|i| start + (first + i) % count)
        .find(|u| !in_use(*u))
        .unwrap_or(start + first)
}

/// Why QEMU cannot be given an unprivileged user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunAsError {
    #[error("{USER_VAR} names user `{0}`, which does not exist: name an existing unprivileged user or UID:GID, or unset it (each QEMU then gets a uid of its own)")]
    NoSuchUser(String),
    #[error(
        "{USER_VAR}={0:?} names root or nothing usable: give an unprivileged user name or UID:GID"
    )]
    Unusable(String),
    #[error("{UIDS_VAR}={0:?} is not START:COUNT of unprivileged uids")]
    BadRange(String),
    #[error("recording QEMU's uid in {path}: {reason}")]
    Record { path: String, reason: String },
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode and no memory effects.
    unsafe { libc::geteuid() == 0 }
}

/// How QEMUs are given users on this host: `None` when forkd is not root
/// (QEMU then runs as forkd's own user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserPolicy {
    /// Every QEMU as this one user ([`USER_VAR`]).
    Shared(RunAs),
    /// Each QEMU as a uid (and gid) of its own from this range.
    PerVm { start: u32, count: u32 },
}

/// This host's [`UserPolicy`], from the environment.
pub fn user_policy() -> Result<Option<UserPolicy>, RunAsError> {
    if !is_root() {
        return Ok(None);
    }
    if let Ok(wanted) = std::env::var(USER_VAR) {
        if let Some(r) = RunAs::parse(&wanted) {
            return Ok(Some(UserPolicy::Shared(r)));
        }
        if wanted.contains(':') {
            return Err(RunAsError::Unusable(wanted));
        }
        let passwd = std::fs::read_to_string(Path::new("/etc/passwd")).unwrap_or_default();
        return match parse_passwd(&passwd, &wanted) {
            Some(r) if r.uid != 0 && r.gid != 0 => Ok(Some(UserPolicy::Shared(r))),
            Some(_) => Err(RunAsError::Unusable(wanted)),
            None => Err(RunAsError::NoSuchUser(wanted)),
        };
    }
    let (start, count) = match std::env::var(UIDS_VAR) {
        Ok(v) => parse_uid_range(&v).ok_or(RunAsError::BadRange(v))?,
        Err(_) => DEFAULT_UIDS,
    };
    Ok(Some(UserPolicy::PerVm { start, count }))
}

/// The identity the QEMU of the VM whose run directory is `run_dir` runs
/// as (`None` when forkd is not root). The first call for a directory
/// decides and records it there ([`UID_FILE`]); later calls (the VM's
/// network gateway and its QEMU ask separately) read it back.
pub fn run_as_for(run_dir: &Path) -> Result<Option<RunAs>, RunAsError> {
    let Some(policy) = user_policy()? else {
        return Ok(None);
    };
    let range = match policy {
        UserPolicy::Shared(r) => return Ok(Some(r)),
        UserPolicy::PerVm { start, count } => (start, count),
    };
    let file = run_dir.join(UID_FILE);
    if let Some(r) = std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| RunAs::parse(t.trim()))
    {
        return Ok(Some(r));
    }
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let uid = pick_uid(&name, range, uid_in_use);
    let r = RunAs { uid, gid: uid };
    std::fs::write(&file, r.arg()).map_err(|e| RunAsError::Record {
        path: file.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(Some(r))
}

/// Whether any process runs with real uid `uid`.
fn uid_in_use(uid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name().to_string_lossy().parse::<u32>().is_ok()
            && std::fs::metadata(e.path())
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == uid)
                .unwrap_or(false)
    })
}

/// The uid and gid a running process has (from `/proc/PID/status`).
pub fn process_ids(pid: u32) -> Option<RunAs> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some(RunAs {
        uid: field("Uid:")?,
        gid: field("Gid:")?,
    })
}

/// Where the kernel says whether unprivileged processes may use
/// userfaultfd (for faults in kernel mode too, which QEMU 7.2 asks for).
pub const UNPRIVILEGED_USERFAULTFD: &str = "/proc/sys/vm/unprivileged_userfaultfd";

/// Why QEMU `pid` cannot take a live (background) snapshot on this host,
/// if it cannot: it runs unprivileged and the kernel keeps userfaultfd,
/// which write-protects guest RAM, to privileged processes. QEMU 7.2 opens
/// it with the `userfaultfd` system call (not `/dev/userfaultfd`), so only
/// the sysctl helps.
pub fn userfaultfd_denied(pid: u32) -> Option<String> {
    let ids = process_ids(pid)?;
    let allowed = std::fs::read_to_string(UNPRIVILEGED_USERFAULTFD)
        .map(|v| v.trim() == "1")
        .unwrap_or(true);
    (ids.uid != 0 && !allowed).then(|| {
        format!(
            "QEMU runs as the unprivileged uid {} and this kernel lets only privileged processes use userfaultfd, which a live snapshot needs to write-protect guest RAM; allow it with `sysctl -w vm.unprivileged_userfaultfd=1` (scripts/setup.sh does), or take a full snapshot instead",
            ids.uid
        )
    })
}

/// Gives `path` to the user QEMU `pid` runs as, when that is not us: a
/// file forkd made that QEMU opens after it dropped its privileges (an
/// overlay hot-added during a branch).
pub fn hand_to(pid: u32, path: &Path) -> std::io::Result<()> {
    let Some(ids) = process_ids(pid) else {
        return Ok(());
    };
    // SAFETY: geteuid has no failure mode.
    if ids.uid == unsafe { libc::geteuid() } {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(ids.uid), Some(ids.gid))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_user_option_follows_what_the_binary_accepts() {
        // Lines as QEMU 7.2 and 10.0 print them in `-help`.
        let q72 = "-runas user     change to user id user just before starting the VM\n";
        let q10 = "-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]\n";
        assert_eq!(UserOption::from_help(q72), UserOption::Runas);
        assert_eq!(UserOption::from_help(q10), UserOption::RunWith);
        // QEMU 8.x had `-run-with` without `user=`.
        let q8 = "-run-with [async-teardown=on|off][,chroot=dir]\n-runas user\n";
        assert_eq!(UserOption::from_help(q8), UserOption::Runas);
        let r = RunAs { uid: 7, gid: 8 };
        assert_eq!(UserOption::RunWith.args(r), ["-run-with", "user=7:8"]);
        assert_eq!(UserOption::Runas.args(r), ["-runas", "7:8"]);
    }

    use super::*;

    #[test]
    fn the_filter_is_strict_unless_qemu_must_drop_privileges() {
        assert_eq!(
            seccomp_option(None),
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        );
        let r = RunAs { uid: 5, gid: 6 };
        assert!(seccomp_option(Some(r)).contains("spawn=deny"));
        assert!(seccomp_option(Some(r)).contains("elevateprivileges=allow"));
        assert_eq!(r.arg(), "5:6");
    }

    #[test]
    fn each_vm_gets_a_uid_of_its_own_in_the_range() {
        let range = (2_100_000_000, 1 << 20);
        let a = pick_uid("sb-0001", range, |_| false);
        let b = pick_uid("sb-0002", range, |_| false);
        assert_ne!(a, b);
        for u in [a, b] {
            assert!((range.0..range.0 + range.1).contains(&u));
        }
        // Stable for a name; the next free one when taken.
        assert_eq!(pick_uid("sb-0001", range, |_| false), a);
        let next = pick_uid("sb-0001", range, |u| u == a);
        assert_ne!(next, a);
        assert!((range.0..range.0 + range.1).contains(&next));
        // Wraps inside the range.
        assert_eq!(pick_uid("x", (10, 1), |_| false), 10);
        assert_eq!(parse_uid_range("5000:100"), Some((5000, 100)));
        assert_eq!(parse_uid_range("0:100"), None);
        assert_eq!(parse_uid_range("4294967295:2"), None);
        assert_eq!(parse_uid_range("5000"), None);
    }

    #[test]
    fn users_are_found_in_passwd_and_root_is_refused() {
        let text = "root:x:0:0:root:/root:/bin/bash\nforkd-qemu:x:998:997::/nonexistent:/usr/sbin/nologin\n";
        assert_eq!(
            parse_passwd(text, "forkd-qemu"),
            Some(RunAs { uid: 998, gid: 997 })
        );
        assert_eq!(parse_passwd(text, "nobody"), None);
        assert_eq!(parse_passwd("garbage", "garbage"), None);
        assert_eq!(
            RunAs::parse("1000:1000"),
            Some(RunAs {
                uid: 1000,
                gid: 1000
            })
        );
        assert_eq!(RunAs::parse("0:0"), None);
        assert_eq!(RunAs::parse("x:1"), None);
        assert_eq!(RunAs::parse("forkd"), None);
    }

    #[test]
    fn this_process_ids_are_read() {
        let me = process_ids(std::process::id()).unwrap();
        // SAFETY: getuid/getgid have no failure mode.
        assert_eq!(me.uid, unsafe { libc::getuid() });
        assert_eq!(me.gid, unsafe { libc::getgid() });
    }
}

/// `AUDIT_ARCH_X86_64` (linux/audit.h): the architecture word seccomp
/// reports for a 64-bit x86 system call.
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// `FALLOC_FL_PUNCH_HOLE` (linux/falloc.h).
const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;

/// The seccomp filter of a child's QEMU: `fallocate` with
/// `FALLOC_FL_PUNCH_HOLE` fails with `EOPNOTSUPP`; everything else is left
/// to QEMU's own `-sandbox` filter.
///
/// A child maps its snapshot's RAM image privately, and that image is
/// shared: by its siblings, by later children, by the hugetlb copy of a
/// `spawn --hugepages` batch. QEMU 7.2 discards guest RAM the guest reports
/// free (virtio-balloon free-page reporting, which a guest drives at will)
/// by punching a hole in the RAM block's file even when the mapping is
/// private, and a hole in the shared image is zeros in every sibling that
/// has not copied those pages (measured: a sibling's page cache of a file
/// read back wrong after another child dropped its caches). With the
/// punch refused, QEMU logs `ram_block_discard_range: Failed to fallocate`
/// and leaves the pages alone; its disk layer takes an unsupported punch as
/// "discard not supported" and writes zeros where it must. Later QEMUs
/// (8.2+) no longer punch private mappings; the filter costs them nothing.
pub struct NoPunchFilter(Vec<libc::sock_filter>);

impl NoPunchFilter {
    /// The program (classic BPF over `struct seccomp_data`).
    pub fn new() -> NoPunchFilter {
        let stmt = |code: u32, k: u32| libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        };
        let jump = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        };
        let allow = libc::SECCOMP_RET_ALLOW;
        let refuse = libc::SECCOMP_RET_ERRNO | libc::EOPNOTSUPP as u32;
        NoPunchFilter(vec![
            // seccomp_data: nr @0, arch @4, args[i] @16 + 8i (low half first).
            stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 4),
            jump(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                AUDIT_ARCH_X86_64,
                1,
                0,
            ),
            stmt(libc::BPF_RET | libc::BPF_K, allow),
            stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
            jump(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                libc::SYS_fallocate as u32,
                0,
                3,
            ),
            stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 16 + 8),
            jump(
                libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
                FALLOC_FL_PUNCH_HOLE,
                0,
                1,
            ),
            stmt(libc::BPF_RET | libc::BPF_K, refuse),
            stmt(libc::BPF_RET | libc::BPF_K, allow),
        ])
    }

    /// Installs the filter on the calling thread; it stays across `exec`.
    /// Sets no-new-privileges first when the caller is not root (the kernel
    /// requires one or the other).
    ///
    /// # Safety
    /// Meant for `pre_exec`: only async-signal-safe system calls on memory
    /// `self` owns, which must outlive the call.
    pub unsafe fn install(&self, root: bool) -> std::io::Result<()> {
        let prog = libc::sock_fprog {
            len: self.0.len() as u16,
            filter: self.0.as_ptr() as *mut libc::sock_filter,
        };
        if !root && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Default for NoPunchFilter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod no_punch_tests {
    use super::*;

    /// Runs the classic BPF program on one system call, as the kernel
    /// would (only the instructions the filter uses).
    fn run(f: &NoPunchFilter, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::new();
        data.extend(nr.to_le_bytes());
        data.extend(arch.to_le_bytes());
        data.extend(0u64.to_le_bytes());
        for a in args {
            data.extend(a.to_le_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = &f.0[pc];
            let code = u32::from(i.code);
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    let k = i.k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                    pc += 1;
                }
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                    pc += 1 + usize::from(if acc == i.k { i.jt } else { i.jf });
                }
                c if c == libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K => {
                    pc += 1 + usize::from(if acc & i.k != 0 { i.jt } else { i.jf });
                }
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                other => panic!("instruction {other:#x} not modelled"),
            }
        }
    }

    #[test]
    fn only_hole_punching_fallocate_is_refused() {
        let f = NoPunchFilter::new();
        let fa = libc::SYS_fallocate as u32;
        let refuse = libc::SECCOMP_RET_ERRNO | libc::EOPNOTSUPP as u32;
        let allow = libc::SECCOMP_RET_ALLOW;
        let keep_size = 0x01;
        let zero_range = 0x10;
        // QEMU's discard: PUNCH_HOLE | KEEP_SIZE.
        assert_eq!(
            run(&f, AUDIT_ARCH_X86_64, fa, [7, 0x3, 0, 4096, 0, 0]),
            refuse
        );
        assert_eq!(
            run(&f, AUDIT_ARCH_X86_64, fa, [7, 0x2, 0, 4096, 0, 0]),
            refuse
        );
        // Allocation and zeroing (the disk layer's) go through.
        assert_eq!(run(&f, AUDIT_ARCH_X86_64, fa, [7, 0, 0, 4096, 0, 0]), allow);
        assert_eq!(
            run(&f, AUDIT_ARCH_X86_64, fa, [7, keep_size, 0, 1, 0, 0]),
            allow
        );
        assert_eq!(
            run(&f, AUDIT_ARCH_X86_64, fa, [7, zero_range, 0, 1, 0, 0]),
            allow
        );
        // Other calls, and other architectures, are not this filter's.
        assert_eq!(
            run(
                &f,
                AUDIT_ARCH_X86_64,
                libc::SYS_read as u32,
                [7, 0x2, 0, 0, 0, 0]
            ),
            allow
        );
        assert_eq!(run(&f, 0x4000_0003, fa, [7, 0x2, 0, 0, 0, 0]), allow);
    }
}
