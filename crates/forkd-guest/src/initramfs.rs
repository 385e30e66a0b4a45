//! The initramfs: the forkd agent as /init, busybox, the kernel modules the
//! agent loads (listed in load order in /etc/forkd/modules). Cached under
//! `home/initramfs/<key>.cpio`.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::busybox::parse_applet_list;
use crate::cache::{prepare_dir, publish, temp_path, KeyBuilder, TempGuard};
use crate::cpio::CpioWriter;
use crate::elf::is_static_elf;
use crate::kernel::Kernel;
use crate::modules::{canonical_module_name, ModuleIndex};
use crate::{tools, GuestError};

/// Bump when the layout written by [`build_initramfs`] changes, so cached
/// archives of the old layout are not reused.
pub const FORMAT_VERSION: u32 = 1;

/// Where the agent finds the list of modules to insmod, in order.
pub const MODULE_LIST_PATH: &str = "etc/forkd/modules";
/// Where the module files live inside the initramfs.
pub const MODULE_DIR: &str = "lib/modules";

/// Inputs of an initramfs.
#[derive(Debug, Clone, Copy)]
pub struct InitramfsSpec<'a> {
    /// Static binary; becomes /init.
    pub agent: &'a Path,
    /// Static busybox; becomes /bin/busybox with its applet links.
    pub busybox: &'a Path,
    pub kernel: &'a Kernel,
    /// Modules the guest needs (closure resolved here), e.g. [`crate::GUEST_MODULES`].
    pub modules: &'a [&'a str],
}

/// The cache key of an initramfs: every input that changes its bytes.
pub fn initramfs_key(agent: &[u8], busybox: &[u8], kernel: &Kernel, modules: &[&str]) -> String {
    let modules: Vec<String> = modules.iter().map(|m| canonical_module_name(m)).collect();
    KeyBuilder::new("forkd initramfs")
        .field("format", &FORMAT_VERSION.to_le_bytes())
        .field("agent", agent)
        .field("busybox", busybox)
        .field("kernel", kernel.version.as_bytes())
        .field(
            "modules-dir",
            kernel.modules_dir.as_os_str().as_encoded_bytes(),
        )
        .field("modules", modules.join(",").as_bytes())
        .finish()
}

/// Writes `home/initramfs/<key>.cpio` (uncompressed newc) unless it exists.
pub fn build_initramfs(home: &Path, spec: &InitramfsSpec) -> Result<PathBuf, GuestError> {
    let agent = fs::read(spec.agent).map_err(GuestError::io("read guest agent", spec.agent))?;
    if !is_static_elf(&agent) {
        return Err(GuestError::AgentNotStatic {
            path: spec.agent.to_owned(),
        });
    }
    let busybox = fs::read(spec.busybox).map_err(GuestError::io("read busybox", spec.busybox))?;
    if !is_static_elf(&busybox) {
        return Err(GuestError::BusyboxNotStatic {
            path: spec.busybox.to_owned(),
        });
    }
    let dir = home.join("initramfs");
    prepare_dir(&dir)?;
    let key = initramfs_key(&agent, &busybox, spec.kernel, spec.modules);
    let out = dir.join(format!("{key}.cpio"));
    if out.is_file() {
        return Ok(out);
    }

    let modules = if spec.kernel.has_modules() && !spec.modules.is_empty() {
        ModuleIndex::scan(&spec.kernel.modules_dir)?.closure(spec.modules)?
    } else {
        Vec::new()
    };
    let applets = parse_applet_list(&tools::busybox_list(spec.busybox, false)?);
    if applets.is_empty() {
        return Err(GuestError::NoApplets {
            path: spec.busybox.to_owned(),
        });
    }

    let tmp = temp_path(&out);
    let mut guard = TempGuard::new(tmp.clone());
    let file = File::create(&tmp).map_err(GuestError::io("create", &tmp))?;
    let write_err = GuestError::io("write initramfs", &tmp);
    let result = (|| -> std::io::Result<()> {
        let mut cpio = CpioWriter::new(BufWriter::new(file));
        for dir in [
            "dev",
            "proc",
            "sys",
            "run",
            "mnt",
            "mnt/root",
            "bin",
            "etc",
            "etc/forkd",
            MODULE_DIR,
        ] {
            cpio.dir(dir, 0o755)?;
        }
        cpio.dir("tmp", 0o1777)?;
        // The kernel opens /dev/console for PID 1 before anything is mounted.
        cpio.char_device("dev/console", 0o600, 5, 1)?;
        cpio.file("init", 0o755, &agent)?;
        cpio.file("bin/busybox", 0o755, &busybox)?;
        for applet in &applets {
            cpio.symlink(&format!("bin/{applet}"), "busybox")?;
        }
        let mut list = String::new();
        for module in &modules {
            let file_name = format!("{}.ko", module.name);
            cpio.file_from_path(&format!("{MODULE_DIR}/{file_name}"), 0o644, &module.path)?;
            list.push_str(&file_name);
            list.push('\n');
        }
        cpio.file(MODULE_LIST_PATH, 0o644, list.as_bytes())?;
        cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
        cpio.file("etc/group", 0o644, b"root:x:0:\n")?;
        cpio.finish()?.into_inner().map_err(|e| e.into_error())?;
        Ok(())
    })();
    result.map_err(write_err)?;
    publish(&tmp, &out)?;
    guard.disarm();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_key_follows_every_input() {
        let kernel = Kernel {
            version: "6.1.0-56-cloud-amd64".into(),
            vmlinuz: "/k/vmlinuz".into(),
            modules_dir: "/k/lib/modules/6.1.0-56-cloud-amd64".into(),
        };
        let base = initramfs_key(b"agent", b"bb", &kernel, &["virtio_blk"]);
        assert_eq!(
            base,
            initramfs_key(b"agent", b"bb", &kernel, &["virtio-blk"])
        );
        assert_ne!(
            base,
            initramfs_key(b"agent2", b"bb", &kernel, &["virtio_blk"])
        );
        assert_ne!(
            base,
            initramfs_key(b"agent", b"bb2", &kernel, &["virtio_blk"])
        );
        assert_ne!(
            base,
            initramfs_key(b"agent", b"bb", &kernel, &["virtio_blk", "virtio_net"])
        );
        let newer = Kernel {
            version: "6.1.0-57-cloud-amd64".into(),
            ..kernel.clone()
        };
        assert_ne!(
            base,
            initramfs_key(b"agent", b"bb", &newer, &["virtio_blk"])
        );
    }
}
