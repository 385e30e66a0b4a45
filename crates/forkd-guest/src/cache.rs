//! Cache keys and atomic publication of artifacts under the home dir.
//!
//! A key is a blake3 hash of length-prefixed, labelled inputs, so changing any
//! input (or the order of fields) changes the key. Artifacts are built under a
//! `<final>.tmp-<pid>` name and renamed into place: a killed build never
//! leaves a half artifact under the final name, and its leftovers are swept by
//! the next build once the pid is gone, never through a mount left inside
//! them (see [`crate::mounts`]).

use std::fs;
use std::path::{Path, PathBuf};

use crate::GuestError;

/// Builds a cache key from labelled fields.
pub struct KeyBuilder {
    hasher: blake3::Hasher,
}

impl KeyBuilder {
    /// `domain` separates kinds of artifacts (initramfs, rootfs, ...).
    pub fn new(domain: &str) -> Self {
        let mut key = KeyBuilder {
            hasher: blake3::Hasher::new(),
        };
        key.field("domain", domain.as_bytes());
        key
    }

    pub fn field(&mut self, label: &str, bytes: &[u8]) -> &mut Self {
        for part in [label.as_bytes(), bytes] {
            self.hasher.update(&(part.len() as u64).to_le_bytes());
            self.hasher.update(part);
        }
        self
    }

    /// 32 hex digits (128 bits): short enough for file names, long enough
    /// that collisions do not happen.
    pub fn finish(&self) -> String {
        let hex = self.hasher.finalize().to_hex();
        hex[..32].to_owned()
    }
}

/// The temporary name a build of `final_path` uses.
pub(crate) fn temp_path(final_path: &Path) -> PathBuf {
    let mut name = final_path.as_os_str().to_owned();
    name.push(format!(".tmp-{}", std::process::id()));
    PathBuf::from(name)
}

/// Removes a temporary file or dir on drop unless disarmed.
pub(crate) struct TempGuard {
    path: Option<PathBuf>,
}

impl TempGuard {
    pub(crate) fn new(path: PathBuf) -> Self {
        TempGuard { path: Some(path) }
    }

    pub(crate) fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            // An error leaves the tree for the next sweep (see remove_tree).
            let _ = crate::mounts::remove_tree(&path);
        }
    }
}

/// fsyncs `tmp`, renames it to `final_path`, fsyncs the parent dir.
pub(crate) fn publish(tmp: &Path, final_path: &Path) -> Result<(), GuestError> {
    if tmp.is_file() {
        fs::File::open(tmp)
            .and_then(|f| f.sync_all())
            .map_err(GuestError::io("fsync", tmp))?;
    }
    fs::rename(tmp, final_path).map_err(GuestError::io("rename into place", final_path))?;
    if let Some(parent) = final_path.parent() {
        // Best effort: not every filesystem lets a dir be fsynced.
        let _ = fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Creates `dir` and removes `*.tmp-<pid>` leftovers of dead processes in it.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), GuestError> {
    fs::create_dir_all(dir).map_err(GuestError::io("create dir", dir))?;
    let entries = fs::read_dir(dir).map_err(GuestError::io("read dir", dir))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = stale_pid(&name.to_string_lossy()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            drop(TempGuard::new(entry.path()));
        }
    }
    Ok(())
}

/// The pid in a name like `x.ext4.tmp-123` or `x.tmp-123.d`.
fn stale_pid(name: &str) -> Option<u32> {
    let (_, rest) = name.rsplit_once(".tmp-")?;
    let digits = rest.strip_suffix(".d").unwrap_or(rest);
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fields: &[(&str, &[u8])]) -> String {
        let mut k = KeyBuilder::new("test");
        for (label, bytes) in fields {
            k.field(label, bytes);
        }
        k.finish()
    }

    #[test]
    fn key_changes_when_any_input_changes() {
        let base = key(&[("agent", b"A"), ("busybox", b"B")]);
        assert_eq!(base, key(&[("agent", b"A"), ("busybox", b"B")]));
        assert_eq!(base.len(), 32);
        assert_ne!(base, key(&[("agent", b"A2"), ("busybox", b"B")]));
        assert_ne!(base, key(&[("agent", b"A"), ("busybox", b"B2")]));
        // Moving bytes across the field boundary must not collide.
        assert_ne!(base, key(&[("agent", b"AB"), ("busybox", b"")]));
        assert_ne!(base, key(&[("busybox", b"B"), ("agent", b"A")]));
        assert_ne!(
            base,
            KeyBuilder::new("other")
                .field("agent", b"A")
                .field("busybox", b"B")
                .finish()
        );
    }

    #[test]
    fn sweeps_only_dead_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join("x.cpio.tmp-4294967295");
        let dead_dir = dir.path().join("img.tmp-4294967294.d");
        let mine = temp_path(&dir.path().join("y.cpio"));
        let kept = dir.path().join("z.cpio");
        for f in [&dead, &mine, &kept] {
            fs::write(f, b"x").unwrap();
        }
        fs::create_dir_all(dead_dir.join("sub")).unwrap();
        prepare_dir(dir.path()).unwrap();
        assert!(!dead.exists() && !dead_dir.exists());
        assert!(mine.exists() && kept.exists());
    }
}
