//! SPAWN against a real QEMU and kernel: snapshot a warmed parent, start
//! copy-on-write children, check what they inherit and what they must not
//! share. Each test has its own state database and runtime directory.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::sh;
use forkd_core::fleet::{DEVICE_STATE, RAM_IMAGE};
use forkd_core::{BootOptions, CoreError, Env, Fleet};
use forkd_ops::{Child, PartialFailure, RemoveSnapshot, SandboxState};

const FORCE: RemoveSnapshot = RemoveSnapshot {
    force: true,
    cascade: false,
};

struct World {
    env: Env,
    fleet: Fleet,
}

impl World {
    fn new(name: &str) -> World {
        let root = std::env::temp_dir().join(format!("forkd-spawn-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let env = Env {
            home: root.join("home"),
            runtime: root.join("run"),
        };
        let fleet = Fleet::open(&env).unwrap();
        World { env, fleet }
    }

    fn create(&self) -> String {
        self.fleet
            .create(common::artifacts(), "busybox", &BootOptions::default())
            .unwrap()
            .0
            .id
    }

    fn run(&self, id: &str, script: &str) -> String {
        common::run_ok(&self.fleet, id, script)
    }

    fn spawn(&self, tag: &str, n: usize) -> Vec<Child> {
        self.fleet
            .spawn(tag, n, 2, true, PartialFailure::Keep, &|_, _| {})
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap())
            .collect()
    }

    fn sandbox_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.env.runtime.join("sandboxes"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        common::kill_all(&self.fleet);
        let _ = std::fs::remove_dir_all(self.env.home.parent().unwrap());
        let _ = std::fs::remove_dir_all(&self.env.runtime);
    }
}

/// Parent with memory state (a counting process, a file on the guest's
/// tmpfs) and disk state (a file on the root disk), snapshotted as `tag`.
fn warmed_parent(w: &World, tag: &str) -> String {
    let p = w.create();
    w.run(&p, "echo parent-mem > /tmp/mem.txt; echo parent-disk > /root/disk.txt; sync; \
               (i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done) >/dev/null 2>&1 & \
               echo $! > /tmp/loop.pid");
    std::thread::sleep(Duration::from_millis(500));
    let info = w.fleet.snapshot(&p, tag).unwrap();
    assert!(info.pause_ms > 0.0);
    p
}

#[test]
fn children_inherit_memory_and_disk_and_their_writes_stay_private() {
    let w = World::new("inherit");
    let parent = warmed_parent(&w, "warm");
    let kids = w.spawn("warm", 2);
    let (a, b) = (&kids[0].sandbox.id, &kids[1].sandbox.id);
    for c in [a, b] {
        let out = w.run(
            c,
            "cat /tmp/mem.txt /root/disk.txt; kill -0 $(cat /tmp/loop.pid) && echo loop-alive",
        );
        assert_eq!(out, "parent-mem\nparent-disk\nloop-alive\n", "child {c}");
        // The inherited process keeps running: its counter moves on.
        let n1: u64 = w.run(c, "cat /tmp/count").trim().parse().unwrap();
        std::thread::sleep(Duration::from_millis(800));
        let n2: u64 = w.run(c, "cat /tmp/count").trim().parse().unwrap();
        assert!(n2 > n1, "counter did not advance in {c}: {n1} -> {n2}");
    }
    w.run(
        a,
        "echo child-a > /tmp/mem.txt; echo child-a > /root/disk.txt; sync",
    );
    assert_eq!(
        w.run(b, "cat /tmp/mem.txt /root/disk.txt"),
        "parent-mem\nparent-disk\n"
    );
    assert_eq!(
        w.run(&parent, "cat /tmp/mem.txt /root/disk.txt"),
        "parent-mem\nparent-disk\n"
    );
    assert_eq!(
        w.run(a, "cat /tmp/mem.txt /root/disk.txt"),
        "child-a\nchild-a\n"
    );
    // And the parent's later writes do not reach the children.
    w.run(&parent, "echo parent-later > /root/disk.txt; sync");
    assert_eq!(w.run(b, "cat /root/disk.txt"), "parent-disk\n");
}

#[test]
fn children_are_fork_safe() {
    let w = World::new("forksafe");
    warmed_parent(&w, "fs");
    // Long enough that a child whose clock were not stepped would be seconds
    // behind: its clock stopped at the snapshot.
    std::thread::sleep(Duration::from_millis(2500));
    let kids = w.spawn("fs", 3);
    for c in &kids {
        assert!(
            c.clock_step_ms <= -2000,
            "{} clock step {} ms",
            c.sandbox.id,
            c.clock_step_ms
        );
    }
    let mut randoms = Vec::new();
    for c in &kids {
        // busybox date has no %N; adjtimex prints the clock in microseconds.
        let out = w.run(
            &c.sandbox.id,
            "hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
             adjtimex | awk '/tv_sec/ {s=$2} /tv_usec/ {u=$2} END {printf \"%d%06d\\n\", s, u}'",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], c.sandbox.id, "hostname");
        randoms.push(lines[1].to_string());
        let guest_us: i128 = lines[2]
            .parse()
            .unwrap_or_else(|_| panic!("clock line {:?}", lines[2]));
        let host_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as i128;
        let behind_ms = (host_us - guest_us) / 1000;
        assert!(
            behind_ms.abs() < 1000,
            "guest clock of {} is {behind_ms} ms behind host time (stepped {} ms at spawn)",
            c.sandbox.id,
            c.clock_step_ms
        );
    }
    assert_eq!(randoms[0].len(), 64);
    randoms.sort();
    randoms.dedup();
    assert_eq!(randoms.len(), 3, "children share RNG output");
}

#[test]
fn killing_children_frees_their_processes_and_files() {
    let w = World::new("kill");
    let parent = warmed_parent(&w, "k");
    let kids = w.spawn("k", 2);
    let rows: Vec<_> = w.fleet.list().unwrap();
    assert_eq!(rows.len(), 3);
    for c in &kids {
        let row = rows.iter().find(|r| r.id == c.sandbox.id).unwrap();
        assert!(forkd_vm::process::pid_alive(row.pid, 0));
        w.fleet.kill(&c.sandbox.id).unwrap();
        assert!(
            !forkd_vm::process::pid_alive(row.pid, 0),
            "QEMU {} survived kill",
            row.pid
        );
        // We started it, so we reaped it: no zombie left behind.
        assert!(
            !std::path::Path::new(&format!("/proc/{}", row.pid)).exists(),
            "zombie QEMU {}",
            row.pid
        );
    }
    assert_eq!(
        w.sandbox_dirs().len(),
        1,
        "only the parent's run dir is left: {:?}",
        w.sandbox_dirs()
    );
    assert_eq!(w.fleet.list().unwrap().len(), 1);
    // A sandbox whose QEMU died is shown dead, and kill cleans it up.
    let pid = w.fleet.list().unwrap()[0].pid;
    // SAFETY: our own QEMU child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(w.fleet.list().unwrap()[0].state, SandboxState::Dead);
    let e = w
        .fleet
        .exec(&parent, sh("true"), None, |_, _| {})
        .unwrap_err();
    assert!(e.to_string().contains("is dead"), "{e}");
    w.fleet.kill(&parent).unwrap();
    assert!(w.sandbox_dirs().is_empty());
}

fn assert_refused(w: &World, tag: &str, what: &str) {
    let before = w.sandbox_dirs().len();
    let e = match w
        .fleet
        .spawn(tag, 2, 2, true, PartialFailure::Keep, &|_, _| {})
    {
        Err(e) => e,
        Ok(r) => panic!("spawn from {what} succeeded: {r:?}"),
    };
    assert_eq!(
        w.sandbox_dirs().len(),
        before,
        "a child was started for {what}"
    );
    eprintln!("{what}: {e}");
    let _ = e;
}

#[test]
fn spawn_refuses_missing_truncated_and_corrupt_snapshots_before_starting_qemu() {
    let w = World::new("refuse");
    warmed_parent(&w, "good");
    assert_refused(&w, "nope", "a missing snapshot");
    assert!(matches!(
        w.fleet
            .spawn("bad tag!", 1, 1, true, PartialFailure::Keep, &|_, _| {}),
        Err(CoreError::InvalidName(_))
    ));

    // Copies of the good snapshot, damaged in different ways.
    let good = w.fleet.store().dir("good");
    let damage = |tag: &str, f: &dyn Fn(&Path)| {
        let w2 = &w;
        let info = w2
            .fleet
            .snapshot(&w2.fleet.list().unwrap()[0].id, tag)
            .unwrap();
        f(&info.snapshot.dir);
    };
    damage("trunc", &|d| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join(RAM_IMAGE))
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len / 2).unwrap();
    });
    damage("flip", &|d| {
        let p = d.join(DEVICE_STATE);
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&p, bytes).unwrap();
    });
    damage("gone", &|d| {
        std::fs::remove_file(d.join(RAM_IMAGE)).unwrap()
    });
    for (tag, what, needle) in [
        ("trunc", "a truncated RAM image", "truncated"),
        ("flip", "a corrupted device state", "does not match"),
        ("gone", "a missing RAM image", "missing"),
    ] {
        let e = w
            .fleet
            .spawn(tag, 1, 1, true, PartialFailure::Keep, &|_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{what}: {e}");
        assert_refused(&w, tag, what);
    }
    let _ = good;
    // The good one still spawns.
    assert_eq!(w.spawn("good", 1).len(), 1);
}

#[test]
fn a_child_whose_qemu_dies_during_spawn_is_reported_and_cleaned_up_while_siblings_finish() {
    let w = World::new("dies");
    warmed_parent(&w, "d");
    let sandboxes = w.env.runtime.join("sandboxes");
    let existing = w.sandbox_dirs();
    // Kill the first child's QEMU as soon as it exists (children start one at a time).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let killer = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            for pid in common::processes_mentioning(&sandboxes) {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd);
                if cmd.contains("qemu-system")
                    && cmd.contains("defer")
                    && !existing.iter().any(|e| cmd.contains(&*e.to_string_lossy()))
                {
                    // SAFETY: a QEMU this test started.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    return pid;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        0
    });
    let results = w
        .fleet
        .spawn("d", 3, 1, true, PartialFailure::Keep, &|_, _| {})
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let killed = killer.join().unwrap();
    assert!(killed > 0, "the killer never saw a child QEMU");
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!((failed.len(), ok.len()), (1, 2), "{results:?}");
    eprintln!("reported: {}", failed[0]);
    // Parent + 2 children remain; the failed child left no run dir, row or process.
    assert_eq!(w.sandbox_dirs().len(), 3, "{:?}", w.sandbox_dirs());
    assert_eq!(w.fleet.list().unwrap().len(), 3);
    assert!(!forkd_vm::process::pid_alive(killed, 0));
    for c in ok {
        assert_eq!(w.run(&c.sandbox.id, "cat /tmp/mem.txt"), "parent-mem\n");
    }
}

#[test]
fn rmi_refuses_while_children_run_and_force_overrides() {
    let w = World::new("rmi");
    warmed_parent(&w, "r");
    let kids = w.spawn("r", 1);
    let e = w
        .fleet
        .remove_snapshot("r", RemoveSnapshot::default())
        .unwrap_err();
    assert_eq!(
        e.hint(),
        Some(forkd_ops::Hint::RemoveDependentsOrForce { tag: "r".into() })
    );
    assert!(e.to_string().contains(&kids[0].sandbox.id), "{e}");
    w.fleet.kill(&kids[0].sandbox.id).unwrap();
    w.fleet
        .remove_snapshot("r", RemoveSnapshot::default())
        .unwrap();
    assert!(!w.fleet.store().dir("r").exists());
    assert!(w
        .fleet
        .remove_snapshot("r", RemoveSnapshot::default())
        .unwrap_err()
        .to_string()
        .contains("no snapshot"));
    warmed_parent(&w, "r2");
    let _kid = w.spawn("r2", 1);
    w.fleet.remove_snapshot("r2", FORCE).unwrap();
}

#[test]
fn pool_members_are_taken_first_and_a_dead_member_falls_back_to_a_cold_start() {
    let w = World::new("pool");
    warmed_parent(&w, "p");
    assert_eq!(w.fleet.fill_pool("p", 2).unwrap().started, 2);
    assert_eq!(
        w.fleet.fill_pool("p", 2).unwrap().started,
        0,
        "already full"
    );
    let pooled: Vec<_> = w
        .fleet
        .list()
        .unwrap()
        .into_iter()
        .filter(|s| s.state == SandboxState::Pooled)
        .collect();
    assert_eq!(pooled.len(), 2);
    // One member dies while waiting: the spawn must not hand it out.
    // SAFETY: a QEMU this test started.
    unsafe { libc::kill(pooled[0].pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    let kids = w.spawn("p", 2);
    let from_pool = kids.iter().filter(|c| c.from_pool).count();
    assert_eq!(from_pool, 1, "{kids:?}");
    assert!(kids.iter().any(|c| c.sandbox.id == pooled[1].id));
    for c in &kids {
        assert_eq!(
            w.run(&c.sandbox.id, "hostname; cat /tmp/mem.txt"),
            format!("{}\nparent-mem\n", c.sandbox.id)
        );
    }
    assert!(
        w.fleet
            .list()
            .unwrap()
            .iter()
            .all(|s| s.state == SandboxState::Running),
        "{:?}",
        w.fleet.list()
    );
    assert!(
        !w.sandbox_dirs().iter().any(|d| d.ends_with(&pooled[0].id)),
        "dead member's files remain"
    );
    // rmi --force also clears the pool.
    w.fleet.fill_pool("p", 1).unwrap();
    w.fleet.remove_snapshot("p", FORCE).unwrap();
    assert!(w
        .fleet
        .list()
        .unwrap()
        .iter()
        .all(|s| s.state != SandboxState::Pooled));
}
