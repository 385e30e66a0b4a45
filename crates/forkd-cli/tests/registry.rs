//! `forkd push` / `forkd pull` end to end: two daemons with their own homes
//! (two hosts), the real `forkd` binary talking to each with `--remote`,
//! and a real `docker-registry` on a free loopback port. Host A's daemon
//! pushes a live branch; host B's pulls it and spawns a child that sees
//! A's state; progress and outcomes come out as JSON with `--json`.

mod common;

use common::registry::Registry;
use common::World;
use serde_json::{json, Value};

/// Runs `forkd --remote <w's socket> args...`, asserts success, parses stdout.
fn forkd_json(w: &World, args: &[&str]) -> Value {
    let out = w
        .command()
        .arg("--remote")
        .arg(&w.socket)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "forkd {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn push_and_pull_through_two_daemons() {
    let registry = Registry::start();
    let reference = format!("127.0.0.1:{}/forkd/kid:v1", registry.port);
    let a = World::new("push-a");
    let b = World::new("pull-b");

    let v = a.ok(
        "POST",
        "/v1/sandboxes/boot",
        Some(json!({"memory_mib": 256})),
    );
    let src = v["id"].as_str().unwrap().to_string();
    a.sh(&src, "echo from-a > /root/state");
    a.ok(
        "POST",
        &format!("/v1/sandboxes/{src}/branch"),
        Some(json!({"tag": "kid"})),
    );

    // A reference that does not parse is refused before anything moves.
    let out = a
        .command()
        .arg("--remote")
        .arg(&a.socket)
        .args(["push", "kid", "NOT A REF", "--insecure", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reference"));

    let pushed = forkd_json(&a, &["push", "kid", &reference, "--insecure", "--json"]);
    assert_eq!(pushed["snapshots"], json!(["kid"]));
    assert!(pushed["counts"]["bytes_transferred"].as_u64().unwrap() > 0);
    assert!(pushed["digest"].as_str().unwrap().starts_with("sha256:"));

    let pulled = forkd_json(
        &b,
        &["pull", &reference, "--tag", "copy", "--insecure", "--json"],
    );
    assert_eq!(pulled["tag"], "copy");
    assert_eq!(pulled["published"], json!(["copy"]));
    assert_eq!(pulled["digest"], pushed["digest"]);

    let (st, kids) = b.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "copy", "n": 1})),
    );
    assert_eq!(st, 201, "{kids}");
    let kid = kids[0]["id"].as_str().unwrap().to_string();
    assert_eq!(b.sh(&kid, "cat /root/state")["stdout"], "from-a\n");

    // The route reports a missing snapshot as the last NDJSON line's error.
    let out = b
        .command()
        .arg("--remote")
        .arg(&b.socket)
        .args(["push", "nothing", &reference, "--insecure", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no snapshot `nothing`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
