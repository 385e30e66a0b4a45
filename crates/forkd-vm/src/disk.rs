//! Disk images: per-VM qcow2 overlays on read-only bases (made with
//! `qemu-img`), their backing chains (read from the qcow2 header) and
//! rebasing, and freezing a running VM's disk so that a snapshot can keep
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

/// The qcow2 magic, `QFI\xfb`.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Longest backing file name qcow2 allows.
const MAX_BACKING_NAME: u32 = 1023;
/// Longest backing chain followed before giving up (a loop, or nonsense).
const MAX_CHAIN: usize = 256;

/// Where a qcow2 header says its backing file name is: `(offset, length)`,
/// or `None` for an image without one. `Err` when `header` (the first 20
/// bytes or more of the file) is not a qcow2 header.
pub fn backing_name_location(header: &[u8]) -> Result<Option<(u64, u32)>, String> {
    if header.len() < 20 || header[..4] != QCOW2_MAGIC {
        return Err("not a qcow2 image".into());
    }
    let version = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
    if !(2..=3).contains(&version) {
        return Err(format!("qcow2 version {version} is not 2 or 3"));
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    if len > MAX_BACKING_NAME {
        return Err(format!("a backing file name of {len} bytes"));
    }
    Ok(Some((offset, len)))
}

/// Whether `path` is a qcow2 image (by its magic).
pub fn is_qcow2(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| magic == QCOW2_MAGIC)
}

/// The format qemu-img is told a file has: `qcow2` by its magic, else `raw`
/// (what forkd's base images are).
pub fn format_of(path: &Path) -> &'static str {
    if is_qcow2(path) {
        "qcow2"
    } else {
        "raw"
    }
}

/// The backing file qcow2 image `image` names (resolved against its
/// directory when relative), or `None`. Reads only the header.
pub fn backing_file(image: &Path) -> Result<Option<PathBuf>, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
    let mut header = [0u8; 20];
    f.read_exact_at(&mut header, 0)
        .map_err(|e| format!("{}: {e}", image.display()))?;
    let Some((offset, len)) =
        backing_name_location(&header).map_err(|e| format!("{}: {e}", image.display()))?
    else {
        return Ok(None);
    };
    let mut name = vec![0u8; len as usize];
    f.read_exact_at(&mut name, offset)
        .map_err(|e| format!("{}: reading its backing file name: {e}", image.display()))?;
    let name =
        PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(name));
    Ok(Some(match image.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    }))
}

/// The files below `image` in its backing chain, nearest first, as far as
/// they are qcow2 (a raw base ends the chain and is its last element). A
/// file that is missing ends it too, so that the caller sees which.
pub fn backing_chain(image: &Path) -> Result<Vec<PathBuf>, String> {
    let mut chain: Vec<PathBuf> = Vec::new();
    let mut next = backing_file(image)?;
    while let Some(b) = next {
        if chain.len() >= MAX_CHAIN || chain.contains(&b) {
            return Err(format!(
                "{}: its backing chain loops or is deeper than {MAX_CHAIN}",
                image.display()
            ));
        }
        chain.push(b.clone());
        next = if b.exists() && is_qcow2(&b) {
            backing_file(&b)?
        } else {
            None
        };
    }
    Ok(chain)
}

/// Makes qcow2 `image` name `new_backing` (of format `backing_format`) as
/// its backing file. With `copy_differences` (qemu-img's safe mode), every
/// cluster where the old backing chain and the new one differ is copied
/// into `image` first, so that its contents stay the same: the old chain
/// must still be readable. Without, only the header changes: right only
/// when the new backing holds the same data as the old.
pub fn rebase(
    image: &Path,
    new_backing: &Path,
    backing_format: &str,
    copy_differences: bool,
) -> Result<(), String> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["rebase", "-q", "-f", "qcow2", "-F", backing_format]);
    if !copy_differences {
        cmd.arg("-u");
    }
    let out = cmd
        .arg("-b")
        .arg(new_backing)
        .arg(image)
        .output()
        .map_err(|e| {
            format!("cannot run qemu-img ({e}): install it with `apt-get install qemu-utils`")
        })?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img rebase {} onto {} failed: {}",
            image.display(),
            new_backing.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Makes qcow2 `image` the only qcow2 file of its chain, with the same
/// contents: what the qcow2 files below it hold is copied into it
/// (qemu-img's safe rebase, which needs them readable) and it is backed by
/// the raw base image at the bottom directly, or by nothing when there is
/// none. Returns whether anything changed.
pub fn collapse(image: &Path) -> Result<bool, String> {
    let chain = backing_chain(image)?;
    let base = chain.last().filter(|b| b.exists() && !is_qcow2(b));
    match base {
        Some(_) if chain.len() == 1 => Ok(false),
        Some(base) => rebase(image, base, "raw", true).map(|()| true),
        None if chain.is_empty() => Ok(false),
        None => {
            // `-b ""`: standalone; safe mode copies everything the chain held.
            let out = Command::new("qemu-img")
                .args(["rebase", "-q", "-f", "qcow2", "-b", ""])
                .arg(image)
                .output()
                .map_err(|e| {
                    format!(
                        "cannot run qemu-img ({e}): install it with `apt-get install qemu-utils`"
                    )
                })?;
            if !out.status.success() {
                return Err(format!(
                    "qemu-img rebase {} onto nothing failed: {}",
                    image.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(true)
        }
    }
}

/// Whether disks `a` and `b` (any formats, through their backing chains)
/// read the same, as `qemu-img compare` says (unallocated reads as zeros).
pub fn same_contents(a: &Path, b: &Path) -> Result<bool, String> {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .map_err(|e| {
            format!("cannot run qemu-img ({e}): install it with `apt-get install qemu-utils`")
        })?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(format!(
            "qemu-img compare {} {} failed: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, offset: u64, len: u32) -> Vec<u8> {
        let mut h = QCOW2_MAGIC.to_vec();
        h.extend(version.to_be_bytes());
        h.extend(offset.to_be_bytes());
        h.extend(len.to_be_bytes());
        h
    }

    #[test]
    fn the_backing_name_is_located_in_the_header() {
        assert_eq!(
            backing_name_location(&header(3, 0x200, 12)),
            Ok(Some((0x200, 12)))
        );
        assert_eq!(backing_name_location(&header(2, 0, 0)), Ok(None));
        assert!(backing_name_location(&header(4, 0x200, 12)).is_err());
        assert!(backing_name_location(&header(3, 0x200, 5000)).is_err());
        assert!(backing_name_location(b"QFI").is_err());
        assert!(backing_name_location(&[0u8; 64]).is_err());
    }

    #[test]
    fn chains_are_followed_and_rebased_with_qemu_img() {
        let tmp = std::env::temp_dir().join(format!("forkd-disk-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let base = tmp.join("base.raw");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let (a, b, c) = (
            tmp.join("a.qcow2"),
            tmp.join("b.qcow2"),
            tmp.join("c.qcow2"),
        );
        create_overlay(&base, "raw", &a).unwrap();
        create_overlay(&a, "qcow2", &b).unwrap();
        create_overlay(&b, "qcow2", &c).unwrap();
        assert_eq!(backing_file(&a).unwrap(), Some(base.clone()));
        assert_eq!(
            backing_chain(&c).unwrap(),
            [b.clone(), a.clone(), base.clone()]
        );
        assert!(is_qcow2(&c) && !is_qcow2(&base));
        // Safe mode: c keeps its contents on a's chain without b.
        rebase(&c, &a, "qcow2", true).unwrap();
        assert_eq!(backing_chain(&c).unwrap(), [a.clone(), base.clone()]);
        std::fs::remove_file(&a).unwrap();
        assert_eq!(backing_chain(&c).unwrap(), std::slice::from_ref(&a));
        assert!(backing_file(&base).is_err());
        let _ = std::fs::remove_dir_all(&tmp);
    }

    /// Writes `pattern` at `offset` (64 KiB) through qemu-io.
    fn write_pattern(image: &Path, pattern: u8, offset: u64) {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P {pattern} {offset} 64k"))
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn a_chain_collapses_into_one_layer_with_the_same_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.raw");
        let mut bytes = vec![0u8; 4 << 20];
        bytes[..4096].fill(0x5a);
        std::fs::write(&base, &bytes).unwrap();
        let (a, b, c) = (
            tmp.path().join("a.qcow2"),
            tmp.path().join("b.qcow2"),
            tmp.path().join("c.qcow2"),
        );
        create_overlay(&base, "raw", &a).unwrap();
        write_pattern(&a, 1, 0);
        write_pattern(&a, 2, 1 << 20);
        create_overlay(&a, "qcow2", &b).unwrap();
        write_pattern(&b, 3, 1 << 20);
        write_pattern(&b, 4, 2 << 20);
        create_overlay(&b, "qcow2", &c).unwrap();
        write_pattern(&c, 5, 3 << 20);
        let flat = tmp.path().join("flat.qcow2");
        std::fs::copy(&c, &flat).unwrap();
        assert!(collapse(&flat).unwrap());
        assert_eq!(backing_chain(&flat).unwrap(), std::slice::from_ref(&base));
        assert!(same_contents(&c, &flat).unwrap());
        assert!(!collapse(&flat).unwrap(), "already one layer");
        // Without a raw base: standalone.
        let alone = tmp.path().join("alone.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&alone)
            .arg("4M")
            .output()
            .unwrap();
        assert!(out.status.success());
        write_pattern(&alone, 7, 0);
        let top = tmp.path().join("top.qcow2");
        create_overlay(&alone, "qcow2", &top).unwrap();
        write_pattern(&top, 8, 1 << 20);
        let copy = tmp.path().join("copy.qcow2");
        std::fs::copy(&top, &copy).unwrap();
        assert!(collapse(&copy).unwrap());
        assert!(backing_chain(&copy).unwrap().is_empty());
        assert!(same_contents(&top, &copy).unwrap());
        // A test that can fail: different contents are told apart.
        write_pattern(&copy, 9, 0);
        assert!(!same_contents(&top, &copy).unwrap());
    }
}
