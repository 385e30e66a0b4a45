//! Pushing a file set: chunk each file, upload the chunks the registry lacks,
//! then the file indexes, the config and the manifest (or the index and
//! carrier manifests when the chunk list is too long for one manifest).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;

use serde::Serialize;

use super::{validate_file_name, FileSpec, LocalSources, Progress, TransferStats};
use crate::chunking::{self, Chunking, FileIndex, Piece};
use crate::client::{Registry, Upload};
use crate::digest::Digest;
use crate::error::{OciError, Result};
use crate::media::*;
use crate::reference::Reference;

/// The empty JSON blob (`{}`), config of carrier manifests.
const EMPTY_JSON: &[u8] = b"{}";

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
    let Some(first_chunk) = chunk_layers.first() else {
        return Err(OciError::TooLarge {
            what: "the manifest of this file set (its file indexes alone)".into(),
            limit: limit as u64,
        });
    };
    let per_chunk = to_json("descriptor", first_chunk)?.len() + 1;
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
