//! The published `forkd` 0.5.3 Python client (its `Controller`, pinned in
//! `tests/python/requirements.txt`) against this daemon on TCP with a
//! token, as its users run it: list and spawn from a snapshot, exec, eval
//! (stateful, into branches and their children), branch, ping, kill, delete.
//! The Python side is `tests/python/test_legacy_client.py`.

mod common;

use std::path::PathBuf;

use common::{free_port, pytest, wait_for_http, World};
use serde_json::json;

#[test]
fn the_published_python_client_works_unchanged() {
    let token = "legacy-client-token-0123456789";
    let addr = format!("127.0.0.1:{}", free_port());
    let w = World::with(
        "legacy",
        &["--listen", &format!("tcp:{addr}")],
        &[("FORKD_TOKEN", token)],
    );
    let url = format!("http://{addr}");
    wait_for_http(&url, &w);
    // The legacy API has no boot route: make the snapshot it spawns from.
    let c = forkd_client::Client::new(&url, Some(token.into())).unwrap();
    let a = c
        .call(
            "POST",
            "/v1/sandboxes/boot",
            Some(&json!({"image": "debian-python", "tag": "py"})),
        )
        .unwrap();
    assert_eq!(a.status, 201);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    pytest(
        &w,
        &dir,
        "test_legacy_client.py",
        &[("FORKD_URL", url), ("FORKD_TEST_TOKEN", token.to_string())],
    );
}
