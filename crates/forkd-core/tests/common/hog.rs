//! A program that takes huge pages without forkd's ledger, for tests of a
//! pool that runs dry. Shared by forkd-core's and forkd-cli's tests (the
//! latter include this file by path).

/// Takes every 2 MiB surplus page the pool will give, from this process,
/// without a claim (as another program would): `MADV_POPULATE_WRITE` fails
/// where a touch would raise SIGBUS.
pub struct Hog {
    /// The mapping's address (an integer, so the hog can cross threads).
    addr: usize,
    len: usize,
    pub held: usize,
}

impl Hog {
    /// Maps room for `max_pages` pages; takes none yet.
    pub fn new(max_pages: usize) -> Hog {
        let len = max_pages << 21;
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"forkd-test-hog".as_ptr(), libc::MFD_HUGETLB) };
        assert!(
            fd >= 0,
            "memfd_create(MFD_HUGETLB): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is ours; the mapping is unmapped in Drop.
        let addr = unsafe {
            assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
            let a = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd,
                0,
            );
            libc::close(fd);
            a
        };
        assert_ne!(addr, libc::MAP_FAILED);
        Hog {
            addr: addr as usize,
            len,
            held: 0,
        }
    }

    /// Takes pages until the pool gives no more.
    pub fn take_more(&mut self) {
        while self.held < self.len >> 21 {
            // SAFETY: one 2 MiB page inside our own mapping.
            let r = unsafe {
                libc::madvise(
                    (self.addr + (self.held << 21)) as *mut libc::c_void,
                    1 << 21,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if r != 0 {
                return;
            }
            self.held += 1;
        }
    }

    pub fn take_all(max_pages: usize) -> Hog {
        let mut h = Hog::new(max_pages);
        h.take_more();
        h
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        // SAFETY: our own mapping; unmapping it frees its huge pages.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}
