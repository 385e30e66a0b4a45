//! A small synchronous QMP client.
//!
//! We need a dozen commands (`query-status`, `stop`, `cont`, `quit`,
//! `migrate*`, `blockdev-snapshot-sync`, ...). The `qapi` crate's generated
//! types are tied to one QEMU schema version and compile tens of thousands of
//! lines; a JSON client with typed wrappers for the commands we use is smaller
//! and tracks whatever QEMU the host has. Events that arrive while waiting for
//! a reply are kept in order for callers that want them (e.g. `MIGRATION`).

use std::io::{self, BufRead, BufReader, Write};
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
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error(
        "QMP command `{0}` got no reply within {1:?} (another QMP client connected, or QEMU busy)"
    )]
    Timeout(String, Duration),
}

/// When an event happened, in seconds, from its QMP timestamp.
pub fn event_time(event: &Value) -> Option<f64> {
    let t = &event["timestamp"];
    Some(t["seconds"].as_f64()? + t["microseconds"].as_f64()? / 1e6)
}

/// A QMP session in command mode.
///
/// QEMU's QMP socket serves one client at a time: a session that holds it
/// blocks every other forkd process that needs QMP (a long `exec` would
/// block a `branch`). A session made with [`Qmp::lazy`] therefore connects
/// only when a command is first sent.
pub struct Qmp {
    path: std::path::PathBuf,
    timeout: Duration,
    conn: Option<(BufReader<UnixStream>, UnixStream)>,
    events: Vec<Value>,
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
            version: String::new(),
        }
    }

    fn ensure(&mut self) -> Result<(), QmpError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let stream = UnixStream::connect(&self.path).map_err(|source| QmpError::Connect {
            path: self.path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(self.timeout))?;
        let writer = stream.try_clone()?;
        self.conn = Some((BufReader::new(stream), writer));
        let greeting = match self.read_message() {
            Ok(g) => g,
            Err(e) => {
                self.conn = None;
                return Err(e);
            }
        };
        let v = &greeting["QMP"]["version"]["qemu"];
        self.version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        if let Err(e) = self.execute("qmp_capabilities", None) {
            self.conn = None;
            return Err(e);
        }
        Ok(())
    }

    fn reader(&mut self) -> Result<&mut BufReader<UnixStream>, QmpError> {
        self.conn.as_mut().map(|c| &mut c.0).ok_or(QmpError::Closed)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader()?.read_line(&mut line).map_err(|e| {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    QmpError::Timeout("(waiting for QEMU on QMP)".into(), self.timeout)
                } else {
                    QmpError::Io(e)
                }
            })?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(&line).map_err(|_| QmpError::BadJson(line.clone()));
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
        writer.write_all(&bytes).map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => QmpError::Closed,
            _ => QmpError::Io(e),
        })?;
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
