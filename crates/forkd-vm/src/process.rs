//! Facts about host processes that QEMU's lifecycle needs: whether a pid is
//! still the QEMU we started (pid plus start time), reaping, how a process
//! ended, and finding programs. No QEMU knowledge here.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use crate::VmError;

/// "exit code 1", "killed by signal 9".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The last `lines` lines of a text file (reads at most its last 64 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Resolves a program name on PATH (or checks an explicit path).
pub fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// `qemu-system-x86_64 --version`, first line.
pub fn qemu_version(qemu: &Path) -> Result<String, VmError> {
    let exe = which(qemu).ok_or_else(|| VmError::QemuNotFound(qemu.display().to_string()))?;
    let out = Command::new(exe)
        .arg("--version")
        .output()
        .map_err(VmError::Spawn)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

/// Field 22 of /proc/<pid>/stat: when the process started, in clock ticks.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True when `pid` runs, is not a zombie, and started at `start` (0: any).
pub fn pid_alive(pid: u32, start: u64) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    if fields.next() == Some("Z") {
        return false;
    }
    start == 0 || fields.nth(18).and_then(|s| s.parse::<u64>().ok()) == Some(start)
}

/// Reaps `pid` if it is a child of this process that has been killed. Blocks
/// until its whole thread group is gone: the leader of a multi-threaded
/// process (QEMU) shows as a zombie while its other threads are still
/// exiting, and a non-blocking wait then reaps nothing, leaving a zombie that
/// nobody reaps later. No-op for other processes, and for a process that
/// merely reuses the pid (its start time differs from `start`).
/// Call it only after the process was killed.
pub fn reap_if_child(pid: u32, start: u64) {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ppid = fields.get(1).and_then(|p| p.parse::<u32>().ok());
    let started = fields.get(19).and_then(|p| p.parse::<u64>().ok());
    if ppid != Some(std::process::id()) || (start != 0 && started != Some(start)) {
        return;
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child; writes only `status`.
    unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_with_its_start_time() {
        let me = std::process::id();
        let start = process_start_time(me).unwrap();
        assert!(pid_alive(me, start));
        assert!(pid_alive(me, 0));
        assert!(!pid_alive(me, start + 1));
        assert!(!pid_alive(u32::MAX - 1, 0));
    }
}
