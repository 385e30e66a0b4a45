//! The `forkd` binary end to end: real QEMU, real kernel, real signals.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn forkd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_forkd"))
}

/// A private runtime dir so that leak checks see only this test's VMs.
fn runtime_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("forkd-cli-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn vm_dirs(runtime: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(runtime.join("vms"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

fn qemu_pids_under(runtime: &Path) -> Vec<u32> {
    common::pids_with_arg(&runtime.to_string_lossy())
}

fn wait_clean(runtime: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (dirs, pids) = (vm_dirs(runtime), qemu_pids_under(runtime));
        if dirs.is_empty() && pids.is_empty() {
            let _ = std::fs::remove_dir_all(runtime);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leaked run dirs {dirs:?} / processes {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn run_streams_output_and_exits_with_the_command_code() {
    let rt = runtime_dir("exit");
    let out = forkd()
        .env("FORKD_RUNTIME_DIR", &rt)
        .args(["run", "--", "sh", "-c", "echo out; echo err >&2; exit 7"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err\n"));
    wait_clean(&rt, Duration::from_secs(5));
}

#[test]
fn run_reports_timeouts_and_bad_flags() {
    let rt = runtime_dir("timeout");
    let out = forkd()
        .env("FORKD_RUNTIME_DIR", &rt)
        .args(["run", "--timeout", "1", "--", "sleep", "100"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(124));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));
    for bad in [
        vec!["run", "--accel", "hvf", "--", "true"],
        vec!["run", "--net", "bridge", "--", "true"],
        vec!["run", "--env", "NOVALUE", "--", "true"],
        vec!["run", "--image", "ubuntu", "--", "true"],
        vec!["run", "--mem", "8", "--", "true"],
    ] {
        let out = forkd()
            .env("FORKD_RUNTIME_DIR", &rt)
            .args(&bad)
            .output()
            .unwrap();
        // Bad input exits 2, like a usage error.
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("forkd: error:"), "{bad:?}: {err}");
    }
    wait_clean(&rt, Duration::from_secs(5));
}

/// Starts `forkd run -- sleep 600` and waits until the command is running.
fn start_long_run(rt: &Path) -> std::process::Child {
    let child = forkd()
        .env("FORKD_RUNTIME_DIR", rt)
        .args(["run", "--", "sh", "-c", "echo up; sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
}

fn wait_for_up(child: &mut std::process::Child) {
    use std::io::Read;
    let mut buf = [0u8; 3];
    child.stdout.as_mut().unwrap().read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"up\n");
}

#[test]
fn sigkill_of_the_cli_leaves_no_qemu_and_no_files() {
    let rt = runtime_dir("sigkill");
    let mut child = start_long_run(&rt);
    wait_for_up(&mut child);
    assert_eq!(
        qemu_pids_under(&rt).len(),
        2,
        "expected qemu and its watchdog"
    );
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    wait_clean(&rt, Duration::from_secs(10));
}

#[test]
fn sigkill_during_boot_leaves_nothing() {
    let rt = runtime_dir("sigkill-boot");
    let mut child = start_long_run(&rt);
    let deadline = Instant::now() + Duration::from_secs(20);
    while qemu_pids_under(&rt).len() < 2 {
        assert!(Instant::now() < deadline, "qemu never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    wait_clean(&rt, Duration::from_secs(10));
}

#[test]
fn sigterm_stops_the_sandbox_and_exits_143() {
    let rt = runtime_dir("sigterm");
    let mut child = start_long_run(&rt);
    wait_for_up(&mut child);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    wait_clean(&rt, Duration::from_secs(5));
}

#[test]
fn first_sigint_goes_to_the_guest_command() {
    let rt = runtime_dir("sigint");
    let mut child = forkd()
        .env("FORKD_RUNTIME_DIR", &rt)
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "trap 'echo got-int; exit 3' INT; echo up; while :; do sleep 1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_up(&mut child);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(out.stdout, b"got-int\n");
    wait_clean(&rt, Duration::from_secs(5));
}

#[test]
fn doctor_explains_the_accelerator() {
    let out = forkd().args(["doctor", "--json"]).output().unwrap();
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let accel = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "accel")
        .expect("accel check");
    let detail = accel["detail"].as_str().unwrap();
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(
            detail.contains("TCG") && detail.contains("kvm_pvm"),
            "{detail}"
        );
        assert_eq!(accel["level"], "warn");
    }
    for name in ["qemu", "kernel", "agent", "runtime-dir", "userfaultfd"] {
        assert!(
            checks.as_array().unwrap().iter().any(|c| c["name"] == name),
            "missing {name}"
        );
    }
    let text = forkd().arg("doctor").output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("accel"));
}

/// A private home and runtime directory sharing the suite's guest artifacts.
fn private_home(name: &str) -> (PathBuf, PathBuf) {
    let home = std::env::temp_dir().join(format!("forkd-cli-home-{name}-{}", std::process::id()));
    let rt = runtime_dir(name);
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    let shared = PathBuf::from(std::env::var_os("FORKD_HOME").expect("FORKD_HOME"));
    for d in ["kernels", "images", "initramfs"] {
        if shared.join(d).exists() {
            std::os::unix::fs::symlink(shared.join(d), home.join(d)).unwrap();
        }
    }
    (home, rt)
}

#[test]
fn one_exit_code_convention_and_errors_that_say_what_to_type() {
    let (home, rt) = private_home("codes");
    let f = |args: &[&str]| {
        forkd()
            .env("FORKD_HOME", &home)
            .env("FORKD_RUNTIME_DIR", &rt)
            .env_remove("FORKD_REMOTE")
            .args(args)
            .output()
            .unwrap()
    };
    // Every "not found" exits alike, with the command to type.
    for (args, needle) in [
        (
            vec!["info", "nope"],
            "no snapshot `nope`; `forkd snapshots` lists them",
        ),
        (
            vec!["rmi", "nope"],
            "no snapshot `nope`; `forkd snapshots` lists them",
        ),
        (
            vec!["spawn", "nope"],
            "no snapshot `nope`; `forkd snapshots` lists them",
        ),
        (
            vec!["exec", "sb-nope", "--", "true"],
            "no sandbox `sb-nope`; `forkd ls` lists them",
        ),
        (
            vec!["kill", "sb-nope"],
            "no sandbox `sb-nope`; `forkd ls` lists them",
        ),
        (
            vec!["branch", "sb-nope"],
            "no sandbox `sb-nope`; `forkd ls` lists them",
        ),
    ] {
        let out = f(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert_eq!(err.trim(), format!("forkd: error: {needle}"), "{args:?}");
    }
    // Bad input exits 2.
    for args in [
        vec!["spawn", "bad tag!"],
        vec!["kill"],
        vec!["branch", "sb-x", "--mode", "fast"],
        vec!["--remote", "/x", "doctor"],
    ] {
        let out = f(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A closed pipe ends the output quietly (no panic, no backtrace).
    let mut child = forkd()
        .env("FORKD_HOME", &home)
        .env("FORKD_RUNTIME_DIR", &rt)
        .args(["doctor", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
    // `--remote` is offered only where it applies.
    let help = |args: &[&str]| String::from_utf8_lossy(&f(args).stdout).into_owned();
    assert!(help(&["ls", "--help"]).contains("--remote"));
    for local in ["run", "doctor", "daemon"] {
        assert!(!help(&[local, "--help"]).contains("--remote"), "{local}");
    }
    assert!(!help(&["image", "build", "--help"]).contains("--remote"));

    // exec --json and kill --json on a real sandbox.
    let out = f(&["create"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = f(&[
        "exec",
        "--json",
        &id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            &v["stdout"],
            &v["stderr"],
            &v["exit_code"],
            &v["timed_out"],
            &v["signal"]
        ),
        (
            &serde_json::json!("out\n"),
            &serde_json::json!("err\n"),
            &serde_json::json!(3),
            &serde_json::json!(false),
            &serde_json::Value::Null
        )
    );
    assert!(v["duration_ms"].as_u64().is_some());
    let out = f(&["exec", "--json", "--timeout", "1", &id, "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&v["timed_out"], &v["exit_code"]),
        (&serde_json::json!(true), &serde_json::json!(124))
    );
    let out = f(&["kill", "--json", &id, "sb-nope"]);
    assert_eq!(out.status.code(), Some(1), "one of two failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["killed"], serde_json::json!([id]));
    assert_eq!(v["failed"][0]["id"], "sb-nope");
    let _ = std::fs::remove_dir_all(&home);
    wait_clean(&rt, Duration::from_secs(5));
}
