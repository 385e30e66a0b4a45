//! Host side of the protocol: one connection, many concurrent requests.
//!
//! A reader thread owns the receiving half and routes every frame to the request
//! whose id it carries; callers block on their own channel. Frames for ids no
//! one waits for (left over from an earlier connection) are dropped. When the
//! connection ends every waiter gets [`ClientError::Closed`] at once, which is
//! how a QEMU that dies mid-exec surfaces as an error instead of a hang.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::frame::{write_frame, Frame, FrameError, FrameReader, Kind, CHUNK};
use crate::{
    decode, encode, ErrorReply, ExecRequest, ExitStatus, Hello, HelloAck, Pong, Request, Response,
};

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the guest agent did not answer the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the guest agent connection closed ({0})")]
    Closed(String),
    #[error("i/o error on the guest agent channel: {0}")]
    Io(#[from] io::Error),
    #[error("the guest agent refused the request: {0}")]
    Agent(#[from] ErrorReply),
    #[error("unexpected reply from the guest agent: {0}")]
    Protocol(String),
    #[error("no reply from the guest agent within {0:?}")]
    Timeout(Duration),
    #[error("cancelled")]
    Cancelled,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Collected result of [`AgentClient::exec_collect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

struct Shared {
    routes: Mutex<HashMap<u32, Sender<Frame>>>,
    closed: Mutex<Option<String>>,
}

/// A connected, handshaken agent session.
pub struct AgentClient {
    writer: Arc<Mutex<UnixStream>>,
    shared: Arc<Shared>,
    next_id: AtomicU32,
    reader: Option<JoinHandle<()>>,
    agent_version: String,
}

impl AgentClient {
    /// Performs the handshake on a connected stream and starts the reader thread.
    pub fn connect(stream: UnixStream, timeout: Duration) -> Result<AgentClient, ClientError> {
        Self::connect_while(stream, timeout, &mut || Ok(()))
    }

    /// [`Self::connect`], calling `keep_waiting` every 100 ms while no ack has
    /// arrived; an error from it aborts the wait (the VM died, the user
    /// cancelled) and is returned as is.
    pub fn connect_while(
        stream: UnixStream,
        timeout: Duration,
        keep_waiting: &mut dyn FnMut() -> Result<(), ClientError>,
    ) -> Result<AgentClient, ClientError> {
        let nonce = nonce();
        let deadline = Instant::now() + timeout;
        let mut writer = stream.try_clone()?;
        write_frame(&mut writer, Kind::Hello, 0, &encode(&Hello { nonce }))?;
        let mut last_hello = Instant::now();

        let mut reader = FrameReader::new(stream);
        let ack = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::HandshakeTimeout(timeout));
            }
            reader
                .get_ref()
                .set_read_timeout(Some(left.min(Duration::from_millis(100))))?;
            match reader.read_frame() {
                Ok(f) if f.kind == Kind::HelloAck => match decode::<HelloAck>(&f.payload) {
                    Ok(ack) if ack.nonce == nonce => break ack,
                    _ => continue,
                },
                // Anything before our ack is left over from an earlier session.
                Ok(_) => continue,
                Err(FrameError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    keep_waiting()?;
                    // Say hello again now and then: a read timeout that cut a
                    // frame in half makes the reader skip it, ack included.
                    if last_hello.elapsed() >= Duration::from_secs(1) {
                        write_frame(&mut writer, Kind::Hello, 0, &encode(&Hello { nonce }))?;
                        last_hello = Instant::now();
                    }
                    continue;
                }
                Err(e) if e.is_recoverable() => continue,
                Err(FrameError::Eof) => {
                    return Err(ClientError::Closed(
                        "connection closed during the handshake".into(),
                    ))
                }
                Err(FrameError::Io(e)) => return Err(ClientError::Io(e)),
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
        };
        reader.get_ref().set_read_timeout(None)?;

        let shared = Arc::new(Shared {
            routes: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
        });
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("forkd-agent-reader".into())
            .spawn(move || reader_loop(reader, &thread_shared))?;
        Ok(AgentClient {
            writer: Arc::new(Mutex::new(writer)),
            shared,
            // A random base: a restored guest's agent may still run requests
            // of an earlier session (its parent's) under small ids, whose
            // late frames must not be mistaken for ours.
            next_id: AtomicU32::new(((nonce >> 16) as u32 | 1) & 0x7fff_ffff),
            reader: Some(handle),
            agent_version: ack.agent_version,
        })
    }

    /// The version string the agent reported in the handshake.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    /// Reason the connection closed, if it did.
    pub fn closed_reason(&self) -> Option<String> {
        lock(&self.shared.closed).clone()
    }

    /// Registers a route for a fresh id and sends the request.
    fn start(&self, req: &Request) -> Result<(u32, Receiver<Frame>), ClientError> {
        self.start_as(self.reserve_id(), req)
    }

    fn start_as(&self, id: u32, req: &Request) -> Result<(u32, Receiver<Frame>), ClientError> {
        let (tx, rx) = mpsc::channel();
        {
            // Checked under the routes lock: the reader thread clears routes
            // under the same lock after setting `closed`, so a request either
            // sees the close or gets its sender dropped by it.
            let mut routes = lock(&self.shared.routes);
            if let Some(reason) = self.closed_reason() {
                return Err(ClientError::Closed(reason));
            }
            routes.insert(id, tx);
        }
        if let Err(e) = self.send(Kind::Request, id, &encode(req)) {
            lock(&self.shared.routes).remove(&id);
            return Err(e);
        }
        Ok((id, rx))
    }

    fn send(&self, kind: Kind, id: u32, payload: &[u8]) -> Result<(), ClientError> {
        let mut w = lock(&self.writer);
        write_frame(&mut *w, kind, id, payload).map_err(|e| self.io_error(e))
    }

    /// An I/O error on a closed connection reads better as `Closed`.
    fn io_error(&self, e: io::Error) -> ClientError {
        match self.closed_reason() {
            Some(reason) => ClientError::Closed(reason),
            None if e.kind() == io::ErrorKind::BrokenPipe => {
                ClientError::Closed("broken pipe".into())
            }
            None => ClientError::Io(e),
        }
    }

    fn recv(&self, rx: &Receiver<Frame>, timeout: Option<Duration>) -> Result<Frame, ClientError> {
        match timeout {
            Some(t) => rx.recv_timeout(t).map_err(|e| match e {
                RecvTimeoutError::Timeout => ClientError::Timeout(t),
                RecvTimeoutError::Disconnected => self.closed(),
            }),
            None => rx.recv().map_err(|_| self.closed()),
        }
    }

    fn closed(&self) -> ClientError {
        ClientError::Closed(
            self.closed_reason()
                .unwrap_or_else(|| "reader stopped".into()),
        )
    }

    /// Waits for the final `Response` of a request, ignoring data frames.
    fn response(
        &self,
        rx: &Receiver<Frame>,
        timeout: Option<Duration>,
    ) -> Result<Response, ClientError> {
        loop {
            let f = self.recv(rx, timeout)?;
            if f.kind == Kind::Response {
                return parse_response(&f.payload);
            }
        }
    }

    /// Liveness check; fails with `Timeout` when the agent does not answer in time.
    pub fn ping(&self, timeout: Duration) -> Result<Pong, ClientError> {
        let (id, rx) = self.start(&Request::Ping {})?;
        let r = self.response(&rx, Some(timeout));
        lock(&self.shared.routes).remove(&id);
        match r? {
            Response::Pong(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    /// A fresh request id, for a caller that needs to know an exec's id before
    /// it starts (to signal it from another thread); pass it to [`Self::exec_as`].
    pub fn reserve_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs a command, streaming its output to `on_output` as it arrives.
    /// `stdin`, when given, is copied to the command from a helper thread.
    pub fn exec(
        &self,
        req: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus, ClientError> {
        self.exec_as(self.reserve_id(), req, stdin, on_output)
    }

    /// [`Self::exec`] under an id from [`Self::reserve_id`].
    pub fn exec_as(
        &self,
        id: u32,
        mut req: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus, ClientError> {
        req.stdin = stdin.is_some();
        let (id, rx) = self.start_as(id, &Request::Exec(req))?;
        if let Some(input) = stdin {
            let writer = Arc::clone(&self.writer);
            std::thread::Builder::new()
                .name("forkd-stdin".into())
                .spawn(move || pump_stdin(input, &writer, id))?;
        }
        loop {
            let f = self.recv(&rx, None)?;
            match f.kind {
                Kind::Stdout => on_output(OutputStream::Stdout, &f.payload),
                Kind::Stderr => on_output(OutputStream::Stderr, &f.payload),
                Kind::Response => {
                    return match parse_response(&f.payload)? {
                        Response::Exited(s) => Ok(s),
                        other => Err(unexpected(&other)),
                    }
                }
                _ => {}
            }
        }
    }

    /// Runs a command and collects its output.
    pub fn exec_collect(
        &self,
        req: ExecRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<Output, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let input = stdin.map(|b| Box::new(io::Cursor::new(b)) as Box<dyn Read + Send>);
        let status = self.exec(req, input, |s, b| match s {
            OutputStream::Stdout => stdout.extend_from_slice(b),
            OutputStream::Stderr => stderr.extend_from_slice(b),
        })?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Writes `data` to `path` in the guest. Returns the bytes written.
    pub fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        mut data: impl Read,
    ) -> Result<u64, ClientError> {
        let (id, rx) = self.start(&Request::WriteFile {
            path: path.to_string(),
            mode,
        })?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            // Stop sending early if the agent already refused the file.
            if let Ok(f) = rx.try_recv() {
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
                    let _ = self.send(Kind::Data, id, &[]);
                    return Err(ClientError::Io(e));
                }
            };
            self.send(Kind::Data, id, &buf[..n])?;
            if n == 0 {
                break;
            }
        }
        match self.response(&rx, None)? {
            Response::Written { bytes } => Ok(bytes),
            other => Err(unexpected(&other)),
        }
    }

    /// Reads `path` from the guest into `out`. Returns the bytes read.
    pub fn read_file(&self, path: &str, mut out: impl Write) -> Result<u64, ClientError> {
        let (_id, rx) = self.start(&Request::ReadFile {
            path: path.to_string(),
        })?;
        loop {
            let f = self.recv(&rx, None)?;
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

    /// Sends `signal` to the process group of the exec with request id `target`.
    pub fn signal(&self, target: u32, signal: i32) -> Result<(), ClientError> {
        let (_, rx) = self.start(&Request::Signal { target, signal })?;
        match self.response(&rx, Some(Duration::from_secs(10)))? {
            Response::Signalled => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Fork safety for a restored guest: reseeds its CRNG with `entropy`,
    /// steps its clock to now, sets its hostname. Returns the clock step in ms.
    pub fn restore(&self, entropy: &[u8], hostname: &str) -> Result<i64, ClientError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let (id, rx) = self.start(&Request::Restore {
            entropy_hex: crate::to_hex(entropy),
            unix_time_ns: now,
            hostname: hostname.to_string(),
        })?;
        let r = self.response(&rx, Some(Duration::from_secs(30)));
        lock(&self.shared.routes).remove(&id);
        match r? {
            Response::Restored { clock_step_ms } => Ok(clock_step_ms),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks the guest to sync and power off.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), ClientError> {
        let (_, rx) = self.start(&Request::Shutdown {})?;
        match self.response(&rx, Some(timeout))? {
            Response::ShuttingDown => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends raw bytes on the channel, bypassing framing (robustness tests).
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        let mut w = lock(&self.writer);
        w.write_all(bytes).map_err(|e| self.io_error(e))
    }

    /// Waits for the next frame with `id` (for robustness tests that send raw frames).
    pub fn wait_reply(&self, id: u32, timeout: Duration) -> Result<Response, ClientError> {
        let (tx, rx) = mpsc::channel();
        lock(&self.shared.routes).insert(id, tx);
        let r = self.response(&rx, Some(timeout));
        lock(&self.shared.routes).remove(&id);
        r
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        // Closing both directions ends the reader thread.
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

fn reader_loop(mut reader: FrameReader<UnixStream>, shared: &Shared) {
    let reason = loop {
        match reader.read_frame() {
            Ok(f) => {
                let mut routes = lock(&shared.routes);
                let last = f.kind == Kind::Response;
                let id = f.id;
                if let Some(tx) = routes.get(&id) {
                    if tx.send(f).is_err() || last {
                        routes.remove(&id);
                    }
                }
            }
            Err(FrameError::Eof) => break "the guest side closed the channel".to_string(),
            Err(FrameError::Io(e)) => break format!("read error: {e}"),
            // A frame we cannot decode is skipped; its request (if any) times
            // out or gets a later frame.
            Err(_) => continue,
        }
    };
    let mut routes = lock(&shared.routes);
    *lock(&shared.closed) = Some(reason);
    routes.clear();
}

fn pump_stdin(mut input: Box<dyn Read + Send>, writer: &Mutex<UnixStream>, id: u32) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let mut w = lock(writer);
        if write_frame(&mut *w, Kind::Stdin, id, &buf[..n]).is_err() || n == 0 {
            return;
        }
    }
}

fn parse_response(payload: &[u8]) -> Result<Response, ClientError> {
    match decode::<Response>(payload) {
        Ok(Response::Error(e)) => Err(ClientError::Agent(e)),
        Ok(r) => Ok(r),
        Err(e) => Err(ClientError::Protocol(format!("undecodable response: {e}"))),
    }
}

fn unexpected(r: &Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {r:?}"))
}

/// Locks a mutex, recovering the data if another thread panicked with it held
/// (the protected state here stays consistent across any panic point).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A nonce unique enough to tell this session's ack from stale ones.
fn nonce() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32) ^ (&t as *const u64 as u64)
}
