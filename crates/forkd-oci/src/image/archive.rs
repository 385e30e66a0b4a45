//! Where image blobs come from: an OCI layout directory (`oci-layout:DIR`),
//! a tar of one (`oci-archive:PATH`), a `docker save` tarball
//! (`docker-archive:PATH`), or a registry. Tar archives are indexed once
//! (entry name → offset and size; they must be uncompressed, as both formats
//! are written) and then read in place, so nothing is extracted to disk.
//! Readers here return raw, unverified bytes bounded by the size they claim;
//! [`super`] verifies digests as it consumes them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::client::Registry;
use crate::digest::{verify, Bounded, Hashing};
use crate::error::{OciError, Result};
use crate::media::Descriptor;

/// Entries an archive may have before it is refused as hostile.
const MAX_ARCHIVE_ENTRIES: usize = 1_000_000;

/// An indexed, uncompressed tar file.
pub(crate) struct TarIndex {
    path: PathBuf,
    /// Normalized name → (data offset, size), or a symlink's target name.
    entries: HashMap<String, TarEntry>,
}

enum TarEntry {
    File { offset: u64, size: u64 },
    Symlink(String),
}

/// `./a//b` → `a/b`, `a/../b` → `b`; `None` for names that climb out of the archive.
fn normalize(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

impl TarIndex {
    pub(crate) fn open(path: &Path) -> Result<TarIndex> {
        let archive_error = |reason: String| OciError::Archive {
            path: path.to_owned(),
            reason,
        };
        let mut file = File::open(path).map_err(OciError::io("open archive", path))?;
        let mut magic = [0u8; 4];
        let n = file
            .read(&mut magic)
            .map_err(OciError::io("read archive", path))?;
        let head = &magic[..n];
        if head.starts_with(&[0x1f, 0x8b]) || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            return Err(archive_error(
                "it is compressed; decompress it (gunzip / zstd -d) and pass the plain tar".into(),
            ));
        }
        file.seek(SeekFrom::Start(0))
            .map_err(OciError::io("read archive", path))?;
        let mut archive = tar::Archive::new(file);
        let mut entries = HashMap::new();
        for entry in archive
            .entries()
            .map_err(|e| archive_error(format!("not a tar archive: {e}")))?
        {
            let entry = entry.map_err(|e| archive_error(format!("damaged tar entry: {e}")))?;
            if entries.len() >= MAX_ARCHIVE_ENTRIES {
                return Err(archive_error(format!(
                    "more than {MAX_ARCHIVE_ENTRIES} entries"
                )));
            }
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(name) = normalize(&name) else {
                continue;
            };
            let kind = entry.header().entry_type();
            if kind.is_file() {
                entries.insert(
                    name,
                    TarEntry::File {
                        offset: entry.raw_file_position(),
                        size: entry.size(),
                    },
                );
            } else if kind.is_symlink() || kind.is_hard_link() {
                if let Some(target) = entry.link_name_bytes() {
                    let target = String::from_utf8_lossy(&target).into_owned();
                    // Symlinks are relative to the entry's directory, hard links to the root.
                    let joined = match (kind.is_symlink(), name.rsplit_once('/')) {
                        (true, Some((dir, _))) => format!("{dir}/{target}"),
                        _ => target,
                    };
                    if let Some(t) = normalize(&joined) {
                        entries.insert(name, TarEntry::Symlink(t));
                    }
                }
            }
        }
        Ok(TarIndex {
            path: path.to_owned(),
            entries,
        })
    }

    /// Opens entry `name` (following links inside the archive): a reader of
    /// exactly its bytes, and its size.
    pub(crate) fn open_entry(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64)> {
        let missing = || OciError::Archive {
            path: self.path.clone(),
            reason: format!("it has no entry `{name}`"),
        };
        let mut current = normalize(name).ok_or_else(missing)?;
        for _ in 0..8 {
            match self.entries.get(&current).ok_or_else(missing)? {
                TarEntry::Symlink(target) => current = target.clone(),
                TarEntry::File { offset, size } => {
                    let mut file =
                        File::open(&self.path).map_err(OciError::io("open archive", &self.path))?;
                    file.seek(SeekFrom::Start(*offset))
                        .map_err(OciError::io("read archive", &self.path))?;
                    return Ok((Box::new(file.take(*size)), *size));
                }
            }
        }
        Err(missing())
    }
}

/// A place image blobs are read from.
pub(crate) enum BlobStore {
    Layout(PathBuf),
    Archive(TarIndex),
    Registry { client: Box<Registry>, repo: String },
}

impl BlobStore {
    /// A file of an OCI layout or archive (`index.json`, docker's
    /// `manifest.json`), read whole with a bound.
    pub(crate) fn read_file(&self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let (reader, size, shown) = match self {
            BlobStore::Layout(dir) => {
                let path = dir.join(name);
                let file = File::open(&path).map_err(OciError::io("open", &path))?;
                let size = file.metadata().map_err(OciError::io("stat", &path))?.len();
                (
                    Box::new(file) as Box<dyn Read + Send>,
                    size,
                    path.display().to_string(),
                )
            }
            BlobStore::Archive(index) => {
                let (reader, size) = index.open_entry(name)?;
                (reader, size, format!("{name} in {}", index.path.display()))
            }
            BlobStore::Registry { .. } => {
                return Err(OciError::bad(name, "a registry has no files, only blobs"));
            }
        };
        if size > limit {
            return Err(OciError::TooLarge { what: shown, limit });
        }
        let mut bytes = Vec::new();
        Bounded::new(reader, limit)
            .read_to_end(&mut bytes)
            .map_err(OciError::io("read", shown))?;
        Ok(bytes)
    }

    /// Opens blob `desc` unverified; the stream yields at most `size + 1`
    /// bytes so a caller that counts can tell a blob that is too long.
    pub(crate) fn open_blob(&self, desc: &Descriptor, what: &str) -> Result<Box<dyn Read + Send>> {
        match self {
            BlobStore::Layout(dir) => {
                let path = dir.join("blobs/sha256").join(desc.digest.hex());
                let file = File::open(&path).map_err(|e| {
                    OciError::io(
                        "open",
                        format!("{what} {} ({})", desc.digest, path.display()),
                    )(e)
                })?;
                Ok(Box::new(file.take(desc.size + 1)))
            }
            BlobStore::Archive(index) => {
                let (reader, _) =
                    index.open_entry(&format!("blobs/sha256/{}", desc.digest.hex()))?;
                Ok(Box::new(reader.take(desc.size + 1)))
            }
            BlobStore::Registry { client, repo } => client.blob_reader(repo, desc, what),
        }
    }

    /// Reads blob `desc` whole, verified; refused above `limit`.
    pub(crate) fn read_blob(&self, desc: &Descriptor, what: &str, limit: u64) -> Result<Vec<u8>> {
        if desc.size > limit {
            return Err(OciError::TooLarge {
                what: format!("{what} {}", desc.digest),
                limit,
            });
        }
        if let BlobStore::Registry { client, repo } = self {
            return client.fetch_blob_bytes(repo, desc, what, limit);
        }
        let mut reader = Hashing::new(self.open_blob(desc, what)?);
        let mut bytes = Vec::new();
        reader
            .read_to_end(&mut bytes)
            .map_err(OciError::io("read", format!("{what} {}", desc.digest)))?;
        let (digest, size, _) = reader.finish();
        verify(what, &desc.digest, desc.size, &digest, size)?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize_and_refuse_climbing() {
        assert_eq!(
            normalize("./blobs//sha256/ab").as_deref(),
            Some("blobs/sha256/ab")
        );
        assert_eq!(normalize("manifest.json").as_deref(), Some("manifest.json"));
        assert_eq!(normalize("a/../b").as_deref(), Some("b"));
        assert_eq!(normalize("a/../../b"), None);
    }

    #[test]
    fn indexed_tar_reads_entries_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "./x/layer.tar", &b"hello"[..])
            .unwrap();
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        b.append_link(&mut l, "y/layer.tar", "../x/layer.tar")
            .unwrap();
        b.finish().unwrap();
        drop(b);
        let index = TarIndex::open(&path).unwrap();
        for name in ["x/layer.tar", "y/layer.tar"] {
            let (mut r, size) = index.open_entry(name).unwrap();
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            assert_eq!((s.as_str(), size), ("hello", 5));
        }
        assert!(index.open_entry("nope").is_err());
    }

    #[test]
    fn compressed_archives_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar.gz");
        std::fs::write(&path, [0x1f, 0x8b, 8, 0, 0]).unwrap();
        let e = TarIndex::open(&path).err().unwrap().to_string();
        assert!(e.contains("decompress"), "{e}");
    }
}
