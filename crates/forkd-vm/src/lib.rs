//! QEMU `microvm`, driven from Rust.
//!
//! Owns everything about a QEMU process: the command line built from a typed
//! [`VmConfig`] ([`config`], pure), its confinement (seccomp and the
//! unprivileged user, [`confine`]; its cgroup and limits, [`cgroup`]), the accelerator decision ([`accel`], pure),
//! the QMP client ([`qmp`]), the one place that speaks QEMU migration
//! ([`migration`]: device state, live snapshots), disk overlays and disk
//! freezing ([`disk`]), the run directory ([`rundir`]), host process facts
//! ([`process`]), populating QEMU's guest-RAM mapping from outside
//! ([`populate`]), thawing a QEMU a failed live snapshot froze
//! ([`unfreeze`]), the VM handle with its lifecycle ([`vm`]) and the named
//! points where fault-injection tests stop a process ([`faultpoint`], used
//! by the crates above too), and the hugetlb copy of a RAM image children
//! map on huge pages ([`hugeram`]). It knows nothing about
//! snapshots, sandboxes or the state database: callers above decide what to
//! run; this crate starts it, talks to it and cleans up after it.

pub mod accel;
pub mod cgroup;
pub mod config;
pub mod confine;
pub mod console;
pub mod disk;
mod error;
pub mod faultpoint;
pub mod hugeram;
mod launch;
pub mod migration;
pub mod populate;
pub mod process;
pub mod qmp;
pub mod rundir;
pub mod unfreeze;
pub mod vm;

pub use accel::{Accel, AccelChoice, AccelRequest, HostProbe};
pub use config::{Disk, Egress, HugePages, Limits, MemoryBackend, Network, VmConfig};
pub use disk::PreparedDiskSnapshot;
pub use error::VmError;
pub use migration::{LivePause, MigrationInfo, MigrationStatus, StoppedSnapshot};
pub use rundir::RunDir;
pub use vm::{LaunchOptions, Shutdown, SpawnHook, Vm};
