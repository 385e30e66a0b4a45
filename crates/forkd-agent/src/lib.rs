//! The guest agent.
//!
//! Runs as PID 1 of the forkd initramfs: brings the guest up ([`init`]), then
//! serves the host over the virtio-serial port `org.forkd.agent` ([`server`]):
//! ping, exec with streamed output, file read/write, signals, shutdown.
//!
//! The serving logic does not care that it is PID 1 or that its channel is a
//! virtio port: host tests run [`server::Server`] over a UNIX socketpair with
//! [`reaper::Reaper::per_child`]. Only [`init`] and the binary's main loop
//! touch the guest's system (mounts, modules, power-off), and they never run
//! outside a guest.

pub mod forksafe;
pub mod init;
pub mod memtest;
pub mod reaper;
pub mod server;

/// Version string reported in the handshake and in `Ping`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Writes a line to the agent's log (stderr; the serial console inside a guest).
pub fn log(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "forkd-agent: {msg}");
}
