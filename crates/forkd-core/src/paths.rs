//! Where forkd keeps things: the home directory (artifacts, later the state
//! database and snapshots) and the runtime directory on tmpfs (VM run dirs,
//! sockets, RAM files).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Resolved directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `$FORKD_HOME`, else `$XDG_DATA_HOME/forkd`, else `~/.local/share/forkd`.
    pub home: PathBuf,
    /// `$FORKD_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/forkd` when that is tmpfs,
    /// else `/dev/shm/forkd-<uid>`.
    pub runtime: PathBuf,
}

impl Env {
    /// Reads the environment of this process.
    pub fn from_process() -> Env {
        Env::resolve(&|k| std::env::var_os(k).map(PathBuf::from), &is_tmpfs)
    }

    /// Pure resolution over a variable lookup and a tmpfs test.
    pub fn resolve(var: &dyn Fn(&str) -> Option<PathBuf>, tmpfs: &dyn Fn(&Path) -> bool) -> Env {
        let nonempty = |k: &str| var(k).filter(|p| !p.as_os_str().is_empty());
        let home = nonempty("FORKD_HOME")
            .or_else(|| nonempty("XDG_DATA_HOME").map(|d| d.join("forkd")))
            .or_else(|| nonempty("HOME").map(|h| h.join(".local/share/forkd")))
            .unwrap_or_else(|| PathBuf::from("/var/lib/forkd"));
        let runtime = nonempty("FORKD_RUNTIME_DIR")
            .or_else(|| {
                nonempty("XDG_RUNTIME_DIR")
                    .filter(|d| tmpfs(d))
                    .map(|d| d.join("forkd"))
            })
            // SAFETY: getuid has no preconditions and cannot fail.
            .unwrap_or_else(|| {
                PathBuf::from(format!("/dev/shm/forkd-{}", unsafe { libc::getuid() }))
            });
        Env { home, runtime }
    }

    /// Directory holding one run directory per live VM.
    pub fn vms_dir(&self) -> PathBuf {
        self.runtime.join("vms")
    }
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether `path` (or its nearest existing ancestor) is on tmpfs.
pub fn is_tmpfs(path: &Path) -> bool {
    statfs(path)
        .map(|s| s.f_type == TMPFS_MAGIC)
        .unwrap_or(false)
}

/// Free bytes on the filesystem holding `path` (nearest existing ancestor).
pub fn free_bytes(path: &Path) -> Option<u64> {
    statfs(path).map(|s| s.f_bavail * s.f_bsize as u64)
}

fn statfs(path: &Path) -> Option<libc::statfs> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let c = CString::new(existing.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs is plain data; the call fills it from a valid C path.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a valid out pointer.
    (unsafe { libc::statfs(c.as_ptr(), &mut s) } == 0).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)], tmpfs: bool) -> Env {
        let vars: Vec<(String, PathBuf)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
            .collect();
        Env::resolve(
            &|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()),
            &|_| tmpfs,
        )
    }

    #[test]
    fn forkd_variables_win() {
        let e = env(
            &[
                ("FORKD_HOME", "/h"),
                ("FORKD_RUNTIME_DIR", "/r"),
                ("HOME", "/root"),
            ],
            false,
        );
        assert_eq!(
            (e.home.as_path(), e.runtime.as_path()),
            (Path::new("/h"), Path::new("/r"))
        );
    }

    #[test]
    fn xdg_defaults() {
        let e = env(
            &[("XDG_DATA_HOME", "/d"), ("XDG_RUNTIME_DIR", "/run/user/0")],
            true,
        );
        assert_eq!(e.home, Path::new("/d/forkd"));
        assert_eq!(e.runtime, Path::new("/run/user/0/forkd"));
        let e = env(
            &[("HOME", "/root"), ("XDG_RUNTIME_DIR", "/not-tmpfs")],
            false,
        );
        assert_eq!(e.home, Path::new("/root/.local/share/forkd"));
        assert!(e.runtime.starts_with("/dev/shm"), "{:?}", e.runtime);
    }

    #[test]
    fn dev_shm_is_tmpfs_here() {
        assert!(is_tmpfs(Path::new("/dev/shm")));
        assert!(free_bytes(Path::new("/dev/shm/does/not/exist")).is_some());
    }
}
