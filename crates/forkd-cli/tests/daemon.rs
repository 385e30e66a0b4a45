//! `forkd daemon` end to end over its REST API: real QEMU, real kernel, the
//! real binary. Every test runs its own daemon with a private state
//! database (guest artifacts are shared with the rest of the suite).

mod common;

use std::time::{Duration, Instant};

use common::{pid_alive, World};
use forkd_client::{Client, ClientError};
use serde_json::{json, Value};

#[test]
fn the_api_boots_execs_branches_spawns_and_deletes() {
    let w = World::new("e2e");
    let p = w.boot();
    let out = w.sh(&p, "echo warm > /tmp/state; echo out; echo err >&2; exit 3");
    assert_eq!(
        (
            out["stdout"].as_str(),
            out["stderr"].as_str(),
            out["exit_code"].as_i64()
        ),
        (Some("out\n"), Some("err\n"), Some(3))
    );
    assert_eq!(
        w.ok("POST", &format!("/v1/sandboxes/{p}/ping"), None)["pong"],
        true
    );
    // The streaming exec: NDJSON lines as the command runs, the exit last.
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    let status = w
        .client()
        .stream(
            "POST",
            &format!("/v1/sandboxes/{p}/exec/stream"),
            Some(&json!({"args": ["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.2; done; echo e >&2; exit 2"]})),
            &mut |b| {
                buf.extend_from_slice(b);
                while let Some(nl) = buf.iter().position(|&c| c == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    lines.push(serde_json::from_slice::<Value>(&line).unwrap());
                }
            },
        )
        .unwrap();
    assert_eq!(status, 200);
    let text = |which: &str| {
        use base64::Engine as _;
        lines
            .iter()
            .filter(|l| l["stream"] == which)
            .flat_map(|l| {
                base64::engine::general_purpose::STANDARD
                    .decode(l["data_b64"].as_str().unwrap())
                    .unwrap()
            })
            .collect::<Vec<u8>>()
    };
    assert_eq!(text("stdout"), b"1\n2\n3\n");
    assert_eq!(text("stderr"), b"e\n");
    assert!(lines.len() >= 4, "output did not come in pieces: {lines:?}");
    assert_eq!(lines.last().unwrap()["exit_code"], 2);
    // Files both ways (base64).
    w.ok(
        "PUT",
        &format!("/v1/sandboxes/{p}/files"),
        Some(json!({"path": "/tmp/f", "content_b64": "aGVsbG8=", "mode": 0o600})),
    );
    let f = w.ok("GET", &format!("/v1/sandboxes/{p}/files?path=/tmp/f"), None);
    assert_eq!(f["content_b64"], "aGVsbG8=");
    // No python in busybox: a clear 422.
    let (st, e) = w.call(
        "POST",
        &format!("/v1/sandboxes/{p}/eval"),
        Some(json!({"code": "print(1)"})),
    );
    assert_eq!(st, 422, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("debian-python"),
        "{e}"
    );

    // Live branch, waited: 201 and ready.
    let (st, snap) = w.call(
        "POST",
        &format!("/v1/sandboxes/{p}/branch"),
        Some(json!({"tag": "warm", "mode": "live"})),
    );
    assert_eq!(st, 201, "{snap}");
    assert_eq!(
        (snap["status"].as_str(), snap["bootable"].as_bool()),
        (Some("ready"), Some(true))
    );
    assert_eq!(snap["branched_from"].as_str(), Some(p.as_str()));
    // The tag is taken now.
    let (st, _) = w.call(
        "POST",
        &format!("/v1/sandboxes/{p}/branch"),
        Some(json!({"tag": "warm"})),
    );
    assert_eq!(st, 409);

    // Spawn two children (legacy request shape, legacy no-op flags included).
    let (st, kids) = w.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "warm", "n": 2, "per_child_netns": false, "prewarm": false, "live_fork": true, "hugepages": false})),
    );
    assert_eq!(st, 201, "{kids}");
    let kids: Vec<String> = kids
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert_eq!(k["snapshot_tag"], "warm");
            k["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(kids.len(), 2);
    for k in &kids {
        assert_eq!(w.sh(k, "cat /tmp/state")["stdout"], "warm\n");
    }
    let listed = w.ok("GET", "/v1/sandboxes", None);
    assert_eq!(listed.as_array().unwrap().len(), 3);
    let parent = w.ok("GET", &format!("/v1/sandboxes/{p}"), None);
    assert_eq!(
        (
            parent["has_branched"].as_bool(),
            parent["branch_count"].as_u64()
        ),
        (Some(true), Some(1))
    );

    // A branch of a child, not waited for: 202 writing, then ready, a layer.
    let (st, b) = w.call(
        "POST",
        &format!("/v1/sandboxes/{}/branch", kids[0]),
        Some(json!({"tag": "kid", "wait": false, "parent_tag": "warm"})),
    );
    assert!(st == 202 || st == 201, "{st} {b}");
    if st == 202 {
        assert_eq!(b["status"], "writing");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = w.ok("GET", "/v1/snapshots/kid/info", None);
        if info["status"] == "ready" {
            assert_eq!(info["ancestors"], json!(["warm"]));
            assert!(
                info["memory_physical_bytes"].as_u64().unwrap()
                    < info["memory_logical_bytes"].as_u64().unwrap() / 4
            );
            break;
        }
        assert_ne!(info["status"], "failed", "{info}");
        assert!(Instant::now() < deadline, "branch never ready: {info}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The CLI says the same with and without --remote.
    let sock = w.socket.display().to_string();
    for args in [
        vec!["ls"],
        vec!["ls", "--json"],
        vec!["snapshots"],
        vec!["info", "warm"],
        vec!["info", "kid"],
    ] {
        let local = w.command().args(&args).output().unwrap();
        let remote = w
            .command()
            .arg("--remote")
            .arg(&sock)
            .args(&args)
            .output()
            .unwrap();
        assert!(
            local.status.success() && remote.status.success(),
            "{args:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&local.stdout),
            String::from_utf8_lossy(&remote.stdout),
            "forkd {args:?} differs with --remote"
        );
    }
    let out = w
        .command()
        .args([
            "--remote",
            &sock,
            "exec",
            &kids[1],
            "--",
            "sh",
            "-c",
            "cat /tmp/state; exit 5",
        ])
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), &out.stdout[..]),
        (Some(5), &b"warm\n"[..])
    );

    // Deleting `warm` is refused while `kid` and the children need it.
    let (st, e) = w.call("DELETE", "/v1/snapshots/warm", None);
    assert_eq!(st, 409, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains("snapshot kid") && msg.contains(&kids[1]),
        "{msg}"
    );
    for k in &kids {
        let (st, _) = w.call("DELETE", &format!("/v1/sandboxes/{k}"), None);
        assert_eq!(st, 204);
    }
    let (st, _) = w.call("GET", &format!("/v1/sandboxes/{}", kids[0]), None);
    assert_eq!(st, 404);
    let (st, e) = w.call("DELETE", "/v1/snapshots/warm?cascade=true", None);
    assert_eq!(st, 204, "{e}");
    assert_eq!(w.ok("GET", "/v1/snapshots", None), json!([]));

    // The metrics saw it all; the audit log names every mutating call.
    let (_, m) = w.call("GET", "/metrics", None);
    let m = m.as_str().unwrap().to_string();
    assert!(m.contains("forkd_spawn_seconds_count"), "{m}");
    assert!(m.contains("forkd_branch_pause_seconds_count 2"), "{m}");
    let audit = std::fs::read_to_string(w.home.join("audit.log")).unwrap();
    for op in [
        "bootSandbox",
        "branch",
        "spawnSandboxes",
        "deleteSandbox",
        "deleteSnapshot",
        "exec",
    ] {
        assert!(
            audit.contains(&format!("\"operation\":\"{op}\"")),
            "{op} missing:\n{audit}"
        );
    }
    for line in audit.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(
            v["caller"].as_str().unwrap().starts_with("unix:uid="),
            "{line}"
        );
    }
    assert!(!audit.contains("\"operation\":\"listSandboxes\""));
}

#[test]
fn bad_input_gets_a_4xx_naming_the_problem() {
    let w = World::new("bad");
    let cases: &[(&str, &str, Value, u16, &str)] = &[
        (
            "POST",
            "/v1/sandboxes",
            json!({"snapshot_tag": "x", "n": 0}),
            400,
            "`n`",
        ),
        (
            "POST",
            "/v1/sandboxes",
            json!({"snapshot_tag": "x", "n": 1001}),
            400,
            "`n`",
        ),
        (
            "POST",
            "/v1/sandboxes",
            json!({"snapshot_tag": "x", "frobnicate": 1}),
            400,
            "frobnicate",
        ),
        (
            "POST",
            "/v1/sandboxes",
            json!({"snapshot_tag": 7}),
            400,
            "snapshot_tag",
        ),
        (
            "POST",
            "/v1/sandboxes",
            json!({"snapshot_tag": "../etc"}),
            400,
            "snapshot_tag",
        ),
        (
            "POST",
            "/v1/sandboxes",
            json!({"snapshot_tag": "nope"}),
            404,
            "nope",
        ),
        (
            "POST",
            "/v1/sandboxes/sb-none/exec",
            json!({"args": ["true"]}),
            404,
            "sb-none",
        ),
        (
            "POST",
            "/v1/sandboxes/sb-none/exec",
            json!({"args": []}),
            400,
            "args",
        ),
        (
            "POST",
            "/v1/sandboxes/sb-none/branch",
            json!({"mode": "sideways"}),
            400,
            "mode",
        ),
        ("GET", "/v1/snapshots/nope/info", Value::Null, 404, "nope"),
        ("GET", "/v2/what", Value::Null, 404, "route"),
        ("PUT", "/v1/sandboxes", Value::Null, 400, "not allowed"),
    ];
    for (method, path, body, status, needle) in cases {
        let body = (!body.is_null()).then(|| body.clone());
        let (st, e) = w.call(method, path, body);
        assert_eq!(st, *status, "{method} {path}: {e}");
        let msg = e["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {e}"));
        assert!(
            msg.contains(needle),
            "{method} {path}: `{msg}` does not name {needle}"
        );
    }
    // Not JSON, and too big.
    let a = w
        .client()
        .raw("POST", "/v1/sandboxes", Some(b"{not json".to_vec()))
        .unwrap();
    assert_eq!(a.status, 400);
    let big = format!("{{\"snapshot_tag\":\"{}\"}}", "a".repeat(2 << 20));
    let a = w
        .client()
        .raw("POST", "/v1/sandboxes", Some(big.into_bytes()))
        .unwrap();
    assert_eq!(a.status, 413, "{}", String::from_utf8_lossy(&a.body));
    // The served OpenAPI document is the committed one.
    let served = w.ok("GET", "/v1/openapi.json", None);
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/openapi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(served, committed, "docs/openapi.json is stale");
}

#[test]
fn spawn_over_the_cap_answers_429_with_retry_after() {
    let w = std::sync::Arc::new(World::with("cap", &["--max-spawn", "1"], &[]));
    let w2 = w.clone();
    let slow = std::thread::spawn(move || w2.call("POST", "/v1/sandboxes/boot", Some(json!({}))));
    std::thread::sleep(Duration::from_millis(500));
    let a = w
        .client()
        .raw("POST", "/v1/sandboxes/boot", Some(b"{}".to_vec()))
        .unwrap();
    assert_eq!(a.status, 429, "{}", String::from_utf8_lossy(&a.body));
    let (st, v) = slow.join().unwrap();
    assert_eq!(st, 201, "{v}");
    // The cap is free again.
    assert!(matches!(
        w.client().call(
            "POST",
            "/v1/sandboxes/boot",
            Some(&json!({"memory_mib": 1}))
        ),
        Err(ClientError::Api { status: 400, .. })
    ));
}

#[test]
fn tcp_needs_the_token_and_bad_configurations_are_refused_at_start() {
    let token = "0123456789abcdef-token";
    let port = 20000 + (std::process::id() % 20000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let w = World::with(
        "tcp",
        &["--listen", &format!("tcp:{addr}")],
        &[("FORKD_TOKEN", token)],
    );
    let url = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Client::new(&url, None)
        .unwrap()
        .call("GET", "/healthz", None)
        .is_err()
    {
        assert!(Instant::now() < deadline, "{}", w.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let anon = Client::new(&url, None).unwrap();
    let a = anon.raw("GET", "/v1/sandboxes", None).unwrap();
    assert_eq!(a.status, 401);
    let wrong = Client::new(&url, Some("0123456789abcdef-wrong".into())).unwrap();
    assert_eq!(wrong.raw("GET", "/v1/sandboxes", None).unwrap().status, 401);
    // The CLI without the token is told which variable to set.
    let out = w
        .command()
        .env_remove("FORKD_TOKEN")
        .args(["--remote", &url, "ls"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("FORKD_TOKEN") && err.contains("--token-file"),
        "{err}"
    );
    let good = Client::new(&url, Some(token.into())).unwrap();
    assert_eq!(
        good.call("GET", "/v1/sandboxes", None)
            .unwrap()
            .json()
            .unwrap(),
        json!([])
    );

    // Refused at start: a short token, and no token off loopback.
    for (args, env, needle) in [
        (vec!["--tcp"], vec![("FORKD_TOKEN", "short")], "16"),
        (vec!["--listen", "tcp:0.0.0.0:1"], vec![], "token"),
    ] {
        let mut c = w.command();
        c.env_remove("FORKD_TOKEN").arg("daemon").args(&args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn kill_9_of_the_daemon_touches_no_sandbox_and_the_branch_finishes() {
    let mut w = World::new("restart");
    let p = w.boot();
    let pid = w.ok("GET", &format!("/v1/sandboxes/{p}"), None)["pid"]
        .as_u64()
        .unwrap();
    // A process in the guest whose progress shows the guest kept running
    // (each count renamed into place, so that a reader never sees the file
    // truncated and empty).
    w.sh(&p, "(i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done) >/dev/null 2>&1 &");
    let (st, b) = w.call(
        "POST",
        &format!("/v1/sandboxes/{p}/branch"),
        Some(json!({"tag": "mid", "wait": false})),
    );
    assert!(st == 202 || st == 201, "{st} {b}");
    // Kill the daemon while the branch may still be writing.
    w.kill9();
    assert!(pid_alive(pid), "the sandbox died with the daemon");
    w.start();
    assert!(w.log().contains("recovered: 1 running"), "{}", w.log());
    let before: u64 = w.sh(&p, "cat /tmp/count")["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after: u64 = w.sh(&p, "cat /tmp/count")["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        after > before,
        "the guest is not running ({before} -> {after})"
    );
    assert_eq!(
        w.ok("GET", &format!("/v1/sandboxes/{p}"), None)["pid"].as_u64(),
        Some(pid)
    );
    // The branch's writer was a separate process: it finishes.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let info = w.ok("GET", "/v1/snapshots/mid/info", None);
        if info["status"] == "ready" {
            break;
        }
        assert_ne!(info["status"], "failed", "{info}");
        assert!(
            Instant::now() < deadline,
            "the branch never finished: {info}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let kids = w.ok(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "mid"})),
    );
    let kid = kids[0]["id"].as_str().unwrap();
    assert!(w.sh(kid, "cat /tmp/count")["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse::<u64>()
        .is_ok());
    // A second restart changes nothing either.
    w.kill9();
    w.start();
    assert!(w.log().contains("recovered: 2 running"), "{}", w.log());
}

#[test]
fn a_sandbox_the_cli_kills_does_not_stay_a_zombie_of_the_daemon() {
    let w = World::new("reap");
    let id = w.boot();
    let pid = w.ok("GET", &format!("/v1/sandboxes/{id}"), None)["pid"]
        .as_u64()
        .unwrap();
    let out = w.command().args(["kill", &id]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "QEMU {pid} is still there (a zombie of the daemon?): {}",
            std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
