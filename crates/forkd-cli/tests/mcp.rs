//! forkd's MCP server driven by the official MCP Python client over both
//! transports (`forkd mcp` on stdio, the daemon's `/mcp` over streamable
//! HTTP behind its bearer token), against real guests. The Python side is
//! `crates/forkd-mcp/tests/python/test_mcp.py`; the venv with the pinned
//! client comes from `scripts/setup-python.sh` (run by `scripts/setup.sh`).

mod common;

use std::path::PathBuf;

use common::{free_port, pytest, wait_for_http, World};

#[test]
fn the_official_mcp_client_drives_forkd_over_stdio_and_http() {
    let token = "mcp-test-token-0123456789";
    let addr = format!("127.0.0.1:{}", free_port());
    let w = World::with(
        "mcp",
        &["--listen", &format!("tcp:{addr}")],
        &[("FORKD_TOKEN", token)],
    );
    let url = format!("http://{addr}");
    wait_for_http(&url, &w);
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../forkd-mcp/tests/python");
    pytest(
        &w,
        &tests,
        "test_mcp.py",
        &[
            ("FORKD_MCP_URL", format!("{url}/mcp")),
            ("FORKD_MCP_TOKEN", token.to_string()),
        ],
    );
}
