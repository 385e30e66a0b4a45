//! How a big file becomes chunks, and the per-file index that lists them.
//!
//! A file is cut by a [`Chunking`]: fixed-size pieces at multiples of the
//! size, or content-defined pieces (FastCDC 2020). A piece that lies in a hole
//! or is all zeros is recorded as a zero run and never stored; every other
//! piece is compressed with zstd into a blob named by the digest of the
//! compressed bytes, and also carries the digest of its raw bytes, which is
//! what dedup against local files and verification after decompression use.
//! The [`FileIndex`] (a JSON blob of media type
//! [`crate::FORKD_FILE_INDEX`]) lists the chunks in order and covers the file
//! exactly; [`FileIndex::validate`] checks one that came from the network.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{OciError, Result};
use crate::sparse::{is_zero, SparseReader};

/// zstd level of chunk blobs. Fixed: the same raw chunk must compress to the
/// same blob on every host for registry-side dedup.
pub const ZSTD_LEVEL: i32 = 3;
/// Largest chunk accepted (raw bytes): bounds memory per chunk.
pub const MAX_CHUNK_BYTES: u64 = 16 * 1024 * 1024;
/// Largest file index accepted.
pub const MAX_INDEX_BYTES: u64 = 64 * 1024 * 1024;
pub const INDEX_VERSION: u32 = 1;

/// How files are cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Chunking {
    /// Pieces of `size` bytes at offsets that are multiples of `size`.
    Fixed { size: u32 },
    /// FastCDC (2020) with these minimum, average and maximum sizes.
    Cdc { min: u32, avg: u32, max: u32 },
}

impl Chunking {
    /// The default, chosen by measurement (bench/results/registry-chunking.md):
    /// guest RAM changes in place, so fixed chunks aligned to pages dedup at
    /// least as well as content-defined ones and cost less CPU.
    pub const DEFAULT: Chunking = Chunking::Fixed { size: 256 * 1024 };

    /// Checks the sizes are usable (and within what FastCDC accepts).
    pub fn validate(&self) -> std::result::Result<(), String> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        match *self {
            Chunking::Fixed { size } => {
                if size < 4096 || size as u64 > MAX_CHUNK_BYTES || size % 4096 != 0 {
                    return Err(format!(
                        "fixed chunk size {size} must be a multiple of 4096 between 4096 and {MAX_CHUNK_BYTES}"
                    ));
                }
            }
            Chunking::Cdc { min, avg, max } => {
                let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
                    && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
                    && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
                    && min <= avg
                    && avg <= max
                    && max as u64 <= MAX_CHUNK_BYTES;
                if !ok {
                    return Err(format!(
                        "content-defined chunk sizes {min}/{avg}/{max} must satisfy min <= avg <= max, \
                         min in {MINIMUM_MIN}..={MINIMUM_MAX}, avg in {AVERAGE_MIN}..={AVERAGE_MAX}, \
                         max in {MAXIMUM_MIN}..={MAXIMUM_MAX}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The largest chunk this chunking produces.
    pub fn max_chunk(&self) -> u64 {
        match *self {
            Chunking::Fixed { size } => size as u64,
            Chunking::Cdc { max, .. } => max as u64,
        }
    }
}

/// One entry of a [`FileIndex`]: a run of zeros, or a stored chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    pub offset: u64,
    pub length: u64,
    /// Digest of the raw (uncompressed) bytes; `None` for a zero run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Digest>,
    /// Digest of the zstd blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_size: Option<u64>,
}

impl ChunkEntry {
    pub fn is_zero(&self) -> bool {
        self.raw.is_none()
    }

    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.length
    }
}

/// The chunks of one file, in order, covering it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIndex {
    pub version: u32,
    /// Logical length of the file.
    pub size: u64,
    /// Permission bits to restore.
    pub mode: u32,
    pub chunking: Chunking,
    pub chunks: Vec<ChunkEntry>,
}

impl FileIndex {
    pub fn new(size: u64, mode: u32, chunking: Chunking) -> FileIndex {
        FileIndex {
            version: INDEX_VERSION,
            size,
            mode,
            chunking,
            chunks: Vec::new(),
        }
    }

    /// Appends a zero run, merged with a zero run just before it.
    pub fn push_zero(&mut self, offset: u64, length: u64) {
        if let Some(last) = self.chunks.last_mut() {
            if last.is_zero() && last.offset + last.length == offset {
                last.length += length;
                return;
            }
        }
        self.chunks.push(ChunkEntry {
            offset,
            length,
            raw: None,
            blob: None,
            blob_size: None,
        });
    }

    pub fn push_data(
        &mut self,
        offset: u64,
        length: u64,
        raw: Digest,
        blob: Digest,
        blob_size: u64,
    ) {
        self.chunks.push(ChunkEntry {
            offset,
            length,
            raw: Some(raw),
            blob: Some(blob),
            blob_size: Some(blob_size),
        });
    }

    /// Stored chunks (not zero runs).
    pub fn data_chunks(&self) -> impl Iterator<Item = &ChunkEntry> {
        self.chunks.iter().filter(|c| !c.is_zero())
    }

    /// Checks an index that came from elsewhere: entries in order, contiguous,
    /// covering exactly `size`, each stored chunk with both digests and a
    /// plausible blob size, nothing larger than forkd accepts.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.version != INDEX_VERSION {
            return Err(format!(
                "index version {} (this forkd reads {INDEX_VERSION})",
                self.version
            ));
        }
        self.chunking.validate()?;
        let mut pos = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            if c.offset != pos {
                return Err(format!("chunk {i} starts at {} instead of {pos}", c.offset));
            }
            if c.length == 0 {
                return Err(format!("chunk {i} is empty"));
            }
            if !c.is_zero() {
                if c.length > MAX_CHUNK_BYTES {
                    return Err(format!(
                        "chunk {i} has {} bytes, more than {MAX_CHUNK_BYTES}",
                        c.length
                    ));
                }
                match (&c.blob, c.blob_size) {
                    (Some(_), Some(size)) if size <= max_blob_size(c.length) => {}
                    (Some(_), Some(size)) => {
                        return Err(format!(
                            "chunk {i} claims a {size}-byte blob for {} raw bytes",
                            c.length
                        ))
                    }
                    _ => return Err(format!("chunk {i} has a raw digest but no blob")),
                }
            } else if c.blob.is_some() || c.blob_size.is_some() {
                return Err(format!("zero run {i} names a blob"));
            }
            pos = pos
                .checked_add(c.length)
                .ok_or_else(|| format!("chunk {i} ends past 2^64"))?;
        }
        if pos != self.size {
            return Err(format!(
                "chunks cover {pos} bytes of a {}-byte file",
                self.size
            ));
        }
        Ok(())
    }
}

/// The largest zstd blob a chunk of `raw` bytes can honestly compress to.
pub fn max_blob_size(raw: u64) -> u64 {
    raw + raw / 128 + 1024
}

/// One piece of a file as the chunker sees it.
pub enum Piece<'a> {
    /// All zeros (a hole or zero bytes): recorded, never stored.
    Zero {
        offset: u64,
        length: u64,
    },
    Data {
        offset: u64,
        bytes: &'a [u8],
    },
}

/// Cuts the file at `path` with `chunking`, calling `each` for every piece in
/// order. Fixed-size chunks that lie in holes are not read at all.
pub fn scan_file(
    path: &Path,
    chunking: Chunking,
    each: &mut dyn FnMut(Piece<'_>) -> Result<()>,
) -> Result<u64> {
    chunking
        .validate()
        .map_err(|reason| OciError::bad("chunking", reason))?;
    let file = File::open(path).map_err(OciError::io("open", path))?;
    let reader = SparseReader::new(&file).map_err(OciError::io("find the data in", path))?;
    let size = reader.size();
    match chunking {
        Chunking::Fixed { size: chunk } => {
            let mut buf = vec![0u8; chunk as usize];
            let mut offset = 0u64;
            while offset < size {
                let length = (chunk as u64).min(size - offset);
                let range = offset..offset + length;
                if reader.is_hole(&range) {
                    each(Piece::Zero { offset, length })?;
                } else {
                    let buf = &mut buf[..length as usize];
                    reader
                        .read_at(offset, buf)
                        .map_err(OciError::io("read", path))?;
                    if is_zero(buf) {
                        each(Piece::Zero { offset, length })?;
                    } else {
                        each(Piece::Data { offset, bytes: buf })?;
                    }
                }
                offset += length;
            }
        }
        Chunking::Cdc { min, avg, max } => {
            for chunk in fastcdc::v2020::StreamCDC::new(reader, min, avg, max) {
                let chunk = chunk
                    .map_err(|e| OciError::io("read", path)(io::Error::other(e.to_string())))?;
                if is_zero(&chunk.data) {
                    each(Piece::Zero {
                        offset: chunk.offset,
                        length: chunk.length as u64,
                    })?;
                } else {
                    each(Piece::Data {
                        offset: chunk.offset,
                        bytes: &chunk.data,
                    })?;
                }
            }
        }
    }
    Ok(size)
}

/// Compresses a chunk into its blob.
pub fn compress(raw: &[u8]) -> Vec<u8> {
    // Compressing from a slice into a Vec cannot fail for a valid level.
    zstd::bulk::compress(raw, ZSTD_LEVEL).unwrap_or_else(|_| Vec::new())
}

/// Decompresses a chunk blob that must hold exactly `length` raw bytes.
pub fn decompress(blob: &[u8], length: u64) -> std::result::Result<Vec<u8>, String> {
    if length > MAX_CHUNK_BYTES {
        return Err(format!("{length} bytes is more than a chunk may hold"));
    }
    let raw = zstd::bulk::decompress(blob, length as usize)
        .map_err(|e| format!("not a zstd frame of at most {length} bytes: {e}"))?;
    if raw.len() as u64 != length {
        return Err(format!(
            "decompresses to {} bytes instead of {length}",
            raw.len()
        ));
    }
    Ok(raw)
}

/// The full index of a local file (compressing every chunk to learn its blob
/// digest), e.g. to offer it as a local source when no index was kept.
pub fn index_file(path: &Path, chunking: Chunking) -> Result<FileIndex> {
    let mode = file_mode(path)?;
    let mut index = FileIndex::new(0, mode, chunking);
    let size = scan_file(path, chunking, &mut |piece| {
        match piece {
            Piece::Zero { offset, length } => index.push_zero(offset, length),
            Piece::Data { offset, bytes } => {
                let blob = compress(bytes);
                index.push_data(
                    offset,
                    bytes.len() as u64,
                    Digest::of(bytes),
                    Digest::of(&blob),
                    blob.len() as u64,
                );
            }
        }
        Ok(())
    })?;
    index.size = size;
    Ok(index)
}

pub(crate) fn file_mode(path: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)
        .map_err(OciError::io("stat", path))?
        .permissions()
        .mode()
        & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn write_file(
        dir: &Path,
        name: &str,
        size: u64,
        data: &[(u64, Vec<u8>)],
    ) -> std::path::PathBuf {
        let path = dir.join(name);
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        for (off, bytes) in data {
            f.write_all_at(bytes, *off).unwrap();
        }
        path
    }

    #[test]
    fn fixed_chunks_cover_file_and_skip_holes() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = 64 * 1024;
        let path = write_file(
            dir.path(),
            "f",
            10 * chunk + 100,
            &[
                (chunk + 5, pseudo_random(1000, 1)),
                (10 * chunk, pseudo_random(100, 2)),
                (5 * chunk, vec![0; 4096]),
            ],
        );
        let index = index_file(&path, Chunking::Fixed { size: chunk as u32 }).unwrap();
        index.validate().unwrap();
        let kinds: Vec<(u64, u64, bool)> = index
            .chunks
            .iter()
            .map(|c| (c.offset, c.length, c.is_zero()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, chunk, true),
                (chunk, chunk, false),
                (2 * chunk, 8 * chunk, true),
                (10 * chunk, 100, false)
            ]
        );
    }

    #[test]
    fn cdc_chunks_cover_file_and_resync_after_an_insert() {
        let dir = tempfile::tempdir().unwrap();
        let base = pseudo_random(2 << 20, 3);
        let mut shifted = base.clone();
        shifted.splice(1000..1000, pseudo_random(77, 4));
        let a = write_file(dir.path(), "a", base.len() as u64, &[(0, base)]);
        let b = write_file(dir.path(), "b", shifted.len() as u64, &[(0, shifted)]);
        let cdc = Chunking::Cdc {
            min: 16 * 1024,
            avg: 64 * 1024,
            max: 256 * 1024,
        };
        let ia = index_file(&a, cdc).unwrap();
        let ib = index_file(&b, cdc).unwrap();
        ia.validate().unwrap();
        ib.validate().unwrap();
        let raw_a: std::collections::HashSet<_> = ia.data_chunks().map(|c| c.raw.clone()).collect();
        let shared = ib.data_chunks().filter(|c| raw_a.contains(&c.raw)).count();
        // Only the chunk(s) around the insert differ.
        assert!(
            shared + 2 >= ib.data_chunks().count(),
            "{shared} of {}",
            ib.data_chunks().count()
        );
    }

    #[test]
    fn validate_refuses_hostile_indexes() {
        let d = Digest::of(b"x");
        let mut good = FileIndex::new(8192, 0o644, Chunking::Fixed { size: 4096 });
        good.push_zero(0, 4096);
        good.push_data(4096, 4096, d.clone(), d.clone(), 10);
        good.validate().unwrap();
        let mut gap = good.clone();
        gap.chunks[1].offset = 4097;
        assert!(gap.validate().unwrap_err().contains("starts at"));
        let mut short = good.clone();
        short.size = 9000;
        assert!(short.validate().unwrap_err().contains("cover"));
        let mut huge_blob = good.clone();
        huge_blob.chunks[1].blob_size = Some(1 << 30);
        assert!(huge_blob.validate().is_err());
        let mut huge_chunk = good.clone();
        huge_chunk.chunks[1].length = 1 << 40;
        huge_chunk.size = 4096 + (1 << 40);
        assert!(huge_chunk.validate().is_err());
        let mut bad_chunking = good.clone();
        bad_chunking.chunking = Chunking::Cdc {
            min: 1,
            avg: 2,
            max: 3,
        };
        assert!(bad_chunking.validate().is_err());
    }

    #[test]
    fn compression_round_trip_is_bounded() {
        let raw = pseudo_random(100_000, 5);
        let blob = compress(&raw);
        assert_eq!(decompress(&blob, raw.len() as u64).unwrap(), raw);
        assert!(decompress(&blob, raw.len() as u64 - 1).is_err());
        assert!(decompress(&blob, raw.len() as u64 + 1).is_err());
        assert!(decompress(b"not zstd", 10).is_err());
        // Deterministic: the same chunk is the same blob everywhere.
        assert_eq!(compress(&raw), blob);
    }
}
