//! BLAKE3 of whole files, fast on sparse RAM images. The digest is plain
//! BLAKE3 of the full logical contents; what makes it fast is BLAKE3's tree:
//! the file is hashed as aligned 2 MiB subtrees, and a subtree that is all
//! zeros (a hole, found with `SEEK_DATA`/`SEEK_HOLE` without reading it, or
//! read and found zero) takes its chaining value from a table instead of
//! being hashed. A zero block's chaining value depends only on its offset,
//! so the table is the same for every file; [`ZeroCvs`] computes entries as
//! files first reach an offset and can keep them in a file so that later
//! processes start with them. A guest RAM image that holds 300 MiB of data
//! in 8 GiB is then hashed at the cost of its 300 MiB.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::error::{io_err, Result};

/// The subtree size whose zero chaining values are tabled: 2 MiB (2048
/// chunks), a power of two, so every split of a larger input is aligned to
/// it.
pub const BLOCK: u64 = 2 << 20;

/// Zeros standing in for holes; lives in `.bss`, costs no I/O.
static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];

/// The table file's first line.
const TABLE_MAGIC: &[u8] = b"forkd blake3 zero-block chaining values, 2 MiB blocks, v1\n";

/// Chaining values of all-zero [`BLOCK`]s at each block offset of a file:
/// entry `i` is that of the block at byte `i * BLOCK`. Entries are computed
/// when first needed (0.45 ms each here, the cost of hashing 2 MiB) and, when
/// the table has a file, saved there for the next process.
pub struct ZeroCvs {
    file: Option<PathBuf>,
    state: Mutex<TableState>,
}

#[derive(Default)]
struct TableState {
    /// Shared with hashes in progress, so that the lock is held only while
    /// the table grows, not while files are hashed.
    cvs: Arc<Vec<ChainingValue>>,
    loaded: bool,
    saved: usize,
}

impl ZeroCvs {
    /// A table kept in this process only.
    pub fn in_memory() -> ZeroCvs {
        ZeroCvs {
            file: None,
            state: Mutex::new(TableState {
                loaded: true,
                ..TableState::default()
            }),
        }
    }

    /// A table read from `file` when first used (if it is there and whole)
    /// and written back when it grew. A missing, torn or corrupt file is
    /// recomputed: it carries a BLAKE3 of its entries, and its first and
    /// last entries are recomputed on load. That guards against damage, not
    /// against whoever can write the home: a forged table with a valid
    /// checksum would make digests wrong, as forged manifests would.
    pub fn at(file: impl Into<PathBuf>) -> ZeroCvs {
        ZeroCvs {
            file: Some(file.into()),
            state: Mutex::new(TableState::default()),
        }
    }

    /// The table, with at least `blocks` entries.
    fn upto(&self, blocks: usize) -> Arc<Vec<ChainingValue>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.loaded {
            state.loaded = true;
            if let Some(cvs) = self.file.as_deref().and_then(read_table) {
                state.saved = cvs.len();
                state.cvs = Arc::new(cvs);
            }
        }
        if state.cvs.len() < blocks {
            let mut cvs = Vec::with_capacity(blocks);
            cvs.extend_from_slice(&state.cvs);
            cvs.extend((state.cvs.len()..blocks).map(|i| zero_block_cv(i as u64)));
            state.cvs = Arc::new(cvs);
        }
        if let Some(file) = &self.file {
            if state.cvs.len() > state.saved {
                // Best effort: without the file, the next process computes;
                // a write that failed is not tried again by this process
                // until the table grows.
                let _ = write_table(file, &state.cvs);
                state.saved = state.cvs.len();
            }
        }
        Arc::clone(&state.cvs)
    }
}

impl std::fmt::Debug for ZeroCvs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroCvs").field("file", &self.file).finish()
    }
}

fn zero_block_cv(index: u64) -> ChainingValue {
    blake3::Hasher::new()
        .set_input_offset(index * BLOCK)
        .update(&ZEROS)
        .finalize_non_root()
}

fn read_table(path: &Path) -> Option<Vec<ChainingValue>> {
    let bytes = fs::read(path).ok()?;
    let body = bytes.strip_prefix(TABLE_MAGIC)?;
    let (entries, sum) = body.split_at_checked(body.len().checked_sub(32)?)?;
    if entries.len() % 32 != 0 || blake3::hash(entries).as_bytes() != sum {
        return None;
    }
    let cvs: Vec<ChainingValue> = entries
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32-byte chunks"))
        .collect();
    let last = cvs.len().checked_sub(1)?;
    (cvs[0] == zero_block_cv(0) && cvs[last] == zero_block_cv(last as u64)).then_some(cvs)
}

fn write_table(path: &Path, cvs: &[ChainingValue]) -> io::Result<()> {
    let mut bytes = TABLE_MAGIC.to_vec();
    let start = bytes.len();
    for cv in cvs {
        bytes.extend_from_slice(cv);
    }
    let sum = blake3::hash(&bytes[start..]);
    bytes.extend_from_slice(sum.as_bytes());
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, &bytes)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// The table `hash_file` uses: this process's own.
fn process_table() -> &'static ZeroCvs {
    static TABLE: std::sync::OnceLock<ZeroCvs> = std::sync::OnceLock::new();
    TABLE.get_or_init(ZeroCvs::in_memory)
}

/// Hex BLAKE3 of the full contents of the file at `path`.
pub fn hash_file(path: &Path) -> Result<String> {
    hash_file_with(path, process_table())
}

pub(crate) fn hash_file_with(path: &Path, zeros: &ZeroCvs) -> Result<String> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let size = file.metadata().map_err(io_err("stat", path))?.len();
    let hash = hash_open_file(&file, size, zeros).map_err(io_err("hash", path))?;
    Ok(hash.to_hex().to_string())
}

/// BLAKE3 of the first `size` bytes of `file`, which must be at least that
/// long; zero blocks' chaining values come from `zeros`.
pub(crate) fn hash_open_file(file: &File, size: u64, zeros: &ZeroCvs) -> io::Result<blake3::Hash> {
    let data = data_regions(file, size)?;
    let mut buf = vec![0u8; BLOCK.min(size) as usize];
    if size <= BLOCK {
        // One block holds the root: hash it the plain way.
        let mut tree = Tree {
            file,
            data: &data,
            buf: &mut buf,
            zeros: &[],
        };
        return Ok(blake3::hash(tree.read_block(0, size)?));
    }
    let table = zeros.upto(size.div_ceil(BLOCK) as usize);
    let mut tree = Tree {
        file,
        data: &data,
        buf: &mut buf,
        zeros: &table,
    };
    let split = left_subtree_len(size);
    let left = tree.subtree(0, split)?;
    let right = tree.subtree(split, size - split)?;
    Ok(merge_subtrees_root(&left, &right, Mode::Hash))
}

/// A file being hashed as a BLAKE3 tree of [`BLOCK`]-sized leaves.
struct Tree<'a> {
    file: &'a File,
    /// Where the file has data (everything else is a hole), in order.
    data: &'a [(u64, u64)],
    buf: &'a mut [u8],
    zeros: &'a [ChainingValue],
}

impl Tree<'_> {
    /// The chaining value of the subtree `[offset, offset + len)`, which
    /// BLAKE3's tree makes either one block (aligned, at most [`BLOCK`]) or
    /// two subtrees split at `left_subtree_len`.
    fn subtree(&mut self, offset: u64, len: u64) -> io::Result<ChainingValue> {
        if len > BLOCK {
            let split = left_subtree_len(len);
            let left = self.subtree(offset, split)?;
            let right = self.subtree(offset + split, len - split)?;
            return Ok(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
        let index = (offset / BLOCK) as usize;
        let full = len == BLOCK;
        if full && !self.has_data(offset, offset + len) {
            return Ok(self.zeros[index]);
        }
        let block = self.read_block(offset, len)?;
        if full && block.iter().all(|&b| b == 0) {
            return Ok(self.zeros[index]);
        }
        Ok(blake3::Hasher::new()
            .set_input_offset(offset)
            .update(block)
            .finalize_non_root())
    }

    /// Whether any data region overlaps `[start, end)`.
    fn has_data(&self, start: u64, end: u64) -> bool {
        let first = self.data.partition_point(|&(_, e)| e <= start);
        self.data.get(first).is_some_and(|&(s, _)| s < end)
    }

    /// `[offset, offset + len)` of the file, holes as zeros, in `self.buf`.
    fn read_block(&mut self, offset: u64, len: u64) -> io::Result<&[u8]> {
        let end = offset + len;
        let buf = &mut self.buf[..len as usize];
        buf.fill(0);
        let first = self.data.partition_point(|&(_, e)| e <= offset);
        for &(s, e) in &self.data[first..] {
            if s >= end {
                break;
            }
            let (s, e) = (s.max(offset), e.min(end));
            read_exact_at(
                self.file,
                &mut buf[(s - offset) as usize..(e - offset) as usize],
                s,
            )?;
        }
        Ok(buf)
    }
}

/// The data regions `[start, end)` of the first `size` bytes, in order.
fn data_regions(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut regions = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some((start, end)) = next_data(file, pos, size)? else {
            break;
        };
        regions.push((start, end));
        pos = end;
    }
    Ok(regions)
}

/// The next data region `[start, end)` at or after `pos`, clamped to `size`;
/// `None` when only a hole remains.
fn next_data(file: &File, pos: u64, size: u64) -> io::Result<Option<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let Ok(offset) = libc::off_t::try_from(pos) else {
        return Ok(Some((pos, size)));
    };
    // SAFETY: lseek only moves the offset of an fd that `file` keeps open for
    // the duration of the call; no memory is passed. We read with pread, so
    // the moved offset does not matter.
    let start = unsafe { libc::lseek(fd, offset, libc::SEEK_DATA) };
    if start < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            // No data after `pos`: the rest is one hole.
            Some(libc::ENXIO) => Ok(None),
            // The filesystem cannot report holes: treat everything as data.
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((pos, size))),
            _ => Err(err),
        };
    }
    let start = (start as u64).clamp(pos, size);
    if start == size {
        return Ok(None);
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
    if end < 0 {
        return Ok(Some((start, size)));
    }
    // Guarantee progress even if the filesystem answers oddly.
    let end = (end as u64).clamp(start + 1, size);
    Ok(Some((start, end)))
}

fn read_exact_at(file: &File, mut buf: &mut [u8], mut pos: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, pos) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while it was being hashed",
                ))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                pos += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_sparse(path: &Path, size: u64, blocks: &[(u64, &[u8])]) -> Vec<u8> {
        let file = File::create(path).unwrap();
        file.set_len(size).unwrap();
        let mut full = vec![0u8; size as usize];
        for (offset, data) in blocks {
            file.write_all_at(data, *offset).unwrap();
            full[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        full
    }

    #[test]
    fn sparse_file_hash_equals_hash_of_full_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram.img");
        let block = vec![0xA5u8; 4096];
        let odd: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let size = 64 << 20;
        let full = write_sparse(
            &path,
            size,
            &[
                (0, &block),
                (1 << 20, &odd),
                (33 * (1 << 20) + 17, &block),
                (size - 4096, &block),
            ],
        );
        // The file really is sparse here (on filesystems that support holes),
        // so the hole-skipping path is what we test.
        let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
        assert!(allocated * 512 < size, "test file is not sparse");
        assert_eq!(
            hash_file(&path).unwrap(),
            blake3::hash(&full).to_hex().to_string()
        );
    }

    #[test]
    fn hash_of_file_ending_in_a_hole_and_of_empty_and_dense_files() {
        let dir = tempfile::tempdir().unwrap();
        let tail_hole = dir.path().join("tail");
        let full = write_sparse(&tail_hole, 5 << 20, &[(12345, b"hello")]);
        assert_eq!(
            hash_file(&tail_hole).unwrap(),
            blake3::hash(&full).to_hex().to_string()
        );

        let empty = dir.path().join("empty");
        File::create(&empty).unwrap();
        assert_eq!(
            hash_file(&empty).unwrap(),
            blake3::hash(b"").to_hex().to_string()
        );

        let dense = dir.path().join("dense");
        let data: Vec<u8> = (0..(3 * BLOCK as usize + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        File::create(&dense).unwrap().write_all(&data).unwrap();
        assert_eq!(
            hash_file(&dense).unwrap(),
            blake3::hash(&data).to_hex().to_string()
        );
    }

    #[test]
    fn hash_of_missing_file_names_it() {
        let err = hash_file(Path::new("/nonexistent/forkd/ram.img")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/forkd/ram.img"),
            "{err}"
        );
    }

    /// Files of every shape around the block size (holes, written zeros,
    /// data at edges) hash as `blake3::hash` of their full contents.
    #[test]
    fn the_tree_hash_is_plain_blake3_for_every_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let b = BLOCK;
        let ones = vec![1u8; 5000];
        let zeros = vec![0u8; b as usize];
        type Layout<'a> = Vec<(u64, &'a [u8])>;
        let cases: Vec<(u64, Layout)> = vec![
            (b - 1, vec![(7, b"x")]),
            (b, vec![]),
            (b + 1, vec![(b, b"y")]),
            (b + 1, vec![]),
            (2 * b, vec![(b - 2, &ones)]),
            (3 * b + 5, vec![(0, &ones), (3 * b, b"tail")]),
            // A whole block of written zeros (data, not a hole).
            (4 * b, vec![(b, &zeros), (3 * b + 4096, &ones)]),
            (5 * b, vec![]),
            (9 * b + 1024, vec![(8 * b + 1, &ones)]),
        ];
        let table = ZeroCvs::in_memory();
        for (size, blocks) in cases {
            let _ = std::fs::remove_file(&path);
            let full = write_sparse(&path, size, &blocks);
            let file = File::open(&path).unwrap();
            let got = hash_open_file(&file, size, &table).unwrap();
            assert_eq!(
                got,
                blake3::hash(&full),
                "size {size}, data {:?}",
                blocks.iter().map(|b| (b.0, b.1.len())).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn the_zero_table_is_kept_in_its_file_and_a_bad_file_is_recomputed() {
        let dir = tempfile::tempdir().unwrap();
        let table_path = dir.path().join(".zero-cvs");
        let path = dir.path().join("ram");
        let size = 6 * BLOCK;
        let full = write_sparse(&path, size, &[(BLOCK + 3, b"data")]);
        let want = blake3::hash(&full);
        let hash =
            |table: &ZeroCvs| hash_open_file(&File::open(&path).unwrap(), size, table).unwrap();

        assert_eq!(hash(&ZeroCvs::at(&table_path)), want);
        let saved = read_table(&table_path).expect("the table was saved");
        assert_eq!(saved.len(), 6);
        assert_eq!(saved[5], zero_block_cv(5));
        // A later process starts from the file: one whose middle entry is
        // wrong (its checksum made to match: damage cannot do that) is
        // believed, and the digest follows it.
        let mut forged_middle = saved.clone();
        forged_middle[3] = zero_block_cv(4);
        let entries: Vec<u8> = forged_middle.iter().flatten().copied().collect();
        let mut bytes = TABLE_MAGIC.to_vec();
        bytes.extend_from_slice(&entries);
        bytes.extend_from_slice(blake3::hash(&entries).as_bytes());
        std::fs::write(&table_path, bytes).unwrap();
        assert_ne!(
            hash(&ZeroCvs::at(&table_path)),
            want,
            "the file was not read"
        );
        std::fs::remove_file(&table_path).unwrap();
        assert_eq!(hash(&ZeroCvs::at(&table_path)), want);

        // Torn, flipped or foreign files are not trusted.
        let good = std::fs::read(&table_path).unwrap();
        let mut flipped = good.clone();
        flipped[TABLE_MAGIC.len() + 40] ^= 1;
        for bad in [&good[..good.len() - 5], &flipped[..], b"junk"] {
            std::fs::write(&table_path, bad).unwrap();
            assert!(read_table(&table_path).is_none());
            assert_eq!(hash(&ZeroCvs::at(&table_path)), want);
            assert_eq!(read_table(&table_path).unwrap(), saved, "rewritten whole");
        }
        // Entries that do not match their offsets, under a valid checksum.
        let mut forged = TABLE_MAGIC.to_vec();
        let entries: Vec<u8> = saved.iter().rev().flatten().copied().collect();
        forged.extend_from_slice(&entries);
        forged.extend_from_slice(blake3::hash(&entries).as_bytes());
        std::fs::write(&table_path, forged).unwrap();
        assert!(read_table(&table_path).is_none());
        assert_eq!(hash(&ZeroCvs::at(&table_path)), want);
    }
}
