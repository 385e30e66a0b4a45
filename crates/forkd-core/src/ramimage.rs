//! RAM images and RAM diff layers.
//!
//! A snapshot's `ram.img` is a sparse file the size of guest RAM: page `i`
//! of the guest is at offset `i * 4096`, zero pages are holes. When the
//! branched sandbox ran from the image of snapshot P (a spawned child maps
//! P's image `MAP_PRIVATE`), the branch stores a *diff layer* instead: its
//! `ram.img` holds only the pages that differ from P's image, and `ram.map`
//! ([`LayerMap`]) says which pages those are (a listed page that reads back
//! as a hole is a page that became zero).
//!
//! Cost model. A child maps one flat file, so a chain is flattened once per
//! snapshot, on the first spawn from it, into the runtime directory:
//! copy the parent's flat image (its data pages only, sparse) and write the
//! layer's pages over it. Later spawns from the same snapshot pay nothing
//! per layer: they map the cached flat image. Verifying a chain reads each
//! layer's files once; afterwards the store's verification cache answers
//! from file metadata. So the first spawn pays O(data pages of the parent
//! image + pages of the layer), every other spawn O(1) per layer, and the
//! store pays only the pages that changed.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use forkd_migstream::{RamSink, PAGE_SIZE};

/// Name of a diff layer's page map inside a snapshot directory.
pub const LAYER_MAP: &str = "ram.map";

/// A set of page numbers, one bit per page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    pages: u64,
}

impl PageSet {
    pub fn new(pages: u64) -> PageSet {
        PageSet {
            words: vec![0; (pages as usize).div_ceil(64)],
            pages,
        }
    }

    /// How many pages the set can hold.
    pub fn capacity(&self) -> u64 {
        self.pages
    }

    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Sets or clears `page`; returns whether it was set before.
    pub fn set(&mut self, page: u64, on: bool) -> bool {
        let (w, mask) = ((page / 64) as usize, 1u64 << (page % 64));
        let was = self.words[w] & mask != 0;
        if on {
            self.words[w] |= mask;
        } else {
            self.words[w] &= !mask;
        }
        was
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// The pages in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }
}

/// The page map of a diff layer: which pages of the image differ from the
/// parent's. On disk: `FKRLAYR1`, be32 page size, be64 page count, then the
/// bitmap as little-endian u64 words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerMap {
    pub pages: PageSet,
}

const LAYER_MAGIC: &[u8; 8] = b"FKRLAYR1";

impl LayerMap {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.pages.words.len() * 8);
        out.extend_from_slice(LAYER_MAGIC);
        out.extend_from_slice(&(PAGE_SIZE as u32).to_be_bytes());
        out.extend_from_slice(&self.pages.pages.to_be_bytes());
        for w in &self.pages.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Parses a page map for an image of `image_len` bytes.
    pub fn decode(bytes: &[u8], image_len: u64) -> Result<LayerMap, String> {
        if bytes.len() < 20 || &bytes[..8] != LAYER_MAGIC {
            return Err("not a forkd RAM layer map (bad magic)".into());
        }
        let page_size = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if page_size as usize != PAGE_SIZE {
            return Err(format!("page size {page_size}, expected {PAGE_SIZE}"));
        }
        let pages = u64::from_be_bytes(bytes[12..20].try_into().expect("8 bytes"));
        if pages != image_len / PAGE_SIZE as u64 {
            return Err(format!(
                "the map covers {pages} pages but the image has {}",
                image_len / PAGE_SIZE as u64
            ));
        }
        let body = &bytes[20..];
        if body.len() != (pages as usize).div_ceil(64) * 8 {
            return Err(format!(
                "the bitmap is {} bytes, expected {}",
                body.len(),
                (pages as usize).div_ceil(64) * 8
            ));
        }
        let words: Vec<u64> = body
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if pages % 64 != 0 && words.last().is_some_and(|w| w >> (pages % 64) != 0) {
            return Err("the bitmap lists pages past the end of the image".into());
        }
        Ok(LayerMap {
            pages: PageSet { words, pages },
        })
    }
}

/// Writes the pages of one RAM block into a file at their offsets. Pages
/// never sent, and zero pages, stay holes (read back as zeros), so the image
/// costs only the memory the guest has written.
///
/// With a base image ([`RamImage::with_base`]) it writes a diff layer: pages
/// equal to the base's are left out, and [`RamImage::finish`] returns the
/// map of the pages that differ.
pub struct RamImage {
    file: File,
    block: String,
    len: u64,
    /// Pages holding data in `file` (so that a later zero page punches a hole).
    written: PageSet,
    /// Pages the stream has delivered.
    seen: PageSet,
    base: Option<File>,
    /// Pages that differ from the base.
    differ: PageSet,
    pub data_pages: u64,
}

impl RamImage {
    pub fn new(file: File, block: &str) -> RamImage {
        RamImage {
            file,
            block: block.to_string(),
            len: 0,
            written: PageSet::default(),
            seen: PageSet::default(),
            base: None,
            differ: PageSet::default(),
            data_pages: 0,
        }
    }

    /// An image that keeps only the pages differing from `base` (the flat
    /// image the source was started from).
    pub fn with_base(file: File, block: &str, base: File) -> RamImage {
        RamImage {
            base: Some(base),
            ..RamImage::new(file, block)
        }
    }

    /// The block's size, once the stream announced it.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ends the stream. Pages the stream never sent read as zero (as in a
    /// full image); for a diff layer they are listed where the base is not
    /// zero. Returns the layer map when there is a base.
    pub fn finish(&mut self) -> io::Result<Option<LayerMap>> {
        let Some(base) = &self.base else {
            return Ok(None);
        };
        let mut buf = vec![0u8; PAGE_SIZE];
        for page in 0..self.seen.capacity() {
            if !self.seen.contains(page) {
                base.read_exact_at(&mut buf, page * PAGE_SIZE as u64)?;
                if buf.iter().any(|&b| b != 0) {
                    self.differ.set(page, true);
                }
            }
        }
        Ok(Some(LayerMap {
            pages: self.differ.clone(),
        }))
    }

    fn check(&self, id: &str, offset: u64) -> io::Result<()> {
        if id != self.block || offset + PAGE_SIZE as u64 > self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("page {offset:#x} of block `{id}` is outside the RAM image"),
            ));
        }
        Ok(())
    }

    fn punch(&mut self, page: u64) -> io::Result<()> {
        if self.written.set(page, false) {
            punch_hole(&self.file, page * PAGE_SIZE as u64)?;
        }
        Ok(())
    }

    fn store(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let page = offset / PAGE_SIZE as u64;
        self.seen.set(page, true);
        if let Some(base) = &self.base {
            let mut old = [0u8; PAGE_SIZE];
            base.read_exact_at(&mut old, offset)?;
            let same = old[..] == *data;
            self.differ.set(page, !same);
            if same {
                return self.punch(page);
            }
        }
        if data.iter().all(|&b| b == 0) {
            return self.punch(page);
        }
        self.file.write_all_at(data, offset)?;
        self.written.set(page, true);
        self.data_pages += 1;
        Ok(())
    }
}

fn punch_hole(file: &File, offset: u64) -> io::Result<()> {
    // SAFETY: fallocate on an fd we own; punching a hole touches no memory.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            PAGE_SIZE as libc::off_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl RamSink for RamImage {
    fn block(&mut self, id: &str, len: u64) -> io::Result<()> {
        if id != self.block {
            return Ok(());
        }
        let pages = len / PAGE_SIZE as u64;
        if let Some(base) = &self.base {
            let base_len = base.metadata()?.len();
            if base_len != len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("block `{id}` is {len} bytes but the base image is {base_len}"),
                ));
            }
        }
        self.len = len;
        self.written = PageSet::new(pages);
        self.seen = PageSet::new(pages);
        self.differ = PageSet::new(pages);
        self.file.set_len(len)
    }

    fn page(&mut self, id: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(id, offset)?;
        self.store(offset, data)
    }

    fn fill(&mut self, id: &str, offset: u64, fill: u8) -> io::Result<()> {
        self.check(id, offset)?;
        self.store(offset, &[fill; PAGE_SIZE])
    }
}

/// Writes the flat image of a diff layer to `out` (a new file): a sparse
/// copy of the parent's flat image `base`, then every page listed in
/// `map_path` taken from the layer's image. Returns the layer pages applied.
pub fn flatten(base: &Path, layer: &Path, map_path: &Path, out: &Path) -> io::Result<u64> {
    let layer_file = File::open(layer)?;
    let len = layer_file.metadata()?.len();
    let base_len = std::fs::metadata(base)?.len();
    if base_len != len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the layer {} is {len} bytes but its parent image {} is {base_len}",
                layer.display(),
                base.display()
            ),
        ));
    }
    let map = LayerMap::decode(&std::fs::read(map_path)?, len).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", map_path.display()),
        )
    })?;
    crate::files::copy_sparse(base, out)?;
    let flat = File::options().write(true).open(out)?;
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut applied = 0;
    for page in map.pages.iter() {
        let offset = page * PAGE_SIZE as u64;
        layer_file.read_exact_at(&mut buf, offset)?;
        if buf.iter().all(|&b| b == 0) {
            punch_hole(&flat, offset)?;
        } else {
            flat.write_all_at(&buf, offset)?;
        }
        applied += 1;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("forkd-ramimage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn rw(path: &Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn pages_land_at_their_offsets_and_zero_pages_stay_holes() {
        let dir = scratch("full");
        let path = dir.join("ram.img");
        let mut img = RamImage::new(rw(&path), "mem0");
        img.block("pc.bios", 4096).unwrap();
        img.block("mem0", 64 * 4096).unwrap();
        img.page("mem0", 4096, &[7u8; PAGE_SIZE]).unwrap();
        img.page("mem0", 8192, &[9u8; PAGE_SIZE]).unwrap();
        img.fill("mem0", 8192, 0).unwrap(); // overwritten by zeros later
        img.page("mem0", 12288, &[0u8; PAGE_SIZE]).unwrap();
        assert!(img.page("mem0", 64 * 4096, &[1u8; PAGE_SIZE]).is_err());
        assert!(img.page("pc.bios", 0, &[1u8; PAGE_SIZE]).is_err());
        assert_eq!(img.finish().unwrap(), None);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 64 * 4096);
        assert!(bytes[4096..8192].iter().all(|&b| b == 7));
        assert!(bytes[8192..].iter().all(|&b| b == 0));
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&path).unwrap().blocks() * 512 <= 2 * 4096,
            "not sparse"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A parent image, a stream that changes some pages, zeroes one, leaves
    /// one unsent and repeats others: the layer holds exactly the changes and
    /// flattening it gives back what a full image of the stream would be.
    #[test]
    fn a_diff_layer_keeps_only_changed_pages_and_flattens_to_the_full_image() {
        let dir = scratch("diff");
        let pages = 130u64; // not a multiple of 64
        let base_path = dir.join("base.img");
        let mut base = vec![0u8; pages as usize * PAGE_SIZE];
        for p in 0..pages as usize {
            if p % 3 != 0 {
                base[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(p as u8 | 1);
            }
        }
        std::fs::write(&base_path, &base).unwrap();
        // What the child's RAM is when branched.
        let mut now = base.clone();
        let changed = [5u64, 64, 129];
        for &p in &changed {
            now[p as usize * PAGE_SIZE..][..PAGE_SIZE].fill(0xEE);
        }
        now[7 * PAGE_SIZE..8 * PAGE_SIZE].fill(0); // became zero
        now[10 * PAGE_SIZE..11 * PAGE_SIZE].fill(0); // unsent below: reads as zero

        let layer = dir.join("ram.img");
        let mut img = RamImage::with_base(rw(&layer), "mem0", File::open(&base_path).unwrap());
        img.block("mem0", pages * PAGE_SIZE as u64).unwrap();
        for p in 0..pages {
            if p == 10 {
                continue;
            }
            let page = &now[p as usize * PAGE_SIZE..][..PAGE_SIZE];
            if page.iter().all(|&b| b == 0) {
                img.fill("mem0", p * PAGE_SIZE as u64, 0).unwrap();
            } else {
                img.page("mem0", p * PAGE_SIZE as u64, page).unwrap();
            }
        }
        let map = img.finish().unwrap().unwrap();
        let listed: Vec<u64> = map.pages.iter().collect();
        assert_eq!(listed, vec![5, 7, 10, 64, 129]);
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&layer).unwrap().blocks() * 512 <= 3 * 4096,
            "the layer stores more than the changed pages"
        );

        let map_path = dir.join(LAYER_MAP);
        std::fs::write(&map_path, map.encode()).unwrap();
        let flat = dir.join("flat.img");
        assert_eq!(flatten(&base_path, &layer, &map_path, &flat).unwrap(), 5);
        assert!(
            std::fs::read(&flat).unwrap() == now,
            "flattened image differs"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_layer_of_the_wrong_size_is_refused() {
        let dir = scratch("size");
        let base = dir.join("base.img");
        std::fs::write(&base, vec![1u8; 4 * PAGE_SIZE]).unwrap();
        let mut img = RamImage::with_base(rw(&dir.join("l")), "mem0", File::open(&base).unwrap());
        let e = img.block("mem0", 8 * PAGE_SIZE as u64).unwrap_err();
        assert!(e.to_string().contains("base image"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn layer_maps_round_trip_and_corrupt_ones_are_refused() {
        let mut pages = PageSet::new(100);
        for p in [0, 63, 64, 99] {
            pages.set(p, true);
        }
        let map = LayerMap { pages };
        let bytes = map.encode();
        let len = 100 * PAGE_SIZE as u64;
        assert_eq!(LayerMap::decode(&bytes, len).unwrap(), map);
        assert_eq!(map.pages.count(), 4);
        assert!(LayerMap::decode(&bytes, len * 2)
            .unwrap_err()
            .contains("covers"));
        assert!(LayerMap::decode(&bytes[..bytes.len() - 1], len)
            .unwrap_err()
            .contains("bitmap"));
        assert!(LayerMap::decode(b"garbage", len)
            .unwrap_err()
            .contains("magic"));
        let mut past = bytes.clone();
        let last = past.len() - 1;
        past[last] = 0x80; // page 127 of a 100-page image
        assert!(LayerMap::decode(&past, len)
            .unwrap_err()
            .contains("past the end"));
    }
}
