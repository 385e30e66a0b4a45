#!/usr/bin/env python3
"""forkd's code interpreter: what `e2b-code-interpreter`'s `run_code` talks to
on port 49999 of a sandbox, for guests that have python3 and nothing else
(Python 3.11 standard library only; forkd's `debian-python` image).

HTTP/1.1 on 127.0.0.1 (the daemon relays port-49999 traffic into the guest;
nothing else should reach it). Routes, as the SDK calls them
(docs/e2b-protocol.md §9):

  POST   /execute              {"code", "context_id"?, "language"?, "env_vars"?,
                                "timeout"? (forkd extension, seconds)}
                                -> 200 application/x-ndjson, one JSON object a line,
                                   flushed as it happens:
                                   {"type":"number_of_executions","execution_count":N}
                                   {"type":"stdout"|"stderr","text":..,"timestamp":ISO}
                                   {"type":"result","text":..,"html":..,...,"is_main_result":bool}
                                   {"type":"error","name":..,"value":..,"traceback":..}
                                   {"type":"keepalive"} every 5 s of silence
                                   {"type":"end_of_execution"} last
  POST   /contexts             {"language"?, "cwd"?} -> {"id","language","cwd"}
  GET    /contexts             -> [{"id","language","cwd"}, ...]
  POST   /contexts/{id}/restart
  DELETE /contexts/{id}
  GET    /health               -> 200 "OK"

Each context is a persistent Python interpreter in its own worker process
(this file run with --worker), so variables, imports and functions defined in
one execution are there in the next, and one context's code cannot block or
crash another. The worker runs the cell like IPython does: the value of a
final expression becomes the main result (`text/plain` = its repr, plus the
`_repr_html_`/`_repr_png_`/… MIME forms it has, E2B's quote stripping on
text), `display(obj)` sends extra results, `_` holds the last value.
`print` output streams line by line as it happens, and so does anything the
cell's subprocesses write to the worker's file descriptors 1 and 2.

Timeouts: when the client goes away (the SDK's `timeout` expired) or the
request's own `timeout` passes, the worker gets SIGINT (KeyboardInterrupt in
the cell, state kept); if it does not stop within 5 s it is killed and the
context restarts empty. One execution runs per context at a time; others wait.

Languages other than Python are refused with 400: this server is Python only.
The worker processes are children of this server, so a memory snapshot of the
sandbox (forkd branch/fork) carries every context with its variables.
"""

import argparse
import ast
import base64
import datetime
import io
import json
import linecache
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 16 << 20  # largest request body (code) accepted
MAX_LINE = 64 << 20  # largest event line read from a worker
KEEPALIVE_SECONDS = 5.0
INTERRUPT_GRACE_SECONDS = 5.0
READ_CHUNK = 32 << 10
SENTINEL_PREFIX = b"\x00forkd-cell-end:"

# ----------------------------------------------------------------------------
# Worker: one persistent interpreter, driven over two pipes.
# ----------------------------------------------------------------------------


class _EventStream(io.TextIOBase):
    """sys.stdout / sys.stderr of a worker: text goes to the server as
    events, a line at a time (or when 4 KiB gather, or on flush)."""

    def __init__(self, name, emit):
        self._name = name
        self._emit = emit
        self._buf = []
        self._size = 0

    def writable(self):
        return True

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if not s:
            return 0
        self._buf.append(s)
        self._size += len(s)
        if "\n" in s or self._size >= 4096:
            self.flush()
        return len(s)

    def flush(self):
        if self._buf:
            text = "".join(self._buf)
            self._buf = []
            self._size = 0
            self._emit({"t": self._name, "text": text})

    @property
    def encoding(self):
        return "utf-8"

    def isatty(self):
        return False


def _mime_bundle(obj):
    """The IPython display protocol, as far as plain Python goes."""
    data = {}
    try:
        data["text/plain"] = repr(obj)
    except Exception as e:  # a broken __repr__ must not kill the cell
        data["text/plain"] = f"<repr failed: {type(e).__name__}: {e}>"
    for method, mime in (
        ("_repr_html_", "text/html"),
        ("_repr_markdown_", "text/markdown"),
        ("_repr_svg_", "image/svg+xml"),
        ("_repr_png_", "image/png"),
        ("_repr_jpeg_", "image/jpeg"),
        ("_repr_pdf_", "application/pdf"),
        ("_repr_latex_", "text/latex"),
        ("_repr_json_", "application/json"),
        ("_repr_javascript_", "application/javascript"),
    ):
        fn = getattr(obj, method, None)
        if fn is None or not callable(fn):
            continue
        try:
            value = fn()
        except Exception:
            continue
        if value is None:
            continue
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        data[mime] = value
    return data


def run_worker(cmd_fd, evt_fd):
    """The worker loop: read a JSON command a line from cmd_fd, run it,
    answer with JSON event lines on evt_fd."""
    cmd_in = os.fdopen(cmd_fd, "r", encoding="utf-8")
    evt_out = os.fdopen(evt_fd, "w", encoding="utf-8")
    lock = threading.Lock()

    def emit(event):
        line = json.dumps(event)
        with lock:
            evt_out.write(line + "\n")
            evt_out.flush()

    out = _EventStream("stdout", emit)
    err = _EventStream("stderr", emit)
    sys.stdout = out
    sys.stderr = err
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}

    def display(*objs, **_kwargs):
        out.flush()
        for obj in objs:
            emit({"t": "result", "data": _mime_bundle(obj), "main": False})

    namespace["display"] = display
    count = 0
    signal.signal(signal.SIGINT, signal.default_int_handler)
    emit({"t": "ready", "pid": os.getpid()})
    while True:
        try:
            line = cmd_in.readline()
        except KeyboardInterrupt:  # an interrupt that arrived between cells
            continue
        if not line:
            return
        try:
            cmd = json.loads(line)
        except ValueError:
            continue
        cell_id = cmd.get("id", "")
        count += 1
        emit({"t": "count", "count": count})
        saved_env = {}
        try:
            for k, v in (cmd.get("env_vars") or {}).items():
                saved_env[k] = os.environ.get(k)
                os.environ[str(k)] = str(v)
            _run_cell(cmd.get("code", ""), count, namespace, emit, out, err)
        except KeyboardInterrupt:
            # Interrupted outside the cell's own frames (e.g. while setting up).
            emit({"t": "error", "name": "KeyboardInterrupt", "value": "", "traceback": "KeyboardInterrupt"})
        finally:
            for k, old in saved_env.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old
            try:
                out.flush()
                err.flush()
                # Mark the end of this cell on the raw descriptors so the
                # server knows it has read everything subprocesses wrote.
                marker = SENTINEL_PREFIX + cell_id.encode() + b"\x00"
                os.write(1, marker)
                os.write(2, marker)
            except KeyboardInterrupt:
                pass
            emit({"t": "done", "count": count})


def _run_cell(code, count, namespace, emit, out, err):
    filename = f"<cell-{count}>"
    # Register the source so tracebacks show the cell's lines.
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        tree = ast.parse(code, filename=filename, mode="exec")
    except SyntaxError as e:
        _emit_error(e, emit, skip_frames=False)
        return
    last_expr = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last_expr = ast.Expression(tree.body.pop().value)
    try:
        if tree.body:
            exec(compile(tree, filename, "exec"), namespace)
        if last_expr is not None:
            value = eval(compile(last_expr, filename, "eval"), namespace)
            if value is not None:
                namespace["_"] = value
                out.flush()
                err.flush()
                emit({"t": "result", "data": _mime_bundle(value), "main": True})
    except BaseException as e:  # noqa: B902 - SystemExit and KeyboardInterrupt are cell errors too
        out.flush()
        err.flush()
        _emit_error(e, emit, skip_frames=True)


def _emit_error(e, emit, skip_frames):
    tb = e.__traceback__
    # Drop this file's own frames: the user sees their cell, not the worker.
    while skip_frames and tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(e), e, tb))
    emit({"t": "error", "name": type(e).__name__, "value": str(e), "traceback": text})


# ----------------------------------------------------------------------------
# Server side: contexts own workers; /execute relays their events as NDJSON.
# ----------------------------------------------------------------------------


class ExecutionFailed(Exception):
    pass


class Context:
    def __init__(self, context_id, language, cwd):
        self.id = context_id
        self.language = language
        self.cwd = cwd
        self.lock = threading.Lock()  # one execution at a time
        self.proc = None
        self.events = None  # queue of worker events for the running cell
        self._start()

    def describe(self):
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def _start(self):
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(__file__), "--worker", str(cmd_r), str(evt_w)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(cmd_r, evt_w),
            cwd=self.cwd,
            env=env,
            start_new_session=True,
        )
        os.close(cmd_r)
        os.close(evt_w)
        self.cmd = os.fdopen(cmd_w, "w", encoding="utf-8")
        self.events = queue.Queue()
        threading.Thread(target=self._read_events, args=(os.fdopen(evt_r, "rb"), self.events), daemon=True).start()
        threading.Thread(target=self._read_fd, args=(self.proc.stdout, "stdout", self.events), daemon=True).start()
        threading.Thread(target=self._read_fd, args=(self.proc.stderr, "stderr", self.events), daemon=True).start()
        first = self._next_event(self.events, 30.0)
        if first is None or first.get("t") != "ready":
            self.kill()
            raise ExecutionFailed(f"the Python worker for context {self.id} did not start")

    @staticmethod
    def _read_events(f, q):
        while True:
            line = f.readline(MAX_LINE)
            if not line:
                q.put({"t": "exit"})
                return
            try:
                q.put(json.loads(line))
            except ValueError:
                continue

    @staticmethod
    def _read_fd(f, name, q):
        """Relays what the worker's descriptors 1/2 receive (subprocess
        output) and reports each end-of-cell sentinel in its place."""
        fd = f.fileno()
        buf = b""
        while True:
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                if buf:
                    q.put({"t": name, "text": buf.decode("utf-8", "replace")})
                return
            buf += chunk
            while True:
                at = buf.find(SENTINEL_PREFIX)
                end = buf.find(b"\x00", at + len(SENTINEL_PREFIX)) if at >= 0 else -1
                if end < 0:
                    break
                if at:
                    q.put({"t": name, "text": buf[:at].decode("utf-8", "replace")})
                q.put({"t": "sentinel", "fd": name})
                buf = buf[end + 1:]
            # Hold back what may be the start of a sentinel split across reads,
            # and an incomplete UTF-8 character.
            hold = len(buf)
            z = buf.rfind(b"\x00")
            if z >= 0 and len(buf) - z < len(SENTINEL_PREFIX) + 64:
                head = buf[z:z + len(SENTINEL_PREFIX)]
                if SENTINEL_PREFIX.startswith(head) or head.startswith(SENTINEL_PREFIX):
                    hold = z
            complete, tail = _split_utf8(buf[:hold])
            if complete:
                q.put({"t": name, "text": complete.decode("utf-8", "replace")})
            buf = tail + buf[hold:]

    @staticmethod
    def _next_event(q, timeout):
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            return None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def interrupt(self):
        if self.alive():
            try:
                os.kill(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
            self.proc.wait()
        try:
            self.cmd.close()
        except Exception:
            pass

    def restart(self):
        self.kill()
        self._start()

    def execute(self, code, env_vars, deadline, write, peer_closed=lambda: False):
        """Runs one cell; `write(obj)` sends an NDJSON line and returns False
        when the client is gone; `peer_closed()` tells whether the client hung
        up (checked every quarter second, so an abandoned cell is interrupted
        promptly)."""
        if not self.alive():
            self._start()
        cell_id = uuid.uuid4().hex
        q = self.events
        try:
            self.cmd.write(json.dumps({"id": cell_id, "code": code, "env_vars": env_vars or {}}) + "\n")
            self.cmd.flush()
        except (BrokenPipeError, OSError):
            self.restart()
            write(_error_line("WorkerRestarted", "the context's interpreter had died; it was restarted empty, run the code again"))
            return
        done = False
        sentinels = 0
        interrupted_at = None
        client_gone = False
        last_write = time.monotonic()
        while not (done and sentinels >= 2):
            now = time.monotonic()
            wait = KEEPALIVE_SECONDS
            if done:
                wait = 2.0  # only the descriptor sentinels are missing
            if not client_gone:
                wait = min(wait, 0.25)
            if deadline is not None and interrupted_at is None:
                wait = max(0.0, min(wait, deadline - now))
            if interrupted_at is not None:
                wait = max(0.0, min(wait, interrupted_at + INTERRUPT_GRACE_SECONDS - now))
            ev = self._next_event(q, wait)
            now = time.monotonic()
            if ev is None:
                if done:
                    break  # a descriptor is held open by a background child: stop waiting
                if interrupted_at is not None and now >= interrupted_at + INTERRUPT_GRACE_SECONDS:
                    self.restart()
                    if not client_gone:
                        write(_error_line("ContextRestarted", "the cell did not stop after an interrupt; its interpreter was killed and restarted empty"))
                    return
                if deadline is not None and interrupted_at is None and now >= deadline:
                    interrupted_at = now
                    self.interrupt()
                    continue
                if not client_gone and not done and peer_closed():
                    client_gone = True
                    if interrupted_at is None:
                        interrupted_at = now
                        self.interrupt()
                    continue
                if not client_gone and now - last_write >= KEEPALIVE_SECONDS:
                    if not write({"type": "keepalive"}):
                        client_gone = True
                        interrupted_at = now
                        self.interrupt()
                    last_write = now
                continue
            kind = ev.get("t")
            line = None
            if kind == "count":
                line = {"type": "number_of_executions", "execution_count": ev.get("count", 0)}
            elif kind in ("stdout", "stderr"):
                line = {"type": kind, "text": ev.get("text", ""), "timestamp": _now_iso()}
            elif kind == "result":
                line = _result_line(ev.get("data") or {}, bool(ev.get("main")))
            elif kind == "error":
                line = {"type": "error", "name": ev.get("name", ""), "value": ev.get("value", ""), "traceback": ev.get("traceback", "")}
            elif kind == "done":
                done = True
            elif kind == "sentinel":
                sentinels += 1
            elif kind == "exit":
                # The worker died (os._exit, a crash): restart it empty.
                self.restart()
                if not client_gone:
                    write(_error_line("ContextRestarted", "the interpreter exited during the cell; it was restarted empty"))
                return
            if line is not None and not client_gone:
                if write(line):
                    last_write = now
                else:
                    client_gone = True
                    if not done and interrupted_at is None:
                        interrupted_at = now
                        self.interrupt()


def _split_utf8(data):
    """(complete part, incomplete trailing UTF-8 sequence)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        if need > back:
            return data[:-back], data[-back:]
        break
    return data, b""


def _now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _error_line(name, value):
    return {"type": "error", "name": name, "value": value, "traceback": f"{name}: {value}"}


_MIME_FIELDS = (
    ("text/plain", "text"),
    ("text/html", "html"),
    ("text/markdown", "markdown"),
    ("image/svg+xml", "svg"),
    ("image/png", "png"),
    ("image/jpeg", "jpeg"),
    ("application/pdf", "pdf"),
    ("text/latex", "latex"),
    ("application/json", "json"),
    ("application/javascript", "javascript"),
    ("e2b/data", "data"),
    ("e2b/chart", "chart"),
)


def _result_line(bundle, main):
    bundle = dict(bundle)
    line = {"type": "result"}
    for mime, field in _MIME_FIELDS:
        value = bundle.pop(mime, None)
        if value is not None:
            line[field] = value
    text = line.get("text")
    # E2B's server strips one pair of surrounding quotes from text/plain.
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        line["text"] = text[1:-1]
    if bundle:
        line["extra"] = bundle
    line["is_main_result"] = main
    return line


class Interpreter:
    def __init__(self, cwd):
        self.cwd = cwd
        self.contexts = {}
        self.lock = threading.Lock()
        self.default = self.create("python", cwd)

    def create(self, language, cwd):
        language = (language or "python").strip().lower()
        if language != "python":
            raise ValueError(f"forkd's code interpreter runs only Python, not {language!r}")
        cwd = cwd or self.cwd
        if not os.path.isdir(cwd):
            raise ValueError(f"cwd {cwd!r} is not a directory")
        ctx = Context(uuid.uuid4().hex, "python", cwd)
        with self.lock:
            self.contexts[ctx.id] = ctx
        return ctx

    def get(self, context_id):
        with self.lock:
            return self.contexts.get(context_id)

    def remove(self, context_id):
        with self.lock:
            if self.default.id == context_id:
                raise ValueError("the default context cannot be removed; restart it instead")
            ctx = self.contexts.pop(context_id, None)
        if ctx is None:
            return False
        with ctx.lock:
            ctx.kill()
        return True

    def shutdown(self):
        with self.lock:
            for ctx in self.contexts.values():
                ctx.kill()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "forkd-code-interpreter/1"
    timeout = 300  # idle keep-alive connections close after this

    def log_message(self, fmt, *args):  # quiet by default
        if self.server.verbose:
            sys.stderr.write("code-interpreter: " + (fmt % args) + "\n")

    # --- helpers ------------------------------------------------------------

    def _send(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _text(self, status, text):
        self._send(status, text.encode(), "text/plain; charset=utf-8")

    def _body(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._chunked_body()
        if not length:
            return b""
        try:
            n = int(length)
        except ValueError:
            raise ValueError("Content-Length is not a number")
        if n < 0 or n > MAX_BODY:
            raise ValueError(f"request body of {n} bytes is over the {MAX_BODY}-byte limit")
        return self.rfile.read(n)

    def _chunked_body(self):
        out = bytearray()
        while True:
            size_line = self.rfile.readline(1024)
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise ValueError("malformed chunked body")
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            if len(out) + size > MAX_BODY:
                raise ValueError(f"request body is over the {MAX_BODY}-byte limit")
            out += self.rfile.read(size)
            self.rfile.readline(1024)

    def _json(self):
        raw = self._body()
        if not raw.strip():
            return {}
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError("the body must be a JSON object")
        return value

    # --- routes -------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            return self._text(200, "OK")
        if path == "/contexts":
            with self.server.interp.lock:
                contexts = [c.describe() for c in self.server.interp.contexts.values()]
            return self._send(200, contexts)
        return self._text(404, f"no route GET {path}")

    def do_DELETE(self):
        path = self.path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "contexts":
            try:
                removed = self.server.interp.remove(parts[1])
            except ValueError as e:
                return self._text(400, str(e))
            if not removed:
                return self._text(404, f"Context {parts[1]} not found")
            return self._send(200, None)
        return self._text(404, f"no route DELETE {path}")

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        try:
            body = self._json()
        except (ValueError, UnicodeDecodeError) as e:
            self.close_connection = True
            return self._text(400, f"bad request: {e}")
        interp = self.server.interp
        if path == "/execute":
            return self._execute(body)
        if path == "/contexts":
            try:
                ctx = interp.create(body.get("language"), body.get("cwd"))
            except ValueError as e:
                return self._text(400, str(e))
            except ExecutionFailed as e:
                return self._text(500, str(e))
            return self._send(200, ctx.describe())
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart":
            ctx = interp.get(parts[1])
            if ctx is None:
                return self._text(404, f"Context {parts[1]} not found")
            with ctx.lock:
                try:
                    ctx.restart()
                except ExecutionFailed as e:
                    return self._text(500, str(e))
            return self._send(200, None)
        return self._text(404, f"no route POST {path}")

    def _execute(self, body):
        code = body.get("code")
        if not isinstance(code, str):
            return self._text(400, "`code` must be a string")
        context_id = body.get("context_id")
        language = body.get("language")
        if context_id and language:
            return self._text(400, "Only one of context_id or language can be provided")
        if language is not None and str(language).strip().lower() not in ("python", "py", "python3"):
            return self._text(400, f"forkd's code interpreter runs only Python, not {language!r}")
        env_vars = body.get("env_vars") or {}
        if not isinstance(env_vars, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
            return self._text(400, "`env_vars` must map strings to strings")
        timeout = body.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            return self._text(400, "`timeout` must be a positive number of seconds")
        interp = self.server.interp
        ctx = interp.get(context_id) if context_id else interp.default
        if ctx is None:
            return self._text(404, f"Context {context_id} not found")

        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        alive = [True]

        def write(obj):
            if not alive[0]:
                return False
            data = (json.dumps(obj) + "\n").encode()
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                return True
            except OSError:
                alive[0] = False
                return False

        def peer_closed():
            # The SDK abandons the request (its `timeout`) by closing the
            # connection: readable with nothing to read.
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        deadline = time.monotonic() + timeout if timeout else None
        with ctx.lock:
            try:
                ctx.execute(code, env_vars, deadline, write, peer_closed)
            except ExecutionFailed as e:
                write(_error_line("ContextFailed", str(e)))
        if write({"type": "end_of_execution"}):
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                pass
        else:
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main(argv=None):
    parser = argparse.ArgumentParser(description="forkd's code interpreter (E2B run_code API)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=49999)
    parser.add_argument("--cwd", default=os.environ.get("HOME") or "/", help="working directory of new contexts")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--worker", nargs=2, type=int, metavar=("CMD_FD", "EVT_FD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(*args.worker)
        return 0
    interp = Interpreter(args.cwd)
    server = Server((args.host, args.port), Handler)
    server.interp = interp
    server.verbose = args.verbose

    def stop(signum, _frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"code interpreter listening on {args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        interp.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
