//! Directory watches (`WatchStart`, `WatchPoll`, `WatchStop`) with inotify.
//!
//! A watch belongs to the agent, like a process: its events queue up in the
//! agent (at most [`MAX_QUEUED`], further ones counted as dropped) until a
//! poll takes them, so E2B's polling watcher and a streaming front end (a
//! loop of long polls) both work across host sessions. Each watch has one
//! thread, inside the guest's root, reading its inotify descriptor; a
//! recursive watch adds subdirectories as they appear. A watch nobody polls
//! for its idle time is stopped by the agent.
//!
//! [`parse_events`] and [`classify`] are pure and tested without inotify.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use forkd_protocol::{ErrorCode, ErrorReply, FsEvent, FsEventKind};

use crate::fsops::{self, fs_error};
use crate::session::{lock, Stream, TICK};

/// Watches at most.
pub const MAX_WATCHES: usize = 64;
/// Events queued per watch at most.
pub const MAX_QUEUED: usize = 4096;
/// Directories one recursive watch covers at most.
pub const MAX_DIRS: usize = 8192;
/// Idle time after which an unpolled watch stops, unless the request says.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
/// Longest wait of one poll.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(60);
/// Bytes of event names one poll answer carries at most.
const POLL_BYTES: usize = 512 * 1024;

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_EXCL_UNLINK
    | libc::IN_ONLYDIR;

/// One raw inotify event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub wd: i32,
    pub mask: u32,
    pub name: Vec<u8>,
}

/// Splits a buffer read from an inotify descriptor into events (a torn
/// record at the end is ignored; the kernel never tears one).
pub fn parse_events(buf: &[u8]) -> Vec<RawEvent> {
    const HEADER: usize = 16;
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEADER <= buf.len() {
        let word = |i: usize| {
            [
                buf[at + i],
                buf[at + i + 1],
                buf[at + i + 2],
                buf[at + i + 3],
            ]
        };
        let wd = i32::from_ne_bytes(word(0));
        let mask = u32::from_ne_bytes(word(4));
        let len = u32::from_ne_bytes(word(12)) as usize;
        let Some(name) = buf.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        out.push(RawEvent {
            wd,
            mask,
            name: name[..end].to_vec(),
        });
        at += HEADER + len;
    }
    out
}

/// The protocol's kind of an event mask (`None` for events it does not
/// report).
pub fn classify(mask: u32) -> Option<FsEventKind> {
    if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
        Some(FsEventKind::Create)
    } else if mask & libc::IN_MODIFY != 0 {
        Some(FsEventKind::Write)
    } else if mask & libc::IN_DELETE != 0 {
        Some(FsEventKind::Remove)
    } else if mask & libc::IN_MOVED_FROM != 0 {
        Some(FsEventKind::Rename)
    } else if mask & libc::IN_ATTRIB != 0 {
        Some(FsEventKind::Chmod)
    } else {
        None
    }
}

/// The agent's watches.
#[derive(Default)]
pub struct Watches {
    table: Mutex<HashMap<u32, Arc<Watch>>>,
    next: AtomicU32,
}

struct Watch {
    state: Mutex<Queue>,
    changed: Condvar,
    stop: AtomicBool,
    idle: Duration,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<FsEvent>,
    bytes: usize,
    dropped: u64,
    last_poll: Option<Instant>,
    /// Why the watch ended on its own (its directory went away).
    ended: Option<String>,
}

impl Watches {
    /// Starts a watch of `path` in the guest's `root`; returns its id.
    pub fn start(
        self: &Arc<Self>,
        root: Option<&Path>,
        path: &str,
        recursive: bool,
        idle: Option<Duration>,
    ) -> Result<u32, ErrorReply> {
        if lock(&self.table).len() >= MAX_WATCHES {
            return Err(ErrorReply::new(
                ErrorCode::Limit,
                format!("{MAX_WATCHES} watches are active already; stop one first"),
            ));
        }
        let watch = Arc::new(Watch {
            state: Mutex::new(Queue {
                last_poll: Some(Instant::now()),
                ..Queue::default()
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            idle: idle.unwrap_or(DEFAULT_IDLE).max(Duration::from_secs(1)),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        // The watch's thread sets itself up inside the guest and reports
        // whether the directory could be watched before it goes on.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (me, w) = (Arc::clone(self), Arc::clone(&watch));
        let root = root.map(Path::to_path_buf);
        let path = path.to_string();
        std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || {
                let setup = (|| {
                    let user = fsops::enter(root.as_deref(), None)?;
                    let dir = fsops::absolute(&path, &user.home)?;
                    Inotify::open(&dir, recursive)
                })();
                match setup {
                    Ok(ino) => {
                        let _ = ready_tx.send(Ok(()));
                        run(&w, ino);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
                lock(&me.table).remove(&id);
            })
            .map_err(|e| ErrorReply::new(ErrorCode::Io, format!("cannot start a thread: {e}")))?;
        ready_rx.recv().unwrap_or_else(|_| {
            Err(ErrorReply::new(
                ErrorCode::Io,
                "the watch thread ended before it started",
            ))
        })?;
        lock(&self.table).insert(id, watch);
        Ok(id)
    }

    fn get(&self, id: u32) -> Result<Arc<Watch>, ErrorReply> {
        lock(&self.table).get(&id).cloned().ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::NotFound,
                format!("no watch {id} (it was stopped, or expired unpolled)"),
            )
        })
    }

    /// Events queued since the last poll, waiting up to `wait` for one.
    pub fn poll(
        &self,
        id: u32,
        wait: Duration,
        stream: &Stream,
    ) -> Result<(Vec<FsEvent>, u64), ErrorReply> {
        let watch = self.get(id)?;
        let deadline = Instant::now() + wait.min(MAX_POLL_WAIT);
        let mut q = lock(&watch.state);
        q.last_poll = Some(Instant::now());
        while q.events.is_empty() && q.dropped == 0 && q.ended.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stream.is_cancelled() {
                break;
            }
            q = watch
                .changed
                .wait_timeout(q, left.min(TICK))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        q.last_poll = Some(Instant::now());
        let mut events = Vec::new();
        let mut bytes = 0;
        while let Some(e) = q.events.front() {
            if bytes + e.name.len() > POLL_BYTES && !events.is_empty() {
                break;
            }
            bytes += e.name.len() + 32;
            q.bytes -= e.name.len();
            events.extend(q.events.pop_front());
        }
        let dropped = std::mem::take(&mut q.dropped);
        if events.is_empty() && dropped == 0 {
            if let Some(why) = &q.ended {
                let why = why.clone();
                drop(q);
                watch.stop.store(true, Ordering::SeqCst);
                return Err(ErrorReply::new(ErrorCode::NotFound, why));
            }
        }
        Ok((events, dropped))
    }

    pub fn stop(&self, id: u32) -> Result<(), ErrorReply> {
        let watch = lock(&self.table)
            .remove(&id)
            .ok_or_else(|| ErrorReply::new(ErrorCode::NotFound, format!("no watch {id}")))?;
        watch.stop.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// An inotify descriptor and the directories it watches.
struct Inotify {
    fd: OwnedFd,
    /// Watch descriptor -> directory relative to the watched one ("" for it).
    dirs: HashMap<i32, PathBuf>,
    top: PathBuf,
    recursive: bool,
}

impl Inotify {
    fn open(dir: &Path, recursive: bool) -> Result<Inotify, ErrorReply> {
        let meta = fs::metadata(dir).map_err(|e| fs_error(dir, &e))?;
        if !meta.is_dir() {
            return Err(ErrorReply::new(
                ErrorCode::NotADirectory,
                format!("{} is not a directory", dir.display()),
            ));
        }
        // SAFETY: inotify_init1 returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(ErrorReply::new(
                ErrorCode::Io,
                format!("inotify: {}", io::Error::last_os_error()),
            ));
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ino = Inotify {
            fd,
            dirs: HashMap::new(),
            top: dir.to_path_buf(),
            recursive,
        };
        ino.add(Path::new("")).map_err(|e| fs_error(dir, &e))?;
        if recursive {
            ino.add_tree(Path::new(""))?;
        }
        Ok(ino)
    }

    /// Watches the directory `rel` (relative to the top).
    fn add(&mut self, rel: &Path) -> io::Result<()> {
        if self.dirs.len() >= MAX_DIRS {
            return Err(io::Error::other(format!(
                "more than {MAX_DIRS} directories to watch"
            )));
        }
        let full = self.top.join(rel);
        let c = CString::new(full.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: valid descriptor and NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        self.dirs.insert(wd, rel.to_path_buf());
        Ok(())
    }

    /// Watches every directory below `rel`.
    fn add_tree(&mut self, rel: &Path) -> Result<(), ErrorReply> {
        let full = self.top.join(rel);
        let Ok(entries) = fs::read_dir(&full) else {
            return Ok(());
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let sub = rel.join(e.file_name());
                if let Err(err) = self.add(&sub) {
                    if err.kind() == io::ErrorKind::Other {
                        return Err(ErrorReply::new(ErrorCode::Limit, err.to_string()));
                    }
                    continue;
                }
                self.add_tree(&sub)?;
            }
        }
        Ok(())
    }
}

/// The watch's thread: reads events until stopped, idle or the directory
/// is gone.
fn run(w: &Watch, mut ino: Inotify) {
    let mut buf = vec![0u8; 64 * 1024];
    while !w.stop.load(Ordering::SeqCst) {
        let idle = lock(&w.state)
            .last_poll
            .is_some_and(|t| t.elapsed() > w.idle);
        if idle {
            return;
        }
        if !crate::spawn::poll_fd(ino.fd.as_raw_fd(), libc::POLLIN, 200) {
            continue;
        }
        // SAFETY: reads into a valid buffer from our descriptor.
        let n = unsafe { libc::read(ino.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        for ev in parse_events(&buf[..n as usize]) {
            handle(w, &mut ino, ev);
        }
        if ino.dirs.is_empty() {
            lock(&w.state).ended = Some(format!(
                "the watched directory {} was removed",
                ino.top.display()
            ));
            w.changed.notify_all();
            // Stay until a poll has seen the end (or the idle time).
        }
    }
}

fn handle(w: &Watch, ino: &mut Inotify, ev: RawEvent) {
    if ev.mask & libc::IN_Q_OVERFLOW != 0 {
        lock(&w.state).dropped += 1;
        w.changed.notify_all();
        return;
    }
    if ev.mask & libc::IN_IGNORED != 0 {
        ino.dirs.remove(&ev.wd);
        return;
    }
    let Some(dir) = ino.dirs.get(&ev.wd).cloned() else {
        return;
    };
    if ev.name.is_empty() {
        // Events about the watched directory itself: its parent reports them.
        return;
    }
    let rel = dir.join(std::ffi::OsStr::from_bytes(&ev.name));
    let is_dir = ev.mask & libc::IN_ISDIR != 0;
    if ino.recursive
        && is_dir
        && ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0
        && ino.add(&rel).is_ok()
    {
        let _ = ino.add_tree(&rel);
    }
    let Some(kind) = classify(ev.mask) else {
        return;
    };
    let name = rel.to_string_lossy().into_owned();
    let mut q = lock(&w.state);
    if q.events.len() >= MAX_QUEUED {
        q.dropped += 1;
    } else {
        q.bytes += name.len();
        q.events.push_back(FsEvent { name, kind });
    }
    w.changed.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(wd: i32, mask: u32, name: &[u8], pad: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(wd.to_ne_bytes());
        v.extend(mask.to_ne_bytes());
        v.extend(0u32.to_ne_bytes());
        v.extend(((name.len() + pad) as u32).to_ne_bytes());
        v.extend(name);
        v.extend(std::iter::repeat_n(0u8, pad));
        v
    }

    #[test]
    fn parses_records_with_padded_names() {
        let mut buf = record(1, libc::IN_CREATE, b"a.txt", 11);
        buf.extend(record(2, libc::IN_DELETE | libc::IN_ISDIR, b"", 0));
        buf.extend(record(3, libc::IN_MODIFY, b"bb", 2));
        // A torn record at the end is ignored.
        buf.extend(&record(4, libc::IN_ATTRIB, b"c", 3)[..10]);
        let evs = parse_events(&buf);
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].name, b"a.txt");
        assert_eq!(evs[1].wd, 2);
        assert!(evs[1].name.is_empty());
        assert_eq!(evs[2].name, b"bb");
        assert!(parse_events(&[0u8; 7]).is_empty());
    }

    #[test]
    fn masks_map_to_event_kinds() {
        assert_eq!(classify(libc::IN_CREATE), Some(FsEventKind::Create));
        assert_eq!(classify(libc::IN_MOVED_TO), Some(FsEventKind::Create));
        assert_eq!(classify(libc::IN_MODIFY), Some(FsEventKind::Write));
        assert_eq!(
            classify(libc::IN_DELETE | libc::IN_ISDIR),
            Some(FsEventKind::Remove)
        );
        assert_eq!(classify(libc::IN_MOVED_FROM), Some(FsEventKind::Rename));
        assert_eq!(classify(libc::IN_ATTRIB), Some(FsEventKind::Chmod));
        assert_eq!(classify(libc::IN_IGNORED), None);
    }
}
