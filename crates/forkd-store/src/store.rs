//! The snapshot store: `root/<tag>/` holds `manifest.json` and the files it
//! names. A snapshot is built in a hidden `.staging-*` directory, hashed,
//! fsynced and renamed into place in one step, so a crash leaves either no
//! snapshot or a complete one; deletion renames to `.trash-*` first for the
//! same reason. The store never decides what goes into a snapshot.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::db::{Db, FileStamp};
use crate::error::{io_err, Result, StoreError};
use crate::hash::{hash_open_file, ZeroCvs};
use crate::validate_tag;

/// Manifest format written by this version; higher ones are refused on load.
pub const MANIFEST_FORMAT: u32 = 1;

const MANIFEST_NAME: &str = "manifest.json";
const STAGING_PREFIX: &str = ".staging-";
const TRASH_PREFIX: &str = ".trash-";

/// Describes one published snapshot; stored as `root/<tag>/manifest.json`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub tag: String,
    /// Unix seconds.
    pub created_at: u64,
    pub parent: Option<String>,
    pub source_sandbox: Option<String>,
    pub pause_ms: f64,
    /// When set, the RAM image is a diff layer over this snapshot's RAM:
    /// only the pages listed in the layer map differ from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_parent: Option<String>,
    /// The source's disk image this snapshot's disk is a copy of (a file in
    /// the source sandbox's run directory, frozen at the pause). The next
    /// snapshot of the same source finds here which stored disk stands for
    /// that file when it makes its own disk independent of the run
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_from: Option<String>,
    /// The VM configuration needed to restore; owned by the caller.
    pub machine: serde_json::Value,
    /// Every file of the snapshot, sorted by name.
    pub files: Vec<FileEntry>,
    /// For a snapshot pulled from a registry: the identity it had where it
    /// was made, so that a later pull of a branch of it finds it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// One file of a snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Plain file name inside the snapshot directory (no `/`).
    pub name: String,
    pub size: u64,
    /// Hex BLAKE3 of the full contents.
    pub blake3: String,
}

/// Counters of the work [`Store::verify`] did, to show that the cache works.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyStats {
    /// Files whose contents were read and hashed.
    pub files_hashed: u64,
    /// Files accepted from the `verified` cache without reading them.
    pub cache_hits: u64,
}

/// The snapshot directory tree, `$FORKD_HOME/snapshots`.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    files_hashed: AtomicU64,
    cache_hits: AtomicU64,
    /// Zero blocks' BLAKE3 chaining values (see [`Store::keep_zero_cvs_in`]).
    zeros: Arc<ZeroCvs>,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store {
            root: root.into(),
            files_hashed: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            zeros: Arc::new(ZeroCvs::in_memory()),
        }
    }

    /// Keeps the table that makes hashing sparse RAM images fast in `file`
    /// (outside the store's root), so each process does not compute it
    /// again: 0.23 s per GiB of the largest file hashed, once.
    pub fn keep_zero_cvs_in(mut self, file: impl Into<PathBuf>) -> Store {
        self.zeros = Arc::new(ZeroCvs::at(file));
        self
    }

    /// Hex BLAKE3 of the file at `path` (anywhere), with this store's
    /// table of zero blocks: [`crate::hash_file`] for callers that have a
    /// store.
    pub fn hash_file(&self, path: &Path) -> Result<String> {
        crate::hash::hash_file_with(path, &self.zeros)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of snapshot `tag` (whether or not it exists). Validate the
    /// tag first when it comes from a user.
    pub fn dir(&self, tag: &str) -> PathBuf {
        self.root.join(tag)
    }

    /// Whether a published snapshot directory exists for `tag`.
    pub fn exists(&self, tag: &str) -> bool {
        validate_tag(tag).is_ok() && self.dir(tag).is_dir()
    }

    /// Starts building snapshot `tag` in a fresh staging directory.
    pub fn stage(&self, tag: &str) -> Result<Staging> {
        validate_tag(tag)?;
        if self.dir(tag).exists() {
            return Err(StoreError::SnapshotExists {
                tag: tag.to_owned(),
            });
        }
        fs::create_dir_all(&self.root).map_err(io_err("create directory", &self.root))?;
        let dir = create_unique_dir(&self.root, STAGING_PREFIX, tag)?;
        Ok(Staging {
            dir,
            root: self.root.clone(),
            tag: tag.to_owned(),
            published: false,
            zeros: self.zeros.clone(),
        })
    }

    /// Starts building a replacement for published snapshot `tag` (the same
    /// snapshot written another way, e.g. compacted), to be swapped in by
    /// [`Staging::publish_over`]. Until then readers see the old one.
    pub fn stage_replacement(&self, tag: &str) -> Result<Staging> {
        validate_tag(tag)?;
        if !self.dir(tag).is_dir() {
            return Err(StoreError::NoSnapshot {
                tag: tag.to_owned(),
            });
        }
        let dir = create_unique_dir(&self.root, STAGING_PREFIX, tag)?;
        Ok(Staging {
            dir,
            root: self.root.clone(),
            tag: tag.to_owned(),
            published: false,
            zeros: self.zeros.clone(),
        })
    }

    /// Removes `.staging-*` and `.trash-*` directories left behind by
    /// processes that are gone. Returns how many were removed.
    pub fn sweep_staging(&self) -> usize {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(pid) = leftover_owner(name) else {
                continue;
            };
            if pid == std::process::id() || process_alive(pid) {
                continue;
            }
            if fs::remove_dir_all(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Reads and checks the manifest of snapshot `tag` (no file contents).
    pub fn load(&self, tag: &str) -> Result<Manifest> {
        validate_tag(tag)?;
        let dir = self.dir(tag);
        if !dir.is_dir() {
            return Err(StoreError::NoSnapshot {
                tag: tag.to_owned(),
            });
        }
        let path = dir.join(MANIFEST_NAME);
        let invalid = |reason: String| StoreError::ManifestInvalid {
            tag: tag.to_owned(),
            path: path.clone(),
            reason,
        };
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::ManifestMissing {
                    tag: tag.to_owned(),
                    path,
                })
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        // Look at the format before the strict parse, so a newer manifest
        // (which may carry fields we do not know) says "upgrade", not "invalid".
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        let format = value
            .get("format")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| invalid("no numeric `format` field".to_owned()))?;
        if format > u64::from(MANIFEST_FORMAT) {
            return Err(StoreError::ManifestTooNew {
                tag: tag.to_owned(),
                found: format,
                supported: MANIFEST_FORMAT,
            });
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        if manifest.tag != tag {
            return Err(invalid(format!(
                "it names snapshot `{}`, but lives in `{tag}`",
                manifest.tag
            )));
        }
        for file in &manifest.files {
            if !is_plain_file_name(&file.name) {
                return Err(invalid(format!(
                    "file name `{}` is not a plain file name",
                    file.name
                )));
            }
        }
        Ok(manifest)
    }

    /// Loads the manifest of `tag` and checks every file it names: present,
    /// the right size, and the right BLAKE3. Hashes already checked for the
    /// same file version (path, size, mtime, ctime, inode) are taken from the
    /// `verified` table in `db`, so repeated calls cost a few `stat`s.
    pub fn verify(&self, db: &Db, tag: &str) -> Result<Manifest> {
        let manifest = self.load(tag)?;
        let dir = self.dir(tag);
        for entry in &manifest.files {
            self.verify_file(db, tag, &dir.join(&entry.name), entry)?;
        }
        Ok(manifest)
    }

    fn verify_file(&self, db: &Db, tag: &str, path: &Path, entry: &FileEntry) -> Result<()> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::FileMissing {
                    tag: tag.to_owned(),
                    name: entry.name.clone(),
                })
            }
            Err(e) => return Err(io_err("open", path)(e)),
        };
        let meta = file.metadata().map_err(io_err("stat", path))?;
        if !meta.is_file() {
            return Err(StoreError::NotRegularFile {
                tag: tag.to_owned(),
                name: entry.name.clone(),
            });
        }
        if meta.len() != entry.size {
            return Err(StoreError::FileSizeMismatch {
                tag: tag.to_owned(),
                name: entry.name.clone(),
                actual: meta.len(),
                expected: entry.size,
            });
        }
        let stamp = FileStamp::of(&meta);
        let key = path.to_string_lossy();
        if db.verified_hash(&key, &stamp)?.as_deref() == Some(entry.blake3.as_str()) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.files_hashed.fetch_add(1, Ordering::Relaxed);
        let actual = hash_open_file(&file, entry.size, &self.zeros)
            .map_err(io_err("hash", path))?
            .to_hex()
            .to_string();
        if actual != entry.blake3 {
            return Err(StoreError::FileCorrupt {
                tag: tag.to_owned(),
                name: entry.name.clone(),
                actual,
                expected: entry.blake3.clone(),
            });
        }
        if !changed_recently(&stamp) {
            db.record_verified(&key, &stamp, &actual)?;
        }
        Ok(())
    }

    /// Whether the file at `path` (outside the store, e.g. a cached copy of
    /// a snapshot file) has `size` bytes and BLAKE3 `blake3`; answered from
    /// the verified cache when this version of the file was hashed before,
    /// like [`Store::verify`]. A missing file is `false`.
    pub fn matches_hash(&self, db: &Db, path: &Path, size: u64, blake3: &str) -> Result<bool> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("open", path)(e)),
        };
        let meta = file.metadata().map_err(io_err("stat", path))?;
        if !meta.is_file() || meta.len() != size {
            return Ok(false);
        }
        let stamp = FileStamp::of(&meta);
        let key = path.to_string_lossy();
        if db.verified_hash(&key, &stamp)?.as_deref() == Some(blake3) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        self.files_hashed.fetch_add(1, Ordering::Relaxed);
        let actual = hash_open_file(&file, size, &self.zeros)
            .map_err(io_err("hash", path))?
            .to_hex()
            .to_string();
        if actual != blake3 {
            return Ok(false);
        }
        if !changed_recently(&stamp) {
            db.record_verified(&key, &stamp, &actual)?;
        }
        Ok(true)
    }

    /// Loads the manifest of `tag` and checks, without reading them, that
    /// every file it names is there with the right size: what can be told
    /// cheaply about whether the snapshot is whole. [`Store::verify`] reads
    /// the contents too.
    pub fn check(&self, tag: &str) -> Result<Manifest> {
        self.check_files(tag, &[])
    }

    /// [`Store::check`] of the files named `only` (all of them when empty).
    pub fn check_files(&self, tag: &str, only: &[&str]) -> Result<Manifest> {
        let manifest = self.load(tag)?;
        let dir = self.dir(tag);
        for entry in manifest
            .files
            .iter()
            .filter(|e| only.is_empty() || only.contains(&e.name.as_str()))
        {
            let path = dir.join(&entry.name);
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StoreError::FileMissing {
                        tag: tag.to_owned(),
                        name: entry.name.clone(),
                    })
                }
                Err(e) => return Err(io_err("stat", &path)(e)),
            };
            if !meta.is_file() {
                return Err(StoreError::NotRegularFile {
                    tag: tag.to_owned(),
                    name: entry.name.clone(),
                });
            }
            if meta.len() != entry.size {
                return Err(StoreError::FileSizeMismatch {
                    tag: tag.to_owned(),
                    name: entry.name.clone(),
                    actual: meta.len(),
                    expected: entry.size,
                });
            }
        }
        Ok(manifest)
    }

    /// What [`Store::verify`] has done so far on this `Store`.
    pub fn verify_stats(&self) -> VerifyStats {
        VerifyStats {
            files_hashed: self.files_hashed.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
        }
    }

    /// Deletes snapshot `tag`: first renamed to a hidden `.trash-*` name (one
    /// atomic step, after which it is gone for every reader), then removed.
    /// Dependency checks are the caller's job (see [`crate::dependents`]).
    pub fn remove(&self, tag: &str) -> Result<()> {
        validate_tag(tag)?;
        let dir = self.dir(tag);
        if !dir.is_dir() {
            return Err(StoreError::NoSnapshot {
                tag: tag.to_owned(),
            });
        }
        let trash = loop {
            let candidate = self.root.join(unique_name(TRASH_PREFIX, tag));
            if !candidate.exists() {
                break candidate;
            }
        };
        match fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NoSnapshot {
                    tag: tag.to_owned(),
                })
            }
            Err(e) => return Err(io_err("move aside", &dir)(e)),
        }
        sync_dir(&self.root)?;
        fs::remove_dir_all(&trash).map_err(io_err("remove", &trash))
    }

    /// Replaces file `name` of published snapshot `tag` with `new` (a file
    /// in the snapshot's directory that its manifest does not list) and
    /// records its new size and hash in the manifest. The file is renamed
    /// over first, then the manifest: a crash in between leaves a snapshot
    /// that fails verification, never one that passes with other contents.
    pub fn replace_file(&self, tag: &str, name: &str, new: &Path) -> Result<Manifest> {
        let mut manifest = self.load(tag)?;
        let dir = self.dir(tag);
        let Some(i) = manifest.files.iter().position(|f| f.name == name) else {
            return Err(StoreError::FileMissing {
                tag: tag.to_owned(),
                name: name.to_owned(),
            });
        };
        let file = File::open(new).map_err(io_err("open", new))?;
        let size = file.metadata().map_err(io_err("stat", new))?.len();
        let hash = hash_open_file(&file, size, &self.zeros).map_err(io_err("hash", new))?;
        file.sync_all().map_err(io_err("fsync", new))?;
        drop(file);
        manifest.files[i].size = size;
        manifest.files[i].blake3 = hash.to_hex().to_string();
        let target = dir.join(name);
        fs::rename(new, &target).map_err(io_err("replace", &target))?;
        let manifest_path = dir.join(MANIFEST_NAME);
        let tmp = dir.join(format!(".{MANIFEST_NAME}.new"));
        let mut json =
            serde_json::to_vec_pretty(&manifest).expect("a manifest always serializes to JSON");
        json.push(b'\n');
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &manifest_path).map_err(io_err("replace", &manifest_path))?;
        sync_dir(&dir)?;
        Ok(manifest)
    }

    /// [`Store::remove`] for a snapshot whose directory may be missing (a
    /// failed one never had one): returns whether there was one.
    pub fn remove_if_present(&self, tag: &str) -> Result<bool> {
        match self.remove(tag) {
            Ok(()) => Ok(true),
            Err(StoreError::NoSnapshot { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Tags of the published snapshot directories, sorted. Hidden staging and
    /// trash directories are not listed. An absent root lists nothing.
    pub fn list_dirs(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut tags: Vec<String> = entries
            .flatten()
            .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| validate_tag(name).is_ok())
            .collect();
        tags.sort();
        tags
    }
}

/// A snapshot under construction: write its files into [`Staging::path`],
/// then [`Staging::publish`]. Dropped unpublished, it removes its directory.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    root: PathBuf,
    tag: String,
    published: bool,
    zeros: Arc<ZeroCvs>,
}

impl Staging {
    /// The staging directory to write the snapshot's files into.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Hashes every file in the staging directory into `manifest.files`
    /// (replacing whatever was there), writes `manifest.json`, makes it all
    /// durable and renames the directory to `root/<tag>`. Fails with
    /// [`StoreError::SnapshotExists`] if that appeared in the meantime.
    pub fn publish(mut self, manifest: Manifest) -> Result<Manifest> {
        let manifest = self.seal(manifest)?;
        let target = self.root.join(&self.tag);
        rename_noreplace(&self.dir, &target).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) {
                StoreError::SnapshotExists {
                    tag: self.tag.clone(),
                }
            } else {
                io_err("publish snapshot to", &target)(e)
            }
        })?;
        self.published = true;
        sync_dir(&self.root)?;
        Ok(manifest)
    }

    /// Like [`Staging::publish`], for a staging made by
    /// [`Store::stage_replacement`]: the published directory and this one
    /// trade places in one `rename(2)` (`RENAME_EXCHANGE`), so every reader
    /// sees the old snapshot or the new one, whole; then the old one is
    /// deleted. A crash before the exchange leaves the old snapshot, after
    /// it the new one (and the old files under a `.staging-*` name that
    /// [`Store::sweep_staging`] removes). Fails with
    /// [`StoreError::NoSnapshot`] if the old one was deleted meanwhile.
    /// `expected` names files whose BLAKE3 (hex) must come out as given:
    /// one that does not is refused ([`StoreError::FileCorrupt`]) before
    /// anything is swapped.
    pub fn publish_over(
        mut self,
        manifest: Manifest,
        expected: &[(&str, &str)],
    ) -> Result<Manifest> {
        let manifest = self.seal(manifest)?;
        for (name, want) in expected {
            let got = manifest.files.iter().find(|f| f.name == *name);
            if got.map(|f| f.blake3.as_str()) != Some(*want) {
                return Err(StoreError::FileCorrupt {
                    tag: self.tag.clone(),
                    name: (*name).to_owned(),
                    actual: got.map(|f| f.blake3.clone()).unwrap_or_default(),
                    expected: (*want).to_owned(),
                });
            }
        }
        let target = self.root.join(&self.tag);
        rename_exchange(&self.dir, &target).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                StoreError::NoSnapshot {
                    tag: self.tag.clone(),
                }
            } else {
                io_err("swap snapshot into", &target)(e)
            }
        })?;
        sync_dir(&self.root)?;
        // `self.dir` now holds the old snapshot: dropped unpublished, the
        // staging removes it.
        let _ = self.discard_old();
        Ok(manifest)
    }

    /// Moves the replaced snapshot (now at this staging's path) aside and
    /// deletes it.
    fn discard_old(&mut self) -> Result<()> {
        let trash = self.root.join(unique_name(TRASH_PREFIX, &self.tag));
        fs::rename(&self.dir, &trash).map_err(io_err("move aside", &self.dir))?;
        self.published = true;
        fs::remove_dir_all(&trash).map_err(io_err("remove", &trash))
    }

    /// Hashes the files into `manifest`, writes it and makes it all durable.
    fn seal(&self, mut manifest: Manifest) -> Result<Manifest> {
        if manifest.tag != self.tag {
            return Err(StoreError::ManifestTagMismatch {
                tag: self.tag.clone(),
                found: manifest.tag,
            });
        }
        manifest.format = MANIFEST_FORMAT;
        manifest.files = self.hash_and_sync_files()?;

        let manifest_path = self.dir.join(MANIFEST_NAME);
        let mut json =
            serde_json::to_vec_pretty(&manifest).expect("a manifest always serializes to JSON");
        json.push(b'\n');
        let mut file = File::create(&manifest_path).map_err(io_err("create", &manifest_path))?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(io_err("write", &manifest_path))?;
        sync_dir(&self.dir)?;
        Ok(manifest)
    }

    fn hash_and_sync_files(&self) -> Result<Vec<FileEntry>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let kind = entry.file_type().map_err(io_err("stat", entry.path()))?;
            if !kind.is_file() || !is_plain_file_name(&name) || entry.file_name().to_str().is_none()
            {
                return Err(StoreError::UnexpectedStagingEntry {
                    tag: self.tag.clone(),
                    name,
                });
            }
            let path = entry.path();
            let file = File::open(&path).map_err(io_err("open", &path))?;
            let size = file.metadata().map_err(io_err("stat", &path))?.len();
            let hash = hash_open_file(&file, size, &self.zeros).map_err(io_err("hash", &path))?;
            file.sync_all().map_err(io_err("fsync", &path))?;
            files.push(FileEntry {
                name,
                size,
                blake3: hash.to_hex().to_string(),
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A file name that stays inside its directory and is not the manifest.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name != MANIFEST_NAME
        && !name.contains('/')
        && !name.contains('\0')
}

/// `<prefix><tag>-<pid>-<random>`; the pid lets `sweep_staging` tell whose it is.
fn unique_name(prefix: &str, tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!(
        "{nanos}:{}:{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let random = &blake3::hash(seed.as_bytes()).to_hex()[..12];
    format!("{prefix}{tag}-{}-{random}", std::process::id())
}

fn create_unique_dir(root: &Path, prefix: &str, tag: &str) -> Result<PathBuf> {
    loop {
        let dir = root.join(unique_name(prefix, tag));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create directory", &dir)(e)),
        }
    }
}

/// The pid owning a `.staging-*` / `.trash-*` directory name, if it is one.
fn leftover_owner(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix(STAGING_PREFIX)
        .or_else(|| name.strip_prefix(TRASH_PREFIX))?;
    let mut parts = rest.rsplitn(3, '-');
    let _random = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    let _tag = parts.next()?;
    Some(pid)
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 performs only the existence/permission check and sends
    // nothing; no memory is involved.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether a file changed so recently that a later write could leave its
/// timestamps unchanged (they tick at kernel-clock granularity, or whole
/// seconds on some filesystems). Such files are hashed but not cached: the
/// same "racily clean" rule git uses for its index.
fn changed_recently(stamp: &FileStamp) -> bool {
    let window = if stamp.ctime_ns % 1_000_000_000 == 0 {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(100)
    };
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let newest = stamp.ctime_ns.max(stamp.mtime_ns);
    now_ns.saturating_sub(newest) < window.as_nanos() as i64
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Swaps two directories in one step (`renameat2` with `RENAME_EXCHANGE`,
/// Linux 3.15 and tmpfs/ext4/xfs/btrfs).
fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    renameat2(a, b, libc::RENAME_EXCHANGE)
}

/// `renameat2(2)` with `flags`, both paths relative to the working directory.
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    let c_from = CString::new(from.as_os_str().as_bytes())?;
    let c_to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both pointers are NUL-terminated strings that outlive the call;
    // the kernel only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `rename(2)` that fails with `EEXIST` instead of replacing an (empty)
/// directory already at `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let Err(err) = renameat2(from, to, libc::RENAME_NOREPLACE) else {
        return Ok(());
    };
    match err.raw_os_error() {
        // Old kernel or a filesystem without RENAME_NOREPLACE: check, then a
        // plain rename (which still refuses a non-empty target).
        Some(libc::ENOSYS) | Some(libc::EINVAL) => {
            if to.exists() {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            fs::rename(from, to)
        }
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    struct Fixture {
        _tmp: tempfile::TempDir,
        store: Store,
        db: Db,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("snapshots"));
        let db = Db::open(&tmp.path().join("forkd.db")).unwrap();
        Fixture {
            _tmp: tmp,
            store,
            db,
        }
    }

    fn manifest(tag: &str) -> Manifest {
        Manifest {
            format: 0,
            tag: tag.to_owned(),
            created_at: 1_700_000_000,
            parent: None,
            source_sandbox: Some("sb-1".to_owned()),
            pause_ms: 42.5,
            ram_parent: None,
            disk_from: None,
            machine: serde_json::json!({"mem_mib": 256, "cpus": 1}),
            files: Vec::new(),
            origin: None,
        }
    }

    const RAM_SIZE: u64 = 8 << 20;

    /// Stages and publishes `tag` with the three files the VM side writes.
    fn publish(store: &Store, tag: &str) -> Manifest {
        let staging = store.stage(tag).unwrap();
        fs::write(staging.path().join("device.state"), b"device state bytes").unwrap();
        fs::write(staging.path().join("disk.qcow2"), vec![7u8; 70_000]).unwrap();
        let ram = File::create(staging.path().join("ram.img")).unwrap();
        ram.set_len(RAM_SIZE).unwrap();
        ram.write_all_at(b"page", 4 << 20).unwrap();
        staging.publish(manifest(tag)).unwrap()
    }

    /// Lets the files' timestamps age past the "changed recently" window so
    /// that `verify` caches them.
    fn let_timestamps_settle() {
        std::thread::sleep(Duration::from_millis(250));
    }

    #[test]
    fn stage_and_publish_writes_a_complete_manifest() {
        let f = fixture();
        let staging = f.store.stage("py").unwrap();
        let staging_dir = staging.path().to_owned();
        let name = staging_dir.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".staging-py-"), "{name}");
        fs::write(staging.path().join("b.bin"), b"bbbb").unwrap();
        fs::write(staging.path().join("a.bin"), b"a").unwrap();

        // Nothing is visible under the tag until publish renames it in.
        assert!(!f.store.exists("py"));
        assert!(!f.store.dir("py").exists());
        assert!(f.store.list_dirs().is_empty());

        let published = staging.publish(manifest("py")).unwrap();
        assert_eq!(published.format, MANIFEST_FORMAT);
        assert_eq!(
            published.files,
            vec![
                FileEntry {
                    name: "a.bin".into(),
                    size: 1,
                    blake3: blake3::hash(b"a").to_hex().to_string(),
                },
                FileEntry {
                    name: "b.bin".into(),
                    size: 4,
                    blake3: blake3::hash(b"bbbb").to_hex().to_string(),
                },
            ]
        );
        assert!(!staging_dir.exists());
        assert!(f.store.exists("py"));
        assert!(f.store.dir("py").join("manifest.json").is_file());
        assert_eq!(f.store.load("py").unwrap(), published);
        assert_eq!(f.store.list_dirs(), ["py"]);
        assert_eq!(
            published,
            Manifest {
                format: MANIFEST_FORMAT,
                files: published.files.clone(),
                ..manifest("py")
            }
        );
        // The hidden directories of the store are never listed.
        let _other = f.store.stage("other").unwrap();
        assert_eq!(f.store.list_dirs(), ["py"]);
    }

    #[test]
    fn stage_refuses_invalid_and_existing_tags() {
        let f = fixture();
        assert!(matches!(
            f.store.stage("../evil"),
            Err(StoreError::InvalidTag { .. })
        ));
        publish(&f.store, "py");
        let err = f.store.stage("py").unwrap_err();
        assert!(matches!(err, StoreError::SnapshotExists { .. }), "{err}");
        assert_eq!(err.to_string(), "snapshot `py` already exists");
    }

    #[test]
    fn a_replacement_is_swapped_in_whole_and_the_old_files_go() {
        let f = fixture();
        assert!(matches!(
            f.store.stage_replacement("py"),
            Err(StoreError::NoSnapshot { .. })
        ));
        publish(&f.store, "py");
        let staging = f.store.stage_replacement("py").unwrap();
        fs::write(staging.path().join("ram.img"), b"flat").unwrap();
        // Until the swap, readers see the old snapshot.
        assert_eq!(f.store.load("py").unwrap().files.len(), 3);
        let flat = blake3::hash(b"flat").to_hex().to_string();
        let new = staging
            .publish_over(manifest("py"), &[("ram.img", &flat)])
            .unwrap();
        assert_eq!(new.files.len(), 1);
        assert_eq!(f.store.load("py").unwrap(), new);
        assert_eq!(
            fs::read(f.store.dir("py").join("ram.img")).unwrap(),
            b"flat"
        );
        assert!(!f.store.dir("py").join("device.state").exists());
        // Nothing hidden is left: neither the staging nor the old files.
        assert_eq!(fs::read_dir(f.store.root()).unwrap().count(), 1);

        // Deleted meanwhile: refused, and nothing is published.
        let staging = f.store.stage_replacement("py").unwrap();
        fs::write(staging.path().join("ram.img"), b"late").unwrap();
        f.store.remove("py").unwrap();
        let err = staging.publish_over(manifest("py"), &[]).unwrap_err();
        assert!(matches!(err, StoreError::NoSnapshot { .. }), "{err}");
        // A file that is not what the caller made is refused, nothing swapped.
        publish(&f.store, "py");
        let staging = f.store.stage_replacement("py").unwrap();
        fs::write(staging.path().join("ram.img"), b"flat?").unwrap();
        let err = staging
            .publish_over(manifest("py"), &[("ram.img", &flat)])
            .unwrap_err();
        assert!(matches!(err, StoreError::FileCorrupt { .. }), "{err}");
        assert_eq!(f.store.load("py").unwrap().files.len(), 3);
        f.store.remove("py").unwrap();
        assert_eq!(fs::read_dir(f.store.root()).unwrap().count(), 0);
    }

    #[test]
    fn unpublished_staging_is_removed_on_drop() {
        let f = fixture();
        let staging = f.store.stage("py").unwrap();
        fs::write(staging.path().join("ram.img"), b"x").unwrap();
        let dir = staging.path().to_owned();
        assert!(dir.is_dir());
        drop(staging);
        assert!(!dir.exists());
        assert!(!f.store.exists("py"));
        assert_eq!(fs::read_dir(f.store.root()).unwrap().count(), 0);
    }

    #[test]
    fn publish_refuses_when_the_tag_appeared_meanwhile() {
        for target_has_files in [true, false] {
            let f = fixture();
            let staging = f.store.stage("py").unwrap();
            fs::write(staging.path().join("ram.img"), b"mine").unwrap();
            let staging_dir = staging.path().to_owned();
            // Another writer wins the race (possibly with an empty dir, which
            // a plain rename(2) would silently replace).
            fs::create_dir(f.store.dir("py")).unwrap();
            if target_has_files {
                fs::write(f.store.dir("py").join("ram.img"), b"theirs").unwrap();
            }
            let err = staging.publish(manifest("py")).unwrap_err();
            assert!(matches!(err, StoreError::SnapshotExists { .. }), "{err}");
            assert!(!staging_dir.exists(), "failed staging must be cleaned up");
            if target_has_files {
                assert_eq!(
                    fs::read(f.store.dir("py").join("ram.img")).unwrap(),
                    b"theirs"
                );
            } else {
                assert_eq!(fs::read_dir(f.store.dir("py")).unwrap().count(), 0);
            }
        }
    }

    #[test]
    fn publish_rejects_subdirectories_and_foreign_manifests() {
        let f = fixture();
        let staging = f.store.stage("py").unwrap();
        fs::create_dir(staging.path().join("nested")).unwrap();
        let err = staging.publish(manifest("py")).unwrap_err();
        assert!(
            matches!(err, StoreError::UnexpectedStagingEntry { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("`nested`"), "{err}");

        let staging = f.store.stage("py").unwrap();
        let err = staging.publish(manifest("other")).unwrap_err();
        assert!(
            matches!(err, StoreError::ManifestTagMismatch { .. }),
            "{err}"
        );
        assert!(!f.store.exists("py"));
    }

    #[test]
    fn verify_accepts_an_intact_snapshot_with_a_sparse_ram_image() {
        let f = fixture();
        let published = publish(&f.store, "py");
        let ram = published
            .files
            .iter()
            .find(|e| e.name == "ram.img")
            .unwrap();
        let mut full = vec![0u8; RAM_SIZE as usize];
        full[4 << 20..(4 << 20) + 4].copy_from_slice(b"page");
        assert_eq!(ram.blake3, blake3::hash(&full).to_hex().to_string());
        assert_eq!(f.store.verify(&f.db, "py").unwrap(), published);
    }

    #[test]
    fn verify_is_cached_and_the_cache_follows_rewrites() {
        let f = fixture();
        publish(&f.store, "py");
        let_timestamps_settle();
        f.store.verify(&f.db, "py").unwrap();
        assert_eq!(
            f.store.verify_stats(),
            VerifyStats {
                files_hashed: 3,
                cache_hits: 0
            }
        );
        f.store.verify(&f.db, "py").unwrap();
        assert_eq!(
            f.store.verify_stats(),
            VerifyStats {
                files_hashed: 3,
                cache_hits: 3
            }
        );
        // Another process (another Store) shares the cache through the db.
        let other = Store::new(f.store.root());
        other.verify(&f.db, "py").unwrap();
        assert_eq!(other.verify_stats().files_hashed, 0);

        // Flip one byte in place and put the old mtime back: size, mtime and
        // inode are unchanged, only ctime betrays the write.
        let path = f.store.dir("py").join("disk.qcow2");
        let mtime = fs::metadata(&path).unwrap().modified().unwrap();
        let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[8], 1234).unwrap();
        file.set_modified(mtime).unwrap();
        drop(file);
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime);

        let err = f.store.verify(&f.db, "py").unwrap_err();
        assert!(matches!(err, StoreError::FileCorrupt { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("snapshot `py`: disk.qcow2 does not match its manifest (blake3 "),
            "{msg}"
        );
        assert!(msg.ends_with("): it is corrupt"), "{msg}");
    }

    #[test]
    fn verify_detects_a_flipped_byte_right_after_publish() {
        let f = fixture();
        publish(&f.store, "py");
        f.store.verify(&f.db, "py").unwrap();
        let file = fs::OpenOptions::new()
            .write(true)
            .open(f.store.dir("py").join("device.state"))
            .unwrap();
        file.write_all_at(b"D", 0).unwrap();
        let err = f.store.verify(&f.db, "py").unwrap_err();
        assert!(
            matches!(err, StoreError::FileCorrupt { ref name, .. } if name == "device.state"),
            "{err}"
        );
    }

    #[test]
    fn verify_reports_missing_and_truncated_files() {
        let f = fixture();
        publish(&f.store, "py");
        fs::remove_file(f.store.dir("py").join("ram.img")).unwrap();
        let err = f.store.verify(&f.db, "py").unwrap_err();
        assert_eq!(
            err.to_string(),
            "snapshot `py` is missing ram.img: it is incomplete"
        );

        publish(&f.store, "py2");
        let ram = f.store.dir("py2").join("ram.img");
        fs::OpenOptions::new()
            .write(true)
            .open(&ram)
            .unwrap()
            .set_len(1000)
            .unwrap();
        let err = f.store.verify(&f.db, "py2").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "snapshot `py2`: ram.img is truncated: 1000 bytes, manifest says {RAM_SIZE}: \
                 it is corrupt"
            )
        );
    }

    #[test]
    fn load_reports_unknown_tag_garbage_missing_and_future_manifests() {
        let f = fixture();
        let err = f.store.verify(&f.db, "nope").unwrap_err();
        assert_eq!(err.to_string(), "no snapshot `nope`");

        publish(&f.store, "py");
        let manifest_path = f.store.dir("py").join("manifest.json");
        let good = fs::read_to_string(&manifest_path).unwrap();

        fs::write(&manifest_path, "{ not json").unwrap();
        let err = f.store.verify(&f.db, "py").unwrap_err();
        assert!(matches!(err, StoreError::ManifestInvalid { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&manifest_path.display().to_string()), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");

        let mut value: serde_json::Value = serde_json::from_str(&good).unwrap();
        value["format"] = serde_json::json!(MANIFEST_FORMAT + 1);
        value["brand_new_field"] = serde_json::json!(true);
        fs::write(&manifest_path, value.to_string()).unwrap();
        let err = f.store.load("py").unwrap_err();
        assert!(
            matches!(err, StoreError::ManifestTooNew { found: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade forkd"), "{err}");

        let mut value: serde_json::Value = serde_json::from_str(&good).unwrap();
        value["unknown"] = serde_json::json!(1);
        fs::write(&manifest_path, value.to_string()).unwrap();
        let err = f.store.load("py").unwrap_err();
        assert!(err.to_string().contains("unknown field `unknown`"), "{err}");

        let mut value: serde_json::Value = serde_json::from_str(&good).unwrap();
        value["files"][0]["name"] = serde_json::json!("../../etc/passwd");
        fs::write(&manifest_path, value.to_string()).unwrap();
        let err = f.store.load("py").unwrap_err();
        assert!(err.to_string().contains("not a plain file name"), "{err}");

        let mut value: serde_json::Value = serde_json::from_str(&good).unwrap();
        value["tag"] = serde_json::json!("other");
        fs::write(&manifest_path, value.to_string()).unwrap();
        assert!(matches!(
            f.store.load("py"),
            Err(StoreError::ManifestInvalid { .. })
        ));

        fs::remove_file(&manifest_path).unwrap();
        let err = f.store.load("py").unwrap_err();
        assert!(matches!(err, StoreError::ManifestMissing { .. }), "{err}");
        assert!(err.to_string().ends_with(": it is incomplete"), "{err}");
    }

    #[test]
    fn remove_leaves_no_trace() {
        let f = fixture();
        publish(&f.store, "py");
        publish(&f.store, "keep");
        f.store.remove("py").unwrap();
        assert!(!f.store.exists("py"));
        assert_eq!(f.store.list_dirs(), ["keep"]);
        assert_eq!(fs::read_dir(f.store.root()).unwrap().count(), 1);
        assert!(matches!(
            f.store.load("py"),
            Err(StoreError::NoSnapshot { .. })
        ));
        assert!(matches!(
            f.store.remove("py"),
            Err(StoreError::NoSnapshot { .. })
        ));
        assert!(matches!(
            f.store.remove(".."),
            Err(StoreError::InvalidTag { .. })
        ));
        // The tag can be reused, and the old verification does not leak to it.
        publish(&f.store, "py");
        f.store.verify(&f.db, "py").unwrap();
    }

    #[test]
    fn a_replaced_file_is_in_the_manifest() {
        let f = fixture();
        publish(&f.store, "py");
        let new = f.store.dir("py").join(".disk.new");
        fs::write(&new, b"other disk").unwrap();
        let m = f.store.replace_file("py", "disk.qcow2", &new).unwrap();
        assert!(!new.exists());
        assert_eq!(f.store.load("py").unwrap(), m);
        let e = m.files.iter().find(|e| e.name == "disk.qcow2").unwrap();
        assert_eq!(e.blake3, blake3::hash(b"other disk").to_hex().to_string());
        f.store.verify(&f.db, "py").unwrap();
        assert!(matches!(
            f.store.replace_file("py", "nope", &new),
            Err(StoreError::FileMissing { .. })
        ));
    }

    #[test]
    fn check_finds_missing_and_resized_files_without_reading_them() {
        let f = fixture();
        publish(&f.store, "py");
        f.store.check("py").unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(f.store.dir("py").join("disk.qcow2"))
            .unwrap()
            .set_len(3)
            .unwrap();
        let e = f.store.check("py").unwrap_err();
        assert!(matches!(e, StoreError::FileSizeMismatch { .. }), "{e}");
        f.store.check_files("py", &["ram.img"]).unwrap();
        fs::remove_file(f.store.dir("py").join("disk.qcow2")).unwrap();
        let e = f.store.check("py").unwrap_err();
        assert!(matches!(e, StoreError::FileMissing { .. }), "{e}");
        assert!(f.store.remove_if_present("py").unwrap());
        assert!(!f.store.remove_if_present("py").unwrap());
        assert!(matches!(
            f.store.check("py"),
            Err(StoreError::NoSnapshot { .. })
        ));
    }

    #[test]
    fn sweep_staging_removes_only_leftovers_of_dead_processes() {
        let f = fixture();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();

        let live = f.store.stage("live-tag").unwrap();
        publish(&f.store, "py");
        let root = f.store.root();
        let dead_staging = root.join(format!(".staging-my-tag-{dead_pid}-abc123"));
        let dead_trash = root.join(format!(".trash-py-{dead_pid}-def456"));
        let foreign_live = root.join(".staging-x-1-abc"); // pid 1 is always alive
        for dir in [&dead_staging, &dead_trash, &foreign_live] {
            fs::create_dir(dir).unwrap();
            fs::write(dir.join("ram.img"), b"x").unwrap();
        }
        assert_eq!(f.store.sweep_staging(), 2);
        assert!(!dead_staging.exists());
        assert!(!dead_trash.exists());
        assert!(foreign_live.exists());
        assert!(live.path().exists());
        assert!(f.store.exists("py"));
    }

    #[test]
    fn leftover_owner_parses_tags_with_dashes() {
        assert_eq!(leftover_owner(".staging-a-b-c-123-ffee"), Some(123));
        assert_eq!(leftover_owner(".trash-py-7-00"), Some(7));
        assert_eq!(leftover_owner(".staging-py"), None);
        assert_eq!(leftover_owner("py-1-2"), None);
    }
}
