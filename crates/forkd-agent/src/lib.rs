//! The guest agent.
//!
//! Runs as PID 1 of the forkd initramfs: brings the guest up ([`init`]), then
//! serves the host over the virtio-serial port `org.forkd.agent` ([`server`]):
//! ping, exec with streamed output, file read/write, signals, shutdown; and
//! since protocol 2, processes that belong to the agent rather than to a
//! request ([`procs`], with output backlogs in [`ring`]), filesystem
//! operations as the asking user inside the guest's root ([`fsops`],
//! [`users`]), directory watches ([`watch`]), tar streams ([`tarstream`]),
//! TCP relays into the guest ([`relay`]) and a persistent Python interpreter
//! ([`eval`]). [`session`] holds one host connection's requests in flight
//! and their flow control; [`spawn`] starts programs for all of them.
//!
//! The serving logic does not care that it is PID 1 or that its channel is a
//! virtio port: host tests run [`server::Server`] over a UNIX socketpair with
//! [`reaper::Reaper::per_child`]. Only [`init`] and the binary's main loop
//! touch the guest's system (mounts, modules, power-off), and they never run
//! outside a guest.

pub mod eval;
pub mod forksafe;
pub mod fsops;
pub mod init;
pub mod memtest;
pub mod procs;
pub mod reaper;
pub mod relay;
pub mod ring;
pub mod server;
pub mod session;
pub mod spawn;
pub mod tarstream;
pub mod users;
pub mod watch;

/// Version string reported in the handshake and in `Ping`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Writes a line to the agent's log (stderr; the serial console inside a guest).
pub fn log(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "forkd-agent: {msg}");
}
