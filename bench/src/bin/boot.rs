//! `bench/boot`: cold boot to agent-ready, and `forkd run -- true` end to end.
//!
//! Both are measured in the same run, interleaved, `--runs N` times (default 7).
//! Writes `bench/results/boot.{json,md}`.
//!
//!     cargo run --release -p forkd-bench --bin boot -- [--runs N]

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use forkd_bench::{write_results, Machine, Stats};
use forkd_core::{ArtifactOptions, BootOptions, Env, Sandbox};

/// Cold boot to agent-ready, and `forkd run -- true` end to end, measured in
/// one run, interleaved. Writes bench/results/boot.{json,md}.
#[derive(clap::Parser)]
struct Args {
    /// Runs of each (at least 5).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u64).range(5..))]
    runs: u64,
}

fn main() -> Result<()> {
    let runs = <Args as clap::Parser>::parse().runs as usize;
    let forkd = std::env::current_exe()?.with_file_name("forkd");
    if !forkd.exists() {
        bail!(
            "{} not found: run `cargo build --release -p forkd-cli` first",
            forkd.display()
        );
    }
    let env = Env::from_process();
    let artifacts =
        forkd_core::artifacts::ensure(&env, &ArtifactOptions::default(), &|m| eprintln!("{m}"))?;
    let machine = Machine::read();
    eprintln!(
        "boot benchmark, {runs} runs on {} ({})",
        machine.cpu, machine.accel
    );

    let (mut to_ready, mut boot_call, mut first_exec, mut run_true) =
        (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        // 1. In-process: QEMU start -> agent handshake, and the whole boot call
        //    (run dir, qcow2 overlay, QEMU, handshake), then the first exec.
        let t = Instant::now();
        let sb = Sandbox::boot(&env, &artifacts, &BootOptions::default())?;
        boot_call.push(t.elapsed());
        to_ready.push(sb.boot_time());
        let t = Instant::now();
        let out = sb.exec_collect(forkd_protocol::ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        })?;
        first_exec.push(t.elapsed());
        if out.status.code != Some(0) {
            bail!("`true` failed in the guest: {:?}", out.status);
        }
        drop(sb);
        // 2. End to end through the CLI.
        let t = Instant::now();
        let st = Command::new(&forkd).args(["run", "--", "true"]).status()?;
        run_true.push(t.elapsed());
        if !st.success() {
            bail!("forkd run -- true failed: {st}");
        }
        eprintln!(
            "run {}: ready {:.0} ms, boot call {:.0} ms, first exec {:.1} ms, forkd run -- true {:.0} ms",
            i + 1,
            ms(to_ready[i]),
            ms(boot_call[i]),
            ms(first_exec[i]),
            ms(run_true[i])
        );
    }
    let rows = [
        ("QEMU start -> agent ready", Stats::of(&to_ready)),
        (
            "Sandbox::boot (overlay + QEMU + handshake)",
            Stats::of(&boot_call),
        ),
        ("first exec of `true` after boot", Stats::of(&first_exec)),
        ("`forkd run -- true` end to end", Stats::of(&run_true)),
    ];
    let mut md = String::from("# bench/boot\n\nCold boot to agent-ready and `forkd run -- true`, interleaved in one run.\n\n");
    md += &machine.markdown();
    md += &format!(
        "\n| measurement ({runs} runs) | median ms | min | p90 | max |\n|---|---|---|---|---|\n"
    );
    for (name, s) in &rows {
        md += &format!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            s.median_ms, s.min_ms, s.p90_ms, s.max_ms
        );
    }
    md += "\nReproduce: `cargo build --release -p forkd-cli -p forkd-bench && target/release/boot`.\n";
    let json = serde_json::json!({
        "machine": machine,
        "runs": runs,
        "results": rows.iter().map(|(n, s)| serde_json::json!({"name": n, "stats": s})).collect::<Vec<_>>(),
    });
    write_results("boot", &json, &md)?;
    println!("{md}");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
