//! One host connection's view of the agent: its requests in flight.
//!
//! A [`Session`] lives from a `Hello` to the next one (or the channel's
//! end). Every request of protocol 2 gets a [`Stream`]: the place its thread
//! sends frames through (waiting for the host's `Window` grants when the
//! request is windowed), receives the host's data frames from (granting the
//! host more as it consumes them), and learns that it was cancelled —
//! by a `Cancel` request, or because the session ended. Things the agent
//! owns beyond a session (processes, watches, the interpreter) are not
//! here; a session's end only stops its requests' streams.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forkd_protocol::frame::{window_payload, write_frame};
use forkd_protocol::{encode, Event, Kind, Response, CHUNK, WINDOW};

/// The channel's writing end, shared by every thread that sends frames.
pub type Writer = Arc<Mutex<Box<dyn Write + Send>>>;

/// How often waits look up to check for cancellation.
pub const TICK: Duration = Duration::from_millis(100);

/// The requests of one host connection.
pub struct Session {
    writer: Writer,
    alive: AtomicBool,
    streams: Mutex<HashMap<u32, Arc<Stream>>>,
}

impl Session {
    pub fn new(writer: Writer) -> Arc<Session> {
        Arc::new(Session {
            writer,
            alive: AtomicBool::new(true),
            streams: Mutex::new(HashMap::new()),
        })
    }

    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Ends the session: every stream is cancelled and nothing more is sent.
    pub fn close(&self) {
        self.alive.store(false, Ordering::SeqCst);
        let streams: Vec<Arc<Stream>> = lock(&self.streams).drain().map(|(_, s)| s).collect();
        for s in streams {
            s.cancel();
        }
    }

    /// Registers request `id` (called on the read loop, before its thread
    /// starts, so that data frames right behind the request find it).
    pub fn open(self: &Arc<Self>, id: u32, windowed: bool) -> Arc<Stream> {
        let s = Arc::new(Stream {
            id,
            windowed,
            session: Arc::clone(self),
            state: Mutex::new(StreamState {
                credit: u64::from(WINDOW),
                ..StreamState::default()
            }),
            changed: Condvar::new(),
        });
        if let Some(old) = lock(&self.streams).insert(id, Arc::clone(&s)) {
            old.cancel();
        }
        if !self.alive() {
            s.cancel();
        }
        s
    }

    pub fn stream(&self, id: u32) -> Option<Arc<Stream>> {
        lock(&self.streams).get(&id).cloned()
    }

    /// Sends one frame unless the session has ended. A failed write means
    /// the host went away; the next session starts clean after its handshake.
    pub fn send(&self, kind: Kind, id: u32, payload: &[u8]) {
        if self.alive() {
            let _ = write_frame(&mut **lock(&self.writer), kind, id, payload);
        }
    }

    fn remove(&self, id: u32, stream: &Arc<Stream>) {
        let mut streams = lock(&self.streams);
        if streams.get(&id).is_some_and(|s| Arc::ptr_eq(s, stream)) {
            streams.remove(&id);
        }
    }
}

#[derive(Default)]
struct StreamState {
    /// Data bytes the agent may still send (windowed streams).
    credit: u64,
    /// Data frames from the host, not yet taken.
    inbound: VecDeque<Vec<u8>>,
    inbound_bytes: usize,
    /// Bytes taken and not yet granted back to the host.
    unacked: usize,
    /// The host ended its data (an empty frame).
    eof: bool,
    cancelled: bool,
    finished: bool,
    /// Run once at cancellation (e.g. shutting a relayed socket).
    on_cancel: Vec<Box<dyn FnOnce() + Send>>,
}

/// What [`Stream::recv`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    Data(Vec<u8>),
    /// The host ended its data.
    Eof,
    /// The request was cancelled.
    Cancelled,
    /// Nothing arrived within the wait.
    Idle,
}

/// The request was cancelled (or its session ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

/// One request's frames, both ways.
pub struct Stream {
    id: u32,
    windowed: bool,
    session: Arc<Session>,
    state: Mutex<StreamState>,
    changed: Condvar,
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn cancel(&self) {
        let hooks = {
            let mut s = lock(&self.state);
            if s.cancelled {
                return;
            }
            s.cancelled = true;
            self.changed.notify_all();
            std::mem::take(&mut s.on_cancel)
        };
        for h in hooks {
            h();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        lock(&self.state).cancelled
    }

    /// Runs `hook` when the request is cancelled (at once if it is).
    pub fn on_cancel(&self, hook: Box<dyn FnOnce() + Send>) {
        let mut s = lock(&self.state);
        if s.cancelled {
            drop(s);
            hook();
        } else {
            s.on_cancel.push(hook);
        }
    }

    /// Waits until cancelled or `timeout` passes; true when cancelled.
    pub fn wait_cancelled(&self, timeout: Duration) -> bool {
        let s = lock(&self.state);
        let (s, _) = self
            .changed
            .wait_timeout_while(s, timeout, |s| !s.cancelled)
            .unwrap_or_else(|p| p.into_inner());
        s.cancelled
    }

    /// Sends data frames of `kind`, within the window for a windowed
    /// stream (waiting for the host's grants).
    pub fn send_data(&self, kind: Kind, mut data: &[u8]) -> Result<(), Cancelled> {
        if data.is_empty() {
            self.session.send(kind, self.id, &[]);
            return Ok(());
        }
        while !data.is_empty() {
            let n = if self.windowed {
                let mut s = lock(&self.state);
                loop {
                    if s.cancelled || !self.session.alive() {
                        return Err(Cancelled);
                    }
                    if s.credit > 0 {
                        break;
                    }
                    s = self
                        .changed
                        .wait_timeout(s, TICK)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                let n = data.len().min(CHUNK).min(s.credit as usize);
                s.credit -= n as u64;
                n
            } else {
                if self.is_cancelled() {
                    return Err(Cancelled);
                }
                data.len().min(CHUNK)
            };
            self.session.send(kind, self.id, &data[..n]);
            data = &data[n..];
        }
        Ok(())
    }

    pub fn send_event(&self, event: &Event) {
        self.session.send(Kind::Event, self.id, &encode(event));
    }

    /// Sends the request's last frame and forgets the stream.
    pub fn finish(self: &Arc<Self>, resp: Response) {
        {
            let mut s = lock(&self.state);
            if s.finished {
                return;
            }
            s.finished = true;
        }
        self.session.remove(self.id, self);
        self.session.send(Kind::Response, self.id, &encode(&resp));
    }

    /// Host data for this request (read loop). An empty frame ends it.
    /// Beyond a window of unread data the host broke flow control; the
    /// excess is dropped (the host is trusted, but memory stays bounded).
    pub fn push_inbound(&self, data: Vec<u8>) {
        let mut s = lock(&self.state);
        if data.is_empty() {
            s.eof = true;
        } else if s.inbound_bytes + data.len() <= WINDOW as usize + CHUNK {
            s.inbound_bytes += data.len();
            s.inbound.push_back(data);
        }
        self.changed.notify_all();
    }

    /// A `Window` grant from the host.
    pub fn grant(&self, bytes: u32) {
        let mut s = lock(&self.state);
        s.credit = s.credit.saturating_add(u64::from(bytes));
        self.changed.notify_all();
    }

    /// The next chunk of host data, waiting up to `wait` (forever when
    /// `None`). Taking data grants it back to the host in quarter windows.
    pub fn recv(&self, wait: Option<Duration>) -> Recv {
        let deadline = wait.map(|w| Instant::now() + w);
        let mut s = lock(&self.state);
        loop {
            if s.cancelled || !self.session.alive() {
                return Recv::Cancelled;
            }
            if let Some(d) = s.inbound.pop_front() {
                s.inbound_bytes -= d.len();
                s.unacked += d.len();
                if self.windowed && s.unacked >= (WINDOW / 4) as usize {
                    let grant = s.unacked as u32;
                    s.unacked = 0;
                    drop(s);
                    self.session
                        .send(Kind::Window, self.id, &window_payload(grant));
                }
                return Recv::Data(d);
            }
            if s.eof {
                return Recv::Eof;
            }
            let tick = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Recv::Idle;
                    }
                    left.min(TICK)
                }
                None => TICK,
            };
            s = self
                .changed
                .wait_timeout(s, tick)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_protocol::FrameReader;

    fn session() -> (Arc<Session>, Arc<Mutex<Vec<u8>>>) {
        #[derive(Clone)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                lock(&self.0).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w: Writer = Arc::new(Mutex::new(Box::new(Sink(Arc::clone(&buf)))));
        (Session::new(w), buf)
    }

    fn frames(buf: &Mutex<Vec<u8>>) -> Vec<(Kind, usize)> {
        let bytes = lock(buf).clone();
        let mut r = FrameReader::new(std::io::Cursor::new(bytes));
        let mut out = Vec::new();
        while let Ok(f) = r.read_frame() {
            out.push((f.kind, f.payload.len()));
        }
        out
    }

    #[test]
    fn a_windowed_stream_sends_no_more_than_granted() {
        let (sess, buf) = session();
        let s = sess.open(5, true);
        let big = vec![1u8; WINDOW as usize + 1000];
        let s2 = Arc::clone(&s);
        let h = std::thread::spawn(move || s2.send_data(Kind::Stdout, &big));
        std::thread::sleep(Duration::from_millis(300));
        let sent: usize = frames(&buf).iter().map(|(_, n)| n).sum();
        assert_eq!(sent, WINDOW as usize);
        s.grant(500);
        std::thread::sleep(Duration::from_millis(300));
        let sent: usize = frames(&buf).iter().map(|(_, n)| n).sum();
        assert_eq!(sent, WINDOW as usize + 500);
        s.cancel();
        assert_eq!(h.join().unwrap(), Err(Cancelled));
    }

    #[test]
    fn inbound_data_is_granted_back_and_the_end_is_seen() {
        let (sess, buf) = session();
        let s = sess.open(6, true);
        for _ in 0..(WINDOW / 4 / 1024) {
            s.push_inbound(vec![0u8; 1024]);
        }
        s.push_inbound(Vec::new());
        let mut got = 0;
        loop {
            match s.recv(Some(Duration::from_secs(1))) {
                Recv::Data(d) => got += d.len(),
                Recv::Eof => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, (WINDOW / 4) as usize);
        assert_eq!(frames(&buf), vec![(Kind::Window, 4)]);
    }

    #[test]
    fn closing_the_session_cancels_its_streams_and_runs_hooks() {
        let (sess, _) = session();
        let s = sess.open(7, false);
        let ran = Arc::new(AtomicBool::new(false));
        let r2 = Arc::clone(&ran);
        s.on_cancel(Box::new(move || r2.store(true, Ordering::SeqCst)));
        sess.close();
        assert!(s.is_cancelled());
        assert!(ran.load(Ordering::SeqCst));
        assert_eq!(s.recv(None), Recv::Cancelled);
        // A stream opened on a closed session starts cancelled.
        assert!(sess.open(8, false).is_cancelled());
    }
}
