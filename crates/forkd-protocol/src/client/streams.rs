//! Handles on windowed requests that outlive one call: an [`Attachment`] to
//! a process's output, an [`InputStream`] to its stdin, a [`TcpRelay`] to a
//! port in the guest. Each owns its request's route (so it is `'static` and
//! `Send`), takes data as its caller reads it (granting the agent more only
//! then), and cancels its request on the agent when dropped unfinished.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{lock, parse_response, unexpected, ClientError, Route};
use crate::frame::Kind;
use crate::{decode, Event, ExitStatus, ProcInfo, Response};

/// What an [`Attachment`] delivers next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Bytes from the process's terminal.
    Pty(Vec<u8>),
    /// The backlog dropped this many bytes before they were sent to this
    /// attachment; output goes on after the gap.
    Dropped(u64),
    /// The process ended (last event).
    Ended(ExitStatus),
    /// The attachment was cancelled; the process goes on (last event).
    Detached,
}

impl AttachEvent {
    fn is_last(&self) -> bool {
        matches!(self, AttachEvent::Ended(_) | AttachEvent::Detached)
    }
}

/// Follows a process's output (`ProcAttach`, or `ProcStart` with attach).
///
/// Take events with [`Self::next`] until `Ended` or `Detached`; dropping it
/// earlier detaches (the process keeps running).
pub struct Attachment {
    route: Route,
    info: ProcInfo,
    done: bool,
}

impl Attachment {
    /// Waits (until `timeout`) for the `Started`/`Attached` event that opens
    /// the stream, or the error that refuses it.
    pub(super) fn open(route: Route, timeout: Duration) -> Result<Attachment, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let f = route
                .recv(Some(deadline), timeout)
                .inspect_err(|_| cancel(&route))?;
            match f.kind {
                Kind::Event => match decode::<Event>(&f.payload) {
                    Ok(Event::Started(info) | Event::Attached(info)) => {
                        return Ok(Attachment {
                            route,
                            info,
                            done: false,
                        })
                    }
                    // Anything else before the opening event is noise.
                    _ => continue,
                },
                Kind::Response => {
                    return Err(match parse_response(&f.payload) {
                        Err(e) => e,
                        Ok(other) => unexpected(&other),
                    })
                }
                _ => continue,
            }
        }
    }

    /// The process, as it was when the attachment opened.
    pub fn info(&self) -> &ProcInfo {
        &self.info
    }

    /// The request id of this attachment (what `Cancel` would name).
    pub fn request_id(&self) -> u32 {
        self.route.id
    }

    /// The next event, waiting up to `timeout` (forever when `None`). A
    /// `Timeout` error leaves the attachment usable; after `Ended` or
    /// `Detached` every call fails with `StreamEnded`.
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<AttachEvent, ClientError> {
        if self.done {
            return Err(ClientError::StreamEnded(
                "the attachment has delivered its last event",
            ));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let f = match self.route.recv(deadline, timeout.unwrap_or_default()) {
                Ok(f) => f,
                Err(e @ ClientError::Timeout(_)) => return Err(e),
                Err(e) => {
                    self.done = true;
                    return Err(e);
                }
            };
            let event = match f.kind {
                Kind::Stdout => AttachEvent::Stdout(f.payload),
                Kind::Stderr => AttachEvent::Stderr(f.payload),
                Kind::Pty => AttachEvent::Pty(f.payload),
                Kind::Event => match decode::<Event>(&f.payload) {
                    Ok(Event::Dropped { bytes }) => AttachEvent::Dropped(bytes),
                    _ => continue,
                },
                Kind::Response => {
                    self.done = true;
                    match parse_response(&f.payload)? {
                        Response::ProcEnded(status) => AttachEvent::Ended(status),
                        Response::Detached => AttachEvent::Detached,
                        other => return Err(unexpected(&other)),
                    }
                }
                _ => continue,
            };
            self.done = event.is_last();
            return Ok(event);
        }
    }

    /// Follows the output to the end, handing every event to `on_event`;
    /// returns how the process ended (`None` when detached).
    pub fn wait(
        mut self,
        mut on_event: impl FnMut(&AttachEvent),
    ) -> Result<Option<ExitStatus>, ClientError> {
        loop {
            let e = self.next(None)?;
            on_event(&e);
            match e {
                AttachEvent::Ended(status) => return Ok(Some(status)),
                AttachEvent::Detached => return Ok(None),
                _ => {}
            }
        }
    }

    /// Detaches, waiting up to `timeout` for the agent to confirm (output
    /// still in flight is discarded). The process keeps running.
    pub fn detach(mut self, timeout: Duration) -> Result<(), ClientError> {
        if self.done {
            return Ok(());
        }
        self.route.shared.cancel_quietly(self.route.id);
        let deadline = Instant::now() + timeout;
        while !self.done {
            let left = deadline.saturating_duration_since(Instant::now());
            self.next(Some(left))?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("request", &self.route.id)
            .field("pid", &self.info.pid)
            .field("done", &self.done)
            .finish()
    }
}

impl std::fmt::Debug for InputStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputStream")
            .field("request", &self.route.id)
            .finish()
    }
}

impl std::fmt::Debug for TcpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRelay")
            .field("request", &self.reader.inner.route.id)
            .finish()
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if !self.done {
            cancel(&self.route);
        }
    }
}

/// Writes to a process's stdin (`ProcInput`). Bytes go out as the agent
/// takes them (flow-controlled); [`Self::finish`] ends the input and
/// returns how many bytes the process was given. Dropping it unfinished
/// abandons the rest (the agent stops writing).
pub struct InputStream {
    route: Route,
    timeout: Option<Duration>,
    finished: bool,
}

impl InputStream {
    pub(super) fn new(route: Route, timeout: Option<Duration>) -> InputStream {
        InputStream {
            route,
            timeout,
            finished: false,
        }
    }

    /// How long one write may wait for the agent to take input (a process
    /// that does not read its stdin); `None` waits as long as it takes.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Sends `data`, all of it, or fails (with the agent's refusal when it
    /// refused the input: an unknown process, a closed stdin).
    pub fn send(&mut self, data: &[u8]) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        let deadline = self.timeout.map(|t| Instant::now() + t);
        match self.route.send_data(Kind::Stdin, data, deadline) {
            Err(ClientError::StreamEnded(_)) => Err(self.refusal()),
            other => other,
        }
    }

    /// Ends the input (closing stdin if the request asked for it) and
    /// returns the bytes the agent wrote to the process.
    pub fn finish(mut self) -> Result<u64, ClientError> {
        self.finished = true;
        if !self.route.ended() {
            self.route.send_data(Kind::Stdin, &[], None)?;
        }
        let timeout = self.timeout.unwrap_or(self.route.shared.limits.write_stall);
        match self.route.response(Some(timeout))? {
            Response::InputWritten { bytes } => Ok(bytes),
            other => Err(unexpected(&other)),
        }
    }

    /// The agent's answer once the request has ended early.
    fn refusal(&mut self) -> ClientError {
        self.finished = true;
        match self.route.response(Some(Duration::from_secs(1))) {
            Err(e) => e,
            Ok(other) => unexpected(&other),
        }
    }
}

impl Write for InputStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf).map_err(io_error)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for InputStream {
    fn drop(&mut self) {
        if !self.finished {
            cancel(&self.route);
        }
    }
}

/// The shared part of a relay's two halves.
struct RelayInner {
    route: Route,
    /// How the relay ended, once the agent said so: bytes (sent, received).
    end: Mutex<Option<Result<(u64, u64), String>>>,
}

impl Drop for RelayInner {
    fn drop(&mut self) {
        cancel(&self.route);
    }
}

/// A TCP connection to a port inside the guest, relayed over the agent
/// channel (`TcpConnect`). Read and write it like a socket, or
/// [`Self::split`] it for two threads. Dropping both halves closes it.
pub struct TcpRelay {
    reader: RelayReader,
    writer: RelayWriter,
}

/// The receiving half of a [`TcpRelay`].
pub struct RelayReader {
    inner: Arc<RelayInner>,
    pending: Vec<u8>,
    pos: usize,
    eof: bool,
    timeout: Option<Duration>,
}

/// The sending half of a [`TcpRelay`].
pub struct RelayWriter {
    inner: Arc<RelayInner>,
    shut: bool,
    timeout: Option<Duration>,
}

impl TcpRelay {
    /// Waits (until `timeout`) for `Connected`, or the refusal.
    pub(super) fn open(route: Route, timeout: Duration) -> Result<TcpRelay, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let f = route
                .recv(Some(deadline), timeout)
                .inspect_err(|_| cancel(&route))?;
            match f.kind {
                Kind::Event if matches!(decode::<Event>(&f.payload), Ok(Event::Connected)) => {
                    break;
                }
                Kind::Response => {
                    return Err(match parse_response(&f.payload) {
                        Err(e) => e,
                        Ok(other) => unexpected(&other),
                    })
                }
                _ => continue,
            }
        }
        let inner = Arc::new(RelayInner {
            route,
            end: Mutex::new(None),
        });
        Ok(TcpRelay {
            reader: RelayReader {
                inner: Arc::clone(&inner),
                pending: Vec::new(),
                pos: 0,
                eof: false,
                timeout: None,
            },
            writer: RelayWriter {
                inner,
                shut: false,
                timeout: None,
            },
        })
    }

    /// The two halves, for a reader thread and a writer thread.
    pub fn split(self) -> (RelayReader, RelayWriter) {
        (self.reader, self.writer)
    }

    pub fn set_read_timeout(&mut self, t: Option<Duration>) {
        self.reader.set_timeout(t);
    }

    pub fn set_write_timeout(&mut self, t: Option<Duration>) {
        self.writer.set_timeout(t);
    }

    /// Ends the direction towards the guest (its server reads EOF).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.writer.shutdown()
    }
}

impl Read for TcpRelay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for TcpRelay {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

impl RelayReader {
    /// How long a read waits for bytes (`TimedOut` after); `None`: forever.
    pub fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
    }

    /// Waits (up to `timeout`) for the relay to end in both directions and
    /// returns the bytes sent to and received from the guest's port. Data
    /// still arriving is discarded. The agent ends a relay once the guest
    /// has closed its side and the host has shut down writing (or on
    /// cancellation).
    pub fn wait_closed(&mut self, timeout: Duration) -> Result<(u64, u64), ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = lock(&self.inner.end).clone() {
                return end.map_err(ClientError::Protocol);
            }
            let f = self.inner.route.recv(Some(deadline), timeout)?;
            if f.kind == Kind::Response {
                self.eof = true;
                let end = match parse_response(&f.payload) {
                    Ok(Response::RelayClosed { sent, received }) => Ok((sent, received)),
                    Ok(other) => return Err(unexpected(&other)),
                    Err(e) => return Err(e),
                };
                *lock(&self.inner.end) = Some(end.clone());
                return Ok(end.unwrap_or_default());
            }
        }
    }
}

impl Read for RelayReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.pending.len() {
            if self.eof || buf.is_empty() {
                return Ok(0);
            }
            let deadline = self.timeout.map(|t| Instant::now() + t);
            let f = self
                .inner
                .route
                .recv(deadline, self.timeout.unwrap_or_default())
                .map_err(io_error)?;
            match f.kind {
                Kind::Data if f.payload.is_empty() => self.eof = true,
                Kind::Data => {
                    self.pending = f.payload;
                    self.pos = 0;
                }
                Kind::Response => {
                    self.eof = true;
                    let end = match parse_response(&f.payload) {
                        Ok(Response::RelayClosed { sent, received }) => Ok((sent, received)),
                        Ok(other) => Err(unexpected(&other).to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let failed = end.as_ref().err().cloned();
                    *lock(&self.inner.end) = Some(end);
                    if let Some(e) = failed {
                        return Err(io::Error::new(io::ErrorKind::ConnectionReset, e));
                    }
                }
                _ => {}
            }
        }
        let n = buf.len().min(self.pending.len() - self.pos);
        buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl RelayWriter {
    /// How long a write waits for the guest to take bytes; `None`: forever.
    pub fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
    }

    /// Ends the direction towards the guest (idempotent).
    pub fn shutdown(&mut self) -> io::Result<()> {
        if self.shut {
            return Ok(());
        }
        self.shut = true;
        if self.inner.route.ended() {
            return Ok(());
        }
        self.inner
            .route
            .send_data(Kind::Data, &[], None)
            .map_err(io_error)
    }
}

impl Write for RelayWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.shut {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the relay's sending side was shut down",
            ));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.timeout.map(|t| Instant::now() + t);
        self.inner
            .route
            .send_data(Kind::Data, buf, deadline)
            .map_err(io_error)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Cancels the route's request on the agent unless it has ended.
fn cancel(route: &Route) {
    if !route.ended() {
        route.shared.cancel_quietly(route.id);
    }
}

/// A client error as an I/O error for the `Read`/`Write` impls.
fn io_error(e: ClientError) -> io::Error {
    let kind = match &e {
        ClientError::Timeout(_) => io::ErrorKind::TimedOut,
        ClientError::StreamEnded(_) => io::ErrorKind::BrokenPipe,
        ClientError::Io(e) => e.kind(),
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}
