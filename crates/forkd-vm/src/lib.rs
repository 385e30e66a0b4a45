//! QEMU `microvm`, driven from Rust.
//!
//! Owns everything about a QEMU process: the command line built from a typed
//! [`VmConfig`] ([`config`], pure), the accelerator decision ([`accel`], pure),
//! the QMP client ([`qmp`]), disk overlays ([`disk`]), and the process
//! lifecycle with its run directory ([`vm`]). It knows nothing about
//! snapshots, sandboxes or the state database: callers above decide what to
//! run; this crate starts it, talks to it and cleans up after it.

pub mod accel;
pub mod config;
pub mod disk;
pub mod qmp;
pub mod vm;

pub use accel::{Accel, AccelChoice, AccelRequest, HostProbe};
pub use config::{Disk, HugePages, MemoryBackend, Network, VmConfig};
pub use vm::{LaunchOptions, PreparedDiskSnapshot, RunDir, Vm, VmError};
