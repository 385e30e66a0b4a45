//! A sandbox's network, default-deny toward the host.
//!
//! Owns two things: the egress policy ([`policy`], pure: `--allow-out`,
//! `--deny-out`, the protected address space, verdicts) with the DNS
//! messages it needs ([`dns`], pure), and the gateway ([`gateway`]) that
//! enforces it: a user-mode TCP/IP stack at the other end of QEMU's
//! `-netdev stream`, which carries each allowed guest connection on a host
//! socket of its own. It knows nothing about sandboxes or QEMU's command
//! line: callers bind a socket, hand the gateway a policy and start QEMU.

use std::time::Duration;

pub mod dns;
pub mod gateway;
pub mod policy;

pub use policy::{EgressPolicy, Mode, PolicyError, Rule, Verdict};

/// Why the gateway stopped.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the network gateway's socket failed: {0}")]
    Io(std::io::Error),
    #[error("no QEMU connected to the network gateway within {0:?}")]
    NoQemu(Duration),
    #[error("the network gateway could not start: {0}")]
    Setup(String),
    #[error("QEMU broke the network stream protocol: {0}")]
    Protocol(String),
}
