//! `forkd-memtest`: guest-side tools for branch tests and benchmarks.
//!
//!   forkd-memtest write --mib N --run R   sweep the pattern of
//!       `forkd_agent::memtest` over N MiB forever (prints "sweeping" once
//!       the first sweep is done)
//!   forkd-memtest heartbeat               print a line every millisecond

use std::io::Write;
use std::time::Duration;

use forkd_agent::memtest::{fill_page, CTRL_MAGIC, PAGE};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| -> Option<u64> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
    };
    match args.get(1).map(String::as_str) {
        Some("write") => {
            let (Some(mib), Some(run)) = (arg("--mib"), arg("--run")) else {
                eprintln!("usage: forkd-memtest write --mib N --run R");
                std::process::exit(2);
            };
            write(mib, run)
        }
        Some("heartbeat") => heartbeat(),
        _ => {
            eprintln!("usage: forkd-memtest write --mib N --run R | heartbeat");
            std::process::exit(2);
        }
    }
}

fn write(mib: u64, run: u64) -> ! {
    let pages = (mib << 20) as usize / PAGE;
    let len = (pages + 1) * PAGE;
    // SAFETY: a fresh private anonymous mapping; we own it for the process's life.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        eprintln!("mmap: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    // Keep every page where it is: no THP collapse, no compaction moves (which
    // would leave stale copies of pattern pages in free memory).
    // SAFETY: advice and lock on the mapping we just made.
    unsafe {
        libc::madvise(base, len, libc::MADV_NOHUGEPAGE);
        libc::mlock(base, len);
    }
    let _ = std::fs::write("/proc/sys/vm/compact_unevictable_allowed", "0");
    // SAFETY: `base` is valid for `len` bytes and only this thread uses it.
    let mem = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, len) };
    let (ctrl, data) = mem.split_at_mut(PAGE);
    ctrl[0..8].copy_from_slice(&CTRL_MAGIC);
    ctrl[8..16].copy_from_slice(&run.to_le_bytes());
    let ctrl_ptr = ctrl.as_mut_ptr();
    let mut seq = 1u64;
    loop {
        for (i, page) in data.chunks_exact_mut(PAGE).enumerate() {
            fill_page(page, run, i as u64, seq);
            // One aligned 64-bit store, so that no instant sees half of it.
            // SAFETY: volatile store into our own page-aligned control page.
            unsafe {
                std::ptr::write_volatile(
                    ctrl_ptr.add(16) as *mut u64,
                    forkd_agent::memtest::control_word(seq, i as u64).to_le(),
                );
            }
        }
        if seq == 1 {
            println!("sweeping");
            let _ = std::io::stdout().flush();
        }
        seq += 1;
    }
}

fn heartbeat() -> ! {
    let mut out = std::io::stdout().lock();
    let mut n = 0u64;
    loop {
        n += 1;
        let _ = writeln!(out, "{n}");
        let _ = out.flush();
        std::thread::sleep(Duration::from_millis(1));
    }
}
