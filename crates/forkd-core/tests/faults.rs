//! Fault injection against a real QEMU and kernel, on the fleet in this
//! process (issue 10): a source killed under a chain of snapshots, two
//! homes sharing one runtime directory, a runtime tmpfs that is (nearly)
//! full. Kills of separate processes (writers, the CLI, the daemon) are in
//! `crates/forkd-cli/tests/faults.rs`. Each test has its own home and
//! runtime directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use forkd_core::{BootOptions, Env, Fleet};
use forkd_ops::{BranchMode, PartialFailure, RemoveSnapshot, SnapshotStatus};

/// A home on disk (so that children's RAM images go through the cache in
/// the runtime directory, as in production) and a runtime directory on
/// tmpfs, optionally its own small tmpfs.
struct World {
    root: PathBuf,
    runtime: PathBuf,
    mounted: bool,
}

impl World {
    fn new(name: &str, runtime_tmpfs_mib: Option<u32>) -> World {
        let root = std::env::temp_dir().join(format!("forkd-faults-{name}-{}", std::process::id()));
        let runtime = PathBuf::from(format!(
            "/dev/shm/forkd-faults-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&runtime);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&runtime).unwrap();
        let mut mounted = false;
        if let Some(mib) = runtime_tmpfs_mib {
            let st = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(&runtime)
                .status()
                .unwrap();
            assert!(st.success(), "mounting a small tmpfs needs root");
            mounted = true;
        }
        World {
            root,
            runtime,
            mounted,
        }
    }

    fn fleet(&self, home: &str) -> Fleet {
        Fleet::open(&self.env(home)).unwrap()
    }

    fn env(&self, home: &str) -> Env {
        Env {
            home: self.root.join(home),
            runtime: self.runtime.clone(),
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(f) = Fleet::open(&Env {
                home: e.path(),
                runtime: self.runtime.clone(),
            }) {
                common::kill_all(&f);
            }
        }
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.runtime).status();
        }
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.runtime);
    }
}

fn create(f: &Fleet, mem_mib: u64) -> String {
    let opts = BootOptions {
        mem_mib,
        ..BootOptions::default()
    };
    f.create(common::artifacts(), "busybox", &opts)
        .unwrap()
        .0
        .id
}

fn spawn1(f: &Fleet, tag: &str) -> String {
    f.spawn(tag, 1, 1, false, PartialFailure::Keep, &|_, _| {})
        .unwrap()
        .remove(0)
        .unwrap_or_else(|e| panic!("spawning from {tag}: {e}"))
        .sandbox
        .id
}

fn status(f: &Fleet, tag: &str) -> (SnapshotStatus, Option<String>) {
    let s = f
        .snapshots()
        .unwrap()
        .into_iter()
        .find(|s| s.tag == tag)
        .unwrap();
    (s.status, s.error)
}

/// Issue 10 item 1: every later snapshot of a chain lost its disk when the
/// source was killed (their `disk.qcow2` was backed by a file of the
/// source's run directory).
#[test]
fn killing_the_source_keeps_a_chain_of_two_snapshots_and_two_branches_spawnable() {
    let w = World::new("chain", None);
    let f = w.fleet("home");
    let src = create(&f, 256);
    let mut expected = Vec::new();
    for (i, (tag, mode)) in [
        ("a", BranchMode::Full),
        ("b", BranchMode::Full),
        ("c", BranchMode::Live),
        ("d", BranchMode::Live),
    ]
    .into_iter()
    .enumerate()
    {
        common::run_ok(
            &f,
            &src,
            &format!("echo {tag} >> /root/disk; echo mem-{tag} > /tmp/mem; sync"),
        );
        let out = f.branch(&src, tag, mode, true, None).unwrap();
        assert_eq!(out.snapshot.status, SnapshotStatus::Ready);
        let disk: Vec<&str> = ["a", "b", "c", "d"][..=i].to_vec();
        expected.push((tag, format!("{}\nmem-{tag}\n", disk.join("\n"))));
    }
    // Each stored disk is backed by the previous snapshot's (no copy), the
    // first by the base image in the home: nothing in the run directory.
    let store = f.store().root().to_path_buf();
    for (tag, below) in [("b", "a"), ("c", "b"), ("d", "c")] {
        let backing = forkd_vm::disk::backing_file(&store.join(tag).join("disk.qcow2")).unwrap();
        assert_eq!(backing, Some(store.join(below).join("disk.qcow2")), "{tag}");
        assert_eq!(
            f.db().get_snapshot(tag).unwrap().unwrap().parent.as_deref(),
            Some(below)
        );
    }
    let base = forkd_vm::disk::backing_file(&store.join("a").join("disk.qcow2"))
        .unwrap()
        .unwrap();
    assert!(base.starts_with(
        common::artifacts()
            .rootfs
            .as_ref()
            .unwrap()
            .parent()
            .unwrap()
    ));
    // `a` is needed by `b`: refused.
    let e = f
        .remove_snapshot("a", RemoveSnapshot::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("snapshot b"), "{e}");

    // A snapshot made before stored disks were self-contained names a file
    // of the source's run directory (made so here by hand): doctor says so,
    // and `kill` makes it independent before it deletes that directory.
    let run_dir = f.sandbox(&src).unwrap().0.run_dir;
    let frozen_for_a = f.store().load("a").unwrap().disk_from.unwrap();
    let legacy = store.join("b").join(".disk.legacy");
    std::fs::copy(store.join("b").join("disk.qcow2"), &legacy).unwrap();
    forkd_vm::disk::rebase(&legacy, Path::new(&frozen_for_a), "qcow2", false).unwrap();
    f.store().replace_file("b", "disk.qcow2", &legacy).unwrap();
    assert!(Path::new(&frozen_for_a).starts_with(&run_dir));
    let found = forkd_core::consistency::findings(&f).unwrap();
    assert!(
        found.iter().any(
            |x| x.kind == forkd_core::consistency::Kind::DiskInRunDirectory && x.subject == "b"
        ),
        "{found:?}"
    );
    f.kill(&src).unwrap();
    assert!(!run_dir.exists());
    assert_eq!(
        forkd_vm::disk::backing_file(&store.join("b").join("disk.qcow2")).unwrap(),
        Some(store.join("a").join("disk.qcow2"))
    );
    for (tag, want) in &expected {
        assert_eq!(status(&f, tag), (SnapshotStatus::Ready, None), "{tag}");
        let child = spawn1(&f, tag);
        assert_eq!(
            common::run_ok(&f, &child, "cat /root/disk /tmp/mem"),
            *want,
            "a child of {tag}"
        );
        f.kill(&child).unwrap();
    }

    // Forcing `b` out breaks what is layered on it, and says so; spawn
    // refuses with the reason; a prune removes them.
    f.remove_snapshot(
        "b",
        RemoveSnapshot {
            force: true,
            cascade: false,
        },
    )
    .unwrap();
    let (st, why) = status(&f, "c");
    assert_eq!(st, SnapshotStatus::Broken);
    let why = why.unwrap();
    assert!(
        why.contains(&format!("{}/b/", store.display())) && why.ends_with("which is gone"),
        "{why}"
    );
    let e = f
        .spawn("d", 1, 1, false, PartialFailure::Keep, &|_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("snapshot `d` is broken:"), "{e}");
    let pruned = f.prune_snapshots().unwrap();
    assert_eq!(pruned.removed, ["d", "c"]);
    let left: Vec<String> = f.snapshots().unwrap().into_iter().map(|s| s.tag).collect();
    assert_eq!(left, ["a"]);
}

/// Issue 10 item 5: children's RAM images were cached by tag in the
/// runtime directory every home shares, so a child of home B ran with home
/// A's memory.
#[test]
fn two_homes_on_one_runtime_dir_get_their_own_memory() {
    let w = World::new("homes", None);
    let (a, b) = (w.fleet("a"), w.fleet("b"));
    for (f, who) in [(&a, "home-a"), (&b, "home-b")] {
        let src = create(f, 256);
        common::run_ok(f, &src, &format!("echo {who} > /tmp/who"));
        f.snapshot(&src, "warm").unwrap();
        f.kill(&src).unwrap();
    }
    for (f, who) in [(&a, "home-a"), (&b, "home-b"), (&a, "home-a")] {
        let c = spawn1(f, "warm");
        assert_eq!(common::run_ok(f, &c, "cat /tmp/who"), format!("{who}\n"));
        f.kill(&c).unwrap();
    }
    let cache = w.runtime.join(forkd_core::fleet::CACHE_DIR);
    let images = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".ram") && !n.starts_with('.'))
            .collect();
        v.sort();
        v
    };
    let (img_a, img_b) = (
        a.ram_image_of("warm").unwrap(),
        b.ram_image_of("warm").unwrap(),
    );
    assert_ne!(img_a, img_b);
    assert_eq!(images(&cache).len(), 2);
    // Named by content: the manifest's hash of the stored image.
    let named = |f: &Fleet| {
        let m = f.store().load("warm").unwrap();
        let h = &m.files.iter().find(|x| x.name == "ram.img").unwrap().blake3;
        format!("{h}.ram")
    };
    assert_eq!(img_a.file_name().unwrap().to_string_lossy(), named(&a));

    // A damaged image is not mapped: it is checked and made again.
    {
        use std::os::unix::fs::FileExt;
        let data_at = 16 << 20;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img_b)
            .unwrap()
            .write_all_at(b"not home b's memory", data_at)
            .unwrap();
    }
    let c = spawn1(&b, "warm");
    assert_eq!(common::run_ok(&b, &c, "cat /tmp/who"), "home-b\n");
    b.kill(&c).unwrap();
    let b_hash = named(&b);
    assert_eq!(
        forkd_store::hash_file(&img_b).unwrap() + ".ram",
        b_hash,
        "the damaged image was not made again"
    );

    // Collection: A's image stays while A's snapshot exists, goes with it;
    // B's goes once home B is gone; a tag-named file of old goes at once.
    std::fs::write(cache.join("warm.ram"), b"stale").unwrap();
    let r = a.gc().unwrap();
    assert_eq!(r.removed, ["warm.ram"]);
    assert_eq!(r.kept, 2);
    a.remove_snapshot("warm", RemoveSnapshot::default())
        .unwrap();
    assert_eq!(images(&cache), std::slice::from_ref(&b_hash));
    drop(b);
    std::fs::remove_dir_all(w.root.join("b")).unwrap();
    let r = a.gc().unwrap();
    assert_eq!(r.removed, [b_hash]);
    assert!(images(&cache).is_empty());
}

/// Issue 10 item 6: `create` was accepted with 18 MiB free on the runtime
/// tmpfs, and that guest's QEMU later died of SIGBUS with an empty error.
#[test]
fn a_nearly_full_runtime_tmpfs_refuses_create_and_names_a_sigbus() {
    let w = World::new("tmpfs", Some(200));
    let f = w.fleet("home");
    // 256 MiB of RAM cannot fit in 200 MiB: refused before QEMU starts.
    let e = f
        .create(
            common::artifacts(),
            "busybox",
            &BootOptions {
                mem_mib: 256,
                ..BootOptions::default()
            },
        )
        .unwrap_err();
    assert_eq!(e.kind(), forkd_ops::ErrorKind::Busy);
    let e = e.to_string();
    assert!(
        e.starts_with("cannot create: the runtime tmpfs cannot hold the guest RAM it may need: 256 MiB needed, "),
        "{e}"
    );
    assert!(f.list().unwrap().is_empty());
    // 96 MiB fits; its RAM file may still grow by up to 96 MiB, which the
    // next admission counts as taken.
    let id = create(&f, 96);
    let e = f
        .create(
            common::artifacts(),
            "busybox",
            &BootOptions {
                mem_mib: 64,
                ..BootOptions::default()
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("may still be claimed by running guests"), "{e}");

    // Something else fills the tmpfs; the guest then touches memory it
    // never touched before, and QEMU dies of SIGBUS: the error says so.
    let agent = forkd_core::artifacts::find_agent(None).unwrap();
    let memtest = std::fs::read(agent.with_file_name("forkd-memtest")).unwrap();
    f.attach(&id)
        .unwrap()
        .agent()
        .write_file("/root/mt", Some(0o755), &memtest[..])
        .unwrap();
    common::run_ok(&f, &id, "sync");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dd if=/dev/zero of={}/filler bs=1M count=400 2>/dev/null; true",
            w.runtime.display()
        ))
        .status()
        .unwrap();
    assert!(st.success());
    let mut out = Vec::new();
    let e = f
        .exec(
            &id,
            common::sh("/root/mt write --mib 48 --run 1"),
            None,
            |_, b| out.extend_from_slice(b),
        )
        .map(|st| format!("the exec ended ({st:?}): {}", String::from_utf8_lossy(&out)))
        .unwrap_or_else(|e| e.to_string());
    let again = f.ping(&id).unwrap_err().to_string();
    eprintln!("exec: {e}\nthen: {again}");
    assert!(
        again.contains("SIGBUS: the runtime tmpfs is full"),
        "a later call does not say why QEMU died: {again}"
    );
    let _ = std::fs::remove_file(w.runtime.join("filler"));
}
