//! `bench/branch`: the BRANCH pause, live vs full, by guest size.
//!
//! For each size (default 512 MiB, 2 GiB, 8 GiB) one sandbox runs a
//! memory-dirtying workload (forkd-memtest sweeping a quarter of its RAM) and
//! a 1 ms heartbeat whose output the host timestamps. It is branched `--count`
//! times live and `--full-count` times full, in the same run. Per branch: the
//! pause from QEMU's STOP/RESUME events, QEMU's own downtime figure, the
//! largest gap between heartbeat lines the host saw around the branch, and
//! the time until the snapshot was ready. Writes `bench/results/branch.{json,md}`.
//!
//! `--hugepages` backs each sandbox's RAM with 2 MiB hugetlb pages (the host
//! needs `vm.nr_hugepages` reserved), `--prealloc` populates it at start;
//! full branches copy the RAM file and are skipped with `--hugepages`.
//!
//!     cargo run --release -p forkd-bench --bin branch -- [--sizes 512,2048,8192] [--count 20] [--full-count 5] [--hugepages] [--prealloc] [--out NAME]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkd_bench::{write_results, Machine, Stats};
use forkd_core::branch::{Mode, WriterLaunch};
use forkd_core::{ArtifactOptions, BootOptions, Env, Fleet};

/// One branch: its mode, what it reported, the heartbeat gap around it.
type Run = (Mode, forkd_core::branch::BranchInfo, f64);

struct Cleanup<'a>(&'a Fleet, std::path::PathBuf);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for s in self.0.list().unwrap_or_default() {
            let _ = self.0.kill(&s.id);
        }
        for s in self.0.db().list_snapshots().unwrap_or_default() {
            let _ = self.0.remove_snapshot(&s.tag, true);
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn parse_list(v: Option<String>, what: &str) -> Result<Vec<u64>> {
    v.context(what.to_string())?
        .split(',')
        .map(|x| x.parse().with_context(|| format!("{what}: {x:?}")))
        .collect()
}

fn main() -> Result<()> {
    let (mut sizes, mut count, mut full_count) = (vec![512u64, 2048, 8192], 20usize, 5usize);
    let mut out = String::from("branch");
    let (mut huge_pages, mut prealloc) = (forkd_vm::HugePages::Off, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--sizes" => sizes = parse_list(args.next(), "--sizes 512,2048")?,
            "--count" => count = args.next().context("--count N")?.parse()?,
            "--full-count" => full_count = args.next().context("--full-count N")?.parse()?,
            "--out" => out = args.next().context("--out NAME")?,
            "--hugepages" => huge_pages = forkd_vm::HugePages::Hugetlb,
            "--prealloc" => prealloc = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if count < 20 {
        eprintln!("note: fewer than 20 live branches per size; p99 is then the maximum");
    }
    let artifacts =
        forkd_core::artifacts::ensure(&Env::from_process(), &ArtifactOptions::default(), &|m| {
            eprintln!("{m}")
        })?;
    // State, snapshots and RAM all on tmpfs: branches of GiBs are not disk benchmarks.
    let root = std::path::PathBuf::from(format!(
        "/dev/shm/forkd-bench-branch-{}",
        std::process::id()
    ));
    let env = Env {
        home: root.join("home"),
        runtime: root.join("run"),
    };
    let fleet = Fleet::open(&env)?;
    let _cleanup = Cleanup(&fleet, root.clone());
    let machine = Machine::read();
    let memtest = forkd_core::artifacts::find_agent(None)?.with_file_name("forkd-memtest");
    let memtest_bin = std::fs::read(&memtest)
        .with_context(|| format!("{} (scripts/build-agent.sh)", memtest.display()))?;

    let mut md_rows = Vec::new();
    let mut json = Vec::new();
    for &mib in &sizes {
        let opts = BootOptions {
            mem_mib: mib,
            boot_timeout: Duration::from_secs(600),
            huge_pages,
            prealloc,
            ..BootOptions::default()
        };
        let t_create = Instant::now();
        let id = fleet.create(&artifacts, "busybox", &opts)?.id;
        let create_ms = t_create.elapsed().as_secs_f64() * 1000.0;
        eprintln!("{mib} MiB: created in {create_ms:.0} ms");
        let dirty = (mib / 4).max(64);
        {
            let vm = fleet.attach(&id)?;
            vm.agent()
                .write_file("/root/forkd-memtest", Some(0o755), &memtest_bin[..])?;
        }
        exec(
            &fleet,
            &id,
            &format!("/root/forkd-memtest write --mib {dirty} --run 1 > /tmp/mt.log 2>&1 &"),
        )?;
        let t = Instant::now();
        while !exec(&fleet, &id, "cat /tmp/mt.log")?.contains("sweeping") {
            if t.elapsed() > Duration::from_secs(600) {
                bail!("the dirtying workload never got going");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // The heartbeat: a line per millisecond, timestamped on arrival.
        let beats: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
        let hb = {
            let (beats, env, id) = (Arc::clone(&beats), env.clone(), id.clone());
            std::thread::spawn(move || {
                let fleet = Fleet::open(&env).expect("state database");
                let mut req = sh("/root/forkd-memtest heartbeat");
                req.timeout_ms = Some(3_600_000);
                let _ = fleet.exec(&id, req, None, |_, _| {
                    beats.lock().unwrap().push(Instant::now())
                });
            })
        };
        std::thread::sleep(Duration::from_secs(2));
        let baseline = max_gap(
            &beats.lock().unwrap(),
            Instant::now() - Duration::from_secs(1),
            Instant::now(),
        );

        let mut runs: Vec<Run> = Vec::new();
        // Full mode copies the RAM file; hugetlb RAM is in a memfd instead.
        let full_count = if huge_pages == forkd_vm::HugePages::Off {
            full_count
        } else {
            0
        };
        for (mode, n) in [(Mode::Live, count), (Mode::Full, full_count)] {
            for i in 0..n {
                let tag = format!("b{mib}-{mode:?}-{i}").to_lowercase();
                let before = Instant::now();
                let info = fleet.branch(&id, &tag, mode, true, WriterLaunch::Thread)?;
                let after = Instant::now();
                std::thread::sleep(Duration::from_millis(50));
                let gap = max_gap(
                    &beats.lock().unwrap(),
                    before,
                    after + Duration::from_millis(50),
                );
                eprintln!(
                    "{mib} MiB {mode:?} #{i}: pause {:.1} ms, qemu downtime {:?} ms, heartbeat gap {gap:.1} ms, ready {:.0} ms",
                    info.pause_ms, info.qemu_downtime_ms, info.ready_ms.unwrap_or(0.0)
                );
                runs.push((mode, info, gap));
                fleet.remove_snapshot(&tag, true)?;
            }
        }
        fleet.kill(&id)?;
        let _ = hb.join();

        let pick = |mode: Mode, f: &dyn Fn(&Run) -> Option<f64>| -> Vec<Duration> {
            runs.iter()
                .filter(|r| r.0 == mode)
                .filter_map(f)
                .map(|ms| Duration::from_secs_f64(ms / 1000.0))
                .collect()
        };
        for mode in [Mode::Live, Mode::Full] {
            if !runs.iter().any(|r| r.0 == mode) {
                continue;
            }
            let first = runs.iter().find(|r| r.0 == mode).map(|r| r.1.pause_ms);
            let pause = Stats::of(&pick(mode, &|r| Some(r.1.pause_ms)));
            let down = pick(mode, &|r| r.1.qemu_downtime_ms);
            let gap = Stats::of(&pick(mode, &|r| Some(r.2)));
            let ready = Stats::of(&pick(mode, &|r| r.1.ready_ms));
            let gibps = (mib as f64 / 1024.0) / (ready.median_ms / 1000.0);
            let down_s = (!down.is_empty()).then(|| Stats::of(&down));
            md_rows.push(format!(
                "| {mib} MiB | {mode:?} | {} | {:.1} | {:.1} / {:.1} / {:.1} | {} | {:.1} / {:.1} / {:.1} | {:.0} | {:.2} |",
                pause.n,
                first.unwrap_or(0.0),
                pause.median_ms, pause.p90_ms, p99(&pick(mode, &|r| Some(r.1.pause_ms))),
                down_s.as_ref().map(|d| format!("{:.0} / {:.0}", d.median_ms, d.max_ms)).unwrap_or_else(|| "-".into()),
                gap.median_ms, gap.p90_ms, p99(&pick(mode, &|r| Some(r.2))),
                ready.median_ms, gibps
            ));
            json.push(serde_json::json!({
                "mem_mib": mib, "mode": mode, "dirtying_mib": dirty, "heartbeat_baseline_gap_ms": baseline,
                "huge_pages": huge_pages, "prealloc": prealloc, "create_ms": create_ms,
                "first_pause_ms": first, "pause_ms_each": runs.iter().filter(|r| r.0 == mode).map(|r| r.1.pause_ms).collect::<Vec<_>>(),
                "qemu_downtime_ms_each": runs.iter().filter(|r| r.0 == mode).map(|r| r.1.qemu_downtime_ms).collect::<Vec<_>>(),
                "pause": pause, "qemu_downtime": down_s, "heartbeat_gap": gap, "ready": ready, "gib_per_s": gibps,
            }));
        }
    }
    let mut md = String::from("# bench/branch\n\nBRANCH of a running sandbox whose guest rewrites a quarter of its RAM continuously (forkd-memtest), live and full in the same run. Pause: STOP to RESUME by QEMU's event timestamps. QEMU downtime: `query-migrate` (median / max). Heartbeat gap: largest gap the host saw between lines of a 1 ms heartbeat loop in the guest, from just before the branch call until 50 ms after it returned (includes the exec channel's own jitter). Ready: branch call until the snapshot was published; GiB/s is guest RAM over that time. Times in ms; p50 / p90 / p99.\n\n");
    md += &format!(
        "Guest RAM: {}{}.\n\n",
        match huge_pages {
            forkd_vm::HugePages::Off => "`memory-backend-file,share=on` on tmpfs (4 KiB pages)",
            forkd_vm::HugePages::Hugetlb =>
                "`memory-backend-memfd,hugetlb=on,hugetlbsize=2M` (2 MiB hugetlb pages)",
        },
        if prealloc { ", `prealloc=on`" } else { "" }
    );
    md += &machine.markdown();
    md += "\n| guest RAM | mode | n | first pause | pause p50/p90/p99 | QEMU downtime | heartbeat gap p50/p90/p99 | ready p50 | GiB/s |\n|---|---|---|---|---|---|---|---|---|\n";
    for r in &md_rows {
        md += r;
        md += "\n";
    }
    md += "\nReproduce: `scripts/build-agent.sh && cargo build --release -p forkd-bench && target/release/branch`.\n";
    write_results(
        &out,
        &serde_json::json!({ "machine": machine, "results": json }),
        &md,
    )?;
    println!("{md}");
    Ok(())
}

fn sh(s: &str) -> forkd_protocol::ExecRequest {
    forkd_protocol::ExecRequest {
        argv: vec!["sh".into(), "-c".into(), s.into()],
        ..Default::default()
    }
}

fn exec(fleet: &Fleet, id: &str, script: &str) -> Result<String> {
    let mut out = Vec::new();
    let st = fleet.exec(id, sh(script), None, |_, b| out.extend_from_slice(b))?;
    if st.code != Some(0) {
        bail!(
            "`{script}` failed: {st:?}: {}",
            String::from_utf8_lossy(&out)
        );
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Largest gap (ms) between consecutive arrivals within [from, to].
fn max_gap(beats: &[Instant], from: Instant, to: Instant) -> f64 {
    let inside: Vec<Instant> = beats
        .iter()
        .copied()
        .filter(|t| *t >= from && *t <= to)
        .collect();
    let mut edges = vec![from];
    edges.extend(inside);
    edges.push(to.min(*beats.last().unwrap_or(&to)).max(from));
    edges
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
        .fold(0.0, f64::max)
}

fn p99(samples: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    ms.get(((ms.len() as f64 - 1.0) * 0.99).round() as usize)
        .copied()
        .unwrap_or(0.0)
}
