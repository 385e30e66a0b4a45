//! Sandboxes on this host: the local side of the operations seam.
//!
//! [`Fleet`] implements [`forkd_ops::Operations`] (in [`ops`], where every
//! default comes from [`forkd_ops::policy`]) over the state database, the
//! snapshot store and QEMU: persistent sandboxes, spawn and the warm pool
//! ([`fleet`]), live branches ([`branch`]), the agent sessions a long-lived
//! process shares ([`sessions`]) and the detached helpers that outlive a
//! call ([`helper`]), each sandbox's network gateway ([`netgw`]). Around them: where files live ([`paths`]), which guest
//! artifacts a sandbox boots from ([`artifacts`]) and the root images built
//! here ([`images`]), the ephemeral sandbox of
//! `forkd run` ([`sandbox`]), RAM images and layers ([`ramimage`]), huge
//! pages ([`hugepages`]), whether the host can take another guest
//! ([`admission`]), the host report ([`doctor`]) and where state and files
//! disagree, with the repairs ([`consistency`]), and the named points
//! where fault-injection tests stop a long operation ([`faultpoint`]). It
//! parses no
//! command lines and prints nothing, and it tells no user what to type:
//! errors carry a kind and a hint that front ends word.

pub use forkd_vm::faultpoint;

pub mod admission;
pub mod artifacts;
pub mod branch;
pub mod consistency;
pub mod doctor;
mod error;
pub mod files;
pub mod fleet;
mod guest;
pub mod helper;
pub mod hugepages;
pub mod hugepool;
pub mod images;
pub(crate) mod netgw;
mod ops;
pub mod paths;
pub mod ramimage;
pub mod sandbox;
pub mod sessions;
pub mod transfer;

pub use artifacts::{ArtifactOptions, Artifacts, Image};
pub use error::CoreError;
pub use fleet::Fleet;
pub use paths::Env;
pub use sandbox::{BootOptions, Sandbox};
