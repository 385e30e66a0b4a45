//! Root disk images (raw ext4), built from a recipe into a staging dir and
//! turned into an image with `mkfs.ext4 -d` (no mount, no loop device).
//! Cached under `home/images/<recipe>-<key>.ext4`.
//!
//! Both recipes carry `/bin/bash` (E2B's SDK runs commands as `/bin/bash -l
//! -c`: the busybox image gets the host's static bash, Debian has its own)
//! and an unprivileged account `user` (uid 1000, home `/home/user`), the
//! account E2B templates run as; commands still run as root unless a request
//! names a user.

use std::fmt;
use std::fs::{self, File};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::busybox::{find_static_bash, parse_applet_list, parse_applet_list_full};
use crate::cache::{prepare_dir, publish, temp_path, KeyBuilder, TempGuard};
use crate::elf::is_static_elf;
use crate::tools::{self, DEBOOTSTRAP, MKFS_EXT4, MMDEBSTRAP};
use crate::GuestError;

const MIB: u64 = 1024 * 1024;
/// Size of the busybox image: small, but room for the guest to write.
pub const BUSYBOX_IMAGE_BYTES: u64 = 64 * MIB;
/// Bump when what a recipe puts into its image changes.
/// 2: /bin/bash (static) and the `user` account.
const BUSYBOX_RECIPE_VERSION: u32 = 2;
/// 2: the `user` account.
const DEBIAN_PYTHON_RECIPE_VERSION: u32 = 2;
/// The unprivileged account every recipe image has.
pub const USER_NAME: &str = "user";
pub const USER_UID: u32 = 1000;
pub const USER_HOME: &str = "/home/user";
const DEBIAN_SUITE: &str = "bookworm";
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
const DEBIAN_INCLUDE: &str = "python3";
/// The DNS server of the sandbox's network gateway (slirp's address, kept).
const NAMESERVER: &str = "10.0.2.3";

/// What goes into a root image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RootfsRecipe {
    /// busybox and a minimal /etc; 64 MiB; builds in about a second.
    Busybox,
    /// Debian bookworm minbase with python3, bootstrapped with mmdebstrap (or
    /// debootstrap); needs root and network; minutes.
    DebianPython,
}

impl RootfsRecipe {
    pub const ALL: [RootfsRecipe; 2] = [RootfsRecipe::Busybox, RootfsRecipe::DebianPython];

    pub fn name(self) -> &'static str {
        match self {
            RootfsRecipe::Busybox => "busybox",
            RootfsRecipe::DebianPython => "debian-python",
        }
    }
}

impl fmt::Display for RootfsRecipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RootfsRecipe {
    type Err = GuestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RootfsRecipe::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| GuestError::UnknownRecipe { name: s.to_owned() })
    }
}

/// The cache key of a root image of `recipe`; `busybox` and `bash` are the
/// static busybox's and bash's bytes (part of the busybox recipe only).
pub fn rootfs_key(recipe: RootfsRecipe, busybox: &[u8], bash: &[u8]) -> String {
    rootfs_key_with(recipe, busybox, bash, &[])
}

/// [`rootfs_key`] of an image with extra Debian `packages` (sorted and
/// deduplicated by the caller); no packages gives the plain recipe's key.
fn rootfs_key_with(
    recipe: RootfsRecipe,
    busybox: &[u8],
    bash: &[u8],
    packages: &[String],
) -> String {
    let mut key = KeyBuilder::new("forkd rootfs");
    key.field("recipe", recipe.name().as_bytes());
    match recipe {
        RootfsRecipe::Busybox => key
            .field("version", &BUSYBOX_RECIPE_VERSION.to_le_bytes())
            .field("size", &BUSYBOX_IMAGE_BYTES.to_le_bytes())
            .field("busybox", busybox)
            .field("bash", bash),
        RootfsRecipe::DebianPython => key
            .field("version", &DEBIAN_PYTHON_RECIPE_VERSION.to_le_bytes())
            .field("suite", DEBIAN_SUITE.as_bytes())
            .field("mirror", DEBIAN_MIRROR.as_bytes())
            .field("include", DEBIAN_INCLUDE.as_bytes()),
    };
    if !packages.is_empty() {
        key.field("packages", packages.join(",").as_bytes());
    }
    key.finish()
}

/// Writes `home/images/<recipe>-<key>.ext4` unless it exists; returns its path.
pub fn build_rootfs(
    home: &Path,
    recipe: RootfsRecipe,
    busybox: &Path,
    log: &dyn Fn(&str),
) -> Result<PathBuf, GuestError> {
    build_rootfs_with_packages(home, recipe, busybox, &[], log)
}

/// Checks one Debian package name (Debian policy 5.6.1: lower-case letters,
/// digits, `+`, `-` and `.`, at least two characters, starting with a letter
/// or digit), so that nothing else reaches the bootstrap's command line.
pub fn validate_package_name(name: &str) -> Result<(), GuestError> {
    let ok = name.len() >= 2
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(GuestError::BadPackageName { name: name.into() })
    }
}

/// [`build_rootfs`] with extra Debian `packages` installed (debian-python
/// only); the image's cache key includes them, so each package set is its
/// own image.
pub fn build_rootfs_with_packages(
    home: &Path,
    recipe: RootfsRecipe,
    busybox: &Path,
    packages: &[String],
    log: &dyn Fn(&str),
) -> Result<PathBuf, GuestError> {
    let mut packages = packages.to_vec();
    packages.sort();
    packages.dedup();
    for p in &packages {
        validate_package_name(p)?;
    }
    if !packages.is_empty() && recipe != RootfsRecipe::DebianPython {
        return Err(GuestError::PackagesNeedDebian {
            recipe: recipe.to_string(),
        });
    }
    let (busybox_bytes, bash) = match recipe {
        RootfsRecipe::Busybox => {
            let bytes = fs::read(busybox).map_err(GuestError::io("read busybox", busybox))?;
            if !is_static_elf(&bytes) {
                return Err(GuestError::BusyboxNotStatic {
                    path: busybox.to_owned(),
                });
            }
            let bash = find_static_bash()?;
            let bash_bytes = fs::read(&bash).map_err(GuestError::io("read bash", &bash))?;
            (bytes, Some((bash, bash_bytes)))
        }
        RootfsRecipe::DebianPython => (Vec::new(), None),
    };
    let images = home.join("images");
    prepare_dir(&images)?;
    let bash_bytes = bash.as_ref().map_or(&[][..], |(_, b)| b.as_slice());
    let out = images.join(format!(
        "{recipe}-{}.ext4",
        rootfs_key_with(recipe, &busybox_bytes, bash_bytes, &packages)
    ));
    if out.is_file() {
        return Ok(out);
    }
    if recipe == RootfsRecipe::DebianPython && !tools::is_root() {
        return Err(GuestError::NotRoot {
            recipe: recipe.to_string(),
        });
    }

    let staging = {
        let mut name = temp_path(&out).into_os_string();
        name.push(".d");
        PathBuf::from(name)
    };
    let _staging_guard = TempGuard::new(staging.clone());
    let size = match recipe {
        RootfsRecipe::Busybox => {
            log("populating busybox root tree");
            populate_busybox(&staging, busybox)?;
            if let Some((bash, _)) = &bash {
                let target = staging.join("bin/bash");
                fs::copy(bash, &target).map_err(GuestError::io("copy bash to", &target))?;
                fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
                    .map_err(GuestError::io("chmod", &target))?;
            }
            add_user(&staging, "/bin/bash")?;
            BUSYBOX_IMAGE_BYTES
        }
        RootfsRecipe::DebianPython => {
            bootstrap_debian(&staging, &packages, log)?;
            write_etc(&staging, false)?;
            add_user(&staging, "/bin/bash")?;
            let content = tree_bytes(&staging)?;
            let size = debian_image_bytes(content);
            log(&format!(
                "root tree holds {} MiB; image will be {} MiB",
                content / MIB,
                size / MIB
            ));
            size
        }
    };

    let tmp = temp_path(&out);
    let mut image_guard = TempGuard::new(tmp.clone());
    File::create(&tmp)
        .and_then(|f| f.set_len(size))
        .map_err(GuestError::io("create sparse image", &tmp))?;
    log(&format!("writing ext4 image {}", out.display()));
    tools::run(
        MKFS_EXT4
            .command()?
            .args(["-q", "-F", "-L", "forkd-root", "-E", "root_owner=0:0", "-d"])
            .arg(&staging)
            .arg(&tmp),
    )?;
    publish(&tmp, &out)?;
    image_guard.disarm();
    Ok(out)
}

/// Bump when what [`build_rootfs_from_tree`] adds to a tree changes.
const TREE_RECIPE_VERSION: u32 = 1;
/// Mount points the agent mounts kernel filesystems on inside the root.
const MOUNT_POINTS: [(&str, u32); 5] = [
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("tmp", 0o1777),
    ("run", 0o755),
];

/// The cache key of a root image built from a tree whose own key is
/// `source_key` (e.g. a container image's manifest digest).
pub fn tree_rootfs_key(source_key: &str) -> String {
    KeyBuilder::new("forkd rootfs from tree")
        .field("version", &TREE_RECIPE_VERSION.to_le_bytes())
        .field("source", source_key.as_bytes())
        .finish()
}

/// Writes `home/images/tree-<key>.ext4` from the directory `tree` (e.g. an
/// unpacked container image) unless it exists; returns its path. `source_key`
/// identifies the tree's content (a container image's manifest digest) and
/// keys the cache.
///
/// forkd's own pieces are added to the tree first: the mount points the
/// agent uses (`proc`, `sys`, `dev`, `tmp`, `run`), `/etc/hostname`,
/// `/etc/hosts` and `/etc/resolv.conf`, and a root entry in `/etc/passwd`
/// and `/etc/group` when the tree has none. The tree is untrusted: a symlink
/// or a non-directory where one of these goes is replaced, never written
/// through. Ownership, modes, hard links and xattrs of the tree are kept by
/// `mkfs.ext4 -d`, so the caller builds the tree as root to keep owners.
pub fn build_rootfs_from_tree(
    home: &Path,
    tree: &Path,
    source_key: &str,
    log: &dyn Fn(&str),
) -> Result<PathBuf, GuestError> {
    let images = home.join("images");
    prepare_dir(&images)?;
    let out = crate::tree::staged_image_path(home, source_key);
    if out.is_file() {
        return Ok(out);
    }
    add_forkd_files(tree)?;
    let content = tree_bytes(tree)?;
    let size = debian_image_bytes(content);
    log(&format!(
        "root tree holds {} MiB; image will be {} MiB",
        content / MIB,
        size / MIB
    ));
    let tmp = temp_path(&out);
    let mut image_guard = TempGuard::new(tmp.clone());
    File::create(&tmp)
        .and_then(|f| f.set_len(size))
        .map_err(GuestError::io("create sparse image", &tmp))?;
    log(&format!("writing ext4 image {}", out.display()));
    tools::run(
        MKFS_EXT4
            .command()?
            .args(["-q", "-F", "-L", "forkd-root", "-E", "root_owner=0:0", "-d"])
            .arg(tree)
            .arg(&tmp),
    )?;
    publish(&tmp, &out)?;
    image_guard.disarm();
    Ok(out)
}

/// Makes `path` a real directory with `mode`, removing a symlink or file there.
fn replace_with_dir(path: &Path, mode: u32) -> Result<(), GuestError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(path).map_err(GuestError::io("remove", path))?,
        Err(_) => {}
    }
    mkdir(path, mode)
}

/// Writes `data` to a new file at `path`, removing whatever was there first.
fn replace_file(path: &Path, mode: u32, data: &[u8]) -> Result<(), GuestError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            fs::remove_dir_all(path).map_err(GuestError::io("remove", path))?
        }
        Ok(_) => fs::remove_file(path).map_err(GuestError::io("remove", path))?,
        Err(_) => {}
    }
    write_file(path, mode, data)
}

fn add_forkd_files(tree: &Path) -> Result<(), GuestError> {
    for (dir, mode) in MOUNT_POINTS {
        replace_with_dir(&tree.join(dir), mode)?;
    }
    let etc = tree.join("etc");
    replace_with_dir(&etc, 0o755)?;
    replace_file(&etc.join("hostname"), 0o644, b"forkd\n")?;
    replace_file(
        &etc.join("hosts"),
        0o644,
        b"127.0.0.1\tlocalhost forkd\n::1\tlocalhost\n",
    )?;
    replace_file(
        &etc.join("resolv.conf"),
        0o644,
        format!("nameserver {NAMESERVER}\n").as_bytes(),
    )?;
    for (name, line) in [
        ("passwd", &b"root:x:0:0:root:/root:/bin/sh\n"[..]),
        ("group", &b"root:x:0:\n"[..]),
    ] {
        let path = etc.join(name);
        if fs::symlink_metadata(&path).is_err() {
            write_file(&path, 0o644, line)?;
        }
    }
    Ok(())
}

/// Adds the account [`USER_NAME`] (uid and gid [`USER_UID`]) to the tree's
/// `/etc/passwd` and `/etc/group` unless it is there, and its home
/// directory, owned by it.
fn add_user(root: &Path, shell: &str) -> Result<(), GuestError> {
    let etc = root.join("etc");
    let passwd_line = format!("{USER_NAME}:x:{USER_UID}:{USER_UID}::{USER_HOME}:{shell}\n");
    let group_line = format!("{USER_NAME}:x:{USER_UID}:\n");
    for (name, line) in [("passwd", passwd_line), ("group", group_line)] {
        let path = etc.join(name);
        let mut text = fs::read_to_string(&path).unwrap_or_default();
        if text.lines().any(|l| l.split(':').next() == Some(USER_NAME)) {
            continue;
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&line);
        write_file(&path, 0o644, text.as_bytes())?;
    }
    let home = root.join(USER_HOME.trim_start_matches('/'));
    mkdir(&home, 0o755)?;
    // mkfs.ext4 -d keeps the tree's owners; building as root (as the
    // recipes require for Debian) makes it the user's.
    if tools::is_root() {
        std::os::unix::fs::chown(&home, Some(USER_UID), Some(USER_UID))
            .map_err(GuestError::io("chown", &home))?;
    }
    Ok(())
}

/// Image size for a tree of `content` bytes: 30% slack plus 64 MiB headroom,
/// rounded up to a MiB.
pub fn debian_image_bytes(content: u64) -> u64 {
    let size = content + content.div_ceil(10) * 3 + 64 * MIB;
    size.div_ceil(MIB) * MIB
}

/// Bytes the tree takes as ext4 would store it: each inode rounded to 4 KiB.
fn tree_bytes(root: &Path) -> Result<u64, GuestError> {
    let mut total = 0u64;
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(GuestError::io("read dir", &dir))? {
            let entry = entry.map_err(GuestError::io("read dir", &dir))?;
            let meta = entry
                .path()
                .symlink_metadata()
                .map_err(GuestError::io("stat", entry.path()))?;
            total += meta.len().div_ceil(4096).max(1) * 4096;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(total)
}

fn mkdir(path: &Path, mode: u32) -> Result<(), GuestError> {
    fs::create_dir_all(path).map_err(GuestError::io("create dir", path))?;
    // Set explicitly: create_dir honours the umask and cannot set the sticky bit.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(GuestError::io("chmod", path))
}

fn write_file(path: &Path, mode: u32, data: &[u8]) -> Result<(), GuestError> {
    fs::write(path, data).map_err(GuestError::io("write", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(GuestError::io("chmod", path))
}

/// /etc files forkd relies on; `all` also writes passwd/group (busybox has none).
fn write_etc(root: &Path, all: bool) -> Result<(), GuestError> {
    let etc = root.join("etc");
    mkdir(&etc, 0o755)?;
    if all {
        write_file(
            &etc.join("passwd"),
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\n",
        )?;
        write_file(&etc.join("group"), 0o644, b"root:x:0:\n")?;
    }
    write_file(&etc.join("hostname"), 0o644, b"forkd\n")?;
    write_file(
        &etc.join("hosts"),
        0o644,
        b"127.0.0.1\tlocalhost forkd\n::1\tlocalhost\n",
    )?;
    let resolv = etc.join("resolv.conf");
    // mmdebstrap may leave a symlink here; replace it, never write through it.
    let _ = fs::remove_file(&resolv);
    write_file(
        &resolv,
        0o644,
        format!("nameserver {NAMESERVER}\n").as_bytes(),
    )
}

fn populate_busybox(root: &Path, busybox: &Path) -> Result<(), GuestError> {
    mkdir(root, 0o755)?;
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "root", "proc", "sys", "dev", "run", "mnt",
    ] {
        mkdir(&root.join(dir), if dir == "root" { 0o700 } else { 0o755 })?;
    }
    mkdir(&root.join("tmp"), 0o1777)?;
    let target = root.join("bin/busybox");
    fs::copy(busybox, &target).map_err(GuestError::io("copy busybox to", &target))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
        .map_err(GuestError::io("chmod", &target))?;

    let mut links = tools::busybox_list(busybox, true)
        .map(|text| parse_applet_list_full(&text))
        .unwrap_or_default();
    if links.is_empty() {
        // Older busybox without --list-full: everything in /bin.
        let names = parse_applet_list(&tools::busybox_list(busybox, false)?);
        links = names
            .into_iter()
            .map(|n| (format!("bin/{n}"), "busybox".to_owned()))
            .collect();
    }
    if links.is_empty() {
        return Err(GuestError::NoApplets {
            path: busybox.to_owned(),
        });
    }
    for (path, target) in links {
        let link = root.join(&path);
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(GuestError::io("create dir", parent))?;
        }
        symlink(&target, &link).map_err(GuestError::io("create symlink", &link))?;
    }
    write_etc(root, true)
}

fn bootstrap_debian(
    root: &Path,
    packages: &[String],
    log: &dyn Fn(&str),
) -> Result<(), GuestError> {
    // Prefer mmdebstrap (faster); fall back to debootstrap; name mmdebstrap
    // in the fix when neither is there.
    let (tool, mut cmd) = match (MMDEBSTRAP.command(), DEBOOTSTRAP.command()) {
        (Ok(cmd), _) => (MMDEBSTRAP, cmd),
        (Err(_), Ok(cmd)) => (DEBOOTSTRAP, cmd),
        (Err(missing), Err(_)) => return Err(missing),
    };
    let include = debian_include(packages);
    log(&format!(
        "bootstrapping Debian {DEBIAN_SUITE} (minbase + {include}) with {}; this takes minutes",
        tool.program
    ));
    cmd.arg("--variant=minbase")
        .arg(format!("--include={include}"))
        .arg(DEBIAN_SUITE)
        .arg(root)
        .arg(DEBIAN_MIRROR);
    tools::confine_mounts(&mut cmd);
    tools::run_logged(&mut cmd, tool.program, log)
}

/// The bootstrap's `--include` list: python3 and the extra packages.
fn debian_include(packages: &[String]) -> String {
    std::iter::once(DEBIAN_INCLUDE)
        .chain(packages.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_checked_and_make_their_own_image() {
        for good in ["git", "python3-numpy", "g++", "libc6.1", "0ad"] {
            validate_package_name(good).unwrap();
        }
        for bad in [
            "",
            "x",
            "Git",
            "-rf",
            "a b",
            "a,b",
            "--include=x",
            "a;b",
            "a/b",
        ] {
            let err = validate_package_name(bad).unwrap_err().to_string();
            assert!(err.contains("Debian package name"), "{bad}: {err}");
        }
        let plain = rootfs_key(RootfsRecipe::DebianPython, b"", b"");
        assert_eq!(
            plain,
            rootfs_key_with(RootfsRecipe::DebianPython, b"", b"", &[])
        );
        let git = rootfs_key_with(RootfsRecipe::DebianPython, b"", b"", &["git".into()]);
        assert_ne!(plain, git);
        assert_eq!(
            debian_include(&["curl".into(), "git".into()]),
            "python3,curl,git"
        );
        let err = build_rootfs_with_packages(
            Path::new("/nonexistent"),
            RootfsRecipe::Busybox,
            Path::new("/bin/busybox"),
            &["git".into()],
            &|_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("need the debian-python image"), "{err}");
    }

    #[test]
    fn recipe_names_round_trip() {
        for recipe in RootfsRecipe::ALL {
            assert_eq!(recipe.to_string().parse::<RootfsRecipe>().unwrap(), recipe);
        }
        let err = "alpine".parse::<RootfsRecipe>().unwrap_err().to_string();
        assert!(
            err.contains("`alpine`") && err.contains("debian-python"),
            "{err}"
        );
    }

    #[test]
    fn rootfs_key_follows_inputs() {
        let a = rootfs_key(RootfsRecipe::Busybox, b"bb1", b"bash1");
        assert_eq!(a, rootfs_key(RootfsRecipe::Busybox, b"bb1", b"bash1"));
        assert_ne!(a, rootfs_key(RootfsRecipe::Busybox, b"bb2", b"bash1"));
        assert_ne!(a, rootfs_key(RootfsRecipe::Busybox, b"bb1", b"bash2"));
        assert_ne!(a, rootfs_key(RootfsRecipe::DebianPython, b"bb1", b"bash1"));
        // busybox and bash are not inputs of the Debian recipe.
        assert_eq!(
            rootfs_key(RootfsRecipe::DebianPython, b"x", b"1"),
            rootfs_key(RootfsRecipe::DebianPython, b"y", b"2")
        );
    }

    #[test]
    fn the_user_account_is_added_once() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        fs::create_dir_all(&etc).unwrap();
        fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/sh").unwrap();
        add_user(dir.path(), "/bin/bash").unwrap();
        add_user(dir.path(), "/bin/bash").unwrap();
        assert_eq!(
            fs::read_to_string(etc.join("passwd")).unwrap(),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/bash\n"
        );
        assert_eq!(
            fs::read_to_string(etc.join("group")).unwrap(),
            "user:x:1000:\n"
        );
        assert!(dir.path().join("home/user").is_dir());
    }

    #[test]
    fn debian_image_size_has_slack_and_headroom() {
        assert_eq!(debian_image_bytes(0), 64 * MIB);
        assert_eq!(debian_image_bytes(100 * MIB), 194 * MIB);
        assert_eq!(debian_image_bytes(1) % MIB, 0);
    }
}
