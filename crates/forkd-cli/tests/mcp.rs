//! forkd's MCP server driven by the official MCP Python client over both
//! transports (`forkd mcp` on stdio, the daemon's `/mcp` over streamable
//! HTTP behind its bearer token), against real guests. The Python side is
//! `crates/forkd-mcp/tests/python/test_mcp.py`; the venv with the pinned
//! client comes from `scripts/setup-python.sh` (run by `scripts/setup.sh`).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{free_port, World};

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
    let health = forkd_client::Client::new(&url, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while health.call("GET", "/healthz", None).is_err() {
        assert!(Instant::now() < deadline, "{}", w.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../forkd-mcp/tests/python");
    let out = std::process::Command::new(venv_python())
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_mcp.py",
        ])
        .current_dir(&tests)
        .env("FORKD_BIN", env!("CARGO_BIN_EXE_forkd"))
        .env("FORKD_HOME", &w.home)
        .env("FORKD_RUNTIME_DIR", &w.runtime)
        .env("FORKD_MCP_URL", format!("{url}/mcp"))
        .env("FORKD_MCP_TOKEN", token)
        .env_remove("FORKD_TOKEN")
        .env_remove("FORKD_REMOTE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pytest failed:\n{}\n{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}
