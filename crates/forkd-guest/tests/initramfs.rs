//! Builds an initramfs and inspects it with GNU cpio.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use forkd_guest::{
    build_initramfs, find_busybox, kernel_from_path, InitramfsSpec, Kernel, GUEST_MODULES,
};

/// (path, file contents) of every entry, via `cpio -i` into a temp dir.
fn extract(archive: &Path) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(archive).unwrap();
    let mut child = Command::new("cpio")
        .args([
            "-i",
            "-d",
            "-v",
            "--quiet",
            "--no-absolute-filenames",
            "--nonmatching",
            "dev/console",
        ])
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cpio runs (apt-get install cpio)");
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    (dir, listed)
}

/// A Debian modules dir from the experiments copy, when there is one.
fn debian_kernel(scratch: &Path) -> (Kernel, bool) {
    let vmlinuz = scratch.join("vmlinuz");
    std::fs::write(&vmlinuz, b"not a real kernel").unwrap();
    let modules: Option<PathBuf> = std::fs::read_dir("/tmp/k/x/lib/modules")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(Result::ok)
        .map(|e| e.path());
    let kernel = kernel_from_path(&vmlinuz, modules.as_deref()).unwrap();
    (kernel, modules.is_some())
}

#[test]
fn initramfs_has_agent_busybox_and_modules_in_order() {
    let busybox =
        find_busybox().expect("this test needs a static busybox (apt-get install busybox-static)");
    let home = tempfile::tempdir().unwrap();
    let (kernel, with_modules) = debian_kernel(home.path());
    // busybox stands in for the agent: any static binary will do.
    let spec = InitramfsSpec {
        agent: &busybox,
        busybox: &busybox,
        kernel: &kernel,
        modules: GUEST_MODULES,
    };
    let archive = build_initramfs(home.path(), &spec).unwrap();
    assert_eq!(archive.parent().unwrap(), home.path().join("initramfs"));
    assert_eq!(archive.extension().unwrap(), "cpio");

    let (root, _) = extract(&archive);
    let root = root.path();
    use std::os::unix::fs::PermissionsExt;
    let init = std::fs::metadata(root.join("init")).unwrap();
    assert_eq!(init.permissions().mode() & 0o777, 0o755);
    assert_eq!(
        std::fs::read(root.join("init")).unwrap(),
        std::fs::read(&busybox).unwrap()
    );
    assert_eq!(
        std::fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    for dir in ["dev", "proc", "sys", "tmp", "mnt/root", "run"] {
        assert!(root.join(dir).is_dir(), "/{dir}");
    }
    assert!(std::fs::read_to_string(root.join("etc/passwd"))
        .unwrap()
        .starts_with("root:x:0:0"));
    let list = std::fs::read_to_string(root.join("etc/forkd/modules")).unwrap();
    let order: Vec<&str> = list.lines().collect();
    for module in &order {
        assert!(root.join("lib/modules").join(module).is_file(), "{module}");
    }
    if with_modules {
        let pos = |n: &str| {
            order
                .iter()
                .position(|m| *m == n)
                .unwrap_or_else(|| panic!("{n} in {order:?}"))
        };
        assert!(pos("virtio_ring.ko") < pos("virtio.ko"));
        assert!(pos("virtio.ko") < pos("virtio_mmio.ko"));
        assert!(pos("failover.ko") < pos("net_failover.ko"));
        assert!(pos("net_failover.ko") < pos("virtio_net.ko"));
        assert!(order.contains(&"virtio_rng.ko"));
    } else {
        assert!(order.is_empty());
    }

    // Same inputs: same file, not rewritten. Other agent: other file.
    let before = std::fs::metadata(&archive).unwrap().modified().unwrap();
    assert_eq!(build_initramfs(home.path(), &spec).unwrap(), archive);
    assert_eq!(
        std::fs::metadata(&archive).unwrap().modified().unwrap(),
        before
    );
    let other_agent = home.path().join("agent");
    let mut bytes = std::fs::read(&busybox).unwrap();
    bytes.extend_from_slice(b"trailing bytes change the hash");
    std::fs::write(&other_agent, bytes).unwrap();
    let other = build_initramfs(
        home.path(),
        &InitramfsSpec {
            agent: &other_agent,
            ..spec
        },
    )
    .unwrap();
    assert_ne!(other, archive);
}

#[test]
fn dynamic_agent_is_refused() {
    let busybox = find_busybox().expect("static busybox");
    let home = tempfile::tempdir().unwrap();
    let (kernel, _) = debian_kernel(home.path());
    let spec = InitramfsSpec {
        agent: Path::new("/bin/true"),
        busybox: &busybox,
        kernel: &kernel,
        modules: &[],
    };
    let err = build_initramfs(home.path(), &spec).unwrap_err().to_string();
    assert!(err.contains("not a static executable"), "{err}");
}
