"""The published `e2b-code-interpreter` SDK, unchanged, against a real forkd
daemon (issue 13, item 5): run_code on port 49999 of a guest with stateful
contexts, and the state inherited by every fork child. Environment: see
conftest.py (FORKD_E2B_CI_TEMPLATE names an image or snapshot whose guest runs
guest/code_interpreter.py)."""

import pytest
from e2b_code_interpreter import Sandbox

from conftest import daemon_required, slow

REQUEST_TIMEOUT = slow(180)


@pytest.fixture(autouse=True)
def _daemon():
    daemon_required()


def create(killer, ci_template):
    return killer.add(Sandbox.create(template=ci_template, timeout=int(slow(600)), request_timeout=REQUEST_TIMEOUT))


def test_run_code_is_stateful(killer, ci_template):
    sbx = create(killer, ci_template)
    first = sbx.run_code("x = 20\nprint('set')", timeout=slow(60))
    assert first.error is None and first.logs.stdout == ["set\n"]
    assert sbx.run_code("x * 2 + 2", timeout=slow(60)).text == "42"
    err = sbx.run_code("undefined_name", timeout=slow(60)).error
    assert err.name == "NameError"
    assert sbx.run_code("import os\nos.environ['E2B_X']", envs={"E2B_X": "1"}, timeout=slow(60)).text == "1"


def test_contexts(killer, ci_template):
    sbx = create(killer, ci_template)
    ctx = sbx.create_code_context(cwd="/tmp")
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]
    sbx.run_code("in_ctx = 1", context=ctx, timeout=slow(60))
    assert sbx.run_code("in_ctx", context=ctx, timeout=slow(60)).text == "1"
    assert sbx.run_code("in_ctx", timeout=slow(60)).error.name == "NameError"
    sbx.restart_code_context(ctx)
    assert sbx.run_code("in_ctx", context=ctx, timeout=slow(60)).error.name == "NameError"
    sbx.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]


def test_forks_inherit_the_interpreters_variables(killer, ci_template):
    parent = create(killer, ci_template)
    parent.run_code("warm = {'model': 'loaded', 'n': 7}", timeout=slow(60))
    children = parent.fork(count=3, timeout=int(slow(600)), request_timeout=REQUEST_TIMEOUT)
    for child in children:
        if not isinstance(child, Exception):
            killer.add(child)
    assert not [c for c in children if isinstance(c, Exception)], children
    for i, child in enumerate(children):
        assert child.run_code("warm['n']", timeout=slow(60)).text == "7"
        child.run_code(f"warm['n'] = {100 + i}", timeout=slow(60))
    # Each child's interpreter is its own from the fork on.
    for i, child in enumerate(children):
        assert child.run_code("warm['n']", timeout=slow(60)).text == str(100 + i)
    assert parent.run_code("warm['n']", timeout=slow(60)).text == "7"
