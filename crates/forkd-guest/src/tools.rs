//! Running the host tools this crate builds with (apt-get, dpkg-deb,
//! mkfs.ext4, mmdebstrap, busybox). Plumbing only: a missing tool becomes an
//! error naming the package to install, a failing one an error with its output.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::GuestError;

/// A host program and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub(crate) const APT_GET: Tool = Tool {
    program: "apt-get",
    package: "apt",
};
pub(crate) const DPKG_DEB: Tool = Tool {
    program: "dpkg-deb",
    package: "dpkg",
};
pub(crate) const MKFS_EXT4: Tool = Tool {
    program: "mkfs.ext4",
    package: "e2fsprogs",
};
pub(crate) const MMDEBSTRAP: Tool = Tool {
    program: "mmdebstrap",
    package: "mmdebstrap",
};
pub(crate) const DEBOOTSTRAP: Tool = Tool {
    program: "debootstrap",
    package: "debootstrap",
};

/// Looks `program` up in PATH, then in the sbin dirs a non-root PATH lacks.
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

impl Tool {
    pub(crate) fn command(&self) -> Result<Command, GuestError> {
        let path = which(self.program).ok_or(GuestError::ToolMissing {
            tool: self.program,
            package: self.package,
        })?;
        Ok(Command::new(path))
    }
}

fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `cmd` to completion; returns its stdout, or an error with its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Vec<u8>, GuestError> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(GuestError::io("run", PathBuf::from(describe(cmd))))?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    Err(GuestError::ToolFailed {
        command: describe(cmd),
        status: output.status.to_string(),
        output: tail(&String::from_utf8_lossy(&output.stderr), 20),
    })
}

/// Runs `cmd`, passing each line of its stderr to `log` as it comes.
pub(crate) fn run_logged(
    cmd: &mut Command,
    prefix: &str,
    log: &dyn Fn(&str),
) -> Result<(), GuestError> {
    let description = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(GuestError::io("run", PathBuf::from(&description)))?;
    let mut recent = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            log(&format!("{prefix}: {line}"));
            recent.push(line);
            if recent.len() > 20 {
                recent.remove(0);
            }
        }
    }
    let status = child
        .wait()
        .map_err(GuestError::io("wait for", PathBuf::from(&description)))?;
    if status.success() {
        return Ok(());
    }
    Err(GuestError::ToolFailed {
        command: description,
        status: status.to_string(),
        output: recent.join("\n"),
    })
}

/// Makes `cmd` run in a mount namespace of its own whose mounts do not
/// propagate back, so whatever it mounts (a bootstrap's `proc`, `sys`,
/// `dev/pts`, and its bind of the host's `/dev/shm`) is gone with its last
/// process and never appears in forkd's namespace, where removing the tree
/// would reach through it. It is also sent SIGTERM when the thread that
/// started it dies (a killed forkd), which a bootstrap answers by cleaning up
/// and exiting. Needs root (CAP_SYS_ADMIN), as the bootstraps do anyway.
pub(crate) fn confine_mounts(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the hook runs in the child between fork and exec and only
    // makes raw syscalls (unshare, mount, prctl, getppid) with arguments
    // that are static NUL-terminated strings or plain integers: no
    // allocation, no lock, nothing that is unsafe after fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let root = c"/".as_ptr();
            let flags = libc::MS_REC | libc::MS_PRIVATE;
            if libc::mount(
                std::ptr::null(),
                root,
                std::ptr::null(),
                flags,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // forkd died between fork and prctl: do not run orphaned.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Lists the applets of a busybox binary (`--list-full` when `full`).
pub(crate) fn busybox_list(busybox: &Path, full: bool) -> Result<String, GuestError> {
    let flag = if full { "--list-full" } else { "--list" };
    let out = run(Command::new(busybox).arg(flag))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Whether this process runs with effective uid 0.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
