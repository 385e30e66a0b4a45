//! Builds a root image from a directory tree (as an unpacked container image
//! gives) with the real mkfs.ext4 and reads it back with debugfs: owners,
//! modes, links and forkd's additions are there, and symlinks the tree
//! planted where forkd writes were replaced, not written through.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use forkd_guest::build_rootfs_from_tree;

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("debugfs runs (install e2fsprogs)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tree_becomes_an_ext4_image_with_forkd_files() {
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    let tree = work.path().join("tree");
    let outside = work.path().join("host-file");
    fs::write(&outside, b"host content").unwrap();
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::create_dir_all(tree.join("usr/bin")).unwrap();
    fs::write(tree.join("usr/bin/app"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(tree.join("usr/bin/app"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(tree.join("usr/bin/app"), tree.join("usr/bin/app2")).unwrap();
    symlink("usr/bin", tree.join("bin")).unwrap();
    // Hostile: forkd writes /etc/hostname; the tree points it at a host file.
    symlink(&outside, tree.join("etc/hostname")).unwrap();
    // And /tmp is a symlink out of the tree.
    symlink("/", tree.join("tmp")).unwrap();
    fs::write(
        tree.join("etc/passwd"),
        b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n",
    )
    .unwrap();
    let owned = tree.join("data");
    fs::write(&owned, b"x").unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        std::os::unix::fs::chown(&owned, Some(1000), Some(1000)).unwrap();
    }

    let image = build_rootfs_from_tree(&home, &tree, "sha256:abc", &|_| {}).unwrap();
    assert!(image
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("tree-"));
    assert_eq!(
        fs::read(&outside).unwrap(),
        b"host content",
        "wrote through the tree's symlink"
    );
    assert_eq!(debugfs(&image, "cat /etc/hostname"), "forkd\n");
    assert!(debugfs(&image, "cat /etc/resolv.conf").contains("nameserver"));
    assert!(
        debugfs(&image, "cat /etc/passwd").contains("app:x:1000"),
        "the image's passwd is kept"
    );
    assert!(debugfs(&image, "stat /tmp").contains("Mode:  01777"));
    for dir in ["proc", "sys", "dev", "run"] {
        assert!(
            debugfs(&image, &format!("stat /{dir}")).contains("Type: directory"),
            "{dir}"
        );
    }
    assert!(debugfs(&image, "stat /usr/bin/app").contains("Mode:  04755"));
    assert!(debugfs(&image, "stat /usr/bin/app").contains("Links: 2"));
    assert!(debugfs(&image, "stat /bin").contains("Fast link dest: \"usr/bin\""));
    if root {
        assert!(debugfs(&image, "stat /data").contains("User:  1000   Group:  1000"));
    }
    // Cached by key: a second call returns the same file without rebuilding.
    let again = build_rootfs_from_tree(&home, &tree, "sha256:abc", &|_| {}).unwrap();
    assert_eq!(again, image);
    assert_ne!(
        build_rootfs_from_tree(&home, &tree, "sha256:def", &|_| {}).unwrap(),
        image
    );
}
