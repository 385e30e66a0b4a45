//! The flat RAM images children map, made once per content and shared.
//!
//! A child maps its snapshot's RAM image `MAP_PRIVATE`. For the child to be
//! live-branchable that mapping must be shmem (userfaultfd write-protect does
//! not work on private mappings of disk files), so an image kept in a store
//! on disk, or kept as a diff layer over its parent, is made flat on tmpfs
//! once (see [`crate::ramimage`] for the cost model) and shared by every
//! child of the snapshot.
//!
//! The cache lives in the runtime directory, which every home of the user
//! may share, so an image is named by what it holds, never by a tag: a full
//! image by the BLAKE3 its snapshot's manifest records for `ram.img`, a
//! flattened layer by a digest of its parent's name and the layer's two
//! hashes (and the flat result's own BLAKE3 is kept beside it, in
//! `KEY.sum`). An image found in the cache is checked against that digest
//! before it is mapped (the store's verification cache makes that a `stat`
//! after the first time), so two homes with snapshots of the same tag never
//! see each other's memory, and a damaged image is made again.
//!
//! Each home that uses an image leaves a marker in `KEY.users/`; an image
//! no marker claims is deleted by [`Fleet::gc`], which runs on `rmi`, on
//! `kill --all` and on its own (`forkd gc`), and drops the markers of
//! homes that no longer reference the image or no longer exist. Files from
//! before content keys (`TAG.ram`) have no markers and go too.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use forkd_ops::{GcReport, SnapshotStatus};

use super::{Fleet, RAM_IMAGE};
use crate::CoreError;

/// The cache's directory under the runtime directory.
pub const CACHE_DIR: &str = "images";
/// Serialises collection against spawns that claim an image.
const LOCK: &str = ".lock";

/// How the image children of a snapshot map is made.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// A sparse copy of the stored `ram.img`, whose BLAKE3 is the key.
    Full { size: u64 },
    /// The flat image of `parent` with the layer's pages written over it.
    Layer { parent: String },
}

/// The cache entry of one snapshot's children.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ImageKey {
    key: String,
    source: Source,
}

/// The key of a flat image made from the flat image `parent_key` and a
/// layer whose `ram.img` and `ram.map` have these hashes.
fn layer_key(parent_key: &str, ram: &str, map: &str) -> String {
    let mut h = blake3::Hasher::new();
    for part in ["forkd flat ram image v1", parent_key, ram, map] {
        h.update(part.as_bytes());
        h.update(&[0]);
    }
    h.finalize().to_hex().to_string()
}

/// Whether `name` is a cache key (64 hex digits).
fn is_key(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Takes a `flock` of `kind` on the cache's lock file.
fn lock(dir: &Path, kind: libc::c_int) -> Result<File, CoreError> {
    std::fs::create_dir_all(dir).map_err(CoreError::host("creating", dir))?;
    let path = dir.join(LOCK);
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(CoreError::host("opening", &path))?;
    // SAFETY: flock on a valid fd we own; no memory effects.
    if unsafe { libc::flock(f.as_raw_fd(), kind) } != 0 {
        return Err(CoreError::host("locking", &path)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(f)
}

impl Fleet {
    fn cache_dir(&self) -> PathBuf {
        self.env.runtime.join(CACHE_DIR)
    }

    /// This home's marker name in a `KEY.users/` directory.
    fn user_marker(&self) -> String {
        blake3::hash(self.env.home.as_os_str().as_encoded_bytes()).to_hex()[..16].to_string()
    }

    /// The cache key of the image children of `tag` map.
    fn image_key(&self, tag: &str) -> Result<ImageKey, CoreError> {
        self.image_key_depth(tag, 0)
    }

    fn image_key_depth(&self, tag: &str, depth: usize) -> Result<ImageKey, CoreError> {
        let unusable = |reason: String| CoreError::SnapshotUnusable {
            tag: tag.into(),
            reason,
        };
        if depth > 1000 {
            return Err(unusable("its RAM layers loop".into()));
        }
        let manifest = self.store.load(tag)?;
        let hash_of = |name: &str| {
            manifest
                .files
                .iter()
                .find(|f| f.name == name)
                .map(|f| (f.blake3.clone(), f.size))
        };
        let (ram, size) =
            hash_of(RAM_IMAGE).ok_or_else(|| unusable("its manifest names no RAM image".into()))?;
        match hash_of(crate::ramimage::LAYER_MAP) {
            None => Ok(ImageKey {
                key: ram,
                source: Source::Full { size },
            }),
            Some((map, _)) => {
                let parent = manifest.ram_parent.clone().ok_or_else(|| {
                    unusable("it has a RAM layer map but names no RAM parent".into())
                })?;
                let parent_key = self.image_key_depth(&parent, depth + 1)?;
                Ok(ImageKey {
                    key: layer_key(&parent_key.key, &ram, &map),
                    source: Source::Layer { parent },
                })
            }
        }
    }

    /// Whether children of `tag` can map their image without making it.
    pub(crate) fn children_image_ready(&self, tag: &str) -> Result<bool, CoreError> {
        let key = self.image_key(tag)?;
        if matches!(key.source, Source::Full { .. }) && crate::paths::is_tmpfs(&self.store.dir(tag))
        {
            return Ok(true);
        }
        Ok(self.cache_dir().join(format!("{}.ram", key.key)).exists())
    }

    /// The flat RAM image children of `tag` map (made if needed): where a
    /// test or a tool finds what a child of `tag` sees.
    pub fn ram_image_of(&self, tag: &str) -> Result<PathBuf, CoreError> {
        forkd_store::validate_tag(tag)?;
        self.ram_for_children(tag, &self.store.dir(tag))
    }

    /// The flat RAM image children of `tag` map (made if needed) and the
    /// BLAKE3 it was checked against: what a copy of it must hash to.
    pub(crate) fn ram_image_with_digest(&self, tag: &str) -> Result<(PathBuf, String), CoreError> {
        let image = self.ram_image_of(tag)?;
        let key = self.image_key(tag)?;
        let digest = match key.source {
            Source::Full { .. } => key.key,
            Source::Layer { .. } => {
                let sum = self.cache_dir().join(format!("{}.sum", key.key));
                std::fs::read_to_string(&sum)
                    .map_err(CoreError::host("reading", &sum))?
                    .trim()
                    .to_string()
            }
        };
        Ok((image, digest))
    }

    /// The flat RAM image children of `tag` map. It must be on tmpfs (shmem)
    /// for them to be live-branchable: userfaultfd write-protect does not
    /// work on private mappings of disk files. A full image in a store on
    /// tmpfs is mapped where it is; otherwise the image is made once per
    /// content in the runtime directory's cache: a copy, or for a diff
    /// layer the parent's flat image with the layer's pages written over it
    /// (see [`crate::ramimage`] for the cost model).
    pub(crate) fn ram_for_children(
        &self,
        tag: &str,
        snap_dir: &Path,
    ) -> Result<PathBuf, CoreError> {
        let key = self.image_key(tag)?;
        let stored = snap_dir.join(RAM_IMAGE);
        if matches!(key.source, Source::Full { .. }) && crate::paths::is_tmpfs(snap_dir) {
            return Ok(stored);
        }
        let dir = self.cache_dir();
        let image = dir.join(format!("{}.ram", key.key));
        let sum = dir.join(format!("{}.sum", key.key));
        {
            // Claimed before it is looked at: a collection running now
            // either sees this home's marker or has finished.
            let _shared = lock(&dir, libc::LOCK_SH)?;
            let users = dir.join(format!("{}.users", key.key));
            std::fs::create_dir_all(&users).map_err(CoreError::host("creating", &users))?;
            let marker = users.join(self.user_marker());
            std::fs::write(&marker, self.env.home.as_os_str().as_encoded_bytes())
                .map_err(CoreError::host("writing", &marker))?;
            if image.exists() {
                if self.cached_image_intact(&key, &image, &sum)? {
                    return Ok(image);
                }
                // Damaged (or made by a forkd that named it otherwise):
                // make it again below. Children mapping it keep their copy.
                let _ = std::fs::remove_file(&image);
            }
        }
        let maker = format!("{}-{:?}", std::process::id(), std::thread::current().id());
        let tmp = dir.join(format!(".{}.ram.{maker}", key.key));
        let _ = std::fs::remove_file(&tmp);
        let made = match &key.source {
            Source::Full { .. } => crate::files::copy_sparse(&stored, &tmp).map(|_| None),
            Source::Layer { parent } => {
                {
                    let db = self.db();
                    self.store
                        .verify(&db, parent)
                        .map_err(|e| CoreError::SnapshotUnusable {
                            tag: tag.into(),
                            reason: format!(
                                "it keeps its RAM as a layer over `{parent}`, which is unusable: {e}"
                            ),
                        })?;
                }
                let base = self.ram_for_children(parent, &self.store.dir(parent))?;
                let layer_map = snap_dir.join(crate::ramimage::LAYER_MAP);
                crate::ramimage::flatten(&base, &stored, &layer_map, &tmp).and_then(|_| {
                    self.store
                        .hash_file(&tmp)
                        .map(Some)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                })
            }
        };
        let flat_hash = match made {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(CoreError::Host {
                    what: "making the RAM image children map in",
                    path: dir,
                    source: e,
                });
            }
        };
        if let Some(h) = flat_hash {
            // The digest first: an image is never found without it.
            let sum_tmp = dir.join(format!(".{}.sum.{maker}", key.key));
            std::fs::write(&sum_tmp, &h)
                .and_then(|()| std::fs::rename(&sum_tmp, &sum))
                .map_err(CoreError::host("writing", &sum))?;
        }
        std::fs::rename(&tmp, &image).map_err(CoreError::host("publishing", &image))?;
        Ok(image)
    }

    /// Whether a cached image holds what its key says: the stored image's
    /// hash for a full copy, the digest kept beside it for a flattened layer.
    fn cached_image_intact(
        &self,
        key: &ImageKey,
        image: &Path,
        sum: &Path,
    ) -> Result<bool, CoreError> {
        let size = std::fs::metadata(image).map(|m| m.len()).unwrap_or(0);
        let (expected_size, expected) = match &key.source {
            Source::Full { size } => (*size, key.key.clone()),
            Source::Layer { .. } => match std::fs::read_to_string(sum) {
                Ok(h) if is_key(h.trim()) => (size, h.trim().to_string()),
                _ => return Ok(false),
            },
        };
        let db = self.db();
        Ok(self
            .store
            .matches_hash(&db, image, expected_size, &expected)?)
    }

    /// The keys of the images this home's snapshots map.
    fn live_keys(&self) -> Result<std::collections::HashSet<String>, CoreError> {
        let mut live = std::collections::HashSet::new();
        for row in self.db().list_snapshots()? {
            if matches!(row.status, SnapshotStatus::Ready | SnapshotStatus::Broken) {
                if let Ok(k) = self.image_key(&row.tag) {
                    live.insert(k.key);
                }
            }
        }
        Ok(live)
    }

    /// Whether a marker (a file in `KEY.users/`) still claims its image:
    /// this home's if one of its snapshots maps the image, another home's
    /// while that home exists.
    fn marker_claims(
        &self,
        marker: &Path,
        key: &str,
        live: &std::collections::HashSet<String>,
    ) -> bool {
        if marker
            .file_name()
            .is_some_and(|n| *n == *self.user_marker())
        {
            return live.contains(key);
        }
        std::fs::read(marker)
            .ok()
            .map(|b| {
                PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(b))
            })
            .is_some_and(|home| home.join("state.db").exists())
    }

    /// The cached images [`Fleet::gc`] would delete now (file names).
    pub fn unreferenced_cache(&self) -> Result<Vec<String>, CoreError> {
        let dir = self.cache_dir();
        let live = self.live_keys()?;
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".ram").filter(|_| !name.starts_with('.')) else {
                continue;
            };
            let users = dir.join(format!("{key}.users"));
            let claimed = std::fs::read_dir(&users)
                .into_iter()
                .flatten()
                .flatten()
                .any(|m| self.marker_claims(&m.path(), key, &live));
            if !claimed {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes cached images no home references: drops this home's marker
    /// from images none of its snapshots map, the markers of homes that
    /// are gone, then every image without a marker (and leftovers of
    /// makers that died).
    pub fn gc(&self) -> Result<GcReport, CoreError> {
        let dir = self.cache_dir();
        let mut report = GcReport::default();
        if !dir.is_dir() {
            return Ok(report);
        }
        let live = self.live_keys()?;
        let _exclusive = lock(&dir, libc::LOCK_EX)?;
        let entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(CoreError::host("listing", &dir))?
            .flatten()
            .collect();
        for e in &entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".users") else {
                continue;
            };
            for m in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                if !self.marker_claims(&m.path(), key, &live) {
                    let _ = std::fs::remove_file(m.path());
                }
            }
        }
        for e in &entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if let Some(rest) = name.strip_prefix('.') {
                // `.KEY.ram.PID-THREAD` (or `.sum.`) of a maker that died.
                let pid = rest
                    .rsplit('.')
                    .next()
                    .and_then(|s| s.split('-').next())
                    .and_then(|p| p.parse::<u32>().ok());
                if pid.is_some_and(|p| !forkd_vm::process::pid_alive(p, 0)) {
                    report.freed_bytes += allocated(&path);
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            let Some(key) = name.strip_suffix(".ram") else {
                continue;
            };
            let users = dir.join(format!("{key}.users"));
            let claimed = std::fs::read_dir(&users).is_ok_and(|mut d| d.next().is_some());
            if claimed {
                report.kept += 1;
                continue;
            }
            report.freed_bytes += allocated(&path);
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(dir.join(format!("{key}.sum")));
            let _ = std::fs::remove_dir(&users);
            report.removed.push(name);
        }
        // Digests and marker directories whose image is gone.
        for e in &entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name
                .strip_suffix(".sum")
                .or_else(|| name.strip_suffix(".users"));
            if let Some(key) = key {
                if !dir.join(format!("{key}.ram")).exists() {
                    let p = e.path();
                    let _ = std::fs::remove_file(&p);
                    let _ = std::fs::remove_dir_all(&p);
                }
            }
        }
        report.removed.sort();
        Ok(report)
    }
}

/// Bytes a file occupies.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_input_and_are_recognised() {
        let a = layer_key("p", "r", "m");
        assert!(is_key(&a));
        assert_ne!(a, layer_key("p2", "r", "m"));
        assert_ne!(a, layer_key("p", "r2", "m"));
        assert_ne!(a, layer_key("p", "r", "m2"));
        // Parts cannot slide into each other.
        assert_ne!(layer_key("ab", "c", "m"), layer_key("a", "bc", "m"));
        assert!(!is_key("warm"));
        assert!(!is_key(&"g".repeat(64)));
    }
}
