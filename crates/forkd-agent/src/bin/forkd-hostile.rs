//! `forkd-hostile`: a hostile guest process, for tests of the host side.
//!
//! Run as root inside a guest, it does what any root process there can do to
//! the agent channel: take the agent's port descriptor out of PID 1 with
//! `pidfd_open` + `pidfd_getfd` and write to it, or stop or kill the agent.
//!
//!   forkd-hostile garbage BYTES        BYTES pseudo-random bytes
//!   forkd-hostile header ID            `FK 01 05 <ID> ffffffff`: a stdout frame announcing 4 GiB
//!   forkd-hostile half ID              a stdout header announcing 1 MiB, then 100 bytes, then nothing
//!   forkd-hostile trickle ID SECONDS   a stdout frame for ID, one byte every 100 ms
//!   forkd-hostile stall SECONDS        stop every thread of the agent (ptrace), then let it go
//!   forkd-hostile kill                 SIGKILL the agent (the kernel ignores it for PID 1),
//!                                      then make it call exit_group (ptrace): the guest panics
//!
//! Prints one line saying what it did. Exit code 0 when the attack was made.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use forkd_protocol::frame::Header;
use forkd_protocol::{Kind, MAX_PAYLOAD};

const AGENT: libc::pid_t = 1;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> Option<u64> { args.get(i).and_then(|v| v.parse().ok()) };
    let result = match (args.first().map(String::as_str), arg(1), arg(2)) {
        (Some("garbage"), Some(n), _) => garbage(n),
        (Some("header"), Some(id), _) => header(id as u32),
        (Some("half"), Some(id), _) => half(id as u32),
        (Some("trickle"), Some(id), Some(secs)) => trickle(id as u32, secs),
        (Some("stall"), Some(secs), _) => stall(Duration::from_secs(secs)),
        (Some("kill"), _, _) => kill(),
        _ => {
            eprintln!(
                "usage: forkd-hostile garbage BYTES | header ID | half ID | trickle ID SECONDS | stall SECONDS | kill"
            );
            std::process::exit(2);
        }
    };
    match result {
        Ok(msg) => println!("forkd-hostile: {msg}"),
        Err(e) => {
            eprintln!("forkd-hostile: {e}");
            std::process::exit(1);
        }
    }
}

/// The agent's virtio-serial port, duplicated out of PID 1.
fn agent_port() -> io::Result<File> {
    let fd = port_fd_number()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, AGENT, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd is a descriptor we just opened and own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_getfd duplicates descriptor `fd` of the process behind
    // pidfd into this process; it reads no memory of ours.
    let port = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if port < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `port` is a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(port as RawFd) })
}

/// The number of the agent's descriptor for `/dev/vport*` (from /proc/1/fd).
fn port_fd_number() -> io::Result<RawFd> {
    for e in std::fs::read_dir(format!("/proc/{AGENT}/fd"))? {
        let e = e?;
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("/dev/vport") {
            if let Ok(fd) = e.file_name().to_string_lossy().parse() {
                return Ok(fd);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "PID 1 holds no /dev/vport* descriptor",
    ))
}

fn garbage(bytes: u64) -> io::Result<String> {
    let mut port = agent_port()?;
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let n = left.min(chunk.len() as u64) as usize;
        port.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(format!(
        "wrote {bytes} bytes of garbage to the agent's port"
    ))
}

fn header(id: u32) -> io::Result<String> {
    agent_port()?.write_all(&Header::encode(Kind::Stdout, id, u32::MAX))?;
    Ok(format!("wrote a header announcing 4 GiB for request {id}"))
}

fn half(id: u32) -> io::Result<String> {
    let mut port = agent_port()?;
    port.write_all(&Header::encode(Kind::Stdout, id, MAX_PAYLOAD))?;
    port.write_all(&[b'h'; 100])?;
    Ok(format!(
        "wrote a header announcing {MAX_PAYLOAD} bytes for request {id} and 100 of them"
    ))
}

fn trickle(id: u32, secs: u64) -> io::Result<String> {
    let mut port = agent_port()?;
    let mut frame = Header::encode(Kind::Stdout, id, 4096).to_vec();
    frame.resize(frame.len() + 4096, b't');
    let n = (secs * 10).min(frame.len() as u64) as usize;
    for b in &frame[..n] {
        port.write_all(&[*b])?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(format!(
        "trickled {n} bytes of a frame for request {id} over {secs} s"
    ))
}

/// Threads of the agent that are not stopped yet.
fn agent_threads() -> io::Result<Vec<libc::pid_t>> {
    let mut tids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{AGENT}/task"))? {
        if let Ok(tid) = e?.file_name().to_string_lossy().parse() {
            tids.push(tid);
        }
    }
    Ok(tids)
}

fn ptrace(req: libc::c_uint, tid: libc::pid_t, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: the requests used here (SEIZE, INTERRUPT, DETACH, GETREGS,
    // SETREGS, PEEKTEXT, POKETEXT) act on the tracee; `data` points to a live
    // user_regs_struct for GETREGS/SETREGS and is a plain value otherwise.
    let r = unsafe { libc::ptrace(req, tid, 0usize, data) };
    if r == -1 && req != libc::PTRACE_PEEKTEXT {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Seizes and stops one thread, waiting until it is stopped.
fn seize_and_stop(tid: libc::pid_t) -> io::Result<()> {
    ptrace(libc::PTRACE_SEIZE, tid, 0)?;
    ptrace(libc::PTRACE_INTERRUPT, tid, 0)?;
    let mut status = 0;
    // SAFETY: waitpid writes the status into a local.
    if unsafe { libc::waitpid(tid, &mut status, libc::__WALL) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn stall(for_: Duration) -> io::Result<String> {
    let mut stopped: Vec<libc::pid_t> = Vec::new();
    // Threads may start while we stop others: go round until none is new.
    loop {
        let new: Vec<_> = agent_threads()?
            .into_iter()
            .filter(|t| !stopped.contains(t))
            .collect();
        if new.is_empty() {
            break;
        }
        for tid in new {
            // A thread that ended in between is no error.
            if seize_and_stop(tid).is_ok() {
                stopped.push(tid);
            }
        }
    }
    std::thread::sleep(for_);
    for tid in &stopped {
        let _ = ptrace(libc::PTRACE_DETACH, *tid, 0);
    }
    Ok(format!(
        "stopped {} agent threads for {:?}",
        stopped.len(),
        for_
    ))
}

fn kill() -> io::Result<String> {
    // SAFETY: kill has no memory effects.
    let r = unsafe { libc::kill(AGENT, libc::SIGKILL) };
    let alive = std::path::Path::new("/proc/1/exe").exists();
    eprintln!(
        "forkd-hostile: kill(1, SIGKILL) returned {r}; the agent is {}",
        if alive { "still there" } else { "gone" }
    );
    // PID 1 ignores signals it has no handler for; make it exit instead:
    // stop its main thread, write a `syscall` instruction where it stands and
    // point the registers at exit_group.
    seize_and_stop(AGENT)?;
    // SAFETY: user_regs_struct is plain data; GETREGS fills it.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    ptrace(
        libc::PTRACE_GETREGS,
        AGENT,
        &mut regs as *mut libc::user_regs_struct as usize,
    )?;
    let rip = regs.rip as usize;
    // SAFETY: PEEKTEXT reads a word of the tracee at `rip` (its own code).
    let word = unsafe { libc::ptrace(libc::PTRACE_PEEKTEXT, AGENT, rip, 0usize) } as u64;
    let patched = (word & !0xffff) | 0x050f; // `syscall` is 0f 05
                                             // SAFETY: POKETEXT writes a word of the tracee's (private) code mapping.
    if unsafe { libc::ptrace(libc::PTRACE_POKETEXT, AGENT, rip, patched as usize) } < 0 {
        return Err(io::Error::last_os_error());
    }
    regs.orig_rax = u64::MAX; // no syscall restart on resume
    regs.rax = libc::SYS_exit_group as u64;
    regs.rdi = 137;
    ptrace(
        libc::PTRACE_SETREGS,
        AGENT,
        &regs as *const libc::user_regs_struct as usize,
    )?;
    ptrace(libc::PTRACE_DETACH, AGENT, 0)?;
    Ok("made the agent (PID 1) call exit_group".into())
}
