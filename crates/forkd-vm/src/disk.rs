//! Disk images: per-VM qcow2 overlays on read-only bases (made with
//! `qemu-img`), and freezing a running VM's disk so that a snapshot can keep
//! it: a new overlay is prepared while the guest runs and swapped in with one
//! graph change while it is paused.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::qmp::Qmp;
use crate::vm::Vm;
use crate::VmError;

/// Creates `overlay` (qcow2) backed by `base` (of format `base_format`:
/// `raw` for root images, `qcow2` for a snapshot's frozen disk). The base is
/// referenced by absolute path and never written: QEMU opens backing files
/// read-only, so any number of VMs can share it.
pub fn create_overlay(base: &Path, base_format: &str, overlay: &Path) -> Result<(), String> {
    let base = base
        .canonicalize()
        .map_err(|e| format!("base image {}: {e}", base.display()))?;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
        .arg(&base)
        .arg(overlay)
        .output()
        .map_err(|e| {
            format!("cannot run qemu-img ({e}): install it with `apt-get install qemu-utils`")
        })?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create {} failed: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Vm {
    /// The file QEMU currently writes for disk `vdN` (the top of its chain).
    pub fn disk_top(&self, index: usize) -> Result<PathBuf, VmError> {
        let (_, file) = top_node(&mut self.qmp(), index)?;
        Ok(PathBuf::from(file))
    }

    /// The slow half of freezing disk `vdN`, done while the guest runs:
    /// creates `new_overlay` on top of the disk's current image and attaches
    /// it to QEMU as a node without a backing. Inside the pause,
    /// [`Vm::commit_disk_snapshot`] is then a single graph change after
    /// which QEMU writes only `new_overlay` and the old image is frozen.
    pub fn prepare_disk_snapshot(
        &self,
        index: usize,
        new_overlay: &Path,
    ) -> Result<PreparedDiskSnapshot, VmError> {
        let mut qmp = self.qmp();
        let entry = disk_entry(&mut qmp, index)?;
        let (top, file) = top_of(&entry);
        let size = entry["inserted"]["image"]["virtual-size"]
            .as_u64()
            .ok_or_else(|| VmError::Config(format!("QEMU reports no size for disk vd{index}")))?;
        // `-u`: QEMU holds the write lock on the current image, so qemu-img
        // must not open it; the size comes from QEMU instead.
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&file)
            .arg(new_overlay)
            .arg(size.to_string())
            .output()
            .map_err(|e| VmError::Config(format!("cannot run qemu-img: {e}")))?;
        if !out.status.success() {
            return Err(VmError::Config(format!(
                "qemu-img create {} failed: {}",
                new_overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // QEMU opens it after dropping its privileges.
        if let Err(e) = crate::confine::hand_to(self.pid(), new_overlay) {
            let _ = std::fs::remove_file(new_overlay);
            return Err(VmError::RunDir {
                path: new_overlay.display().to_string(),
                source: e,
            });
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let node = format!("disk{index}-{stamp:x}");
        let added = qmp.execute(
            "blockdev-add",
            Some(serde_json::json!({
                "driver": "qcow2",
                "node-name": node,
                "file": { "driver": "file", "filename": new_overlay.to_string_lossy() },
                "backing": null,
            })),
        );
        if let Err(e) = added {
            let _ = std::fs::remove_file(new_overlay);
            return Err(e.into());
        }
        Ok(PreparedDiskSnapshot {
            top_node: top,
            frozen: PathBuf::from(file),
            overlay_node: node,
            overlay: new_overlay.to_path_buf(),
        })
    }

    /// Makes a prepared overlay the disk's top (the guest should be
    /// stopped); returns the image that is frozen from now on.
    pub fn commit_disk_snapshot(&self, p: &PreparedDiskSnapshot) -> Result<PathBuf, VmError> {
        self.qmp().execute(
            "blockdev-snapshot",
            Some(serde_json::json!({ "node": p.top_node, "overlay": p.overlay_node })),
        )?;
        Ok(p.frozen.clone())
    }

    /// Detaches and deletes a prepared overlay that was never committed.
    pub fn abandon_disk_snapshot(&self, p: PreparedDiskSnapshot) {
        let _ = self.qmp().execute(
            "blockdev-del",
            Some(serde_json::json!({ "node-name": p.overlay_node })),
        );
        let _ = std::fs::remove_file(&p.overlay);
    }
}

/// An overlay made by [`Vm::prepare_disk_snapshot`], not yet the top.
#[derive(Debug)]
pub struct PreparedDiskSnapshot {
    top_node: String,
    frozen: PathBuf,
    overlay_node: String,
    overlay: PathBuf,
}

/// QEMU's `query-block` entry of disk `index`.
fn disk_entry(qmp: &mut Qmp, index: usize) -> Result<serde_json::Value, VmError> {
    let blocks = qmp.execute("query-block", None)?;
    // `qdev` is the device id ("vd0") or its QOM path, depending on version.
    let id = format!("vd{index}");
    let path = format!("/{id}/");
    blocks
        .as_array()
        .and_then(|l| {
            l.iter().find(|b| {
                b["qdev"]
                    .as_str()
                    .is_some_and(|q| q == id || q.contains(&path))
            })
        })
        .cloned()
        .ok_or_else(|| VmError::Config(format!("the VM has no disk vd{index}")))
}

/// The top node's name and image file of a `query-block` entry.
fn top_of(entry: &serde_json::Value) -> (String, String) {
    let field = |k: &str| {
        entry["inserted"][k]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    (field("node-name"), field("file"))
}

/// The node name and file of the top of disk `vdN`'s chain.
fn top_node(qmp: &mut Qmp, index: usize) -> Result<(String, String), VmError> {
    Ok(top_of(&disk_entry(qmp, index)?))
}
