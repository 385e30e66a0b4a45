//! The one error type of this crate. Every message names the thing that went
//! wrong and, where there is one, the fix.

use std::path::PathBuf;

/// Everything that can go wrong while fetching or building guest artifacts.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("{tool} not found: install it with `apt-get install {package}`")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },

    #[error("`{command}` failed ({status}): {output}")]
    ToolFailed {
        command: String,
        status: String,
        output: String,
    },

    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} is not a usable ELF file: {reason}")]
    InvalidElf { what: String, reason: String },

    #[error("kernel module `{name}`{} is neither a .ko file nor built into the kernel: pass a kernel whose modules dir has it, or drop it from the module list", needed_by.as_ref().map(|n| format!(" (needed by `{n}`)")).unwrap_or_default())]
    UnknownModule {
        name: String,
        needed_by: Option<String>,
    },

    #[error("kernel module {} is compressed; forkd loads plain .ko files: decompress the modules dir (e.g. `find DIR -name '*.ko.*' -exec unxz {{}} +` or `zstd -d --rm`) or use the Debian cloud kernel", path.display())]
    CompressedModule { path: PathBuf },

    #[error("kernel modules depend on each other in a cycle ({}): the modules dir is inconsistent, re-extract the kernel", cycle.join(" -> "))]
    ModuleCycle { cycle: Vec<String> },

    #[error("cannot resolve the Debian kernel package: {reason}; check `apt-cache depends linux-image-cloud-amd64` and `apt-get update`")]
    KernelPackage { reason: String },

    #[error("kernel image {} does not exist or is not a file: pass the path of a bzImage/vmlinuz", path.display())]
    KernelMissing { path: PathBuf },

    #[error("kernel modules dir {} is not a directory: pass the `lib/modules/<version>` dir that matches the kernel", path.display())]
    ModulesDirMissing { path: PathBuf },

    #[error(
        "busybox not found in /bin or /usr/bin: install it with `apt-get install busybox-static`"
    )]
    BusyboxMissing,

    #[error("{} is not a static executable; the guest needs a static busybox: install it with `apt-get install busybox-static`", path.display())]
    BusyboxNotStatic { path: PathBuf },

    #[error("a static bash was not found in /bin or /usr/bin; the busybox image carries it as /bin/bash: install it with `apt-get install bash-static`")]
    BashMissing,

    #[error("guest agent {} is not a static executable; it runs as /init with no libraries: build it for a static target (e.g. `--target x86_64-unknown-linux-musl`)", path.display())]
    AgentNotStatic { path: PathBuf },

    #[error("building the {recipe} root image needs root (the bootstrap creates device nodes and root-owned files): rerun as root")]
    NotRoot { recipe: String },

    #[error("unknown rootfs recipe `{name}`: use `busybox` or `debian-python`")]
    UnknownRecipe { name: String },

    #[error("busybox at {} listed no usable applets: check that it runs (`busybox --list`)", path.display())]
    NoApplets { path: PathBuf },

    #[error("{} is not a directory: a root image is built from a directory holding the guest's root tree", path.display())]
    NotADirectory { path: PathBuf },

    #[error("{} nests more than 256 directories deep: not a root tree", path.display())]
    TreeTooDeep { path: PathBuf },

    #[error("copying {} into the staging tree failed: {stderr}", path.display())]
    CopyTree { path: PathBuf, stderr: String },

    #[error("{name:?} is not a Debian package name (lower-case letters, digits and `+-.`, starting with a letter or digit)")]
    BadPackageName { name: String },

    #[error("left {} in place: {} is still mounted inside it and could not be unmounted (as root: `umount -l {}`); removing the tree would reach into that mount", tree.display(), mount.display(), mount.display())]
    MountedInside { tree: PathBuf, mount: PathBuf },

    #[error(
        "extra packages need the debian-python image; the {recipe} image has no package manager"
    )]
    PackagesNeedDebian { recipe: String },
}

impl GuestError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| GuestError::Io {
            action,
            path,
            source,
        }
    }
}
