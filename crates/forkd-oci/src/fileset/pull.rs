//! Pulling a file set: resolve the manifest, verify config and file
//! indexes, rebuild each file in a work directory from local sources,
//! earlier attempts and downloads, and move the files out only when all are
//! complete and verified.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{
    validate_file_name, LocalSources, Progress, TransferStats, MAX_CONFIG_BYTES, PULL_WORK_DIR,
};
use crate::chunking::{self, max_blob_size, FileIndex, MAX_INDEX_BYTES};
use crate::client::Registry;
use crate::digest::Digest;
use crate::error::{OciError, Result};
use crate::media::*;
use crate::reference::Reference;
use crate::sparse::{punch_hole, write_sparse};

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The `artifactType` the artifact must have.
    pub artifact_type: String,
    /// When set, only these files of the set are pulled (the caller has the
    /// others); names the set lacks are an error.
    pub only: Option<BTreeSet<String>>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            artifact_type: FORKD_SNAPSHOT_ARTIFACT.to_owned(),
            only: None,
        }
    }
}

/// The artifact a reference resolves to, before any file is pulled.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Digest of the manifest (or index) the reference resolved to: pull
    /// by this digest to get exactly what was looked at.
    pub digest: Digest,
    /// The caller's config blob, verified.
    pub config: Vec<u8>,
    pub config_media_type: String,
    /// Bytes of manifests and config received.
    pub metadata_bytes: u64,
}

/// Resolves `reference` and fetches its config, without pulling any file:
/// callers read the config to decide what to pull.
pub fn resolve(
    registry: &Registry,
    reference: &Reference,
    options: &PullOptions,
) -> Result<Resolved> {
    let (manifest, digest, metadata_bytes) = resolve_manifest(registry, reference, options)?;
    let config = registry.fetch_blob_bytes(
        &reference.repository,
        &manifest.config,
        "config",
        MAX_CONFIG_BYTES,
    )?;
    Ok(Resolved {
        digest,
        metadata_bytes: metadata_bytes + config.len() as u64,
        config,
        config_media_type: manifest.config.media_type,
    })
}

/// What a pull produced.
#[derive(Debug, Clone)]
pub struct PullSummary {
    /// Digest of the manifest (or index) the reference resolved to.
    pub digest: Digest,
    /// The caller's config blob, verified.
    pub config: Vec<u8>,
    pub config_media_type: String,
    /// Files now complete in the staging directory, with their indexes.
    pub indexes: BTreeMap<String, FileIndex>,
    pub stats: TransferStats,
}

/// Pulls the artifact `reference` into `staging` (created if missing): every
/// file of the set appears there under its name, complete and verified, or
/// the call fails and none of them does. Running the same pull again after a
/// failure resumes it.
pub fn pull(
    registry: &Registry,
    reference: &Reference,
    staging: &Path,
    local: &LocalSources,
    options: &PullOptions,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<PullSummary> {
    let repo = reference.repository.as_str();
    let mut stats = TransferStats::default();
    let (manifest, digest, metadata_bytes) = resolve_manifest(registry, reference, options)?;
    let what = format!("manifest of {reference}");
    stats.metadata_bytes += metadata_bytes;
    let config = registry.fetch_blob_bytes(repo, &manifest.config, "config", MAX_CONFIG_BYTES)?;
    stats.metadata_bytes += config.len() as u64;

    let mut files: Vec<(String, FileIndex)> = Vec::new();
    let mut seen = HashSet::new();
    for layer in manifest
        .layers
        .iter()
        .filter(|l| l.media_type == FORKD_FILE_INDEX)
    {
        let name = layer
            .title()
            .ok_or_else(|| {
                OciError::bad(
                    &what,
                    format!("file index {} has no title annotation", layer.digest),
                )
            })?
            .to_owned();
        validate_file_name(&name)?;
        if !seen.insert(name.clone()) {
            return Err(OciError::bad(&what, format!("file `{name}` appears twice")));
        }
        let bytes = registry.fetch_blob_bytes(
            repo,
            layer,
            &format!("index of file `{name}`"),
            MAX_INDEX_BYTES,
        )?;
        stats.metadata_bytes += bytes.len() as u64;
        let index: FileIndex = serde_json::from_slice(&bytes)
            .map_err(|e| OciError::bad(format!("index of file `{name}`"), e))?;
        index
            .validate()
            .map_err(|reason| OciError::bad(format!("index of file `{name}`"), reason))?;
        if options
            .only
            .as_ref()
            .is_some_and(|only| !only.contains(&name))
        {
            continue;
        }
        stats.total_bytes += index.size;
        files.push((name, index));
    }
    if let Some(only) = &options.only {
        if let Some(missing) = only.iter().find(|n| !seen.contains(*n)) {
            return Err(OciError::bad(&what, format!("it has no file `{missing}`")));
        }
    }

    fs::create_dir_all(staging).map_err(OciError::io("create staging directory", staging))?;
    let work = staging.join(PULL_WORK_DIR);
    prepare_work_dir(&work, &digest)?;
    let mut sources = Sources::new(local);
    for (name, index) in &files {
        let path = work.join(name);
        rebuild_file(
            registry,
            repo,
            name,
            index,
            &path,
            &mut sources,
            &mut stats,
            progress,
        )?;
    }
    // Everything is verified: only now do the files leave the work directory.
    for (name, _) in &files {
        let from = work.join(name);
        let to = staging.join(name);
        fs::rename(&from, &to).map_err(OciError::io("move pulled file into", &to))?;
    }
    fs::remove_dir_all(&work).map_err(OciError::io("remove pull work directory", &work))?;
    if let Ok(dir) = File::open(staging) {
        let _ = dir.sync_all();
    }
    progress(&Progress {
        file: "",
        stats: &stats,
    });
    Ok(PullSummary {
        digest,
        config,
        config_media_type: manifest.config.media_type.clone(),
        indexes: files.into_iter().collect(),
        stats,
    })
}

/// The image manifest `reference` resolves to (the first entry of an
/// index), checked to be of the expected artifact type, with the digest
/// the reference resolved to and the bytes received.
fn resolve_manifest(
    registry: &Registry,
    reference: &Reference,
    options: &PullOptions,
) -> Result<(ImageManifest, Digest, u64)> {
    let repo = reference.repository.as_str();
    let mut metadata_bytes = 0u64;
    let (media_type, bytes, digest) =
        registry.get_manifest(repo, &reference.manifest_reference())?;
    metadata_bytes += bytes.len() as u64;
    let what = format!("manifest of {reference}");
    let manifest = match Manifest::parse(&what, media_type.as_deref(), &bytes)? {
        Manifest::Image(m) => m,
        Manifest::Index(index) => {
            check_artifact(
                reference,
                index.artifact_type.as_deref(),
                &options.artifact_type,
            )?;
            let main = index
                .manifests
                .first()
                .ok_or_else(|| OciError::bad(&what, "the index lists no manifest"))?;
            let bytes = registry.fetch_blob_or_manifest(repo, main)?;
            metadata_bytes += bytes.len() as u64;
            match Manifest::parse(&what, Some(&main.media_type), &bytes)? {
                Manifest::Image(m) => m,
                Manifest::Index(_) => {
                    return Err(OciError::bad(
                        &what,
                        "the index's first entry is another index",
                    ))
                }
            }
        }
    };
    check_artifact(
        reference,
        manifest.artifact_type.as_deref(),
        &options.artifact_type,
    )?;
    Ok((manifest, digest, metadata_bytes))
}

fn check_artifact(reference: &Reference, found: Option<&str>, expected: &str) -> Result<()> {
    match found {
        Some(t) if t == expected => Ok(()),
        other => Err(OciError::WrongArtifact {
            reference: reference.to_string(),
            found: other.unwrap_or("none").to_owned(),
            expected: expected.to_owned(),
        }),
    }
}

impl Registry {
    /// A manifest named by a descriptor, verified against it.
    fn fetch_blob_or_manifest(&self, repo: &str, desc: &Descriptor) -> Result<Vec<u8>> {
        let (_, bytes, digest) = self.get_manifest(repo, desc.digest.as_str())?;
        crate::digest::verify(
            "manifest",
            &desc.digest,
            desc.size,
            &digest,
            bytes.len() as u64,
        )?;
        Ok(bytes)
    }
}

/// Keeps the work directory of an interrupted pull of the same artifact
/// (its files are sources to resume from); clears one of another artifact.
fn prepare_work_dir(work: &Path, digest: &Digest) -> Result<()> {
    let marker = work.join(".digest");
    let same = fs::read_to_string(&marker).is_ok_and(|d| d.trim() == digest.as_str());
    if !same && work.exists() {
        fs::remove_dir_all(work).map_err(OciError::io("clear stale pull work directory", work))?;
    }
    fs::create_dir_all(work).map_err(OciError::io("create pull work directory", work))?;
    fs::write(&marker, digest.as_str()).map_err(OciError::io("write", &marker))
}

/// Where a pull finds chunks it need not download.
struct Sources<'a> {
    local: &'a LocalSources,
    /// Chunks written earlier in this pull.
    pulled: HashMap<Digest, (PathBuf, u64, u64)>,
    files: HashMap<PathBuf, File>,
}

impl<'a> Sources<'a> {
    fn new(local: &'a LocalSources) -> Self {
        Sources {
            local,
            pulled: HashMap::new(),
            files: HashMap::new(),
        }
    }

    /// The raw bytes of chunk `raw` from a local file, verified; `None` when
    /// no source has it (or the one that claimed to no longer matches).
    fn read(&mut self, raw: &Digest, length: u64) -> Option<Vec<u8>> {
        let candidates: Vec<(PathBuf, u64, u64)> = [
            self.pulled.get(raw).cloned(),
            self.local
                .by_raw
                .get(raw)
                .map(|c| (c.path.clone(), c.offset, c.length)),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (path, offset, len) in candidates {
            if len != length {
                continue;
            }
            if !self.files.contains_key(&path) {
                let Ok(file) = File::open(&path) else {
                    continue;
                };
                self.files.insert(path.clone(), file);
            }
            let file = &self.files[&path];
            let mut buf = vec![0u8; length as usize];
            if file.read_exact_at(&mut buf, offset).is_ok() && Digest::of(&buf) == *raw {
                return Some(buf);
            }
        }
        None
    }
}

#[allow(clippy::too_many_arguments)]
fn rebuild_file(
    registry: &Registry,
    repo: &str,
    name: &str,
    index: &FileIndex,
    path: &Path,
    sources: &mut Sources<'_>,
    stats: &mut TransferStats,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<()> {
    let resuming = path.exists();
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(OciError::io("create", path))?;
    file.set_len(index.size)
        .map_err(OciError::io("size", path))?;
    let base = stats.done_bytes;
    for chunk in &index.chunks {
        let (Some(raw), Some(blob), Some(blob_size)) = (&chunk.raw, &chunk.blob, chunk.blob_size)
        else {
            // A zero run: the file was sized with a hole there, nothing to write.
            if resuming {
                // An interrupted attempt never writes here, but a hole is cheap to make sure of.
                punch_hole(&file, chunk.offset, chunk.length)
                    .map_err(OciError::io("write", path))?;
            }
            stats.zero_bytes += chunk.length;
            stats.done_bytes = base + chunk.offset + chunk.length;
            continue;
        };
        let already_there = resuming && {
            let mut buf = vec![0u8; chunk.length as usize];
            file.read_exact_at(&mut buf, chunk.offset).is_ok() && Digest::of(&buf) == *raw
        };
        if already_there {
            stats.chunks_reused += 1;
            stats.raw_bytes_reused += chunk.length;
        } else {
            let bytes = match sources.read(raw, chunk.length) {
                Some(bytes) => {
                    stats.chunks_reused += 1;
                    stats.raw_bytes_reused += chunk.length;
                    bytes
                }
                None => {
                    let desc = Descriptor::new(FORKD_CHUNK, blob.clone(), blob_size);
                    let what = format!("chunk at offset {} of `{name}`", chunk.offset);
                    let compressed = registry.fetch_blob_bytes(
                        repo,
                        &desc,
                        &what,
                        max_blob_size(chunk.length),
                    )?;
                    let bytes = chunking::decompress(&compressed, chunk.length)
                        .map_err(|reason| OciError::bad(format!("{what} (blob {blob})"), reason))?;
                    let actual = Digest::of(&bytes);
                    if actual != *raw {
                        return Err(OciError::DigestMismatch {
                            what: format!("{what} (blob {blob}, after decompression)"),
                            digest: raw.clone(),
                            actual,
                        });
                    }
                    stats.chunks_transferred += 1;
                    stats.bytes_transferred += blob_size;
                    stats.raw_bytes_transferred += chunk.length;
                    bytes
                }
            };
            write_sparse(&file, chunk.offset, &bytes).map_err(OciError::io("write", path))?;
        }
        sources
            .pulled
            .entry(raw.clone())
            .or_insert_with(|| (path.to_owned(), chunk.offset, chunk.length));
        stats.chunks += 1;
        stats.done_bytes = base + chunk.offset + chunk.length;
        progress(&Progress { file: name, stats });
    }
    stats.done_bytes = base + index.size;
    file.set_permissions(fs::Permissions::from_mode(index.mode & 0o7777))
        .map_err(OciError::io("chmod", path))?;
    file.sync_all().map_err(OciError::io("fsync", path))
}
