//! Sandbox lifetimes with real guests: a time to live the daemon enforces
//! (also when it was down while the time ran out), `set_timeout`, an idle
//! timeout any forkd command enforces, labels that select for `ls` and
//! `kill`, and the default environment and working directory every command
//! gets.

mod common;

use std::time::{Duration, Instant};

use common::{pid_alive, World};
use serde_json::{json, Value};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn forkd(w: &World, args: &[&str]) -> std::process::Output {
    w.command().args(args).output().unwrap()
}

fn ids_of(list: &Value) -> Vec<String> {
    let mut ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

#[test]
fn lifetimes_labels_and_defaults_hold_across_a_daemon_restart() {
    let mut w = World::new("lifetime");

    // A: an end time far away (moved later), a label, default env and cwd.
    let a = w.ok(
        "POST",
        "/v1/sandboxes/boot",
        Some(json!({
            "ttl_ms": 600_000,
            "labels": {"team": "a"},
            "env": {"GREETING": "hi", "OTHER": "x"},
            "cwd": "/tmp",
        })),
    );
    let a_id = a["id"].as_str().unwrap().to_string();
    let a_pid = a["pid"].as_u64().unwrap();
    assert_eq!(a["lifetime"]["labels"], json!({"team": "a"}), "{a}");
    assert!(a["lifetime"]["ends_at_ms"].as_u64().unwrap() > now_ms() + 500_000);

    // Every command gets the defaults; its own env and cwd win.
    let out = w.sh(&a_id, "echo $GREETING $OTHER; pwd");
    assert_eq!(out["stdout"], "hi x\n/tmp\n", "{out}");
    let out = w.ok(
        "POST",
        &format!("/v1/sandboxes/{a_id}/exec"),
        Some(json!({"args": ["sh", "-c", "echo $GREETING $OTHER; pwd"],
                    "env": {"GREETING": "own"}, "cwd": "/"})),
    );
    assert_eq!(out["stdout"], "own x\n/\n", "{out}");

    // B: labelled b, and a full snapshot to spawn C from.
    let b = w.ok(
        "POST",
        "/v1/sandboxes/boot",
        Some(json!({"labels": {"team": "b"}, "tag": "lt"})),
    );
    let b_id = b["id"].as_str().unwrap().to_string();
    assert!(b["lifetime"]["ends_at_ms"].is_null(), "{b}");

    // C: a child with an idle timeout and its own label (nothing of B's).
    let kids = w.ok(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "lt", "idle_timeout_ms": 3000,
                    "labels": {"team": "c"}})),
    );
    let c = &kids[0];
    let c_id = c["id"].as_str().unwrap().to_string();
    assert_eq!(c["lifetime"]["labels"], json!({"team": "c"}), "{c}");
    assert_eq!(c["lifetime"]["idle_timeout_ms"], 3000, "{c}");

    // Labels select, in the CLI and through the daemon alike.
    for remote in [false, true] {
        let mut args = vec!["ls", "--json", "--label", "team=a"];
        let socket = w.socket.to_str().unwrap().to_string();
        if remote {
            args.extend(["--remote", &socket]);
        }
        let out = forkd(&w, &args);
        assert!(out.status.success(), "{out:?}");
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ids_of(&list), vec![a_id.clone()], "remote: {remote}");
    }
    let out = forkd(&w, &["ls", "--json", "--label", "team=nobody"]);
    assert_eq!(
        ids_of(&serde_json::from_slice(&out.stdout).unwrap()).len(),
        0
    );
    let out = forkd(&w, &["ls", "--label", "team"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEY=VALUE"));

    // set_timeout moves A's end to 4 s from now.
    let moved = w.ok(
        "POST",
        &format!("/v1/sandboxes/{a_id}/timeout"),
        Some(json!({"ttl_ms": 4000})),
    );
    let ends = moved["lifetime"]["ends_at_ms"].as_u64().unwrap();
    assert!(ends <= now_ms() + 4000 && ends > now_ms() + 2000, "{moved}");
    let (st, body) = w.call(
        "POST",
        &format!("/v1/sandboxes/{a_id}/timeout"),
        Some(json!({"ttl_ms": 0})),
    );
    assert_eq!(st, 400, "{body}");
    let (st, _) = w.call(
        "POST",
        "/v1/sandboxes/sb-nothere/timeout",
        Some(json!({"ttl_ms": 1000})),
    );
    assert_eq!(st, 404);

    // The daemon goes away while A's time and C's idle time run out.
    w.kill9();
    while now_ms() < ends + 500 {
        std::thread::sleep(Duration::from_millis(200));
    }
    // Nobody enforced anything meanwhile; the first forkd command that
    // touches C kills it and says why.
    assert!(pid_alive(a_pid), "A died with nobody to kill it");
    let out = forkd(&w, &["exec", &c_id, "--", "true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("sandbox `{c_id}` was killed")),
        "{err}"
    );
    assert!(err.contains("idle"), "{err}");
    assert!(pid_alive(a_pid), "exec on C must not have touched A");

    // The restarted daemon's housekeeping kills A from its record.
    w.start();
    let deadline = Instant::now() + Duration::from_secs(15);
    while pid_alive(a_pid) {
        assert!(
            Instant::now() < deadline,
            "the daemon did not kill the expired sandbox\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (st, _) = w.call("GET", &format!("/v1/sandboxes/{a_id}"), None);
    assert_eq!(st, 404);
    let left = w.ok("GET", "/v1/sandboxes", None);
    assert_eq!(ids_of(&left), vec![b_id.clone()]);

    // kill --label kills what it selects and nothing else.
    let out = forkd(&w, &["kill", "--label", "team=b", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let killed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(killed["killed"], json!([b_id]));
    assert_eq!(ids_of(&w.ok("GET", "/v1/sandboxes", None)).len(), 0);
}

#[test]
fn lifetime_flags_are_checked_before_anything_boots() {
    let w = World::new("lifetime-flags");
    for (args, needle) in [
        (
            vec!["create", "--ttl", "soon"],
            "--ttl \"soon\" is not a duration",
        ),
        (vec!["create", "--idle-timeout", "0s"], "idle timeout"),
        (vec!["create", "--label", "bad key=1"], "label key"),
        (vec!["create", "--cwd", "relative"], "absolute"),
        (vec!["create", "--env", "=x"], "KEY=VALUE"),
        (
            vec!["timeout", "sb-nothere", "5m"],
            "no sandbox `sb-nothere`",
        ),
    ] {
        let out = forkd(&w, &args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    for (body, field) in [
        (json!({"ttl_ms": 0}), "ttl"),
        (json!({"labels": {"": "x"}}), "label key"),
        (json!({"cwd": "tmp"}), "absolute"),
        (json!({"ttl": 5}), "ttl"),
    ] {
        let (st, v) = w.call("POST", "/v1/sandboxes/boot", Some(body.clone()));
        assert_eq!(st, 400, "{body} -> {v}");
        assert!(v.to_string().contains(field), "{body} -> {v}");
    }
    assert_eq!(ids_of(&w.ok("GET", "/v1/sandboxes", None)).len(), 0);
}

#[test]
fn an_idle_timeout_spares_a_sandbox_busy_in_a_long_exec() {
    let w = World::new("lifetime-busy");
    let a = w.ok(
        "POST",
        "/v1/sandboxes/boot",
        Some(json!({"idle_timeout_ms": 2000})),
    );
    let id = a["id"].as_str().unwrap().to_string();
    let pid = a["pid"].as_u64().unwrap();
    // The exec lasts more than twice the idle timeout, while the daemon's
    // housekeeping runs and a listing meets the sandbox.
    let lister = {
        let socket = w.socket.clone();
        let cmd = w.command();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            let mut cmd = cmd;
            cmd.args(["ls", "--json", "--remote", socket.to_str().unwrap()])
                .output()
                .unwrap()
        })
    };
    let out = w.sh(&id, "sleep 5; echo done");
    assert_eq!(out["stdout"], "done\n", "{out}\n{}", w.log());
    assert_eq!(out["exit_code"], 0, "{out}");
    let listed = lister.join().unwrap();
    assert!(listed.status.success(), "{listed:?}");
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(&id),
        "the busy sandbox was missing from the listing"
    );
    assert!(pid_alive(pid), "the busy sandbox was killed as idle");
    // Once idle for its timeout, it dies as before.
    let deadline = Instant::now() + Duration::from_secs(20);
    while pid_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the idle sandbox lived on\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
