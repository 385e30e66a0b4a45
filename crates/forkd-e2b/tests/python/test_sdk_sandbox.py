"""The published `e2b` SDK, unchanged, against a real forkd daemon with real
guests (issue 13, item 6). Only E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY
point it at forkd; see conftest.py for the environment. Each test kills what
it creates."""

import time
from datetime import timedelta

import pytest
from e2b import (
    AuthenticationException,
    FileNotFoundException,
    FileType,
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
)
from e2b.connection_config import ConnectionConfig
from e2b.sandbox.commands.command_handle import CommandExitException
from packaging.version import Version

from conftest import daemon_required, slow

pytestmark = pytest.mark.usefixtures("_daemon")

REQUEST_TIMEOUT = slow(180)  # create and fork boot guests under TCG


@pytest.fixture
def _daemon():
    daemon_required()


def create(killer, template, **kw):
    kw.setdefault("timeout", int(slow(600)))
    return killer.add(Sandbox.create(template=template, request_timeout=REQUEST_TIMEOUT, **kw))


def with_token(sbx, token):
    """The same sandbox, reached with another envd access token (None: no
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


# --- create, commands ------------------------------------------------------


def test_create_with_envs_and_metadata(killer, template, unique):
    sbx = create(killer, template, envs={"FORKD_GREETING": "hello from create"}, metadata={"suite": unique})
    assert sbx.sandbox_id
    result = sbx.commands.run("echo \"$FORKD_GREETING\"")
    assert result.stdout == "hello from create\n"
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.metadata == {"suite": unique}
    assert info.state == SandboxState.RUNNING
    assert info.template_id == template


def test_commands_run_stdout_stderr_exit_code_envs_cwd(killer, template):
    sbx = create(killer, template)
    ok = sbx.commands.run("echo out; echo err >&2")
    assert (ok.stdout, ok.stderr, ok.exit_code, ok.error) == ("out\n", "err\n", 0, None)
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo partial; echo bad >&2; exit 3")
    assert (failed.value.stdout, failed.value.stderr, failed.value.exit_code) == ("partial\n", "bad\n", 3)
    scoped = sbx.commands.run("echo \"$ONLY_HERE\"; pwd", envs={"ONLY_HERE": "x y"}, cwd="/tmp")
    assert scoped.stdout == "x y\n/tmp\n"
    assert sbx.commands.run("echo \"[$ONLY_HERE]\"").stdout == "[]\n"
    # bash -l -c: the SDK always runs /bin/bash.
    assert sbx.commands.run("echo $BASH_VERSION").stdout.strip() != ""


def test_output_streams_as_it_happens(killer, template):
    sbx = create(killer, template)
    arrivals = []
    sbx.commands.run(
        "echo first; sleep 3; echo second",
        on_stdout=lambda line: arrivals.append((line, time.monotonic())),
        timeout=slow(60),
    )
    assert [line for line, _ in arrivals] == ["first\n", "second\n"]
    assert arrivals[1][1] - arrivals[0][1] > 1.5, "output arrived only when the command ended"


def test_background_stdin_and_kill(killer, template):
    sbx = create(killer, template)
    cat = sbx.commands.run("cat", background=True, stdin=True, timeout=0)
    assert cat.pid > 0
    cat.send_stdin("ping\n")
    cat.send_stdin(b"pong\n")
    cat.close_stdin()
    done = cat.wait()
    assert (done.stdout, done.exit_code) == ("ping\npong\n", 0)

    sleeper = sbx.commands.run("sleep 600", background=True, timeout=0)
    assert sleeper.pid in [p.pid for p in sbx.commands.list()]
    # A second client attaches to the running process, then it is killed.
    attached = sbx.commands.connect(sleeper.pid, timeout=0)
    assert attached.pid == sleeper.pid
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException) as killed:
        sleeper.wait()
    assert killed.value.exit_code == -1
    wait_until(lambda: sleeper.pid not in [p.pid for p in sbx.commands.list()], 30, "the killed process to leave the list")
    assert sbx.commands.kill(sleeper.pid) is False
    with pytest.raises(NotFoundException):
        sbx.commands.connect(sleeper.pid)


def test_background_process_survives_disconnect_and_reconnect(killer, template):
    sbx = create(killer, template)
    handle = sbx.commands.run("sleep 2; echo after-disconnect", background=True, timeout=0)
    handle.disconnect()
    again = sbx.commands.connect(handle.pid, timeout=slow(60))
    assert again.wait().stdout == "after-disconnect\n"


# --- files -------------------------------------------------------------------


def test_files_write_read_list_make_dir_remove_stat(killer, template):
    sbx = create(killer, template)
    info = sbx.files.write("/tmp/forkd-e2b/deep/a.txt", "hello\n")
    assert (info.name, info.path, info.type) == ("a.txt", "/tmp/forkd-e2b/deep/a.txt", FileType.FILE)
    assert sbx.files.read("/tmp/forkd-e2b/deep/a.txt") == "hello\n"
    blob = bytes(range(256)) * 1024
    sbx.files.write("/tmp/forkd-e2b/blob.bin", blob)
    assert bytes(sbx.files.read("/tmp/forkd-e2b/blob.bin", format="bytes")) == blob
    assert bytes(sbx.files.read("/tmp/forkd-e2b/blob.bin", format="bytes", gzip=True)) == blob
    sbx.files.write("/tmp/forkd-e2b/gz.txt", b"compressed upload", gzip=True)
    assert sbx.files.read("/tmp/forkd-e2b/gz.txt") == "compressed upload"
    written = sbx.files.write_files([
        {"path": "/tmp/forkd-e2b/m1.txt", "data": "one"},
        {"path": "/tmp/forkd-e2b/m2.txt", "data": b"two"},
    ])
    assert sorted(w.path for w in written) == ["/tmp/forkd-e2b/m1.txt", "/tmp/forkd-e2b/m2.txt"]
    # The guest sees what the SDK wrote.
    assert sbx.commands.run("cat /tmp/forkd-e2b/m1.txt /tmp/forkd-e2b/m2.txt").stdout == "onetwo"

    entries = {e.name: e for e in sbx.files.list("/tmp/forkd-e2b")}
    assert set(entries) == {"deep", "blob.bin", "gz.txt", "m1.txt", "m2.txt"}
    assert entries["deep"].type == FileType.DIR
    assert (entries["blob.bin"].type, entries["blob.bin"].size) == (FileType.FILE, len(blob))
    deep = {e.path for e in sbx.files.list("/tmp/forkd-e2b", depth=2)}
    assert "/tmp/forkd-e2b/deep/a.txt" in deep

    stat = sbx.files.get_info("/tmp/forkd-e2b/deep/a.txt")
    assert (stat.name, stat.type, stat.size, stat.path) == ("a.txt", FileType.FILE, 6, "/tmp/forkd-e2b/deep/a.txt")
    assert stat.permissions.startswith("-rw") and stat.mode & 0o600 == 0o600
    assert stat.owner and stat.group
    assert abs(stat.modified_time.timestamp() - time.time()) < 3600

    assert sbx.files.make_dir("/tmp/forkd-e2b/new/nested") is True
    assert sbx.files.make_dir("/tmp/forkd-e2b/new/nested") is False
    assert sbx.files.get_info("/tmp/forkd-e2b/new").type == FileType.DIR

    moved = sbx.files.rename("/tmp/forkd-e2b/m1.txt", "/tmp/forkd-e2b/new/m1.txt")
    assert moved.path == "/tmp/forkd-e2b/new/m1.txt"
    assert sbx.files.exists("/tmp/forkd-e2b/m1.txt") is False

    sbx.files.remove("/tmp/forkd-e2b/new")
    assert sbx.files.exists("/tmp/forkd-e2b/new") is False
    assert sbx.files.exists("/tmp/forkd-e2b/deep/a.txt") is True
    with pytest.raises(FileNotFoundException):
        sbx.files.read("/tmp/forkd-e2b/no-such-file")
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info("/tmp/forkd-e2b/no-such-file")


def test_watch_dir_reports_new_files(killer, template):
    sbx = create(killer, template)
    sbx.files.make_dir("/tmp/watched")
    watcher = sbx.files.watch_dir("/tmp/watched")
    sbx.files.write("/tmp/watched/new.txt", "x")
    events = []
    wait_until(lambda: events.extend(watcher.get_new_events()) or any(e.name == "new.txt" for e in events), 30, "a watch event")
    watcher.stop()


# --- info, list, timeout -------------------------------------------------------


def test_get_info_list_and_set_timeout(killer, template, unique):
    a = create(killer, template, metadata={"suite": unique, "name": "a"}, timeout=int(slow(300)))
    b = create(killer, template, metadata={"suite": unique, "name": "b"}, timeout=int(slow(300)))
    info = a.get_info()
    lifetime = info.end_at - info.started_at
    assert timedelta(seconds=slow(300) - 60) <= lifetime <= timedelta(seconds=slow(300) + 60)

    pages = Sandbox.list(query=SandboxQuery(metadata={"suite": unique}), limit=1)
    seen = []
    while pages.has_next:
        page = pages.next_items()
        assert len(page) <= 1
        seen.extend(page)
    assert sorted(s.sandbox_id for s in seen) == sorted([a.sandbox_id, b.sandbox_id])
    only_a = Sandbox.list(query=SandboxQuery(metadata={"suite": unique, "name": "a"})).next_items()
    assert [s.sandbox_id for s in only_a] == [a.sandbox_id]

    a.set_timeout(int(slow(900)))
    later = a.get_info().end_at
    assert later - info.end_at > timedelta(seconds=slow(300))
    a.set_timeout(int(slow(120)))
    assert a.get_info().end_at < later


def test_timeout_kills_the_sandbox(killer, template):
    sbx = create(killer, template, timeout=int(slow(20)))

    def gone():
        try:
            sbx.get_info()
            return False
        except SandboxNotFoundException:
            return True

    wait_until(gone, 120, "the daemon to kill the sandbox at its timeout")
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("true")


def test_set_timeout_shortens_the_life(killer, template):
    sbx = create(killer, template, timeout=int(slow(900)))
    sbx.set_timeout(int(slow(10)))
    wait_until(lambda: not sbx.is_running(), 120, "the shortened timeout to kill the sandbox")


# --- pause and resume ----------------------------------------------------------


def test_pause_then_connect_resumes_with_memory(killer, template):
    sbx = create(killer, template)
    sbx.files.write("/tmp/state.txt", "kept")
    sleeper = sbx.commands.run("sleep 900", background=True, timeout=0)
    assert sbx.pause() is True
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    assert sbx.pause() is False  # already paused: 409
    resumed = Sandbox.connect(sbx.sandbox_id, request_timeout=REQUEST_TIMEOUT)
    assert resumed.sandbox_id == sbx.sandbox_id
    assert resumed.get_info().state == SandboxState.RUNNING
    assert resumed.files.read("/tmp/state.txt") == "kept"
    # Memory was kept: the process from before the pause still runs.
    assert sleeper.pid in [p.pid for p in resumed.commands.list()]


def test_connect_to_a_running_sandbox_from_another_client(killer, template):
    sbx = create(killer, template)
    other = Sandbox.connect(sbx.sandbox_id, request_timeout=REQUEST_TIMEOUT)
    assert other.sandbox_id == sbx.sandbox_id
    assert other.commands.run("echo hi").stdout == "hi\n"


# --- fork ------------------------------------------------------------------------


def test_fork_three_children_see_the_parents_files_and_processes(killer, template):
    parent = create(killer, template)
    parent.files.write("/tmp/parent.txt", "from the parent")
    daemon = parent.commands.run("sleep 900", background=True, timeout=0)
    children = parent.fork(count=3, timeout=int(slow(600)), request_timeout=REQUEST_TIMEOUT)
    for child in children:
        if isinstance(child, Sandbox):
            killer.add(child)
    assert len(children) == 3
    errors = [c for c in children if isinstance(c, Exception)]
    assert not errors, errors
    ids = {c.sandbox_id for c in children}
    assert len(ids) == 3 and parent.sandbox_id not in ids

    for i, child in enumerate(children):
        assert child.files.read("/tmp/parent.txt") == "from the parent"
        assert daemon.pid in [p.pid for p in child.commands.list()], "the parent's process is not in the child"
        child.files.write("/tmp/child.txt", f"child {i}")
    # Each child wrote its own disk: siblings and the parent do not see it.
    for i, child in enumerate(children):
        assert child.files.read("/tmp/child.txt") == f"child {i}"
    assert parent.files.exists("/tmp/child.txt") is False
    # The parent keeps running under its own id, its process untouched.
    assert parent.get_info().state == SandboxState.RUNNING
    assert daemon.pid in [p.pid for p in parent.commands.list()]


# --- kill, auth, unknown sandboxes --------------------------------------------------


def test_kill(killer, template):
    sbx = create(killer, template)
    assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        sbx.get_info()
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("true")
    assert sbx.is_running() is False


def test_bad_api_key_is_refused():
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="not-a-key-of-this-daemon", request_timeout=REQUEST_TIMEOUT)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="not-a-key-of-this-daemon").next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.get_info("anything", api_key="not-a-key-of-this-daemon")


def test_bad_envd_tokens_are_refused(killer, template):
    sbx = create(killer, template)
    other = create(killer, template)
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
        # /health is open, as on E2B.
        assert intruder.is_running() is True
    assert sbx.commands.run("true").exit_code == 0


def test_unknown_sandboxes_get_the_status_the_sdk_expects():
    missing = "sb-00000000"
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(missing)
    assert Sandbox.kill(missing) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(missing, 60)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.pause(missing)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(missing)
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


def test_unknown_template_is_refused():
    with pytest.raises(SandboxException) as refused:
        Sandbox.create(template="no-such-template-or-image", request_timeout=REQUEST_TIMEOUT)
    assert refused.value.status_code in (400, 404)
