"""Fixtures for forkd-e2b's Python tests.

Two kinds of tests live here:

* test_code_interpreter_local.py runs the guest's code interpreter
  (../../guest/code_interpreter.py) on this host and drives it with the
  published `e2b-code-interpreter` SDK's own `run_code` and context calls.
  It needs nothing but the venv (scripts/setup-python.sh).
* test_sdk_shared.py runs the published SDKs unchanged against a real forkd
  daemon with real guests. It needs, in the environment:

    E2B_API_URL       the daemon's --e2b-listen address, e.g. http://127.0.0.1:49982
    E2B_SANDBOX_URL   the same address (envd and port traffic are routed by header)
    E2B_API_KEY       a key from the daemon's --e2b-api-key-file

  optional:

    FORKD_E2B_SLOW          multiplier for every wait (default 1; TCG guests boot in seconds)

  Without E2B_API_URL it is skipped with that reason; set
  FORKD_E2B_REQUIRE_DAEMON=1 (CI) to make a missing daemon an error instead.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.normpath(os.path.join(HERE, "..", "..", "guest", "code_interpreter.py"))
SLOW = float(os.environ.get("FORKD_E2B_SLOW", "1"))


def slow(seconds):
    """A wait scaled for slow (TCG) guests."""
    return seconds * SLOW


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def interpreter_url(tmp_path_factory):
    """Runs code_interpreter.py as the guest would (`python3 -I -S`: no
    site-packages, so it provably needs only the standard library) on a free
    loopback port; yields its base URL; stops it by pid."""
    port = _free_port()
    home = tmp_path_factory.mktemp("ci-home")
    python = os.environ.get("FORKD_GUEST_PYTHON", "python3")
    proc = subprocess.Popen(
        [python, "-I", "-S", SERVER, "--port", str(port), "--cwd", str(home)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"code_interpreter.py did not start: {err}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", str(home)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def local_code_sandbox(base_url, token="local-token"):
    """An `e2b_code_interpreter.Sandbox` object whose sandbox URL is the local
    server: the SDK's own run_code/context code then sends its requests,
    byte for byte as it would to a sandbox, to that server. No control plane
    is involved (the object is built the way `Sandbox._create` builds it)."""
    from e2b.connection_config import ConnectionConfig
    from e2b_code_interpreter import Sandbox
    from packaging.version import Version

    config = ConnectionConfig(
        api_key="unused-by-these-calls",
        sandbox_url=base_url,
        extra_sandbox_headers={
            "E2b-Sandbox-Id": "local",
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": token,
        },
    )
    return Sandbox(
        sandbox_id="local",
        sandbox_domain=None,
        envd_version=Version("0.6.4"),
        envd_access_token=token,
        traffic_access_token=None,
        connection_config=config,
    )


def daemon_required():
    """Skips (or, with FORKD_E2B_REQUIRE_DAEMON=1, fails) without a daemon."""
    missing = [v for v in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY") if not os.environ.get(v)]
    if missing:
        reason = f"no forkd daemon to test against: set {', '.join(missing)} (see conftest.py)"
        if os.environ.get("FORKD_E2B_REQUIRE_DAEMON") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


class Killer:
    """Kills every sandbox a test made, whatever happens in the test."""

    def __init__(self):
        self.ids = []

    def add(self, sbx):
        self.ids.append(sbx.sandbox_id)
        return sbx

    def kill_all(self):
        from e2b import Sandbox

        for sid in self.ids:
            try:
                Sandbox.kill(sid)
            except Exception as e:  # report, do not mask the test's own failure
                print(f"cleanup: could not kill {sid}: {e}", file=sys.stderr)


@pytest.fixture
def killer():
    k = Killer()
    yield k
    k.kill_all()
