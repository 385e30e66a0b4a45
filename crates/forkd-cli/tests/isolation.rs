//! The control plane against a hostile guest, with the real binary: the
//! daemon on TCP (the legacy default, no token on loopback) is out of the
//! guest's reach, and SIGTERM ends a `forkd exec` waiting on a command that
//! never ends, and the daemon while such an exec runs in it, within
//! seconds, leaving the sandbox running. One guest serves every attack.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct World {
    home: PathBuf,
    runtime: PathBuf,
}

impl World {
    fn new() -> World {
        let base = format!("forkd-cli-iso-{}", std::process::id());
        let home = std::env::temp_dir().join(&base);
        let runtime = PathBuf::from("/dev/shm").join(&base);
        let _ = std::fs::remove_dir_all(&home);
        let _ = std::fs::remove_dir_all(&runtime);
        std::fs::create_dir_all(&home).unwrap();
        let shared = std::env::var_os("FORKD_HOME")
            .map(PathBuf::from)
            .expect("FORKD_HOME (scripts/test.sh sets it)");
        for d in ["kernels", "images", "initramfs"] {
            if shared.join(d).exists() {
                std::os::unix::fs::symlink(shared.join(d), home.join(d)).unwrap();
            }
        }
        World { home, runtime }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_forkd"));
        c.env("FORKD_HOME", &self.home)
            .env("FORKD_RUNTIME_DIR", &self.runtime)
            .stdin(Stdio::null());
        c
    }

    fn forkd(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.forkd(args);
        assert!(
            out.status.success(),
            "forkd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn sh(&self, id: &str, script: &str) -> String {
        self.ok(&["exec", id, "--", "sh", "-c", script])
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.forkd(&["kill", "--all"]);
        let _ = std::fs::remove_dir_all(&self.home);
        let _ = std::fs::remove_dir_all(&self.runtime);
    }
}

/// Waits up to `within` for `child` to exit; its status, or `None`.
fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    // SAFETY: kill has no memory effects; the pid is our own child's.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
}

fn host_addresses() -> Vec<String> {
    let out = Command::new("ip").args(["-o", "addr"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let fam = f.nth(2)?;
            let addr = f.next()?.split('/').next()?.to_string();
            (matches!(fam, "inet" | "inet6") && !addr.starts_with("fe80")).then_some(addr)
        })
        .collect()
}

#[test]
fn the_daemon_is_out_of_reach_and_sigterm_ends_waits_promptly() {
    let w = World::new();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(w.home.join("daemon.log")).unwrap();
    let mut daemon = w
        .command()
        .args(["daemon", "--listen", &addr])
        .env_remove("FORKD_TOKEN")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !w.forkd(&["--remote", &url, "ls"]).status.success() {
        assert!(Instant::now() < deadline, "the daemon did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let id = w.ok(&["create"]).trim().to_string();
    // The host reaches the daemon without a token...
    assert!(w.ok(&["--remote", &url, "ls"]).contains(&id));
    // ... the guest does not, by any address of the host.
    let mut targets = vec!["10.0.2.2".to_string(), "127.0.0.1".to_string()];
    targets.extend(host_addresses());
    for t in &targets {
        let out = w.sh(
            &id,
            &format!(
                "printf 'GET /v1/sandboxes HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {t} {port} 2>&1; true"
            ),
        );
        assert!(
            !out.contains("HTTP/1") && !out.contains(&id),
            "the guest reached the daemon at {t}:{port}: {out}"
        );
    }

    // SIGTERM ends a local `forkd exec` waiting on a command that never ends.
    let mut exec = w
        .command()
        .args(["exec", &id, "--", "sleep", "100000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(exec.try_wait().unwrap().is_none(), "the exec should wait");
    let t = Instant::now();
    sigterm(&exec);
    let st = wait_exit(&mut exec, Duration::from_secs(10));
    assert!(st.is_some(), "forkd exec ignored SIGTERM");
    assert_eq!(st.unwrap().code(), Some(128 + libc::SIGTERM));
    eprintln!("forkd exec ended {:?} after SIGTERM", t.elapsed());
    assert_eq!(w.sh(&id, "echo alive").trim(), "alive");

    // SIGTERM ends the daemon while an exec blocks one of its threads.
    let mut remote_exec = w
        .command()
        .args(["--remote", &url, "exec", &id, "--", "sleep", "100000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(remote_exec.try_wait().unwrap().is_none());
    let t = Instant::now();
    sigterm(&daemon);
    let st = wait_exit(&mut daemon, Duration::from_secs(10));
    assert!(
        st.is_some(),
        "the daemon ignored SIGTERM while an exec ran: {}",
        std::fs::read_to_string(w.home.join("daemon.log")).unwrap_or_default()
    );
    eprintln!("the daemon ended {:?} after SIGTERM", t.elapsed());
    // The remote exec's connection is gone with it.
    assert!(wait_exit(&mut remote_exec, Duration::from_secs(10)).is_some());
    // The sandbox runs on.
    assert_eq!(w.sh(&id, "echo alive").trim(), "alive");
}
