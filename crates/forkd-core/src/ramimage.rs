//! A sparse RAM image written page by page from a migration stream.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use forkd_migstream::{RamSink, PAGE_SIZE};

/// Writes the pages of one RAM block into a file at their offsets. Pages
/// never sent, and zero pages, stay holes (read back as zeros), so the image
/// costs only the memory the guest has written.
pub struct RamImage {
    file: File,
    block: String,
    len: u64,
    /// Pages written with data (so that a later zero page punches a hole).
    written: Vec<u64>,
    pub data_pages: u64,
}

impl RamImage {
    pub fn new(file: File, block: &str) -> RamImage {
        RamImage {
            file,
            block: block.to_string(),
            len: 0,
            written: Vec::new(),
            data_pages: 0,
        }
    }

    /// The block's size, once the stream announced it.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bit(&mut self, offset: u64, set: Option<bool>) -> bool {
        let page = (offset / PAGE_SIZE as u64) as usize;
        let (word, mask) = (page / 64, 1u64 << (page % 64));
        let was = self.written.get(word).is_some_and(|w| w & mask != 0);
        match set {
            Some(true) => self.written[word] |= mask,
            Some(false) => self.written[word] &= !mask,
            None => {}
        }
        was
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
}

impl RamSink for RamImage {
    fn block(&mut self, id: &str, len: u64) -> io::Result<()> {
        if id != self.block {
            return Ok(());
        }
        self.len = len;
        self.written = vec![0; (len as usize / PAGE_SIZE).div_ceil(64)];
        self.file.set_len(len)
    }

    fn page(&mut self, id: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(id, offset)?;
        if data.iter().all(|&b| b == 0) {
            return self.fill(id, offset, 0);
        }
        self.file.write_all_at(data, offset)?;
        self.bit(offset, Some(true));
        self.data_pages += 1;
        Ok(())
    }

    fn fill(&mut self, id: &str, offset: u64, fill: u8) -> io::Result<()> {
        self.check(id, offset)?;
        if fill != 0 {
            return self.file.write_all_at(&[fill; PAGE_SIZE], offset);
        }
        if self.bit(offset, Some(false)) {
            // SAFETY: fallocate on our own fd; punching a hole needs no memory.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    PAGE_SIZE as libc::off_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_land_at_their_offsets_and_zero_pages_stay_holes() {
        let path = std::env::temp_dir().join(format!("forkd-ramimage-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut img = RamImage::new(f, "mem0");
        img.block("pc.bios", 4096).unwrap();
        img.block("mem0", 64 * 4096).unwrap();
        img.page("mem0", 4096, &[7u8; PAGE_SIZE]).unwrap();
        img.page("mem0", 8192, &[9u8; PAGE_SIZE]).unwrap();
        img.fill("mem0", 8192, 0).unwrap(); // overwritten by zeros later
        img.page("mem0", 12288, &[0u8; PAGE_SIZE]).unwrap();
        assert!(img.page("mem0", 64 * 4096, &[1u8; PAGE_SIZE]).is_err());
        assert!(img.page("pc.bios", 0, &[1u8; PAGE_SIZE]).is_err());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 64 * 4096);
        assert!(bytes[4096..8192].iter().all(|&b| b == 7));
        assert!(bytes[8192..].iter().all(|&b| b == 0));
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&path).unwrap().blocks() * 512 <= 2 * 4096,
            "not sparse"
        );
        std::fs::remove_file(path).unwrap();
    }
}
