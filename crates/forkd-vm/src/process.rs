//! Facts about host processes that QEMU's lifecycle needs: whether a pid is
//! still the QEMU we started (pid plus start time), reaping, how a process
//! ended, and finding programs. No QEMU knowledge here.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use crate::VmError;

/// "exit code 1", "killed by signal 9 (SIGKILL)"; `sigbus_cause` says why
/// a SIGBUS happened (what backs guest RAM), so that a QEMU killed by one
/// reads "killed by signal 7 (SIGBUS: the runtime tmpfs is full)".
pub fn describe(status: ExitStatus, sigbus_cause: Option<&str>) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => describe_signal(s, sigbus_cause),
        _ => status.to_string(),
    }
}

/// "killed by signal 9 (SIGKILL)", with the cause of a SIGBUS when known.
pub fn describe_signal(signal: i32, sigbus_cause: Option<&str>) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("killed by signal {signal}"),
    };
    match (signal, sigbus_cause) {
        (libc::SIGBUS, Some(cause)) => format!("killed by signal {signal} (SIGBUS: {cause})"),
        _ => format!("killed by signal {signal} ({name})"),
    }
}

/// The last `lines` lines of a text file (reads at most its last 64 KiB).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = tail_bytes(path, 64 * 1024);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How much of QEMU's stderr forkd reads into an error or report.
pub const STDERR_KEPT: u64 = 64 * 1024;

/// The last `max` bytes of the file at `path` (invalid UTF-8 replaced),
/// empty if it cannot be read: logs a guest can make QEMU write are read
/// this way, never whole.
pub fn tail_bytes(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
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

/// Live processes (pid, start time) whose command line contains `needle`:
/// how a QEMU is found by its run directory when its pid was never
/// recorded. Zombies are left out.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, u64)> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(needle) {
            if let Some(start) = process_start_time(pid) {
                if pid_alive(pid, start) {
                    found.push((pid, start));
                }
            }
        }
    }
    found
}

/// Sends SIGKILL to each `(pid, start)` that is still that process, then
/// waits (up to `within`) until they are gone, reaping those that are
/// children of this process.
pub fn kill_and_wait(targets: &[(u32, u64)], within: std::time::Duration) {
    for &(pid, start) in targets {
        if pid != 0 && pid_alive(pid, start) {
            // SAFETY: kill has no memory effects; pid and start time were
            // checked just above, so this is the process meant.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    let deadline = std::time::Instant::now() + within;
    for &(pid, start) in targets {
        while pid != 0 && pid_alive(pid, start) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        reap_if_child(pid, start);
    }
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
    fn tail_bytes_reads_only_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut text = "a".repeat(100_000);
        text.push_str("\nlast line\n");
        std::fs::write(&path, &text).unwrap();
        let end = tail_bytes(&path, 1000);
        assert_eq!(end.len(), 1000);
        assert!(end.ends_with("aaa\nlast line\n"));
        assert_eq!(tail_bytes(&path, 1 << 20), text);
        assert_eq!(tail(&path, 1), "last line");
        assert_eq!(tail_bytes(&dir.path().join("none"), 10), "");
    }

    #[test]
    fn a_sigbus_names_its_cause() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe(ExitStatus::from_raw(3 << 8), None), "exit code 3");
        assert_eq!(
            describe(ExitStatus::from_raw(9), None),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe(ExitStatus::from_raw(7), Some("the runtime tmpfs is full")),
            "killed by signal 7 (SIGBUS: the runtime tmpfs is full)"
        );
        assert_eq!(describe_signal(40, None), "killed by signal 40");
    }

    #[test]
    fn processes_are_found_by_their_command_line_and_killed() {
        let marker = format!("forkd-process-test-{}", std::process::id());
        // `read` is a shell builtin: the shell never forks a child that
        // would carry the marker for a moment too.
        let mut child = Command::new("sh")
            .args(["-c", "read _", &marker])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let found = loop {
            let f = processes_mentioning(&marker);
            if !f.is_empty() || std::time::Instant::now() > deadline {
                break f;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, child.id());
        kill_and_wait(&found, std::time::Duration::from_secs(5));
        assert!(processes_mentioning(&marker).is_empty());
        let _ = child.wait();
    }

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
