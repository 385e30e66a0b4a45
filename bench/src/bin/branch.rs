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
//! `--backings 4k,hugetlb-prealloc` runs every size once per RAM backing,
//! in the same run so that their ratios are comparable: `4k` (the RAM file
//! on tmpfs), `hugetlb` (2 MiB hugetlb pages in a memfd; the host needs
//! `vm.nr_hugepages`), either with `-prealloc` (populated at start). Full
//! branches copy the RAM file and run on the `4k` backings only.
//! `--reserve-hugepages` (root) grows the huge-page pool to what each
//! hugetlb sandbox needs just before it starts and puts the previous value
//! back after it, so that the pool does not hold memory while 4 KiB
//! sandboxes run. `--hugepages` / `--prealloc` alone are short for one
//! backing. `--children 4k,hugetlb` also measures a spawned child per size
//! (from a branch of an idle parent), on the image's 4 KiB pages or on a
//! hugetlb copy (`spawn --hugepages`), with what each holds privately.
//!
//!     cargo run --release -p forkd-bench --bin branch -- [--sizes 512,2048,8192] [--count 20] [--full-count 5] [--backings 4k,hugetlb-prealloc] [--children 4k,hugetlb] [--reserve-hugepages] [--out NAME]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkd_bench::{write_results, Machine, Stats};
use forkd_core::hugepages::HugePagePool;
use forkd_core::{ArtifactOptions, BootOptions, Env, Fleet};
use forkd_ops::{BranchMode as Mode, BranchOutcome, RemoveSnapshot};
use forkd_vm::HugePages;

/// One branch: its mode, what it reported, the heartbeat gap around it.
type Run = (Mode, BranchOutcome, f64);

const FORCE: RemoveSnapshot = RemoveSnapshot {
    force: true,
    cascade: false,
};

/// What backs a sandbox's guest RAM in one configuration of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backing {
    huge_pages: HugePages,
    prealloc: bool,
}

impl Backing {
    fn parse(s: &str) -> Result<Backing, String> {
        let (base, prealloc) = match s.strip_suffix("-prealloc") {
            Some(b) => (b, true),
            None => (s, false),
        };
        let huge_pages = match base {
            "4k" => HugePages::Off,
            "hugetlb" => HugePages::Hugetlb,
            "hugetlb-on-demand" if !prealloc => HugePages::HugetlbOnDemand,
            _ => {
                return Err(format!(
                    "unknown backing {s:?}: 4k, hugetlb, hugetlb-on-demand, 4k-prealloc or hugetlb-prealloc"
                ))
            }
        };
        Ok(Backing {
            huge_pages,
            prealloc,
        })
    }

    fn name(&self) -> String {
        let base = match self.huge_pages {
            HugePages::Off => "4k",
            HugePages::Hugetlb => "hugetlb",
            HugePages::HugetlbOnDemand => "hugetlb-on-demand",
        };
        format!("{base}{}", if self.prealloc { "-prealloc" } else { "" })
    }

    fn describe(&self) -> String {
        format!(
            "{}{}",
            match self.huge_pages {
                HugePages::Off => "`memory-backend-file,share=on` on tmpfs (4 KiB pages)",
                HugePages::Hugetlb =>
                    "`memory-backend-memfd,share=on,hugetlb=on,hugetlbsize=2M` (2 MiB hugetlb pages from the static pool, `vm.nr_hugepages`)",
                HugePages::HugetlbOnDemand =>
                    "`memory-backend-memfd,share=on,hugetlb=on,hugetlbsize=2M,reserve=off` (2 MiB hugetlb pages taken as the guest touches them from the surplus pool forkd manages, `vm.nr_overcommit_hugepages`): **the default of `forkd create` as root**",
            },
            if self.prealloc { ", `prealloc=on`" } else { "" }
        )
    }
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Grows the huge-page pool for one sandbox; puts the old size back on drop.
struct PoolReservation(u64);

impl PoolReservation {
    fn grow_for(mem_mib: u64) -> Result<PoolReservation> {
        let old: u64 = std::fs::read_to_string(NR_HUGEPAGES)?.trim().parse()?;
        let want = old + HugePagePool::pages_for(mem_mib) + 16;
        std::fs::write(NR_HUGEPAGES, want.to_string())
            .with_context(|| format!("writing {want} to {NR_HUGEPAGES} (needs root)"))?;
        let guard = PoolReservation(old);
        let pool = HugePagePool::read()?;
        pool.check(mem_mib).map_err(anyhow::Error::msg)?;
        Ok(guard)
    }
}

impl Drop for PoolReservation {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.0.to_string());
    }
}

struct Cleanup<'a>(&'a Fleet, std::path::PathBuf);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for s in self.0.list().unwrap_or_default() {
            let _ = self.0.kill(&s.id);
        }
        for s in self.0.db().list_snapshots().unwrap_or_default() {
            let _ = self.0.remove_snapshot(&s.tag, FORCE);
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// The BRANCH pause, live vs full, by guest size and RAM backing, in one run.
/// Writes bench/results/NAME.{json,md}.
#[derive(clap::Parser)]
struct Args {
    /// Guest sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [512u64, 2048, 8192])]
    sizes: Vec<u64>,
    /// Live branches per size and backing.
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Full branches per size (4k backings only).
    #[arg(long, default_value_t = 5)]
    full_count: usize,
    /// RAM backings, comma-separated: 4k, hugetlb, 4k-prealloc, hugetlb-prealloc.
    #[arg(long, value_delimiter = ',', value_parser = Backing::parse)]
    backings: Option<Vec<Backing>>,
    /// Short for `--backings hugetlb` (with --prealloc: hugetlb-prealloc).
    #[arg(long)]
    hugepages: bool,
    /// Populate guest RAM at start (with --hugepages, or alone for 4k-prealloc).
    #[arg(long)]
    prealloc: bool,
    /// As root: grow the huge-page pool to what each hugetlb sandbox needs
    /// just before it starts, and put the previous value back after it.
    #[arg(long)]
    reserve_hugepages: bool,
    /// QEMU binaries to compare in this run, comma-separated (each size and
    /// backing runs once per binary; the table names each one's version).
    #[arg(long, value_delimiter = ',', default_values_t = [String::from("qemu-system-x86_64")])]
    qemu: Vec<String>,
    /// Also branch spawned children, comma-separated: `4k` (the child maps
    /// the snapshot's image on tmpfs, the default) and `hugetlb` (`spawn
    /// --hugepages`). Each child is spawned from a branch of an idle
    /// parent on the default backing, then measured like a sandbox; its
    /// host RAM column is what it holds privately (its copies of the
    /// pages it wrote), not the image it shares with its siblings.
    #[arg(long, value_delimiter = ',', value_parser = parse_child)]
    children: Vec<bool>,
    /// Name of the results files under bench/results.
    #[arg(long, default_value = "branch")]
    out: String,
}

/// `4k` → false, `hugetlb` → true (children on huge pages).
fn parse_child(s: &str) -> Result<bool, String> {
    match s {
        "4k" => Ok(false),
        "hugetlb" => Ok(true),
        _ => Err(format!("unknown child backing {s:?}: 4k or hugetlb")),
    }
}

/// What the measured sandbox is.
#[derive(Debug, Clone, Copy)]
enum Subject {
    /// Made with `create` on this backing.
    Sandbox(Backing),
    /// A child spawned from a branch of a `create`d parent, on huge pages
    /// or not.
    Child { huge: bool },
}

impl Subject {
    fn name(&self) -> String {
        match self {
            Subject::Sandbox(b) => b.name(),
            Subject::Child { huge: false } => "child-4k".into(),
            Subject::Child { huge: true } => "child-hugetlb".into(),
        }
    }
}

fn main() -> Result<()> {
    let args: Args = clap::Parser::parse();
    let (sizes, count, full_count, out, reserve) = (
        args.sizes,
        args.count,
        args.full_count,
        args.out,
        args.reserve_hugepages,
    );
    let only_children =
        !args.children.is_empty() && !args.hugepages && !args.prealloc && args.backings.is_none();
    let backings = args.backings.unwrap_or_else(|| {
        if only_children {
            return Vec::new();
        }
        vec![Backing {
            huge_pages: if args.hugepages {
                HugePages::Hugetlb
            } else {
                HugePages::Off
            },
            prealloc: args.prealloc,
        }]
    });
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
    let versions: Vec<String> = args
        .qemu
        .iter()
        .map(|q| {
            forkd_vm::process::qemu_version(std::path::Path::new(q))
                .map(|v| short_version(&v))
                .with_context(|| format!("--qemu {q}"))
        })
        .collect::<Result<_>>()?;
    for &mib in &sizes {
        for &backing in &backings {
            for (qemu, version) in args.qemu.iter().zip(&versions) {
                let hugetlb = backing.huge_pages != HugePages::Off;
                let _pool = if backing.huge_pages == HugePages::Hugetlb && reserve {
                    Some(PoolReservation::grow_for(mib)?)
                } else {
                    None
                };
                let opts = BootOptions {
                    mem_mib: mib,
                    boot_timeout: Duration::from_secs(600),
                    huge_pages: backing.huge_pages,
                    prealloc: backing.prealloc,
                    qemu: qemu.clone(),
                    ..BootOptions::default()
                };
                // Full mode copies the RAM file; hugetlb RAM is in a memfd instead.
                let full_count = if hugetlb { 0 } else { full_count };
                let (rows, results) = measure(
                    &fleet,
                    &env,
                    &artifacts,
                    &memtest_bin,
                    &opts,
                    Subject::Sandbox(backing),
                    (versions.len() > 1).then_some(version.as_str()),
                    count,
                    full_count,
                )?;
                md_rows.extend(rows);
                json.extend(results);
            }
        }
        for &huge in &args.children {
            let opts = BootOptions {
                mem_mib: mib,
                boot_timeout: Duration::from_secs(600),
                huge_pages: forkd_core::hugepool::choose(
                    false,
                    false,
                    mib,
                    forkd_core::hugepool::unavailable(),
                )
                .0,
                qemu: args.qemu[0].clone(),
                ..BootOptions::default()
            };
            let (rows, results) = measure(
                &fleet,
                &env,
                &artifacts,
                &memtest_bin,
                &opts,
                Subject::Child { huge },
                None,
                count,
                0,
            )?;
            md_rows.extend(rows);
            json.extend(results);
        }
    }
    let mut md = String::from("# bench/branch\n\nBRANCH of a running sandbox whose guest rewrites a quarter of its RAM continuously (forkd-memtest), for each RAM backing, in one run. Pause: STOP to RESUME by QEMU's event timestamps (forkd stops the guest, freezes the disk, then `migrate`; guest RAM is populated before that, while the guest runs). Heartbeat gap (the guest-visible stall): largest gap the host saw between lines of a 1 ms heartbeat loop in the guest, from just before the branch call until 50 ms after it returned (includes the exec channel's own jitter and every write fault while RAM streams). Ready: branch call until the snapshot was published; GiB/s is guest RAM over the ready p50. Every statistic includes the first branch (p99 is the maximum with fewer than 100 samples). Host RAM: MiB the guest RAM's file or memfd holds, just after boot → after the branches. QEMU's own `downtime` figure is not shown: QEMU 7.2 counts it in whole milliseconds from its own (already stopped) state, and when that rounds to 0 it overwrites it at completion with the time until the end of the stream (the 300–1070 ms \"downtimes\" of earlier runs); it is in the JSON. Times in ms.\n\nRAM backings:\n\n");
    for b in &backings {
        md += &format!("- `{}`: {}\n", b.name(), b.describe());
    }
    for &huge in &args.children {
        md += &format!(
            "- `{}`: {}\n",
            Subject::Child { huge }.name(),
            if huge {
                "a child spawned with `--hugepages` from a branch of an idle parent: it maps a hugetlb copy of the image privately (2 MiB pages); host RAM is its private hugetlb pages (`Private_Hugetlb`)"
            } else {
                "a child spawned (default) from a branch of an idle parent: it maps the image on tmpfs privately (4 KiB pages); host RAM is its private pages (`Private_Dirty`)"
            }
        );
    }
    md += "\n";
    md += &machine.markdown();
    md += "\n| guest RAM | backing | mode | n | first pause | pause p50 / p90 / p99 | heartbeat gap p50 / p90 / p99 | ready p50 / p90 / p99 | GiB/s | host RAM MiB idle → after |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &md_rows {
        md += r;
        md += "\n";
    }
    // The command that made these results, as it was run.
    let args: Vec<String> = std::env::args().skip(1).collect();
    md += &format!(
        "\nReproduce: `scripts/build-agent.sh && cargo build --release -p forkd-bench && target/release/branch {}`.\n",
        args.join(" ")
    );
    write_results(
        &out,
        &serde_json::json!({ "machine": machine, "results": json }),
        &md,
    )?;
    println!("{md}");
    Ok(())
}

/// One sandbox of `opts`, branched `count` times live and `full_count` times
/// full: its markdown rows and JSON results.
#[allow(clippy::too_many_arguments)]
fn measure(
    fleet: &Fleet,
    env: &Env,
    artifacts: &forkd_core::Artifacts,
    memtest_bin: &[u8],
    opts: &BootOptions,
    subject: Subject,
    qemu_version: Option<&str>,
    count: usize,
    full_count: usize,
) -> Result<(Vec<String>, Vec<serde_json::Value>)> {
    let mib = opts.mem_mib;
    // With more than one QEMU in the run, the backing column names the version.
    let name = match qemu_version {
        Some(v) => format!("{} (QEMU {v})", subject.name()),
        None => subject.name(),
    };
    let t_create = Instant::now();
    let (id, parent) = match subject {
        Subject::Sandbox(_) => (fleet.create(artifacts, "busybox", opts)?.0.id, None),
        Subject::Child { huge } => {
            let parent = fleet.create(artifacts, "busybox", opts)?.0.id;
            let tag = format!("p{mib}-{}", subject.name());
            fleet.branch(&parent, &tag, Mode::Live, true, None)?;
            let overrides = forkd_core::fleet::ChildOverrides {
                huge_pages: huge,
                ..Default::default()
            };
            let child = fleet
                .spawn_with(
                    &tag,
                    1,
                    1,
                    true,
                    forkd_ops::PartialFailure::Kill,
                    &overrides,
                    &|_, _| {},
                )?
                .remove(0)?;
            // The parent is not needed any more: its memory would only
            // crowd the host at 8 GiB.
            fleet.kill(&parent)?;
            (child.sandbox.id, Some(tag))
        }
    };
    let create_ms = t_create.elapsed().as_secs_f64() * 1000.0;
    eprintln!("{mib} MiB {name}: created in {create_ms:.0} ms");
    let dirty = (mib / 4).max(64);
    // Host memory the guest's RAM holds, idle (just booted) and after the
    // branches (QEMU 7.2 populates all of it for the first live branch);
    // for a child, what it holds privately beside the image it shares.
    let host_ram_mib = || -> Result<f64> {
        let vm = fleet.control(&id)?;
        if parent.is_some() {
            return Ok(private_ram_mib(vm.pid(), mib << 20));
        }
        let Some(f) = vm.guest_ram_file()? else {
            return Ok(f64::NAN);
        };
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(&f)?.blocks() as f64 * 512.0 / (1u64 << 20) as f64)
    };
    let idle_mib = host_ram_mib()?;
    {
        let vm = fleet.attach(&id)?;
        vm.agent()
            .write_file("/root/forkd-memtest", Some(0o755), memtest_bin)?;
    }
    exec(
        fleet,
        &id,
        &format!("/root/forkd-memtest write --mib {dirty} --run 1 > /tmp/mt.log 2>&1 &"),
    )?;
    let t = Instant::now();
    while !exec(fleet, &id, "cat /tmp/mt.log")?.contains("sweeping") {
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
    let t_branches = Instant::now();
    for (mode, n) in [(Mode::Live, count), (Mode::Full, full_count)] {
        for i in 0..n {
            let tag = format!("b{mib}-{}-{mode:?}-{i}", subject.name()).to_lowercase();
            let before = Instant::now();
            let info = fleet.branch(&id, &tag, mode, true, None)?;
            let after = Instant::now();
            std::thread::sleep(Duration::from_millis(50));
            let gap = max_gap(
                &beats.lock().unwrap(),
                before,
                after + Duration::from_millis(50),
            );
            eprintln!(
                "{mib} MiB {name} {mode:?} #{i}: pause {:.1} ms, qemu downtime {:?} ms, heartbeat gap {gap:.1} ms, ready {:.0} ms",
                info.pause_ms, info.qemu_downtime_ms, info.ready_ms.unwrap_or(0.0)
            );
            runs.push((mode, info, gap));
            fleet.remove_snapshot(&tag, FORCE)?;
        }
    }
    let branches_s = t_branches.elapsed().as_secs_f64();
    let after_mib = host_ram_mib()?;
    fleet.kill(&id)?;
    let _ = hb.join();
    if let Some(tag) = &parent {
        fleet.remove_snapshot(tag, FORCE)?;
    }

    let (mut rows, mut results) = (Vec::new(), Vec::new());
    for mode in [Mode::Live, Mode::Full] {
        let all: Vec<&Run> = runs.iter().filter(|r| r.0 == mode).collect();
        let Some(first) = all.first() else { continue };
        // Every statistic includes the first branch.
        let steady: &[&Run] = &all;
        let stats = |f: &dyn Fn(&Run) -> Option<f64>| -> Option<Stats> {
            let v: Vec<Duration> = steady
                .iter()
                .filter_map(|r| f(r))
                .map(|ms| Duration::from_secs_f64(ms / 1000.0))
                .collect();
            (!v.is_empty()).then(|| Stats::of(&v))
        };
        let pause = stats(&|r| Some(r.1.pause_ms)).expect("one branch at least");
        let down = stats(&|r| r.1.qemu_downtime_ms);
        let gap = stats(&|r| Some(r.2)).expect("one branch at least");
        let ready = stats(&|r| r.1.ready_ms).expect("waited for");
        let gibps = (mib as f64 / 1024.0) / (ready.median_ms / 1000.0);
        let three = |s: &Stats| format!("{:.1} / {:.1} / {:.1}", s.median_ms, s.p90_ms, s.p99_ms);
        let first_ready = first.1.ready_ms.unwrap_or(0.0);
        rows.push(format!(
            "| {mib} MiB | {name} | {mode:?} | {} | {:.1} | {} | {} | {:.0} / {:.0} / {:.0} | {:.2} | {:.0} → {:.0} |",
            all.len(),
            first.1.pause_ms,
            three(&pause),
            three(&gap),
            ready.median_ms, ready.p90_ms, ready.p99_ms,
            gibps,
            idle_mib, after_mib,
        ));
        let _ = first_ready;
        results.push(serde_json::json!({
            "mem_mib": mib, "backing": name, "qemu": opts.qemu, "mode": mode, "dirtying_mib": dirty, "heartbeat_baseline_gap_ms": baseline,
            "huge_pages": opts.huge_pages, "prealloc": opts.prealloc, "create_ms": create_ms,
            "child_on_huge_pages": match subject { Subject::Child { huge } => Some(huge), Subject::Sandbox(_) => None },
            "first_pause_ms": first.1.pause_ms, "first_ready_ms": first.1.ready_ms,
            "first_qemu_downtime_ms": first.1.qemu_downtime_ms, "first_heartbeat_gap_ms": first.2,
            "stats_exclude_first": false,
            "pause_ms_each": all.iter().map(|r| r.1.pause_ms).collect::<Vec<_>>(),
            "qemu_downtime_ms_each": all.iter().map(|r| r.1.qemu_downtime_ms).collect::<Vec<_>>(),
            "heartbeat_gap_ms_each": all.iter().map(|r| r.2).collect::<Vec<_>>(),
            "ready_ms_each": all.iter().map(|r| r.1.ready_ms).collect::<Vec<_>>(),
            "pause": pause, "qemu_downtime": down, "heartbeat_gap": gap, "ready": ready, "gib_per_s": gibps,
            "wall_s_all_branches_of_sandbox": branches_s,
            "host_ram_mib_idle": idle_mib, "host_ram_mib_after": after_mib,
        }));
    }
    Ok((rows, results))
}

/// MiB that QEMU `pid` holds privately in its `len`-byte guest-RAM mapping
/// (a child's copies of the pages it wrote: `Private_Dirty` on 4 KiB
/// pages, `Private_Hugetlb` on huge pages).
fn private_ram_mib(pid: u32, len: u64) -> f64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return f64::NAN;
    };
    let mut in_ram = false;
    let mut kib = 0u64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                in_ram = b - a == len;
                continue;
            }
        }
        if in_ram && (first == "Private_Dirty:" || first == "Private_Hugetlb:") {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib as f64 / 1024.0
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

/// `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2…)` → `10.0.2`.
fn short_version(line: &str) -> String {
    line.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .unwrap_or(line)
        .to_string()
}
