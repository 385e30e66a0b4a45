"""forkd's MCP server driven by the official MCP Python client (`mcp` on
PyPI), over both transports, against real guests.

Environment (set by crates/forkd-mcp/tests/mcp_client.rs):
  FORKD_BIN       the forkd binary (stdio transport: `forkd mcp`)
  FORKD_MCP_URL   the daemon's streamable HTTP endpoint (http://127.0.0.1:PORT/mcp)
  FORKD_MCP_TOKEN the daemon's bearer token
  FORKD_HOME, FORKD_RUNTIME_DIR   the test's private state (inherited by `forkd mcp`)
"""

import json
import os

import anyio
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client


def structured(result):
    """The tool's JSON result, or a failure with the tool's error text."""
    if result.is_error:
        text = " ".join(getattr(c, "text", "") for c in result.content)
        raise AssertionError(f"tool error: {text}")
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


def error_text(result):
    assert result.is_error, result
    return " ".join(getattr(c, "text", "") for c in result.content)


async def workflow(session: ClientSession):
    await session.initialize()
    tools = {t.name: t for t in (await session.list_tools()).tools}
    for name in [
        "create_sandbox", "run_command", "write_file", "read_file", "list_files",
        "branch_sandbox", "spawn_sandboxes", "kill_sandbox",
        "list_sandboxes", "list_snapshots",
    ]:
        assert name in tools, name
        assert tools[name].description, name
        assert tools[name].input_schema["type"] == "object", name

    sb = structured(await session.call_tool(
        "create_sandbox",
        {"ttl_secs": 3600, "labels": {"agent": "mcp"}, "env": {"WHO": "mcp"}, "cwd": "/tmp"},
    ))
    sid = sb["sandbox_id"]
    try:
        assert sb["labels"] == {"agent": "mcp"}, sb
        assert sb["ends_at_ms"] > 0, sb
        r = structured(await session.call_tool("run_command", {"sandbox_id": sid, "command": "echo $WHO; pwd"}))
        assert r["stdout"] == "mcp\n/tmp\n", r
        w = structured(await session.call_tool(
            "write_file",
            {"sandbox_id": sid, "path": "/work/app/hello.sh", "content": "echo hello from $1\n", "mode": 0o755},
        ))
        assert w["bytes"] == len("echo hello from $1\n")
        r = structured(await session.call_tool(
            "run_command", {"sandbox_id": sid, "command": "sh /work/app/hello.sh mcp; echo oops >&2; exit 3"}))
        assert (r["stdout"], r["stderr"], r["exit_code"], r["timed_out"]) == ("hello from mcp\n", "oops\n", 3, False)
        r = structured(await session.call_tool("run_command", {"sandbox_id": sid, "command": "no-such-command"}))
        assert r["exit_code"] == 127, r
        r = structured(await session.call_tool(
            "run_command", {"sandbox_id": sid, "command": "sleep 30", "timeout_secs": 2}))
        assert (r["timed_out"], r["exit_code"]) == (True, 124), r
        r = structured(await session.call_tool(
            "run_command", {"sandbox_id": sid, "command": "head -c 200000 /dev/zero | tr '\\0' x"}))
        assert r["truncated"] and "more bytes of stdout not shown" in r["stdout"], r["stdout"][-80:]
        f = structured(await session.call_tool("read_file", {"sandbox_id": sid, "path": "/work/app/hello.sh"}))
        assert (f["content"], f["base64"]) == ("echo hello from $1\n", False)
        ls = structured(await session.call_tool("list_files", {"sandbox_id": sid, "path": "/work", "depth": 2}))
        assert [(e["path"], e["type"]) for e in ls["entries"]] == [
            ("/work/app", "dir"), ("/work/app/hello.sh", "file")], ls
        assert ls["entries"][1]["permissions"] == "-rwxr-xr-x", ls
        e = error_text(await session.call_tool("list_files", {"sandbox_id": sid, "path": "/nope"}))
        assert "/nope" in e, e

        # Fork: warm state in memory, then children that see it.
        structured(await session.call_tool(
            "run_command", {"sandbox_id": sid, "command": "echo warm > /tmp/state"}))
        b = structured(await session.call_tool("branch_sandbox", {"sandbox_id": sid}))
        assert b["status"] == "ready" and b["pause_ms"] > 0, b
        snaps = structured(await session.call_tool("list_snapshots", {}))["snapshots"]
        assert any(s["snapshot"] == b["snapshot"] for s in snaps), snaps
        kids = structured(await session.call_tool("spawn_sandboxes", {"snapshot": b["snapshot"], "count": 2}))
        assert len(kids["sandbox_ids"]) == 2 and not kids["errors"], kids
        for k in kids["sandbox_ids"]:
            r = structured(await session.call_tool("run_command", {"sandbox_id": k, "command": "cat /tmp/state"}))
            assert r["stdout"] == "warm\n", r
        listed = {s["sandbox_id"] for s in structured(await session.call_tool("list_sandboxes", {}))["sandboxes"]}
        assert {sid, *kids["sandbox_ids"]} <= listed
        for k in kids["sandbox_ids"]:
            assert structured(await session.call_tool("kill_sandbox", {"sandbox_id": k}))["killed"]

        # Errors are tool errors that say what to call.
        e = error_text(await session.call_tool("run_command", {"sandbox_id": "sb-nope", "command": "true"}))
        assert "no sandbox `sb-nope`" in e and "list_sandboxes" in e, e
        e = error_text(await session.call_tool("spawn_sandboxes", {"snapshot": "no-such-tag", "count": 1}))
        assert "no snapshot" in e and "list_snapshots" in e, e
        e = error_text(await session.call_tool("write_file", {"sandbox_id": sid, "path": "relative", "content": ""}))
        assert "absolute" in e, e
    finally:
        await session.call_tool("kill_sandbox", {"sandbox_id": sid})


def test_stdio():
    async def main():
        params = StdioServerParameters(command=os.environ["FORKD_BIN"], args=["mcp"], env=dict(os.environ))
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await workflow(session)
    anyio.run(main)


def test_streamable_http():
    async def main():
        headers = {"Authorization": f"Bearer {os.environ['FORKD_MCP_TOKEN']}"}
        async with httpx2.AsyncClient(headers=headers, timeout=300) as http:
            async with streamable_http_client(os.environ["FORKD_MCP_URL"], http_client=http) as streams:
                read, write = streams[0], streams[1]
                async with ClientSession(read, write) as session:
                    await workflow(session)
    anyio.run(main)


def test_streamable_http_needs_the_token():
    r = httpx2.post(os.environ["FORKD_MCP_URL"], json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert r.status_code == 401, r.text
