//! The commands on persistent sandboxes and snapshots: each builds a request
//! from its arguments, calls the operations seam (this host's fleet or a
//! daemon, the same either way) and prints the result. No default and no
//! policy is decided here.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Result;
use forkd_ops::{
    BranchMode, BranchOutcome, BranchRequest, Child, CreateRequest, ExecSpec, GuestFiles, OpError,
    Operations, RemoveSnapshot, SpawnRequest, Stream,
};

use crate::{parse_env, parse_timeout, CreateArgs, ExecArgs};

pub fn create(ops: &dyn Operations, args: CreateArgs) -> Result<ExitCode> {
    let m = &args.machine;
    let g = &args.guest;
    let req = CreateRequest {
        image: Some(g.image.clone()),
        insecure_registry: g.insecure,
        mem_mib: m.mem,
        cpus: m.cpus,
        accel: Some(m.accel.parse().map_err(crate::exit::Usage)?),
        network: Some(m.net.parse().map_err(crate::exit::Usage)?),
        allow_out: m.allow_out.clone(),
        deny_out: m.deny_out.clone(),
        memory_limit_mib: m.limits.memory_limit,
        cpu_quota_pct: m.limits.cpu_quota_pct()?,
        tcg_tb_mib: m.tcg_tb_mib,
        huge_pages: args.hugepages,
        prealloc: args.prealloc,
        guest: GuestFiles {
            kernel: g.kernel.clone(),
            modules: g.modules.clone(),
            agent: g.agent.clone(),
        },
        snapshot_as: None,
        settings: args.lifetime.settings()?,
    };
    let created = ops.create(&req, &crate::progress)?;
    if args.json {
        println!("{}", serde_json::to_string(&created)?);
    } else {
        println!("{}", created.sandbox.id);
        if std::io::stderr().is_terminal() {
            eprintln!("forkd: booted in {:.0} ms", created.boot_ms);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn exec(ops: &dyn Operations, args: ExecArgs) -> Result<ExitCode> {
    let spec = ExecSpec {
        argv: args.cmd.clone(),
        env: parse_env(&args.env)?,
        cwd: args.cwd.clone(),
        timeout: parse_timeout(args.timeout)?.map(std::time::Duration::from_millis),
    };
    let stdin: Option<Box<dyn std::io::Read + Send>> =
        args.interactive.then(|| Box::new(std::io::stdin()) as _);
    let mut sink = Output::new(args.json);
    let outcome = ops.exec(&args.id, &spec, stdin, &mut |s, b| sink.write(s, b))?;
    sink.finish(&outcome)
}

/// Where a command's output goes: streamed to this process's stdout and
/// stderr as it comes, or collected for one `--json` object.
pub(crate) enum Output {
    Stream { tty: bool },
    Collect { stdout: Vec<u8>, stderr: Vec<u8> },
}

/// A command's result as `exec --json` and `run --json` print it.
#[derive(serde::Serialize)]
struct ExecJson {
    stdout: String,
    stderr: String,
    exit_code: i32,
    signal: Option<i32>,
    timed_out: bool,
    duration_ms: u64,
}

impl Output {
    pub(crate) fn new(json: bool) -> Output {
        if json {
            Output::Collect {
                stdout: Vec::new(),
                stderr: Vec::new(),
            }
        } else {
            Output::Stream {
                tty: std::io::stdout().is_terminal(),
            }
        }
    }

    pub(crate) fn write(&mut self, s: Stream, b: &[u8]) {
        match self {
            Output::Stream { tty } => {
                let _ = match s {
                    Stream::Stdout => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(b)
                            .and_then(|_| if *tty { out.flush() } else { Ok(()) })
                    }
                    Stream::Stderr => std::io::stderr().write_all(b),
                };
            }
            Output::Collect { stdout, stderr } => match s {
                Stream::Stdout => stdout.extend_from_slice(b),
                Stream::Stderr => stderr.extend_from_slice(b),
            },
        }
    }

    /// Prints the JSON (when collecting) and returns the exit code: the
    /// command's, 124 when it timed out.
    pub(crate) fn finish(self, outcome: &forkd_ops::ExecOutcome) -> Result<ExitCode> {
        match self {
            Output::Stream { .. } => {
                let _ = std::io::stdout().flush();
                if outcome.timed_out {
                    eprintln!("forkd: command timed out and was killed");
                }
            }
            Output::Collect { stdout, stderr } => println!(
                "{}",
                serde_json::to_string(&ExecJson {
                    stdout: String::from_utf8_lossy(&stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&stderr).into_owned(),
                    exit_code: outcome.exit_code(),
                    signal: outcome.signal,
                    timed_out: outcome.timed_out,
                    duration_ms: outcome.duration_ms,
                })?
            ),
        }
        Ok(ExitCode::from((outcome.exit_code() & 0xff) as u8))
    }
}

pub fn ls(ops: &dyn Operations, labels: &[(String, String)], json: bool) -> Result<ExitCode> {
    let mut list = ops.list()?;
    list.retain(|s| forkd_ops::lifetime::labels_match(&s.lifetime.labels, labels));
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

pub(crate) fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// `forkd kill`: the named sandboxes, those with every label asked for
/// (`--label`), or every one (`--all`, which also kills QEMUs of this home
/// that have no record).
pub fn kill(
    ops: &dyn Operations,
    ids: Vec<String>,
    all: bool,
    labels: &[(String, String)],
    json: bool,
) -> Result<ExitCode> {
    let (mut done, ids) = if all {
        (ops.kill_all()?, ids)
    } else if !labels.is_empty() {
        let selected = ops
            .list()?
            .into_iter()
            .filter(|s| forkd_ops::lifetime::labels_match(&s.lifetime.labels, labels))
            .map(|s| s.id)
            .collect();
        (forkd_ops::KilledAll::default(), selected)
    } else if ids.is_empty() {
        return Err(
            crate::exit::Usage("name sandboxes to kill, or pass --all or --label".into()).into(),
        );
    } else {
        (forkd_ops::KilledAll::default(), ids)
    };
    for id in ids {
        match ops.kill(&id) {
            Ok(()) => done.killed.push(id),
            Err(e) => done.failed.push((id, e)),
        }
    }
    let forkd_ops::KilledAll {
        killed,
        failed,
        orphans,
    } = done;
    if json {
        let failed: Vec<serde_json::Value> = failed
            .iter()
            .map(|(id, e)| serde_json::json!({ "id": id, "error": crate::hints::render(e) }))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "killed": killed, "failed": failed, "orphans": orphans })
        );
    } else {
        for id in &killed {
            println!("{id}");
        }
        for (_, e) in &failed {
            eprintln!("forkd: error: {}", crate::hints::render(e));
        }
        if !orphans.is_empty() {
            let pids: Vec<String> = orphans.iter().map(|p| p.to_string()).collect();
            eprintln!(
                "forkd: killed {} QEMU(s) that had no record: pid {}",
                orphans.len(),
                pids.join(", ")
            );
        }
    }
    Ok(crate::exit::of_items(
        killed.len(),
        failed.first().map(|(_, e)| e),
    ))
}

/// `forkd timeout`: moves a sandbox's end time; prints it (Unix
/// milliseconds) or `none`.
pub fn timeout(
    ops: &dyn Operations,
    id: &str,
    ttl: Option<std::time::Duration>,
) -> Result<ExitCode> {
    let s = ops.set_timeout(id, ttl)?;
    match s.lifetime.ends_at_ms {
        Some(ms) => println!("{id} ends at {ms} (unix ms)"),
        None => println!("{id} has no end time"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `forkd snapshot`: a full branch (the guest stopped for the copy).
pub fn cp(ops: &dyn Operations, src: &str, dst: &str, quiet: bool, json: bool) -> Result<ExitCode> {
    let (src, dst) = (crate::cp::Place::parse(src), crate::cp::Place::parse(dst));
    let copied = crate::cp::copy(ops, &src, &dst)?;
    if json {
        let line = serde_json::to_string(&copied)?;
        // A tar on stdout keeps stdout to itself.
        if dst == crate::cp::Place::Stdio {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    } else if !quiet {
        eprintln!(
            "forkd: copied {} {} ({}) from {} to {}",
            copied.entries,
            if copied.entries == 1 {
                "entry"
            } else {
                "entries"
            },
            human_bytes(copied.bytes),
            copied.src,
            copied.dst
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub fn snapshot(ops: &dyn Operations, id: &str, tag: &str, json: bool) -> Result<ExitCode> {
    let out = ops.branch(&BranchRequest {
        source: id.to_string(),
        tag: Some(tag.to_string()),
        mode: Some(BranchMode::Full),
        wait: Some(true),
        expect_parent: None,
    })?;
    if json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", out.snapshot.tag);
        eprintln!(
            "forkd: snapshot `{}` of {id}: paused {:.1} ms ({:.1} MiB of RAM copied), ready in {:.0} ms",
            out.snapshot.tag,
            out.pause_ms,
            out.ram_copied.unwrap_or(0) as f64 / (1 << 20) as f64,
            out.ready_ms.unwrap_or(0.0)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn snapshots(ops: &dyn Operations, json: bool) -> Result<ExitCode> {
    let rows = ops.snapshots()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<8} {:>9} {:<12} {:<24} {:>9} DIR",
        "TAG", "STATUS", "PAUSE ms", "SOURCE", "PARENT", "SIZE"
    );
    for r in rows {
        let size = ops.snapshot_info(&r.tag).ok().map(|d| mib(d.allocated));
        println!(
            "{:<24} {:<8} {:>9} {:<12} {:<24} {:>9} {}",
            r.tag,
            r.status,
            r.pause_ms.map(|p| format!("{p:.1}")).unwrap_or_default(),
            r.source.unwrap_or_default(),
            r.parent.unwrap_or_default(),
            size.unwrap_or_default(),
            r.dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// `forkd info ID` for a sandbox.
fn sandbox_info(s: &forkd_ops::Sandbox, json: bool) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("id:          {}", s.id);
    println!("state:       {}", s.state);
    println!("pid:         {}", s.pid);
    println!("image:       {}", s.image);
    println!("machine:     {} MiB, {} vCPU", s.mem_mib, s.cpus);
    if let Some(t) = &s.snapshot {
        println!("snapshot:    {t}");
    }
    println!("network:     {}", s.network);
    println!("branches:    {}", s.branches);
    Ok(ExitCode::SUCCESS)
}

pub fn info(ops: &dyn Operations, tag: &str, json: bool) -> Result<ExitCode> {
    let d = match ops.snapshot_info(tag) {
        Ok(d) => d,
        // Not a snapshot: a sandbox, when one has that id.
        Err(e) if e.kind == forkd_ops::ErrorKind::NotFound => match ops.sandbox(tag) {
            Ok(sb) => return sandbox_info(&sb, json),
            Err(_) => return Err(e.into()),
        },
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(ExitCode::SUCCESS);
    }
    let s = &d.snapshot;
    println!("tag:         {}", s.tag);
    println!("status:      {}", s.status);
    if let Some(e) = &s.error {
        println!("error:       {e}");
    }
    println!("dir:         {}", s.dir.display());
    if let Some(src) = &s.source {
        println!("source:      {src}");
    }
    if let Some(p) = s.pause_ms {
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
    if let Some(n) = &d.network {
        println!("network:     {n} (its children's, unless a spawn says otherwise)");
    }
    if d.bootable {
        println!(
            "layers:      {} RAM, {} disk (what its children are made from)",
            d.layers.ram, d.layers.disk
        );
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
    let deps: Vec<String> = d
        .dependents
        .sandboxes
        .iter()
        .map(|s| format!("sandbox {s}"))
        .chain(
            d.dependents
                .snapshots
                .iter()
                .map(|t| format!("snapshot {t}")),
        )
        .collect();
    let deps = if deps.is_empty() {
        "(none)".to_string()
    } else {
        deps.join(", ")
    };
    println!("dependents:  {deps}");
    Ok(ExitCode::SUCCESS)
}

pub fn rmi(ops: &dyn Operations, tag: &str, force: bool) -> Result<ExitCode> {
    for t in ops.remove_snapshot(
        tag,
        RemoveSnapshot {
            force,
            cascade: false,
        },
    )? {
        println!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `forkd rmi --failed`.
pub fn prune(ops: &dyn Operations) -> Result<ExitCode> {
    let p = ops.prune_snapshots()?;
    for t in &p.removed {
        println!("{t}");
    }
    for k in &p.kept {
        let deps: Vec<String> = k
            .dependents
            .sandboxes
            .iter()
            .map(|s| format!("sandbox {s}"))
            .chain(
                k.dependents
                    .snapshots
                    .iter()
                    .map(|t| format!("snapshot {t}")),
            )
            .collect();
        eprintln!(
            "forkd: kept `{}`: in use by {}; kill those first or `forkd rmi --force {}`",
            k.tag,
            deps.join(", "),
            k.tag
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `forkd gc`.
pub fn compact(ops: &dyn Operations, tag: &str, json: bool) -> Result<ExitCode> {
    let c = ops.compact(tag)?;
    if json {
        println!("{}", serde_json::to_string(&c)?);
        return Ok(ExitCode::SUCCESS);
    }
    let (b, a) = (&c.before, &c.after);
    if !c.compacted {
        eprintln!(
            "forkd: snapshot `{tag}` is one RAM image and {} already: nothing to do",
            match b.layers.disk {
                0 => "no disk".to_string(),
                n => format!("{n} disk layer"),
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "forkd: compacted `{tag}`: RAM layers {} -> {}, disk layers {} -> {}, {} -> {} on disk",
        b.layers.ram,
        a.layers.ram,
        b.layers.disk,
        a.layers.disk,
        mib(b.bytes),
        mib(a.bytes)
    );
    if !c.released.is_empty() {
        eprintln!(
            "forkd: it no longer needs {} (kept; `forkd rmi` deletes one once nothing else needs it)",
            c.released
                .iter()
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn gc(ops: &dyn Operations, json: bool) -> Result<ExitCode> {
    let g = ops.gc()?;
    if json {
        println!("{}", serde_json::to_string(&g)?);
    } else {
        for name in &g.removed {
            println!("{name}");
        }
        eprintln!(
            "forkd: deleted {} cached RAM image(s), {} freed; {} still referenced",
            g.removed.len(),
            mib(g.freed_bytes),
            g.kept
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pool(ops: &dyn Operations, tag: &str, size: usize) -> Result<ExitCode> {
    let p = ops.pool(tag, size)?;
    eprintln!(
        "forkd: pool of `{tag}`: {} ready (started {}), target {}",
        p.ready, p.started, p.size
    );
    Ok(ExitCode::SUCCESS)
}

pub fn spawn(ops: &dyn Operations, req: SpawnRequest, json: bool) -> Result<ExitCode> {
    let (tag, n) = (req.tag.as_str(), req.n);
    let tty = !json && std::io::stderr().is_terminal();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let on_child = |_: usize, r: &Result<Child, OpError>| {
        let k = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if tty {
            match r {
                Ok(c) => eprintln!(
                    "[{k}/{n}] {} ready in {:.0} ms{}",
                    c.sandbox.id,
                    c.ready_ms,
                    if c.from_pool { " (pool)" } else { "" }
                ),
                Err(e) => eprintln!("[{k}/{n}] failed: {}", crate::hints::render(e)),
            }
        }
    };
    let out = ops.spawn(&req, &on_child)?;
    let failed = out.failed();
    if json {
        let items: Vec<serde_json::Value> = out
            .children
            .iter()
            .map(|r| match r {
                Ok(c) => serde_json::to_value(c).expect("serialises"),
                Err(e) => serde_json::json!({ "error": crate::hints::render(e) }),
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "tag": tag, "wall_ms": out.wall_ms, "children": items })
        );
    } else {
        for r in &out.children {
            match r {
                Ok(c) => println!("{}\t{:.0} ms", c.sandbox.id, c.ready_ms),
                Err(e) => eprintln!("forkd: error: a child failed: {}", crate::hints::render(e)),
            }
        }
        eprintln!(
            "forkd: {} of {n} children ready in {:.0} ms",
            n - failed,
            out.wall_ms
        );
    }
    Ok(crate::exit::of_items(
        n - failed,
        out.children.iter().find_map(|c| c.as_ref().err()),
    ))
}

pub fn branch(
    ops: &dyn Operations,
    id: &str,
    tag: Option<String>,
    mode: &str,
    no_wait: bool,
    json: bool,
) -> Result<ExitCode> {
    let mode: BranchMode = mode
        .parse()
        .map_err(|e: forkd_ops::UnknownState| crate::exit::Usage(e.to_string()))?;
    let out = ops.branch(&BranchRequest {
        source: id.to_string(),
        tag,
        mode: Some(mode),
        wait: no_wait.then_some(false),
        expect_parent: None,
    })?;
    print_branch(id, &out, json)
}

fn print_branch(id: &str, out: &BranchOutcome, json: bool) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(out)?);
    } else {
        println!("{}", out.snapshot.tag);
        let downtime = out
            .qemu_downtime_ms
            .map(|d| format!(", QEMU downtime {d:.0} ms"))
            .unwrap_or_default();
        let ready = out
            .ready_ms
            .map(|r| format!("; ready in {r:.0} ms"))
            .unwrap_or_else(|| " (writing in the background)".into());
        eprintln!(
            "forkd: {} branch of {id}: paused {:.1} ms{downtime}{ready}",
            out.mode, out.pause_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `forkd mcp`: the MCP server on stdin/stdout until the client hangs up.
pub fn mcp(ops: Box<dyn Operations>) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(forkd_mcp::serve_stdio(std::sync::Arc::from(ops)))?;
    Ok(ExitCode::SUCCESS)
}
