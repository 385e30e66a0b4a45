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
//! those reference (the chunks).
//!
//! Push skips chunks the registry has (HEAD) and compresses a chunk only when
//! neither this push nor a local source already knows its blob. Pull rebuilds
//! files in a work directory inside the caller's staging directory, takes
//! chunks from local sources (parent snapshots), from chunks already pulled,
//! and from what an interrupted earlier pull left, before downloading; it
//! verifies every blob digest and size and every chunk's raw digest, and only
//! moves complete files out of the work directory once all are verified.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::chunking::{self, max_blob_size, Chunking, FileIndex, Piece, MAX_INDEX_BYTES};
use crate::client::{Registry, Upload};
use crate::digest::Digest;
use crate::error::{OciError, Result};
use crate::media::*;
use crate::reference::Reference;
use crate::sparse::write_sparse;

/// Largest caller config accepted on pull.
pub const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;
/// The work directory a pull keeps inside the staging directory.
pub const PULL_WORK_DIR: &str = ".forkd-pull";
/// The empty JSON blob (`{}`), config of carrier manifests.
const EMPTY_JSON: &[u8] = b"{}";

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

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub artifact_type: String,
    pub config_media_type: String,
    pub chunking: Chunking,
    /// Annotations of the manifest.
    pub annotations: BTreeMap<String, String>,
    /// Largest manifest written; chunks beyond go to carrier manifests.
    pub max_manifest_bytes: usize,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            artifact_type: FORKD_SNAPSHOT_ARTIFACT.to_owned(),
            config_media_type: FORKD_SNAPSHOT_CONFIG.to_owned(),
            chunking: Chunking::DEFAULT,
            annotations: BTreeMap::new(),
            max_manifest_bytes: MAX_MANIFEST_BYTES,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushSummary {
    /// Digest of what the tag points to (manifest, or index when chunks overflowed).
    pub digest: Digest,
    pub media_type: String,
    /// The index of every file, by name: keep them to offer as local sources later.
    pub indexes: BTreeMap<String, FileIndex>,
    pub stats: TransferStats,
}

/// Pushes `files` and `config` as one artifact tagged `reference`.
pub fn push(
    registry: &Registry,
    reference: &Reference,
    config: &[u8],
    files: &[FileSpec],
    local: &LocalSources,
    options: &PushOptions,
    progress: &mut dyn FnMut(&Progress<'_>),
) -> Result<PushSummary> {
    let repo = reference.repository.as_str();
    let tag = reference.tag.clone().unwrap_or_else(|| "latest".to_owned());
    let mut names = HashSet::new();
    for f in files {
        validate_file_name(&f.name)?;
        if !names.insert(f.name.as_str()) {
            return Err(OciError::InvalidFileName {
                name: f.name.clone(),
                reason: "the name appears twice in the set",
            });
        }
    }
    let mut stats = TransferStats::default();
    for f in files {
        stats.total_bytes += fs::metadata(&f.path)
            .map_err(OciError::io("stat", &f.path))?
            .len();
    }

    // Chunks known to be in the registry by now, by raw digest, in first-seen order.
    let mut pushed: HashMap<Digest, (Digest, u64)> = HashMap::new();
    let mut chunk_layers: Vec<Descriptor> = Vec::new();
    let mut indexes = BTreeMap::new();
    let mut index_layers = Vec::new();
    for f in files {
        let mut index = FileIndex::new(0, chunking::file_mode(&f.path)?, options.chunking);
        let base = stats.done_bytes;
        let size = chunking::scan_file(&f.path, options.chunking, &mut |piece| {
            match piece {
                Piece::Zero { offset, length } => {
                    index.push_zero(offset, length);
                    stats.zero_bytes += length;
                    stats.done_bytes = base + offset + length;
                }
                Piece::Data { offset, bytes } => {
                    let raw = Digest::of(bytes);
                    let length = bytes.len() as u64;
                    let (blob, blob_size) = match pushed.get(&raw) {
                        Some(known) => {
                            stats.chunks_reused += 1;
                            stats.raw_bytes_reused += length;
                            known.clone()
                        }
                        None => {
                            let (blob, blob_size, sent) =
                                push_chunk(registry, repo, &raw, bytes, local)?;
                            if sent {
                                stats.chunks_transferred += 1;
                                stats.bytes_transferred += blob_size;
                                stats.raw_bytes_transferred += length;
                            } else {
                                stats.chunks_reused += 1;
                                stats.raw_bytes_reused += length;
                            }
                            chunk_layers.push(Descriptor::new(
                                FORKD_CHUNK,
                                blob.clone(),
                                blob_size,
                            ));
                            pushed.insert(raw.clone(), (blob.clone(), blob_size));
                            (blob, blob_size)
                        }
                    };
                    index.push_data(offset, length, raw, blob, blob_size);
                    stats.chunks += 1;
                    stats.done_bytes = base + offset + length;
                }
            }
            progress(&Progress {
                file: &f.name,
                stats: &stats,
            });
            Ok(())
        })?;
        index.size = size;
        stats.done_bytes = base + size;
        let bytes = serde_json::to_vec(&index).map_err(|e| OciError::bad("file index", e))?;
        let mut desc = Descriptor::of_bytes(FORKD_FILE_INDEX, &bytes);
        desc.annotations
            .insert(ANNOTATION_TITLE.to_owned(), f.name.clone());
        if registry.ensure_blob(repo, &desc.digest, &bytes)? == Upload::Sent {
            stats.metadata_bytes += bytes.len() as u64;
        }
        index_layers.push(desc);
        indexes.insert(f.name.clone(), index);
    }

    let config_desc = Descriptor::of_bytes(&options.config_media_type, config);
    if registry.ensure_blob(repo, &config_desc.digest, config)? == Upload::Sent {
        stats.metadata_bytes += config.len() as u64;
    }
    let (media_type, bytes) = build_manifests(
        registry,
        repo,
        options,
        config_desc,
        index_layers,
        chunk_layers,
        &mut stats,
    )?;
    let digest = registry.put_manifest(repo, &tag, &media_type, &bytes)?;
    stats.metadata_bytes += bytes.len() as u64;
    progress(&Progress {
        file: "",
        stats: &stats,
    });
    Ok(PushSummary {
        digest,
        media_type,
        indexes,
        stats,
    })
}

/// Makes sure the registry has the blob of one chunk; returns (blob digest,
/// blob size, whether it was sent).
fn push_chunk(
    registry: &Registry,
    repo: &str,
    raw: &Digest,
    bytes: &[u8],
    local: &LocalSources,
) -> Result<(Digest, u64, bool)> {
    // A local source that knows this chunk spares compressing it to learn its blob.
    if let Some(known) = local.by_raw.get(raw) {
        if registry.blob_size(repo, &known.blob)?.is_some() {
            return Ok((known.blob.clone(), known.blob_size, false));
        }
    }
    let blob = chunking::compress(bytes);
    let digest = Digest::of(&blob);
    let sent = registry.ensure_blob(repo, &digest, &blob)? == Upload::Sent;
    Ok((digest, blob.len() as u64, sent))
}

fn to_json<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| OciError::bad(what, e))
}

/// Builds the manifest (or index and carriers, pushing the carriers) the tag
/// will point to; returns its media type and bytes.
fn build_manifests(
    registry: &Registry,
    repo: &str,
    options: &PushOptions,
    config: Descriptor,
    index_layers: Vec<Descriptor>,
    chunk_layers: Vec<Descriptor>,
    stats: &mut TransferStats,
) -> Result<(String, Vec<u8>)> {
    let manifest = |layers: Vec<Descriptor>,
                    config: Descriptor,
                    artifact_type: &str,
                    annotations: BTreeMap<String, String>| ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.to_owned()),
        artifact_type: Some(artifact_type.to_owned()),
        config,
        layers,
        annotations,
    };
    let limit = options.max_manifest_bytes.min(MAX_MANIFEST_BYTES);
    let mut all = index_layers.clone();
    all.extend(chunk_layers.iter().cloned());
    let single = to_json(
        "manifest",
        &manifest(
            all,
            config.clone(),
            &options.artifact_type,
            options.annotations.clone(),
        ),
    )?;
    if single.len() <= limit {
        return Ok((OCI_MANIFEST.to_owned(), single));
    }

    // Too big for one manifest: fill the main manifest, spill the rest into carriers.
    let per_chunk = to_json("descriptor", &chunk_layers[0])?.len() + 1;
    let main_base = to_json(
        "manifest",
        &manifest(
            index_layers.clone(),
            config.clone(),
            &options.artifact_type,
            options.annotations.clone(),
        ),
    )?
    .len();
    if main_base + per_chunk > limit {
        return Err(OciError::TooLarge {
            what: "the manifest of this file set (its file indexes alone)".into(),
            limit: limit as u64,
        });
    }
    let empty = Descriptor::of_bytes(OCI_EMPTY, EMPTY_JSON);
    if registry.ensure_blob(repo, &empty.digest, EMPTY_JSON)? == Upload::Sent {
        stats.metadata_bytes += EMPTY_JSON.len() as u64;
    }
    let carrier_base = to_json(
        "manifest",
        &manifest(
            Vec::new(),
            empty.clone(),
            FORKD_CHUNK_CARRIER,
            BTreeMap::new(),
        ),
    )?
    .len();
    // Leave room for the variable size of descriptors (sizes have up to 20 digits).
    let fit = |base: usize| (limit - base) / (per_chunk + 16);
    let mut rest = chunk_layers.as_slice();
    let take = fit(main_base).min(rest.len());
    let mut main_layers = index_layers;
    main_layers.extend(rest[..take].iter().cloned());
    rest = &rest[take..];
    let main = to_json(
        "manifest",
        &manifest(
            main_layers,
            config,
            &options.artifact_type,
            options.annotations.clone(),
        ),
    )?;
    let mut main_desc = Descriptor::of_bytes(OCI_MANIFEST, &main);
    main_desc.artifact_type = Some(options.artifact_type.clone());
    let mut manifests = Vec::new();
    let per_carrier = fit(carrier_base).max(1);
    for group in rest.chunks(per_carrier) {
        let carrier = to_json(
            "manifest",
            &manifest(
                group.to_vec(),
                empty.clone(),
                FORKD_CHUNK_CARRIER,
                BTreeMap::new(),
            ),
        )?;
        let mut desc = Descriptor::of_bytes(OCI_MANIFEST, &carrier);
        desc.artifact_type = Some(FORKD_CHUNK_CARRIER.to_owned());
        registry.put_manifest(repo, desc.digest.as_str(), OCI_MANIFEST, &carrier)?;
        stats.metadata_bytes += carrier.len() as u64;
        manifests.push(desc);
    }
    registry.put_manifest(repo, main_desc.digest.as_str(), OCI_MANIFEST, &main)?;
    stats.metadata_bytes += main.len() as u64;
    manifests.insert(0, main_desc);
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(OCI_INDEX.to_owned()),
        artifact_type: Some(options.artifact_type.clone()),
        manifests,
        annotations: options.annotations.clone(),
    };
    let bytes = to_json("index", &index)?;
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(OciError::TooLarge {
            what: "the index of this file set's manifests".into(),
            limit: MAX_MANIFEST_BYTES as u64,
        });
    }
    Ok((OCI_INDEX.to_owned(), bytes))
}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The `artifactType` the artifact must have.
    pub artifact_type: String,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            artifact_type: FORKD_SNAPSHOT_ARTIFACT.to_owned(),
        }
    }
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
    let (media_type, bytes, digest) =
        registry.get_manifest(repo, &reference.manifest_reference())?;
    stats.metadata_bytes += bytes.len() as u64;
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
            stats.metadata_bytes += bytes.len() as u64;
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
        stats.total_bytes += index.size;
        files.push((name, index));
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
                write_sparse(&file, chunk.offset, &[]).map_err(OciError::io("write", path))?;
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
