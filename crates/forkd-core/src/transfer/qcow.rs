//! The two things a transfer needs from `qemu-img`: the backing chain of a
//! stored disk (what it is layered on, down to the base image), and
//! rewriting a pulled disk's header to name its backing file on this host
//! (`rebase -u`: header only, no data moves).

use std::path::{Path, PathBuf};
use std::process::Command;

/// One file of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub path: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
}

/// `image` and the files below it, top first.
pub fn chain(image: &Path) -> Result<Vec<Layer>, String> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "--backing-chain", "-U"])
        .arg(image)
        .output()
        .map_err(|e| format!("running qemu-img info on {}: {e}", image.display()))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img info {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_chain(&out.stdout).map_err(|e| format!("qemu-img info {}: {e}", image.display()))
}

/// Parses `qemu-img info --output=json --backing-chain` (an array, or one
/// object when the image has no backing file).
fn parse_chain(json: &[u8]) -> Result<Vec<Layer>, String> {
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let items = match value {
        serde_json::Value::Array(items) => items,
        one @ serde_json::Value::Object(_) => vec![one],
        _ => return Err("unexpected output".into()),
    };
    items
        .iter()
        .map(|item| {
            let path = item["filename"]
                .as_str()
                .ok_or("an entry without filename")?;
            let format = item["format"].as_str().ok_or("an entry without format")?;
            Ok(Layer {
                path: PathBuf::from(path),
                format: format.to_owned(),
            })
        })
        .collect()
}

/// Makes qcow2 `image` name `backing` (of `format`) as its backing file,
/// changing only the header.
pub fn rebase_header(image: &Path, backing: &Path, format: &str) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", format, "-b"])
        .arg(backing)
        .arg(image)
        .output()
        .map_err(|e| format!("running qemu-img rebase on {}: {e}", image.display()))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img rebase {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_parse_from_qemu_img_output() {
        let two =
            br#"[{"filename":"/s/kid/disk.qcow2","format":"qcow2","backing-filename":"/b.ext4"},
                       {"filename":"/b.ext4","format":"raw"}]"#;
        let c = parse_chain(two).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].path, PathBuf::from("/b.ext4"));
        assert_eq!(c[1].format, "raw");
        assert_eq!(
            parse_chain(br#"{"filename":"/a","format":"raw"}"#).unwrap()[0].format,
            "raw"
        );
        assert!(parse_chain(b"[{}]").is_err());
        assert!(parse_chain(b"7").is_err());
    }

    #[test]
    fn a_real_overlay_reports_its_chain_and_can_be_rebased() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let top = dir.path().join("top.qcow2");
        forkd_vm::disk::create_overlay(&base, "raw", &top).unwrap();
        let c = chain(&top).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].path, base);
        let moved = dir.path().join("moved.img");
        std::fs::rename(&base, &moved).unwrap();
        rebase_header(&top, &moved, "raw").unwrap();
        assert_eq!(chain(&top).unwrap()[1].path, moved);
    }
}
