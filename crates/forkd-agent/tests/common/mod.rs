//! The agent's server on one end of a UNIX socketpair, the real host-side
//! client on the other: real processes and files of this host, no VM.

#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use forkd_agent::reaper::Reaper;
use forkd_agent::server::{Config, Server};
use forkd_protocol::client::AgentClient;
use forkd_protocol::FrameReader;

/// A server and a way to connect to it again (each connection is a new
/// session; the server's processes and watches outlive them).
pub struct Agent {
    pub server: Arc<Server>,
}

impl Agent {
    pub fn new(root: Option<PathBuf>) -> Agent {
        let (_, placeholder) = UnixStream::pair().unwrap();
        let server = Server::new(
            Config {
                root,
                reaper: Reaper::per_child(),
                power_off: false,
            },
            Box::new(placeholder),
        );
        Agent { server }
    }

    /// A new connection (session) to the server.
    pub fn connect(&self) -> AgentClient {
        let (host, guest) = UnixStream::pair().unwrap();
        let s = Arc::clone(&self.server);
        let writer = guest.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut r = FrameReader::new(guest);
            s.serve_with(&mut r, Box::new(writer));
        });
        AgentClient::connect(host, Duration::from_secs(5)).unwrap()
    }
}

/// A fresh directory for one test.
pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "forkd-agent-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
