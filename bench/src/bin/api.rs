//! `bench/api`: the REST daemon under load, and what a call through it costs.
//!
//! Starts its own `forkd daemon` on a private socket (a private `FORKD_HOME`
//! whose artifact caches link to the usual ones, unless `--home` names one, and
//! a private runtime dir), then, through the API only: boots a 256 MiB busybox
//! parent, warms it, branches it, spawns M children from the branch in one call,
//! fires a burst of concurrent n=1 spawn calls into the spawn cap (the 429s are
//! expected and counted apart), compares one exec through the API with the same
//! exec through the CLI (`forkd exec ID -- true`, a process per call) and
//! through an in-process agent connection (the floor), and finally runs K
//! client threads for S seconds, each calling exec round-robin over the M
//! children. Every sandbox it made is deleted and the daemon stopped at the
//! end, on error, on panic and on Ctrl-C. Exits non-zero when any call failed.
//! Writes `<out>.json` and `<out>.md` (default `bench/results/api`).
//!
//!     cargo build --release -p forkd-bench -p forkd-cli
//!     target/release/api [--clients 8] [--sandboxes 4] [--seconds 20] [--out PATH] [--json]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use forkd_bench::{Machine, Stats};
use forkd_client::{Answer, Client};
use forkd_core::{ArtifactOptions, Env, Fleet};
use serde_json::{json, Value};

const USAGE: &str = "usage: api [--clients K] [--sandboxes M] [--seconds S] [--burst B] \
[--max-spawn N] [--cli-calls N] [--home DIR] [--out PATH] [--json]";

/// What the command line asked for.
#[derive(Debug, Clone)]
struct Options {
    clients: usize,
    sandboxes: usize,
    seconds: u64,
    /// Concurrent n=1 spawn calls fired at once into the spawn cap.
    burst: usize,
    /// The daemon's `--max-spawn`.
    max_spawn: usize,
    /// Sequential calls per path in the API/CLI/agent comparison.
    cli_calls: usize,
    /// Use this FORKD_HOME instead of a private one (kept afterwards).
    home: Option<PathBuf>,
    out: PathBuf,
    json: bool,
}

impl Options {
    fn parse() -> Result<Options> {
        let mut o = Options {
            clients: 8,
            sandboxes: 4,
            seconds: 20,
            burst: 8,
            max_spawn: 4,
            cli_calls: 20,
            home: None,
            out: forkd_bench::results_dir().join("api"),
            json: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .with_context(|| format!("{name} needs a value; {USAGE}"))
            };
            let number = |name: &str, v: String| -> Result<usize> {
                match v.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => bail!("{name} takes a positive number, not {v:?}"),
                }
            };
            match a.as_str() {
                "--clients" => o.clients = number("--clients", value("--clients")?)?,
                "--sandboxes" => o.sandboxes = number("--sandboxes", value("--sandboxes")?)?,
                "--seconds" => o.seconds = number("--seconds", value("--seconds")?)? as u64,
                "--burst" => o.burst = number("--burst", value("--burst")?)?,
                "--max-spawn" => o.max_spawn = number("--max-spawn", value("--max-spawn")?)?,
                "--cli-calls" => o.cli_calls = number("--cli-calls", value("--cli-calls")?)?,
                "--home" => o.home = Some(PathBuf::from(value("--home")?)),
                "--out" => o.out = PathBuf::from(value("--out")?),
                "--json" => o.json = true,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}; {USAGE}"),
            }
        }
        Ok(o)
    }
}

fn main() -> ExitCode {
    install_signal_handlers();
    let result = Options::parse().and_then(|o| run(&o).map(|errors| (o, errors)));
    match result {
        Ok((_, 0)) => ExitCode::SUCCESS,
        Ok((o, errors)) => {
            eprintln!(
                "api: {errors} calls failed (see {}.md); failing the run",
                o.out.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("api: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the whole benchmark; answers the number of failed calls.
fn run(o: &Options) -> Result<usize> {
    let forkd = std::env::current_exe()?.with_file_name("forkd");
    if !forkd.is_file() {
        bail!(
            "no forkd binary at {}: build it with `cargo build --release -p forkd-cli`",
            forkd.display()
        );
    }
    let machine = Machine::read();
    eprintln!(
        "api benchmark on {} ({} cores, {})",
        machine.cpu, machine.cores, machine.accel
    );
    let daemon = Daemon::start(&forkd, private_env(o)?, o)?;
    let api = &daemon.client;
    let tag = format!("bench-api-{}", std::process::id());

    // 1. parent: boot, warm, branch.
    check_interrupted()?;
    eprintln!("booting a 256 MiB busybox parent through the API…");
    let t = Instant::now();
    let parent = expect(
        api,
        "POST",
        "/v1/sandboxes/boot",
        json!({"image": "busybox", "memory_mib": 256}),
        201,
    )?;
    let boot_ms = ms(t.elapsed());
    let parent_id = str_field(&parent, "id")?;
    daemon.created(&parent_id);
    eprintln!("parent {parent_id} booted in {boot_ms:.0} ms; warming it");
    let warm = expect(
        api,
        "POST",
        &format!("/v1/sandboxes/{parent_id}/exec"),
        json!({"args": ["sh", "-c", "head -c 16777216 /dev/urandom > /tmp/warm.bin; sleep 100000 >/dev/null 2>&1 & echo ok"], "timeout_secs": 120}),
        200,
    )?;
    if warm["exit_code"] != json!(0) {
        bail!("warming the parent failed: {warm}");
    }
    check_interrupted()?;
    let t = Instant::now();
    let snap = expect(
        api,
        "POST",
        &format!("/v1/sandboxes/{parent_id}/branch"),
        json!({"tag": tag, "wait": true}),
        201,
    )?;
    daemon.snapshot(&tag);
    let branch_ms = ms(t.elapsed());
    let pause_ms = snap["pause_us"]
        .as_f64()
        .map(|us| us / 1000.0)
        .or_else(|| snap["pause_ms"].as_f64());
    eprintln!(
        "branched `{tag}` in {branch_ms:.0} ms (pause {} ms)",
        pause_ms.map_or("?".into(), |p| format!("{p:.1}"))
    );

    // 2. spawn M children in one call.
    check_interrupted()?;
    eprintln!("spawning {} children in one call…", o.sandboxes);
    let t = Instant::now();
    let kids = expect(
        api,
        "POST",
        "/v1/sandboxes",
        json!({"snapshot_tag": tag, "n": o.sandboxes}),
        201,
    )?;
    let spawn_ms = ms(t.elapsed());
    let kids: Vec<String> = kids
        .as_array()
        .context("spawn answered something other than a list")?
        .iter()
        .map(|k| str_field(k, "id"))
        .collect::<Result<_>>()?;
    for k in &kids {
        daemon.created(k);
    }
    if kids.len() != o.sandboxes {
        bail!(
            "asked for {} children, got {}: {kids:?}",
            o.sandboxes,
            kids.len()
        );
    }
    eprintln!(
        "spawned {} children in {spawn_ms:.0} ms: {}",
        kids.len(),
        kids.join(" ")
    );

    // 3. a burst of concurrent n=1 spawns into the cap.
    check_interrupted()?;
    eprintln!(
        "burst: {} concurrent n=1 spawn calls (daemon --max-spawn {})…",
        o.burst, o.max_spawn
    );
    let burst = spawn_burst(&daemon, &tag, o.burst);
    eprintln!(
        "burst: {} created, {} refused with 429, {} failed in {:.0} ms",
        burst.created.len(),
        burst.refused.len(),
        burst.failures.len(),
        burst.wall_ms
    );
    for id in &burst.created {
        daemon.delete(id);
    }

    // 4. one exec, sequentially: API vs CLI vs an in-process agent connection.
    check_interrupted()?;
    let target = &kids[0];
    eprintln!(
        "comparing {} sequential execs of `true` in {target}: API, CLI, agent…",
        o.cli_calls
    );
    let cmp = compare_exec(&daemon, &forkd, target, o.cli_calls)?;

    // 5. K clients for S seconds.
    check_interrupted()?;
    eprintln!(
        "load: {} clients for {} s, exec `true` round-robin over {} sandboxes…",
        o.clients,
        o.seconds,
        kids.len()
    );
    let load = exec_load(api, &kids, o.clients, Duration::from_secs(o.seconds));
    eprintln!(
        "load: {} calls in {:.1} s = {:.1} calls/s, {} errors, {} refused with 429",
        load.ok.len(),
        load.wall.as_secs_f64(),
        load.calls_per_s(),
        load.failures.len(),
        load.refused
    );
    check_interrupted()?;

    let errors = burst.failures.len() + cmp.failures.len() + load.failures.len();
    let setup = Setup {
        boot_ms,
        branch_ms,
        pause_ms,
        spawn_ms,
        max_spawn: o.max_spawn,
    };
    let md = markdown(o, &machine, &setup, &burst, &cmp, &load);
    let report = json!({
        "machine": machine,
        "options": {
            "clients": o.clients, "sandboxes": o.sandboxes, "seconds": o.seconds,
            "burst": o.burst, "max_spawn": o.max_spawn, "sequential_calls": o.cli_calls,
        },
        "setup": {
            "boot_ms": boot_ms, "branch_ms": branch_ms, "branch_pause_ms": pause_ms,
        },
        "spawn": {
            "one_call": { "n": o.sandboxes, "wall_ms": spawn_ms },
            "burst": burst.json(),
        },
        "exec_sequential": cmp.json(),
        "exec_load": load.json(),
        "errors": errors,
    });
    write(&o.out, &report, &md)?;
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{md}");
    }
    Ok(errors)
}

// ---------------------------------------------------------------- the daemon

/// The daemon this run started, and everything it created through it. Dropping
/// it deletes the sandboxes and snapshot, stops the daemon and removes the
/// private directories, whatever state the run is in.
struct Daemon {
    child: Child,
    client: Client,
    env: PrivateEnv,
    forkd: PathBuf,
    log: PathBuf,
    sandboxes: Mutex<Vec<String>>,
    snapshots: Mutex<Vec<String>>,
}

impl Daemon {
    fn start(forkd: &Path, env: PrivateEnv, o: &Options) -> Result<Daemon> {
        let socket = env.runtime.join("api.sock");
        let log = env.root.join("daemon.log");
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("creating the daemon log {}", log.display()))?;
        let mut cmd = Command::new(forkd);
        cmd.args(["daemon", "--listen"])
            .arg(&socket)
            .args(["--max-spawn", &o.max_spawn.to_string()])
            .envs(env.vars())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        // Its own process group: a Ctrl-C at the terminal reaches only this
        // benchmark, which then deletes what it made through the daemon.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours;
        // it asks the kernel to stop the daemon if this process dies.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} daemon", forkd.display()))?;
        let client = Client::new(&socket.to_string_lossy(), None).map_err(anyhow::Error::msg)?;
        let mut daemon = Daemon {
            child,
            client,
            env,
            forkd: forkd.to_path_buf(),
            log,
            sandboxes: Mutex::new(Vec::new()),
            snapshots: Mutex::new(Vec::new()),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(a) = daemon.client.raw("GET", "/healthz", None) {
                if a.status == 200 {
                    break;
                }
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "the daemon exited ({status}) before answering /healthz:\n{}",
                    daemon.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the daemon did not answer /healthz on {} within 60 s:\n{}",
                    socket.display(),
                    daemon.log_tail()
                );
            }
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "daemon pid {} on {} (FORKD_HOME {})",
            daemon.child.id(),
            socket.display(),
            daemon.env.home.display()
        );
        Ok(daemon)
    }

    fn created(&self, id: &str) {
        lock(&self.sandboxes).push(id.to_string());
    }

    fn snapshot(&self, tag: &str) {
        lock(&self.snapshots).push(tag.to_string());
    }

    /// Deletes one sandbox through the API and forgets it.
    fn delete(&self, id: &str) {
        match self
            .client
            .raw("DELETE", &format!("/v1/sandboxes/{id}"), None)
        {
            Ok(a) if a.status == 204 || a.status == 404 => {}
            Ok(a) => eprintln!(
                "deleting {id}: HTTP {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            ),
            Err(e) => eprintln!("deleting {id}: {e}"),
        }
        lock(&self.sandboxes).retain(|s| s != id);
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let mine = lock(&self.sandboxes).clone();
        eprintln!(
            "cleaning up: deleting {} sandboxes, stopping the daemon",
            mine.len()
        );
        for id in &mine {
            self.delete(id);
        }
        // In a private home everything listed is ours (a spawn answered after
        // an error, for instance); in a shared one only what we recorded.
        if self.env.private_home {
            if let Ok(v) = self
                .client
                .raw("GET", "/v1/sandboxes", None)
                .and_then(|a| a.json())
            {
                for id in v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["id"].as_str())
                {
                    self.delete(id);
                }
            }
        }
        for tag in lock(&self.snapshots).iter() {
            let _ = self.client.raw(
                "DELETE",
                &format!("/v1/snapshots/{tag}?cascade=true&force=true"),
                None,
            );
        }
        // SAFETY: kill has no memory effects; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.env.private_home {
            // Belt and braces: anything the API could not delete.
            let _ = Command::new(&self.forkd)
                .args(["kill", "--all"])
                .envs(self.env.vars())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // `self.env` removes the directories when it is dropped, next.
    }
}

/// FORKD_HOME and FORKD_RUNTIME_DIR of this run; dropping it removes the
/// directories this run created (never a home given with `--home`).
#[derive(Debug)]
struct PrivateEnv {
    /// Holds the private home (when there is one) and the daemon log.
    root: PathBuf,
    home: PathBuf,
    runtime: PathBuf,
    private_home: bool,
}

impl PrivateEnv {
    fn vars(&self) -> [(&'static str, &Path); 2] {
        [
            ("FORKD_HOME", self.home.as_path()),
            ("FORKD_RUNTIME_DIR", self.runtime.as_path()),
        ]
    }

    fn core(&self) -> Env {
        Env {
            home: self.home.clone(),
            runtime: self.runtime.clone(),
        }
    }
}

impl Drop for PrivateEnv {
    fn drop(&mut self) {
        // `root` holds the private home, if any, and the daemon log.
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.runtime);
    }
}

/// A private home whose artifact caches (kernel, initramfs, root images) are
/// links to the usual home's, so the daemon boots without rebuilding them,
/// and a private runtime dir on tmpfs (live branches need shmem).
fn private_env(o: &Options) -> Result<PrivateEnv> {
    let pid = std::process::id();
    let root = std::env::temp_dir().join(format!("forkd-bench-api-{pid}"));
    let runtime = PathBuf::from(format!("/dev/shm/forkd-bench-api-{pid}"));
    let env = PrivateEnv {
        home: o.home.clone().unwrap_or_else(|| root.join("home")),
        private_home: o.home.is_none(),
        root,
        runtime,
    };
    std::fs::create_dir_all(&env.root)?;
    std::fs::create_dir_all(&env.runtime)?;
    if !env.private_home {
        return Ok(env);
    }
    let usual = Env::from_process();
    eprintln!("checking guest artifacts in {}…", usual.home.display());
    forkd_core::artifacts::ensure(&usual, &ArtifactOptions::default(), &|m| eprintln!("{m}"))?;
    std::fs::create_dir_all(&env.home)?;
    for cache in ["kernels", "initramfs", "images"] {
        std::os::unix::fs::symlink(usual.home.join(cache), env.home.join(cache))
            .with_context(|| format!("linking {cache} into {}", env.home.display()))?;
    }
    Ok(env)
}

// ---------------------------------------------------------------- calls

/// How one API call ended.
enum Outcome {
    Ok(Answer),
    /// 429: the concurrency cap said no; expected, not an error.
    Refused(String),
    Failed(String),
}

fn call(api: &Client, method: &str, path: &str, body: Option<&Value>) -> Outcome {
    match api.raw(method, path, body.map(|b| b.to_string().into_bytes())) {
        Ok(a) if (200..300).contains(&a.status) => Outcome::Ok(a),
        Ok(a) if a.status == 429 => Outcome::Refused(error_text(&a)),
        Ok(a) => Outcome::Failed(format!(
            "{method} {path}: HTTP {}: {}",
            a.status,
            error_text(&a)
        )),
        Err(e) => Outcome::Failed(format!("{method} {path}: {e}")),
    }
}

fn error_text(a: &Answer) -> String {
    a.json()
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&a.body).into_owned())
}

/// One setup call that must answer `status`; its JSON body.
fn expect(api: &Client, method: &str, path: &str, body: Value, status: u16) -> Result<Value> {
    match call(api, method, path, Some(&body)) {
        Outcome::Ok(a) if a.status == status => Ok(a.json()?),
        Outcome::Ok(a) => bail!(
            "{method} {path}: expected HTTP {status}, got {}: {}",
            a.status,
            error_text(&a)
        ),
        Outcome::Refused(e) => bail!("{method} {path}: refused with 429: {e}"),
        Outcome::Failed(e) => bail!("{e}"),
    }
}

fn str_field(v: &Value, name: &str) -> Result<String> {
    v[name]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no `{name}` in {v}"))
}

// ---------------------------------------------------------------- spawn burst

struct Burst {
    calls: usize,
    wall_ms: f64,
    created: Vec<String>,
    ok: Vec<Duration>,
    refused: Vec<Duration>,
    refusal: Option<String>,
    failures: Vec<String>,
}

impl Burst {
    fn json(&self) -> Value {
        json!({
            "calls": self.calls,
            "wall_ms": self.wall_ms,
            "created": self.ok.len(),
            "refused_429": self.refused.len(),
            "errors": self.failures.len(),
            "created_latency": (!self.ok.is_empty()).then(|| Stats::of(&self.ok)),
            "refused_latency": (!self.refused.is_empty()).then(|| Stats::of(&self.refused)),
            "refusal_message": self.refusal,
            "error_messages": self.failures,
        })
    }
}

/// `calls` threads released together, each asking for one child.
fn spawn_burst(daemon: &Daemon, tag: &str, calls: usize) -> Burst {
    let barrier = Barrier::new(calls);
    let body = json!({"snapshot_tag": tag, "n": 1});
    let t = Instant::now();
    let results: Vec<(Duration, Outcome)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..calls)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let t = Instant::now();
                    let r = call(&daemon.client, "POST", "/v1/sandboxes", Some(&body));
                    (t.elapsed(), r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a burst thread panicked"))
            .collect()
    });
    let mut b = Burst {
        calls,
        wall_ms: ms(t.elapsed()),
        created: Vec::new(),
        ok: Vec::new(),
        refused: Vec::new(),
        refusal: None,
        failures: Vec::new(),
    };
    for (took, r) in results {
        match r {
            Outcome::Ok(a) => {
                b.ok.push(took);
                let ids: Vec<String> = a
                    .json()
                    .ok()
                    .and_then(|v| v.as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|k| k["id"].as_str().map(str::to_string))
                    .collect();
                if ids.len() != 1 {
                    b.failures
                        .push(format!("a spawn of one answered {} children", ids.len()));
                }
                for id in ids {
                    daemon.created(&id);
                    b.created.push(id);
                }
            }
            Outcome::Refused(e) => {
                b.refused.push(took);
                b.refusal.get_or_insert(e);
            }
            Outcome::Failed(e) => b.failures.push(e),
        }
    }
    b
}

// ---------------------------------------------------------------- sequential exec

struct Compare {
    api: Vec<Duration>,
    cli: Vec<Duration>,
    agent: Vec<Duration>,
    failures: Vec<String>,
}

impl Compare {
    fn json(&self) -> Value {
        let stats = |v: &Vec<Duration>| (!v.is_empty()).then(|| Stats::of(v));
        json!({
            "api": stats(&self.api),
            "cli": stats(&self.cli),
            "agent_in_process": stats(&self.agent),
            "cli_over_api": self.ratio(&self.cli, &self.api),
            "api_over_agent": self.ratio(&self.api, &self.agent),
            "errors": self.failures.len(),
            "error_messages": self.failures,
        })
    }

    fn ratio(&self, a: &[Duration], b: &[Duration]) -> Option<f64> {
        (!a.is_empty() && !b.is_empty()).then(|| Stats::of(a).median_ms / Stats::of(b).median_ms)
    }
}

/// Rounds the comparison is split into, so that a change in the host's load
/// (other work on a shared two-core machine) hits every path alike.
const COMPARE_ROUNDS: usize = 4;

/// The same `true` in the same sandbox, one call at a time, by three paths,
/// interleaved in rounds. The agent serves one connection at a time, so after
/// the API's calls each round waits for the daemon to drop its idle session
/// (after about 2 s); the first call of every block is a warm-up (it pays for
/// a new connection), not a sample.
fn compare_exec(daemon: &Daemon, forkd: &Path, id: &str, n: usize) -> Result<Compare> {
    let mut c = Compare {
        api: Vec::new(),
        cli: Vec::new(),
        agent: Vec::new(),
        failures: Vec::new(),
    };
    let path = format!("/v1/sandboxes/{id}/exec");
    let body = json!({"args": ["true"]});
    let env = &daemon.env;
    let fleet = Fleet::open(&env.core())?;
    let per_round = n.div_ceil(COMPARE_ROUNDS);
    for round in 0..COMPARE_ROUNDS {
        let k = per_round.min(n - (round * per_round).min(n));
        if k == 0 {
            break;
        }
        check_interrupted()?;
        for i in 0..=k {
            let t = Instant::now();
            match exec_outcome(call(&daemon.client, "POST", &path, Some(&body))) {
                Ok(()) if i > 0 => c.api.push(t.elapsed()),
                Ok(()) => {}
                Err(e) => c.failures.push(format!("API: {e}")),
            }
        }
        std::thread::sleep(Duration::from_millis(3500));

        check_interrupted()?;
        {
            let vm = fleet.attach(id)?;
            for i in 0..=k {
                let req = forkd_protocol::ExecRequest {
                    argv: vec!["true".into()],
                    ..Default::default()
                };
                let t = Instant::now();
                match vm.agent().exec_collect(req, None) {
                    Ok(o) if o.status.shell_code() == 0 => {
                        if i > 0 {
                            c.agent.push(t.elapsed())
                        }
                    }
                    Ok(o) => c
                        .failures
                        .push(format!("agent: `true` exited {:?}", o.status)),
                    Err(e) => c.failures.push(format!("agent: {e}")),
                }
            }
        }

        check_interrupted()?;
        for i in 0..=k {
            let t = Instant::now();
            let out = Command::new(forkd)
                .args(["exec", id, "--", "true"])
                .envs(env.vars())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output();
            let took = t.elapsed();
            match out {
                Ok(o) if o.status.success() => {
                    if i > 0 {
                        c.cli.push(took)
                    }
                }
                Ok(o) => c.failures.push(format!(
                    "CLI: forkd exec {id} -- true: {}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => c
                    .failures
                    .push(format!("CLI: running {}: {e}", forkd.display())),
            }
        }
    }
    Ok(c)
}

/// An exec call that answered 200 with exit code 0, or why not.
fn exec_outcome(o: Outcome) -> Result<(), String> {
    match o {
        Outcome::Ok(a) => match a.json() {
            Ok(v) if v["exit_code"] == json!(0) => Ok(()),
            Ok(v) => Err(format!("`true` did not exit 0: {v}")),
            Err(e) => Err(e.to_string()),
        },
        Outcome::Refused(e) => Err(format!("429: {e}")),
        Outcome::Failed(e) => Err(e),
    }
}

// ---------------------------------------------------------------- exec load

struct Load {
    clients: usize,
    sandboxes: usize,
    wall: Duration,
    ok: Vec<Duration>,
    refused: usize,
    failures: Vec<String>,
    stalls: Vec<Stall>,
}

/// A call that took longer than [`STALL`]: which sandbox, when it started.
struct Stall {
    sandbox: String,
    started_s: f64,
    took_s: f64,
}

/// A call slower than this is listed by itself: an exec of `true` that takes
/// seconds is waiting for something, not working.
const STALL: Duration = Duration::from_secs(5);

impl Load {
    fn calls_per_s(&self) -> f64 {
        self.ok.len() as f64 / self.wall.as_secs_f64()
    }

    fn json(&self) -> Value {
        json!({
            "clients": self.clients,
            "sandboxes": self.sandboxes,
            "wall_s": self.wall.as_secs_f64(),
            "calls_ok": self.ok.len(),
            "calls_per_s": self.calls_per_s(),
            "latency": (!self.ok.is_empty()).then(|| Stats::of(&self.ok)),
            "refused_429": self.refused,
            "errors": self.failures.len(),
            "error_messages": self.failures.iter().take(20).collect::<Vec<_>>(),
            "stalled_calls": self.stalls.iter().map(|s| json!({
                "sandbox": s.sandbox, "started_s": s.started_s, "took_s": s.took_s,
            })).collect::<Vec<_>>(),
        })
    }
}

/// `clients` threads calling exec until `span` has passed; a call in flight
/// at the deadline finishes and counts (the wall time includes it).
fn exec_load(api: &Client, kids: &[String], clients: usize, span: Duration) -> Load {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let deadline = start + span;
    let body = json!({"args": ["true"]});
    type PerThread = (Vec<Duration>, usize, Vec<String>, Vec<Stall>);
    let per_thread: Vec<PerThread> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    let (mut ok, mut refused, mut failures, mut stalls) =
                        (Vec::new(), 0, Vec::new(), Vec::new());
                    while Instant::now() < deadline && !INTERRUPTED.load(Ordering::SeqCst) {
                        let id = &kids[next.fetch_add(1, Ordering::Relaxed) % kids.len()];
                        let path = format!("/v1/sandboxes/{id}/exec");
                        let t = Instant::now();
                        match call(api, "POST", &path, Some(&body)) {
                            Outcome::Refused(_) => refused += 1,
                            o => match exec_outcome(o) {
                                Ok(()) => {
                                    let took = t.elapsed();
                                    if took > STALL {
                                        stalls.push(Stall {
                                            sandbox: id.clone(),
                                            started_s: (t - start).as_secs_f64(),
                                            took_s: took.as_secs_f64(),
                                        });
                                    }
                                    ok.push(took)
                                }
                                Err(e) => failures.push(e),
                            },
                        }
                    }
                    (ok, refused, failures, stalls)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread panicked"))
            .collect()
    });
    let wall = start.elapsed();
    let mut load = Load {
        clients,
        sandboxes: kids.len(),
        wall,
        ok: Vec::new(),
        refused: 0,
        failures: Vec::new(),
        stalls: Vec::new(),
    };
    for (ok, refused, failures, stalls) in per_thread {
        load.ok.extend(ok);
        load.refused += refused;
        load.failures.extend(failures);
        load.stalls.extend(stalls);
    }
    load.stalls
        .sort_by(|a, b| a.started_s.total_cmp(&b.started_s));
    load
}

// ---------------------------------------------------------------- results

struct Setup {
    boot_ms: f64,
    branch_ms: f64,
    pause_ms: Option<f64>,
    spawn_ms: f64,
    max_spawn: usize,
}

fn markdown(
    o: &Options,
    machine: &Machine,
    setup: &Setup,
    burst: &Burst,
    cmp: &Compare,
    load: &Load,
) -> String {
    let cell = |v: &[Duration]| {
        if v.is_empty() {
            "- | - | -".to_string()
        } else {
            let s = Stats::of(v);
            format!("{:.1} | {:.1} | {:.1}", s.median_ms, s.p90_ms, s.max_ms)
        }
    };
    let mut md = String::from(
        "# bench/api\n\nThe REST daemon (`forkd daemon`, UNIX socket, one HTTP/1.1 connection per call) driven only through its API: a 256 MiB busybox parent booted, warmed (16 MiB of random data in guest RAM, a sleeping process) and branched live; children spawned from the branch; then exec of `true` by many concurrent clients. Times in ms.\n\n",
    );
    md += &machine.markdown();
    md += &format!(
        "\nSetup through the API: boot {:.0} ms; branch (wait) {:.0} ms, pause {} ms.\n",
        setup.boot_ms,
        setup.branch_ms,
        setup.pause_ms.map_or("?".into(), |p| format!("{p:.1}"))
    );

    md += &format!("\n## Spawn\n\n`POST /v1/sandboxes` from the branch. The burst fires {} calls of n=1 at once (released by a barrier) at a daemon started with `--max-spawn {}`: calls beyond the cap are refused at once with 429 and `Retry-After` (never queued), which is expected and not an error.\n\n", burst.calls, setup.max_spawn);
    md += "| call | calls | 201 | 429 | errors | wall | 201 p50 | 201 p90 | 201 max | 429 p50 |\n|---|---|---|---|---|---|---|---|---|---|\n";
    md += &format!(
        "| n={} in one call | 1 | 1 | 0 | 0 | {:.0} | {:.0} | {:.0} | {:.0} | - |\n",
        o.sandboxes, setup.spawn_ms, setup.spawn_ms, setup.spawn_ms, setup.spawn_ms
    );
    let refused_p50 = if burst.refused.is_empty() {
        "-".to_string()
    } else {
        format!("{:.1}", Stats::of(&burst.refused).median_ms)
    };
    let created = if burst.ok.is_empty() {
        "- | - | -".to_string()
    } else {
        let s = Stats::of(&burst.ok);
        format!("{:.0} | {:.0} | {:.0}", s.median_ms, s.p90_ms, s.max_ms)
    };
    md += &format!(
        "| burst of n=1 | {} | {} | {} | {} | {:.0} | {created} | {refused_p50} |\n",
        burst.calls,
        burst.ok.len(),
        burst.refused.len(),
        burst.failures.len(),
        burst.wall_ms
    );
    if let Some(r) = &burst.refusal {
        md += &format!("\nA 429 says: \"{r}\"\n");
    }

    let med = |v: &[Duration]| (!v.is_empty()).then(|| Stats::of(v).median_ms);
    let api_p50 = med(&cmp.api);
    let vs_api = |v: &[Duration]| match (med(v), api_p50) {
        (Some(x), Some(a)) => format!("{:.2}x", x / a),
        _ => "-".into(),
    };
    md += &format!("\n## One exec, sequentially\n\n`true` in one child, one call at a time, before the load test: {} calls per path in {COMPARE_ROUNDS} interleaved rounds (API, then agent, then CLI), the first call of each block a warm-up. API: HTTP over the UNIX socket into the daemon, which keeps one agent session per sandbox. CLI: `forkd exec ID -- true`, a process per call that opens the state database and connects to the agent. Agent: an in-process `Fleet::attach` connection kept open, the floor both build on.\n\n", o.cli_calls);
    md += "| path | calls | p50 | p90 | max | p50 / API p50 |\n|---|---|---|---|---|---|\n";
    for (name, v) in [
        ("API (`POST /v1/sandboxes/{id}/exec`)", &cmp.api),
        ("CLI (`forkd exec ID -- true`)", &cmp.cli),
        ("agent, in process", &cmp.agent),
    ] {
        md += &format!("| {name} | {} | {} | {} |\n", v.len(), cell(v), vs_api(v));
    }
    if let (Some(a), Some(g), Some(c)) = (api_p50, med(&cmp.agent), med(&cmp.cli)) {
        md += &format!(
            "\nAPI p50 minus agent p50: {:+.1} ms ({:.2}x); CLI p50 / API p50: {:.2}x. The guest's own time for `true` under TCG dominates all three paths{}.\n",
            a - g,
            a / g,
            c / a,
            if (a - g).abs() < 0.1 * g {
                ", and the API's difference to the agent is within this run's noise"
            } else {
                ""
            }
        );
    }

    md += &format!("\n## Exec under load\n\n{} client threads for {} s, each calling `POST /v1/sandboxes/{{id}}/exec {{\"args\":[\"true\"]}}` back to back, round-robin over the {} children. An error is any answer other than 2xx with exit code 0 (or an expected 429).\n\n", o.clients, o.seconds, load.sandboxes);
    md += "| clients | sandboxes | seconds | calls | calls/s | p50 | p90 | p99 | max | errors | 429 | stalled > 5 s |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    let lat = if load.ok.is_empty() {
        "- | - | - | -".to_string()
    } else {
        let s = Stats::of(&load.ok);
        format!(
            "{:.1} | {:.1} | {:.1} | {:.1}",
            s.median_ms, s.p90_ms, s.p99_ms, s.max_ms
        )
    };
    md += &format!(
        "| {} | {} | {:.1} | {} | {:.1} | {lat} | {} | {} | {} |\n",
        load.clients,
        load.sandboxes,
        load.wall.as_secs_f64(),
        load.ok.len(),
        load.calls_per_s(),
        load.failures.len(),
        load.refused,
        load.stalls.len()
    );
    if !load.stalls.is_empty() {
        md += &format!("\nCalls that took more than {} s (they succeeded, so they are not errors, but an exec of `true` should take well under a second):\n\n| sandbox | started at s | took s |\n|---|---|---|\n", STALL.as_secs());
        for s in &load.stalls {
            md += &format!("| {} | {:.2} | {:.2} |\n", s.sandbox, s.started_s, s.took_s);
        }
        let span = o.seconds as f64;
        if load
            .stalls
            .iter()
            .all(|s| s.started_s < 1.0 && s.started_s + s.took_s >= span)
        {
            md += "\nEach of these started with the load and ended only after the clients stopped: the daemon opens an agent session on a sandbox's first call, concurrent first calls each opened one, and the agent serves one connection at a time, so the second waited until the first had been idle for the daemon's session timeout. While it waited, its client thread made no calls: the throughput above is that of fewer clients.\n";
        }
    }

    let failures: Vec<&String> = burst
        .failures
        .iter()
        .chain(&cmp.failures)
        .chain(&load.failures)
        .collect();
    if !failures.is_empty() {
        md += &format!("\n**{} calls failed.** The first:\n\n", failures.len());
        for f in failures.iter().take(10) {
            md += &format!("- {f}\n");
        }
    }
    md += &format!(
        "\nReproduce: `cargo build --release -p forkd-bench -p forkd-cli && target/release/api --clients {} --sandboxes {} --seconds {}`.\n",
        o.clients, o.sandboxes, o.seconds
    );
    md
}

/// Writes `<out>.json` and `<out>.md`.
fn write(out: &Path, json: &Value, md: &str) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let with = |ext: &str| {
        let mut p = out.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    std::fs::write(with(".json"), serde_json::to_string_pretty(json)? + "\n")?;
    std::fs::write(with(".md"), md)?;
    eprintln!("wrote {}.{{json,md}}", out.display());
    Ok(())
}

// ---------------------------------------------------------------- odds and ends

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM stop the run between steps, so that cleanup happens.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; `on_signal` has the C signature signal expects.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
