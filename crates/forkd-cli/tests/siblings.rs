//! A child cannot change what its siblings read, against a real QEMU and
//! kernel. Children of one snapshot map the same RAM image privately (on
//! tmpfs, or the hugetlb copy of a `spawn --hugepages` batch). A guest
//! drives virtio-balloon free-page reporting at will, and QEMU 7.2 answers
//! a report by punching a hole in the RAM block's file even for a private
//! mapping: before forkd refused that punch (forkd_vm::confine::NoPunchFilter)
//! one child dropping its page cache zeroed a file's cached pages in its
//! sibling. Here child A drops its caches until QEMU has tried to discard
//! (and been refused), and child B still reads the file's cached bytes
//! right; the images never lose allocated bytes.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::World;

/// Allocated bytes of every file directly in each of `dirs` (the RAM
/// image cache, and the snapshot's directory, whose image children map
/// directly when the store is on tmpfs).
fn allocated(dirs: &[&Path]) -> u64 {
    dirs.iter()
        .map(|dir| -> u64 {
            std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.metadata().ok())
                        .filter(|m| m.is_file())
                        .map(|m| m.blocks() * 512)
                        .sum()
                })
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn a_child_freeing_memory_never_changes_what_its_siblings_read() {
    let w = World::new("siblings");
    // A parent on 4 KiB pages: its balloon offers free-page reporting,
    // which its children inherit (hugetlb parents offer none; see
    // VmConfig::wants_page_reporting).
    let out = w
        .command()
        .env("FORKD_HUGEPAGES", "off")
        .args(["create", "--mem", "256"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let p = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // 48 MiB of file data in the page cache: part of the snapshot's RAM.
    w.cli_sh(
        &p,
        "dd if=/dev/urandom of=/root/blob bs=1M count=48 2>/dev/null; sync; \
         echo 3 > /proc/sys/vm/drop_caches; md5sum /root/blob > /root/blob.md5; sync",
    );
    w.cli_ok(&["branch", &p, "--tag", "sib"]);
    w.cli_ok(&["kill", &p]);
    let cache = w.runtime.join("images");
    let snap = w.home.join("snapshots").join("sib");
    let images = [cache.as_path(), snap.as_path()];
    for extra in [&[][..], &["--hugepages"][..]] {
        let kids = w.cli_spawn(&[&["sib", "-n", "2"], extra].concat());
        let (a, b) = (&kids[0], &kids[1]);
        let before = allocated(&images);
        // A frees the cached pages; the guest reports the free blocks and
        // QEMU tries to discard them.
        let stderr = w.runtime.join("sandboxes").join(a).join("qemu.stderr");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            w.cli_sh(a, "echo 3 > /proc/sys/vm/drop_caches");
            // Refused (QEMU logs it), or done (the images lost bytes).
            let log = std::fs::read_to_string(&stderr).unwrap_or_default();
            if log.contains("Failed to fallocate") || allocated(&images) < before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{extra:?}: child {a}'s QEMU never tried to discard reported memory: {log}"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        // B still reads the bytes it inherited (from its page cache).
        let check = w.cli_sh(
            b,
            "md5sum -c /root/blob.md5 2>&1; grep ^Cached /proc/meminfo",
        );
        assert!(check.contains("/root/blob: OK"), "{extra:?}: {check}");
        // No hole punched: the images never lose bytes (they may gain
        // some: a read of a hole in a tmpfs file allocates a zero page).
        let after = allocated(&images);
        assert!(
            after >= before,
            "{extra:?}: the shared RAM images lost {} bytes",
            before - after
        );
        // And A's own view is intact too (read back from the disk).
        assert!(w
            .cli_sh(a, "md5sum -c /root/blob.md5 2>&1")
            .contains("/root/blob: OK"));
        w.cli_ok(&["kill", a, b]);
    }
}
