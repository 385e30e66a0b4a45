//! Live BRANCH against a real QEMU and kernel: one instant captured while the
//! guest writes, children of branches, branches of children, and every way a
//! branch can fail without harming its source.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forkd_core::hugepages::HugePagePool;
use forkd_core::{BootOptions, Env, Fleet};
use forkd_ops::{BranchMode as Mode, BranchOutcome, PartialFailure, RemoveSnapshot};
use forkd_store::SnapshotStatus;

struct World {
    env: Env,
    fleet: Fleet,
    mounted: Option<PathBuf>,
}

impl World {
    fn new(name: &str) -> World {
        World::with_home(name, None)
    }

    /// `home_tmpfs_mib`: put the snapshot store on a tmpfs that small.
    fn with_home(name: &str, home_tmpfs_mib: Option<u32>) -> World {
        let root = std::env::temp_dir().join(format!("forkd-branch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let home = root.join("home");
        std::fs::create_dir_all(&home).unwrap();
        let mut mounted = None;
        if let Some(mib) = home_tmpfs_mib {
            let st = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(&home)
                .status()
                .unwrap();
            assert!(st.success(), "mounting a small tmpfs needs root");
            mounted = Some(home.clone());
        }
        // Runtime on tmpfs, as in production: live branches need RAM on shmem.
        let env = Env {
            home,
            runtime: PathBuf::from(format!("/dev/shm/forkd-test-{name}-{}", std::process::id())),
        };
        let fleet = Fleet::open(&env).unwrap();
        World {
            env,
            fleet,
            mounted,
        }
    }

    fn create(&self, mem_mib: u64) -> String {
        let opts = BootOptions {
            mem_mib,
            ..BootOptions::default()
        };
        self.fleet
            .create(common::artifacts(), "busybox", &opts)
            .unwrap()
            .0
            .id
    }

    fn run(&self, id: &str, script: &str) -> String {
        common::run_ok(&self.fleet, id, script)
    }

    /// Uploads forkd-memtest and starts a writer sweeping `mib` MiB.
    fn start_memtest(&self, id: &str, mib: u64, run: u64) {
        let agent = forkd_core::artifacts::find_agent(None).unwrap();
        let memtest = agent.with_file_name("forkd-memtest");
        let vm = self.fleet.attach(id).unwrap();
        let bin =
            std::fs::read(&memtest).expect("forkd-memtest (scripts/build-agent.sh builds it)");
        vm.agent()
            .write_file("/root/forkd-memtest", Some(0o755), &bin[..])
            .unwrap();
        drop(vm);
        self.run(id, &format!("/root/forkd-memtest write --mib {mib} --run {run} > /tmp/mt.log 2>&1 & echo $! > /tmp/mt.pid"));
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.run(id, "cat /tmp/mt.log").contains("sweeping") {
            assert!(Instant::now() < deadline, "memtest never completed a sweep");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn branch(&self, id: &str, tag: &str) -> BranchOutcome {
        self.fleet.branch(id, tag, Mode::Live, true, None).unwrap()
    }

    fn spawn1(&self, tag: &str) -> String {
        self.fleet
            .spawn(tag, 1, 1, true, PartialFailure::Keep, &|_, _| {})
            .unwrap()
            .remove(0)
            .unwrap()
            .sandbox
            .id
    }

    fn staging_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.env.home.join("snapshots"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        common::kill_all(&self.fleet);
        if let Some(m) = &self.mounted {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .status();
        }
        let _ = std::fs::remove_dir_all(self.env.home.parent().unwrap());
        let _ = std::fs::remove_dir_all(&self.env.runtime);
    }
}

#[test]
fn a_live_branch_captures_one_instant_of_256_mib_being_rewritten() {
    let w = World::new("exact");
    let p = w.create(512);
    w.start_memtest(&p, 256, 4242);
    let info = w.branch(&p, "instant");
    assert_eq!(info.snapshot.status, SnapshotStatus::Ready);
    eprintln!(
        "pause {:.1} ms, qemu downtime {:?} ms, ready {:?} ms",
        info.pause_ms, info.qemu_downtime_ms, info.ready_ms
    );
    // The image is what every child maps: check it page by page.
    let image = std::fs::read(w.fleet.store().dir("instant").join("ram.img")).unwrap();
    let verdict = forkd_agent::memtest::verify_image(&image, 4242, 256 * 256).unwrap();
    eprintln!(
        "instant: sweep {} page {}",
        verdict.control_seq, verdict.control_index
    );
    assert!(
        verdict.control_seq >= 2,
        "the writer was mid-run: {verdict:?}"
    );
    // The source kept running and keeps sweeping.
    let before = w.run(&p, "cat /tmp/mt.pid");
    assert_eq!(
        w.run(&p, &format!("kill -0 {} && echo alive", before.trim())),
        "alive\n"
    );
    // A child of the branch finds the writer alive, and runs.
    let c = w.spawn1("instant");
    assert_eq!(
        w.run(&c, "kill -0 $(cat /tmp/mt.pid) && echo alive"),
        "alive\n"
    );

    // Branch the child while its writer goes on: the branch is a diff layer
    // over `instant`, and the flat image children map is again one instant.
    std::thread::sleep(Duration::from_secs(2));
    let info = w.branch(&c, "instant2");
    assert_eq!(info.snapshot.status, SnapshotStatus::Ready);
    let manifest = w.fleet.store().load("instant2").unwrap();
    assert_eq!(manifest.ram_parent.as_deref(), Some("instant"));
    let dir = w.fleet.store().dir("instant2");
    let map = forkd_core::ramimage::LayerMap::decode(
        &std::fs::read(dir.join("ram.map")).unwrap(),
        512 << 20,
    )
    .unwrap();
    eprintln!(
        "instant2: layer of {} pages out of {}",
        map.pages.count(),
        map.pages.capacity()
    );
    assert!(map.pages.count() > 0 && map.pages.count() < map.pages.capacity() / 2 + 1024);
    let gc = w.spawn1("instant2");
    let flat = std::fs::read(w.fleet.ram_image_of("instant2").unwrap()).unwrap();
    let later = forkd_agent::memtest::verify_image(&flat, 4242, 256 * 256).unwrap();
    eprintln!(
        "instant2: sweep {} page {}",
        later.control_seq, later.control_index
    );
    assert!(
        (later.control_seq, later.control_index) > (verdict.control_seq, verdict.control_index),
        "the layer holds no newer pages: {later:?} vs {verdict:?}"
    );
    assert_eq!(
        w.run(&gc, "kill -0 $(cat /tmp/mt.pid) && echo alive"),
        "alive\n"
    );
}

#[test]
fn children_and_grandchildren_can_be_branched_and_spawned() {
    let w = World::new("chain");
    let p = w.create(256);
    w.run(&p, "echo gen0 > /root/gen; sync");
    w.branch(&p, "g0");
    let c = w.spawn1("g0");
    w.run(&c, "echo gen1 >> /root/gen; echo child-mem > /tmp/m; sync");
    let b1 = w.branch(&c, "g1");
    assert_eq!(b1.snapshot.status, SnapshotStatus::Ready);
    // g1 keeps only the pages the child changed: a small layer over g0.
    let allocated = |tag: &str, file: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(w.fleet.store().dir(tag).join(file))
            .unwrap()
            .blocks()
            * 512
    };
    let (full, layer) = (allocated("g0", "ram.img"), allocated("g1", "ram.img"));
    eprintln!("g0 image {} KiB, g1 layer {} KiB", full >> 10, layer >> 10);
    assert!(
        layer * 4 < full,
        "g1 is not a small layer: {layer} vs {full}"
    );
    assert_eq!(
        w.fleet.store().load("g1").unwrap().ram_parent.as_deref(),
        Some("g0")
    );
    let gc = w.spawn1("g1");
    assert_eq!(
        w.run(&gc, "cat /root/gen /tmp/m"),
        "gen0\ngen1\nchild-mem\n"
    );
    w.run(&gc, "echo gen2 >> /root/gen; sync");
    w.branch(&gc, "g2");
    let ggc = w.spawn1("g2");
    assert_eq!(w.run(&ggc, "cat /root/gen"), "gen0\ngen1\ngen2\n");
    let d = w.fleet.snapshot_detail("g2").unwrap();
    assert_eq!(d.chain, ["g1", "g0"]);
    assert_eq!(d.ram_parent.as_deref(), Some("g1"));
    assert!(d.layer_pages.unwrap() > 0 && d.bootable);
    assert!(d.files.iter().any(|f| f.name == "ram.map"));
    let d0 = w.fleet.snapshot_detail("g0").unwrap();
    assert_eq!((d0.ram_parent.as_deref(), d0.chain.len()), (None, 0));
    assert!(
        d0.dependents.snapshots.contains(&"g1".to_string()),
        "{:?}",
        d0.dependents
    );
    // The chain is recorded: g1's parent is g0, and g0 cannot go while g1 needs it.
    assert_eq!(
        w.fleet
            .db()
            .get_snapshot("g1")
            .unwrap()
            .unwrap()
            .parent
            .as_deref(),
        Some("g0")
    );
    let e = w
        .fleet
        .remove_snapshot("g0", RemoveSnapshot::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("snapshot g1"), "{e}");
}

#[test]
fn branch_while_an_exec_streams_output_and_the_disk_is_busy() {
    let w = Arc::new(World::new("busy"));
    let p = w.create(256);
    w.run(&p, "(while :; do dd if=/dev/urandom of=/root/churn bs=64k count=16 2>/dev/null; sync; done) >/dev/null 2>&1 & echo ok");
    let (w2, p2) = (Arc::clone(&w), p.clone());
    let streamer = std::thread::spawn(move || {
        w2.run(
            &p2,
            "i=0; while [ $i -lt 4000 ]; do echo line-$i; i=$((i+1)); [ $((i % 100)) = 0 ] && sleep 0.2; done",
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    w.branch(&p, "busy");
    // The branch did not wait for the exec: the exec is still streaming.
    assert!(
        !streamer.is_finished(),
        "the branch waited for the exec to end"
    );
    let out = streamer.join().unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        4000,
        "output lost or duplicated across the branch"
    );
    assert!(lines
        .iter()
        .enumerate()
        .all(|(i, l)| *l == format!("line-{i}")));
    let c = w.spawn1("busy");
    // The child's root disk mounts and reads; the churn file is a whole file.
    assert_eq!(
        w.run(&c, "test -f /root/churn && ls /root >/dev/null && echo ok"),
        "ok\n"
    );
}

#[test]
fn qemu_killed_mid_branch_fails_the_snapshot_and_publishes_nothing() {
    let w = World::new("killed");
    let p = w.create(512);
    w.start_memtest(&p, 256, 1);
    let info = w
        .fleet
        .branch(&p, "doomed", Mode::Live, false, None)
        .unwrap();
    assert_eq!(info.snapshot.status, SnapshotStatus::Writing);
    let pid = w
        .fleet
        .list()
        .unwrap()
        .into_iter()
        .find(|s| s.id == p)
        .unwrap()
        .pid;
    // SAFETY: a QEMU this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let row = loop {
        let r = w.fleet.db().get_snapshot("doomed").unwrap().unwrap();
        if r.status != SnapshotStatus::Writing {
            break r;
        }
        assert!(Instant::now() < deadline, "still writing");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(row.status, SnapshotStatus::Failed, "{row:?}");
    eprintln!("recorded error: {:?}", row.error);
    assert!(!w.fleet.store().dir("doomed").exists());
    assert!(w.staging_dirs().is_empty(), "{:?}", w.staging_dirs());
    let e = w
        .fleet
        .spawn("doomed", 1, 1, true, PartialFailure::Keep, &|_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("not ready") && e.contains("failed"), "{e}");
}

#[test]
fn a_full_store_fails_the_branch_and_the_source_runs_on() {
    let w = World::with_home("enospc", Some(24));
    let p = w.create(512);
    w.start_memtest(&p, 128, 2);
    eprintln!("memtest running; branching into a 24 MiB store");
    let e = w
        .fleet
        .branch(&p, "big", Mode::Live, true, None)
        .unwrap_err()
        .to_string();
    eprintln!("branch failed as expected: {e}");
    assert!(e.contains("failed"), "{e}");
    assert_eq!(
        w.fleet.db().get_snapshot("big").unwrap().unwrap().status,
        SnapshotStatus::Failed
    );
    assert!(!w.fleet.store().dir("big").exists());
    assert!(w.staging_dirs().is_empty(), "{:?}", w.staging_dirs());
    // Unharmed: still running, still writing memory, and branchable again
    // once there is room (a tmpfs store elsewhere is not needed for that).
    assert_eq!(
        w.run(&p, "kill -0 $(cat /tmp/mt.pid) && echo alive"),
        "alive\n"
    );
    let vm = w.fleet.attach(&p).unwrap();
    assert_eq!(vm.qmp().status().unwrap(), "running");
}

#[test]
fn garbage_on_the_branch_socket_fails_cleanly() {
    let w = World::new("garbage");
    let p = w.create(256);
    let (row, config) = w.fleet.sandbox(&p).unwrap();
    w.fleet
        .db()
        .insert_snapshot(&forkd_store::SnapshotRow {
            tag: "junk".into(),
            status: SnapshotStatus::Writing,
            dir: w.fleet.store().dir("junk"),
            parent: None,
            source: Some(p.clone()),
            created_at: 0,
            pause_ms: None,
            error: None,
        })
        .unwrap();
    let job = forkd_core::branch::WriterJob {
        tag: "junk".into(),
        source: p.clone(),
        source_pid: row.pid,
        source_pid_start: row.pid_start,
        source_run_dir: row.run_dir.clone(),
        source_vm: config.vm.clone(),
        socket: row.run_dir.join("junk.sock"),
        frozen_disk: None,
        machine: serde_json::json!({}),
        parent: None,
        ram_base: None,
        home: w.env.home.clone(),
        runtime: w.env.runtime.clone(),
        brancher: None,
    };
    let writer = forkd_core::branch::Writer::prepare(&w.fleet, job.clone()).unwrap();
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&job.socket).unwrap();
        let mut junk = b"QEVM".to_vec();
        junk.extend([0u8, 0, 0, 3, 0x07, 0xff, 0xff, 0xff, 0xff]);
        let _ = s.write_all(&junk);
    });
    let e = writer.run(&w.fleet).unwrap_err().to_string();
    sender.join().unwrap();
    assert!(e.contains("byte"), "the error should name the offset: {e}");
    let r = w.fleet.db().get_snapshot("junk").unwrap().unwrap();
    assert_eq!(r.status, SnapshotStatus::Failed);
    assert!(w.staging_dirs().is_empty());
    assert_eq!(w.run(&p, "echo fine"), "fine\n");
}

#[test]
fn concurrent_branches_are_refused_and_spawn_waits_for_writing_snapshots() {
    let w = World::new("concurrent");
    let p = w.create(512);
    w.start_memtest(&p, 192, 3);
    let first = w.fleet.branch(&p, "one", Mode::Live, false, None).unwrap();
    assert_eq!(first.snapshot.status, SnapshotStatus::Writing);
    let e = w
        .fleet
        .branch(&p, "two", Mode::Live, true, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("being branched"), "{e}");
    // --no-wait spawn fails at once; a waiting spawn gets a ready snapshot.
    let e = w
        .fleet
        .spawn("one", 1, 1, false, PartialFailure::Keep, &|_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("still being written"), "{e}");
    let c = w.spawn1("one");
    assert_eq!(
        w.fleet.db().get_snapshot("one").unwrap().unwrap().status,
        SnapshotStatus::Ready
    );
    assert_eq!(
        w.run(&c, "kill -0 $(cat /tmp/mt.pid) && echo alive"),
        "alive\n"
    );
    // Once done, the source can be branched again.
    assert_eq!(w.branch(&p, "two").snapshot.status, SnapshotStatus::Ready);
}

#[test]
fn recovery_fails_branches_whose_writer_died_and_leaves_live_ones() {
    let w = World::new("recover");
    let old = forkd_store::unix_now() - 60;
    for tag in ["orphan", "alive", "young"] {
        w.fleet
            .db()
            .insert_snapshot(&forkd_store::SnapshotRow {
                tag: tag.into(),
                status: SnapshotStatus::Writing,
                dir: w.fleet.store().dir(tag),
                parent: None,
                source: None,
                created_at: if tag == "young" {
                    forkd_store::unix_now()
                } else {
                    old
                },
                pause_ms: None,
                error: None,
            })
            .unwrap();
    }
    // A writer of `alive` holds its lock.
    let lock = forkd_core::branch::writer_lock(&w.env.runtime, "alive");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let held = std::fs::File::create(&lock).unwrap();
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a file we own.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    }
    let r = w.fleet.recover().unwrap();
    assert_eq!(r.failed, ["orphan"]);
    assert_eq!(r.writing, ["alive", "young"]);
    let row = w.fleet.db().get_snapshot("orphan").unwrap().unwrap();
    assert_eq!(row.status, SnapshotStatus::Failed);
    assert!(row.error.unwrap().contains("writer died"));
    assert_eq!(
        w.fleet.db().get_snapshot("alive").unwrap().unwrap().status,
        SnapshotStatus::Writing
    );
}

/// Sets the 2 MiB huge-page pool (`vm.nr_hugepages`) for a test and puts
/// the previous size back when dropped, whatever happened in between.
struct HugePagePoolGuard {
    previous: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePagePoolGuard {
    fn new() -> HugePagePoolGuard {
        let previous = std::fs::read_to_string(NR_HUGEPAGES)
            .unwrap_or_else(|e| panic!("reading {NR_HUGEPAGES}: {e}"))
            .trim()
            .parse()
            .unwrap();
        HugePagePoolGuard { previous }
    }

    /// Resizes the pool so that exactly `available` pages are free for new
    /// mappings (whatever other processes hold stays theirs).
    fn make_available(&self, available: u64) -> HugePagePool {
        let pool = HugePagePool::read().unwrap();
        assert!(
            pool.is_default_size,
            "this test sizes the pool with vm.nr_hugepages, which needs 2 MiB default huge pages"
        );
        let want = pool.total - pool.available() + available;
        if let Err(e) = std::fs::write(NR_HUGEPAGES, want.to_string()) {
            panic!("cannot reserve huge pages for this test: writing {want} to {NR_HUGEPAGES} failed ({e}); run the tests as root");
        }
        let pool = HugePagePool::read().unwrap();
        assert_eq!(
            pool.available(),
            available,
            "the kernel did not reserve the huge pages asked for (HugePages_Total {} of {want}; memory too fragmented?)",
            pool.total
        );
        pool
    }
}

impl Drop for HugePagePoolGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.previous.to_string());
    }
}

#[test]
fn a_hugetlb_sandbox_branches_live_and_in_full() {
    // Declared first, dropped last: after World has killed the sandboxes.
    let pool = HugePagePoolGuard::new();
    let w = World::new("hugetlb");
    let opts = BootOptions {
        mem_mib: 256,
        huge_pages: forkd_vm::HugePages::Hugetlb,
        prealloc: true,
        ..BootOptions::default()
    };
    let need = HugePagePool::pages_for(256);
    assert_eq!(need, 128);

    // Too small a pool: refused before QEMU starts, with the fix.
    let short = pool.make_available(need / 2);
    let e = w
        .fleet
        .create(common::artifacts(), "busybox", &opts)
        .unwrap_err()
        .to_string();
    let fix = format!("`sysctl -w vm.nr_hugepages={}`", short.total + need / 2);
    assert!(
        e.contains("needs 128 free 2 MiB huge pages") && e.contains(&fix),
        "{e}"
    );
    assert!(w.fleet.list().unwrap().is_empty());

    let before = pool.make_available(need + 8);
    let p = w
        .fleet
        .create(common::artifacts(), "busybox", &opts)
        .unwrap()
        .0
        .id;
    // prealloc: all 128 pages are taken at start, none merely reserved.
    let after = HugePagePool::read().unwrap();
    assert_eq!(before.free - after.free, need, "{before:?} -> {after:?}");
    w.run(&p, "echo hugetlb-state > /tmp/state");
    w.start_memtest(&p, 64, 2718);

    let b1 = w.branch(&p, "hp1");
    std::thread::sleep(Duration::from_secs(1));
    let b2 = w.branch(&p, "hp2");
    for b in [&b1, &b2] {
        assert_eq!(b.snapshot.status, SnapshotStatus::Ready);
        eprintln!(
            "{}: pause {:.1} ms, qemu downtime {:?} ms, ready {:?} ms",
            b.snapshot.tag, b.pause_ms, b.qemu_downtime_ms, b.ready_ms
        );
    }
    // Each branch is one instant of the writer's memory.
    let image = std::fs::read(w.fleet.store().dir("hp2").join("ram.img")).unwrap();
    let v = forkd_agent::memtest::verify_image(&image, 2718, 64 * 256).unwrap();
    assert!(v.control_seq >= 2, "the writer was mid-run: {v:?}");

    // A child of the second branch inherits files, memory and processes.
    let c = w.spawn1("hp2");
    assert_eq!(
        w.run(
            &c,
            "cat /tmp/state; kill -0 $(cat /tmp/mt.pid) && echo writer-alive"
        ),
        "hugetlb-state\nwriter-alive\n"
    );

    // Full mode copies the RAM from QEMU's memfd (through /proc).
    let full = w
        .fleet
        .branch(&p, "hpfull", Mode::Full, true, None)
        .unwrap();
    assert_eq!(full.snapshot.status, SnapshotStatus::Ready);
    let c = w.spawn1("hpfull");
    assert_eq!(w.run(&c, "cat /tmp/state"), "hugetlb-state\n");
    // The source runs on, and branches live again.
    assert_eq!(w.run(&p, "cat /tmp/state"), "hugetlb-state\n");
    assert_eq!(w.branch(&p, "hp3").snapshot.status, SnapshotStatus::Ready);
}
