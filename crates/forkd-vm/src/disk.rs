//! Disk images: per-VM qcow2 overlays on read-only bases, made with `qemu-img`.

use std::path::Path;
use std::process::Command;

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
