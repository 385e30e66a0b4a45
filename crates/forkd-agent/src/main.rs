//! `forkd-agent`: PID 1 of the guest, or (for debugging) a plain process
//! serving a given channel: `forkd-agent --port PATH [--root DIR]`.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use forkd_agent::init::{self, Booted};
use forkd_agent::log;
use forkd_agent::reaper::Reaper;
use forkd_agent::server::{Config, Server, Stop};
use forkd_protocol::FrameReader;

fn main() {
    // Before any thread exists: SIGCHLD is collected by the reaper thread and
    // SIGIO (host connected to the port) by the main loop, both via
    // sigtimedwait, so both stay blocked in every thread.
    block_signals(&[libc::SIGCHLD, libc::SIGIO]);
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    if pid1 {
        std::panic::set_hook(Box::new(|info| {
            log(&format!("panic: {info}; powering off"));
            init::power_off();
        }));
    }
    let booted = if pid1 {
        match init::boot() {
            Ok(b) => b,
            Err(e) => {
                log(&format!("boot failed: {e}"));
                init::power_off();
            }
        }
    } else {
        match from_args() {
            Ok(b) => b,
            Err(msg) => {
                eprintln!("forkd-agent: {msg}\nusage: forkd-agent --port PATH [--root DIR]");
                std::process::exit(2);
            }
        }
    };
    if let Err(e) = serve(booted, pid1) {
        log(&format!("fatal: {e}"));
        if pid1 {
            init::power_off();
        }
        std::process::exit(1);
    }
    if pid1 {
        init::power_off();
    }
}

fn from_args() -> Result<Booted, String> {
    let mut args = std::env::args().skip(1);
    let (mut port, mut root) = (None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().map(PathBuf::from),
            "--root" => root = args.next().map(PathBuf::from),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Booted {
        port: port.ok_or("--port is required outside a guest")?,
        root,
    })
}

fn serve(booted: Booted, pid1: bool) -> io::Result<()> {
    let port = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&booted.port)?;
    enable_sigio(&port);
    let reaper = if pid1 {
        Reaper::pid1()?
    } else {
        Reaper::per_child()
    };
    let server = Server::new(
        Config {
            root: booted.root,
            reaper,
            power_off: pid1,
        },
        Box::new(port.try_clone()?),
    );
    loop {
        let mut reader = FrameReader::new(&port);
        match server.serve(&mut reader) {
            Stop::Shutdown => return Ok(()),
            // virtio-serial reads return 0 while no host is connected; wait
            // for the SIGIO the port raises when one connects.
            Stop::Disconnected => wait_for_signal(libc::SIGIO, 1),
            Stop::Io(e) => {
                log(&format!("channel read error: {e}"));
                wait_for_signal(libc::SIGIO, 1);
            }
        }
    }
}

fn block_signals(sigs: &[libc::c_int]) {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; the mask
    // change affects this (still single) thread and is inherited by new ones.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in sigs {
            libc::sigaddset(&mut set, *s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Asks the kernel to raise SIGIO on connection changes of the port.
fn enable_sigio(port: &std::fs::File) {
    let fd = port.as_raw_fd();
    // SAFETY: fcntl on a valid fd we own; F_SETOWN/F_SETFL take integers.
    unsafe {
        libc::fcntl(fd, libc::F_SETOWN, libc::getpid());
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_ASYNC);
    }
}

fn wait_for_signal(sig: libc::c_int, timeout_s: libc::time_t) {
    // SAFETY: valid sigset and timespec for the duration of the call.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        let ts = libc::timespec {
            tv_sec: timeout_s,
            tv_nsec: 0,
        };
        libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
    }
}
