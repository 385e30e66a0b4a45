//! The daemon tests' world: a private home and runtime directory, the real
//! `forkd` binary, a daemon on a private socket (or the listener the test
//! names), and cleanup of every sandbox it leaves.

#![allow(dead_code)]

pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forkd_client::Client;
use serde_json::{json, Value};

pub struct World {
    pub home: PathBuf,
    pub runtime: PathBuf,
    pub socket: PathBuf,
    daemon: Option<Child>,
    extra: Vec<(String, String)>,
    args: Vec<String>,
}

impl World {
    pub fn new(name: &str) -> World {
        World::with(name, &[], &[])
    }

    pub fn with(name: &str, args: &[&str], env: &[(&str, &str)]) -> World {
        let base = format!("forkd-daemon-{name}-{}", std::process::id());
        let home = std::env::temp_dir().join(&base);
        let runtime = PathBuf::from("/dev/shm").join(&base);
        let _ = std::fs::remove_dir_all(&home);
        let _ = std::fs::remove_dir_all(&runtime);
        std::fs::create_dir_all(&home).unwrap();
        // Share the suite's built guest artifacts; the state is private.
        let shared = std::env::var_os("FORKD_HOME")
            .map(PathBuf::from)
            .expect("FORKD_HOME (scripts/test.sh sets it)");
        for d in ["kernels", "images", "initramfs"] {
            if shared.join(d).exists() {
                std::os::unix::fs::symlink(shared.join(d), home.join(d)).unwrap();
            }
        }
        let mut w = World {
            socket: runtime.join("api.sock"),
            home,
            runtime,
            daemon: None,
            extra: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        w.start();
        w
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_forkd"));
        c.env("FORKD_HOME", &self.home)
            .env("FORKD_RUNTIME_DIR", &self.runtime);
        for (k, v) in &self.extra {
            c.env(k, v);
        }
        c
    }

    /// Starts the daemon on the private socket (unless the extra arguments
    /// say where to listen) and waits until it answers there.
    pub fn start(&mut self) {
        let mut c = self.command();
        c.arg("daemon");
        let own_listen = self.args.iter().any(|a| a == "--listen" || a == "--tcp");
        if !own_listen {
            c.arg("--listen").arg(&self.socket);
        }
        c.args(&self.args);
        let log = std::fs::File::create(self.home.join("daemon.log")).unwrap();
        let child = c.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.daemon = Some(child);
        if !own_listen {
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.client().call("GET", "/healthz", None).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the daemon did not come up: {}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("daemon.log")).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::new(self.socket.to_str().unwrap(), None).unwrap()
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        match self
            .client()
            .raw(method, path, body.map(|b| b.to_string().into_bytes()))
        {
            Ok(a) => (
                a.status,
                if a.body.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&a.body)
                        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&a.body).into()))
                },
            ),
            Err(e) => panic!("{method} {path}: {e}\n{}", self.log()),
        }
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert!(status < 300, "{method} {path} -> {status}: {v}");
        v
    }

    pub fn boot(&self) -> String {
        let v = self.ok("POST", "/v1/sandboxes/boot", Some(json!({})));
        v["id"].as_str().unwrap().to_string()
    }

    pub fn sh(&self, id: &str, script: &str) -> Value {
        self.ok(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({ "args": ["sh", "-c", script] })),
        )
    }

    /// Runs `forkd ARGS` in this world's home (no daemon in the way),
    /// asserts success, returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "forkd {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `forkd exec ID -- sh -c SCRIPT`, its stdout.
    pub fn cli_sh(&self, id: &str, script: &str) -> String {
        self.cli_ok(&["exec", id, "--", "sh", "-c", script])
    }

    /// `forkd spawn --json ARGS`: the children's ids, in order (a child
    /// that failed fails the test, naming its error).
    pub fn cli_spawn(&self, args: &[&str]) -> Vec<String> {
        let out = self.cli_ok(&[&["spawn", "--json"], args].concat());
        let v: Value = serde_json::from_str(&out).unwrap();
        v["children"]
            .as_array()
            .unwrap_or_else(|| panic!("spawn --json: {v}"))
            .iter()
            .map(|c| {
                c["sandbox"]["id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a child failed: {c}"))
                    .to_string()
            })
            .collect()
    }

    /// The ids `forkd ls` lists, in its order.
    pub fn cli_ids(&self) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.cli_ok(&["ls", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn kill9(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill9();
        // Sandboxes outlive the daemon by design: kill them here.
        let _ = self.command().args(["kill", "--all"]).output();
        // Never through a mount a failed test left inside (a bootstrap's
        // bind of the host's /dev/shm).
        let _ = forkd_guest::mounts::remove_tree(&self.home);
        let _ = forkd_guest::mounts::remove_tree(&self.runtime);
    }
}

/// Waits until `child` (started with `FORKD_TEST_STOP_AT`) has stopped
/// itself at its fault point; `what` names it in the failure when it ends
/// first or does not get there within `timeout`.
pub fn wait_stopped(child: &mut Child, what: &str, timeout: Duration) {
    let stat = format!("/proc/{}/stat", child.id());
    let deadline = Instant::now() + timeout;
    loop {
        let state = std::fs::read_to_string(&stat).unwrap_or_default();
        if state
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('T')
        {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{what} ended ({st}) before its fault point");
        }
        assert!(
            Instant::now() < deadline,
            "{what} never reached its fault point"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A TCP port nothing listens on now.
/// Live (not zombie) processes with `needle` somewhere in their command line.
pub fn pids_with_arg(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z');
        if !zombie && String::from_utf8_lossy(&cmd).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The test venv's python (`$FORKD_PY_VENV`, else `target/py-venv`).
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("FORKD_PY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/py-venv"));
    let python = venv.join("bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup.sh (it runs scripts/setup-python.sh)",
        python.display()
    );
    python
}

/// Waits until the daemon answers at `url`.
pub fn wait_for_http(url: &str, w: &World) {
    let health = Client::new(url, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while health.call("GET", "/healthz", None).is_err() {
        assert!(Instant::now() < deadline, "{}", w.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs one pytest file under `dir` with `env`; panics with its output and
/// the daemon's log when it fails.
pub fn pytest(w: &World, dir: &Path, file: &str, env: &[(&str, String)]) {
    let mut c = Command::new(venv_python());
    c.args(["-m", "pytest", "-q", "-p", "no:cacheprovider", file])
        .current_dir(dir)
        .env("FORKD_BIN", env!("CARGO_BIN_EXE_forkd"))
        .env("FORKD_HOME", &w.home)
        .env("FORKD_RUNTIME_DIR", &w.runtime)
        .env_remove("FORKD_TOKEN")
        .env_remove("FORKD_REMOTE");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "pytest {file} failed:\n{}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}
