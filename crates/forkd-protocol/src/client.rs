//! Host side of the protocol: one connection, many concurrent requests.
//!
//! A reader thread owns the receiving half and routes every frame to the
//! mailbox of the request whose id it carries; callers wait on their own
//! mailbox. Frames for ids no one waits for (left over from an earlier
//! connection, forged by the guest, or arriving after a request's `Response`)
//! are dropped. When the connection ends every waiter gets
//! [`ClientError::Closed`] at once, which is how a QEMU that dies mid-exec
//! surfaces as an error instead of a hang.
//!
//! Everything read from the channel comes from inside the guest, where any
//! root process can take the agent's port and write what it likes, so every
//! wait here is bounded ([`Limits`]):
//! - memory: the decoder holds at most one frame, each request's mailbox at
//!   most [`Limits::mailbox_bytes`] (the reader waits for a slow caller rather
//!   than buffering more, which in turn makes the guest's writer wait), and
//!   [`AgentClient::exec_collect`] keeps at most [`Limits::collect_bytes`];
//! - time: an exec with a timeout ends host-side at that timeout plus
//!   [`Limits::exec_grace`] whatever the guest sends; a frame left incomplete,
//!   or garbage with no frame after it, for [`Limits::frame_stall`], more than
//!   [`Limits::max_garbage`] bytes that are not frames, or a frame the guest
//!   does not take within [`Limits::write_stall`], close the session with a
//!   reason ([`AgentClient::closed_reason`]); a new connection starts clean;
//! - windowed requests (process attachments and input, tar streams, TCP
//!   relays; [`Request::is_windowed`]) are flow-controlled: the host grants
//!   the agent [`WINDOW`] bytes and more only as its caller consumes them, so
//!   their mailboxes never make the reader wait, and a guest that sends past
//!   the window fails that request alone ([`ClientError::FlowControl`]).
//!
//! The operations of protocol 2 (agent-owned processes, filesystem, tar,
//! relays, eval) are in `client/ops.rs`; their long-lived handles
//! ([`Attachment`], [`TcpRelay`], [`InputStream`]) in `client/streams.rs`.
//! Handles own their share of
//! the session, so they are `'static` and may move to other threads.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::frame::{
    parse_window, window_payload, Frame, FrameDecoder, Header, Kind, CHUNK, HEADER_LEN,
    MAX_PAYLOAD, WINDOW,
};
use crate::{
    decode, encode, ErrorReply, ExecRequest, ExitStatus, Hello, HelloAck, Pong, Request, Response,
    PROTOCOL,
};

mod ops;
mod streams;

pub use ops::{EvalOutput, WatchBatch, WriteOptions, MAX_LIST_ENTRIES};
pub use streams::{AttachEvent, Attachment, InputStream, RelayReader, RelayWriter, TcpRelay};

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
    #[error(
        "the guest agent did not report the end of the command within its {timeout:?} timeout \
         plus {grace:?}; the agent is stuck or something in the guest is writing to its channel \
         (the command may still be running: kill the sandbox if it matters)"
    )]
    ExitNotReported { timeout: Duration, grace: Duration },
    #[error(
        "the guest agent did not read the request within {0:?}; it is stuck or the guest is \
         paused (retry, or kill the sandbox)"
    )]
    SendTimeout(Duration),
    #[error(
        "the command wrote more than {limit} bytes to {stream}, more than exec_collect keeps; \
         it was killed (stream its output with exec instead)"
    )]
    OutputTooLarge { stream: &'static str, limit: usize },
    #[error(
        "the guest agent speaks protocol {agent} (forkd-agent {agent_version}) and this host \
         speaks protocol {host}: the guest was booted or snapshotted by another forkd build; \
         boot it again (or take the snapshot again) with this build"
    )]
    ProtocolMismatch {
        agent: u8,
        host: u8,
        agent_version: String,
    },
    #[error(
        "the guest agent broke flow control on request {id}: it sent {sent} bytes where \
         {allowed} were granted; the request was abandoned"
    )]
    FlowControl { id: u32, sent: u64, allowed: u64 },
    #[error("the stream ended: {0}")]
    StreamEnded(&'static str),
}

/// Bounds on what a session accepts from the guest; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// How long past an exec's own timeout the host waits for the agent to
    /// report the exit (the agent kills the command at the timeout itself).
    pub exec_grace: Duration,
    /// Bytes in a row that are not frames before the session counts as
    /// corrupted and closes.
    pub max_garbage: u64,
    /// How long a frame may stay incomplete, or garbage go without a frame
    /// after it, before the session counts as corrupted and closes.
    pub frame_stall: Duration,
    /// How long the guest may leave a frame the host sends unread before the
    /// request fails (and the session closes if half the frame went out).
    pub write_stall: Duration,
    /// Bytes of frames buffered for one request its caller has not taken yet;
    /// beyond this the reader waits for the caller.
    pub mailbox_bytes: usize,
    /// Largest stdout (and stderr) [`AgentClient::exec_collect`] keeps.
    pub collect_bytes: usize,
    /// How long a unary request of protocol 2 (stat, mkdir, start a process,
    /// signal, ...) may take before it fails with `Timeout`.
    pub op_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            exec_grace: Duration::from_secs(10),
            max_garbage: u64::from(MAX_PAYLOAD),
            frame_stall: Duration::from_secs(20),
            write_stall: Duration::from_secs(30),
            mailbox_bytes: 4 << 20,
            collect_bytes: 64 << 20,
            op_timeout: Duration::from_secs(60),
        }
    }
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

/// How often blocked threads look up from their wait (reader stop, stalls).
const TICK: Duration = Duration::from_millis(100);
/// Bytes a queued frame costs beyond its payload, so that a flood of empty
/// frames is bounded too.
const FRAME_COST: usize = 64;
/// Request ids that [`AgentClient::send_raw`] registers, at most.
const RAW_ROUTES: usize = 64;

/// Frames for one request, filled by the reader thread, taken by the caller.
#[derive(Default)]
struct Mailbox {
    slot: Mutex<Slot>,
    changed: Condvar,
}

#[derive(Default)]
struct Slot {
    frames: VecDeque<Frame>,
    bytes: usize,
    /// The session closed, for this reason; frames queued before stay readable.
    closed: Option<String>,
    /// The caller went away: nothing more is queued.
    abandoned: bool,
    /// The request's `Response` has arrived: nothing more will.
    ended: bool,
    /// Flow control, for windowed requests.
    flow: Option<Flow>,
}

/// Both windows of a windowed request, as the host sees them.
#[derive(Debug, Clone, Copy)]
struct Flow {
    /// Data bytes the host may still send.
    send_credit: u64,
    /// Data bytes the agent may send in total (initial window + grants).
    recv_allowed: u64,
    /// Data bytes the agent has sent.
    recv_seen: u64,
    /// Data bytes the caller took and the host has not granted back yet.
    unacked: u64,
    /// The agent sent past `recv_allowed`.
    violated: bool,
}

impl Flow {
    fn new() -> Flow {
        Flow {
            send_credit: u64::from(WINDOW),
            recv_allowed: u64::from(WINDOW),
            recv_seen: 0,
            unacked: 0,
            violated: false,
        }
    }
}

/// Why a mailbox wait ended without a frame.
enum Waited {
    Closed(String),
    Deadline,
    /// The agent broke flow control (frames queued before were taken).
    Violated {
        sent: u64,
        allowed: u64,
    },
    /// The request's `Response` has arrived (credit waits only).
    Ended,
}

impl Mailbox {
    /// Queues a frame, first waiting while the mailbox is over `budget` and
    /// its caller still wants frames. False when the frame was dropped.
    ///
    /// A windowed request's mailbox never makes the reader wait (its caller
    /// may be blocked sending, waiting for a grant only the reader can
    /// deliver): its data is bounded by the window, its other frames by
    /// `budget`, and a guest that exceeds either fails that request alone.
    fn deliver(&self, frame: Frame, budget: usize, stop: &AtomicBool) -> bool {
        let mut s = lock(&self.slot);
        if s.flow.is_none() {
            while s.bytes >= budget && !s.abandoned && s.closed.is_none() {
                if stop.load(Ordering::SeqCst) {
                    return false;
                }
                s = self
                    .changed
                    .wait_timeout(s, TICK)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        if frame.kind == Kind::Response {
            // Nothing more comes for this request, whether or not the
            // response itself is queued: senders waiting for credit stop.
            s.ended = true;
            self.changed.notify_all();
        }
        if s.abandoned || s.closed.is_some() {
            return false;
        }
        let cost = frame.payload.len() + FRAME_COST;
        let queued = s.bytes;
        if let Some(flow) = s.flow.as_mut() {
            if flow.violated {
                return false;
            }
            if frame.kind.is_data() {
                flow.recv_seen += frame.payload.len() as u64;
            }
            if flow.recv_seen > flow.recv_allowed
                || (!frame.kind.is_data() && queued + cost > budget + WINDOW as usize)
            {
                // Queue nothing more: the caller learns of it after the
                // frames already queued, and the session goes on.
                flow.violated = true;
                self.changed.notify_all();
                return false;
            }
        }
        s.bytes += cost;
        s.frames.push_back(frame);
        self.changed.notify_all();
        true
    }

    /// Adds send credit from a `Window` frame.
    fn grant(&self, bytes: u32) {
        let mut s = lock(&self.slot);
        if let Some(flow) = s.flow.as_mut() {
            flow.send_credit = flow.send_credit.saturating_add(u64::from(bytes));
            self.changed.notify_all();
        }
    }

    /// Waits for send credit and takes up to `max` bytes of it.
    fn take_credit(&self, max: usize, deadline: Option<Instant>) -> Result<usize, Waited> {
        let mut s = lock(&self.slot);
        loop {
            if let Some(reason) = &s.closed {
                return Err(Waited::Closed(reason.clone()));
            }
            if s.ended || s.abandoned {
                return Err(Waited::Ended);
            }
            let Some(flow) = s.flow.as_mut() else {
                // Not windowed: no limit.
                return Ok(max);
            };
            if flow.violated {
                return Err(Waited::Violated {
                    sent: flow.recv_seen,
                    allowed: flow.recv_allowed,
                });
            }
            if flow.send_credit > 0 {
                let n = max.min(usize::try_from(flow.send_credit).unwrap_or(usize::MAX));
                flow.send_credit -= n as u64;
                return Ok(n);
            }
            s = match deadline {
                None => self.changed.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Waited::Deadline);
                    }
                    self.changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// Records that the caller took `bytes` of data; returns a grant to send
    /// back once a quarter window has been taken (already counted as allowed).
    fn consumed(&self, bytes: usize) -> Option<u32> {
        let mut s = lock(&self.slot);
        let flow = s.flow.as_mut()?;
        flow.unacked += bytes as u64;
        if flow.unacked < u64::from(WINDOW / 4) {
            return None;
        }
        let grant = u32::try_from(flow.unacked).unwrap_or(u32::MAX);
        flow.unacked -= u64::from(grant);
        flow.recv_allowed += u64::from(grant);
        Some(grant)
    }

    /// The next frame, waiting until `deadline` (forever when `None`).
    fn take(&self, deadline: Option<Instant>) -> Result<Frame, Waited> {
        let mut s = lock(&self.slot);
        loop {
            if let Some(f) = s.frames.pop_front() {
                s.bytes -= f.payload.len() + FRAME_COST;
                // The reader may be waiting for room.
                self.changed.notify_all();
                return Ok(f);
            }
            if let Some(reason) = &s.closed {
                return Err(Waited::Closed(reason.clone()));
            }
            if let Some(flow) = s.flow.filter(|f| f.violated) {
                return Err(Waited::Violated {
                    sent: flow.recv_seen,
                    allowed: flow.recv_allowed,
                });
            }
            s = match deadline {
                None => self.changed.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Waited::Deadline);
                    }
                    self.changed
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// A frame if one is queued, without waiting.
    fn try_take(&self) -> Option<Frame> {
        let mut s = lock(&self.slot);
        let f = s.frames.pop_front()?;
        s.bytes -= f.payload.len() + FRAME_COST;
        self.changed.notify_all();
        Some(f)
    }

    fn close(&self, reason: &str) {
        let mut s = lock(&self.slot);
        s.closed.get_or_insert_with(|| reason.to_string());
        self.changed.notify_all();
    }

    fn abandon(&self) {
        let mut s = lock(&self.slot);
        s.abandoned = true;
        s.frames.clear();
        s.bytes = 0;
        self.changed.notify_all();
    }
}

/// The sending half: one frame at a time, each within a deadline.
struct Writer {
    stream: UnixStream,
    busy: Mutex<bool>,
    freed: Condvar,
}

/// Why a frame was not sent.
enum SendFailure {
    /// Nothing went out before the deadline: the channel is intact.
    Timeout,
    /// The deadline passed with part of the frame sent: the channel is cut.
    Cut,
    Io(io::Error),
}

impl Writer {
    /// Writes `bytes` whole before `deadline`, or fails saying whether a part went out.
    fn send(&self, bytes: &[u8], deadline: Instant) -> Result<(), SendFailure> {
        {
            let mut busy = lock(&self.busy);
            while *busy {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(SendFailure::Timeout);
                }
                busy = self
                    .freed
                    .wait_timeout(busy, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            *busy = true;
        }
        let r = self.write_before(bytes, deadline);
        *lock(&self.busy) = false;
        self.freed.notify_one();
        r
    }

    fn write_before(&self, bytes: &[u8], deadline: Instant) -> Result<(), SendFailure> {
        let mut done = 0;
        while done < bytes.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let failed = if done == 0 {
                SendFailure::Timeout
            } else {
                SendFailure::Cut
            };
            if left.is_zero() {
                return Err(failed);
            }
            self.stream
                .set_write_timeout(Some(left))
                .map_err(SendFailure::Io)?;
            match (&self.stream).write(&bytes[done..]) {
                Ok(0) => {
                    return Err(SendFailure::Io(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the agent channel took no bytes",
                    )))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(failed);
                    }
                }
                Err(e) => return Err(SendFailure::Io(e)),
            }
        }
        Ok(())
    }
}

/// State shared by the callers and the reader thread.
struct Shared {
    routes: Mutex<HashMap<u32, Arc<Mailbox>>>,
    closed: Mutex<Option<String>>,
    /// Mailboxes registered by `send_raw`, oldest first; kept here too
    /// because the route goes when the response arrives.
    raw: Mutex<VecDeque<(u32, Arc<Mailbox>)>>,
    writer: Writer,
    /// Set when the client is dropped: the reader stops.
    stop: AtomicBool,
    limits: Limits,
    next_id: AtomicU32,
}

impl Shared {
    /// Marks the session closed (the first reason wins), wakes every waiter
    /// and shuts the socket so that QEMU takes the next connection.
    fn close(&self, reason: String) {
        let mut routes = lock(&self.routes);
        let reason = lock(&self.closed).get_or_insert(reason).clone();
        for (_, mb) in routes.drain() {
            mb.close(&reason);
        }
        drop(routes);
        let _ = self.writer.stream.shutdown(std::net::Shutdown::Both);
    }

    fn closed_reason(&self) -> Option<String> {
        lock(&self.closed).clone()
    }

    fn reserve_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks the agent to end request `target` early, without waiting for
    /// the answer (handles call this when dropped unfinished).
    fn cancel_quietly(&self, target: u32) {
        let deadline = Instant::now() + self.limits.exec_grace.min(self.limits.write_stall);
        let _ = self.send(
            Kind::Request,
            self.reserve_id(),
            &encode(&Request::Cancel { target }),
            deadline,
        );
    }

    /// Registers a mailbox for `id` (replacing one a caller no longer has),
    /// flow-controlled when `windowed`.
    fn register(&self, id: u32, windowed: bool) -> Result<Arc<Mailbox>, ClientError> {
        // Checked under the routes lock: `close` drains routes under the same
        // lock after setting `closed`, so a request either sees the close or
        // has its mailbox closed by it.
        let mut routes = lock(&self.routes);
        if let Some(reason) = self.closed_reason() {
            return Err(ClientError::Closed(reason));
        }
        let mb = Arc::new(Mailbox::default());
        if windowed {
            lock(&mb.slot).flow = Some(Flow::new());
        }
        if let Some(old) = routes.insert(id, Arc::clone(&mb)) {
            old.abandon();
        }
        Ok(mb)
    }

    fn unregister(&self, id: u32, mb: &Arc<Mailbox>) {
        mb.abandon();
        let mut routes = lock(&self.routes);
        if routes.get(&id).is_some_and(|m| Arc::ptr_eq(m, mb)) {
            routes.remove(&id);
        }
    }

    /// Sends one frame before `deadline`.
    fn send(
        &self,
        kind: Kind,
        id: u32,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<(), ClientError> {
        if let Some(reason) = self.closed_reason() {
            return Err(ClientError::Closed(reason));
        }
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_PAYLOAD)
            .ok_or_else(|| {
                ClientError::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("frame payload of {} bytes exceeds the limit", payload.len()),
                ))
            })?;
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&Header::encode(kind, id, len));
        buf.extend_from_slice(payload);
        self.send_bytes(&buf, deadline)
    }

    fn send_bytes(&self, bytes: &[u8], deadline: Instant) -> Result<(), ClientError> {
        let waited = deadline.saturating_duration_since(Instant::now());
        match self.writer.send(bytes, deadline) {
            Ok(()) => Ok(()),
            Err(SendFailure::Timeout) => Err(ClientError::SendTimeout(waited)),
            Err(SendFailure::Cut) => {
                let reason = format!(
                    "the guest agent stopped reading its channel in the middle of a frame for \
                     {waited:?}; the session is closed"
                );
                self.close(reason.clone());
                Err(ClientError::Closed(reason))
            }
            Err(SendFailure::Io(e)) => Err(match self.closed_reason() {
                Some(reason) => ClientError::Closed(reason),
                None if e.kind() == io::ErrorKind::BrokenPipe => {
                    ClientError::Closed("broken pipe".into())
                }
                None => ClientError::Io(e),
            }),
        }
    }
}

/// A caller's registration for one request id; unregisters when dropped, so
/// no path out of a request leaves its mailbox behind.
struct Route {
    id: u32,
    mailbox: Arc<Mailbox>,
    shared: Arc<Shared>,
}

impl Route {
    /// The next frame for this request, until `deadline`. Data taken from a
    /// windowed request is granted back to the agent as it is taken.
    fn recv(&self, deadline: Option<Instant>, timeout: Duration) -> Result<Frame, ClientError> {
        let f = self
            .mailbox
            .take(deadline)
            .map_err(|w| self.waited(w, timeout))?;
        if f.kind.is_data() {
            if let Some(grant) = self.mailbox.consumed(f.payload.len()) {
                let deadline = Instant::now() + self.shared.limits.write_stall;
                self.shared
                    .send(Kind::Window, self.id, &window_payload(grant), deadline)?;
            }
        }
        Ok(f)
    }

    fn waited(&self, w: Waited, timeout: Duration) -> ClientError {
        match w {
            Waited::Closed(reason) => ClientError::Closed(reason),
            Waited::Deadline => ClientError::Timeout(timeout),
            Waited::Violated { sent, allowed } => ClientError::FlowControl {
                id: self.id,
                sent,
                allowed,
            },
            Waited::Ended => ClientError::StreamEnded("the agent ended the request"),
        }
    }

    /// The final `Response`, skipping data frames.
    fn response(&self, timeout: Option<Duration>) -> Result<Response, ClientError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let f = self.recv(deadline, timeout.unwrap_or_default())?;
            if f.kind == Kind::Response {
                return parse_response(&f.payload);
            }
        }
    }

    /// Sends `data` as frames of `kind`, each within the flow-control window
    /// of a windowed request (waiting for grants until `deadline`).
    fn send_data(
        &self,
        kind: Kind,
        mut data: &[u8],
        deadline: Option<Instant>,
    ) -> Result<(), ClientError> {
        if data.is_empty() {
            // An empty frame ends the stream; it needs no credit.
            return self.shared.send(kind, self.id, &[], self.send_by(deadline));
        }
        let timeout = deadline.map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
        });
        while !data.is_empty() {
            let n = self
                .mailbox
                .take_credit(data.len().min(CHUNK), deadline)
                .map_err(|w| self.waited(w, timeout))?;
            self.shared
                .send(kind, self.id, &data[..n], self.send_by(deadline))?;
            data = &data[n..];
        }
        Ok(())
    }

    fn send_by(&self, deadline: Option<Instant>) -> Instant {
        let stall = Instant::now() + self.shared.limits.write_stall;
        deadline.map_or(stall, |d| d.min(stall))
    }

    /// Whether the request's `Response` has arrived.
    fn ended(&self) -> bool {
        lock(&self.mailbox.slot).ended
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        self.shared.unregister(self.id, &self.mailbox);
    }
}

/// A connected, handshaken agent session.
pub struct AgentClient {
    shared: Arc<Shared>,
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
        Self::connect_with(stream, timeout, Limits::default(), keep_waiting)
    }

    /// [`Self::connect_while`] with other [`Limits`] than the defaults.
    pub fn connect_with(
        stream: UnixStream,
        timeout: Duration,
        limits: Limits,
        keep_waiting: &mut dyn FnMut() -> Result<(), ClientError>,
    ) -> Result<AgentClient, ClientError> {
        let nonce = nonce();
        let deadline = Instant::now() + timeout;
        let writer = Writer {
            stream: stream.try_clone()?,
            busy: Mutex::new(false),
            freed: Condvar::new(),
        };
        let hello = |w: &Writer| {
            let mut bytes = Vec::new();
            crate::frame::write_frame(&mut bytes, Kind::Hello, 0, &encode(&Hello { nonce }))?;
            match w.send(&bytes, deadline) {
                Ok(()) => Ok(()),
                Err(SendFailure::Timeout | SendFailure::Cut) => {
                    Err(ClientError::HandshakeTimeout(timeout))
                }
                Err(SendFailure::Io(e)) => Err(ClientError::Io(e)),
            }
        };
        hello(&writer)?;
        let mut last_hello = Instant::now();

        // The decoder bounds what a flood costs; the deadline bounds how long.
        let mut decoder = FrameDecoder::new();
        let mut chunk = vec![0u8; CHUNK];
        let mut reader = stream;
        let ack = 'ack: loop {
            while let Some(r) = decoder.next_frame() {
                // Anything before our ack is left over from an earlier session.
                if let Ok(f) = r {
                    if f.kind == Kind::HelloAck {
                        if let Ok(ack) = decode::<HelloAck>(&f.payload) {
                            if ack.nonce == nonce {
                                break 'ack ack;
                            }
                        }
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::HandshakeTimeout(timeout));
            }
            reader.set_read_timeout(Some(left.min(TICK)))?;
            let want = decoder.space().min(chunk.len());
            match reader.read(&mut chunk[..want]) {
                Ok(0) => {
                    return Err(ClientError::Closed(
                        "connection closed during the handshake".into(),
                    ))
                }
                Ok(n) => {
                    decoder.push(&chunk[..n]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    keep_waiting()?;
                    // Say hello again now and then: an agent that was not
                    // listening yet (still booting, or between sessions) has
                    // not seen the first one.
                    if last_hello.elapsed() >= Duration::from_secs(1) {
                        hello(&writer)?;
                        last_hello = Instant::now();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::Io(e)),
            }
        };
        if ack.protocol != PROTOCOL {
            return Err(ClientError::ProtocolMismatch {
                agent: ack.protocol,
                host: PROTOCOL,
                agent_version: ack.agent_version,
            });
        }
        reader.set_read_timeout(Some(TICK))?;

        let shared = Arc::new(Shared {
            routes: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            raw: Mutex::new(VecDeque::new()),
            writer,
            stop: AtomicBool::new(false),
            limits,
            // A random base: a restored guest's agent may still run requests
            // of an earlier session (its parent's) under small ids, whose
            // late frames must not be mistaken for ours.
            next_id: AtomicU32::new(((nonce >> 16) as u32 | 1) & 0x7fff_ffff),
        });
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("forkd-agent-reader".into())
            .spawn(move || {
                let reason = read_loop(reader, decoder, &thread_shared);
                thread_shared.close(reason);
            })?;
        Ok(AgentClient {
            shared,
            reader: Some(handle),
            agent_version: ack.agent_version,
        })
    }

    /// The version string the agent reported in the handshake.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    /// Reason the connection closed, if it did: the guest closed it, a read
    /// failed, or what the guest sent broke a [`Limits`] bound.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.closed_reason()
    }

    /// The bounds this session enforces.
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Registers a route for `id` and sends the request before `deadline`.
    fn start_as(&self, id: u32, req: &Request, deadline: Instant) -> Result<Route, ClientError> {
        let route = Route {
            id,
            mailbox: self.shared.register(id, req.is_windowed())?,
            shared: Arc::clone(&self.shared),
        };
        self.shared
            .send(Kind::Request, id, &encode(req), deadline)?;
        Ok(route)
    }

    /// [`Self::start_as`] under a fresh id, with the default send deadline.
    fn start(&self, req: &Request) -> Result<Route, ClientError> {
        self.start_as(self.reserve_id(), req, self.send_deadline())
    }

    /// [`Self::start`] for a request answered within `timeout`: a send that
    /// does not finish in that time is that request's `Timeout` too.
    fn start_timed(&self, req: &Request, timeout: Duration) -> Result<Route, ClientError> {
        self.start_as(self.reserve_id(), req, Instant::now() + timeout)
            .map_err(|e| match e {
                ClientError::SendTimeout(_) => ClientError::Timeout(timeout),
                e => e,
            })
    }

    fn send_deadline(&self) -> Instant {
        Instant::now() + self.shared.limits.write_stall
    }

    /// Liveness check; fails with `Timeout` when the agent does not answer in time.
    pub fn ping(&self, timeout: Duration) -> Result<Pong, ClientError> {
        let route = self.start_timed(&Request::Ping {}, timeout)?;
        match route.response(Some(timeout))? {
            Response::Pong(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    /// A fresh request id, for a caller that needs to know an exec's id before
    /// it starts (to signal it from another thread); pass it to [`Self::exec_as`].
    pub fn reserve_id(&self) -> u32 {
        self.shared.reserve_id()
    }

    /// Runs a command, streaming its output to `on_output` as it arrives.
    /// `stdin`, when given, is copied to the command from a helper thread.
    ///
    /// With `req.timeout_ms` set, this returns by that timeout plus
    /// [`Limits::exec_grace`] whatever the guest does
    /// ([`ClientError::ExitNotReported`] when the agent stays silent).
    /// Without it, it waits as long as the command runs, and returns when the
    /// session closes.
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
        req: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitStatus, ClientError> {
        self.exec_until(id, req, stdin, &mut |s, b| {
            on_output(s, b);
            true
        })
    }

    /// The exec loop; `on_output` returning false stops the wait for output:
    /// the command is killed and the wait for its exit is cut to the grace.
    fn exec_until(
        &self,
        id: u32,
        mut req: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
        on_output: &mut dyn FnMut(OutputStream, &[u8]) -> bool,
    ) -> Result<ExitStatus, ClientError> {
        let grace = self.shared.limits.exec_grace;
        let timeout = req.timeout_ms.map(Duration::from_millis);
        let mut deadline = timeout.map(|t| Instant::now() + t + grace);
        req.stdin = stdin.is_some();
        let send_by = deadline.map_or(self.send_deadline(), |d| d.min(self.send_deadline()));
        let route = self.start_as(id, &Request::Exec(req), send_by)?;
        if let Some(input) = stdin {
            let shared = Arc::clone(&self.shared);
            std::thread::Builder::new()
                .name("forkd-stdin".into())
                .spawn(move || pump_stdin(input, &shared, id))?;
        }
        let mut refused = false;
        loop {
            let f = match route.mailbox.take(deadline) {
                Ok(f) => f,
                Err(Waited::Closed(reason)) => return Err(ClientError::Closed(reason)),
                Err(Waited::Deadline) => {
                    return Err(ClientError::ExitNotReported {
                        timeout: timeout.unwrap_or_default(),
                        grace,
                    })
                }
                Err(w) => return Err(route.waited(w, Duration::ZERO)),
            };
            let stream = match f.kind {
                Kind::Stdout => OutputStream::Stdout,
                Kind::Stderr => OutputStream::Stderr,
                Kind::Response => {
                    return match parse_response(&f.payload)? {
                        Response::Exited(s) => Ok(s),
                        other => Err(unexpected(&other)),
                    }
                }
                // Other kinds carry nothing for an exec.
                _ => continue,
            };
            if !refused && !on_output(stream, &f.payload) {
                refused = true;
                self.kill_quietly(id);
                let cut = Instant::now() + grace;
                deadline = Some(deadline.map_or(cut, |d| d.min(cut)));
            }
        }
    }

    /// Sends SIGKILL to exec `id` without waiting for the answer.
    fn kill_quietly(&self, id: u32) {
        let req = Request::Signal {
            target: id,
            signal: 9,
        };
        let deadline = Instant::now() + self.shared.limits.exec_grace;
        let _ = self
            .shared
            .send(Kind::Request, self.reserve_id(), &encode(&req), deadline);
    }

    /// Runs a command and collects its output, at most
    /// [`Limits::collect_bytes`] of each stream: a command that writes more is
    /// killed and the call fails with [`ClientError::OutputTooLarge`].
    pub fn exec_collect(
        &self,
        req: ExecRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<Output, ClientError> {
        let limit = self.shared.limits.collect_bytes;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut too_large = None;
        let input = stdin.map(|b| Box::new(io::Cursor::new(b)) as Box<dyn Read + Send>);
        let status = self.exec_until(self.reserve_id(), req, input, &mut |s, b| {
            let (buf, name) = match s {
                OutputStream::Stdout => (&mut stdout, "stdout"),
                OutputStream::Stderr => (&mut stderr, "stderr"),
            };
            if buf.len() + b.len() > limit {
                too_large = Some(name);
                return false;
            }
            buf.extend_from_slice(b);
            true
        });
        if let Some(stream) = too_large {
            return Err(ClientError::OutputTooLarge { stream, limit });
        }
        Ok(Output {
            status: status?,
            stdout,
            stderr,
        })
    }

    /// Writes `data` to `path` in the guest. Returns the bytes written.
    pub fn write_file(
        &self,
        path: &str,
        mode: Option<u32>,
        data: impl Read,
    ) -> Result<u64, ClientError> {
        let opts = WriteOptions {
            mode,
            ..WriteOptions::default()
        };
        self.write_file_with(path, &opts, data)
    }

    /// Reads `path` from the guest into `out`. Returns the bytes read.
    pub fn read_file(&self, path: &str, out: impl Write) -> Result<u64, ClientError> {
        self.read_file_as(path, None, out)
    }

    /// Sends `signal` to the process group of the exec with request id `target`.
    pub fn signal(&self, target: u32, signal: i32) -> Result<(), ClientError> {
        let timeout = Duration::from_secs(10);
        let route = self.start_timed(&Request::Signal { target, signal }, timeout)?;
        match route.response(Some(timeout))? {
            Response::Signalled => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Fork safety for a restored guest: reseeds its CRNG with `entropy`,
    /// steps its clock to now, sets its hostname. Returns the clock step in ms.
    pub fn restore(&self, entropy: &[u8], hostname: &str) -> Result<i64, ClientError> {
        let timeout = Duration::from_secs(30);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let route = self.start_timed(
            &Request::Restore {
                entropy_hex: crate::to_hex(entropy),
                unix_time_ns: now,
                hostname: hostname.to_string(),
            },
            timeout,
        )?;
        match route.response(Some(timeout))? {
            Response::Restored { clock_step_ms } => Ok(clock_step_ms),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks the guest to sync and power off.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), ClientError> {
        let route = self.start_timed(&Request::Shutdown {}, timeout)?;
        match route.response(Some(timeout))? {
            Response::ShuttingDown => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends raw bytes on the channel, bypassing framing (robustness tests).
    ///
    /// Every request id the bytes name in a frame header (malformed frames
    /// included) gets a mailbox first, so a reply that arrives before
    /// [`Self::wait_reply`] is called waits there instead of being dropped.
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        for id in header_ids(bytes) {
            if lock(&self.shared.routes).contains_key(&id) {
                continue;
            }
            let mailbox = self.shared.register(id, false)?;
            let mut raw = lock(&self.shared.raw);
            raw.push_back((id, mailbox));
            while raw.len() > RAW_ROUTES {
                if let Some((old, mb)) = raw.pop_front() {
                    self.shared.unregister(old, &mb);
                }
            }
        }
        self.shared.send_bytes(bytes, self.send_deadline())
    }

    /// Waits for the `Response` to request `id` (for robustness tests that
    /// send raw frames with [`Self::send_raw`]).
    pub fn wait_reply(&self, id: u32, timeout: Duration) -> Result<Response, ClientError> {
        let raw = {
            let mut raw = lock(&self.shared.raw);
            let at = raw.iter().position(|(r, _)| *r == id);
            at.and_then(|i| raw.remove(i)).map(|(_, mb)| mb)
        };
        let mailbox = match raw {
            Some(mb) => mb,
            None => self.shared.register(id, false)?,
        };
        let route = Route {
            id,
            mailbox,
            shared: Arc::clone(&self.shared),
        };
        route.response(Some(timeout))
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Closing both directions ends the reader thread.
        let _ = self.shared.writer.stream.shutdown(std::net::Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// The reader thread: decodes, routes, and watches the bounds. Returns why
/// the session ended.
fn read_loop(mut stream: UnixStream, mut decoder: FrameDecoder, shared: &Shared) -> String {
    let limits = &shared.limits;
    let mut chunk = vec![0u8; CHUNK];
    // Since when the decoder has held a frame that is not complete yet.
    let mut incomplete_since: Option<Instant> = None;
    // Since when bytes have been discarded with no good frame after them.
    let mut garbage_since: Option<Instant> = None;
    // The last read found no more bytes waiting. Stalls are judged only
    // then: after the host itself was stopped (SIGSTOP, a debugger) the
    // bytes that queued up meanwhile are read before any clock is believed.
    let mut caught_up = false;
    loop {
        let mut progressed = false;
        while let Some(r) = decoder.next_frame() {
            // Decode errors need no action: the decoder has consumed the bad
            // bytes and counts them; the bounds below judge the amount.
            if let Ok(f) = r {
                route_frame(f, shared);
                progressed = true;
            }
        }
        let now = Instant::now();
        if decoder.discarded() > limits.max_garbage {
            return format!(
                "the guest wrote {} bytes that are not agent frames; the channel is corrupted \
                 (something in the guest besides the agent writes to its port)",
                decoder.discarded()
            );
        }
        garbage_since = match decoder.discarded() {
            0 => None,
            _ => garbage_since.or(Some(now)),
        };
        incomplete_since = match (decoder.buffered(), progressed) {
            (0, _) => None,
            // Routing may have waited for a slow caller: the clock starts now.
            (_, true) => Some(now),
            (_, false) => incomplete_since.or(Some(now)),
        };
        let stalled = |since: Option<Instant>| {
            caught_up && since.is_some_and(|t| now - t > limits.frame_stall)
        };
        if stalled(garbage_since) {
            return format!(
                "the guest wrote {} bytes that are not agent frames and no frame for {:?}; \
                 the channel is corrupted",
                decoder.discarded(),
                limits.frame_stall
            );
        }
        if stalled(incomplete_since) {
            return format!(
                "a frame from the guest stayed incomplete for {:?} ({} bytes of it arrived); \
                 the channel is corrupted or the agent is stuck mid-frame",
                limits.frame_stall,
                decoder.buffered()
            );
        }
        if shared.stop.load(Ordering::SeqCst) {
            return "the client closed the session".into();
        }
        let want = decoder.space().min(chunk.len());
        match stream.read(&mut chunk[..want]) {
            Ok(0) => return "the guest side closed the channel".into(),
            Ok(n) => {
                decoder.push(&chunk[..n]);
                caught_up = n < want;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                caught_up = true;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return format!("read error: {e}"),
        }
    }
}

/// Hands a frame to the mailbox of its request; drops it when none waits.
/// `Window` frames are credit for the request's sender, not queued.
fn route_frame(f: Frame, shared: &Shared) {
    let Some(mb) = lock(&shared.routes).get(&f.id).cloned() else {
        return;
    };
    if f.kind == Kind::Window {
        if let Some(bytes) = parse_window(&f.payload) {
            mb.grant(bytes);
        }
        return;
    }
    let id = f.id;
    let last = f.kind == Kind::Response;
    mb.deliver(f, shared.limits.mailbox_bytes, &shared.stop);
    if last {
        // Nothing after the response belongs to this request.
        let mut routes = lock(&shared.routes);
        if routes.get(&id).is_some_and(|m| Arc::ptr_eq(m, &mb)) {
            routes.remove(&id);
        }
    }
}

fn pump_stdin(mut input: Box<dyn Read + Send>, shared: &Shared, id: u32) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let deadline = Instant::now() + shared.limits.write_stall;
        if shared.send(Kind::Stdin, id, &buf[..n], deadline).is_err() || n == 0 {
            return;
        }
    }
}

/// Request ids named by frame headers in `bytes` (malformed ones included).
fn header_ids(bytes: &[u8]) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut d = FrameDecoder::new();
    let mut rest = bytes;
    loop {
        let n = d.push(rest);
        rest = &rest[n..];
        while let Some(r) = d.next_frame() {
            match r {
                Ok(f) => ids.push(f.id),
                Err(e) => ids.extend(e.frame_id()),
            }
        }
        if rest.is_empty() {
            // A header whose payload is cut off at the end still names its id.
            ids.extend(d.pending_header().map(|h| h.id));
            return ids;
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
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
