//! The flat RAM images children map, made once per snapshot.
//!
//! A child maps its snapshot's RAM image `MAP_PRIVATE`. For the child to be
//! live-branchable that mapping must be shmem (userfaultfd write-protect does
//! not work on private mappings of disk files), so an image kept in a store
//! on disk, or kept as a diff layer over its parent, is made flat on tmpfs
//! once (see [`crate::ramimage`] for the cost model) and shared by every
//! child of the snapshot.

use std::path::{Path, PathBuf};

use super::{Fleet, RAM_IMAGE};
use crate::CoreError;

impl Fleet {
    /// The flat RAM image children of `tag` map. It must be on tmpfs (shmem)
    /// for them to be live-branchable: userfaultfd write-protect does not
    /// work on private mappings of disk files. A full image in a store on
    /// tmpfs is mapped where it is; otherwise the image is made once per
    /// snapshot in the runtime directory: a copy, or for a diff layer the
    /// parent's flat image with the layer's pages written over it (see
    /// [`crate::ramimage`] for the cost model).
    pub(crate) fn ram_for_children(
        &self,
        tag: &str,
        snap_dir: &Path,
    ) -> Result<PathBuf, CoreError> {
        let stored = snap_dir.join(RAM_IMAGE);
        let layer_map = snap_dir.join(crate::ramimage::LAYER_MAP);
        let ram_parent = if layer_map.exists() {
            let manifest = self.store.load(tag)?;
            Some(
                manifest
                    .ram_parent
                    .ok_or_else(|| CoreError::SnapshotUnusable {
                        tag: tag.into(),
                        reason: "it has a RAM layer map but names no RAM parent".into(),
                    })?,
            )
        } else {
            None
        };
        if ram_parent.is_none() && crate::paths::is_tmpfs(snap_dir) {
            return Ok(stored);
        }
        let dir = self.env.runtime.join("images");
        let image = dir.join(format!("{tag}.ram"));
        if image.exists() {
            return Ok(image);
        }
        std::fs::create_dir_all(&dir).map_err(CoreError::host("creating", &dir))?;
        let tmp = dir.join(format!(
            ".{tag}.ram.{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let made = match &ram_parent {
            None => crate::files::copy_sparse(&stored, &tmp).map(|_| ()),
            Some(parent) => {
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
                crate::ramimage::flatten(&base, &stored, &layer_map, &tmp).map(|_| ())
            }
        };
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(CoreError::Host {
                what: "making the RAM image children map in",
                path: dir,
                source: e,
            });
        }
        std::fs::rename(&tmp, &image).map_err(CoreError::host("publishing", &image))?;
        Ok(image)
    }
}
