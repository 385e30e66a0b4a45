//! Making a restored guest its own.
//!
//! Every child of a snapshot wakes up with the parent's kernel RNG state,
//! clock and hostname. The host sends fresh entropy, its time and the child's
//! name; this module mixes the entropy into the kernel pool and forces a CRNG
//! reseed (so `/dev/urandom` diverges at once, not at the next periodic
//! reseed), steps `CLOCK_REALTIME`, and sets the hostname.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::io::AsRawFd;

/// `_IOW('R', 0x03, int[2])`: add entropy and credit it.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Entropy accepted per request.
const MAX_ENTROPY: usize = 512;

/// Applies the host's entropy, time and hostname. Returns how far the guest
/// clock was ahead of the host (negative: behind), in milliseconds.
pub fn restore(entropy_hex: &str, unix_time_ns: u64, hostname: &str) -> Result<i64, String> {
    let entropy = forkd_protocol::from_hex(entropy_hex).ok_or("entropy_hex is not hex")?;
    if entropy.len() < 32 || entropy.len() > MAX_ENTROPY {
        return Err(format!(
            "entropy must be 32..={MAX_ENTROPY} bytes, got {}",
            entropy.len()
        ));
    }
    if hostname.is_empty() || hostname.len() > 64 {
        return Err("hostname must be 1-64 bytes".into());
    }
    reseed(&entropy).map_err(|e| format!("reseeding the kernel CRNG: {e}"))?;
    let step = step_clock(unix_time_ns).map_err(|e| format!("setting the clock: {e}"))?;
    // SAFETY: sethostname reads `len` bytes from a valid buffer.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(format!("sethostname: {}", io::Error::last_os_error()));
    }
    Ok(step)
}

fn reseed(entropy: &[u8]) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: `info` is a valid rand_pool_info: two ints followed by
    // buf_size bytes; the kernel reads only that much.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn step_clock(unix_time_ns: u64) -> io::Result<i64> {
    // SAFETY: timespec is plain data; clock_gettime fills it.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    let guest_ns = now.tv_sec as i128 * 1_000_000_000 + now.tv_nsec as i128;
    let target = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: valid timespec; needs CAP_SYS_TIME, which PID 1 has.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &target) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(((guest_ns - unix_time_ns as i128) / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_are_refused_before_touching_the_system() {
        assert!(restore("zz", 0, "a").unwrap_err().contains("hex"));
        assert!(restore(&"00".repeat(8), 0, "a")
            .unwrap_err()
            .contains("32..="));
        assert!(restore(&"00".repeat(32), 0, "")
            .unwrap_err()
            .contains("hostname"));
    }
}
