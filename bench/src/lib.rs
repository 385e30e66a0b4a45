//! Shared benchmark plumbing: statistics, machine facts, result files.
//! Benchmarks measure what they compare in the same run (ratios survive a
//! noisy shared machine), repeat, and report medians with their spread.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

/// Summary of repeated measurements, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub n: usize,
    pub median_ms: f64,
    pub min_ms: f64,
    pub p90_ms: f64,
    /// Nearest rank: with fewer than 100 samples this is the maximum.
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    pub fn of(samples: &[Duration]) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let pick = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        Stats {
            n: ms.len(),
            median_ms: pick(0.5),
            min_ms: ms[0],
            p90_ms: pick(0.9),
            p99_ms: pick(0.99),
            max_ms: ms[ms.len() - 1],
        }
    }
}

/// Facts about the machine a result was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub date: String,
    pub cpu: String,
    pub cores: usize,
    pub mem_gib: u64,
    pub host_kernel: String,
    pub qemu: String,
    pub accel: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_string();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: u64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        let choice =
            forkd_vm::accel::choose(forkd_vm::AccelRequest::Auto, &forkd_vm::HostProbe::read())
                .expect("auto always chooses");
        Machine {
            date: command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            cpu,
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            mem_gib: mem_kib.div_ceil(1 << 20),
            host_kernel: command_line("uname", &["-r"]),
            qemu: forkd_vm::process::qemu_version(Path::new("qemu-system-x86_64"))
                .unwrap_or_default(),
            accel: format!("{} ({})", choice.accel, choice.reason),
        }
    }

    pub fn markdown(&self) -> String {
        format!(
            "| machine | |\n|---|---|\n| date | {} |\n| cpu | {} ({} cores) |\n| memory | {} GiB |\n| host kernel | {} |\n| qemu | {} |\n| accel | {} |\n",
            self.date, self.cpu, self.cores, self.mem_gib, self.host_kernel, self.qemu, self.accel
        )
    }
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// `bench/results/` in the source tree.
pub fn results_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("results")
}

/// Writes `<name>.json` and `<name>.md` under `bench/results/`.
pub fn write_results(name: &str, json: &serde_json::Value, markdown: &str) -> std::io::Result<()> {
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(json)? + "\n",
    )?;
    std::fs::write(dir.join(format!("{name}.md")), markdown)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_pick_order_statistics() {
        let s = Stats::of(&[5, 1, 3, 2, 4].map(Duration::from_millis));
        assert_eq!((s.n, s.median_ms, s.min_ms, s.max_ms), (5, 3.0, 1.0, 5.0));
        assert_eq!((s.p90_ms, s.p99_ms), (5.0, 5.0));
    }
}
