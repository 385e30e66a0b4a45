//! forkd-oci moves content between this host and OCI registries, and nothing
//! else: it does not know what a snapshot means or where forkd's store lives.
//!
//! - [`Registry`]: a distribution-spec client (blobs, uploads, manifests) with
//!   Docker-style authentication (`config.json`, Basic, bearer challenges).
//! - [`chunking`] / [`FileIndex`]: big sparse files (guest RAM images, qcow2
//!   disks) cut into zstd-compressed, content-addressed chunks; holes and
//!   zero chunks are recorded, never sent.
//! - [`fileset`]: a directory of named files plus a caller's JSON config as
//!   one OCI artifact (push, pull with verification and resume, dedup against
//!   the registry and against local files).
//! - [`image`]: container images (registry, `oci-archive:`, `docker-archive:`,
//!   `oci-layout:`) resolved to linux/amd64 and unpacked into a directory,
//!   with whiteouts, ownership and hostile tar entries handled.
//!
//! Pure parts (digests, references, media types, challenges, chunk maps, tar
//! path checks) are separate from the plumbing and tested without a registry;
//! the plumbing is tested against a real `docker-registry`.

mod auth;
pub mod chunking;
mod client;
mod digest;
mod error;
pub mod fileset;
pub mod image;
mod media;
mod reference;
mod sparse;

pub use auth::{
    credentials_from_file, docker_config_path, docker_credentials, parse_challenges, Challenge,
    Credentials,
};
pub use chunking::{ChunkEntry, Chunking, FileIndex};
pub use client::{ClientOptions, Registry, Upload};
pub use digest::{Digest, Hashing};
pub use error::{OciError, Result};
pub use media::*;
pub use reference::Reference;
pub use sparse::allocated_bytes;
