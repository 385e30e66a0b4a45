//! forkd's E2B-compatible API (issue 13) driven by E2B's published Python
//! SDK, unchanged, against a real daemon with real guests
//! (`crates/forkd-e2b/tests/python/test_sdk_shared.py`; the venv with the
//! pinned SDK comes from `scripts/setup-python.sh`), the guest's code
//! interpreter against the `e2b-code-interpreter` SDK, and every route's bad
//! input answered in the form the SDK reads.

mod common;

use std::path::PathBuf;

use common::{free_port, pytest, World};

const KEY: &str = "e2b-test-key-0123456789";

fn world(name: &str) -> (World, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let keys = std::env::temp_dir().join(format!("forkd-e2b-keys-{name}-{}", std::process::id()));
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let w = World::with(
        name,
        &[
            "--e2b-listen",
            &format!("tcp:{addr}"),
            "--e2b-api-key-file",
            keys.to_str().unwrap(),
        ],
        &[],
    );
    let url = format!("http://{addr}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "{}", w.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (w, url)
}

#[test]
fn the_published_e2b_sdk_drives_forkd() {
    let (w, url) = world("e2b-sdk");
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../forkd-e2b/tests/python");
    pytest(
        &w,
        &tests,
        "test_sdk_shared.py",
        &[
            ("E2B_API_URL", url.clone()),
            ("E2B_SANDBOX_URL", url),
            ("E2B_API_KEY", KEY.to_string()),
            ("FORKD_E2B_REQUIRE_DAEMON", "1".to_string()),
        ],
    );
}

/// The guest's code interpreter (`crates/forkd-e2b/guest/code_interpreter.py`,
/// run on this host as the guest runs it, `python3 -I -S`: standard library
/// only) answers the published `e2b-code-interpreter` SDK's own `run_code`
/// and context calls: streaming, errors, contexts, interrupts, bad requests.
/// No VM: the daemon relays port 49999 to this same server in the guest.
#[test]
fn the_guest_code_interpreter_serves_the_sdk() {
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../forkd-e2b/tests/python");
    let out = std::process::Command::new(common::venv_python())
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_code_interpreter_local.py",
        ])
        .current_dir(&tests)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pytest test_code_interpreter_local.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One HTTP/1.1 request on a fresh connection: (status, body text).
fn http(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer to {method} {path}: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn every_route_answers_bad_input_as_the_sdk_reads_it() {
    let (w, url) = world("e2b-bad");
    let key = ("X-API-KEY", KEY);
    let json = ("content-type", "application/json");
    let cp = |method: &str, path: &str, body: &str| {
        http(&url, method, path, &[key, json], body.as_bytes())
    };

    // Control plane: the key first, then every body and query.
    let (st, body) = http(&url, "GET", "/v2/sandboxes", &[], b"");
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("\"code\":401"), "{body}");
    let (st, _) = http(
        &url,
        "GET",
        "/v2/sandboxes",
        &[("X-API-KEY", "wrong-key-0123456789")],
        b"",
    );
    assert_eq!(st, 401);
    for (method, path, body, want) in [
        ("POST", "/v2/sandboxes", "not json", 400),
        ("POST", "/v2/sandboxes", "{\"templateID\":\"\"}", 400),
        (
            "POST",
            "/v2/sandboxes",
            "{\"templateID\":\"base\",\"timeout\":0}",
            400,
        ),
        (
            "POST",
            "/v2/sandboxes",
            "{\"templateID\":\"base\",\"autoPause\":true}",
            400,
        ),
        (
            "POST",
            "/v2/sandboxes",
            "{\"templateID\":\"base\",\"metadata\":{\"bad key\":\"x\"}}",
            400,
        ),
        ("GET", "/v2/sandboxes?nextToken=garbage", "", 400),
        ("GET", "/sandboxes/sb-nothere", "", 404),
        ("DELETE", "/sandboxes/sb-nothere", "", 404),
        (
            "POST",
            "/sandboxes/sb-nothere/timeout",
            "{\"timeout\":0}",
            400,
        ),
        ("POST", "/sandboxes/sb-nothere/timeout", "", 400),
        (
            "POST",
            "/sandboxes/sb-nothere/timeout",
            "{\"timeout\":60}",
            404,
        ),
        ("POST", "/sandboxes/sb-nothere/fork", "{\"count\":0}", 400),
        ("POST", "/sandboxes/sb-nothere/fork", "{\"count\":21}", 400),
        ("POST", "/sandboxes/sb-nothere/fork", "{\"count\":1}", 404),
        (
            "POST",
            "/sandboxes/sb-nothere/pause",
            "{\"memory\":false}",
            400,
        ),
        ("POST", "/sandboxes/sb-nothere/pause", "{}", 404),
        (
            "POST",
            "/v2/sandboxes/sb-nothere/connect",
            "{\"timeout\":0}",
            400,
        ),
        ("POST", "/v2/sandboxes/sb-nothere/connect", "{}", 404),
        ("PUT", "/v2/sandboxes", "", 405),
        ("GET", "/no/such/route", "", 404),
    ] {
        let (st, got) = cp(method, path, body);
        assert_eq!(st, want, "{method} {path} {body} -> {got}");
        let v: serde_json::Value = serde_json::from_str(&got)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {got:?}"));
        assert_eq!(v["code"], want, "{method} {path} -> {got}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{got}"
        );
    }

    // Routing headers.
    for (id, port, want) in [
        ("../x", "49983", 400),
        ("sb-x", "abc", 400),
        ("sb-x", "1234", 502),
        ("sb-x", "49983", 502),
    ] {
        let (st, got) = http(
            &url,
            "GET",
            "/health",
            &[("E2b-Sandbox-Id", id), ("E2b-Sandbox-Port", port)],
            b"",
        );
        assert_eq!(st, want, "{id}:{port} -> {got}");
    }

    // A real sandbox for the envd routes.
    let (st, got) = cp(
        "POST",
        "/v2/sandboxes",
        "{\"templateID\":\"base\",\"timeout\":300}",
    );
    assert_eq!(st, 201, "{got}\n{}", w.log());
    let created: serde_json::Value = serde_json::from_str(&got).unwrap();
    let id = created["sandboxID"].as_str().unwrap().to_string();
    let token = created["envdAccessToken"].as_str().unwrap().to_string();
    assert!(token.starts_with("fkd_"), "{created}");
    let envd = |path: &str, ct: &str, tok: Option<&str>, body: &[u8]| {
        let mut h = vec![("E2b-Sandbox-Id", id.as_str()), ("content-type", ct)];
        if let Some(t) = tok {
            h.push(("X-Access-Token", t));
        }
        http(&url, "POST", path, &h, body)
    };
    let uj = "application/json";
    let stat_root =
        |tok: Option<&str>| envd("/filesystem.Filesystem/Stat", uj, tok, b"{\"path\":\"/\"}");
    let (st, _) = stat_root(None);
    assert_eq!(st, 401);
    let (st, got) = stat_root(Some("fkd_wrong"));
    assert_eq!(st, 401);
    assert!(got.contains("unauthenticated"), "{got}");
    let (st, got) = stat_root(Some(&token));
    assert_eq!(st, 200, "{got}");
    assert!(got.contains("FILE_TYPE_DIRECTORY"), "{got}");
    for (path, ct, body, want, code) in [
        (
            "/filesystem.Filesystem/Stat",
            uj,
            &b"{not json"[..],
            400,
            "invalid_argument",
        ),
        (
            "/filesystem.Filesystem/Stat",
            uj,
            b"{\"path\":\"\"}",
            400,
            "invalid_argument",
        ),
        (
            "/filesystem.Filesystem/Stat",
            uj,
            b"{\"path\":\"/no/such\"}",
            404,
            "not_found",
        ),
        (
            "/filesystem.Filesystem/Stat",
            "text/plain",
            b"{\"path\":\"/\"}",
            415,
            "invalid_argument",
        ),
        (
            "/filesystem.Filesystem/ListDir",
            uj,
            b"{\"path\":\"/\",\"depth\":1000}",
            400,
            "invalid_argument",
        ),
        (
            "/filesystem.Filesystem/MakeDir",
            uj,
            b"{\"path\":\"/tmp\"}",
            409,
            "already_exists",
        ),
        (
            "/filesystem.Filesystem/Move",
            uj,
            b"{\"source\":\"/a\"}",
            400,
            "invalid_argument",
        ),
        (
            "/filesystem.Filesystem/GetWatcherEvents",
            uj,
            b"{\"watcherId\":\"\"}",
            400,
            "invalid_argument",
        ),
        (
            "/filesystem.Filesystem/RemoveWatcher",
            uj,
            b"{\"watcherId\":\"nope\"}",
            404,
            "not_found",
        ),
        (
            "/process.Process/SendSignal",
            uj,
            b"{\"process\":{\"pid\":1}}",
            400,
            "invalid_argument",
        ),
        (
            "/process.Process/SendInput",
            uj,
            b"{\"input\":{\"stdin\":\"eA==\"}}",
            400,
            "invalid_argument",
        ),
        (
            "/process.Process/Update",
            uj,
            b"{\"process\":{\"pid\":1}}",
            400,
            "invalid_argument",
        ),
        ("/process.Process/Start", uj, b"{}", 415, "invalid_argument"),
        (
            "/process.Process/Start",
            "application/connect+json",
            b"\x00\x00\x00\x00\x09{garbage}",
            400,
            "invalid_argument",
        ),
        (
            "/process.Process/Start",
            "application/connect+json",
            b"\x00\xff\xff\xff\xff",
            429,
            "resource_exhausted",
        ),
        ("/process.Process/Nope", uj, b"{}", 501, "unimplemented"),
    ] {
        let (st, got) = envd(path, ct, Some(&token), body);
        assert_eq!(
            st,
            want,
            "{path} {:?} -> {got}",
            String::from_utf8_lossy(body)
        );
        assert!(got.contains(code), "{path} -> {got}");
    }
    let files = |q: &str| {
        http(
            &url,
            "GET",
            &format!("/files{q}"),
            &[
                ("E2b-Sandbox-Id", id.as_str()),
                ("X-Access-Token", token.as_str()),
            ],
            b"",
        )
    };
    assert_eq!(files("").0, 400);
    assert_eq!(files("?path=/etc/hostname&signature=x").0, 400);
    assert_eq!(files("?path=/no/such/file").0, 404);
    assert_eq!(files("?path=/etc/hostname").0, 200);
    // Streams: a keepalive after the asked interval of silence; the end at
    // the deadline, with the process killed (envd makes the deadline the
    // process's lifetime).
    let start = |cmd: &str, headers: &[(&str, &str)]| {
        let msg = serde_json::json!({"process": {"cmd": "/bin/sh", "args": ["-c", cmd]}});
        let msg = serde_json::to_vec(&msg).unwrap();
        let mut body = vec![0u8];
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(&msg);
        let mut h = vec![
            ("E2b-Sandbox-Id", id.as_str()),
            ("X-Access-Token", token.as_str()),
            ("content-type", "application/connect+json"),
        ];
        h.extend_from_slice(headers);
        let t = std::time::Instant::now();
        let (st, got) = http(&url, "POST", "/process.Process/Start", &h, &body);
        (st, got, t.elapsed())
    };
    let (st, got, _) = start("sleep 4; echo done", &[("Keepalive-Ping-Interval", "1")]);
    assert_eq!(st, 200, "{got}");
    assert!(got.contains("\"keepalive\""), "{got}");
    assert!(got.contains("ZG9uZQo="), "{got}"); // "done\n"
    let (st, got, _) = start("sleep 4; echo done", &[]);
    assert_eq!(st, 200, "{got}");
    assert!(!got.contains("\"keepalive\""), "{got}");
    let (st, got, took) = start(
        "echo started; sleep 60; echo never",
        &[("Connect-Timeout-Ms", "3000")],
    );
    assert_eq!(st, 200, "{got}");
    assert!(got.contains("deadline_exceeded"), "{got}");
    assert!(!got.contains("bmV2ZXIK"), "{got}"); // "never\n"
    assert!(took < std::time::Duration::from_secs(40), "{took:?}");
    let (st, got, _) = start("true", &[("Connect-Timeout-Ms", "soon")]);
    assert_eq!(st, 400, "{got}");

    // Pause and connect: the same id and token; a snapshot per pause, gone
    // with the sandbox.
    let pauses = || {
        use forkd_ops::Operations;
        let prefix = format!("e2b-paused-{id}-");
        w.client()
            .snapshots()
            .unwrap()
            .into_iter()
            .filter(|s| s.tag.starts_with(&prefix))
            .count()
    };
    for _ in 0..2 {
        let (st, got) = cp("POST", &format!("/sandboxes/{id}/pause"), "{}");
        assert_eq!(st, 204, "{got}\n{}", w.log());
        let (st, got) = cp("GET", &format!("/sandboxes/{id}"), "");
        assert_eq!(st, 200, "{got}");
        assert!(got.contains("\"state\":\"paused\""), "{got}");
        let (st, _) = cp("POST", &format!("/sandboxes/{id}/pause"), "{}");
        assert_eq!(st, 409);
        let (st, _) = stat_root(Some(&token));
        assert_eq!(st, 502);
        let (st, got) = cp(
            "POST",
            &format!("/v2/sandboxes/{id}/connect"),
            "{\"memory\":false}",
        );
        assert_eq!(st, 400, "{got}");
        let (st, got) = cp(
            "POST",
            &format!("/v2/sandboxes/{id}/connect"),
            "{\"timeout\":300}",
        );
        assert_eq!(st, 201, "{got}\n{}", w.log());
    }
    let (st, got) = cp("POST", &format!("/v2/sandboxes/{id}/connect"), "{}");
    assert_eq!(st, 200, "{got}"); // running: answered as it is
    let resumed: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(resumed["sandboxID"], id.as_str(), "{resumed}");
    assert_eq!(resumed["envdAccessToken"], token.as_str(), "{resumed}");
    assert_eq!(resumed["trafficAccessToken"], token.as_str(), "{resumed}");
    let (st, got) = stat_root(Some(&token));
    assert_eq!(st, 200, "{got}");
    assert_eq!(pauses(), 2); // the second is layered on the first

    let (st, _) = cp("DELETE", &format!("/sandboxes/{id}"), "");
    assert_eq!(st, 204);
    let (st, _) = files("?path=/etc/hostname");
    assert_eq!(st, 502);
    assert_eq!(pauses(), 0, "the pause snapshot outlived its sandbox");
}
