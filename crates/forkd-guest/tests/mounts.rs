//! A temporary tree with mounts left inside it (what a bootstrap killed
//! before its cleanup leaves) is swept without reaching through them: the
//! mounts are detached first and what they showed survives. Real bind mounts;
//! needs root, as building the debian-python image does.

use std::path::Path;
use std::process::Command;

use forkd_guest::{build_rootfs, find_busybox, mounts, RootfsRecipe};

fn mount(args: &[&str]) {
    let out = Command::new("mount").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "mount {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mounted_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mounts::mounts_under(&info, &std::fs::canonicalize(dir).unwrap())
}

/// A leftover like a killed mmdebstrap's: `dev/shm` a bind of a directory
/// holding `marker`, `proc` a real procfs, a tmpfs nested in the bind.
fn leftover(tree: &Path, shown: &Path) {
    for d in ["dev/shm", "proc", "etc"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::write(tree.join("etc/hostname"), b"x").unwrap();
    std::fs::create_dir_all(shown.join("nested")).unwrap();
    std::fs::write(shown.join("marker"), b"keep").unwrap();
    let shm = tree.join("dev/shm");
    mount(&["--bind", shown.to_str().unwrap(), shm.to_str().unwrap()]);
    let nested = shm.join("nested");
    mount(&["-t", "tmpfs", "none", nested.to_str().unwrap()]);
    std::fs::write(nested.join("inner"), b"keep").unwrap();
    let proc = tree.join("proc");
    mount(&["-t", "proc", "proc", proc.to_str().unwrap()]);
    assert_eq!(mounted_under(tree).len(), 3);
}

#[test]
fn a_tree_with_mounts_inside_is_removed_without_touching_what_they_show() {
    assert_eq!(
        euid(),
        0,
        "this test mounts (bind, tmpfs, proc): run it as root"
    );
    let home = tempfile::tempdir().unwrap();
    let shown = tempfile::tempdir().unwrap();

    // Removed directly.
    let tree = home.path().join("x.ext4.tmp-1.d");
    leftover(&tree, shown.path());
    mounts::remove_tree(&tree).unwrap();
    assert!(!tree.exists());
    assert_eq!(std::fs::read(shown.path().join("marker")).unwrap(), b"keep");
    assert!(shown.path().join("nested").is_dir());

    // Swept by the next build as a dead process's leftover (pid 2^32-2 is
    // never alive), while the build's own image is made.
    let images = home.path().join("images");
    let stale = images.join("debian-python-0.ext4.tmp-4294967294.d");
    leftover(&stale, shown.path());
    let busybox = find_busybox().expect("a static busybox (apt-get install busybox-static)");
    build_rootfs(home.path(), RootfsRecipe::Busybox, &busybox, &|_| {}).unwrap();
    assert!(!stale.exists(), "the stale tree was not swept");
    assert!(mounted_under(home.path()).is_empty());
    assert_eq!(std::fs::read(shown.path().join("marker")).unwrap(), b"keep");
}

fn euid() -> u32 {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
