//! `bench/registry`: snapshots through a real OCI registry, in one run.
//!
//! Host A (its own home) boots a 1 GiB guest, warms it (150 MiB of random
//! data and a 30 MB text file in its tmpfs), branches it live (`p1`) and
//! pushes it; then the guest rewrites ~5% of its memory (25 MiB of the
//! random data in place, 25 MiB of new random data), branches again (`p2`)
//! and pushes that. Host B pulls p1 then p2 (it has the parent's chunks),
//! host C pulls p2 with nothing. For each: wall time, bytes over the wire,
//! chunks moved vs reused; then pull-then-spawn (the pull plus the first
//! exec-ready child) on C (nothing) vs B (has the parent). The registry is
//! Debian's `docker-registry` on loopback. Writes
//! `bench/results/registry.{json,md}`.
//!
//!     cargo run --release -p forkd-bench --bin registry -- [--mem 1024]

use std::fs::{self, File};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkd_bench::{write_results, Machine};
use forkd_core::{ArtifactOptions, BootOptions, Env, Fleet};
use forkd_ops::{BranchMode, Operations, PartialFailure, PullRequest, PushRequest, TransferCounts};
use serde_json::json;

/// Push/pull time and bytes of a 1 GiB snapshot and of a branch after a 5%
/// memory change; pull-then-spawn with and without the parent.
#[derive(clap::Parser)]
struct Args {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1024)]
    mem: u64,
}

struct Host {
    fleet: Fleet,
    root: PathBuf,
    runtime: PathBuf,
}

impl Host {
    fn new(name: &str) -> Result<Host> {
        let root = std::env::temp_dir().join(format!(
            "forkd-bench-registry-{name}-{}",
            std::process::id()
        ));
        let runtime = PathBuf::from(format!(
            "/dev/shm/forkd-bench-registry-{name}-{}",
            std::process::id()
        ));
        let fleet = Fleet::open(&Env {
            home: root.join("home"),
            runtime: runtime.clone(),
        })?;
        Ok(Host {
            fleet,
            root,
            runtime,
        })
    }

    fn sh(&self, id: &str, script: &str) -> Result<String> {
        let mut out = Vec::new();
        let st = self.fleet.exec(
            id,
            forkd_protocol::ExecRequest {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                ..Default::default()
            },
            None,
            |_, b| out.extend_from_slice(b),
        )?;
        if st.code != Some(0) {
            bail!("`{script}` failed: {}", String::from_utf8_lossy(&out));
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for s in self.fleet.list().unwrap_or_default() {
            let _ = self.fleet.kill(&s.id);
        }
        let _ = fs::remove_dir_all(&self.root);
        let _ = fs::remove_dir_all(&self.runtime);
    }
}

struct Registry(Child, PathBuf);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = fs::remove_dir_all(&self.1);
    }
}

fn start_registry() -> Result<(Registry, u16)> {
    let dir = std::env::temp_dir().join(format!("forkd-bench-registry-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = dir.join("config.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("storage").display()
        ),
    )?;
    let log = File::create(dir.join("registry.log"))?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("docker-registry (apt-get install docker-registry)")?;
    let registry = Registry(child, dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the registry did not listen");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((registry, port))
}

fn push(h: &Host, tag: &str, reference: &str) -> Result<(f64, TransferCounts)> {
    let t = Instant::now();
    let o = Operations::push(
        &h.fleet,
        &PushRequest {
            tag: tag.into(),
            reference: reference.into(),
            insecure: true,
        },
        &|_| {},
    )?;
    Ok((t.elapsed().as_secs_f64(), o.counts))
}

fn pull(h: &Host, reference: &str) -> Result<(f64, TransferCounts)> {
    let t = Instant::now();
    let o = Operations::pull(
        &h.fleet,
        &PullRequest {
            reference: reference.into(),
            tag: None,
            insecure: true,
        },
        &|_| {},
    )?;
    Ok((t.elapsed().as_secs_f64(), o.counts))
}

fn spawn1(h: &Host, tag: &str) -> Result<f64> {
    let t = Instant::now();
    let kids = h
        .fleet
        .spawn(tag, 1, 1, true, PartialFailure::Kill, &|_, _| {})?;
    let id = match kids.into_iter().next() {
        Some(Ok(c)) => c.sandbox.id,
        Some(Err(e)) => return Err(e.into()),
        None => bail!("no child"),
    };
    h.sh(&id, "test -s /tmp/rand")?;
    Ok(t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let Args { mem } = clap::Parser::parse();
    let artifacts =
        forkd_core::artifacts::ensure(&Env::from_process(), &ArtifactOptions::default(), &|m| {
            eprintln!("{m}")
        })?;
    let machine = Machine::read();
    let (_registry, port) = start_registry()?;
    let r1 = format!("127.0.0.1:{port}/bench/agent:p1");
    let r2 = format!("127.0.0.1:{port}/bench/agent:p2");
    let a = Host::new("a")?;
    let b = Host::new("b")?;
    let c = Host::new("c")?;

    eprintln!("booting a {mem} MiB guest on host A and warming it");
    let (src, _) = a.fleet.create(
        &artifacts,
        "busybox",
        &BootOptions {
            mem_mib: mem,
            boot_timeout: Duration::from_secs(300),
            ..BootOptions::default()
        },
    )?;
    let src = src.id;
    a.sh(&src, "mkdir -p /tmp && (mountpoint -q /tmp || mount -t tmpfs tmpfs /tmp) && dd if=/dev/urandom of=/tmp/rand bs=1M count=150 2>/dev/null && seq 1 4000000 > /tmp/seq")?;
    a.fleet.branch(&src, "p1", BranchMode::Live, true, None)?;
    eprintln!("pushing p1");
    let push1 = push(&a, "p1", &r1)?;
    eprintln!("  {push1:?}");
    // ~5% of guest RAM changes: 25 MiB rewritten in place, 25 MiB new.
    a.sh(&src, "dd if=/dev/urandom of=/tmp/rand bs=1M count=25 conv=notrunc 2>/dev/null && dd if=/dev/urandom of=/tmp/new bs=1M count=25 2>/dev/null")?;
    a.fleet.branch(&src, "p2", BranchMode::Live, true, None)?;
    eprintln!("pushing p2");
    let push2 = push(&a, "p2", &r2)?;
    eprintln!("  {push2:?}");

    eprintln!("host B pulls p1, spawns, then pulls p2 (has the parent) and spawns");
    let pull1 = pull(&b, &r1)?;
    let spawn_b1 = spawn1(&b, "p1")?;
    let pull2_b = pull(&b, &r2)?;
    let spawn_b2 = spawn1(&b, "p2")?;
    eprintln!("host C pulls p2 with nothing and spawns");
    let pull2_c = pull(&c, &r2)?;
    let spawn_c2 = spawn1(&c, "p2")?;

    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let row = |what: &str, (secs, k): &(f64, TransferCounts)| {
        format!(
            "| {what} | {secs:.1} | {:.1} | {:.1} | {} | {} | {:.1} |\n",
            mib(k.total_bytes),
            mib(k.bytes_transferred),
            k.chunks_transferred,
            k.chunks_reused,
            mib(k.zero_bytes)
        )
    };
    let mut md = String::from("# bench/registry\n\nSnapshots through Debian's `docker-registry` 2.8 on loopback (plain HTTP), two forkd homes on one machine as hosts. Host A boots a ");
    md += &format!("{mem} MiB busybox guest (TCG), writes 150 MiB of random data and a 30 MB text file into its tmpfs, branches it live (p1) and pushes it; then rewrites 25 MiB of the random data in place and writes 25 MiB more (~5% of guest RAM), branches again (p2), pushes. Host B pulls p1, then p2 with p1's chunks at hand; host C pulls p2 with nothing. Bytes: logical size of every file moved (RAM image, device state, disk layers, and on a first pull the kernel, initramfs and base disk), compressed bytes over the wire, chunks moved and reused, bytes of holes and zero runs (never sent). Chunking: FastCDC (forkd-oci's default, see registry-chunking.md), zstd.\n\n");
    md += &machine.markdown();
    md += "\n| transfer | s | logical MiB | wire MiB | chunks moved | chunks reused | holes MiB |\n|---|---|---|---|---|---|---|\n";
    md += &row("push p1 (registry empty)", &push1);
    md += &row("push p2 (registry has p1)", &push2);
    md += &row("pull p1 on B (nothing)", &pull1);
    md += &row("pull p2 on B (has p1)", &pull2_b);
    md += &row("pull p2 on C (nothing)", &pull2_c);
    md += &format!(
        "\n| pull, then spawn one exec-ready child | s |\n|---|---|\n| p2 on C (nothing local) | {:.1} + {:.1} = {:.1} |\n| p2 on B (has p1) | {:.1} + {:.1} = {:.1} |\n| p1 on B (first pull) | {:.1} + {:.1} = {:.1} |\n",
        pull2_c.0, spawn_c2, pull2_c.0 + spawn_c2,
        pull2_b.0, spawn_b2, pull2_b.0 + spawn_b2,
        pull1.0, spawn_b1, pull1.0 + spawn_b1
    );
    let j = |(s, k): &(f64, TransferCounts)| json!({"secs": s, "counts": k});
    let json = json!({
        "machine": machine,
        "mem_mib": mem,
        "push_p1": j(&push1),
        "push_p2": j(&push2),
        "pull_p1_b": j(&pull1),
        "pull_p2_b_has_parent": j(&pull2_b),
        "pull_p2_c_nothing": j(&pull2_c),
        "spawn_after_pull": {"c_p2": spawn_c2, "b_p2": spawn_b2, "b_p1": spawn_b1},
    });
    print!("{md}");
    write_results("registry", &json, &md)?;
    Ok(())
}
