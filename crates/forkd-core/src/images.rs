//! The root images built on this host (`home/images/*.ext4`): what they are
//! named, which sandboxes and snapshots still read them, building one from
//! a directory, and deleting one nothing needs.
//!
//! An image is named by its file name without `.ext4`
//! (`busybox-3d554cd3…`, `debian-python-f96f…`, `tree-…`); `--image NAME`
//! boots from it. A sandbox's disk overlay and a snapshot's disk layers name
//! their base image as the end of their qcow2 backing chain, which is how
//! its users are found: an image some disk still backs onto is never deleted.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::fleet::{Fleet, DISK_IMAGE};
use crate::paths::Env;
use crate::CoreError;

pub use forkd_guest::RootfsRecipe;

/// A root image of this home.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageEntry {
    /// What `--image` takes.
    pub name: String,
    pub path: PathBuf,
    /// `busybox`, `debian-python` (a recipe), `tree` (built from a directory
    /// or a container image), or `other`.
    pub kind: String,
    /// Bytes the image occupies on disk (it is sparse).
    pub disk_bytes: u64,
    /// Its size as the guest sees it.
    pub size_bytes: u64,
    /// Unix seconds of its last change.
    pub modified: u64,
    /// `sandbox ID` and `snapshot TAG` entries whose disk backs onto it.
    pub used_by: Vec<String>,
}

/// Whether `s` can name an image built here: lower-case letters, digits,
/// `.` and `-`, starting with a letter or digit (what the builders write).
pub fn is_image_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn images_dir(env: &Env) -> PathBuf {
    env.home.join("images")
}

/// The file of the image named `name`.
pub fn resolve(env: &Env, name: &str) -> Result<PathBuf, CoreError> {
    let dir = images_dir(env);
    let path = dir.join(format!("{name}.ext4"));
    if is_image_name(name) && path.is_file() {
        Ok(path)
    } else {
        Err(CoreError::NoImage {
            name: name.into(),
            dir,
        })
    }
}

/// The kind of an image, from its name.
fn kind_of(name: &str) -> &'static str {
    for recipe in forkd_guest::RootfsRecipe::ALL {
        if name
            .strip_prefix(recipe.name())
            .is_some_and(|rest| rest.starts_with('-'))
        {
            return recipe.name();
        }
    }
    if name.starts_with("tree-") {
        "tree"
    } else {
        "other"
    }
}

/// Every image of this home, by name, with its users.
pub fn list(fleet: &Fleet) -> Result<Vec<ImageEntry>, CoreError> {
    let dir = images_dir(fleet.env());
    let read = match std::fs::read_dir(&dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CoreError::host("listing", &dir)(e)),
    };
    let users = users_by_image(fleet)?;
    let mut out = Vec::new();
    for entry in read {
        let entry = entry.map_err(CoreError::host("listing", &dir))?;
        let file_name = entry.file_name();
        let Some(name) = file_name
            .to_str()
            .and_then(|n| n.strip_suffix(".ext4"))
            .filter(|n| is_image_name(n))
        else {
            continue; // temporaries of a build in progress, foreign files
        };
        let path = entry.path();
        let Ok(meta) = std::fs::metadata(&path) else {
            continue; // removed meanwhile
        };
        if !meta.is_file() {
            continue;
        }
        let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        out.push(ImageEntry {
            name: name.to_string(),
            kind: kind_of(name).to_string(),
            disk_bytes: meta.blocks() * 512,
            size_bytes: meta.len(),
            modified: meta.mtime().max(0) as u64,
            used_by: users.get(&canonical).cloned().unwrap_or_default(),
            path,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Deletes the image `name`; refused while a sandbox or snapshot of this
/// home backs onto it. Returns what was deleted.
pub fn remove(fleet: &Fleet, name: &str) -> Result<ImageEntry, CoreError> {
    resolve(fleet.env(), name)?;
    let entry = list(fleet)?
        .into_iter()
        .find(|e| e.name == name)
        .ok_or_else(|| CoreError::NoImage {
            name: name.into(),
            dir: images_dir(fleet.env()),
        })?;
    if !entry.used_by.is_empty() {
        return Err(CoreError::ImageInUse {
            name: name.into(),
            users: entry.used_by,
        });
    }
    std::fs::remove_file(&entry.path).map_err(CoreError::host("deleting", &entry.path))?;
    Ok(entry)
}

/// Builds (or finds cached) the image of directory `dir`; returns its name.
pub fn build_from_dir(env: &Env, dir: &Path, log: &dyn Fn(&str)) -> Result<String, CoreError> {
    let path = forkd_guest::tree::build_rootfs_from_dir(&env.home, dir, log)?;
    Ok(name_of(&path))
}

/// Builds (or finds cached) `recipe` with extra Debian `packages`; returns
/// its name.
pub fn build_with_packages(
    env: &Env,
    recipe: forkd_guest::RootfsRecipe,
    packages: &[String],
    log: &dyn Fn(&str),
) -> Result<String, CoreError> {
    let busybox = forkd_guest::find_busybox()?;
    let path = forkd_guest::build_rootfs_with_packages(&env.home, recipe, &busybox, packages, log)?;
    Ok(name_of(&path))
}

/// The image name of a file under `home/images`.
pub fn name_of(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".ext4"))
        .unwrap_or_default()
        .to_string()
}

/// For each base image (canonical path), the sandboxes and snapshots whose
/// disk backs onto it.
fn users_by_image(fleet: &Fleet) -> Result<BTreeMap<PathBuf, Vec<String>>, CoreError> {
    let mut disks: Vec<(String, PathBuf)> = Vec::new();
    {
        let db = fleet.db();
        for row in db.list_sandboxes()? {
            disks.push((
                format!("sandbox {}", row.id),
                row.run_dir.join("root.qcow2"),
            ));
        }
        for row in db.list_snapshots()? {
            disks.push((format!("snapshot {}", row.tag), row.dir.join(DISK_IMAGE)));
        }
    }
    let mut users: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for (who, disk) in disks {
        if !disk.is_file() {
            continue;
        }
        // A chain that cannot be read names no image: it is reported by the
        // health checks, and an image is then kept only if something else
        // still names it.
        let Ok(chain) = forkd_vm::disk::backing_chain(&disk) else {
            continue;
        };
        for file in chain {
            let file = std::fs::canonicalize(&file).unwrap_or(file);
            users.entry(file).or_default().push(who.clone());
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kinds() {
        for good in [
            "busybox-3d554cd3",
            "tree-0a1b",
            "debian-python-f96f",
            "my.img-2",
        ] {
            assert!(is_image_name(good), "{good}");
        }
        for bad in ["", "-x", "A", "a/b", "a b", "../x", ".hidden", "a_b"] {
            assert!(!is_image_name(bad), "{bad:?}");
        }
        assert_eq!(kind_of("busybox-3d55"), "busybox");
        assert_eq!(kind_of("debian-python-f96f"), "debian-python");
        assert_eq!(kind_of("tree-0a1b"), "tree");
        assert_eq!(kind_of("busyboxer"), "other");
    }
}
