//! Shared helpers for tests that boot real VMs (TCG here, KVM where usable).

#![allow(dead_code)]

/// A huge-page hog (pool-exhaustion tests).
pub mod hog;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use forkd_core::{ArtifactOptions, Artifacts, BootOptions, Env, Sandbox};
use forkd_protocol::ExecRequest;

/// Guest artifacts, built once per test process (cached across runs).
pub fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        forkd_core::artifacts::ensure(&Env::from_process(), &ArtifactOptions::default(), &|m| {
            eprintln!("{m}")
        })
        .expect("guest artifacts (run scripts/setup.sh first)")
    })
}

pub fn boot() -> Sandbox {
    boot_with(&BootOptions::default())
}

pub fn boot_with(opts: &BootOptions) -> Sandbox {
    Sandbox::boot(&Env::from_process(), artifacts(), opts).expect("boot")
}

/// Runs `script` in fleet sandbox `id`, asserts it exits 0, returns its
/// output (stdout and stderr together).
pub fn run_ok(fleet: &forkd_core::Fleet, id: &str, script: &str) -> String {
    let mut out = Vec::new();
    let st = fleet
        .exec(id, sh(script), None, |_, b| out.extend_from_slice(b))
        .unwrap();
    assert_eq!(
        st.code,
        Some(0),
        "`{script}` in {id}: {}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8(out).unwrap()
}

/// Kills every sandbox of `fleet` (test cleanup).
pub fn kill_all(fleet: &forkd_core::Fleet) {
    for s in fleet.list().unwrap_or_default() {
        let _ = fleet.kill(&s.id);
    }
}

pub fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// What must be gone once a VM is: its QEMU process and its run directory.
pub struct Footprint {
    pub pid: u32,
    pub run_dir: PathBuf,
}

impl Footprint {
    pub fn of(s: &Sandbox) -> Footprint {
        Footprint {
            pid: s.vm().pid(),
            run_dir: s.run_dir().to_path_buf(),
        }
    }

    /// Waits up to `within` for the process and files to disappear.
    pub fn assert_gone(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let alive = process_alive(self.pid);
            let files = self.run_dir.exists();
            let users = processes_mentioning(&self.run_dir);
            if !alive && !files && users.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "leaked: qemu pid {} alive={alive}, run dir {} exists={files}, processes using it: {users:?}",
                    self.pid,
                    self.run_dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// True if `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Pids whose command line mentions `path` (QEMU, watchdogs).
pub fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(&needle) && process_alive(pid) {
                found.push(pid);
            }
        }
    }
    found
}
