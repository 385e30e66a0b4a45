//! The guest's own things through its agent — files, directory watches, tar
//! streams, processes the guest keeps between calls, the persistent Python
//! interpreter — for the seam's operations: the fleet's calls, and the
//! conversions between the agent's wire types and the seam's.

use std::io::{Read, Write};
use std::time::Duration;

use forkd_ops::{
    policy, EvalError, EvalOutcome, ExecOutcome, FileInfo, FileKind, FsEvent, FsEventKind,
    ProcessEvent, ProcessInfo, ProcessRef, ProcessSpec, PtySize, TarSummary, WriteOptions,
};
use forkd_protocol as wire;
use forkd_protocol::client::{AttachEvent, Attachment, ClientError, OutputStream};

use crate::{CoreError, Fleet};

pub(crate) fn outcome(st: &wire::ExitStatus) -> ExecOutcome {
    ExecOutcome {
        code: st.code,
        signal: st.signal,
        timed_out: st.timed_out,
        duration_ms: st.duration_ms,
    }
}

fn file_kind(k: wire::FileKind) -> FileKind {
    match k {
        wire::FileKind::File => FileKind::File,
        wire::FileKind::Dir => FileKind::Dir,
        wire::FileKind::Symlink => FileKind::Symlink,
        wire::FileKind::Other => FileKind::Other,
    }
}

fn file_info(f: wire::FileInfo) -> FileInfo {
    FileInfo {
        name: f.name,
        path: f.path,
        kind: file_kind(f.kind),
        size: f.size,
        mode: f.mode,
        permissions: f.permissions,
        owner: f.owner,
        group: f.group,
        modified_ns: f.mtime_ns,
        symlink_target: f.symlink_target,
    }
}

fn fs_event(e: wire::FsEvent) -> FsEvent {
    FsEvent {
        name: e.name,
        kind: match e.kind {
            wire::FsEventKind::Create => FsEventKind::Create,
            wire::FsEventKind::Write => FsEventKind::Write,
            wire::FsEventKind::Remove => FsEventKind::Remove,
            wire::FsEventKind::Rename => FsEventKind::Rename,
            wire::FsEventKind::Chmod => FsEventKind::Chmod,
        },
    }
}

fn tar_summary(t: wire::TarSummary) -> TarSummary {
    TarSummary {
        bytes: t.bytes,
        entries: t.entries,
    }
}

fn process_info(p: wire::ProcInfo) -> ProcessInfo {
    ProcessInfo {
        pid: p.pid,
        tag: p.tag,
        argv: p.argv,
        env: p.env,
        cwd: p.cwd,
        user: p.user,
        pty: p.pty,
        stdin: p.stdin,
        started_unix_ms: p.started_unix_ms,
        exit: p.exit.as_ref().map(outcome),
    }
}

fn proc_spec(s: &ProcessSpec) -> wire::ProcSpec {
    wire::ProcSpec {
        argv: s.argv.clone(),
        env: s.env.clone(),
        cwd: s.cwd.clone(),
        user: s.user.clone(),
        stdin: s.stdin,
        pty: s.pty.map(|p| wire::PtySize {
            cols: p.cols,
            rows: p.rows,
        }),
        tag: s.tag.clone(),
        timeout_ms: s.timeout.map(|t| t.as_millis() as u64),
        backlog_bytes: None,
    }
}

fn selector(r: &ProcessRef) -> wire::ProcSelector {
    match r {
        ProcessRef::Pid(p) => wire::ProcSelector::Pid(*p),
        ProcessRef::Tag(t) => wire::ProcSelector::Tag(t.clone()),
    }
}

/// Hands an attachment's events to `on_event` until the process ends
/// (its outcome) or `on_event` declines (`None`; the process goes on).
fn follow(
    mut a: Attachment,
    on_event: &mut dyn FnMut(ProcessEvent) -> bool,
) -> Result<Option<ExecOutcome>, ClientError> {
    loop {
        let ev = match a.next(Some(policy::PROCESS_QUIET)) {
            Err(ClientError::Timeout(_)) => {
                if !on_event(ProcessEvent::Quiet) {
                    a.detach(Duration::from_secs(5))?;
                    return Ok(None);
                }
                continue;
            }
            other => other?,
        };
        let event = match ev {
            AttachEvent::Stdout(b) => ProcessEvent::Stdout(b),
            AttachEvent::Stderr(b) => ProcessEvent::Stderr(b),
            AttachEvent::Pty(b) => ProcessEvent::Pty(b),
            AttachEvent::Dropped(n) => ProcessEvent::Dropped(n),
            AttachEvent::Ended(st) => return Ok(Some(outcome(&st))),
            AttachEvent::Detached => return Ok(None),
        };
        if !on_event(event) {
            a.detach(Duration::from_secs(5))?;
            return Ok(None);
        }
    }
}

/// One half of a relay with the agent session it runs on, kept open (and
/// the sandbox busy) as long as the half lives.
struct Held<T> {
    inner: T,
    _session: std::sync::Arc<crate::sessions::Session>,
}

impl<T: Read> Read for Held<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<T: Write> Write for Held<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Fleet {
    pub(crate) fn guest_write(
        &self,
        id: &str,
        path: &str,
        opts: &WriteOptions,
        data: &mut dyn Read,
    ) -> Result<u64, CoreError> {
        let parents = opts.parents.unwrap_or(policy::WRITE_CREATES_PARENTS);
        let wire_opts = wire::client::WriteOptions {
            mode: opts.mode,
            parents,
            user: opts.user.clone(),
        };
        self.with_agent(id, &format!("writing {path}"), |a| {
            a.write_file_with(path, &wire_opts, data)
        })
        .map_err(|e| match e {
            // Without parents, a missing path is a missing directory.
            CoreError::InGuest {
                id,
                what,
                code: wire::ErrorCode::NotFound,
                ..
            } if !parents => {
                let dir = match path.trim_end_matches('/').rsplit_once('/') {
                    Some(("", _)) | None => "/",
                    Some((d, _)) => d,
                };
                CoreError::InGuest {
                    id,
                    what,
                    code: wire::ErrorCode::NotFound,
                    message: format!(
                        "directory {dir} does not exist (parent directories are made only when asked)"
                    ),
                }
            }
            other => other,
        })
    }

    pub(crate) fn guest_read(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        out: &mut dyn Write,
    ) -> Result<u64, CoreError> {
        self.with_agent(id, &format!("reading {path}"), |a| {
            a.read_file_as(path, user, out)
        })
    }

    pub(crate) fn guest_stat(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<FileInfo, CoreError> {
        self.with_agent(id, &format!("looking at {path}"), |a| a.stat(path, user))
            .map(file_info)
    }

    pub(crate) fn guest_list(
        &self,
        id: &str,
        path: &str,
        depth: u32,
        user: Option<&str>,
    ) -> Result<Vec<FileInfo>, CoreError> {
        self.with_agent(id, &format!("listing {path}"), |a| {
            a.list_dir(path, depth, user)
        })
        .map(|v| {
            let mut all: Vec<FileInfo> = v.into_iter().map(file_info).collect();
            all.sort_by(|a, b| a.path.cmp(&b.path));
            all
        })
    }

    /// Makes `path` and its parents; false when it was there already.
    pub(crate) fn guest_mkdir(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<bool, CoreError> {
        match self.with_agent(id, &format!("making {path}"), |a| {
            a.make_dir(path, None, user)
        }) {
            Ok(()) => Ok(true),
            Err(CoreError::InGuest {
                code: wire::ErrorCode::AlreadyExists,
                ..
            }) => {
                // Only a directory counts as already made.
                let there = self.guest_stat(id, path, user)?;
                if there.kind == FileKind::Dir {
                    Ok(false)
                } else {
                    Err(CoreError::InGuest {
                        id: id.into(),
                        what: format!("making {path}"),
                        code: wire::ErrorCode::AlreadyExists,
                        message: format!("{path} exists and is not a directory"),
                    })
                }
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) fn guest_remove(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<(), CoreError> {
        self.with_agent(id, &format!("removing {path}"), |a| {
            a.remove(path, true, user)
        })
    }

    pub(crate) fn guest_rename(
        &self,
        id: &str,
        from: &str,
        to: &str,
        user: Option<&str>,
    ) -> Result<FileInfo, CoreError> {
        self.with_agent(id, &format!("moving {from} to {to}"), |a| {
            a.rename(from, to, user)
        })
        .map(file_info)
    }

    pub(crate) fn guest_copy_in(
        &self,
        id: &str,
        dir: &str,
        user: Option<&str>,
        tar: &mut dyn Read,
    ) -> Result<TarSummary, CoreError> {
        self.with_agent(id, &format!("unpacking into {dir}"), |a| {
            a.tar_write(dir, user, tar)
        })
        .map(tar_summary)
    }

    pub(crate) fn guest_copy_out(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        tar: &mut dyn Write,
    ) -> Result<TarSummary, CoreError> {
        self.with_agent(id, &format!("packing {path}"), |a| {
            a.tar_read(path, user, tar)
        })
        .map(tar_summary)
    }

    pub(crate) fn guest_watch(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
        user: Option<&str>,
    ) -> Result<u32, CoreError> {
        self.with_agent(id, &format!("watching {path}"), |a| {
            // The agent watches with its own rights; a user must at least
            // be able to list the directory to watch it.
            if user.is_some() {
                a.list_dir(path, 1, user)?;
            }
            a.watch_start(path, recursive, None)
        })
    }

    pub(crate) fn guest_watch_events(
        &self,
        id: &str,
        watch: u32,
        wait: Duration,
    ) -> Result<Vec<FsEvent>, CoreError> {
        self.with_agent(id, "polling a watch", |a| a.watch_poll(watch, wait))
            .map(|b| b.events.into_iter().map(fs_event).collect())
    }

    pub(crate) fn guest_unwatch(&self, id: &str, watch: u32) -> Result<(), CoreError> {
        self.with_agent(id, "stopping a watch", |a| a.watch_stop(watch))
    }

    pub(crate) fn guest_run(
        &self,
        id: &str,
        spec: &ProcessSpec,
        on_event: &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<ExecOutcome>, CoreError> {
        if spec.argv.first().is_none_or(|a| a.is_empty()) {
            return Err(CoreError::BadRequest("name a program to run".into()));
        }
        if let Some(tag) = &spec.tag {
            if tag.is_empty() || tag.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CoreError::BadRequest(format!(
                    "process tag `{tag}` must not be empty or all digits (a number names a pid)"
                )));
            }
        }
        let what = format!("running `{}`", spec.argv.join(" "));
        self.with_agent(id, &what, |a| {
            let att = a.proc_start_attached(proc_spec(spec), true)?;
            if !on_event(ProcessEvent::Started(process_info(att.info().clone()))) {
                att.detach(Duration::from_secs(5))?;
                return Ok(None);
            }
            follow(att, on_event)
        })
    }

    pub(crate) fn guest_follow(
        &self,
        id: &str,
        process: &ProcessRef,
        replay: bool,
        on_event: &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<ExecOutcome>, CoreError> {
        self.with_agent(id, &format!("following process {process}"), |a| {
            let att = a.proc_attach(
                selector(process),
                wire::AttachOptions {
                    replay,
                    backpressure: false,
                },
            )?;
            if !on_event(ProcessEvent::Started(process_info(att.info().clone()))) {
                att.detach(Duration::from_secs(5))?;
                return Ok(None);
            }
            follow(att, on_event)
        })
    }

    pub(crate) fn guest_input(
        &self,
        id: &str,
        process: &ProcessRef,
        data: &[u8],
        close: bool,
    ) -> Result<(), CoreError> {
        self.with_agent(id, &format!("writing to process {process}"), |a| {
            if !data.is_empty() || !close {
                a.proc_input(selector(process), data, close)?;
            } else {
                a.proc_close_stdin(selector(process))?;
            }
            Ok(())
        })
    }

    pub(crate) fn guest_signal(
        &self,
        id: &str,
        process: &ProcessRef,
        signal: i32,
    ) -> Result<(), CoreError> {
        self.with_agent(id, &format!("signalling process {process}"), |a| {
            a.proc_signal(selector(process), signal)
        })
    }

    pub(crate) fn guest_resize(
        &self,
        id: &str,
        process: &ProcessRef,
        size: PtySize,
    ) -> Result<(), CoreError> {
        self.with_agent(id, &format!("resizing process {process}"), |a| {
            a.proc_resize(
                selector(process),
                wire::PtySize {
                    cols: size.cols,
                    rows: size.rows,
                },
            )
        })
    }

    pub(crate) fn guest_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, CoreError> {
        self.with_agent(id, "listing processes", |a| a.proc_list())
            .map(|v| v.into_iter().map(process_info).collect())
    }

    pub(crate) fn guest_code_interpreter(&self, id: &str, port: u16) -> Result<u32, CoreError> {
        self.with_agent(id, "starting the code interpreter", |a| {
            a.code_interpreter(port, None, policy::CODE_INTERPRETER_START)
        })
    }

    pub(crate) fn guest_connect_port(
        &self,
        id: &str,
        port: u16,
    ) -> Result<forkd_ops::PortConn, CoreError> {
        // Both halves hold the agent session: a shared session nobody holds
        // is closed after a moment idle, and the relay with it.
        let session = self.session(id)?;
        let relay =
            self.with_agent_of(&session, id, &format!("connecting to port {port}"), |a| {
                a.tcp_connect(port, Duration::from_secs(10))
            })?;
        let (mut reader, writer) = relay.split();
        reader.set_timeout(Some(policy::PORT_IDLE));
        Ok(forkd_ops::PortConn {
            reader: Box::new(Held {
                inner: reader,
                _session: session.clone(),
            }),
            writer: Box::new(Held {
                inner: writer,
                _session: session,
            }),
        })
    }

    pub(crate) fn guest_eval(
        &self,
        id: &str,
        code: &str,
        timeout: Option<Duration>,
    ) -> Result<EvalOutcome, CoreError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let timeout = timeout.unwrap_or(policy::EVAL_TIMEOUT);
        let r = self
            .with_agent(id, "an eval", |a| {
                a.eval(code, &[], Some(timeout), |s, b| match s {
                    OutputStream::Stdout => stdout.extend_from_slice(b),
                    OutputStream::Stderr => stderr.extend_from_slice(b),
                })
            })
            .map_err(|e| match e {
                CoreError::InGuest {
                    id,
                    code: wire::ErrorCode::Unavailable,
                    message,
                    ..
                } => CoreError::NoPython {
                    id,
                    detail: message,
                },
                other => other,
            })?;
        Ok(EvalOutcome {
            value: r.value,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            error: r.error.map(|e| EvalError {
                name: e.name,
                value: e.value,
                traceback: e.traceback,
            }),
            execution_count: r.execution_count,
            timed_out: r.timed_out,
            duration_ms: r.duration_ms,
        })
    }
}
