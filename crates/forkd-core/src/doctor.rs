//! `forkd doctor`: what this host can do, and the command that fixes what it cannot.

use std::path::Path;

use serde::Serialize;

use crate::artifacts::find_agent;
use crate::paths::{free_bytes, is_tmpfs, Env};

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    /// A command that fixes it, when it is not ok.
    pub fix: Option<String>,
}

fn check(name: &'static str, level: Level, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
        fix: fix.map(str::to_string),
    }
}

/// Runs every check. Never fails: problems are reported as checks.
pub fn run(env: &Env, qemu: &str) -> Vec<Check> {
    let mut out = Vec::new();
    let qemu_path = Path::new(qemu);
    out.push(match forkd_vm::process::qemu_version(qemu_path) {
        Ok(v) => check("qemu", Level::Ok, v, None),
        Err(e) => check(
            "qemu",
            Level::Fail,
            e.to_string(),
            Some("apt-get install -y --no-install-recommends qemu-system-x86"),
        ),
    });
    out.push(match forkd_vm::process::which(Path::new("qemu-img")) {
        Some(p) => check("qemu-img", Level::Ok, p.display().to_string(), None),
        None => check(
            "qemu-img",
            Level::Fail,
            "qemu-img not found (needed for disk overlays)",
            Some("apt-get install -y qemu-utils"),
        ),
    });

    let host = forkd_vm::HostProbe::read();
    let choice =
        forkd_vm::accel::choose(forkd_vm::AccelRequest::Auto, &host).expect("auto always chooses");
    out.push(match choice.accel {
        forkd_vm::Accel::Kvm => check("accel", Level::Ok, format!("KVM: {}", choice.reason), None),
        forkd_vm::Accel::Tcg => check(
            "accel",
            Level::Warn,
            format!(
                "will use TCG, {}. Boots take seconds instead of ~100 ms",
                choice
                    .reason
                    .trim_start_matches("using TCG (software emulation): ")
            ),
            Some("run on a host with Intel VT-x or AMD-V and `modprobe kvm_intel` (or kvm_amd)"),
        ),
    });

    let kernels = env.home.join("kernels");
    let kernel = std::fs::read_dir(&kernels)
        .ok()
        .and_then(|d| d.flatten().find(|e| e.path().join(".complete").exists()))
        .map(|e| e.file_name().to_string_lossy().into_owned());
    out.push(match kernel {
        Some(v) => check(
            "kernel",
            Level::Ok,
            format!("Debian cloud kernel {v} in {}", kernels.display()),
            None,
        ),
        None => check(
            "kernel",
            Level::Warn,
            format!(
                "no guest kernel in {} yet (fetched on first use)",
                kernels.display()
            ),
            Some("forkd image build"),
        ),
    });
    out.push(match find_agent(None) {
        Ok(p) => check(
            "agent",
            Level::Ok,
            format!("static guest agent {}", p.display()),
            None,
        ),
        Err(e) => check(
            "agent",
            Level::Fail,
            e.to_string(),
            Some("scripts/build-agent.sh"),
        ),
    });
    out.push(match forkd_guest::find_busybox() {
        Ok(p) => check(
            "busybox",
            Level::Ok,
            format!("static busybox {}", p.display()),
            None,
        ),
        Err(e) => check(
            "busybox",
            Level::Fail,
            e.to_string(),
            Some("apt-get install -y busybox-static"),
        ),
    });
    out.push(match forkd_vm::process::which(Path::new("mkfs.ext4")) {
        Some(_) => check("mkfs.ext4", Level::Ok, "present (root disk images)", None),
        None => check(
            "mkfs.ext4",
            Level::Fail,
            "mkfs.ext4 not found",
            Some("apt-get install -y e2fsprogs"),
        ),
    });
    for (name, dir) in [("initramfs", "initramfs"), ("images", "images")] {
        let n = std::fs::read_dir(env.home.join(dir))
            .map(|d| d.flatten().count())
            .unwrap_or(0);
        out.push(if n > 0 {
            check(
                name,
                Level::Ok,
                format!("{n} cached in {}", env.home.join(dir).display()),
                None,
            )
        } else {
            check(
                name,
                Level::Warn,
                "none built yet (built on first use)",
                Some("forkd image build"),
            )
        });
    }

    let free = free_bytes(&env.runtime).unwrap_or(0);
    let gib = free as f64 / (1u64 << 30) as f64;
    out.push(if !is_tmpfs(&env.runtime) {
        check(
            "runtime-dir",
            Level::Warn,
            format!(
                "{} is not on tmpfs ({gib:.1} GiB free): RAM images there cannot be live-branched",
                env.runtime.display()
            ),
            Some("export FORKD_RUNTIME_DIR=/dev/shm/forkd"),
        )
    } else if free < 1 << 30 {
        check(
            "runtime-dir",
            Level::Warn,
            format!(
                "{} on tmpfs has only {gib:.1} GiB free",
                env.runtime.display()
            ),
            Some("mount -o remount,size=8G /dev/shm"),
        )
    } else {
        check(
            "runtime-dir",
            Level::Ok,
            format!("{} on tmpfs, {gib:.1} GiB free", env.runtime.display()),
            None,
        )
    });

    out.push(huge_pages_check());

    out.extend(isolation_checks(qemu_path));
    out
}

/// What isolation this host gives sandboxes, and what it lacks.
fn isolation_checks(qemu: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    let root = forkd_vm::confine::is_root();
    let policy = forkd_vm::confine::user_policy();
    out.push(match &policy {
        Ok(Some(forkd_vm::confine::UserPolicy::PerVm { start, count })) => check(
            "qemu-user",
            Level::Ok,
            format!(
                "forkd runs as root; every QEMU drops (-runas) to a uid and gid of its own from {start}..{} once it has opened its files, as does its network gateway",
                start + count - 1
            ),
            None,
        ),
        Ok(Some(forkd_vm::confine::UserPolicy::Shared(r))) => check(
            "qemu-user",
            Level::Warn,
            format!(
                "every QEMU drops to the one uid {} ({}): one escaped QEMU could reach the others",
                r.uid,
                forkd_vm::confine::USER_VAR
            ),
            Some("unset FORKD_QEMU_USER (each QEMU then gets a uid of its own)"),
        ),
        Ok(None) => check(
            "qemu-user",
            Level::Warn,
            "forkd is not root: QEMU runs as your own user, so a guest that escaped into QEMU could touch everything you can, other sandboxes included",
            Some("run forkd as root (each QEMU then drops to a uid of its own)"),
        ),
        Err(e) => check("qemu-user", Level::Fail, e.to_string(), None),
    });
    let unprivileged = matches!(policy, Ok(Some(_)));
    let filter = forkd_vm::confine::seccomp_option(
        unprivileged.then_some(forkd_vm::confine::RunAs { uid: 1, gid: 1 }),
    );
    let seccomp = std::process::Command::new(qemu)
        .args(["-sandbox", filter, "-version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    out.push(if seccomp {
        check(
            "seccomp",
            Level::Ok,
            format!("every QEMU runs under -sandbox {filter}"),
            None,
        )
    } else {
        check(
            "seccomp",
            Level::Fail,
            format!(
                "this QEMU refuses -sandbox {filter} (built without libseccomp?): no VM can start"
            ),
            Some("apt-get install -y qemu-system-x86 (Debian's is built with seccomp)"),
        )
    });
    out.push(match forkd_vm::cgroup::Layout::detect() {
        None => check(
            "cgroups",
            Level::Warn,
            "no memory cgroup controller: sandboxes run without memory, task or CPU limits",
            Some("boot with cgroups enabled (cgroup v2: systemd.unified_cgroup_hierarchy=1)"),
        ),
        Some(layout) => {
            let dir = &layout.parents[0].1;
            let writable = root || writable_dir(dir.parent().unwrap_or(dir));
            let ctrls: Vec<&str> = layout.parents.iter().map(|(c, _)| *c).collect();
            if writable {
                check(
                    "cgroups",
                    Level::Ok,
                    format!(
                        "cgroup {} ({}): each QEMU in its own group under {}, memory limited to guest RAM + QEMU's overhead (or --memory-limit), at most {} tasks, --cpus-quota",
                        layout.version,
                        ctrls.join(", "),
                        dir.display(),
                        forkd_vm::config::PIDS_MAX
                    ),
                    None,
                )
            } else {
                check(
                    "cgroups",
                    Level::Warn,
                    format!(
                        "cgroup {} present, but {} is not writable by this user: sandboxes run without resource limits",
                        layout.version,
                        dir.display()
                    ),
                    Some("run forkd as root, or in a delegated cgroup (systemd-run --user --scope -p Delegate=yes forkd ...)"),
                )
            }
        }
    });
    out.push(check(
        "network",
        Level::Ok,
        "each sandbox's NIC ends in forkd's own gateway: the public internet (or only --allow-out), never the host, its loopback, link-local, private or shared address space, nor another sandbox; TCP and DNS only (no other UDP, no ICMP beyond the gateway, no IPv6)",
        None,
    ));
    let unpriv = std::fs::read_to_string(forkd_vm::confine::UNPRIVILEGED_USERFAULTFD)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    // As root QEMU runs unprivileged too: it needs the sysctl either way.
    out.push(if unpriv == "1" {
        check(
            "userfaultfd",
            Level::Ok,
            "vm.unprivileged_userfaultfd=1: an unprivileged QEMU can write-protect guest RAM for live branches",
            None,
        )
    } else {
        check(
            "userfaultfd",
            Level::Warn,
            format!("vm.unprivileged_userfaultfd={unpriv}: QEMU runs unprivileged{}, so live BRANCH (background snapshot) fails; full snapshots work", if root { " (as a uid of its own)" } else { "" }),
            Some("sysctl -w vm.unprivileged_userfaultfd=1"),
        )
    });
    out
}

/// Whether this process may create entries in `dir`.
fn writable_dir(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access reads a NUL-terminated path; no memory is written.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// The 2 MiB huge pages sandboxes run on by default: whether forkd can let
/// the pool grow on demand (crate::hugepool), what it holds now, and the
/// static pool `--hugepages --prealloc` takes from.
fn huge_pages_check() -> Check {
    use crate::hugepages::HugePagePool;
    let managed = match crate::hugepool::unavailable() {
        None => match crate::hugepool::status() {
            Some((original, pages, n)) => format!(
                "sandboxes run on 2 MiB huge pages taken on demand: forkd raised vm.nr_overcommit_hugepages from {original} by {pages} for {n} running sandbox(es) and puts {original} back when none is left"
            ),
            None => "sandboxes run on 2 MiB huge pages taken on demand: forkd raises vm.nr_overcommit_hugepages by each sandbox's size while it runs (no memory is set aside; a guest costs the pages it touches) and puts the host's value back when none is left; `spawn --hugepages` children map a hugetlb copy of their image (twice the guest's size claimed each)".to_string(),
        },
        Some(why) => format!(
            "sandboxes run on 4 KiB pages ({why}): live-branch pauses grow with guest size, and `spawn --hugepages` is refused; run forkd as root for on-demand huge pages"
        ),
    };
    match HugePagePool::read() {
        Err(e) => check("hugepages", Level::Warn, format!("{managed}; {e}"), None),
        Ok(pool) => check(
            "hugepages",
            if crate::hugepool::unavailable().is_none() { Level::Ok } else { Level::Warn },
            format!(
                "{managed}; hugetlb pool now (static vm.nr_hugepages, taken by --hugepages --prealloc, plus surplus): {} pages, {} free, {} reserved",
                pool.total, pool.free, pool.reserved
            ),
            None,
        ),
    }
}
