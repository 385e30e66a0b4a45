//! `forkd compact` against real guests: a chain made by branching a
//! sandbox, a child of it and a grandchild (three RAM layers, three disk
//! layers) is compacted; `kill -9` of the compacting process at each of its
//! steps leaves the snapshot `ready` and whole; afterwards a child spawned
//! from it sees exactly what a child spawned before saw (the flat RAM image
//! byte for byte, the disk as qemu-img reads it, files and memory in the
//! guest), a snapshot layered on it before still spawns, `info` reports one
//! layer of each, a second compact has nothing to do, and a bad tag is
//! named; through a daemon (`--remote`) the output is byte-identical. Then
//! the compacted snapshot is pushed to a real `docker-registry` and a pull
//! of it is killed while publishing: it leaves a row (`writing`, then
//! `failed`) and no directory, `rmi --failed` removes it, a retry publishes
//! it. One boot and a few spawns: the chain is shared by every check.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use forkd_core::{Env, Fleet};
use serde_json::Value;

struct World {
    home: PathBuf,
    runtime: PathBuf,
}

impl World {
    fn new(name: &str) -> World {
        let base = format!("forkd-compact-{name}-{}", std::process::id());
        let home = std::env::temp_dir().join(&base);
        let runtime = PathBuf::from("/dev/shm").join(&base);
        let _ = std::fs::remove_dir_all(&home);
        let _ = std::fs::remove_dir_all(&runtime);
        std::fs::create_dir_all(&home).unwrap();
        let shared = std::env::var_os("FORKD_HOME")
            .map(PathBuf::from)
            .expect("FORKD_HOME (scripts/test.sh sets it)");
        for d in ["kernels", "images", "initramfs"] {
            if shared.join(d).exists() {
                std::os::unix::fs::symlink(shared.join(d), home.join(d)).unwrap();
            }
        }
        World { home, runtime }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_forkd"));
        c.env("FORKD_HOME", &self.home)
            .env("FORKD_RUNTIME_DIR", &self.runtime)
            .env_remove("FORKD_GUEST_MEMORY_LIMIT_MIB")
            .env_remove(forkd_core::faultpoint::STOP_AT_VAR);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// Runs `forkd ARGS`, asserts success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "forkd {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn sh(&self, id: &str, script: &str) -> String {
        self.ok(&["exec", id, "--", "sh", "-c", script])
    }

    fn spawn1(&self, tag: &str) -> String {
        let out = self.ok(&["spawn", tag]);
        out.split_whitespace().next().unwrap().to_string()
    }

    fn fleet(&self) -> Fleet {
        Fleet::open(&Env {
            home: self.home.clone(),
            runtime: self.runtime.clone(),
        })
        .unwrap()
    }

    fn info(&self, tag: &str) -> Value {
        serde_json::from_str(&self.ok(&["info", tag, "--json"])).unwrap()
    }

    fn status(&self, tag: &str) -> String {
        let v: Value = serde_json::from_str(&self.ok(&["snapshots", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|s| s["tag"] == tag)
            .map(|s| s["status"].as_str().unwrap().to_string())
            .unwrap_or_default()
    }

    /// Starts `forkd ARGS` with fault point `point` set, waits until it is
    /// stopped there, runs `meanwhile`, and kills it with SIGKILL.
    fn kill_at(&self, args: &[&str], point: &str, meanwhile: impl FnOnce()) {
        let mut child = self
            .command()
            .env(forkd_core::faultpoint::STOP_AT_VAR, point)
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stat = format!("/proc/{}/stat", child.id());
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let state = std::fs::read_to_string(&stat).unwrap_or_default();
            let state = state.rsplit(')').next().unwrap_or("").trim_start();
            if state.starts_with('T') {
                break;
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!("{args:?} ended ({st}) before reaching {point}");
            }
            assert!(Instant::now() < deadline, "{args:?} never reached {point}");
            std::thread::sleep(Duration::from_millis(20));
        }
        meanwhile();
        child.kill().unwrap();
        child.wait().unwrap();
        eprintln!("{args:?} killed at {point}");
    }
}

/// A `docker-registry` on a free loopback port, with its own storage.
struct Registry {
    child: std::process::Child,
    port: u16,
    dir: PathBuf,
}

impl Registry {
    fn start() -> Registry {
        let dir =
            std::env::temp_dir().join(format!("forkd-compact-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry { child, port, dir }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills the daemon a test started, whatever happens.
struct DaemonGuard(std::process::Child);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.run(&["kill", "--all"]);
        let _ = std::fs::remove_dir_all(&self.home);
        let _ = std::fs::remove_dir_all(&self.runtime);
    }
}

const SEE: &str = "cat /root/gen /tmp/m; echo; cat /proc/$(cat /tmp/holder.pid)/environ | tr '\\0' '\\n' | grep ^MARK=";

#[test]
fn a_compacted_chain_spawns_exactly_what_it_did_and_survives_kill_9_at_every_step() {
    let w = World::new("chain");
    // A chain: g0 (full) <- g1 (layer, from a child) <- g2 (from a grandchild).
    let p = w.ok(&["create", "--mem", "256"]).trim().to_string();
    w.sh(
        &p,
        "echo gen0 > /root/gen; echo mem0 > /tmp/m; MARK=m0 sleep 100000 & echo $! > /tmp/holder.pid; sync",
    );
    w.ok(&["branch", &p, "--tag", "g0"]);
    let c = w.spawn1("g0");
    w.sh(&c, "echo gen1 >> /root/gen; echo mem1 >> /tmp/m; MARK=m1 sleep 100000 & echo $! > /tmp/holder.pid; sync");
    w.ok(&["branch", &c, "--tag", "g1"]);
    let gc = w.spawn1("g1");
    w.sh(&gc, "echo gen2 >> /root/gen; echo mem2 >> /tmp/m; MARK=m2 sleep 100000 & echo $! > /tmp/holder.pid; dd if=/dev/urandom of=/root/blob bs=64k count=16 2>/dev/null; md5sum /root/blob > /root/blob.md5; sync");
    w.ok(&["branch", &gc, "--tag", "g2"]);
    let before = w.spawn1("g2");
    let seen_before = w.sh(&before, SEE);
    assert_eq!(
        seen_before,
        "gen0\ngen1\ngen2\nmem0\nmem1\nmem2\n\nMARK=m2\n"
    );
    assert_eq!(
        w.sh(&before, "md5sum -c /root/blob.md5"),
        "/root/blob: OK\n"
    );
    // A snapshot layered on g2, made before g2 is compacted.
    w.sh(&before, "echo gen3 >> /root/gen; sync");
    w.ok(&["branch", &before, "--tag", "g3"]);

    let d = w.info("g2");
    assert_eq!(
        (d["layers"]["ram"].as_u64(), d["layers"]["disk"].as_u64()),
        (Some(3), Some(3)),
        "{d}"
    );
    let f = w.fleet();
    let ram_before = std::fs::read(f.ram_image_of("g2").unwrap()).unwrap();
    let g3_ram_before = std::fs::read(f.ram_image_of("g3").unwrap()).unwrap();
    let disk = f.store().dir("g2").join("disk.qcow2");
    let old_disk = w.home.join("g2-disk-before.qcow2");
    std::fs::hard_link(&disk, &old_disk).unwrap();
    drop(f);

    // kill -9 at every step: the snapshot stays ready and whole.
    for point in ["compact:ram", "compact:disk", "compact:swap"] {
        w.kill_at(&["compact", "g2"], point, || {});
        assert_eq!(w.status("g2"), "ready", "after a kill at {point}");
        let f = w.fleet();
        let m = f.store().verify(&f.db(), "g2").unwrap();
        assert_eq!(
            m.ram_parent.as_deref(),
            Some("g1"),
            "after a kill at {point}"
        );
        assert_eq!(w.info("g2")["layers"]["ram"].as_u64(), Some(3));
    }

    let out: Value = serde_json::from_str(&w.ok(&["compact", "g2", "--json"])).unwrap();
    eprintln!("compact: {out}");
    assert_eq!(out["compacted"], true);
    assert_eq!(out["before"]["layers"]["ram"], 3);
    assert_eq!(out["before"]["layers"]["disk"], 3);
    assert_eq!(out["after"]["layers"]["ram"], 1);
    assert_eq!(out["after"]["layers"]["disk"], 1);
    assert_eq!(out["released"], serde_json::json!(["g1", "g0"]));
    let d = w.info("g2");
    assert_eq!(
        (d["layers"]["ram"].as_u64(), d["layers"]["disk"].as_u64()),
        (Some(1), Some(1)),
        "{d}"
    );
    assert_eq!(w.status("g2"), "ready");

    // Exactly the same memory and disk.
    let f = w.fleet();
    let ram_after = std::fs::read(f.ram_image_of("g2").unwrap()).unwrap();
    assert!(ram_after == ram_before, "the flat RAM image changed");
    assert!(forkd_vm::disk::same_contents(&old_disk, &disk).unwrap());
    assert_eq!(forkd_vm::disk::backing_chain(&disk).unwrap().len(), 1);
    let g3_ram_after = std::fs::read(f.ram_image_of("g3").unwrap()).unwrap();
    assert!(g3_ram_after == g3_ram_before, "g3's flat RAM image changed");
    drop(f);
    // And the guests see it.
    let after = w.spawn1("g2");
    assert_eq!(w.sh(&after, SEE), seen_before);
    assert_eq!(w.sh(&after, "md5sum -c /root/blob.md5"), "/root/blob: OK\n");
    let on_g3 = w.spawn1("g3");
    assert_eq!(w.sh(&on_g3, "cat /root/gen"), "gen0\ngen1\ngen2\ngen3\n");
    // What is below is kept and healthy.
    for tag in ["g0", "g1", "g2", "g3"] {
        assert_eq!(w.status(tag), "ready", "{tag}");
    }

    // Flat already: nothing to do (said on stderr, nothing written).
    let again = w.run(&["compact", "g2"]);
    assert!(again.status.success());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("nothing to do"), "{said}");
    let again: Value = serde_json::from_str(&w.ok(&["compact", "g0", "--json"])).unwrap();
    assert_eq!(again["compacted"], false);
    // A bad tag is named.
    let bad = w.run(&["compact", "nope"]);
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(said.contains("no snapshot `nope`"), "{said}");

    // Through the daemon: the same words, and a real compaction of g1.
    let socket = w.runtime.join("api.sock");
    let mut daemon = DaemonGuard(
        w.command()
            .args(["daemon", "--listen"])
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let remote = socket.to_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !w.run(&["--remote", &remote, "snapshots"]).status.success() {
        assert!(Instant::now() < deadline, "no daemon");
        std::thread::sleep(Duration::from_millis(100));
    }
    for args in [
        &["compact", "g2"][..],
        &["compact", "g2", "--json"],
        &["compact", "nope"],
    ] {
        let local = w.run(args);
        let mut remote_args = vec!["--remote", remote.as_str()];
        remote_args.extend_from_slice(args);
        let over = w.run(&remote_args);
        assert_eq!(
            (local.status.code(), &local.stdout, &local.stderr),
            (over.status.code(), &over.stdout, &over.stderr),
            "{args:?}: local and remote differ"
        );
    }
    let f = w.fleet();
    let g1_ram = std::fs::read(f.ram_image_of("g1").unwrap()).unwrap();
    let out: Value =
        serde_json::from_str(&w.ok(&["--remote", &remote, "compact", "g1", "--json"])).unwrap();
    assert_eq!(out["before"]["layers"]["ram"], 2, "{out}");
    assert_eq!(out["after"]["layers"]["ram"], 1, "{out}");
    assert!(std::fs::read(f.ram_image_of("g1").unwrap()).unwrap() == g1_ram);
    drop(f);
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();

    // The compacted snapshot travels alone, and a pull killed while it
    // publishes leaves a row (writing, then failed), never a directory
    // without one; `rmi --failed` removes it and a retry publishes it.
    let registry = Registry::start();
    let reference = format!("127.0.0.1:{}/forkd/compacted:v1", registry.port);
    let pushed: Value =
        serde_json::from_str(&w.ok(&["push", "g2", &reference, "--insecure", "--json"])).unwrap();
    assert_eq!(pushed["snapshots"], serde_json::json!(["g2"]));
    let b = World::new("pulled");
    let pull = ["pull", reference.as_str(), "--insecure", "--json"];
    b.kill_at(
        &pull,
        forkd_core::transfer::PULL_STOP_BEFORE_PUBLISH,
        || {
            assert_eq!(b.status("g2"), "writing");
            assert!(!b.home.join("snapshots").join("g2").exists());
        },
    );
    assert_eq!(b.status("g2"), "failed");
    assert!(!b.home.join("snapshots").join("g2").exists());
    b.ok(&["rmi", "--failed"]);
    assert_eq!(b.status("g2"), "");
    let pulled: Value = serde_json::from_str(&b.ok(&pull)).unwrap();
    assert_eq!(pulled["published"], serde_json::json!(["g2"]));
    assert_eq!(b.status("g2"), "ready");
    let fb = b.fleet();
    fb.store().verify(&fb.db(), "g2").unwrap();
    let pulled_ram = std::fs::read(fb.ram_image_of("g2").unwrap()).unwrap();
    assert!(pulled_ram == ram_before, "the pulled RAM image differs");
}
