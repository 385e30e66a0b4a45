//! Filesystem operations, done inside the guest's root as the asking user.
//!
//! Every operation runs on a thread of its own that [`enter`]s the guest:
//! `unshare(CLONE_FS)` gives the thread a private root and working
//! directory, `chroot` makes the command root (the mounted root disk) its
//! `/`, and [`users::act_as`] makes it access files as the user. So paths
//! and symlinks resolve exactly as they do for commands in the guest, and
//! the kernel checks the user's permissions; the agent's own root and other
//! threads are untouched. Errors map to the protocol's codes
//! ([`fs_error`]) so front ends can tell not-found from not-a-directory,
//! already-exists or permission.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use forkd_protocol::{permissions_string, ErrorCode, ErrorReply, FileInfo, FileKind};

use crate::users::{self, Names, User};

/// Most entries one `ListDir` returns.
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// Makes the calling thread see the guest: its own filesystem context,
/// chrooted into `root` (when the agent has one), working directory `/`,
/// file access as `user` (root when `None`). Call only on a thread that
/// serves one request and then ends.
pub fn enter(root: Option<&Path>, user: Option<&str>) -> Result<User, ErrorReply> {
    let fail = |what: &str, e: io::Error| {
        ErrorReply::new(
            ErrorCode::Io,
            format!("cannot enter the guest root ({what}): {e}"),
        )
    };
    // SAFETY: unshare(CLONE_FS) gives this thread a private copy of the
    // filesystem context (root, cwd, umask); no memory is involved.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(fail("unshare", io::Error::last_os_error()));
    }
    if let Some(root) = root {
        let c = CString::new(root.as_os_str().as_bytes())
            .map_err(|_| ErrorReply::new(ErrorCode::BadRequest, "root path contains a NUL byte"))?;
        // SAFETY: valid NUL-terminated path; affects this thread's private
        // filesystem context only (after the unshare above).
        if unsafe { libc::chroot(c.as_ptr()) } != 0 {
            return Err(fail("chroot", io::Error::last_os_error()));
        }
    }
    std::env::set_current_dir("/").map_err(|e| fail("chdir", e))?;
    let user = users::lookup(user).map_err(|e| ErrorReply::new(ErrorCode::UnknownUser, e.0))?;
    users::act_as(&user).map_err(|e| fail("switch user", e))?;
    Ok(user)
}

/// Runs `f` on a fresh thread that has [`enter`]ed the guest, and returns
/// its result.
pub fn in_guest<T: Send>(
    root: Option<&Path>,
    user: Option<&str>,
    f: impl FnOnce(&User) -> Result<T, ErrorReply> + Send,
) -> Result<T, ErrorReply> {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("guest-fs".into())
            .spawn_scoped(s, move || {
                let user = enter(root, user)?;
                f(&user)
            })
            .map_err(|e| ErrorReply::new(ErrorCode::Io, format!("cannot start a thread: {e}")))?;
        h.join().unwrap_or_else(|_| {
            Err(ErrorReply::new(
                ErrorCode::Io,
                "the agent's file operation failed unexpectedly",
            ))
        })
    })
}

/// A guest path as given (absolute, `~`, `~/x` or relative to `home`) made
/// absolute. Refuses NUL bytes and empty paths.
pub fn absolute(path: &str, home: &str) -> Result<PathBuf, ErrorReply> {
    if path.is_empty() {
        return Err(ErrorReply::new(ErrorCode::BadRequest, "the path is empty"));
    }
    if path.contains('\0') {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            "the path contains a NUL byte",
        ));
    }
    Ok(if path == "~" {
        PathBuf::from(home)
    } else if let Some(rest) = path.strip_prefix("~/") {
        Path::new(home).join(rest)
    } else {
        Path::new(home).join(path)
    })
}

/// The protocol error for `e` while acting on `path`.
pub fn fs_error(path: &Path, e: &io::Error) -> ErrorReply {
    let code = match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::NotFound, _) => ErrorCode::NotFound,
        (_, Some(libc::ENOTDIR)) => ErrorCode::NotADirectory,
        (_, Some(libc::EISDIR)) => ErrorCode::IsADirectory,
        (_, Some(libc::EEXIST)) => ErrorCode::AlreadyExists,
        (_, Some(libc::ENOTEMPTY)) => ErrorCode::NotEmpty,
        (_, Some(libc::EACCES | libc::EPERM | libc::EROFS)) => ErrorCode::PermissionDenied,
        _ => ErrorCode::Io,
    };
    let what = match code {
        ErrorCode::NotFound => "does not exist".to_string(),
        ErrorCode::NotADirectory => "is not a directory (or a parent is not)".to_string(),
        ErrorCode::IsADirectory => "is a directory".to_string(),
        ErrorCode::AlreadyExists => "already exists".to_string(),
        ErrorCode::NotEmpty => "is a directory that is not empty".to_string(),
        ErrorCode::PermissionDenied => format!("cannot be accessed: {e}"),
        _ => format!("failed: {e}"),
    };
    ErrorReply::new(code, format!("{} {what}", path.display()))
}

fn kind_of(ft: fs::FileType) -> FileKind {
    if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

/// Facts about `path` (which must be absolute in this thread's root).
pub fn file_info(path: &Path, names: &Names) -> Result<FileInfo, ErrorReply> {
    let meta = fs::symlink_metadata(path).map_err(|e| fs_error(path, &e))?;
    Ok(info_from(path, &meta, names))
}

fn info_from(path: &Path, meta: &fs::Metadata, names: &Names) -> FileInfo {
    let kind = kind_of(meta.file_type());
    let (target_kind, symlink_target) = if kind == FileKind::Symlink {
        (
            fs::metadata(path).ok().map(|m| kind_of(m.file_type())),
            fs::read_link(path)
                .ok()
                .map(|t| t.to_string_lossy().into_owned()),
        )
    } else {
        (None, None)
    };
    let name = path
        .file_name()
        .map_or_else(|| "/".to_string(), |n| n.to_string_lossy().into_owned());
    FileInfo {
        name,
        path: path.to_string_lossy().into_owned(),
        kind,
        target_kind,
        symlink_target,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        permissions: permissions_string(kind, meta.mode()),
        uid: meta.uid(),
        gid: meta.gid(),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
    }
}

/// The entries under `dir` down to `depth` levels, not following symlinks,
/// handed to `batch` in batches; returns how many there were. More than
/// [`MAX_LIST_ENTRIES`] is the error `Limit`.
pub fn list_dir(
    dir: &Path,
    depth: u32,
    names: &Names,
    batch: &mut dyn FnMut(Vec<FileInfo>) -> Result<(), ErrorReply>,
) -> Result<u64, ErrorReply> {
    let meta = fs::metadata(dir).map_err(|e| fs_error(dir, &e))?;
    if !meta.is_dir() {
        return Err(ErrorReply::new(
            ErrorCode::NotADirectory,
            format!("{} is not a directory", dir.display()),
        ));
    }
    let depth = depth.max(1);
    let mut count = 0u64;
    let mut pending: Vec<(PathBuf, u32)> = vec![(dir.to_path_buf(), 1)];
    let mut out = Vec::new();
    let mut out_bytes = 0usize;
    while let Some((d, level)) = pending.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            // The top must be readable; below it, skip what cannot be read
            // (as `find` goes on past a directory it may not enter).
            Err(e) if d == dir => return Err(fs_error(&d, &e)),
            Err(_) => continue,
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let info = info_from(&path, &meta, names);
            count += 1;
            if count as usize > MAX_LIST_ENTRIES {
                return Err(ErrorReply::new(
                    ErrorCode::Limit,
                    format!(
                        "{} holds more than {MAX_LIST_ENTRIES} entries within depth {depth}; \
                         list a smaller depth or a subdirectory",
                        dir.display()
                    ),
                ));
            }
            if meta.is_dir() && level < depth {
                pending.push((path, level + 1));
            }
            out_bytes += 200 + info.path.len() + info.name.len();
            out.push(info);
            // Keep each event well below a frame's payload limit.
            if out_bytes > 256 * 1024 {
                batch(std::mem::take(&mut out))?;
                out_bytes = 0;
            }
        }
    }
    if !out.is_empty() {
        batch(out)?;
    }
    Ok(count)
}

/// `mkdir -p` with `mode` for the directories it creates.
pub fn make_dir(path: &Path, mode: Option<u32>) -> Result<(), ErrorReply> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(ErrorReply::new(
                ErrorCode::AlreadyExists,
                format!("{} already exists", path.display()),
            ))
        }
        Ok(m) if m.file_type().is_symlink() && fs::metadata(path).is_ok_and(|t| t.is_dir()) => {
            return Err(ErrorReply::new(
                ErrorCode::AlreadyExists,
                format!(
                    "{} already exists (a symlink to a directory)",
                    path.display()
                ),
            ))
        }
        Ok(_) => {
            return Err(ErrorReply::new(
                ErrorCode::NotADirectory,
                format!("{} exists and is not a directory", path.display()),
            ))
        }
        Err(_) => {}
    }
    let mut b = fs::DirBuilder::new();
    b.recursive(true).mode(mode.unwrap_or(0o755));
    b.create(path).map_err(|e| fs_error(path, &e))
}

/// Creates the parent directories of `path`.
pub fn make_parents(path: &Path) -> Result<(), ErrorReply> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| fs_error(parent, &e)),
        _ => Ok(()),
    }
}

/// Removes a file, symlink or directory.
pub fn remove(path: &Path, recursive: bool) -> Result<(), ErrorReply> {
    let meta = fs::symlink_metadata(path).map_err(|e| fs_error(path, &e))?;
    let r = if meta.is_dir() {
        if recursive {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        }
    } else {
        fs::remove_file(path)
    };
    r.map_err(|e| fs_error(path, &e))
}

/// Renames `from` to `to`, creating `to`'s parents; across filesystems,
/// copies (keeping modes, times and links) and removes the source.
pub fn rename(from: &Path, to: &Path) -> Result<(), ErrorReply> {
    fs::symlink_metadata(from).map_err(|e| fs_error(from, &e))?;
    make_parents(to)?;
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_tree(from, to)?;
            remove(from, true)
        }
        Err(e) => Err(fs_error(to, &e)),
    }
}

/// Copies a file, symlink or directory tree (modes and mtimes kept).
fn copy_tree(from: &Path, to: &Path) -> Result<(), ErrorReply> {
    let meta = fs::symlink_metadata(from).map_err(|e| fs_error(from, &e))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(from).map_err(|e| fs_error(from, &e))?;
        std::os::unix::fs::symlink(&target, to).map_err(|e| fs_error(to, &e))?;
        return Ok(());
    }
    if ft.is_dir() {
        fs::create_dir(to).map_err(|e| fs_error(to, &e))?;
        for entry in fs::read_dir(from).map_err(|e| fs_error(from, &e))? {
            let entry = entry.map_err(|e| fs_error(from, &e))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if ft.is_file() {
        fs::copy(from, to).map_err(|e| fs_error(to, &e))?;
    } else {
        return Err(ErrorReply::new(
            ErrorCode::Io,
            format!(
                "{} is a device, FIFO or socket, which cannot be moved to another filesystem",
                from.display()
            ),
        ));
    }
    fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| fs_error(to, &e))?;
    set_mtime(to, &meta);
    Ok(())
}

fn set_mtime(path: &Path, meta: &fs::Metadata) {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    let times = [
        libc::timespec {
            tv_sec: meta.atime(),
            tv_nsec: meta.atime_nsec(),
        },
        libc::timespec {
            tv_sec: meta.mtime(),
            tv_nsec: meta.mtime_nsec(),
        },
    ];
    // SAFETY: valid path and a two-element timespec array, as utimensat reads.
    unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_against_home() {
        assert_eq!(absolute("/a/b", "/root").unwrap(), PathBuf::from("/a/b"));
        assert_eq!(absolute("~", "/home/u").unwrap(), PathBuf::from("/home/u"));
        assert_eq!(
            absolute("~/x", "/home/u").unwrap(),
            PathBuf::from("/home/u/x")
        );
        assert_eq!(
            absolute("x/y", "/root").unwrap(),
            PathBuf::from("/root/x/y")
        );
        assert!(absolute("", "/").is_err());
        assert!(absolute("a\0b", "/").is_err());
    }

    #[test]
    fn errors_map_to_codes() {
        let p = Path::new("/x");
        let code = |errno| fs_error(p, &io::Error::from_raw_os_error(errno)).code;
        assert_eq!(code(libc::ENOENT), ErrorCode::NotFound);
        assert_eq!(code(libc::ENOTDIR), ErrorCode::NotADirectory);
        assert_eq!(code(libc::EISDIR), ErrorCode::IsADirectory);
        assert_eq!(code(libc::EEXIST), ErrorCode::AlreadyExists);
        assert_eq!(code(libc::ENOTEMPTY), ErrorCode::NotEmpty);
        assert_eq!(code(libc::EACCES), ErrorCode::PermissionDenied);
        assert_eq!(code(libc::EROFS), ErrorCode::PermissionDenied);
        assert_eq!(code(libc::EIO), ErrorCode::Io);
        let msg = fs_error(p, &io::Error::from_raw_os_error(libc::ENOENT)).message;
        assert_eq!(msg, "/x does not exist");
    }
}
