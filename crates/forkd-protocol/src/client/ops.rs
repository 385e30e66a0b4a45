//! The operations of protocol 2 on [`AgentClient`]: agent-owned processes,
//! the sandbox environment, filesystem operations and watches, tar streams,
//! TCP relays, eval and the code interpreter. One method per request; each
//! bounds what it keeps of the guest's answer and how long it waits.
//!
//! Unary requests wait at most [`Limits::op_timeout`](super::Limits); streams
//! (attachments, relays, tar) wait as long as their data keeps coming, which
//! the session's stall detection bounds at the frame level.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::streams::{AttachEvent, Attachment, InputStream, TcpRelay};
use super::{parse_response, unexpected, AgentClient, ClientError, OutputStream, Route};
use crate::frame::{Kind, CHUNK};
use crate::{
    decode, AttachOptions, EvalResult, Event, ExitStatus, FileInfo, FsEvent, ProcInfo,
    ProcSelector, ProcSpec, PtySize, Request, Response, TarSummary,
};

/// Most entries [`AgentClient::list_dir`] and [`AgentClient::proc_list`]
/// accept (the agent refuses longer listings with `Limit`); they also keep
/// at most [`Limits::collect_bytes`](super::Limits::collect_bytes) of
/// encoded entries.
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// How the interpreter gets past an interrupt: the agent waits this long
/// for the code to stop before it restarts the interpreter.
const EVAL_INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// Time for an eval to start its interpreter (Python under TCG is slow).
const EVAL_START: Duration = Duration::from_secs(120);

/// Options of [`AgentClient::write_file_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Permission bits of a new file (0o644 when absent).
    pub mode: Option<u32>,
    /// Create missing parent directories.
    pub parents: bool,
    /// Act as this account (its permissions; it owns what is created).
    pub user: Option<String>,
}

/// What one [`AgentClient::watch_poll`] returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchBatch {
    pub events: Vec<FsEvent>,
    /// Events the watch's queue dropped since the last poll.
    pub dropped: u64,
}

/// The collected result of [`AgentClient::eval_collect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalOutput {
    pub result: EvalResult,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl AgentClient {
    /// Sends a unary request and returns its response within the session's
    /// operation timeout.
    fn unary(&self, req: &Request) -> Result<Response, ClientError> {
        let timeout = self.shared.limits.op_timeout;
        let route = self.start_timed(req, timeout)?;
        route.response(Some(timeout))
    }

    /// Starts a streaming request (with the default send deadline).
    fn stream(&self, req: &Request) -> Result<Route, ClientError> {
        self.start(req)
    }

    /// Sets the sandbox's environment: variables every later exec, process
    /// and interpreter starts with (replacing the previous set).
    pub fn set_env(&self, vars: &[(String, String)]) -> Result<(), ClientError> {
        match self.unary(&Request::SetEnv {
            vars: vars.to_vec(),
        })? {
            Response::EnvSet => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts a process that belongs to the agent (it outlives this session)
    /// and returns it as it started.
    pub fn proc_start(&self, spec: ProcSpec) -> Result<ProcInfo, ClientError> {
        match self.unary(&Request::ProcStart { spec, attach: None })? {
            Response::ProcStarted(info) => Ok(info),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts a process and follows it from its first byte; with
    /// `backpressure` the process waits for this attachment rather than
    /// lose output (see [`AttachOptions::backpressure`]).
    pub fn proc_start_attached(
        &self,
        spec: ProcSpec,
        backpressure: bool,
    ) -> Result<Attachment, ClientError> {
        let route = self.stream(&Request::ProcStart {
            spec,
            attach: Some(AttachOptions {
                replay: true,
                backpressure,
            }),
        })?;
        Attachment::open(route, self.shared.limits.op_timeout)
    }

    /// Follows the output of a process started with `ProcStart`.
    pub fn proc_attach(
        &self,
        target: impl Into<ProcSelector>,
        options: AttachOptions,
    ) -> Result<Attachment, ClientError> {
        let route = self.stream(&Request::ProcAttach {
            target: target.into(),
            options,
        })?;
        Attachment::open(route, self.shared.limits.op_timeout)
    }

    /// Waits for a process to end, up to `timeout` (forever when `None`).
    pub fn proc_wait(
        &self,
        target: impl Into<ProcSelector>,
        timeout: Option<Duration>,
    ) -> Result<ExitStatus, ClientError> {
        let route = self.stream(&Request::ProcWait {
            target: target.into(),
        })?;
        match route.response(timeout) {
            Ok(Response::ProcEnded(status)) => Ok(status),
            Ok(other) => Err(unexpected(&other)),
            Err(e) => {
                if !route.ended() {
                    self.shared.cancel_quietly(route.id);
                }
                Err(e)
            }
        }
    }

    /// Writes `data` to a process's stdin (its terminal when it has one),
    /// then closes stdin if `close`. Returns the bytes written.
    pub fn proc_input(
        &self,
        target: impl Into<ProcSelector>,
        data: &[u8],
        close: bool,
    ) -> Result<u64, ClientError> {
        let mut input = self.proc_input_stream(target, close)?;
        input.send(data)?;
        input.finish()
    }

    /// A stream to a process's stdin, for input that comes in pieces
    /// (E2B's `StreamInput`); [`InputStream::finish`] ends it.
    pub fn proc_input_stream(
        &self,
        target: impl Into<ProcSelector>,
        close: bool,
    ) -> Result<InputStream, ClientError> {
        let route = self.stream(&Request::ProcInput {
            target: target.into(),
            close,
        })?;
        Ok(InputStream::new(
            route,
            Some(self.shared.limits.write_stall),
        ))
    }

    /// Closes a process's stdin pipe (idempotent).
    pub fn proc_close_stdin(&self, target: impl Into<ProcSelector>) -> Result<(), ClientError> {
        match self.unary(&Request::ProcCloseStdin {
            target: target.into(),
        })? {
            Response::StdinClosed => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends `signal` to a process's process group.
    pub fn proc_signal(
        &self,
        target: impl Into<ProcSelector>,
        signal: i32,
    ) -> Result<(), ClientError> {
        match self.unary(&Request::ProcSignal {
            target: target.into(),
            signal,
        })? {
            Response::Signalled => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Resizes a process's terminal.
    pub fn proc_resize(
        &self,
        target: impl Into<ProcSelector>,
        size: PtySize,
    ) -> Result<(), ClientError> {
        match self.unary(&Request::ProcResize {
            target: target.into(),
            cols: size.cols,
            rows: size.rows,
        })? {
            Response::Resized => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Processes started with `ProcStart`, running and recently ended.
    pub fn proc_list(&self) -> Result<Vec<ProcInfo>, ClientError> {
        let mut out = Vec::new();
        self.listing(&Request::ProcList {}, |e| match e {
            Event::Process(info) => {
                out.push(info);
                Ok(out.len())
            }
            _ => Ok(out.len()),
        })?;
        Ok(out)
    }

    /// Runs a listing request: events to `take` (which returns how many
    /// entries it holds), then the final count.
    fn listing(
        &self,
        req: &Request,
        mut take: impl FnMut(Event) -> Result<usize, ClientError>,
    ) -> Result<Response, ClientError> {
        let timeout = self.shared.limits.op_timeout;
        let limit = self.shared.limits.collect_bytes;
        let route = self.start_timed(req, timeout)?;
        let deadline = Instant::now() + timeout;
        let mut bytes = 0usize;
        loop {
            let f = route.recv(Some(deadline), timeout)?;
            match f.kind {
                Kind::Event => {
                    bytes += f.payload.len();
                    let Ok(event) = decode::<Event>(&f.payload) else {
                        continue;
                    };
                    if take(event)? > MAX_LIST_ENTRIES || bytes > limit {
                        self.shared.cancel_quietly(route.id);
                        return Err(ClientError::Protocol(format!(
                            "the guest agent listed more than {MAX_LIST_ENTRIES} entries or \
                             {limit} bytes"
                        )));
                    }
                }
                Kind::Response => return parse_response(&f.payload),
                _ => {}
            }
        }
    }

    /// Facts about a path in the guest (`lstat`; a symlink's target kind).
    pub fn stat(&self, path: &str, user: Option<&str>) -> Result<FileInfo, ClientError> {
        match self.unary(&Request::Stat {
            path: path.into(),
            user: user.map(Into::into),
        })? {
            Response::Stat { info } => Ok(info),
            other => Err(unexpected(&other)),
        }
    }

    /// The entries of a directory down to `depth` levels (1: its own).
    pub fn list_dir(
        &self,
        path: &str,
        depth: u32,
        user: Option<&str>,
    ) -> Result<Vec<FileInfo>, ClientError> {
        let mut out = Vec::new();
        let req = Request::ListDir {
            path: path.into(),
            depth,
            user: user.map(Into::into),
        };
        match self.listing(&req, |e| {
            if let Event::Entries { entries } = e {
                out.extend(entries);
            }
            Ok(out.len())
        })? {
            Response::Listed { .. } => Ok(out),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates a directory and its missing parents (`AlreadyExists` when it
    /// is there).
    pub fn make_dir(
        &self,
        path: &str,
        mode: Option<u32>,
        user: Option<&str>,
    ) -> Result<(), ClientError> {
        match self.unary(&Request::MakeDir {
            path: path.into(),
            mode,
            user: user.map(Into::into),
        })? {
            Response::MadeDir => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes a path (a directory with its contents when `recursive`).
    pub fn remove(
        &self,
        path: &str,
        recursive: bool,
        user: Option<&str>,
    ) -> Result<(), ClientError> {
        match self.unary(&Request::Remove {
            path: path.into(),
            recursive,
            user: user.map(Into::into),
        })? {
            Response::Removed => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Renames `from` to `to` (creating `to`'s parents); returns the facts
    /// of the new path.
    pub fn rename(
        &self,
        from: &str,
        to: &str,
        user: Option<&str>,
    ) -> Result<FileInfo, ClientError> {
        match self.unary(&Request::Move {
            from: from.into(),
            to: to.into(),
            user: user.map(Into::into),
        })? {
            Response::Moved { info } => Ok(info),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts watching a directory; returns the watch's id. The watch lives
    /// in the agent until [`Self::watch_stop`] or `idle` without a poll.
    pub fn watch_start(
        &self,
        path: &str,
        recursive: bool,
        idle: Option<Duration>,
    ) -> Result<u32, ClientError> {
        match self.unary(&Request::WatchStart {
            path: path.into(),
            recursive,
            idle_ms: idle.map(|d| d.as_millis() as u64),
        })? {
            Response::WatchStarted { watch } => Ok(watch),
            other => Err(unexpected(&other)),
        }
    }

    /// The events of a watch since the last poll, waiting up to `wait`
    /// (at most 60 s) for the first one.
    pub fn watch_poll(&self, watch: u32, wait: Duration) -> Result<WatchBatch, ClientError> {
        let wait = wait.min(Duration::from_secs(60));
        let timeout = wait + self.shared.limits.op_timeout;
        let route = self.start_timed(
            &Request::WatchPoll {
                watch,
                wait_ms: wait.as_millis() as u64,
            },
            timeout,
        )?;
        match route.response(Some(timeout))? {
            Response::WatchEvents { events, dropped } => Ok(WatchBatch { events, dropped }),
            other => Err(unexpected(&other)),
        }
    }

    /// Stops a watch.
    pub fn watch_stop(&self, watch: u32) -> Result<(), ClientError> {
        match self.unary(&Request::WatchStop { watch })? {
            Response::WatchStopped => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Writes `data` to `path` in the guest with `opts`. Returns the bytes
    /// written.
    pub fn write_file_with(
        &self,
        path: &str,
        opts: &WriteOptions,
        mut data: impl Read,
    ) -> Result<u64, ClientError> {
        let route = self.start(&Request::WriteFile {
            path: path.to_string(),
            mode: opts.mode,
            parents: opts.parents,
            user: opts.user.clone(),
        })?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            // Stop sending early if the agent already refused the file.
            while let Some(f) = route.mailbox.try_take() {
                if f.kind == Kind::Response {
                    return match parse_response(&f.payload)? {
                        Response::Written { bytes } => Ok(bytes),
                        other => Err(unexpected(&other)),
                    };
                }
            }
            let n = match data.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Close the file on the agent side before reporting.
                    let _ = self
                        .shared
                        .send(Kind::Data, route.id, &[], self.send_deadline());
                    return Err(ClientError::Io(e));
                }
            };
            self.shared
                .send(Kind::Data, route.id, &buf[..n], self.send_deadline())?;
            if n == 0 {
                break;
            }
        }
        match route.response(None)? {
            Response::Written { bytes } => Ok(bytes),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads `path` from the guest into `out`, as `user`. Returns the bytes
    /// read.
    pub fn read_file_as(
        &self,
        path: &str,
        user: Option<&str>,
        mut out: impl Write,
    ) -> Result<u64, ClientError> {
        let route = self.start(&Request::ReadFile {
            path: path.to_string(),
            user: user.map(Into::into),
        })?;
        loop {
            let f = route.recv(None, Duration::ZERO)?;
            match f.kind {
                Kind::Data => out.write_all(&f.payload)?,
                Kind::Response => {
                    return match parse_response(&f.payload)? {
                        Response::FileDone { bytes } => Ok(bytes),
                        other => Err(unexpected(&other)),
                    }
                }
                _ => {}
            }
        }
    }

    /// Streams `path` (a file or a directory tree) out of the guest as a tar
    /// archive into `out`; entries are named from `path`'s last component.
    pub fn tar_read(
        &self,
        path: &str,
        user: Option<&str>,
        mut out: impl Write,
    ) -> Result<TarSummary, ClientError> {
        let route = self.stream(&Request::TarRead {
            path: path.into(),
            user: user.map(Into::into),
        })?;
        loop {
            let f = route.recv(None, Duration::ZERO)?;
            match f.kind {
                Kind::Data => {
                    if let Err(e) = out.write_all(&f.payload) {
                        self.shared.cancel_quietly(route.id);
                        return Err(ClientError::Io(e));
                    }
                }
                Kind::Response => {
                    return match parse_response(&f.payload)? {
                        Response::TarDone(summary) => Ok(summary),
                        other => Err(unexpected(&other)),
                    }
                }
                _ => {}
            }
        }
    }

    /// Unpacks the tar archive read from `input` into the directory `path`
    /// in the guest (created with its parents).
    pub fn tar_write(
        &self,
        path: &str,
        user: Option<&str>,
        mut input: impl Read,
    ) -> Result<TarSummary, ClientError> {
        let route = self.stream(&Request::TarWrite {
            path: path.into(),
            user: user.map(Into::into),
        })?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match input.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.shared.cancel_quietly(route.id);
                    return Err(ClientError::Io(e));
                }
            };
            match route.send_data(Kind::Data, &buf[..n], None) {
                // The agent answered early: its answer says why.
                Err(ClientError::StreamEnded(_)) => break,
                Err(e) => return Err(e),
                Ok(()) if n == 0 => break,
                Ok(()) => {}
            }
        }
        match route.response(None)? {
            Response::TarDone(summary) => Ok(summary),
            other => Err(unexpected(&other)),
        }
    }

    /// Opens a TCP connection to `127.0.0.1:port` inside the guest, relayed
    /// over this session. `ConnectionRefused` when nothing listens there.
    pub fn tcp_connect(&self, port: u16, timeout: Duration) -> Result<TcpRelay, ClientError> {
        let route = self.stream(&Request::TcpConnect {
            port,
            timeout_ms: Some(timeout.as_millis() as u64),
        })?;
        TcpRelay::open(route, timeout + self.shared.limits.exec_grace)
    }

    /// Runs Python `code` in the guest's persistent interpreter, streaming
    /// what it prints to `on_output`. With a `timeout` the code is
    /// interrupted then, and this returns by the timeout plus the
    /// interpreter's restart allowance whatever the guest does.
    pub fn eval(
        &self,
        code: &str,
        env: &[(String, String)],
        timeout: Option<Duration>,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<EvalResult, ClientError> {
        let req = Request::Eval {
            code: code.into(),
            env: env.to_vec(),
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
        };
        let grace = self.shared.limits.exec_grace;
        let wait = timeout.map(|t| t + EVAL_START + EVAL_INTERRUPT_GRACE + grace);
        let deadline = wait.map(|w| Instant::now() + w);
        let route = self.start(&req)?;
        loop {
            let f = match route.recv(deadline, wait.unwrap_or_default()) {
                Ok(f) => f,
                Err(e) => {
                    if !route.ended() {
                        self.shared.cancel_quietly(route.id);
                    }
                    return Err(e);
                }
            };
            match f.kind {
                Kind::Stdout => on_output(OutputStream::Stdout, &f.payload),
                Kind::Stderr => on_output(OutputStream::Stderr, &f.payload),
                Kind::Response => {
                    return match parse_response(&f.payload)? {
                        Response::Evaluated(result) => Ok(result),
                        other => Err(unexpected(&other)),
                    }
                }
                _ => {}
            }
        }
    }

    /// [`Self::eval`], collecting at most [`Limits::collect_bytes`] of each
    /// output stream (more is an `OutputTooLarge` error; the code is
    /// interrupted).
    ///
    /// [`Limits::collect_bytes`]: super::Limits::collect_bytes
    pub fn eval_collect(
        &self,
        code: &str,
        env: &[(String, String)],
        timeout: Option<Duration>,
    ) -> Result<EvalOutput, ClientError> {
        let limit = self.shared.limits.collect_bytes;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut too_large = None;
        let result = self.eval(code, env, timeout, |s, b| {
            let (buf, name) = match s {
                OutputStream::Stdout => (&mut stdout, "stdout"),
                OutputStream::Stderr => (&mut stderr, "stderr"),
            };
            if too_large.is_some() || buf.len() + b.len() > limit {
                too_large = Some(name);
                return;
            }
            buf.extend_from_slice(b);
        });
        if let Some(stream) = too_large {
            return Err(ClientError::OutputTooLarge { stream, limit });
        }
        Ok(EvalOutput {
            result: result?,
            stdout,
            stderr,
        })
    }

    /// Makes sure the E2B code-interpreter server listens on `port` in the
    /// guest (starting it if needed); returns its pid.
    pub fn code_interpreter(
        &self,
        port: u16,
        cwd: Option<&str>,
        timeout: Duration,
    ) -> Result<u32, ClientError> {
        let route = self.start_timed(
            &Request::CodeInterpreter {
                port,
                cwd: cwd.map(Into::into),
            },
            timeout,
        )?;
        match route.response(Some(timeout))? {
            Response::CodeInterpreterReady { pid, .. } => Ok(pid),
            other => Err(unexpected(&other)),
        }
    }

    /// Follows a process to its end, collecting at most
    /// [`Limits::collect_bytes`](super::Limits::collect_bytes) of its output
    /// per stream (terminal output counts as stdout); beyond that the
    /// attachment is dropped and the call fails with `OutputTooLarge` (the
    /// process goes on).
    pub fn proc_collect(
        &self,
        attachment: Attachment,
    ) -> Result<(ExitStatus, Vec<u8>, Vec<u8>), ClientError> {
        let limit = self.shared.limits.collect_bytes;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut a = attachment;
        loop {
            let (buf, name, bytes) = match a.next(None)? {
                AttachEvent::Stdout(b) | AttachEvent::Pty(b) => (&mut stdout, "stdout", b),
                AttachEvent::Stderr(b) => (&mut stderr, "stderr", b),
                AttachEvent::Dropped(_) => continue,
                AttachEvent::Ended(status) => return Ok((status, stdout, stderr)),
                AttachEvent::Detached => {
                    return Err(ClientError::StreamEnded("the attachment was cancelled"))
                }
            };
            if buf.len() + bytes.len() > limit {
                return Err(ClientError::OutputTooLarge {
                    stream: name,
                    limit,
                });
            }
            buf.extend_from_slice(&bytes);
        }
    }
}
