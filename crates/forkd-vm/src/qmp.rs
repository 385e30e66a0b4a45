//! A small synchronous QMP client.
//!
//! We need a dozen commands (`query-status`, `stop`, `cont`, `quit`,
//! `migrate*`, `blockdev-snapshot-sync`, ...). The `qapi` crate's generated
//! types are tied to one QEMU schema version and compile tens of thousands of
//! lines; a JSON client with typed wrappers for the commands we use is smaller
//! and tracks whatever QEMU the host has. Events that arrive while waiting for
//! a reply are kept in order for callers that want them (e.g. `MIGRATION`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::io::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("QMP i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("QMP connection closed (QEMU exited?)")]
    Closed,
    #[error("QMP sent something that is not JSON: {0}")]
    BadJson(String),
    #[error(
        "QMP sent a message longer than {0} bytes without ending it; the connection was dropped"
    )]
    TooLong(usize),
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP command `{0}` got no reply within {1:?} (QEMU is busy or hung)")]
    Timeout(String, Duration),
    #[error("another forkd process kept QEMU's control socket for more than {0:?}")]
    Busy(Duration),
}

/// The longest QMP message forkd reads. Its own commands get replies of a
/// few KiB; QEMU's largest (`query-qmp-schema`) is about 200 KiB.
const MAX_MESSAGE: usize = 16 << 20;

/// The start of a message that did not parse, short enough for an error.
fn excerpt(line: &str) -> String {
    const KEEP: usize = 200;
    let line = line.trim_end();
    match line.char_indices().nth(KEEP) {
        Some((i, _)) => format!("{}… ({} bytes)", &line[..i], line.len()),
        None => line.to_string(),
    }
}

/// When an event happened, in seconds, from its QMP timestamp.
pub fn event_time(event: &Value) -> Option<f64> {
    let t = &event["timestamp"];
    Some(t["seconds"].as_f64()? + t["microseconds"].as_f64()? / 1e6)
}

/// A QMP session in command mode.
///
/// QEMU's QMP socket serves one client at a time: a second client's
/// connection is accepted by the kernel but QEMU reads nothing from it until
/// the first hangs up, so its commands would just time out. A session
/// therefore connects only when a command is first sent ([`Qmp::lazy`]), and
/// holds an `flock` on `SOCKET.lock` while connected: another forkd process
/// that needs the same VM waits its turn (up to the session's timeout) and
/// then says who holds it, instead of talking into a socket nobody reads.
pub struct Qmp {
    path: std::path::PathBuf,
    timeout: Duration,
    conn: Option<(BufReader<UnixStream>, UnixStream, std::fs::File)>,
    events: Vec<Value>,
    /// The start of a message a read timed out in, finished by the next read
    /// (a short timeout must not cut a message in two).
    partial: String,
    /// QEMU version reported in the greeting, e.g. "7.2.22" (once connected).
    pub version: String,
}

impl Qmp {
    /// Connects now, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let mut qmp = Qmp::lazy(path, timeout);
        qmp.ensure()?;
        Ok(qmp)
    }

    /// A session that connects on its first command.
    pub fn lazy(path: &Path, timeout: Duration) -> Qmp {
        Qmp {
            path: path.to_path_buf(),
            timeout,
            conn: None,
            events: Vec::new(),
            partial: String::new(),
            version: String::new(),
        }
    }

    fn ensure(&mut self) -> Result<(), QmpError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let lock = self.take_turn()?;
        let stream = UnixStream::connect(&self.path).map_err(|source| QmpError::Connect {
            path: self.path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(self.timeout))?;
        let writer = stream.try_clone()?;
        self.conn = Some((BufReader::new(stream), writer, lock));
        let greeting = match self.read_message() {
            Ok(g) => g,
            Err(e) => {
                self.conn = None;
                self.partial.clear();
                return Err(e);
            }
        };
        let v = &greeting["QMP"]["version"]["qemu"];
        self.version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        if let Err(e) = self.execute("qmp_capabilities", None) {
            self.conn = None;
            self.partial.clear();
            return Err(e);
        }
        Ok(())
    }

    /// Waits (up to the session timeout) for the lock that makes this
    /// process QEMU's only QMP client.
    fn take_turn(&self) -> Result<std::fs::File, QmpError> {
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let connect_err = |source| QmpError::Connect {
            path: self.path.display().to_string(),
            source,
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(connect_err)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: flock on a valid fd we own; no memory effects.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(lock);
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(connect_err(err));
            }
            if Instant::now() > deadline {
                return Err(QmpError::Busy(self.timeout));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn reader(&mut self) -> Result<&mut BufReader<UnixStream>, QmpError> {
        self.conn.as_mut().map(|c| &mut c.0).ok_or(QmpError::Closed)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            let mut line = std::mem::take(&mut self.partial);
            // QEMU runs what a guest drives: never buffer without bound.
            let budget = MAX_MESSAGE.saturating_sub(line.len()) as u64;
            let read = self.reader()?.take(budget).read_line(&mut line);
            if read.is_err() {
                // What arrived before the error stays for the next read.
                self.partial = line;
                line = String::new();
            }
            let n = read.map_err(|e| {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    QmpError::Timeout("(waiting for QEMU on QMP)".into(), self.timeout)
                } else {
                    QmpError::Io(e)
                }
            })?;
            if !line.ends_with('\n') && line.len() >= MAX_MESSAGE {
                // The rest of that message would be read as the next one.
                self.conn = None;
                return Err(QmpError::TooLong(MAX_MESSAGE));
            }
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&line).map_err(|_| QmpError::BadJson(excerpt(&line)));
        }
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, Duration::from_secs(30))
    }

    /// [`Self::execute`] with an explicit reply deadline.
    pub fn execute_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send(command, arguments, None)?;
        self.reply(command, timeout)
    }

    /// Hands the file descriptor `fd` to QEMU under `name` (QMP `getfd`,
    /// the descriptor travelling as SCM_RIGHTS with the command), for
    /// migration URIs `fd:NAME`. QEMU keeps its own copy.
    pub fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.send("getfd", Some(json!({ "fdname": name })), Some(fd))?;
        self.reply("getfd", Duration::from_secs(30)).map(drop)
    }

    fn send(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), QmpError> {
        if command != "qmp_capabilities" {
            self.ensure()?;
        }
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg).expect("a JSON value always serialises");
        bytes.push(b'\n');
        let writer = &mut self.conn.as_mut().ok_or(QmpError::Closed)?.1;
        let sent = match fd {
            Some(fd) => send_with_fd(writer, &bytes, fd),
            None => writer.write_all(&bytes),
        };
        sent.map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => QmpError::Closed,
            _ => QmpError::Io(e),
        })
    }

    fn reply(&mut self, command: &str, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(command.into(), timeout));
            }
            self.reader()?.get_ref().set_read_timeout(Some(left))?;
            let reply = match self.read_message() {
                Err(QmpError::Timeout(..)) => {
                    return Err(QmpError::Timeout(command.into(), timeout))
                }
                other => other?,
            };
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: err["class"].as_str().unwrap_or("?").into(),
                    desc: err["desc"].as_str().unwrap_or("?").into(),
                });
            }
            return Err(QmpError::BadJson(reply.to_string()));
        }
    }

    /// Waits for an event named `name` (checking those already received) and
    /// returns it; other events stay queued.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, QmpError> {
        self.ensure()?;
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(format!("event {name}"), timeout));
            }
            self.reader()?.get_ref().set_read_timeout(Some(left))?;
            let msg = match self.read_message() {
                Err(QmpError::Timeout(..)) => {
                    return Err(QmpError::Timeout(format!("event {name}"), timeout))
                }
                other => other?,
            };
            if msg["event"] == name {
                return Ok(msg);
            }
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }

    /// Events received so far (and forgets them).
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// `query-status`: e.g. "running", "paused", "inmigrate".
    pub fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None)?;
        Ok(r["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// Pauses the vCPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// Resumes the vCPUs.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// Asks QEMU to exit. The connection closing before the reply counts as done.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute_timeout("quit", None, Duration::from_secs(5)) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Writes `bytes` to `sock` with `fd` attached (SCM_RIGHTS) to the first
/// byte; the rest, if the kernel took only part, follows plainly.
fn send_with_fd(sock: &mut UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw: RawFd = fd.as_raw_fd();
    let fd_len = std::mem::size_of::<RawFd>() as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
    // u64 storage keeps the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes we own, enough for one
    // cmsghdr with one fd (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null
    // and CMSG_DATA points inside the buffer; the fd is copied by value
    // unaligned-safely.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), raw);
        // iov and control live until this call returns; the kernel copies.
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    sock.write_all(&bytes[sent as usize..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A QMP server that greets, accepts capabilities, then answers the
    /// next command with `reply` (raw bytes, no newline added).
    fn serve(path: &Path, reply: Vec<u8>) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            let mut out = sock.try_clone().unwrap();
            let mut input = BufReader::new(sock);
            let mut line = String::new();
            out.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 22}}, \"capabilities\": []}}\n").unwrap();
            input.read_line(&mut line).unwrap();
            out.write_all(b"{\"return\": {}}\n").unwrap();
            line.clear();
            input.read_line(&mut line).unwrap();
            // The client may hang up before it took everything.
            let _ = out.write_all(&reply);
        })
    }

    #[test]
    fn a_message_without_end_is_refused_at_the_limit_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let server = serve(&path, vec![b'x'; MAX_MESSAGE + (1 << 20)]);
        let mut qmp = Qmp::connect(&path, Duration::from_secs(10)).unwrap();
        assert_eq!(qmp.version, "7.2.22");
        let err = qmp.execute("query-status", None).unwrap_err();
        assert!(matches!(err, QmpError::TooLong(MAX_MESSAGE)), "{err}");
        // The connection that desynchronised is gone, not reused.
        assert!(qmp.conn.is_none());
        drop(qmp);
        server.join().unwrap();
    }

    #[test]
    fn a_long_reply_under_the_limit_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let big = "y".repeat(1 << 20);
        let server = serve(
            &path,
            format!("{{\"return\": {{\"s\": \"{big}\"}}}}\n").into_bytes(),
        );
        let mut qmp = Qmp::connect(&path, Duration::from_secs(10)).unwrap();
        let v = qmp.execute("query-big", None).unwrap();
        assert_eq!(v["s"].as_str().map(str::len), Some(1 << 20));
        server.join().unwrap();
    }

    #[test]
    fn bad_json_is_quoted_short() {
        let long = format!("not json {}", "z".repeat(5000));
        let e = excerpt(&long);
        assert!(e.starts_with("not json zzz"), "{e}");
        assert!(e.ends_with("(5009 bytes)"), "{e}");
        assert!(e.chars().count() < 260, "{e}");
        assert_eq!(excerpt("short\n"), "short");
        // Never cut inside a character.
        assert!(excerpt(&"é".repeat(300)).starts_with("éé"));
    }
}
