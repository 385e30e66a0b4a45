"""The published `e2b` SDK, unchanged, against a real forkd daemon with real
guests: the cases CI runs (`crates/forkd-cli/tests/e2b.rs`). Two sandboxes
are shared by every case of the module (guests boot in seconds under TCG);
the cases run in file order and the last ones kill them. Two more boot: one
that the daemon kills at its timeout, one code interpreter. Only E2B_API_URL,
E2B_SANDBOX_URL and E2B_API_KEY point the SDK at forkd (conftest.py)."""

import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from e2b import (
    AuthenticationException,
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)
from e2b.connection_config import ConnectionConfig
from e2b.sandbox.commands.command_handle import CommandExitException
from packaging.version import Version

from conftest import Killer, daemon_required, slow

REQUEST_TIMEOUT = slow(180)  # create and fork boot guests under TCG
SUITE = uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def killer():
    daemon_required()
    k = Killer()
    yield k
    k.kill_all()


@pytest.fixture(scope="module")
def sbx(killer):
    return killer.add(
        Sandbox.create(
            envs={"FORKD_GREETING": "hello from create"},
            metadata={"suite": SUITE, "name": "a"},
            timeout=600,
            request_timeout=REQUEST_TIMEOUT,
        )
    )


@pytest.fixture(scope="module")
def other(killer):
    return killer.add(
        Sandbox.create(metadata={"suite": SUITE, "name": "b"}, timeout=600, request_timeout=REQUEST_TIMEOUT)
    )


def with_token(sbx, token):
    """The same sandbox reached with another envd access token (None: no
    token header at all), built as the SDK builds a connected sandbox."""
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(ConnectionConfig.envd_port)}
    if token is not None:
        headers["X-Access-Token"] = token
    return Sandbox(
        sandbox_id=sbx.sandbox_id,
        sandbox_domain=None,
        envd_version=sbx._envd_version,
        envd_access_token=token,
        traffic_access_token=None,
        connection_config=ConnectionConfig(extra_sandbox_headers=headers),
    )


def wait_until(predicate, seconds, what):
    deadline = time.monotonic() + slow(seconds)
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {slow(seconds):.0f} s waiting for {what}")


def test_create_with_envs_and_metadata(sbx):
    assert sbx.commands.run('echo "$FORKD_GREETING"').stdout == "hello from create\n"
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.metadata == {"suite": SUITE, "name": "a"}
    assert info.state == SandboxState.RUNNING


def test_commands_run_stdout_stderr_exit_code_envs_cwd(sbx):
    ok = sbx.commands.run("echo out; echo err >&2")
    assert (ok.stdout, ok.stderr, ok.exit_code, ok.error) == ("out\n", "err\n", 0, None)
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo partial; echo bad >&2; exit 3")
    assert (failed.value.stdout, failed.value.stderr, failed.value.exit_code) == ("partial\n", "bad\n", 3)
    scoped = sbx.commands.run('echo "$ONLY_HERE"; pwd', envs={"ONLY_HERE": "x y"}, cwd="/tmp")
    assert scoped.stdout == "x y\n/tmp\n"
    assert sbx.commands.run('echo "[$ONLY_HERE]"').stdout == "[]\n"
    assert sbx.commands.run("echo $BASH_VERSION").stdout.strip() != ""


def test_output_streams_as_it_happens(sbx):
    arrivals = []
    sbx.commands.run(
        "echo first; sleep 3; echo second",
        on_stdout=lambda line: arrivals.append((line, time.monotonic())),
        timeout=slow(60),
    )
    assert [line for line, _ in arrivals] == ["first\n", "second\n"]
    assert arrivals[1][1] - arrivals[0][1] > 1.5, "output arrived only when the command ended"


def test_a_command_past_its_timeout_is_stopped(sbx):
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30; touch /tmp/overslept", timeout=2)
    time.sleep(1)
    assert not [p for p in sbx.commands.list() if "overslept" in " ".join(p.args)]
    assert sbx.files.exists("/tmp/overslept") is False


def test_a_background_process_survives_a_disconnect(sbx):
    handle = sbx.commands.run("sleep 2; echo after-disconnect", background=True, timeout=0)
    handle.disconnect()
    again = sbx.commands.connect(handle.pid, timeout=slow(60))
    assert again.wait().stdout == "after-disconnect\n"


def test_background_stdin_and_kill(sbx):
    cat = sbx.commands.run("cat", background=True, stdin=True, timeout=0)
    assert cat.pid > 0
    cat.send_stdin("ping\n")
    cat.send_stdin(b"pong\n")
    cat.close_stdin()
    done = cat.wait()
    assert (done.stdout, done.exit_code) == ("ping\npong\n", 0)

    sleeper = sbx.commands.run("sleep 600", background=True, timeout=0)
    assert sleeper.pid in [p.pid for p in sbx.commands.list()]
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException) as killed:
        sleeper.wait()
    assert killed.value.exit_code == -1
    wait_until(lambda: sleeper.pid not in [p.pid for p in sbx.commands.list()], 30, "the killed process to leave the list")
    assert sbx.commands.kill(sleeper.pid) is False
    with pytest.raises(NotFoundException):
        sbx.commands.connect(sleeper.pid)


def test_files_write_read_list_make_dir_remove_stat(sbx):
    info = sbx.files.write("/tmp/forkd-e2b/deep/a.txt", "hello\n")
    assert (info.name, info.path, info.type) == ("a.txt", "/tmp/forkd-e2b/deep/a.txt", FileType.FILE)
    assert sbx.files.read("/tmp/forkd-e2b/deep/a.txt") == "hello\n"
    blob = bytes(range(256)) * 1024
    sbx.files.write("/tmp/forkd-e2b/blob.bin", blob)
    assert bytes(sbx.files.read("/tmp/forkd-e2b/blob.bin", format="bytes")) == blob
    written = sbx.files.write_files([
        {"path": "/tmp/forkd-e2b/m1.txt", "data": "one"},
        {"path": "/tmp/forkd-e2b/m2.txt", "data": b"two"},
    ])
    assert sorted(w.path for w in written) == ["/tmp/forkd-e2b/m1.txt", "/tmp/forkd-e2b/m2.txt"]
    assert sbx.commands.run("cat /tmp/forkd-e2b/m1.txt /tmp/forkd-e2b/m2.txt").stdout == "onetwo"

    entries = {e.name: e for e in sbx.files.list("/tmp/forkd-e2b")}
    assert set(entries) == {"deep", "blob.bin", "m1.txt", "m2.txt"}
    assert entries["deep"].type == FileType.DIR
    assert (entries["blob.bin"].type, entries["blob.bin"].size) == (FileType.FILE, len(blob))
    deep = {e.path for e in sbx.files.list("/tmp/forkd-e2b", depth=2)}
    assert "/tmp/forkd-e2b/deep/a.txt" in deep

    stat = sbx.files.get_info("/tmp/forkd-e2b/deep/a.txt")
    assert (stat.name, stat.type, stat.size, stat.path) == ("a.txt", FileType.FILE, 6, "/tmp/forkd-e2b/deep/a.txt")
    assert stat.permissions.startswith("-rw") and stat.mode & 0o600 == 0o600

    assert sbx.files.make_dir("/tmp/forkd-e2b/new/nested") is True
    assert sbx.files.make_dir("/tmp/forkd-e2b/new/nested") is False
    assert sbx.files.get_info("/tmp/forkd-e2b/new").type == FileType.DIR
    moved = sbx.files.rename("/tmp/forkd-e2b/m1.txt", "/tmp/forkd-e2b/new/m1.txt")
    assert moved.path == "/tmp/forkd-e2b/new/m1.txt"
    assert sbx.files.exists("/tmp/forkd-e2b/m1.txt") is False
    sbx.files.remove("/tmp/forkd-e2b/new")
    assert sbx.files.exists("/tmp/forkd-e2b/new") is False
    with pytest.raises(FileNotFoundException):
        sbx.files.read("/tmp/forkd-e2b/no-such-file")
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info("/tmp/forkd-e2b/no-such-file")


def test_get_info_list_and_set_timeout(sbx, other):
    info = sbx.get_info()
    assert timedelta(seconds=540) <= info.end_at - info.started_at <= timedelta(seconds=660)
    pages = Sandbox.list(query=SandboxQuery(metadata={"suite": SUITE}), limit=1)
    seen = []
    while pages.has_next:
        page = pages.next_items()
        assert len(page) <= 1
        seen.extend(page)
    assert sorted(s.sandbox_id for s in seen) == sorted([sbx.sandbox_id, other.sandbox_id])
    only_a = Sandbox.list(query=SandboxQuery(metadata={"suite": SUITE, "name": "a"})).next_items()
    assert [s.sandbox_id for s in only_a] == [sbx.sandbox_id]

    sbx.set_timeout(900)
    later = sbx.get_info().end_at
    assert later - info.end_at > timedelta(seconds=200)
    sbx.set_timeout(600)
    assert sbx.get_info().end_at < later


def test_watch_dir_reports_a_write(sbx):
    sbx.files.make_dir("/tmp/watched")
    handle = sbx.files.watch_dir("/tmp/watched")
    try:
        sbx.files.write("/tmp/watched/new.txt", "x")
        sbx.commands.run("echo more >> /tmp/watched/new.txt; rm /tmp/watched/new.txt")
        seen = []

        def got_all():
            seen.extend(handle.get_new_events())
            kinds = {e.type for e in seen if e.name == "new.txt"}
            return {FilesystemEventType.CREATE, FilesystemEventType.WRITE, FilesystemEventType.REMOVE} <= kinds

        wait_until(got_all, 30, "create, write and remove events of /tmp/watched/new.txt")
    finally:
        handle.stop()


def test_pty_takes_input_gives_output_and_resizes(sbx):
    term = sbx.pty.create(PtySize(rows=24, cols=80), timeout=0)
    assert term.pid > 0
    sbx.pty.resize(term.pid, PtySize(rows=31, cols=101))
    sbx.pty.send_stdin(term.pid, b"stty size; [ -t 0 ] && echo tty-$((6*7)); exit 5\n")
    out = bytearray()
    with pytest.raises(CommandExitException) as ended:
        term.wait(on_pty=lambda data: out.extend(data))
    assert ended.value.exit_code == 5
    text = out.decode(errors="replace")
    assert "31 101" in text, text
    assert "tty-42" in text, text


def test_pause_and_connect_resume_the_same_sandbox(other):
    other.files.write("/tmp/before-pause.txt", "kept")
    sleeper = other.commands.run("sleep 3000", background=True, timeout=0)
    assert other.pause() is True
    assert other.pause() is False  # already paused, as E2B answers
    assert other.is_running() is False
    info = Sandbox.get_info(other.sandbox_id)
    assert (info.sandbox_id, info.state) == (other.sandbox_id, SandboxState.PAUSED)
    assert info.metadata == {"suite": SUITE, "name": "b"}
    listed = Sandbox.list(query=SandboxQuery(metadata={"suite": SUITE}, state=[SandboxState.PAUSED])).next_items()
    assert [(s.sandbox_id, s.state) for s in listed] == [(other.sandbox_id, SandboxState.PAUSED)]
    running = Sandbox.list(query=SandboxQuery(metadata={"suite": SUITE}, state=[SandboxState.RUNNING])).next_items()
    assert other.sandbox_id not in [s.sandbox_id for s in running]

    resumed = Sandbox.connect(other.sandbox_id, timeout=600, request_timeout=REQUEST_TIMEOUT)
    assert resumed.sandbox_id == other.sandbox_id
    assert resumed.files.read("/tmp/before-pause.txt") == "kept"
    assert sleeper.pid in [p.pid for p in resumed.commands.list()]
    # The handle that paused it goes on with the token it had.
    assert other.connect() is other
    assert other.commands.run("cat /tmp/before-pause.txt").stdout == "kept"
    info = other.get_info()
    assert (info.state, info.metadata) == (SandboxState.RUNNING, {"suite": SUITE, "name": "b"})
    assert other.commands.kill(sleeper.pid) is True
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect("sb-never-paused-0000")


def test_fork_three_children_see_the_parents_files_and_processes(sbx, killer):
    sbx.files.write("/tmp/parent.txt", "from the parent")
    daemon = sbx.commands.run("sleep 900", background=True, timeout=0)
    children = sbx.fork(count=3, timeout=600, request_timeout=REQUEST_TIMEOUT)
    for child in children:
        if isinstance(child, Sandbox):
            killer.add(child)
    assert len(children) == 3
    errors = [c for c in children if isinstance(c, Exception)]
    assert not errors, errors
    ids = {c.sandbox_id for c in children}
    assert len(ids) == 3 and sbx.sandbox_id not in ids
    for i, child in enumerate(children):
        assert child.files.read("/tmp/parent.txt") == "from the parent"
        assert daemon.pid in [p.pid for p in child.commands.list()], "the parent's process is not in the child"
        child.files.write("/tmp/child.txt", f"child {i}")
    for i, child in enumerate(children):
        assert child.files.read("/tmp/child.txt") == f"child {i}"
    assert sbx.files.exists("/tmp/child.txt") is False
    assert sbx.get_info().state == SandboxState.RUNNING
    assert daemon.pid in [p.pid for p in sbx.commands.list()]
    assert sbx.commands.kill(daemon.pid) is True
    for child in children:
        assert child.kill() is True


def test_bad_envd_tokens_are_refused(sbx, other):
    for token in ["not-the-token", None, other._envd_access_token]:
        intruder = with_token(sbx, token)
        with pytest.raises(AuthenticationException):
            intruder.commands.run("true")
        with pytest.raises(AuthenticationException):
            intruder.files.read("/etc/hostname")
        with pytest.raises(AuthenticationException):
            intruder.files.write("/tmp/x", "x")
        with pytest.raises(AuthenticationException):
            intruder.files.list("/")
        assert intruder.is_running() is True  # /health is open, as on E2B
    assert sbx.commands.run("true").exit_code == 0


def test_bad_api_key_is_refused():
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="not-a-key-of-this-daemon").next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.get_info("anything", api_key="not-a-key-of-this-daemon")


def test_kill(other):
    assert other.kill() is True
    assert Sandbox.kill(other.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        other.get_info()
    with pytest.raises(SandboxNotRunningException):
        other.commands.run("true")
    assert other.is_running() is False


def test_unknown_sandboxes_get_the_status_the_sdk_expects():
    missing = "sb-00000000"
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(missing)
    assert Sandbox.kill(missing) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(missing, 60)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.fork(missing, count=1)
    ghost = Sandbox(
        sandbox_id=missing,
        sandbox_domain=None,
        envd_version=Version("0.6.4"),
        envd_access_token="whatever",
        traffic_access_token=None,
        connection_config=ConnectionConfig(
            extra_sandbox_headers={"E2b-Sandbox-Id": missing, "E2b-Sandbox-Port": "49983", "X-Access-Token": "whatever"}
        ),
    )
    assert ghost.is_running() is False
    with pytest.raises(SandboxNotRunningException):
        ghost.commands.run("true")
    with pytest.raises(SandboxNotRunningException):
        ghost.files.read("/etc/hostname")


def test_the_daemon_kills_a_sandbox_at_its_timeout(killer):
    short = killer.add(Sandbox.create(timeout=8, metadata={"suite": SUITE, "name": "ttl"}, request_timeout=REQUEST_TIMEOUT))
    info = Sandbox.get_info(short.sandbox_id)
    assert info.end_at - datetime.now(timezone.utc) <= timedelta(seconds=8)
    # No call reaches the sandbox meanwhile: the daemon's own clock kills it.
    time.sleep(max(0, (info.end_at - datetime.now(timezone.utc)).total_seconds()) + 3)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(short.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        short.get_info()
    assert short.sandbox_id not in [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": SUITE})).next_items()]


def test_unknown_template_is_refused():
    with pytest.raises(SandboxException) as refused:
        Sandbox.create(template="no-such-template-or-image", request_timeout=REQUEST_TIMEOUT)
    assert refused.value.status_code in (400, 404)


def test_code_interpreter_contexts_keep_state_into_forks(killer):
    from e2b_code_interpreter import Sandbox as CodeSandbox

    ci = killer.add(CodeSandbox.create(template="debian-python", timeout=600, request_timeout=REQUEST_TIMEOUT))
    first = ci.run_code("x = 41; print('set')", timeout=slow(120))
    assert first.logs.stdout == ["set\n"], first
    assert ci.run_code("x + 1").text == "42"
    failed = ci.run_code("1/0")
    assert failed.error is not None and failed.error.name == "ZeroDivisionError"
    arrivals = []
    ci.run_code(
        "import time; print('a', flush=True); time.sleep(3); print('b')",
        on_stdout=lambda m: arrivals.append((m.line, time.monotonic())),
    )
    assert [line for line, _ in arrivals] == ["a\n", "b\n"]
    assert arrivals[1][1] - arrivals[0][1] > 1.5, "run_code output arrived only when the cell ended"

    ctx = ci.create_code_context(cwd="/tmp")
    assert ctx.id in [c.id for c in ci.list_code_contexts()]
    ci.run_code("in_ctx = 1", context=ctx)
    assert ci.run_code("in_ctx", context=ctx).text == "1"
    assert ci.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    assert ci.run_code("in_ctx").error.name == "NameError"  # the default context is another interpreter

    children = ci.fork(count=1, timeout=600, request_timeout=REQUEST_TIMEOUT)
    for child in children:
        if not isinstance(child, Exception):
            killer.add(child)
    assert not [c for c in children if isinstance(c, Exception)], children
    child = children[0]
    assert child.run_code("x").text == "41"
    assert child.run_code("in_ctx", context=ctx).text == "1"
    assert child.kill() is True

    ci.restart_code_context(ctx)
    assert ci.run_code("in_ctx", context=ctx).error.name == "NameError"
    ci.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in ci.list_code_contexts()]
    assert ci.run_code("x").text == "41"
    assert ci.kill() is True
