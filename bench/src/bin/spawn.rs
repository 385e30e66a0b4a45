//! `bench/spawn`: SPAWN from a warmed snapshot vs cold boot, in one run.
//!
//! For each N (default 1, 10, 50): N children spawned cold (QEMU start +
//! restore), N children from a pre-filled warm pool, and N cold boots; wall
//! time until all are exec-ready, per-child p50/p90, and the PSS of idle
//! children with the mappings that dominate it. Writes
//! `bench/results/spawn.{json,md}`.
//!
//!     cargo run --release -p forkd-bench --bin spawn -- [--n 1,10,50]

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use forkd_bench::{write_results, Machine, Stats};
use forkd_core::{ArtifactOptions, BootOptions, Env, Fleet};
use forkd_ops::{Child, PartialFailure, RemoveSnapshot};

/// SPAWN from a warmed snapshot vs a warm pool vs cold boot, in one run:
/// wall time, per-child latency, idle PSS. Writes bench/results/spawn.{json,md}.
#[derive(clap::Parser)]
struct Args {
    /// Numbers of children, comma-separated.
    #[arg(long = "n", value_delimiter = ',', default_values_t = [1usize, 10, 50])]
    ns: Vec<usize>,
    /// Cold boots of many TCG guests on two cores take minutes each once
    /// dozens of idle guests share the CPU: they are measured only up to
    /// this N.
    #[arg(long, default_value_t = 10)]
    cold_max: usize,
}

fn main() -> Result<()> {
    let Args { ns, cold_max } = clap::Parser::parse();
    let process_env = Env::from_process();
    let artifacts =
        forkd_core::artifacts::ensure(&process_env, &ArtifactOptions::default(), &|m| {
            eprintln!("{m}")
        })?;
    // A private state database and runtime dir: the benchmark kills what it makes.
    let root = std::env::temp_dir().join(format!("forkd-bench-spawn-{}", std::process::id()));
    let env = Env {
        home: root.join("home"),
        runtime: std::path::PathBuf::from(format!("/dev/shm/forkd-bench-{}", std::process::id())),
    };
    let fleet = Fleet::open(&env)?;
    // Whatever happens, leave nothing running.
    let _cleanup = Cleanup(&fleet, root.clone(), env.runtime.clone());
    // Many TCG guests on two cores boot slowly: allow for it.
    let boot = BootOptions {
        boot_timeout: Duration::from_secs(900),
        ..BootOptions::default()
    };
    let cores = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1);
    let machine = Machine::read();
    eprintln!(
        "spawn benchmark on {} ({} cores, {})",
        machine.cpu, cores, machine.accel
    );

    let parent = fleet.create(&artifacts, "busybox", &boot)?.0.id;
    let warm = fleet.exec(&parent, sh("i=0; while [ $i -lt 16 ]; do head -c 1048576 /dev/urandom; i=$((i+1)); done > /tmp/warm.bin; \
        (n=0; while :; do n=$((n+1)); echo $n > /tmp/count; sleep 0.5; done) >/dev/null 2>&1 & echo ok"), None, |_, _| {})?;
    if warm.code != Some(0) {
        bail!("warming the parent failed: {warm:?}");
    }
    let snap = fleet.snapshot(&parent, "bench")?;
    eprintln!("parent {parent} snapshotted: pause {:.1} ms", snap.pause_ms);

    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    let mut pss_note = String::new();
    for &n in &ns {
        // 1. spawn, no pool
        let t = Instant::now();
        let kids =
            ok_children(fleet.spawn("bench", n, cores, true, PartialFailure::Keep, &|_, _| {})?)?;
        let spawn_wall = t.elapsed();
        let spawn_each: Vec<Duration> = kids.iter().map(|c| ms_dur(c.ready_ms)).collect();
        let restore_each: Vec<Duration> = kids.iter().map(|c| ms_dur(c.restore_ms)).collect();
        std::thread::sleep(Duration::from_secs(2)); // let them go idle
        let pss: Vec<u64> = kids
            .iter()
            .filter_map(|c| pid_of(&fleet, &c.sandbox.id))
            .filter_map(pss_kib)
            .collect();
        if pss_note.is_empty() {
            if let Some(pid) = kids.first().and_then(|c| pid_of(&fleet, &c.sandbox.id)) {
                pss_note = top_mappings(pid);
            }
        }
        kill_all_but(&fleet, &parent);

        // 2. spawn from a pre-filled pool
        fleet.fill_pool("bench", n)?;
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let kids =
            ok_children(fleet.spawn("bench", n, cores, true, PartialFailure::Keep, &|_, _| {})?)?;
        let pool_wall = t.elapsed();
        let pooled = kids.iter().filter(|c| c.from_pool).count();
        let pool_each: Vec<Duration> = kids.iter().map(|c| ms_dur(c.ready_ms)).collect();
        kill_all_but(&fleet, &parent);

        // 3. the same N by cold boot
        let cold = n <= cold_max;
        let n_cold = if cold { n } else { 0 };
        let t = Instant::now();
        let boots = std::sync::Mutex::new(Vec::new());
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..cores.min(n_cold) {
                s.spawn(|| {
                    while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < n_cold {
                        let t = Instant::now();
                        let r = fleet
                            .create(&artifacts, "busybox", &boot)
                            .map(|_| t.elapsed());
                        boots.lock().unwrap().push(r);
                    }
                });
            }
        });
        let cold_wall = t.elapsed();
        let cold_each: Vec<Duration> = boots
            .into_inner()
            .unwrap()
            .into_iter()
            .collect::<Result<_, _>>()?;
        kill_all_but(&fleet, &parent);

        let s_spawn = Stats::of(&spawn_each);
        let s_pool = Stats::of(&pool_each);
        let s_cold = cold.then(|| Stats::of(&cold_each));
        let s_restore = Stats::of(&restore_each);
        let pss_med = median_u64(&pss);
        let (cold_cells, ratios) = match &s_cold {
            Some(c) => (
                format!(
                    "{:.0} | {:.0} / {:.0}",
                    ms(cold_wall),
                    c.median_ms,
                    c.p90_ms
                ),
                format!(
                    "{:.1}x | {:.1}x",
                    ms(cold_wall) / ms(spawn_wall),
                    ms(cold_wall) / ms(pool_wall)
                ),
            ),
            None => ("not run (see note) | -".into(), "- | -".into()),
        };
        eprintln!(
            "N={n}: spawn {:.0} ms (p50 {:.0}), pool {:.0} ms (p50 {:.0}, {pooled}/{n} pooled), cold {cold_cells}; idle child PSS {:.1} MiB",
            ms(spawn_wall), s_spawn.median_ms, ms(pool_wall), s_pool.median_ms, pss_med as f64 / 1024.0
        );
        rows.push(format!(
            "| {n} | {:.0} | {:.0} / {:.0} | {:.0} | {:.0} / {:.0} | {cold_cells} | {ratios} | {:.1} |",
            ms(spawn_wall), s_spawn.median_ms, s_spawn.p90_ms,
            ms(pool_wall), s_pool.median_ms, s_pool.p90_ms,
            pss_med as f64 / 1024.0
        ));
        json_rows.push(serde_json::json!({
            "n": n,
            "spawn": { "wall_ms": ms(spawn_wall), "per_child": s_spawn, "restore": s_restore },
            "pool": { "wall_ms": ms(pool_wall), "per_child": s_pool, "from_pool": pooled },
            "cold_boot": s_cold.as_ref().map(|c| serde_json::json!({ "wall_ms": ms(cold_wall), "per_child": c })),
            "idle_child_pss_kib": { "median": pss_med, "samples": pss.len() },
        }));
    }

    let mut md = String::from("# bench/spawn\n\nSPAWN from a warmed 256 MiB busybox parent (16 MiB of warm data in guest RAM, a running process) vs cold boot, all in one run. Times in ms; per-child is p50 / p90 of exec-ready (agent answered and fork-safety applied).\n\n");
    md += &machine.markdown();
    md += &format!("\nEvery sandbox is a TCG guest on a 2-core host: N children contend for two cores as they start, and idle TCG guests still take timer ticks, so per-child times grow with N. Cold boots were measured up to N = {cold_max}: an attempt at 50 cold boots in one run had booted 42 after 9 minutes, each further boot taking over a minute with the others idling on the same two cores.\n");
    md += &format!("\nParent snapshot pause: {:.1} ms.\n\n", snap.pause_ms);
    md += "| N | spawn wall | spawn per child | pool wall | pool per child | cold wall | cold per child | cold/spawn | cold/pool | idle child PSS MiB |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &rows {
        md += r;
        md += "\n";
    }
    md += &format!("\nWhat an idle child's PSS is made of (largest mappings of one child, kB):\n\n```\n{pss_note}```\n");
    md += "\nReproduce: `cargo build --release -p forkd-bench && target/release/spawn`.\n";
    write_results(
        "spawn",
        &serde_json::json!({ "machine": machine, "snapshot_pause_ms": snap.pause_ms, "results": json_rows }),
        &md,
    )?;
    println!("{md}");
    Ok(())
}

struct Cleanup<'a>(&'a Fleet, std::path::PathBuf, std::path::PathBuf);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for s in self.0.list().unwrap_or_default() {
            let _ = self.0.kill(&s.id);
        }
        let _ = self.0.remove_snapshot(
            "bench",
            RemoveSnapshot {
                force: true,
                cascade: false,
            },
        );
        let _ = std::fs::remove_dir_all(&self.1);
        let _ = std::fs::remove_dir_all(&self.2);
    }
}

fn sh(s: &str) -> forkd_protocol::ExecRequest {
    forkd_protocol::ExecRequest {
        argv: vec!["sh".into(), "-c".into(), s.into()],
        ..Default::default()
    }
}

fn ok_children(r: Vec<Result<Child, forkd_core::CoreError>>) -> Result<Vec<Child>> {
    r.into_iter()
        .map(|c| c.map_err(anyhow::Error::from))
        .collect()
}

fn kill_all_but(fleet: &Fleet, keep: &str) {
    for s in fleet.list().unwrap_or_default() {
        if s.id != keep {
            let _ = fleet.kill(&s.id);
        }
    }
}

fn pid_of(fleet: &Fleet, id: &str) -> Option<u32> {
    fleet
        .list()
        .ok()?
        .into_iter()
        .find(|s| s.id == id)
        .map(|s| s.pid)
}

/// PSS of a process in KiB, from smaps_rollup.
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find(|l| l.starts_with("Pss:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The five mappings with the largest PSS, with their names.
fn top_mappings(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, String)> = Vec::new();
    let mut name = String::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let parts: Vec<&str> = line.split_whitespace().collect();
            name = parts
                .get(5)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("[anon {}]", parts[0]));
        } else if let Some(v) = line.strip_prefix("Pss:") {
            let kb: u64 = v
                .split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            maps.push((kb, name.clone()));
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    maps.iter()
        .take(5)
        .map(|(kb, n)| format!("{kb:>8} {n}\n"))
        .collect()
}

fn median_u64(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ms_dur(ms: f64) -> Duration {
    Duration::from_secs_f64(ms / 1000.0)
}
