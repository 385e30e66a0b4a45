"""The guest's code interpreter (guest/code_interpreter.py), run on this host
with a stdlib-only python3, driven by the published e2b-code-interpreter SDK
(its own `run_code`, `create_code_context`, … — see conftest.local_code_sandbox).
Runs without forkd: `pytest crates/forkd-e2b/tests/python/test_code_interpreter_local.py`."""

import os
import time

import pytest
from e2b import NotFoundException, SandboxException, TimeoutException

from conftest import local_code_sandbox


@pytest.fixture(scope="module")
def sbx(interpreter_url):
    url, _home = interpreter_url
    return local_code_sandbox(url)


def test_variables_survive_between_calls_and_the_last_expression_is_the_result(sbx):
    first = sbx.run_code("counter = 41\ndef bump(n):\n    return n + 1")
    assert first.error is None and first.results == []
    second = sbx.run_code("bump(counter)")
    assert second.error is None
    assert second.text == "42"
    assert [r.is_main_result for r in second.results] == [True]
    assert second.execution_count == first.execution_count + 1
    # `_` holds the last value, as in IPython.
    assert sbx.run_code("_ * 2").text == "84"


def test_a_final_string_loses_its_quotes_as_with_e2bs_server(sbx):
    assert sbx.run_code("'hello'").text == "hello"
    assert sbx.run_code("[1, 'a']").text == "[1, 'a']"
    # A statement, or an expression that is None, gives no result.
    assert sbx.run_code("x = 1").results == []
    assert sbx.run_code("None").results == []


def test_stdout_and_stderr_stream_as_they_happen(sbx):
    arrivals = []
    execution = sbx.run_code(
        "import sys, time\nprint('first')\ntime.sleep(1.5)\nprint('second', file=sys.stderr)\n'done'",
        on_stdout=lambda m: arrivals.append(("out", m.line, time.monotonic())),
        on_stderr=lambda m: arrivals.append(("err", m.line, time.monotonic())),
    )
    assert execution.logs.stdout == ["first\n"]
    assert execution.logs.stderr == ["second\n"]
    assert execution.text == "done"
    (k1, l1, t1), (k2, l2, t2) = arrivals
    assert (k1, l1, k2, l2) == ("out", "first\n", "err", "second\n")
    # Had the output been buffered to the end, both would arrive together.
    assert t2 - t1 > 0.5, arrivals


def test_output_of_subprocesses_is_captured_before_the_end(sbx):
    execution = sbx.run_code(
        "import subprocess\nsubprocess.run(['sh', '-c', 'echo from-child; echo child-err >&2'])\n7"
    )
    assert "from-child\n" in "".join(execution.logs.stdout)
    assert "child-err\n" in "".join(execution.logs.stderr)
    assert execution.text == "7"


def test_errors_have_name_value_and_traceback_and_keep_the_state(sbx):
    sbx.run_code("kept = 'yes'")
    execution = sbx.run_code("def f():\n    return 1 / 0\nf()")
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"
    assert execution.error.value == "division by zero"
    assert "return 1 / 0" in execution.error.traceback
    assert "code_interpreter.py" not in execution.error.traceback
    assert sbx.run_code("kept").text == "yes"
    syntax = sbx.run_code("def (:")
    assert syntax.error.name == "SyntaxError"


def test_rich_results_and_display(sbx):
    execution = sbx.run_code(
        "class Page:\n"
        "    def _repr_html_(self):\n        return '<b>hi</b>'\n"
        "    def __repr__(self):\n        return 'Page()'\n"
        "display(Page())\nPage()"
    )
    assert len(execution.results) == 2
    shown, main = execution.results
    assert (shown.is_main_result, shown.html, shown.text) == (False, "<b>hi</b>", "Page()")
    assert (main.is_main_result, main.html) == (True, "<b>hi</b>")


def test_env_vars_apply_to_one_execution(sbx):
    assert sbx.run_code("import os\nos.environ.get('FORKD_CI_VAR')", envs={"FORKD_CI_VAR": "v1"}).text == "v1"
    assert sbx.run_code("import os\nos.environ.get('FORKD_CI_VAR')").results == []


def test_contexts_are_separate_interpreters(sbx, interpreter_url, tmp_path):
    _url, home = interpreter_url
    ctx = sbx.create_code_context(cwd=str(tmp_path), language="python")
    assert (ctx.language, ctx.cwd) == ("python", str(tmp_path))
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]
    assert sbx.run_code("import os\nos.getcwd()", context=ctx).text == str(tmp_path)
    assert sbx.run_code("import os\nos.getcwd()").text == home
    sbx.run_code("only_here = 1", context=ctx)
    assert sbx.run_code("only_here", context=ctx).text == "1"
    assert sbx.run_code("only_here").error.name == "NameError"
    sbx.restart_code_context(ctx)
    assert sbx.run_code("only_here", context=ctx).error.name == "NameError"
    sbx.remove_code_context(ctx.id)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=ctx)


def test_language_python_is_the_default_context_and_others_are_refused(sbx):
    sbx.run_code("shared = 5")
    assert sbx.run_code("shared", language="python").text == "5"
    with pytest.raises(SandboxException, match="400"):
        sbx.run_code("1", language="javascript")


def test_an_abandoned_execution_is_interrupted_and_the_context_lives_on(sbx):
    sbx.run_code("survivor = 'still here'")
    with pytest.raises(TimeoutException):
        sbx.run_code("import time\ntime.sleep(60)", timeout=2)
    # Had the server not interrupted the sleep when the SDK hung up, this
    # would wait behind it and time out too.
    assert sbx.run_code("survivor", timeout=20).text == "still here"


def test_a_cell_that_kills_its_interpreter_gets_an_error_and_a_fresh_one(sbx):
    sbx.run_code("doomed = 1")
    execution = sbx.run_code("import os\nos._exit(3)")
    assert execution.error.name == "ContextRestarted"
    assert sbx.run_code("1 + 1").text == "2"
    assert sbx.run_code("doomed").error.name == "NameError"


def test_server_side_timeout_interrupts_the_cell(interpreter_url):
    # The SDK sends no timeout; forkd's server also takes one in the body
    # (forkd extension). Replicates the SDK's request
    # (e2b_code_interpreter/code_interpreter_sync.py, Sandbox.run_code) with
    # the extra field.
    import httpx

    url, _home = interpreter_url
    with httpx.Client(timeout=30) as client:
        with client.stream(
            "POST",
            f"{url}/execute",
            json={"code": "import time\ntime.sleep(30)", "context_id": None, "language": None, "env_vars": None, "timeout": 1},
            headers={"E2b-Sandbox-Id": "local", "E2b-Sandbox-Port": "49999"},
        ) as response:
            assert response.status_code == 200
            started = time.monotonic()
            lines = [line for line in response.iter_lines()]
            elapsed = time.monotonic() - started
    import json

    types = [json.loads(line)["type"] for line in lines]
    assert types[0] == "number_of_executions" and types[-1] == "end_of_execution"
    errors = [json.loads(line) for line in lines if json.loads(line)["type"] == "error"]
    assert errors and errors[0]["name"] == "KeyboardInterrupt"
    assert elapsed < 25, "the cell ran to its end instead of being interrupted"


def test_bad_requests_are_refused_without_hurting_the_server(interpreter_url):
    import httpx

    url, _home = interpreter_url
    with httpx.Client(timeout=10) as client:
        assert client.post(f"{url}/execute", content=b"{not json").status_code == 400
        assert client.post(f"{url}/execute", json={"code": 5}).status_code == 400
        assert client.post(f"{url}/execute", json={"code": "1", "context_id": "c", "language": "python"}).status_code == 400
        assert client.post(f"{url}/execute", json={"code": "1", "env_vars": {"A": 1}}).status_code == 400
        assert client.post(f"{url}/contexts", json={"cwd": "/no/such/dir"}).status_code == 400
        assert client.post(f"{url}/contexts/nope/restart").status_code == 404
        assert client.delete(f"{url}/contexts/nope").status_code == 404
        assert client.get(f"{url}/nope").status_code == 404
        assert client.get(f"{url}/health").text == "OK"
    # A body announced over the limit is refused before it is read.
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{}" % (64 << 20))
        assert s.recv(64).startswith(b"HTTP/1.1 400")
    with httpx.Client(timeout=10) as client:
        assert client.get(f"{url}/health").text == "OK"
