//! Snapshots to and from OCI registries.
//!
//! Push: a snapshot and its chain of parents (every snapshot its `parent`
//! and `ram_parent` links reach) become one [`forkd_oci::fileset`]
//! artifact. Each snapshot's store files travel as `s<i>.<name>`; what they
//! need from outside the store (kernel, initramfs, the base disk and any
//! frozen overlay below a stored disk) travels as extras; the config
//! ([`artifact::ArtifactConfig`]) says which is which and what each qcow2
//! disk is layered on. Every local file is verified against the store's
//! BLAKE3 manifest before it is sent; chunks the registry has are skipped.
//!
//! Pull: the config is read first. Parents this host already has (same
//! origin) are kept and their files offered as chunk sources, and only the
//! files of the others are pulled, into a work directory under
//! `$FORKD_HOME/oci/pulls/<digest>` that an interrupted pull resumes from.
//! Every file is checked against the BLAKE3 and size the pushing host's
//! manifest recorded; only then are snapshots published, bottom-up, each
//! atomically by the store (a failure leaves complete parents or nothing),
//! each after its row is claimed `writing` as a branch claims its tag, so
//! that no snapshot directory is ever without a row: a pull killed while
//! publishing leaves a row that the next command marks `failed`.
//! Pulled boot files and base disks go to `$FORKD_HOME/imports/<blake3>`.
//! Disks' headers are rewritten to name their backing files on this host.
//!
//! File indexes (chunk lists) of stored files are cached by BLAKE3 under
//! `$FORKD_HOME/oci/indexes`, so later transfers offer local chunks without
//! reading whole RAM images; the pull re-verifies every chunk it takes.

pub mod artifact;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use forkd_oci::fileset::{self, FileSpec, LocalSources, PullOptions, PushOptions, TransferStats};
use forkd_oci::{ClientOptions, FileIndex, OciError, Reference, Registry};
use forkd_ops::{
    ErrorKind, Hint, OpError, PullOutcome, PullRequest, PushOutcome, PushRequest, SnapshotStatus,
    TransferCounts, TransferProgress,
};
use forkd_store::{Manifest, StoreError};

use crate::fleet::{SandboxConfig, DISK_IMAGE};
use crate::{CoreError, Fleet};
use artifact::{
    identity, prefix, set_name, ArtifactConfig, Backing, ExtraFile, ExtraRole, SetFile,
    SnapshotEntry, CONFIG_FORMAT,
};

/// Fault point ([`crate::faultpoint`]): a pull with a snapshot's row
/// claimed and its files staged, about to publish it.
pub const PULL_STOP_BEFORE_PUBLISH: &str = "pull:publish";

/// Why a push or pull failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Registry(#[from] OciError),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("{reference} is not a usable forkd snapshot: {reason}")]
    BadArtifact { reference: String, reason: String },
    #[error("file `{file}` pulled from {reference} is corrupt: {reason}; the registry holds a damaged copy, push the snapshot again")]
    Corrupt {
        reference: String,
        file: String,
        reason: String,
    },
    #[error("snapshot `{tag}` already exists here (and is not the one pulled)")]
    TagTaken { tag: String },
    #[error("this host already has that snapshot, as `{tag}`")]
    AlreadyHere { tag: String },
    #[error("snapshot `{tag}` cannot be pushed: {reason}")]
    NotPushable { tag: String, reason: String },
    #[error("{what} {}: {source}", path.display())]
    Host {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Disk(String),
}

impl From<&TransferError> for OpError {
    fn from(e: &TransferError) -> OpError {
        if let TransferError::Core(c) = e {
            return OpError::from(c);
        }
        let kind = match e {
            TransferError::Registry(o) => crate::error::oci_error_kind(o),
            TransferError::BadArtifact { .. } | TransferError::Corrupt { .. } => {
                ErrorKind::Unprocessable
            }
            TransferError::TagTaken { .. } | TransferError::AlreadyHere { .. } => {
                ErrorKind::Conflict
            }
            TransferError::NotPushable { .. } => ErrorKind::Conflict,
            TransferError::Host { .. } | TransferError::Disk(_) | TransferError::Core(_) => {
                ErrorKind::Internal
            }
        };
        let mut op = OpError::new(kind, e.to_string());
        if let TransferError::TagTaken { tag } = e {
            op = op.with_hint(Hint::PickAnotherTag { tag: tag.clone() });
        }
        op
    }
}

impl From<StoreError> for TransferError {
    fn from(e: StoreError) -> TransferError {
        TransferError::Core(CoreError::Store(e))
    }
}

fn host(
    what: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> TransferError {
    let path = path.into();
    move |source| TransferError::Host { what, path, source }
}

fn counts(s: &TransferStats) -> TransferCounts {
    TransferCounts {
        total_bytes: s.total_bytes,
        done_bytes: s.done_bytes,
        zero_bytes: s.zero_bytes,
        chunks_transferred: s.chunks_transferred,
        bytes_transferred: s.bytes_transferred,
        chunks_reused: s.chunks_reused,
        raw_bytes_reused: s.raw_bytes_reused,
        metadata_bytes: s.metadata_bytes,
    }
}

fn registry(reference: &Reference, insecure: bool) -> Result<Registry, TransferError> {
    Ok(Registry::new(
        &reference.registry,
        ClientOptions {
            insecure,
            ..ClientOptions::default()
        },
    )?)
}

/// Set names shown as `<snapshot>/<file>` in progress reports.
fn display_names(config: &ArtifactConfig) -> HashMap<String, String> {
    let mut names = HashMap::new();
    for s in &config.snapshots {
        for f in &s.manifest.files {
            names.insert(
                set_name(&s.prefix, &f.name),
                format!("{}/{}", s.manifest.tag, f.name),
            );
        }
    }
    for e in &config.extras {
        let role = match e.role {
            ExtraRole::Kernel => "kernel",
            ExtraRole::Initramfs => "initramfs",
            ExtraRole::Disk => "base disk",
        };
        names.insert(e.name.clone(), format!("{role} ({})", e.name));
    }
    names
}

impl Fleet {
    fn index_cache(&self) -> PathBuf {
        self.env().home.join("oci").join("indexes")
    }

    fn imports_dir(&self) -> PathBuf {
        self.env().home.join("imports")
    }

    /// Remembers the chunk index of a stored file with BLAKE3 `blake3`.
    fn cache_index(&self, blake3: &str, index: &FileIndex) {
        let dir = self.index_cache();
        if fs::create_dir_all(&dir).is_err() {
            return;
        }
        let Ok(json) = serde_json::to_vec(index) else {
            return;
        };
        let tmp = dir.join(format!(".{blake3}.{}", std::process::id()));
        if fs::write(&tmp, json).is_ok() {
            let _ = fs::rename(&tmp, dir.join(format!("{blake3}.json")));
        }
    }

    fn cached_index(&self, blake3: &str) -> Option<FileIndex> {
        let bytes = fs::read(self.index_cache().join(format!("{blake3}.json"))).ok()?;
        let index: FileIndex = serde_json::from_slice(&bytes).ok()?;
        index.validate().ok()?;
        Some(index)
    }

    /// Offers the chunks of every stored file whose index is cached.
    fn local_sources(&self) -> LocalSources {
        let mut local = LocalSources::new();
        let Ok(rows) = self.db().list_snapshots() else {
            return local;
        };
        for row in rows.iter().filter(|r| r.status == SnapshotStatus::Ready) {
            let Ok(m) = self.store().load(&row.tag) else {
                continue;
            };
            for f in &m.files {
                if let Some(index) = self.cached_index(&f.blake3) {
                    local.add(row.dir.join(&f.name), &index);
                }
            }
        }
        local
    }

    /// The snapshots `tag`'s chain reaches, `tag` first, each verified.
    fn chain_of(&self, tag: &str) -> Result<Vec<Manifest>, TransferError> {
        let mut out: Vec<Manifest> = Vec::new();
        let mut todo = vec![tag.to_string()];
        while let Some(t) = todo.pop() {
            if out.iter().any(|m| m.tag == t) {
                continue;
            }
            if out.len() >= artifact::MAX_SNAPSHOTS {
                return Err(TransferError::NotPushable {
                    tag: tag.into(),
                    reason: format!(
                        "its chain is longer than {} snapshots",
                        artifact::MAX_SNAPSHOTS
                    ),
                });
            }
            let row = self.db().ready_snapshot(&t).map_err(|e| match e {
                StoreError::NoSnapshot { .. } if t == tag => {
                    TransferError::Core(CoreError::NoSnapshot { tag: t.clone() })
                }
                other => TransferError::NotPushable {
                    tag: tag.into(),
                    reason: format!("its chain needs `{t}`: {other}"),
                },
            })?;
            let manifest = {
                let db = self.db();
                self.store().verify(&db, &row.tag)?
            };
            for link in [&manifest.parent, &manifest.ram_parent]
                .into_iter()
                .flatten()
            {
                // A parent deleted after its children were made is not needed
                // unless something below names its files (checked by disk
                // chain and RAM layer below).
                if self.store().exists(link) {
                    todo.push(link.clone());
                }
            }
            out.push(manifest);
        }
        // Parents after children: order by distance from `tag` is what the
        // config wants (links point down the list).
        order_down(&mut out);
        Ok(out)
    }

    /// Pushes snapshot `req.tag` and its chain to `req.reference`.
    pub fn push_snapshot(
        &self,
        req: &PushRequest,
        progress: &(dyn Fn(&TransferProgress) + Sync),
    ) -> Result<PushOutcome, TransferError> {
        forkd_ops::validate_tag(&req.tag).map_err(CoreError::from)?;
        let reference = Reference::parse(&req.reference)?;
        let chain = self.chain_of(&req.tag)?;
        let mut files: Vec<FileSpec> = Vec::new();
        let mut extras: Vec<ExtraFile> = Vec::new();
        let mut extra_paths: HashMap<PathBuf, String> = HashMap::new();
        let mut entries = Vec::new();
        // A file outside the store, by path: its set name (added once).
        let mut add_extra = |path: &Path,
                             role: ExtraRole,
                             backing: Option<Backing>,
                             files: &mut Vec<FileSpec>|
         -> Result<String, TransferError> {
            if let Some(name) = extra_paths.get(path) {
                return Ok(name.clone());
            }
            let meta = fs::metadata(path).map_err(host("reading", path))?;
            let name = format!(
                "{}{}",
                match role {
                    ExtraRole::Kernel => "k",
                    ExtraRole::Initramfs => "i",
                    ExtraRole::Disk => "x",
                },
                extras.len()
            );
            extras.push(ExtraFile {
                name: name.clone(),
                role,
                size: meta.len(),
                blake3: self.store().hash_file(path)?,
                backing,
            });
            files.push(FileSpec::new(name.clone(), path));
            extra_paths.insert(path.to_path_buf(), name.clone());
            Ok(name)
        };
        for (i, m) in chain.iter().enumerate() {
            let dir = self.store().dir(&m.tag);
            let p = prefix(i);
            for f in &m.files {
                files.push(FileSpec::new(set_name(&p, &f.name), dir.join(&f.name)));
            }
            let config: SandboxConfig = serde_json::from_value(m.machine.clone()).map_err(|e| {
                TransferError::NotPushable {
                    tag: m.tag.clone(),
                    reason: format!("its machine configuration is unreadable: {e}"),
                }
            })?;
            let kernel = add_extra(&config.vm.kernel, ExtraRole::Kernel, None, &mut files)?;
            let initramfs =
                add_extra(&config.vm.initramfs, ExtraRole::Initramfs, None, &mut files)?;
            let disk = dir.join(DISK_IMAGE);
            let disk_backing = if m.files.iter().any(|f| f.name == DISK_IMAGE) {
                let layers = disk_layers(&disk)?;
                // The first layer below that is a stored disk of the chain
                // carries on itself; the files above it travel as extras.
                let stored_at = |k: usize| -> Option<usize> {
                    let path = layers[k].path.canonicalize().ok()?;
                    chain.iter().position(|c| {
                        self.store()
                            .dir(&c.tag)
                            .join(DISK_IMAGE)
                            .canonicalize()
                            .is_ok_and(|d| d == path)
                    })
                };
                let cut = (1..layers.len())
                    .find(|&k| stored_at(k).is_some())
                    .unwrap_or(layers.len());
                let mut below = (cut < layers.len()).then(|| Backing {
                    file: set_name(&prefix(stored_at(cut).unwrap_or_default()), DISK_IMAGE),
                    format: layers[cut].format.to_string(),
                });
                for k in (1..cut).rev() {
                    let backing = if layers[k].format == "qcow2" {
                        below.clone()
                    } else {
                        None
                    };
                    let name = add_extra(&layers[k].path, ExtraRole::Disk, backing, &mut files)?;
                    below = Some(Backing {
                        file: name,
                        format: layers[k].format.to_string(),
                    });
                }
                below
            } else {
                None
            };
            entries.push(SnapshotEntry {
                origin: identity(m),
                manifest: m.clone(),
                prefix: p,
                disk_backing,
                kernel,
                initramfs,
            });
        }
        let config = ArtifactConfig {
            format: CONFIG_FORMAT,
            snapshots: entries,
            extras,
        };
        let config_bytes = serde_json::to_vec(&config).expect("an artifact config serialises");
        let names = display_names(&config);
        let registry = registry(&reference, req.insecure)?;
        let local = self.local_sources();
        let summary = fileset::push(
            &registry,
            &reference,
            &config_bytes,
            &files,
            &local,
            &PushOptions::default(),
            &mut |p| {
                progress(&TransferProgress {
                    file: names
                        .get(p.file)
                        .cloned()
                        .unwrap_or_else(|| p.file.to_string()),
                    counts: counts(p.stats),
                })
            },
        )?;
        // Remember the chunk lists of stored files for later transfers.
        for s in &config.snapshots {
            for f in &s.manifest.files {
                if let Some(index) = summary.indexes.get(&set_name(&s.prefix, &f.name)) {
                    self.cache_index(&f.blake3, index);
                }
            }
        }
        Ok(PushOutcome {
            tag: req.tag.clone(),
            reference: reference.to_string(),
            digest: summary.digest.to_string(),
            snapshots: config
                .snapshots
                .iter()
                .map(|s| s.manifest.tag.clone())
                .collect(),
            counts: counts(&summary.stats),
        })
    }

    /// The local snapshot with identity `origin`, if this host has one ready.
    fn snapshot_with_origin(&self, origin: &str) -> Option<String> {
        let rows = self.db().list_snapshots().ok()?;
        rows.into_iter()
            .filter(|r| r.status == SnapshotStatus::Ready)
            .find(|r| {
                self.store()
                    .load(&r.tag)
                    .is_ok_and(|m| identity(&m) == origin)
            })
            .map(|r| r.tag)
    }

    /// Pulls the snapshot at `req.reference` (and the parents this host
    /// lacks), verifies it and publishes it.
    pub fn pull_snapshot(
        &self,
        req: &PullRequest,
        progress: &(dyn Fn(&TransferProgress) + Sync),
    ) -> Result<PullOutcome, TransferError> {
        let reference = Reference::parse(&req.reference)?;
        if let Some(tag) = &req.tag {
            forkd_ops::validate_tag(tag).map_err(CoreError::from)?;
        }
        let registry = registry(&reference, req.insecure)?;
        let options = PullOptions::default();
        let resolved = fileset::resolve(&registry, &reference, &options)?;
        let bad = |reason: String| TransferError::BadArtifact {
            reference: reference.to_string(),
            reason,
        };
        let config = ArtifactConfig::parse(&resolved.config).map_err(bad)?;
        // Pin the digest: the files come from exactly the manifest read.
        let pinned = Reference {
            digest: Some(resolved.digest.clone()),
            ..reference.clone()
        };

        // Which snapshots this host has already, and local tags for the rest.
        let leaf_tag = req
            .tag
            .clone()
            .unwrap_or_else(|| config.snapshots[0].manifest.tag.clone());
        let mut local_tag: Vec<String> = Vec::new();
        let mut reused: Vec<bool> = Vec::new();
        for (i, s) in config.snapshots.iter().enumerate() {
            if let Some(have) = self.snapshot_with_origin(&s.origin) {
                if i == 0 && req.tag.as_ref().is_some_and(|t| t != &have) {
                    // Asked for under another tag: a second copy is not made.
                    return Err(TransferError::AlreadyHere { tag: have });
                }
                local_tag.push(have);
                reused.push(true);
                continue;
            }
            let wanted = if i == 0 {
                leaf_tag.clone()
            } else {
                s.manifest.tag.clone()
            };
            // A failed row (an interrupted pull's) is taken over by the claim.
            let free = |t: &str| -> Result<bool, TransferError> {
                Ok(!self.store().exists(t)
                    && self
                        .db()
                        .get_snapshot(t)?
                        .is_none_or(|r| r.status == SnapshotStatus::Failed))
            };
            let tag = if free(&wanted)? {
                wanted
            } else if i == 0 {
                return Err(TransferError::TagTaken { tag: wanted });
            } else {
                // A parent whose tag is taken here by another snapshot.
                let alt = format!("{}-{}", s.manifest.tag, &s.origin[..8]);
                forkd_ops::validate_tag(&alt).map_err(|_| TransferError::TagTaken {
                    tag: wanted.clone(),
                })?;
                if !free(&alt)? {
                    return Err(TransferError::TagTaken { tag: alt });
                }
                alt
            };
            local_tag.push(tag);
            reused.push(false);
        }

        // What to pull: files of the snapshots to publish, and extras not
        // imported yet (only those some published snapshot needs).
        let names = config.file_names();
        let imports = self.imports_dir();
        let mut only = BTreeSet::new();
        for (name, kind) in &names {
            let wanted = match kind {
                SetFile::Snapshot(i) | SetFile::SnapshotDisk(i) => !reused[*i],
                SetFile::Boot | SetFile::Disk => {
                    let e = config
                        .extras
                        .iter()
                        .find(|e| &e.name == name)
                        .expect("named");
                    !imports.join(&e.blake3).exists() && self.extra_needed(&config, name, &reused)
                }
            };
            if wanted {
                only.insert(name.clone());
            }
        }
        let work = self
            .env()
            .home
            .join("oci")
            .join("pulls")
            .join(resolved.digest.as_str().replace(':', "-"));
        let mut local = self.local_sources();
        for (i, s) in config.snapshots.iter().enumerate() {
            if reused[i] {
                let m = self.store().load(&local_tag[i])?;
                for f in &m.files {
                    if self.cached_index(&f.blake3).is_none() {
                        let path = self.store().dir(&local_tag[i]).join(&f.name);
                        if let Ok(index) = local.add_file(&path, forkd_oci::Chunking::DEFAULT) {
                            self.cache_index(&f.blake3, &index);
                        }
                    }
                }
                let _ = s;
            }
        }
        let display = display_names(&config);
        let summary = fileset::pull(
            &registry,
            &pinned,
            &work,
            &local,
            &PullOptions {
                only: Some(only.clone()),
                ..options
            },
            &mut |p| {
                progress(&TransferProgress {
                    file: display
                        .get(p.file)
                        .cloned()
                        .unwrap_or_else(|| p.file.to_string()),
                    counts: counts(p.stats),
                })
            },
        )?;

        // Every pulled file against the size and BLAKE3 its manifest names.
        let expected = expected_files(&config);
        for name in &only {
            let (size, blake3) = &expected[name];
            let path = work.join(name);
            let actual_size = fs::metadata(&path).map_err(host("reading", &path))?.len();
            let corrupt = |reason: String| TransferError::Corrupt {
                reference: reference.to_string(),
                file: display.get(name).cloned().unwrap_or_else(|| name.clone()),
                reason,
            };
            if actual_size != *size {
                return Err(corrupt(format!(
                    "{actual_size} bytes, its manifest says {size}"
                )));
            }
            let actual = self.store().hash_file(&path)?;
            if &actual != blake3 {
                return Err(corrupt(format!(
                    "BLAKE3 {actual}, its manifest says {blake3}"
                )));
            }
        }

        // Extras into the imports directory (content-named), bottom first
        // so that a qcow2 extra can name what it is layered on.
        fs::create_dir_all(&imports).map_err(host("creating", &imports))?;
        let mut placed: HashMap<String, PathBuf> = HashMap::new();
        let mut extras: Vec<&ExtraFile> = config.extras.iter().collect();
        extras.sort_by_key(|e| std::cmp::Reverse(depth(&config, &e.name)));
        for e in extras {
            let target = imports.join(&e.blake3);
            if only.contains(&e.name) && !target.exists() {
                let from = work.join(&e.name);
                if let Some(b) = &e.backing {
                    let below = placed
                        .get(&b.file)
                        .cloned()
                        .unwrap_or_else(|| imports.join(config_blake3(&config, &b.file)));
                    forkd_vm::disk::rebase(&from, &below, &b.format, false)
                        .map_err(TransferError::Disk)?;
                }
                fs::rename(&from, &target).map_err(host("importing", &target))?;
            }
            placed.insert(e.name.clone(), target);
        }

        // Snapshots, bottom-up, each published atomically by the store.
        let mut published = Vec::new();
        for i in (0..config.snapshots.len()).rev() {
            if reused[i] {
                continue;
            }
            let s = &config.snapshots[i];
            let tag = &local_tag[i];
            let map = |link: &Option<String>| -> Option<String> {
                let link = link.as_ref()?;
                config.position(link).map(|j| local_tag[j].clone())
            };
            // The row first (`writing`, under the writer lock), then the
            // directory: a pull killed from here on leaves a row that the
            // next forkd command fails and `rmi --failed` removes, never a
            // directory without one.
            let _writing = self.claim_row(&forkd_store::SnapshotRow {
                tag: tag.clone(),
                status: SnapshotStatus::Writing,
                dir: self.store().dir(tag),
                parent: map(&s.manifest.parent),
                source: None,
                created_at: s.manifest.created_at,
                pause_ms: Some(s.manifest.pause_ms),
                error: None,
            })?;
            let manifest = match self
                .publish_pulled(&reference, s, tag, &work, &names, &local_tag, &placed, &map)
            {
                Ok(m) => m,
                Err(e) => {
                    let _ = self.db().transition_snapshot(
                        tag,
                        SnapshotStatus::Writing,
                        SnapshotStatus::Failed,
                        Some(&e.to_string()),
                    );
                    return Err(e);
                }
            };
            self.db().transition_snapshot(
                tag,
                SnapshotStatus::Writing,
                SnapshotStatus::Ready,
                None,
            )?;
            for f in &s.manifest.files {
                if let Some(index) = summary.indexes.get(&set_name(&s.prefix, &f.name)) {
                    if let Some(now) = manifest.files.iter().find(|n| n.name == f.name) {
                        self.cache_index(&now.blake3, index);
                    }
                }
            }
            published.push(tag.clone());
        }
        let _ = fs::remove_dir_all(&work);
        published.reverse();
        Ok(PullOutcome {
            tag: local_tag[0].clone(),
            reference: reference.to_string(),
            digest: resolved.digest.to_string(),
            published,
            reused: (0..config.snapshots.len())
                .filter(|i| reused[*i])
                .map(|i| local_tag[i].clone())
                .collect(),
            counts: {
                let mut c = counts(&summary.stats);
                c.metadata_bytes += resolved.metadata_bytes;
                c
            },
        })
    }

    /// Publishes pulled snapshot `s` (files verified, in `work`) as `tag`,
    /// whose row the caller has claimed.
    #[allow(clippy::too_many_arguments)]
    fn publish_pulled(
        &self,
        reference: &Reference,
        s: &SnapshotEntry,
        tag: &str,
        work: &Path,
        names: &BTreeMap<String, SetFile>,
        local_tag: &[String],
        placed: &HashMap<String, PathBuf>,
        map: &dyn Fn(&Option<String>) -> Option<String>,
    ) -> Result<Manifest, TransferError> {
        let bad = |reason: String| TransferError::BadArtifact {
            reference: reference.to_string(),
            reason,
        };
        let staging = self.store().stage(tag)?;
        for f in &s.manifest.files {
            let from = work.join(set_name(&s.prefix, &f.name));
            let to = staging.path().join(&f.name);
            fs::rename(&from, &to).map_err(host("moving into the store", &to))?;
        }
        if let Some(b) = &s.disk_backing {
            let below = match names.get(&b.file) {
                Some(SetFile::SnapshotDisk(j)) => self.store().dir(&local_tag[*j]).join(DISK_IMAGE),
                _ => placed[&b.file].clone(),
            };
            forkd_vm::disk::rebase(&staging.path().join(DISK_IMAGE), &below, &b.format, false)
                .map_err(TransferError::Disk)?;
        }
        let mut machine: SandboxConfig = serde_json::from_value(s.manifest.machine.clone())
            .map_err(|e| {
                bad(format!(
                    "snapshot `{}` has an unreadable machine configuration: {e}",
                    s.manifest.tag
                ))
            })?;
        machine.vm.kernel = placed[&s.kernel].clone();
        machine.vm.initramfs = placed[&s.initramfs].clone();
        let manifest = Manifest {
            format: forkd_store::MANIFEST_FORMAT,
            tag: tag.to_string(),
            created_at: s.manifest.created_at,
            parent: map(&s.manifest.parent),
            source_sandbox: None,
            pause_ms: s.manifest.pause_ms,
            ram_parent: map(&s.manifest.ram_parent),
            // Names a run-directory file of the pushing host: meaningless here.
            disk_from: None,
            machine: serde_json::to_value(&machine).expect("config serialises"),
            files: vec![],
            origin: Some(s.origin.clone()),
        };
        crate::faultpoint::reached(PULL_STOP_BEFORE_PUBLISH);
        Ok(staging.publish(manifest)?)
    }

    /// Whether extra `name` is needed by a snapshot this pull publishes
    /// (its boot files, or below its disk before a kept snapshot's disk).
    fn extra_needed(&self, config: &ArtifactConfig, name: &str, reused: &[bool]) -> bool {
        config.snapshots.iter().enumerate().any(|(i, s)| {
            if reused[i] {
                return false;
            }
            if s.kernel == name || s.initramfs == name {
                return true;
            }
            let mut at = s.disk_backing.clone();
            while let Some(b) = at {
                if b.file == name {
                    return true;
                }
                if let Some(SetFile::SnapshotDisk(j)) = config.file_names().get(&b.file) {
                    if reused[*j] {
                        return false;
                    }
                }
                at = config.backing_of(&b.file);
            }
            false
        })
    }
}

/// One file of a stored disk's chain and the format qemu-img reads it as.
struct DiskLayer {
    path: PathBuf,
    format: &'static str,
}

/// `disk` and the files below it, top first (read from the qcow2 headers).
fn disk_layers(disk: &Path) -> Result<Vec<DiskLayer>, TransferError> {
    let below = forkd_vm::disk::backing_chain(disk).map_err(TransferError::Disk)?;
    std::iter::once(disk.to_path_buf())
        .chain(below)
        .map(|path| {
            if !path.exists() {
                return Err(TransferError::Disk(format!(
                    "the disk chain of {} names {}, which is gone",
                    disk.display(),
                    path.display()
                )));
            }
            Ok(DiskLayer {
                format: forkd_vm::disk::format_of(&path),
                path,
            })
        })
        .collect()
}

/// Size and BLAKE3 of every file of the set, as the pushing host recorded.
fn expected_files(config: &ArtifactConfig) -> BTreeMap<String, (u64, String)> {
    let mut out = BTreeMap::new();
    for s in &config.snapshots {
        for f in &s.manifest.files {
            out.insert(set_name(&s.prefix, &f.name), (f.size, f.blake3.clone()));
        }
    }
    for e in &config.extras {
        out.insert(e.name.clone(), (e.size, e.blake3.clone()));
    }
    out
}

fn config_blake3(config: &ArtifactConfig, name: &str) -> String {
    config
        .extras
        .iter()
        .find(|e| e.name == name)
        .map(|e| e.blake3.clone())
        .unwrap_or_default()
}

/// How many extras lie below extra `name` (bottom ones are imported first).
fn depth(config: &ArtifactConfig, name: &str) -> usize {
    let mut n = 0;
    let mut at = config.backing_of(name);
    while let Some(b) = at {
        n += 1;
        if n > 1024 {
            break;
        }
        at = config.backing_of(&b.file);
    }
    n
}

/// Orders a chain so that every snapshot comes before those its links name.
fn order_down(chain: &mut Vec<Manifest>) {
    let mut ordered: Vec<Manifest> = Vec::with_capacity(chain.len());
    let mut rest = std::mem::take(chain);
    while !rest.is_empty() {
        // Next: one no remaining snapshot links to.
        let i = (0..rest.len())
            .find(|&i| {
                !rest.iter().any(|m| {
                    [&m.parent, &m.ram_parent]
                        .into_iter()
                        .flatten()
                        .any(|l| l == &rest[i].tag)
                })
            })
            .unwrap_or(0);
        ordered.push(rest.remove(i));
    }
    *chain = ordered;
}

/// Maps a transfer error onto the seam.
pub(crate) fn op_error(e: TransferError) -> OpError {
    OpError::from(&e)
}
