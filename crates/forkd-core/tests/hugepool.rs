//! The default RAM backing against a real QEMU and kernel: 2 MiB hugetlb
//! pages taken on demand from the surplus pool forkd manages. One instant
//! of RAM and disk while the guest writes both; a full snapshot read from
//! the memfd; the pool given back; a pool that runs dry while the guest
//! boots and while a branch populates. Needs root (it is the feature).

mod common;

use common::hog::Hog;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_core::{hugepool, BootOptions, Env, Fleet};
use forkd_ops::{BranchMode as Mode, PartialFailure};
use forkd_store::SnapshotStatus;
use forkd_vm::HugePages;

/// The tests share the host's surplus pool: one at a time.
static POOL: Mutex<()> = Mutex::new(());

struct World {
    env: Env,
    fleet: Fleet,
}

impl World {
    fn new(name: &str) -> World {
        let root =
            std::env::temp_dir().join(format!("forkd-hugepool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let env = Env {
            home: root,
            runtime: PathBuf::from(format!(
                "/dev/shm/forkd-test-hp-{name}-{}",
                std::process::id()
            )),
        };
        let fleet = Fleet::open(&env).unwrap();
        World { env, fleet }
    }

    /// Boots a sandbox on the backing `forkd create` picks by default.
    fn create_default(&self, mem_mib: u64) -> Result<String, forkd_core::CoreError> {
        let (pages, note) = hugepool::choose(false, false, mem_mib, hugepool::unavailable());
        assert_eq!(
            (pages, note),
            (HugePages::HugetlbOnDemand, None),
            "as root forkd puts sandboxes on on-demand huge pages by default"
        );
        let opts = BootOptions {
            mem_mib,
            huge_pages: pages,
            ..BootOptions::default()
        };
        Ok(self
            .fleet
            .create(common::artifacts(), "busybox", &opts)?
            .0
            .id)
    }

    fn run(&self, id: &str, script: &str) -> String {
        common::run_ok(&self.fleet, id, script)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        common::kill_all(&self.fleet);
        let _ = std::fs::remove_dir_all(&self.env.home);
        let _ = std::fs::remove_dir_all(&self.env.runtime);
    }
}

fn overcommit() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/nr_overcommit_hugepages")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Guest RAM the host holds for sandbox `id`, in MiB.
fn host_ram_mib(w: &World, id: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let vm = w.fleet.control(id).unwrap();
    let f = vm.guest_ram_file().unwrap().unwrap();
    (std::fs::metadata(f).unwrap().blocks() * 512) >> 20
}

/// The balloon device on sandbox `id`'s QEMU command line.
fn balloon(w: &World, id: &str) -> String {
    let pid = w.fleet.control(id).unwrap().pid();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    String::from_utf8_lossy(&cmdline)
        .split('\0')
        .find(|a| a.starts_with("virtio-balloon"))
        .unwrap_or_else(|| panic!("{id} has no balloon"))
        .to_string()
}

#[test]
fn the_default_backing_branches_one_instant_of_ram_and_disk() {
    let _one = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let before = overcommit();
    let w = World::new("instant");
    let p = w.create_default(256).unwrap();
    // The pool grew by this guest (other forkd users on the host may add
    // theirs); the guest holds what it touched.
    let claim = PathBuf::from(hugepool::LEDGER_DIR).join(format!("sb-{p}"));
    assert!(
        overcommit() >= before + 128,
        "{} < {before} + 128",
        overcommit()
    );
    let entry = hugepool::Entry::parse(&std::fs::read_to_string(&claim).unwrap()).unwrap();
    assert_eq!(entry.pages, 128);
    let idle = host_ram_mib(&w, &p);
    // No free-page reporting on hugetlb RAM: a reported page would come
    // back, slowly, inside the next branch's pause.
    assert_eq!(
        balloon(&w, &p),
        "virtio-balloon-device,free-page-reporting=off"
    );
    assert!(
        idle < 256,
        "an idle 256 MiB guest holds {idle} MiB of host RAM"
    );

    // A log on the disk (synced after each line), then a counter in guest
    // RAM, as fast as the guest can. A child of a snapshot whose disk and
    // RAM are from one instant reads back, from the disk itself (caches
    // dropped), the log 0, 1, ..., n with nothing missing or doubled, n
    // equal to the RAM counter or one ahead.
    w.run(
        &p,
        "(i=0; while :; do echo $i >> /root/disk-log; sync; echo $i > /tmp/ram-counter; i=$((i+1)); done) >/dev/null 2>&1 & echo $! > /tmp/loop.pid",
    );
    std::thread::sleep(Duration::from_secs(2));
    let mut tags = Vec::new();
    for i in 0..3 {
        let tag = format!("inst{i}");
        let b = w.fleet.branch(&p, &tag, Mode::Live, true, None).unwrap();
        assert_eq!(b.snapshot.status, SnapshotStatus::Ready);
        eprintln!(
            "{tag}: pause {:.1} ms, ready {:?} ms",
            b.pause_ms, b.ready_ms
        );
        tags.push(tag);
        std::thread::sleep(Duration::from_millis(300));
    }
    // Full mode reads the RAM from QEMU's memfd.
    let full = w
        .fleet
        .branch(&p, "instfull", Mode::Full, true, None)
        .unwrap();
    assert_eq!(full.snapshot.status, SnapshotStatus::Ready);
    tags.push("instfull".into());

    for tag in &tags {
        let c = w
            .fleet
            .spawn(tag, 1, 1, true, PartialFailure::Keep, &|_, _| {})
            .unwrap()
            .remove(0)
            .unwrap()
            .sandbox
            .id;
        // The child restores its parent's balloon.
        assert_eq!(
            balloon(&w, &c),
            "virtio-balloon-device,free-page-reporting=off"
        );
        // Stop the child's own writer, then read the log from the disk.
        let out = w.run(
            &c,
            "kill $(cat /tmp/loop.pid); sleep 0.5; r=$(cat /tmp/ram-counter); sync; \
             echo 3 > /proc/sys/vm/drop_caches; echo ram $r; cat /root/disk-log",
        );
        let mut lines = out.lines();
        let ram: i64 = lines
            .next()
            .and_then(|l| l.strip_prefix("ram "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{tag}: {out}"));
        let log: Vec<&str> = lines.collect();
        for (i, l) in log.iter().enumerate() {
            assert_eq!(
                *l,
                i.to_string(),
                "{tag}: the disk log breaks at line {i}: not one instant"
            );
        }
        let last = log.len() as i64 - 1;
        assert!(
            last == ram || last == ram + 1,
            "{tag}: guest RAM says {ram}, its disk log ends at {last}"
        );
        w.fleet.kill(&c).unwrap();
    }
    w.fleet.kill(&p).unwrap();
    // Its claim is gone; when no other sandbox on the host holds one, the
    // host's own value is back and forgotten.
    assert!(!claim.exists());
    let others = std::fs::read_dir(hugepool::LEDGER_DIR)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("sb-"));
    if !others {
        assert!(!PathBuf::from(hugepool::LEDGER_DIR)
            .join("original")
            .exists());
        assert!(overcommit() <= before, "{} > {before}", overcommit());
    }
}

#[test]
fn a_pool_that_runs_dry_fails_the_create_or_the_branch_cleanly() {
    let _one = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let before = overcommit();
    let w = World::new("dry");

    // While the guest boots, another program takes the pages forkd let the
    // pool grow by: QEMU dies of SIGBUS and create says why.
    // The hog starts on this create's claim (a ledger entry that was not
    // there before) and keeps taking every page the pool frees until the
    // create is over.
    let ledger = PathBuf::from(hugepool::LEDGER_DIR);
    let entries = |dir: &PathBuf| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("sb-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let existing = entries(&ledger);
    let done = Arc::new(AtomicBool::new(false));
    let hogger = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !entries(&ledger).iter().any(|n| !existing.contains(n)) {
                assert!(Instant::now() < deadline, "create never claimed pages");
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut hog = Hog::new(4096);
            while !done.load(Ordering::Relaxed) {
                hog.take_more();
                std::thread::sleep(Duration::from_millis(1));
            }
            hog
        })
    };
    let e = w.create_default(256).unwrap_err().to_string();
    done.store(true, Ordering::Relaxed);
    let hog = hogger.join().unwrap();
    // The guest got what it touched before the hog; the hog the rest.
    assert!(hog.held > 0, "the hog got no page");
    assert!(
        e.contains("SIGBUS") && e.contains("FORKD_HUGEPAGES=off for 4 KiB pages"),
        "{e}"
    );
    assert!(w.fleet.list().unwrap().is_empty());
    drop(hog);
    assert_eq!(overcommit(), before, "a failed create gives its claim back");

    // A running sandbox whose pool runs dry before its first branch: the
    // branch fails before any pause, with the reason; the source runs on.
    let p = w.create_default(256).unwrap();
    w.run(&p, "echo still-here > /tmp/state");
    let hog = Hog::take_all(4096);
    let e = w
        .fleet
        .branch(&p, "dry", Mode::Live, true, None)
        .unwrap_err()
        .to_string();
    drop(hog);
    assert!(e.contains("huge-page pool is exhausted"), "{e}");
    assert_eq!(
        w.fleet.db().get_snapshot("dry").unwrap().unwrap().status,
        SnapshotStatus::Failed
    );
    assert_eq!(w.run(&p, "cat /tmp/state"), "still-here\n");
    assert_eq!(
        w.fleet
            .branch(&p, "wet", Mode::Live, true, None)
            .unwrap()
            .snapshot
            .status,
        SnapshotStatus::Ready
    );
}
