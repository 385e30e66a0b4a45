//! Guest artifacts for forkd: the Debian guest kernel (fetched with apt-get,
//! extracted under `home/kernels/`), the closure of kernel modules the guest
//! needs, the initramfs (cpio newc, agent as /init) and ext4 root disks built
//! from recipes or from a directory tree (an unpacked container image).
//! Everything is cached under the forkd home dir, keyed by a hash of its
//! inputs, and published atomically (built under `*.tmp-<pid>`, then
//! renamed) so a killed build never leaves a half artifact.
//!
//! Pure logic (ELF/.modinfo parsing, closure resolution, the cpio writer, cache
//! keys) lives apart from the plumbing that runs apt-get, dpkg-deb, mkfs.ext4
//! and mmdebstrap. This crate never boots a VM and never mounts anything; a
//! root bootstrap's own mounts stay in a mount namespace of its own, and a
//! temporary tree is only removed once nothing is mounted inside it.

mod busybox;
pub mod cache;
pub mod cpio;
mod elf;
mod error;
mod initramfs;
mod kernel;
pub mod modinfo;
pub mod modules;
pub mod mounts;
mod rootfs;
mod tools;
pub mod tree;

pub use busybox::{find_busybox, find_static_bash, parse_applet_list, parse_applet_list_full};
pub use elf::is_static_elf;
pub use error::GuestError;
pub use initramfs::{
    build_initramfs, initramfs_key, InitramfsSpec, FORMAT_VERSION, MODULE_DIR, MODULE_LIST_PATH,
};
pub use kernel::{
    bzimage_version, compare_versions, ensure_debian_kernel, kernel_from_path,
    kernel_package_from_depends, Kernel, DEBIAN_KERNEL_METAPACKAGE,
};
pub use rootfs::{
    build_rootfs, build_rootfs_from_tree, build_rootfs_with_packages, debian_image_bytes,
    rootfs_key, tree_rootfs_key, validate_package_name, RootfsRecipe, BUSYBOX_IMAGE_BYTES,
    USER_HOME, USER_NAME, USER_UID,
};

/// Modules the guest agent loads: the virtio-mmio transport and the devices
/// forkd attaches. Their dependencies are resolved by [`modules::ModuleIndex`].
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_console",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "virtio_balloon",
];
