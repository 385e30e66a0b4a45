"""The published forkd 0.5.3 client's Controller against this daemon.

Run by crates/forkd-cli/tests/legacy_client.rs, which starts the daemon
on TCP with a token and boots snapshot `py` (debian-python) for it.
"""

import os

import pytest
from forkd.controller import Controller, ControllerError


@pytest.fixture
def ctl():
    return Controller(os.environ["FORKD_URL"], token=os.environ["FORKD_TEST_TOKEN"])


def test_a_wrong_token_is_refused():
    bad = Controller(os.environ["FORKD_URL"], token="not-the-token-0123456789")
    with pytest.raises(ControllerError) as e:
        bad.list_snapshots()
    assert e.value.status == 401


def test_spawn_exec_eval_branch_and_clean_up(ctl):
    assert "py" in [s["tag"] for s in ctl.list_snapshots()]
    kids = ctl.spawn_sandboxes("py", n=2)
    assert len(kids) == 2 and all(k["snapshot_tag"] == "py" for k in kids)
    a, b = kids[0]["id"], kids[1]["id"]
    assert ctl.get_sandbox(a)["id"] == a
    assert ctl.ping_sandbox(a)["pong"] is True

    out = ctl.exec_command(a, ["sh", "-c", "echo hi; exit 3"])
    assert (out["stdout"], out["exit_code"]) == ("hi\n", 3)

    # eval keeps state per sandbox, returns repr() of a final expression.
    r = ctl.eval_code(a, "x = 41\nprint('set')")
    assert (r["result"], r["error"], r["exit_code"]) == (None, None, 0)
    assert r["stdout"] == "set\n"
    r = ctl.eval_code(a, "x + 1")
    assert (r["result"], r["exit_code"]) == ("42", 0)
    r = ctl.eval_code(a, "'text'")
    assert r["result"] == "'text'"
    r = ctl.eval_code(a, "1/0")
    assert r["exit_code"] == 1 and "ZeroDivisionError" in r["error"]
    assert r["exception"]["name"] == "ZeroDivisionError"
    # Siblings do not share state.
    r = ctl.eval_code(b, "x")
    assert r["exit_code"] == 1 and "NameError" in r["error"]

    # A live branch carries the interpreter's state into its children.
    snap = ctl.branch_sandbox(a, tag="py-a", mode="live")
    assert snap["status"] == "ready" and snap["branched_from"] == a
    (grandkid,) = ctl.spawn_sandboxes("py-a", n=1)
    r = ctl.eval_code(grandkid["id"], "x * 2")
    assert (r["result"], r["exit_code"]) == ("82", 0), r

    for s in (a, b, grandkid["id"]):
        ctl.kill_sandbox(s)
    with pytest.raises(ControllerError) as e:
        ctl.get_sandbox(a)
    assert e.value.status == 404
    ctl.delete_snapshot("py-a")
    assert "py-a" not in [s["tag"] for s in ctl.list_snapshots()]
