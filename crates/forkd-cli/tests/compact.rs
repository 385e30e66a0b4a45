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

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::registry::Registry;
use common::World;
use forkd_core::{Env, Fleet};
use serde_json::Value;

/// Runs `forkd ARGS` on this host (no daemon in the way).
fn run(w: &World, args: &[&str]) -> Output {
    w.command().args(args).output().unwrap()
}

/// `forkd --remote <w's daemon> ARGS`.
fn run_remote(w: &World, args: &[&str]) -> Output {
    w.command()
        .arg("--remote")
        .arg(&w.socket)
        .args(args)
        .output()
        .unwrap()
}

fn spawn1(w: &World, tag: &str) -> String {
    w.cli_spawn(&[tag]).remove(0)
}

fn fleet(w: &World) -> Fleet {
    Fleet::open(&Env {
        home: w.home.clone(),
        runtime: w.runtime.clone(),
    })
    .unwrap()
}

fn info(w: &World, tag: &str) -> Value {
    serde_json::from_str(&w.cli_ok(&["info", tag, "--json"])).unwrap()
}

/// The snapshot's status as `forkd snapshots` reports it ("" when absent).
fn status(w: &World, tag: &str) -> String {
    let v: Value = serde_json::from_str(&w.cli_ok(&["snapshots", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|s| s["tag"] == tag)
        .map(|s| s["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Starts `forkd ARGS` with fault point `point` set, waits until it is
/// stopped there, runs `meanwhile`, and kills it with SIGKILL.
fn kill_at(w: &World, args: &[&str], point: &str, meanwhile: impl FnOnce()) {
    let mut child = w
        .command()
        .env(forkd_core::faultpoint::STOP_AT_VAR, point)
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::wait_stopped(
        &mut child,
        &format!("forkd {args:?}"),
        Duration::from_secs(300),
    );
    meanwhile();
    child.kill().unwrap();
    child.wait().unwrap();
    eprintln!("{args:?} killed at {point}");
}

const SEE: &str = "cat /root/gen /tmp/m; echo; cat /proc/$(cat /tmp/holder.pid)/environ | tr '\\0' '\\n' | grep ^MARK=";

#[test]
fn a_compacted_chain_spawns_exactly_what_it_did_and_survives_kill_9_at_every_step() {
    let w = World::new("compact");
    // A chain: g0 (full) <- g1 (layer, from a child) <- g2 (from a grandchild).
    let p = w.cli_ok(&["create", "--mem", "256"]).trim().to_string();
    w.sh(
        &p,
        "echo gen0 > /root/gen; echo mem0 > /tmp/m; MARK=m0 sleep 100000 & echo $! > /tmp/holder.pid; sync",
    );
    w.cli_ok(&["branch", &p, "--tag", "g0"]);
    let c = spawn1(&w, "g0");
    w.cli_sh(&c, "echo gen1 >> /root/gen; echo mem1 >> /tmp/m; MARK=m1 sleep 100000 & echo $! > /tmp/holder.pid; sync");
    w.cli_ok(&["branch", &c, "--tag", "g1"]);
    let gc = spawn1(&w, "g1");
    w.cli_sh(&gc, "echo gen2 >> /root/gen; echo mem2 >> /tmp/m; MARK=m2 sleep 100000 & echo $! > /tmp/holder.pid; dd if=/dev/urandom of=/root/blob bs=64k count=16 2>/dev/null; md5sum /root/blob > /root/blob.md5; sync");
    w.cli_ok(&["branch", &gc, "--tag", "g2"]);
    let before = spawn1(&w, "g2");
    let seen_before = w.cli_sh(&before, SEE);
    assert_eq!(
        seen_before,
        "gen0\ngen1\ngen2\nmem0\nmem1\nmem2\n\nMARK=m2\n"
    );
    assert_eq!(
        w.cli_sh(&before, "md5sum -c /root/blob.md5"),
        "/root/blob: OK\n"
    );
    // A snapshot layered on g2, made before g2 is compacted.
    w.cli_sh(&before, "echo gen3 >> /root/gen; sync");
    w.cli_ok(&["branch", &before, "--tag", "g3"]);

    let d = info(&w, "g2");
    assert_eq!(
        (d["layers"]["ram"].as_u64(), d["layers"]["disk"].as_u64()),
        (Some(3), Some(3)),
        "{d}"
    );
    let f = fleet(&w);
    let ram_before = std::fs::read(f.ram_image_of("g2").unwrap()).unwrap();
    let g3_ram_before = std::fs::read(f.ram_image_of("g3").unwrap()).unwrap();
    let disk = f.store().dir("g2").join("disk.qcow2");
    let old_disk = w.home.join("g2-disk-before.qcow2");
    std::fs::hard_link(&disk, &old_disk).unwrap();
    drop(f);

    // kill -9 at every step: the snapshot stays ready and whole.
    for point in ["compact:ram", "compact:disk", "compact:swap"] {
        kill_at(&w, &["compact", "g2"], point, || {});
        assert_eq!(status(&w, "g2"), "ready", "after a kill at {point}");
        let f = fleet(&w);
        let m = f.store().verify(&f.db(), "g2").unwrap();
        assert_eq!(
            m.ram_parent.as_deref(),
            Some("g1"),
            "after a kill at {point}"
        );
        assert_eq!(info(&w, "g2")["layers"]["ram"].as_u64(), Some(3));
    }

    let out: Value = serde_json::from_str(&w.cli_ok(&["compact", "g2", "--json"])).unwrap();
    eprintln!("compact: {out}");
    assert_eq!(out["compacted"], true);
    assert_eq!(out["before"]["layers"]["ram"], 3);
    assert_eq!(out["before"]["layers"]["disk"], 3);
    assert_eq!(out["after"]["layers"]["ram"], 1);
    assert_eq!(out["after"]["layers"]["disk"], 1);
    assert_eq!(out["released"], serde_json::json!(["g1", "g0"]));
    let d = info(&w, "g2");
    assert_eq!(
        (d["layers"]["ram"].as_u64(), d["layers"]["disk"].as_u64()),
        (Some(1), Some(1)),
        "{d}"
    );
    assert_eq!(status(&w, "g2"), "ready");

    // Exactly the same memory and disk.
    let f = fleet(&w);
    let ram_after = std::fs::read(f.ram_image_of("g2").unwrap()).unwrap();
    assert!(ram_after == ram_before, "the flat RAM image changed");
    assert!(forkd_vm::disk::same_contents(&old_disk, &disk).unwrap());
    assert_eq!(forkd_vm::disk::backing_chain(&disk).unwrap().len(), 1);
    let g3_ram_after = std::fs::read(f.ram_image_of("g3").unwrap()).unwrap();
    assert!(g3_ram_after == g3_ram_before, "g3's flat RAM image changed");
    drop(f);
    // And the guests see it.
    let after = spawn1(&w, "g2");
    assert_eq!(w.cli_sh(&after, SEE), seen_before);
    assert_eq!(
        w.cli_sh(&after, "md5sum -c /root/blob.md5"),
        "/root/blob: OK\n"
    );
    let on_g3 = spawn1(&w, "g3");
    assert_eq!(
        w.cli_sh(&on_g3, "cat /root/gen"),
        "gen0\ngen1\ngen2\ngen3\n"
    );
    // What is below is kept and healthy.
    for tag in ["g0", "g1", "g2", "g3"] {
        assert_eq!(status(&w, tag), "ready", "{tag}");
    }

    // Flat already: nothing to do (said on stderr, nothing written).
    let again = run(&w, &["compact", "g2"]);
    assert!(again.status.success());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(said.contains("nothing to do"), "{said}");
    let again: Value = serde_json::from_str(&w.cli_ok(&["compact", "g0", "--json"])).unwrap();
    assert_eq!(again["compacted"], false);
    // A bad tag is named.
    let bad = run(&w, &["compact", "nope"]);
    assert!(!bad.status.success());
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(said.contains("no snapshot `nope`"), "{said}");

    // Through the daemon: the same words, and a real compaction of g1.
    for args in [
        &["compact", "g2"][..],
        &["compact", "g2", "--json"],
        &["compact", "nope"],
    ] {
        let (local, over) = (run(&w, args), run_remote(&w, args));
        assert_eq!(
            (local.status.code(), &local.stdout, &local.stderr),
            (over.status.code(), &over.stdout, &over.stderr),
            "{args:?}: local and remote differ"
        );
    }
    let f = fleet(&w);
    let g1_ram = std::fs::read(f.ram_image_of("g1").unwrap()).unwrap();
    let out = run_remote(&w, &["compact", "g1", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let out: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out["before"]["layers"]["ram"], 2, "{out}");
    assert_eq!(out["after"]["layers"]["ram"], 1, "{out}");
    assert!(std::fs::read(f.ram_image_of("g1").unwrap()).unwrap() == g1_ram);
    drop(f);

    // The compacted snapshot travels alone, and a pull killed while it
    // publishes leaves a row (writing, then failed), never a directory
    // without one; `rmi --failed` removes it and a retry publishes it.
    let registry = Registry::start();
    let reference = format!("127.0.0.1:{}/forkd/compacted:v1", registry.port);
    let pushed: Value =
        serde_json::from_str(&w.cli_ok(&["push", "g2", &reference, "--insecure", "--json"]))
            .unwrap();
    assert_eq!(pushed["snapshots"], serde_json::json!(["g2"]));
    let b = World::new("pulled");
    let pull = ["pull", reference.as_str(), "--insecure", "--json"];
    kill_at(
        &b,
        &pull,
        forkd_core::transfer::PULL_STOP_BEFORE_PUBLISH,
        || {
            assert_eq!(status(&b, "g2"), "writing");
            assert!(!b.home.join("snapshots").join("g2").exists());
        },
    );
    // The next command fails the orphaned `writing` row once it is older
    // than the writers' grace (10 s: a branch's writer takes its lock after
    // the row exists); until then it stays `writing`.
    let t = Instant::now();
    while status(&b, "g2") == "writing" && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(status(&b, "g2"), "failed");
    assert!(!b.home.join("snapshots").join("g2").exists());
    b.cli_ok(&["rmi", "--failed"]);
    assert_eq!(status(&b, "g2"), "");
    let pulled: Value = serde_json::from_str(&b.cli_ok(&pull)).unwrap();
    assert_eq!(pulled["published"], serde_json::json!(["g2"]));
    assert_eq!(status(&b, "g2"), "ready");
    let fb = fleet(&b);
    fb.store().verify(&fb.db(), "g2").unwrap();
    let pulled_ram = std::fs::read(fb.ram_image_of("g2").unwrap()).unwrap();
    assert!(pulled_ram == ram_before, "the pulled RAM image differs");
}
