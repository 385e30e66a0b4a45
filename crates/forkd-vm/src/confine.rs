//! How a QEMU process is confined: its seccomp filter (`-sandbox`) and,
//! when forkd runs as root, the unprivileged user it drops to (`-runas`).
//! The decisions are pure ([`seccomp_option`], [`parse_passwd`],
//! [`RunAs::parse`]); [`run_as_for_this_host`] reads the environment and
//! `/etc/passwd`.
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

/// The environment variable naming the user QEMU runs as when forkd is
/// root: a user name or `UID:GID`.
pub const USER_VAR: &str = "FORKD_QEMU_USER";
/// The user QEMU runs as when forkd is root and [`USER_VAR`] is unset.
pub const DEFAULT_USER: &str = "forkd-qemu";

/// The unprivileged identity a QEMU started by root drops to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
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

/// Why QEMU cannot be given an unprivileged user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunAsError {
    #[error("forkd runs as root, so QEMU must drop to an unprivileged user, but user `{0}` does not exist: create it with `useradd --system --no-create-home --shell /usr/sbin/nologin {0}` or name another in {USER_VAR} (a user name or UID:GID)")]
    NoSuchUser(String),
    #[error(
        "{USER_VAR}={0:?} names root or nothing usable: give an unprivileged user name or UID:GID"
    )]
    Unusable(String),
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode and no memory effects.
    unsafe { libc::geteuid() == 0 }
}

/// The identity QEMU runs as on this host: `None` when forkd is not root
/// (QEMU then simply runs as forkd's own user), else [`USER_VAR`] or
/// [`DEFAULT_USER`].
pub fn run_as_for_this_host() -> Result<Option<RunAs>, RunAsError> {
    if !is_root() {
        return Ok(None);
    }
    let wanted = std::env::var(USER_VAR).unwrap_or_else(|_| DEFAULT_USER.to_string());
    if let Some(r) = RunAs::parse(&wanted) {
        return Ok(Some(r));
    }
    if wanted.contains(':') {
        return Err(RunAsError::Unusable(wanted));
    }
    let passwd = std::fs::read_to_string(Path::new("/etc/passwd")).unwrap_or_default();
    match parse_passwd(&passwd, &wanted) {
        Some(r) if r.uid != 0 => Ok(Some(r)),
        Some(_) => Err(RunAsError::Unusable(wanted)),
        None => Err(RunAsError::NoSuchUser(wanted)),
    }
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
