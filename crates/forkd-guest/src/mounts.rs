//! Removing a temporary tree without reaching through a mount inside it.
//!
//! A root bootstrap (mmdebstrap, debootstrap) mounts `proc`, `sys`, `dev/pts`
//! and a bind of the host's `/dev/shm` inside its target while it runs. If
//! those mounts were left behind (the tool killed before its cleanup) and
//! the tree were removed recursively, the removal would go through the bind
//! and empty the host's `/dev/shm`. [`remove_tree`] first detaches every
//! mount at or under the tree, deepest first, and removes nothing while one
//! is still there.
//!
//! The pure part, reading mount points out of `/proc/self/mountinfo`, is
//! [`mount_points`] and [`mounts_under`].

use std::ffi::{CString, OsString};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::GuestError;

/// The mount point of each line of a `/proc/<pid>/mountinfo` text (field 5,
/// with the kernel's octal escapes of space, tab, newline and backslash
/// undone).
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(OsString::from_vec(unescape(field))))
        .collect()
}

/// The mount points at or below `root`, deepest first.
pub fn mounts_under(mountinfo: &str, root: &Path) -> Vec<PathBuf> {
    let mut under: Vec<PathBuf> = mount_points(mountinfo)
        .into_iter()
        .filter(|p| p.starts_with(root))
        .collect();
    under.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    under.dedup();
    under
}

/// Undoes the kernel's `\ooo` escapes in a mountinfo field.
fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// Removes the file or directory tree at `path` (nothing there is fine).
/// Mounts at or under it are detached first, deepest first; if one cannot
/// be (not root, or it came back), nothing is removed and the error names
/// it, so a later sweep can try again.
pub fn remove_tree(path: &Path) -> Result<(), GuestError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(GuestError::io("inspect", path)(e)),
    };
    if !meta.is_dir() {
        return fs::remove_file(path).map_err(GuestError::io("remove", path));
    }
    let root = fs::canonicalize(path).map_err(GuestError::io("resolve", path))?;
    let read = || {
        fs::read_to_string("/proc/self/mountinfo")
            .map_err(GuestError::io("read", "/proc/self/mountinfo"))
    };
    for point in mounts_under(&read()?, &root) {
        // A path from mountinfo holds no NUL; if one did, the check below
        // would still find the mount and refuse.
        let Ok(c) = CString::new(point.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call;
        // MNT_DETACH detaches at once and never blocks on users of the mount,
        // and UMOUNT_NOFOLLOW keeps a symlink inside the tree from pointing
        // the unmount somewhere else.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
    }
    if let Some(point) = mounts_under(&read()?, &root).into_iter().next() {
        return Err(GuestError::MountedInside {
            tree: path.to_path_buf(),
            mount: point,
        });
    }
    fs::remove_dir_all(path).map_err(GuestError::io("remove", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:5 / /tmp/h/img.tmp-9.d/proc rw - proc proc rw
41 22 0:21 / /tmp/h/img.tmp-9.d/sys rw - sysfs sys rw
42 22 0:24 / /tmp/h/img.tmp-9.d/dev/shm rw - tmpfs tmpfs rw
43 42 0:24 / /tmp/h/img.tmp-9.d/dev/shm/inner rw - tmpfs tmpfs rw
44 22 0:30 / /tmp/h/img.tmp-9.dx rw - tmpfs tmpfs rw
45 22 0:31 / /tmp/with\\040space/a\\134b rw - tmpfs tmpfs rw
";

    #[test]
    fn mount_points_are_unescaped() {
        let points = mount_points(INFO);
        assert_eq!(points.len(), 7);
        assert_eq!(points[0], Path::new("/"));
        assert_eq!(points[6], Path::new("/tmp/with space/a\\b"));
        assert_eq!(unescape("a\\011b\\012c"), b"a\tb\nc");
        // Not an escape: left as it is.
        assert_eq!(unescape("a\\9xy\\"), b"a\\9xy\\");
        assert_eq!(unescape("\\477"), b"\\477");
    }

    #[test]
    fn mounts_under_a_tree_come_deepest_first_and_stop_at_its_name() {
        let under = mounts_under(INFO, Path::new("/tmp/h/img.tmp-9.d"));
        assert_eq!(under.len(), 4, "{under:?}");
        assert_eq!(under[0], Path::new("/tmp/h/img.tmp-9.d/dev/shm/inner"));
        assert_eq!(under[1], Path::new("/tmp/h/img.tmp-9.d/dev/shm"));
        // A sibling whose name starts the same is not under the tree.
        assert!(!under.contains(&PathBuf::from("/tmp/h/img.tmp-9.dx")));
        assert!(mounts_under(INFO, Path::new("/tmp/elsewhere")).is_empty());
        assert_eq!(
            mounts_under(INFO, Path::new("/tmp/with space")),
            vec![PathBuf::from("/tmp/with space/a\\b")]
        );
    }

    #[test]
    fn plain_trees_and_files_are_removed_and_a_missing_one_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("t.tmp-1.d");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/b/f"), b"x").unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        let file = dir.path().join("f.tmp-1");
        fs::write(&file, b"x").unwrap();
        remove_tree(&file).unwrap();
        assert!(!file.exists());
        remove_tree(&file).unwrap();
    }
}
