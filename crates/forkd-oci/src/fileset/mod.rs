//! A file set: named files plus the caller's JSON config, as one OCI artifact.
//!
//! Layout in the registry. The tag points to an OCI image manifest whose
//! `artifactType` is the caller's (e.g. [`FORKD_SNAPSHOT_ARTIFACT`]), whose
//! `config` is the caller's JSON, and whose `layers` are, first, one
//! [`FORKD_FILE_INDEX`] blob per file (title annotation = file name), then
//! every distinct chunk blob ([`FORKD_CHUNK`]) the indexes name, so a
//! registry's garbage collector keeps them. Zero runs have no blob.
//!
//! When listing every chunk would make the manifest larger than a registry
//! accepts (4 MiB), the chunks that do not fit go into "carrier" manifests
//! (`artifactType` [`FORKD_CHUNK_CARRIER`], empty config, chunks as layers),
//! pushed by digest, and the tag points to an OCI image index whose
//! `manifests` are the main manifest followed by the carriers. Garbage
//! collectors keep what a tagged index references (the carriers), and what
//! those reference (the chunks); distribution 2.8's `--delete-untagged`
//! mode is the exception (docs/registry.md).
//!
//! Push skips chunks the registry has (HEAD) and compresses a chunk only when
//! neither this push nor a local source already knows its blob. Pull rebuilds
//! files in a work directory inside the caller's staging directory, takes
//! chunks from local sources (parent snapshots), from chunks already pulled,
//! and from what an interrupted earlier pull left, before downloading; it
//! verifies every blob digest and size and every chunk's raw digest, and only
//! moves complete files out of the work directory once all are verified.

mod pull;
mod push;

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::chunking::{self, Chunking, FileIndex};
use crate::digest::Digest;
use crate::error::{OciError, Result};

pub use pull::{pull, resolve, PullOptions, PullSummary, Resolved};
pub use push::{push, PushOptions, PushSummary};

pub const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;
/// The work directory a pull keeps inside the staging directory.
pub const PULL_WORK_DIR: &str = ".forkd-pull";

/// A file to push: its name in the set and where it is.
#[derive(Debug, Clone)]
pub struct FileSpec {
    pub name: String,
    pub path: PathBuf,
}

impl FileSpec {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> FileSpec {
        FileSpec {
            name: name.into(),
            path: path.into(),
        }
    }
}

/// Checks a file name: one path component, `[A-Za-z0-9._-]`, 1–255
/// characters, not starting with `.`.
pub fn validate_file_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() || name.len() > 255 {
        Some("a name is 1 to 255 characters long")
    } else if name.starts_with('.') {
        Some("a name must not start with `.`")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("a name may only contain letters, digits, `.`, `_` and `-`")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(OciError::InvalidFileName {
            name: name.chars().take(300).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Counts of what a push or pull did, cumulative; also the progress report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TransferStats {
    /// Sum of the logical sizes of all files.
    pub total_bytes: u64,
    /// Logical bytes handled so far.
    pub done_bytes: u64,
    /// Bytes in zero runs and holes (never stored or sent).
    pub zero_bytes: u64,
    /// Stored chunks handled so far.
    pub chunks: u64,
    /// Chunks uploaded (push) or downloaded (pull).
    pub chunks_transferred: u64,
    /// Compressed bytes of those chunks: what went over the wire.
    pub bytes_transferred: u64,
    /// Raw bytes of those chunks.
    pub raw_bytes_transferred: u64,
    /// Chunks not sent: the registry had them (push), or they were copied
    /// from a local source, an earlier pull or this pull (pull).
    pub chunks_reused: u64,
    /// Raw bytes of the reused chunks.
    pub raw_bytes_reused: u64,
    /// Bytes of indexes, config and manifests sent or received.
    pub metadata_bytes: u64,
}

/// A progress report: the file being worked on and the counts so far.
#[derive(Debug)]
pub struct Progress<'a> {
    pub file: &'a str,
    pub stats: &'a TransferStats,
}

/// Chunks this host already has, by raw digest: files with known indexes.
#[derive(Default)]
pub struct LocalSources {
    by_raw: HashMap<Digest, LocalChunk>,
}

#[derive(Debug, Clone)]
struct LocalChunk {
    path: PathBuf,
    offset: u64,
    length: u64,
    blob: Digest,
    blob_size: u64,
}

impl LocalSources {
    pub fn new() -> LocalSources {
        LocalSources::default()
    }

    /// Offers the chunks of the file at `path`, described by `index` (as a
    /// push or pull of it returned). Its bytes are re-verified when used.
    pub fn add(&mut self, path: impl Into<PathBuf>, index: &FileIndex) {
        let path = path.into();
        for c in index.data_chunks() {
            if let (Some(raw), Some(blob), Some(blob_size)) = (&c.raw, &c.blob, c.blob_size) {
                self.by_raw
                    .entry(raw.clone())
                    .or_insert_with(|| LocalChunk {
                        path: path.clone(),
                        offset: c.offset,
                        length: c.length,
                        blob: blob.clone(),
                        blob_size,
                    });
            }
        }
    }

    /// Indexes the file at `path` with `chunking` and offers its chunks.
    pub fn add_file(&mut self, path: impl Into<PathBuf>, chunking: Chunking) -> Result<FileIndex> {
        let path = path.into();
        let index = chunking::index_file(&path, chunking)?;
        self.add(path, &index);
        Ok(index)
    }

    /// Distinct chunks offered.
    pub fn len(&self) -> usize {
        self.by_raw.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_raw.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        for ok in ["ram.img", "disk-0.qcow2", "manifest.json", "A_b"] {
            validate_file_name(ok).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "..",
            "a/b",
            "/abs",
            "sp ace",
            &"x".repeat(256),
        ] {
            assert!(validate_file_name(bad).is_err(), "{bad}");
        }
    }
}
