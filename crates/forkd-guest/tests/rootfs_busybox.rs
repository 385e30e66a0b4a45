//! Builds the busybox root image with the real mkfs.ext4 and reads it back
//! with debugfs (no mount needed).

use std::path::Path;
use std::process::Command;

use forkd_guest::{build_rootfs, find_busybox, RootfsRecipe, BUSYBOX_IMAGE_BYTES};

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
fn busybox_rootfs_is_a_populated_ext4_image() {
    let busybox =
        find_busybox().expect("this test needs a static busybox (apt-get install busybox-static)");
    let home = tempfile::tempdir().unwrap();
    let logged = std::cell::RefCell::new(Vec::new());
    let log = |line: &str| logged.borrow_mut().push(line.to_owned());

    let image = build_rootfs(home.path(), RootfsRecipe::Busybox, &busybox, &log).unwrap();
    let name = image.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("busybox-") && name.ends_with(".ext4"),
        "{name}"
    );
    assert_eq!(
        std::fs::metadata(&image).unwrap().len(),
        BUSYBOX_IMAGE_BYTES
    );
    assert!(!logged.borrow().is_empty());

    let bin = debugfs(&image, "ls -l /bin");
    assert!(bin.contains(" busybox"), "{bin}");
    assert!(bin.contains(" sh"), "{bin}");
    let sbin = debugfs(&image, "ls -l /sbin");
    assert!(sbin.contains(" init"), "{sbin}");
    assert!(debugfs(&image, "stat /sbin/init").contains("Fast link dest: \"../bin/busybox\""));
    assert!(debugfs(&image, "stat /tmp").contains("Mode:  01777"));
    assert_eq!(
        debugfs(&image, "cat /etc/resolv.conf"),
        "nameserver 10.0.2.3\n"
    );
    let passwd = debugfs(&image, "cat /etc/passwd");
    assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
    assert!(
        passwd.contains("\nuser:x:1000:1000::/home/user:/bin/bash\n"),
        "{passwd}"
    );
    let user_home = debugfs(&image, "stat /home/user");
    assert!(user_home.contains("User:  1000"), "{user_home}");
    // A real (static) bash, for E2B's `/bin/bash -l -c`.
    let bash = debugfs(&image, "stat /bin/bash");
    assert!(bash.contains("Type: regular"), "{bash}");
    assert!(bash.contains("Mode:  0755"), "{bash}");
    let root = debugfs(&image, "ls -l /");
    for dir in ["proc", "sys", "dev", "run", "mnt", "root", "etc", "usr"] {
        assert!(root.contains(&format!(" {dir}")), "/{dir} missing: {root}");
    }

    // Cached: the second call returns the same file untouched, and leaves no
    // temporary files behind.
    let before = std::fs::metadata(&image).unwrap().modified().unwrap();
    let again = build_rootfs(home.path(), RootfsRecipe::Busybox, &busybox, &|_| {}).unwrap();
    assert_eq!(again, image);
    assert_eq!(
        std::fs::metadata(&image).unwrap().modified().unwrap(),
        before
    );
    let leftovers: Vec<_> = std::fs::read_dir(home.path().join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn dynamic_busybox_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let fake = home.path().join("busybox");
    std::fs::write(&fake, b"#!/bin/sh\n").unwrap();
    let err = build_rootfs(home.path(), RootfsRecipe::Busybox, &fake, &|_| {}).unwrap_err();
    assert!(err.to_string().contains("busybox-static"), "{err}");
}
