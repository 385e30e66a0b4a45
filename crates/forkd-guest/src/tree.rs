//! Root images from a directory the user owns (`forkd image build
//! --from-dir`): the directory is read, never written. Its content digest
//! (paths, types, modes, owners, symlink targets and file bytes, in a fixed
//! order) keys the cache, so building the same tree twice is free and any
//! change to it makes a new image. [`build_rootfs_staged`] is the common
//! path of every tree-built image (a directory, a container image's layers):
//! a staging directory filled by the caller, forkd's files added, the image
//! published whole.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::cache::{prepare_dir, temp_path, KeyBuilder, TempGuard};
use crate::rootfs::{build_rootfs_from_tree, tree_rootfs_key};
use crate::GuestError;

/// How deep a tree may nest before it is refused (a loop of bind mounts or a
/// hostile tree, not a root filesystem).
const MAX_DEPTH: usize = 256;

/// The content digest of the tree at `root`: 32 hex digits. Symlinks are
/// hashed as links (never followed); sockets and fifos by type and mode.
pub fn tree_digest(root: &Path) -> Result<String, GuestError> {
    let meta = fs::metadata(root).map_err(GuestError::io("read", root))?;
    if !meta.is_dir() {
        return Err(GuestError::NotADirectory {
            path: root.to_owned(),
        });
    }
    let mut key = KeyBuilder::new("forkd tree digest");
    hash_dir(root, Path::new(""), &mut key, 0)?;
    Ok(key.finish())
}

fn hash_dir(root: &Path, rel: &Path, key: &mut KeyBuilder, depth: usize) -> Result<(), GuestError> {
    let dir = root.join(rel);
    if depth > MAX_DEPTH {
        return Err(GuestError::TreeTooDeep { path: dir });
    }
    let mut names: Vec<_> = fs::read_dir(&dir)
        .map_err(GuestError::io("list", &dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(GuestError::io("list", &dir))?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).map_err(GuestError::io("stat", &path))?;
        key.field("path", rel.as_os_str().as_encoded_bytes());
        key.field("mode", &meta.mode().to_le_bytes());
        key.field(
            "owner",
            &[meta.uid(), meta.gid()].map(u32::to_le_bytes).concat(),
        );
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(GuestError::io("read link", &path))?;
            key.field("link", target.as_os_str().as_encoded_bytes());
        } else if ft.is_dir() {
            hash_dir(root, &rel, key, depth + 1)?;
        } else if ft.is_file() {
            let mut hasher = blake3::Hasher::new();
            let mut f = fs::File::open(&path).map_err(GuestError::io("read", &path))?;
            std::io::copy(&mut f, &mut hasher).map_err(GuestError::io("read", &path))?;
            key.field("bytes", hasher.finalize().as_bytes());
        } else {
            key.field("device", &meta.rdev().to_le_bytes());
        }
    }
    Ok(())
}

/// The image [`build_rootfs_from_dir`] makes of a tree whose digest is
/// `digest`, under `home/images`.
pub fn dir_image_path(home: &Path, digest: &str) -> PathBuf {
    staged_image_path(home, &dir_source_key(digest))
}

fn dir_source_key(digest: &str) -> String {
    format!("dir:{digest}")
}

/// The image [`build_rootfs_staged`] makes for `source_key`, under
/// `home/images`.
pub fn staged_image_path(home: &Path, source_key: &str) -> PathBuf {
    home.join("images")
        .join(format!("tree-{}.ext4", tree_rootfs_key(source_key)))
}

/// Writes the root image of `source_key` unless it exists; returns its path.
/// `fill` writes the root tree into the empty staging directory it is given
/// (copies a directory, unpacks container layers); forkd's own files are
/// added after it. The staging directory is removed however this ends, and
/// the image appears whole or not at all, so a failing `fill` leaves
/// nothing behind.
pub fn build_rootfs_staged<E: From<GuestError>>(
    home: &Path,
    source_key: &str,
    fill: &mut dyn FnMut(&Path) -> Result<(), E>,
    log: &dyn Fn(&str),
) -> Result<PathBuf, E> {
    let out = staged_image_path(home, source_key);
    if out.is_file() {
        return Ok(out);
    }
    // Temporaries are named by pid: two builds in one process (a daemon's
    // threads) would write the same ones, so they take turns; another
    // process writes its own and the last rename wins with a whole image.
    static BUILDS: Mutex<()> = Mutex::new(());
    let _turn = BUILDS.lock().unwrap_or_else(|e| e.into_inner());
    if out.is_file() {
        return Ok(out);
    }
    prepare_dir(&home.join("images"))?;
    let staging = {
        let mut name = temp_path(&out).into_os_string();
        name.push(".src");
        PathBuf::from(name)
    };
    let _guard = TempGuard::new(staging.clone());
    fs::create_dir(&staging).map_err(GuestError::io("create", &staging))?;
    fill(&staging)?;
    Ok(build_rootfs_from_tree(home, &staging, source_key, log)?)
}

/// Writes a root image from the directory `dir` unless one of the same
/// content exists; returns its path. The tree is copied (owners, modes,
/// links, times and xattrs kept: `cp -a`) into a staging directory first,
/// where forkd's own files are added, so `dir` is never changed.
pub fn build_rootfs_from_dir(
    home: &Path,
    dir: &Path,
    log: &dyn Fn(&str),
) -> Result<PathBuf, GuestError> {
    log(&format!("hashing {}", dir.display()));
    let digest = tree_digest(dir)?;
    let mut copy = |staging: &Path| -> Result<(), GuestError> {
        log(&format!("copying {} into a staging tree", dir.display()));
        let mut src = dir.as_os_str().to_owned();
        src.push("/.");
        let out_cp = Command::new("cp")
            .arg("-a")
            .arg("--no-target-directory")
            .arg(&src)
            .arg(staging)
            .output()
            .map_err(GuestError::io("run cp for", dir))?;
        if !out_cp.status.success() {
            return Err(GuestError::CopyTree {
                path: dir.to_owned(),
                stderr: String::from_utf8_lossy(&out_cp.stderr).trim().to_owned(),
            });
        }
        Ok(())
    };
    build_rootfs_staged(home, &dir_source_key(&digest), &mut copy, log)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc/app")).unwrap();
        fs::write(t.path().join("etc/app/conf"), b"a=1\n").unwrap();
        symlink("app/conf", t.path().join("etc/link")).unwrap();
        t
    }

    #[test]
    fn the_digest_follows_content_modes_and_links_and_nothing_else() {
        let (a, b) = (tree(), tree());
        let d = tree_digest(a.path()).unwrap();
        assert_eq!(
            d,
            tree_digest(b.path()).unwrap(),
            "same content, same digest"
        );
        fs::write(b.path().join("etc/app/conf"), b"a=2\n").unwrap();
        let changed = tree_digest(b.path()).unwrap();
        assert_ne!(d, changed, "bytes");
        fs::write(b.path().join("etc/app/conf"), b"a=1\n").unwrap();
        assert_eq!(d, tree_digest(b.path()).unwrap(), "restored");
        fs::set_permissions(
            b.path().join("etc/app/conf"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert_ne!(d, tree_digest(b.path()).unwrap(), "mode");
        let c = tree();
        fs::remove_file(c.path().join("etc/link")).unwrap();
        symlink("app/other", c.path().join("etc/link")).unwrap();
        assert_ne!(d, tree_digest(c.path()).unwrap(), "link target");
        let e = tree();
        fs::rename(
            e.path().join("etc/app/conf"),
            e.path().join("etc/app/conf2"),
        )
        .unwrap();
        assert_ne!(d, tree_digest(e.path()).unwrap(), "name");
    }

    #[test]
    fn a_file_or_missing_path_is_refused_by_name() {
        let t = tree();
        let err = tree_digest(&t.path().join("etc/app/conf")).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        let err = tree_digest(&t.path().join("nope")).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
