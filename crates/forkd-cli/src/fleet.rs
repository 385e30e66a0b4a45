//! Commands on persistent sandboxes and snapshots: create, exec, ls, kill,
//! snapshot, snapshots, rmi, spawn.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use forkd_core::{BootOptions, Env, Fleet};
use forkd_protocol::client::OutputStream;
use forkd_protocol::ExecRequest;

use crate::{parse_env, parse_timeout, progress, remote, CreateArgs, ExecArgs};

fn fleet() -> Result<(Env, Fleet)> {
    let env = Env::from_process();
    let fleet = Fleet::open(&env)?;
    Ok((env, fleet))
}

pub fn create(args: CreateArgs) -> Result<ExitCode> {
    if let Some(c) = remote::client() {
        let m = &args.machine;
        let g = &args.guest;
        if m.accel != "auto"
            || m.net != "user"
            || m.tcg_tb_mib.is_some()
            || args.hugepages
            || args.prealloc
            || g.kernel.is_some()
            || g.agent.is_some()
        {
            anyhow::bail!(
                "with --remote, create takes --mem, --cpus, --image (busybox or debian-python) and --json only"
            );
        }
        let t = Instant::now();
        let sb = remote::create(c, &g.image, m.mem, m.cpus)?;
        return print_created(&sb, t, args.json);
    }
    let (env, fleet) = fleet()?;
    let opts = BootOptions {
        huge_pages: if args.hugepages {
            forkd_vm::HugePages::Hugetlb
        } else {
            forkd_vm::HugePages::Off
        },
        prealloc: args.prealloc,
        ..args.machine.boot_options()?
    };
    let artifacts =
        forkd_core::artifacts::ensure(&env, &args.guest.artifact_options()?, &progress)?;
    let t = Instant::now();
    let sb = fleet.create(&artifacts, &args.guest.image, &opts)?;
    print_created(&sb, t, args.json)
}

fn print_created(sb: &forkd_core::fleet::SandboxView, t: Instant, json: bool) -> Result<ExitCode> {
    if json {
        let mut v = serde_json::to_value(sb)?;
        v["boot_ms"] = serde_json::json!(t.elapsed().as_secs_f64() * 1000.0);
        println!("{v}");
    } else {
        println!("{}", sb.id);
        if std::io::stderr().is_terminal() {
            eprintln!(
                "forkd: booted in {:.0} ms",
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn exec(args: ExecArgs) -> Result<ExitCode> {
    let req = ExecRequest {
        argv: args.cmd.clone(),
        env: parse_env(&args.env)?,
        cwd: args.cwd.clone(),
        timeout_ms: parse_timeout(args.timeout)?,
        stdin: false,
    };
    if let Some(c) = remote::client() {
        // The API takes stdin whole and answers with the whole output.
        let input = if args.interactive {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
            Some(buf)
        } else {
            None
        };
        let (code, timed_out) = remote::exec(c, &args.id, &req, input)?;
        if timed_out {
            eprintln!("forkd: command timed out and was killed");
            return Ok(ExitCode::from(124));
        }
        return Ok(ExitCode::from((code & 0xff) as u8));
    }
    let (_, fleet) = fleet()?;
    let stdin: Option<Box<dyn std::io::Read + Send>> =
        args.interactive.then(|| Box::new(std::io::stdin()) as _);
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    let status = fleet.exec(&args.id, req, stdin, |s, b| {
        let _ = match s {
            OutputStream::Stdout => out.write_all(b),
            OutputStream::Stderr => err.write_all(b),
        };
    })?;
    let _ = out.flush();
    if status.timed_out {
        eprintln!("forkd: command timed out and was killed");
        return Ok(ExitCode::from(124));
    }
    Ok(ExitCode::from((status.shell_code() & 0xff) as u8))
}

pub fn ls(json: bool) -> Result<ExitCode> {
    let list = match remote::client() {
        Some(c) => remote::list(c)?,
        None => fleet()?.1.list()?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12} {:<8} {:>8} {:>6} {:>4}  {:<10} IMAGE",
        "ID", "STATE", "PID", "MEM", "CPU", "AGE"
    );
    let now = forkd_store::unix_now();
    for s in list {
        println!(
            "{:<12} {:<8} {:>8} {:>5}M {:>4}  {:<10} {}",
            s.id,
            s.state,
            s.pid,
            s.mem_mib,
            s.cpus,
            age(now.saturating_sub(s.created_at)),
            s.image
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

pub fn kill(ids: Vec<String>, all: bool) -> Result<ExitCode> {
    let remote = remote::client();
    let fleet = match remote {
        Some(_) => None,
        None => Some(fleet()?.1),
    };
    let ids: Vec<String> = if all {
        match (&fleet, remote) {
            (Some(f), _) => f.list()?,
            (None, Some(c)) => remote::list(c)?,
            (None, None) => unreachable!("one of the two is set"),
        }
        .into_iter()
        .map(|s| s.id)
        .collect()
    } else if ids.is_empty() {
        anyhow::bail!("name sandboxes to kill, or pass --all");
    } else {
        ids
    };
    let mut failed = false;
    for id in ids {
        let killed = match (&fleet, remote) {
            (Some(f), _) => f.kill(&id).map_err(anyhow::Error::from),
            (None, Some(c)) => remote::kill(c, &id),
            (None, None) => unreachable!("one of the two is set"),
        };
        match killed {
            Ok(()) => println!("{id}"),
            Err(e) => {
                eprintln!("forkd: error: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn snapshot(id: &str, tag: &str, json: bool) -> Result<ExitCode> {
    let (_, fleet) = fleet()?;
    let info = fleet.snapshot(id, tag)?;
    if json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        println!("{}", info.tag);
        eprintln!(
            "forkd: snapshot `{}` of {id}: paused {:.1} ms ({:.1} MiB of RAM copied), ready in {:.0} ms",
            info.tag,
            info.pause_ms,
            info.ram_copied as f64 / (1 << 20) as f64,
            info.total_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn snapshots(json: bool) -> Result<ExitCode> {
    let fleet = match remote::client() {
        Some(_) => None,
        None => Some(fleet()?.1),
    };
    let rows = match (&fleet, remote::client()) {
        (Some(f), _) => f.db().list_snapshots()?,
        (None, Some(c)) => remote::snapshots(c)?,
        (None, None) => unreachable!("one of the two is set"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<8} {:>9} {:<12} {:<24} {:>9} DIR",
        "TAG", "STATUS", "PAUSE ms", "SOURCE", "PARENT", "SIZE"
    );
    for r in rows {
        let detail = match (&fleet, remote::client()) {
            (Some(f), _) => f.snapshot_detail(&r.tag).ok(),
            (None, Some(c)) => remote::detail(c, &r.tag).ok(),
            (None, None) => None,
        };
        println!(
            "{:<24} {:<8} {:>9} {:<12} {:<24} {:>9} {}",
            r.tag,
            r.status,
            r.pause_ms.map(|p| format!("{p:.1}")).unwrap_or_default(),
            r.source.unwrap_or_default(),
            r.parent.unwrap_or_default(),
            detail.map(|d| mib(d.allocated)).unwrap_or_default(),
            r.dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

pub fn info(tag: &str, json: bool) -> Result<ExitCode> {
    let d = match remote::client() {
        Some(c) => remote::detail(c, tag)?,
        None => fleet()?.1.snapshot_detail(tag)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("tag:         {}", d.row.tag);
    println!("status:      {}", d.row.status);
    if let Some(e) = &d.row.error {
        println!("error:       {e}");
    }
    println!("dir:         {}", d.row.dir.display());
    if let Some(s) = &d.row.source {
        println!("source:      {s}");
    }
    if let Some(p) = d.row.pause_ms {
        println!("pause:       {p:.1} ms");
    }
    let chain = if d.chain.is_empty() {
        "(none)".to_string()
    } else {
        d.chain.join(" <- ")
    };
    println!("parents:     {chain}");
    match (&d.ram_parent, d.layer_pages) {
        (Some(p), Some(n)) => println!(
            "ram:         layer over `{p}`: {n} pages ({})",
            mib(n * 4096)
        ),
        (Some(p), None) => println!("ram:         layer over `{p}` (unreadable map)"),
        _ => println!("ram:         full image"),
    }
    println!("size:        {} on disk", mib(d.allocated));
    for f in &d.files {
        println!(
            "  {:<16} {:>12} allocated of {}",
            f.name,
            mib(f.allocated),
            mib(f.size)
        );
    }
    let deps = if d.dependents.is_empty() {
        "(none)".to_string()
    } else {
        d.dependents.join(", ")
    };
    println!("dependents:  {deps}");
    Ok(ExitCode::SUCCESS)
}

pub fn rmi(tag: &str, force: bool) -> Result<ExitCode> {
    match remote::client() {
        Some(c) => remote::rmi(c, tag, force)?,
        None => fleet()?.1.remove_snapshot(tag, force)?,
    }
    println!("{tag}");
    Ok(ExitCode::SUCCESS)
}

/// Largest pool and spawn a single command accepts.
const MAX_CHILDREN: usize = 1000;

pub fn pool(tag: &str, size: usize) -> Result<ExitCode> {
    if size > MAX_CHILDREN {
        anyhow::bail!("--size {size} is over the limit of {MAX_CHILDREN}");
    }
    if let Some(c) = remote::client() {
        let ready = remote::pool(c, tag, size)?;
        eprintln!("forkd: pool of `{tag}`: {ready} ready, target {size}");
        return Ok(ExitCode::SUCCESS);
    }
    let (_, fleet) = fleet()?;
    let started = fleet.fill_pool(tag, size)?;
    eprintln!("forkd: pool of `{tag}`: started {started}, now {size}");
    Ok(ExitCode::SUCCESS)
}

/// Refills the pool from a detached process so that this command can return.
fn refill_in_background(tag: &str, size: usize) -> Result<()> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["pool", tag, "--size", &size.to_string()]);
    forkd_core::spawn_detached(&mut cmd)?;
    Ok(())
}

pub fn spawn(
    tag: &str,
    n: usize,
    parallel: Option<usize>,
    pool: Option<usize>,
    no_wait: bool,
    json: bool,
) -> Result<ExitCode> {
    if n > MAX_CHILDREN || pool.is_some_and(|k| k > MAX_CHILDREN) {
        anyhow::bail!("-n and --pool are limited to {MAX_CHILDREN}");
    }
    if remote::client().is_some() && (parallel.is_some() || pool.is_some()) {
        anyhow::bail!("with --remote, spawn takes -n, --no-wait and --json (the daemon chooses parallelism; use `forkd pool` for pools)");
    }
    let fleet = match remote::client() {
        Some(_) => None,
        None => Some(fleet()?.1),
    };
    if let Some(f) = &fleet {
        f.set_no_wait(no_wait);
    }
    let parallel = parallel.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1)
    });
    let t = Instant::now();
    let tty = !json && std::io::stderr().is_terminal();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let on_ready = |_: usize, r: &Result<forkd_core::fleet::Child, forkd_core::CoreError>| {
        let k = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if tty {
            match r {
                Ok(c) => eprintln!(
                    "[{k}/{n}] {} ready in {:.0} ms{}",
                    c.id,
                    c.ready_ms,
                    if c.from_pool { " (pool)" } else { "" }
                ),
                Err(e) => eprintln!("[{k}/{n}] failed: {e}"),
            }
        }
    };
    let results = match (&fleet, remote::client()) {
        (Some(f), _) => f.spawn(tag, n, parallel, &on_ready)?,
        (None, Some(c)) => {
            let kids = remote::spawn(c, tag, n, no_wait)?;
            let results: Vec<Result<forkd_core::fleet::Child, forkd_core::CoreError>> =
                kids.into_iter().map(Ok).collect();
            for (i, r) in results.iter().enumerate() {
                on_ready(i, r);
            }
            results
        }
        (None, None) => unreachable!("one of the two is set"),
    };
    let wall = t.elapsed().as_secs_f64() * 1000.0;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(k) = pool {
        refill_in_background(tag, k)?;
    }
    if json {
        let items: Vec<serde_json::Value> = results
            .iter()
            .map(|r| match r {
                Ok(c) => serde_json::to_value(c).expect("serialises"),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "tag": tag, "wall_ms": wall, "children": items })
        );
    } else {
        for r in &results {
            match r {
                Ok(c) => println!("{}\t{:.0} ms", c.id, c.ready_ms),
                Err(e) => eprintln!("forkd: error: a child failed: {e}"),
            }
        }
        eprintln!(
            "forkd: {} of {n} children ready in {wall:.0} ms",
            n - failed
        );
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn branch(
    id: &str,
    tag: Option<String>,
    mode: &str,
    no_wait: bool,
    json: bool,
) -> Result<ExitCode> {
    let mode: forkd_core::branch::Mode = mode.parse().map_err(anyhow::Error::msg)?;
    let tag = tag.unwrap_or_else(|| format!("{id}-branch-{}", forkd_store::unix_now()));
    if let Some(c) = remote::client() {
        let info = remote::branch(c, id, &tag, mode, no_wait)?;
        return print_branch(id, &info, json);
    }
    let (_, fleet) = fleet()?;
    let launch = if no_wait {
        // The writer must outlive this command.
        forkd_core::branch::WriterLaunch::Process(std::env::current_exe()?)
    } else {
        forkd_core::branch::WriterLaunch::Thread
    };
    let info = fleet.branch(id, &tag, mode, !no_wait, launch)?;
    print_branch(id, &info, json)
}

fn print_branch(id: &str, info: &forkd_core::branch::BranchInfo, json: bool) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(info)?);
    } else {
        println!("{}", info.tag);
        let downtime = info
            .qemu_downtime_ms
            .map(|d| format!(", QEMU downtime {d:.0} ms"))
            .unwrap_or_default();
        let ready = info
            .ready_ms
            .map(|r| format!("; ready in {r:.0} ms"))
            .unwrap_or_else(|| " (writing in the background)".into());
        eprintln!(
            "forkd: {:?} branch of {id}: paused {:.1} ms{downtime}{ready}",
            info.mode, info.pause_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}
