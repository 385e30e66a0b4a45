//! Children on huge pages (`forkd spawn --hugepages`) against a real QEMU
//! and kernel, as root (forkd manages the host's surplus pool):
//! - each child maps a hugetlb copy of its snapshot's image on 2 MiB pages
//!   (QEMU's smaps), sees the parent's memory and disk, and holds a pool
//!   claim for as long as its QEMU runs;
//! - a live branch of such a child, taken while its guest writes a disk log
//!   and a RAM counter as fast as it can, is one instant of RAM and disk: a
//!   grandchild reads the log 0..n with nothing missing, n the counter or
//!   one ahead;
//! - a spawn whose copy finds the pool dry (another program took every
//!   page after forkd claimed them) fails naming it and leaves no child, no
//!   claim and no QEMU; so does one where forkd may not manage the pool;
//! - a spawn killed (SIGKILL) inside its copy gives the copied pages back,
//!   leaves no child, and its claim goes by the next spawn; a create killed
//!   after its claim, before its QEMU, leaves a claim the next create drops.

mod common;
#[path = "../../forkd-core/tests/common/hog.rs"]
mod hog;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::World;
use hog::Hog;
use serde_json::Value;

const LEDGER: &str = forkd_core::hugepool::LEDGER_DIR;

/// `(KernelPageSize, hugetlb pages mapped)` in kB of QEMU `pid`'s mapping
/// of the children's hugetlb copy (smaps counts those outside `Rss`).
fn child_ram_mapping(pid: u64) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut lines = smaps.lines();
    while let Some(l) = lines.next() {
        if !l.contains("/memfd:forkd-child-ram") {
            continue;
        }
        let (mut page, mut rss) = (None, 0);
        for f in lines.by_ref() {
            let kb = |f: &str| -> u64 { f.split_whitespace().nth(1).unwrap().parse().unwrap() };
            if f.starts_with("KernelPageSize:") {
                page = Some(kb(f));
            } else if f.starts_with("Shared_Hugetlb:") || f.starts_with("Private_Hugetlb:") {
                rss += kb(f);
            } else if f.starts_with("VmFlags:") {
                break;
            }
        }
        return page.map(|p| (p, rss));
    }
    None
}

fn pid_of(w: &World, id: &str) -> u64 {
    let v: Value = serde_json::from_str(&w.cli_ok(&["ls", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in ls: {v}"))["pid"]
        .as_u64()
        .unwrap()
}

fn ledger_pages(id: &str) -> Option<u64> {
    let text = std::fs::read_to_string(PathBuf::from(LEDGER).join(format!("sb-{id}"))).ok()?;
    forkd_core::hugepool::Entry::parse(&text).map(|e| e.pages)
}

#[test]
fn children_on_huge_pages_branch_one_instant_and_fail_cleanly_on_a_dry_pool() {
    let w = World::new("hugechild");
    let p = w.cli_ok(&["create", "--mem", "256"]).trim().to_string();
    w.cli_sh(&p, "echo warm > /tmp/warm; echo base > /root/base; sync");
    w.cli_ok(&["branch", &p, "--tag", "hp0"]);

    // Two children on huge pages: the copy is theirs, on 2 MiB pages.
    let kids = w.cli_spawn(&["hp0", "-n", "2", "--hugepages"]);
    assert_eq!(kids.len(), 2);
    for c in &kids {
        assert_eq!(w.cli_sh(c, "cat /tmp/warm /root/base"), "warm\nbase\n");
        let pid = pid_of(&w, c);
        let (page_kb, mapped_kb) = child_ram_mapping(pid)
            .unwrap_or_else(|| panic!("QEMU {pid} maps no hugetlb copy of the image"));
        assert_eq!(page_kb, 2048, "the child's RAM is on 2 MiB pages");
        assert!(mapped_kb > 0, "the child maps none of the copy's pages");
        // Its claim: the image it shares plus its own copies, 2 x 128 pages.
        assert_eq!(ledger_pages(c), Some(256), "{c}'s pool claim");
    }
    // Where forkd may not manage the pool (here: opted out), asking for
    // huge pages fails naming why and starts nothing.
    let before = w.cli_ids();
    let out = w
        .command()
        .env("FORKD_HUGEPAGES", "off")
        .args(["spawn", "hp0", "--hugepages"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("children on huge pages need forkd to manage the host's huge-page pool")
            && err.contains("FORKD_HUGEPAGES=off"),
        "{err}"
    );
    assert_eq!(before, w.cli_ids());
    // A child without --hugepages maps the tmpfs image, as before.
    let plain = w.cli_spawn(&["hp0"]).remove(0);
    assert!(child_ram_mapping(pid_of(&w, &plain)).is_none());
    assert_eq!(ledger_pages(&plain), None);

    // One instant of RAM and disk in a live branch of a huge-page child.
    let c = &kids[0];
    w.cli_sh(
        c,
        "(i=0; while :; do echo $i >> /root/disk-log; sync; echo $i > /tmp/ram-counter; i=$((i+1)); done) >/dev/null 2>&1 & echo $! > /tmp/loop.pid",
    );
    std::thread::sleep(Duration::from_secs(2));
    let b: Value =
        serde_json::from_str(&w.cli_ok(&["branch", c, "--tag", "hc1", "--json"])).unwrap();
    eprintln!("branch of a huge-page child: {b}");
    let gc = w.cli_spawn(&["hc1"]).remove(0);
    let seen = w.cli_sh(
        &gc,
        "kill $(cat /tmp/loop.pid); sync; echo 3 > /proc/sys/vm/drop_caches; cat /tmp/ram-counter; echo --; cat /root/disk-log",
    );
    let (ram, log) = seen.split_once("--\n").unwrap();
    let ram: u64 = ram.trim().parse().unwrap();
    let log: Vec<u64> = log.lines().map(|l| l.parse().unwrap()).collect();
    assert!(
        log.iter().enumerate().all(|(i, &n)| n == i as u64),
        "the disk log has gaps or doubles"
    );
    let last = *log.last().unwrap();
    assert!(
        last == ram || last == ram + 1,
        "guest RAM says {ram}, its disk log ends at {last}"
    );
    // The source child runs on.
    assert_eq!(w.cli_sh(c, "cat /tmp/warm"), "warm\n");

    for id in kids.iter().chain([&plain, &gc]) {
        w.cli_ok(&["kill", id]);
        assert_eq!(ledger_pages(id), None, "{id}'s claim outlived it");
    }

    // The pool runs dry between forkd's claim and its copy: stopped there,
    // another program takes every page; the spawn fails and names it.
    let before = w.cli_ids();
    let spawner = spawn_stopped(&w, "spawn:huge-copy", "before its copy");
    let pid = spawner.id();
    let claimed = || spawner_claims(pid);
    assert!(claimed(), "the copy is claimed before it is made");
    let hog = Hog::take_all(4096);
    assert!(hog.held > 0, "the hog got no page");
    // SAFETY: kill sends SIGCONT to our own child process.
    unsafe { libc::kill(spawner.id() as libc::pid_t, libc::SIGCONT) };
    let out = spawner.wait_with_output().unwrap();
    drop(hog);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a spawn on a dry pool succeeded");
    assert!(
        err.contains("huge-page pool could not give page"),
        "stderr: {err}"
    );
    assert!(!claimed(), "a failed copy keeps its claim");
    assert_eq!(before, w.cli_ids(), "a failed spawn left a sandbox");
    // And with pages to spare again, it spawns.
    let again = w.cli_spawn(&["hp0", "--hugepages"]);
    assert_eq!(again.len(), 1);

    // Killed (SIGKILL) in the middle of its copy: the pages it copied go
    // back to the host with it, it leaves no child and no QEMU, and its
    // claim is gone by the next spawn. No other guest runs meanwhile, so
    // nothing else takes huge pages.
    w.cli_ok(&["kill", &again[0], &p]);
    let before = w.cli_ids();
    let surplus = || forkd_core::hugepool::surplus_in_use().unwrap();
    let surplus_before = surplus();
    let mut spawner = spawn_stopped(&w, forkd_vm::hugeram::COPY_STARTED, "inside its copy");
    let pid = spawner.id();
    let claimed = || spawner_claims(pid);
    assert!(claimed(), "the copy runs under a claim");
    assert!(
        copy_bytes(spawner.id()) > 0,
        "the stopped copy holds no huge page"
    );
    spawner.kill().unwrap();
    spawner.wait().unwrap();
    let t0 = std::time::Instant::now();
    while surplus() > surplus_before && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        surplus() <= surplus_before,
        "the killed copy's pages did not go back: {} surplus pages in use, {surplus_before} before",
        surplus()
    );
    assert_eq!(before, w.cli_ids(), "a killed spawn left a sandbox");
    assert_eq!(w.cli_spawn(&["hp0", "--hugepages"]).len(), 1);
    assert!(
        !claimed(),
        "a killed spawner's claim outlived the next spawn"
    );

    // A create killed (SIGKILL) after its claim, before its QEMU exists:
    // the claim is that process's, and the next look at the ledger drops
    // it (not 15 minutes later). A create that finishes hands its claim
    // to its QEMU.
    let entries = || -> Vec<String> {
        std::fs::read_dir(LEDGER)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("sb-"))
            .collect()
    };
    let old = entries();
    let mut creator = w
        .command()
        .env(
            forkd_core::faultpoint::STOP_AT_VAR,
            forkd_core::fleet::STOP_AFTER_CLAIM,
        )
        .args(["create", "--mem", "256"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_stopped(
        &mut creator,
        "the create (stopped after its claim)",
        Duration::from_secs(60),
    );
    let new: Vec<String> = entries().into_iter().filter(|n| !old.contains(n)).collect();
    assert_eq!(new.len(), 1, "one claim for the create: {new:?}");
    let entry = PathBuf::from(LEDGER).join(&new[0]);
    let held = forkd_core::hugepool::Entry::parse(&std::fs::read_to_string(&entry).unwrap())
        .expect("a ledger entry");
    assert_eq!(held.pid, creator.id(), "the claim is not the creator's");
    creator.kill().unwrap();
    creator.wait().unwrap();
    let fresh = w.cli_ok(&["create", "--mem", "256"]).trim().to_string();
    assert!(
        !entry.exists(),
        "the killed create's claim outlived the next create"
    );
    let own = forkd_core::hugepool::Entry::parse(
        &std::fs::read_to_string(PathBuf::from(LEDGER).join(format!("sb-{fresh}"))).unwrap(),
    )
    .expect("the new sandbox's claim");
    assert_eq!(
        u64::from(own.pid),
        pid_of(&w, &fresh),
        "the claim is not its QEMU's"
    );
}

/// `spawn hp0 --hugepages`, stopped at fault point `point` (`where_` says
/// where, for the error if it never gets there).
fn spawn_stopped(w: &World, point: &str, where_: &str) -> std::process::Child {
    let mut spawner = w
        .command()
        .env(forkd_core::faultpoint::STOP_AT_VAR, point)
        .args(["spawn", "hp0", "--hugepages"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_stopped(
        &mut spawner,
        &format!("the spawn (stopped {where_})"),
        Duration::from_secs(120),
    );
    spawner
}

/// Whether spawner `pid` holds a pool claim for its hugetlb copy.
fn spawner_claims(pid: u32) -> bool {
    let claim = format!("sb-spawn-{pid}-");
    std::fs::read_dir(LEDGER)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(&claim))
}

/// Bytes allocated to the hugetlb copy process `pid` holds open.
fn copy_bytes(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| {
                t.to_string_lossy()
                    .starts_with(&format!("/memfd:{}", forkd_vm::hugeram::MEMFD_NAME))
            })
        })
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}
