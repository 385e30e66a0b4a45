//! How the agent starts a program in the guest, for execs and agent
//! processes alike: a fresh environment, its own session (so a signal to
//! its process group reaches its children), chrooted into the command root,
//! in its working directory, as its user, on a terminal when asked. And how
//! a failed start is told apart: a missing program from a missing working
//! directory from anything else.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use forkd_protocol::{ErrorCode, ErrorReply, PtySize};

use crate::users::User;

/// Environment every command starts with, before the user's, the sandbox's
/// and the request's own.
pub const DEFAULT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LANG", "C.UTF-8"),
];

/// Largest argv plus environment (bytes) a request may ask for.
pub const MAX_COMMAND_BYTES: usize = 256 * 1024;

/// Checks what a request asks to run before anything is started.
pub fn validate(argv: &[String], env: &[(String, String)]) -> Result<(), ErrorReply> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            "the command needs a non-empty argv",
        ));
    }
    let mut size = 0usize;
    for a in argv {
        if a.contains('\0') {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                "an argument contains a NUL byte",
            ));
        }
        size += a.len() + 1;
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!("invalid environment variable {k:?}"),
            ));
        }
        size += k.len() + v.len() + 2;
    }
    if size > MAX_COMMAND_BYTES {
        return Err(ErrorReply::new(
            ErrorCode::Limit,
            format!("argv and environment take {size} bytes, more than {MAX_COMMAND_BYTES}"),
        ));
    }
    Ok(())
}

/// The environment of a command: defaults, the user's `HOME`/`USER`/
/// `LOGNAME`, then `layers` in order (later wins).
pub fn environment(user: &User, layers: &[&[(String, String)]]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = DEFAULT_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.push(("HOME".into(), user.home.clone()));
    env.push(("USER".into(), user.name.clone()));
    env.push(("LOGNAME".into(), user.name.clone()));
    for layer in layers {
        for (k, v) in layer.iter() {
            env.retain(|(e, _)| e != k);
            env.push((k.clone(), v.clone()));
        }
    }
    env
}

/// Builds a command: `argv` with exactly `env`, its own session, chrooted
/// into `root`, in `cwd`, as `user`, with the terminal `tty` (already its
/// stdio) as its controlling terminal.
pub fn command(
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    root: Option<&Path>,
    user: &User,
    tty: bool,
) -> Result<Command, ErrorReply> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let cwd = CString::new(cwd)
        .map_err(|_| ErrorReply::new(ErrorCode::BadRequest, "cwd contains a NUL byte"))?;
    let root = match root {
        Some(r) => Some(CString::new(r.as_os_str().as_bytes()).map_err(|_| {
            ErrorReply::new(ErrorCode::BadRequest, "root path contains a NUL byte")
        })?),
        None => None,
    };
    let drop_to = (!user.is_root()).then(|| (user.uid, user.gid, user.groups.clone()));
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe calls (setsid, sigprocmask, ioctl, chroot,
    // chdir, raw set*id syscalls) on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // The agent blocks SIGCHLD and SIGIO; commands must not inherit that.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(root) = &root {
                if libc::chroot(root.as_ptr()) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::chdir(cwd.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &drop_to {
                // Raw syscalls: the child has one thread, and libc's
                // wrappers would try to signal threads that are not there.
                if libc::syscall(
                    libc::SYS_setgroups,
                    groups.len() as libc::c_long,
                    groups.as_ptr(),
                ) != 0
                    || libc::syscall(libc::SYS_setgid, *gid as libc::c_long) != 0
                    || libc::syscall(libc::SYS_setuid, *uid as libc::c_long) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Why a program did not start, as the protocol reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFailure {
    /// No such program (exit code 127 by the shell's convention).
    NotFound(String),
    /// It exists but cannot be executed (126).
    NotExecutable(String),
    /// Something else went wrong.
    Other(ErrorReply),
}

impl StartFailure {
    /// Classifies a spawn error for `program`.
    pub fn of(program: &str, e: &io::Error) -> StartFailure {
        match e.raw_os_error() {
            Some(libc::ENOENT) => StartFailure::NotFound(format!("{program}: command not found")),
            Some(libc::EACCES | libc::ENOEXEC | libc::EISDIR) => {
                StartFailure::NotExecutable(format!("{program}: cannot execute: {e}"))
            }
            _ => StartFailure::Other(ErrorReply::new(
                ErrorCode::Spawn,
                format!("cannot run `{program}`: {e}"),
            )),
        }
    }

    /// The shell's exit code for it, when it has one.
    pub fn shell_code(&self) -> Option<i32> {
        match self {
            StartFailure::NotFound(_) => Some(127),
            StartFailure::NotExecutable(_) => Some(126),
            StartFailure::Other(_) => None,
        }
    }

    /// As an error reply (for requests that do not report exit codes).
    pub fn reply(self) -> ErrorReply {
        match self {
            StartFailure::NotFound(m) => ErrorReply::new(ErrorCode::CommandNotFound, m),
            StartFailure::NotExecutable(m) => ErrorReply::new(ErrorCode::PermissionDenied, m),
            StartFailure::Other(r) => r,
        }
    }
}

/// The error for a working directory that is not there.
pub fn cwd_missing(cwd: &str) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::CwdNotFound,
        format!("the working directory {cwd} does not exist in the guest (or is not a directory)"),
    )
}

/// Whether `cwd` is a directory in the guest's root.
pub fn cwd_exists(root: Option<&Path>, cwd: &str) -> bool {
    let path: PathBuf = match root {
        Some(r) => r.join(cwd.trim_start_matches('/')),
        None => PathBuf::from(cwd),
    };
    path.is_dir()
}

/// A new pseudo-terminal of `size` from the root's `/dev/ptmx` (so that its
/// slave is the root's `/dev/pts/N`): the master, non-blocking, and the
/// slave.
pub fn open_pty(root: Option<&Path>, size: PtySize) -> io::Result<(File, File)> {
    let ptmx = root.map_or_else(|| PathBuf::from("/dev/ptmx"), |r| r.join("dev/ptmx"));
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&ptmx)?;
    let fd = master.as_raw_fd();
    let unlock: libc::c_int = 0;
    let ws = libc::winsize {
        ws_row: size.rows.max(1),
        ws_col: size.cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: ioctls on the master we just opened, with pointers to values
    // of the types these requests take.
    let slave = unsafe {
        if libc::ioctl(fd, libc::TIOCSPTLCK, &unlock) < 0
            || libc::ioctl(fd, libc::TIOCSWINSZ, &ws) < 0
        {
            return Err(io::Error::last_os_error());
        }
        let s = libc::ioctl(
            fd,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(s)
    };
    set_nonblocking(fd)?;
    Ok((master, File::from(slave)))
}

/// Sets a terminal's size.
pub fn resize_pty(master: &File, size: PtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows.max(1),
        ws_col: size.cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn set_nonblocking(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns, with integer arguments.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Waits up to `ms` for `fd` to be ready for `events`; true when it is (or
/// has an error or hang-up to report).
pub fn poll_fd(fd: libc::c_int, events: libc::c_short, ms: libc::c_int) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_layers_override_in_order() {
        let user = User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: "/home/user".into(),
        };
        let sandbox = vec![
            ("A".to_string(), "1".to_string()),
            ("LANG".into(), "x".into()),
        ];
        let request = vec![("A".to_string(), "2".to_string())];
        let env = environment(&user, &[&sandbox, &request]);
        let get = |k: &str| env.iter().find(|(e, _)| e == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HOME"), Some("/home/user"));
        assert_eq!(get("USER"), Some("user"));
        assert_eq!(get("A"), Some("2"));
        assert_eq!(get("LANG"), Some("x"));
        assert!(get("PATH").unwrap().contains("/usr/bin"));
        assert_eq!(env.iter().filter(|(k, _)| k == "A").count(), 1);
    }

    #[test]
    fn bad_commands_are_refused() {
        assert!(validate(&[], &[]).is_err());
        assert!(validate(&["".into()], &[]).is_err());
        assert!(validate(&["a\0b".into()], &[]).is_err());
        assert!(validate(&["ls".into()], &[("A=B".into(), "c".into())]).is_err());
        let huge = vec!["x".repeat(MAX_COMMAND_BYTES)];
        assert_eq!(validate(&huge, &[]).unwrap_err().code, ErrorCode::Limit);
        assert!(validate(&["ls".into()], &[("A".into(), "b".into())]).is_ok());
    }

    #[test]
    fn start_failures_follow_the_shell() {
        let nf = StartFailure::of("nope", &io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(nf.shell_code(), Some(127));
        assert_eq!(nf, StartFailure::NotFound("nope: command not found".into()));
        let ne = StartFailure::of("/etc", &io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(ne.shell_code(), Some(126));
        let other = StartFailure::of("x", &io::Error::from_raw_os_error(libc::ENOMEM));
        assert_eq!(other.shell_code(), None);
        assert_eq!(other.reply().code, ErrorCode::Spawn);
    }
}
