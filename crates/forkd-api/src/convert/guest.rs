//! Conversions for the routes inside a sandbox: files, watches, tar
//! summaries, processes and eval.

use std::time::Duration;

use forkd_ops as ops;

use crate::error::{ApiError, ErrorBody};
use crate::types as api;
use crate::validate::BASE64;
use base64::Engine as _;

// ---------------------------------------------------------------- files

/// A path's facts on the wire.
pub fn file_info_to_wire(f: &ops::FileInfo) -> api::FileInfo {
    api::FileInfo {
        name: f.name.clone(),
        path: f.path.clone(),
        file_type: match f.kind {
            ops::FileKind::File => api::FileType::File,
            ops::FileKind::Dir => api::FileType::Dir,
            ops::FileKind::Symlink => api::FileType::Symlink,
            ops::FileKind::Other => api::FileType::Other,
        },
        size: f.size,
        mode: f.mode,
        permissions: f.permissions.clone(),
        owner: f.owner.clone(),
        group: f.group.clone(),
        modified_ns: f.modified_ns,
        symlink_target: f.symlink_target.clone(),
    }
}

/// A path's facts from the wire.
pub fn file_info_from_wire(f: api::FileInfo) -> ops::FileInfo {
    ops::FileInfo {
        name: f.name,
        path: f.path,
        kind: match f.file_type {
            api::FileType::File => ops::FileKind::File,
            api::FileType::Dir => ops::FileKind::Dir,
            api::FileType::Symlink => ops::FileKind::Symlink,
            api::FileType::Other => ops::FileKind::Other,
        },
        size: f.size,
        mode: f.mode,
        permissions: f.permissions,
        owner: f.owner,
        group: f.group,
        modified_ns: f.modified_ns,
        symlink_target: f.symlink_target,
    }
}

/// How to write, from a JSON write's fields.
pub fn write_options_from_wire(r: &api::FileWriteRequest) -> ops::WriteOptions {
    ops::WriteOptions {
        mode: r.mode,
        parents: r.mkdir,
        user: r.user.clone(),
    }
}

/// How to write, from a raw write's query.
pub fn raw_write_from_wire(q: &api::RawWriteQuery) -> ops::WriteOptions {
    ops::WriteOptions {
        mode: q.mode,
        parents: q.mkdir,
        user: q.user.clone(),
    }
}

/// A raw write's query string (without `?`) for `path` and `opts`.
pub fn raw_write_query(path: &str, opts: &ops::WriteOptions) -> String {
    let mut q = format!("path={}", query_value(path));
    if let Some(m) = opts.mode {
        q.push_str(&format!("&mode={m}"));
    }
    if let Some(p) = opts.parents {
        q.push_str(&format!("&mkdir={p}"));
    }
    if let Some(u) = &opts.user {
        q.push_str(&format!("&user={}", query_value(u)));
    }
    q
}

/// A path and optional user as a query string (without `?`).
pub fn path_query(path: &str, user: Option<&str>) -> String {
    match user {
        Some(u) => format!("path={}&user={}", query_value(path), query_value(u)),
        None => format!("path={}", query_value(path)),
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters and `/`
/// stay as they are).
pub fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A tar summary on the wire.
pub fn tar_to_wire(t: &ops::TarSummary) -> api::TarSummary {
    api::TarSummary {
        bytes: t.bytes,
        entries: t.entries,
    }
}

/// A tar summary from the wire.
pub fn tar_from_wire(t: &api::TarSummary) -> ops::TarSummary {
    ops::TarSummary {
        bytes: t.bytes,
        entries: t.entries,
    }
}

/// A watched change on the wire.
pub fn fs_event_to_wire(e: &ops::FsEvent) -> api::FsEvent {
    api::FsEvent {
        name: e.name.clone(),
        event_type: match e.kind {
            ops::FsEventKind::Create => api::FsEventType::Create,
            ops::FsEventKind::Write => api::FsEventType::Write,
            ops::FsEventKind::Remove => api::FsEventType::Remove,
            ops::FsEventKind::Rename => api::FsEventType::Rename,
            ops::FsEventKind::Chmod => api::FsEventType::Chmod,
        },
    }
}

/// A watched change from the wire.
pub fn fs_event_from_wire(e: api::FsEvent) -> ops::FsEvent {
    ops::FsEvent {
        name: e.name,
        kind: match e.event_type {
            api::FsEventType::Create => ops::FsEventKind::Create,
            api::FsEventType::Write => ops::FsEventKind::Write,
            api::FsEventType::Remove => ops::FsEventKind::Remove,
            api::FsEventType::Rename => ops::FsEventKind::Rename,
            api::FsEventType::Chmod => ops::FsEventKind::Chmod,
        },
    }
}

// ---------------------------------------------------------------- processes

/// A process to start, from the wire.
pub fn process_spec_from_wire(r: api::ProcessStartRequest) -> ops::ProcessSpec {
    ops::ProcessSpec {
        argv: r.args,
        env: r.env.into_iter().collect(),
        cwd: r.cwd,
        user: r.user,
        stdin: r.stdin,
        pty: r.pty.map(|p| ops::PtySize {
            cols: p.cols,
            rows: p.rows,
        }),
        tag: r.tag,
        timeout: r.timeout_secs.map(Duration::from_secs),
    }
}

/// A process to start, on the wire. A timeout is rounded up to whole
/// seconds.
pub fn process_spec_to_wire(s: &ops::ProcessSpec) -> api::ProcessStartRequest {
    api::ProcessStartRequest {
        args: s.argv.clone(),
        env: s.env.iter().cloned().collect(),
        cwd: s.cwd.clone(),
        user: s.user.clone(),
        stdin: s.stdin,
        pty: s.pty.map(|p| api::PtySize {
            cols: p.cols,
            rows: p.rows,
        }),
        tag: s.tag.clone(),
        timeout_secs: s
            .timeout
            .map(|t| t.as_secs() + u64::from(t.subsec_nanos() > 0)),
    }
}

/// A process named in a path, for the seam.
pub fn process_ref_from_wire(r: api::ProcessRefWire) -> ops::ProcessRef {
    match r {
        api::ProcessRefWire::Pid(p) => ops::ProcessRef::Pid(p),
        api::ProcessRefWire::Tag(t) => ops::ProcessRef::Tag(t),
    }
}

/// A process as a path segment (checked: a tag that is all digits, or one
/// that would change the path, is refused).
pub fn process_segment(r: &ops::ProcessRef) -> Result<String, ops::OpError> {
    match r {
        ops::ProcessRef::Pid(p) => Ok(p.to_string()),
        ops::ProcessRef::Tag(t) => crate::validate::process_tag("process", t)
            .map(|()| t.clone())
            .map_err(|e| ops::OpError::bad_input(e.to_string())),
    }
}

/// How a process ended, on the wire.
pub fn process_exit_to_wire(o: &ops::ExecOutcome) -> api::ProcessExit {
    api::ProcessExit {
        exit_code: o.exit_code(),
        code: o.code,
        signal: o.signal,
        timed_out: o.timed_out,
        duration_ms: o.duration_ms,
    }
}

/// How a process ended, from the wire.
pub fn process_exit_from_wire(e: &api::ProcessExit) -> ops::ExecOutcome {
    ops::ExecOutcome {
        code: e.code,
        signal: e.signal,
        timed_out: e.timed_out,
        duration_ms: e.duration_ms,
    }
}

/// A process on the wire.
pub fn process_info_to_wire(p: &ops::ProcessInfo) -> api::ProcessInfo {
    api::ProcessInfo {
        pid: p.pid,
        tag: p.tag.clone(),
        args: p.argv.clone(),
        env: p.env.iter().cloned().collect(),
        cwd: p.cwd.clone(),
        user: p.user.clone(),
        pty: p.pty,
        stdin: p.stdin,
        started_unix_ms: p.started_unix_ms,
        exit: p.exit.as_ref().map(process_exit_to_wire),
    }
}

/// A process from the wire.
pub fn process_info_from_wire(p: api::ProcessInfo) -> ops::ProcessInfo {
    ops::ProcessInfo {
        pid: p.pid,
        tag: p.tag,
        argv: p.args,
        env: p.env.into_iter().collect(),
        cwd: p.cwd,
        user: p.user,
        pty: p.pty,
        stdin: p.stdin,
        started_unix_ms: p.started_unix_ms,
        exit: p.exit.as_ref().map(process_exit_from_wire),
    }
}

/// One event of a followed process, as its stream line; `None` for
/// [`ops::ProcessEvent::Quiet`], which only the daemon's own follower sees.
pub fn process_event_to_wire(e: &ops::ProcessEvent) -> Option<api::ProcessEvent> {
    Some(match e {
        ops::ProcessEvent::Started(p) => api::ProcessEvent::Started {
            process: process_info_to_wire(p),
        },
        ops::ProcessEvent::Stdout(b) => api::ProcessEvent::Stdout {
            data_b64: BASE64.encode(b),
        },
        ops::ProcessEvent::Stderr(b) => api::ProcessEvent::Stderr {
            data_b64: BASE64.encode(b),
        },
        ops::ProcessEvent::Pty(b) => api::ProcessEvent::Pty {
            data_b64: BASE64.encode(b),
        },
        ops::ProcessEvent::Dropped(n) => api::ProcessEvent::Dropped { bytes: *n },
        ops::ProcessEvent::Quiet => return None,
    })
}

/// The last line of a process stream: how it ended, or why following broke
/// off.
pub fn process_end_to_wire(r: &Result<ops::ExecOutcome, ops::OpError>) -> api::ProcessEvent {
    match r {
        Ok(o) => api::ProcessEvent::Exit(process_exit_to_wire(o)),
        Err(e) => api::ProcessEvent::Error(ApiError::Op(e.clone()).body()),
    }
}

/// What a stream line means to a follower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessLine {
    /// An event to hand on.
    Event(ops::ProcessEvent),
    /// The process ended.
    Exit(ops::ExecOutcome),
    /// Following failed.
    Error(ops::OpError),
}

/// Reads one stream line.
pub fn process_line_from_wire(e: api::ProcessEvent) -> Result<ProcessLine, String> {
    let data = |b64: &str| {
        BASE64
            .decode(b64)
            .map_err(|e| format!("bad base64 in a process stream: {e}"))
    };
    Ok(match e {
        api::ProcessEvent::Started { process } => {
            ProcessLine::Event(ops::ProcessEvent::Started(process_info_from_wire(process)))
        }
        api::ProcessEvent::Stdout { data_b64 } => {
            ProcessLine::Event(ops::ProcessEvent::Stdout(data(&data_b64)?))
        }
        api::ProcessEvent::Stderr { data_b64 } => {
            ProcessLine::Event(ops::ProcessEvent::Stderr(data(&data_b64)?))
        }
        api::ProcessEvent::Pty { data_b64 } => {
            ProcessLine::Event(ops::ProcessEvent::Pty(data(&data_b64)?))
        }
        api::ProcessEvent::Dropped { bytes } => {
            ProcessLine::Event(ops::ProcessEvent::Dropped(bytes))
        }
        api::ProcessEvent::Exit(x) => ProcessLine::Exit(process_exit_from_wire(&x)),
        api::ProcessEvent::Error(body) => ProcessLine::Error(super::op_error(500, &body)),
    })
}

/// An error body as a process stream's last line would carry it.
pub fn error_body(e: &ops::OpError) -> ErrorBody {
    ApiError::Op(e.clone()).body()
}

// ---------------------------------------------------------------- eval

/// An eval's answer on the wire, with the legacy fields filled in as the
/// runtime forkd grew from filled them (`result`, `error` as the traceback,
/// `exit_code` 0 or 1).
pub fn eval_to_wire(o: &ops::EvalOutcome) -> api::EvalResponse {
    let failed = o.error.is_some() || o.timed_out;
    let error = match (&o.error, o.timed_out) {
        (Some(e), _) => Some(e.traceback.clone()),
        (None, true) => Some("TimeoutError: the code ran past its timeout".to_string()),
        (None, false) => None,
    };
    api::EvalResponse {
        result: if failed { None } else { o.value.clone() },
        error,
        exit_code: i64::from(failed),
        stdout: o.stdout.clone(),
        stderr: o.stderr.clone(),
        exception: o.error.as_ref().map(|e| api::EvalException {
            name: e.name.clone(),
            value: e.value.clone(),
            traceback: e.traceback.clone(),
        }),
        execution_count: o.execution_count,
        timed_out: o.timed_out,
        duration_ms: o.duration_ms,
    }
}

/// An eval's answer from the wire.
pub fn eval_from_wire(r: api::EvalResponse) -> ops::EvalOutcome {
    ops::EvalOutcome {
        value: r.result,
        stdout: r.stdout,
        stderr: r.stderr,
        error: r.exception.map(|e| ops::EvalError {
            name: e.name,
            value: e.value,
            traceback: e.traceback,
        }),
        execution_count: r.execution_count,
        timed_out: r.timed_out,
        duration_ms: r.duration_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: ops::FileKind) -> ops::FileInfo {
        ops::FileInfo {
            name: "a b".into(),
            path: "/tmp/a b".into(),
            kind,
            size: 3,
            mode: 0o4755,
            permissions: "-rwsr-xr-x".into(),
            owner: "user".into(),
            group: "1000".into(),
            modified_ns: 1_700_000_000_123_456_789,
            symlink_target: (kind == ops::FileKind::Symlink).then(|| "/etc".into()),
        }
    }

    #[test]
    fn files_and_events_survive_the_wire() {
        for kind in [
            ops::FileKind::File,
            ops::FileKind::Dir,
            ops::FileKind::Symlink,
            ops::FileKind::Other,
        ] {
            let f = info(kind);
            let json = serde_json::to_value(file_info_to_wire(&f)).unwrap();
            let back: api::FileInfo = serde_json::from_value(json).unwrap();
            assert_eq!(file_info_from_wire(back), f);
        }
        for kind in [
            ops::FsEventKind::Create,
            ops::FsEventKind::Write,
            ops::FsEventKind::Remove,
            ops::FsEventKind::Rename,
            ops::FsEventKind::Chmod,
        ] {
            let e = ops::FsEvent {
                name: "x/y".into(),
                kind,
            };
            assert_eq!(fs_event_from_wire(fs_event_to_wire(&e)), e);
        }
        let t = ops::TarSummary {
            bytes: 10240,
            entries: 3,
        };
        assert_eq!(tar_from_wire(&tar_to_wire(&t)), t);
    }

    #[test]
    fn processes_survive_the_wire() {
        let spec = ops::ProcessSpec {
            argv: vec!["sh".into(), "-c".into(), "cat".into()],
            env: vec![("A".into(), "1".into())],
            cwd: Some("/tmp".into()),
            user: Some("user".into()),
            stdin: true,
            pty: Some(ops::PtySize { cols: 80, rows: 24 }),
            tag: Some("web".into()),
            timeout: Some(Duration::from_secs(5)),
        };
        assert_eq!(process_spec_from_wire(process_spec_to_wire(&spec)), spec);
        let p = ops::ProcessInfo {
            pid: 7,
            tag: Some("web".into()),
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: "/tmp".into(),
            user: "user".into(),
            pty: false,
            stdin: true,
            started_unix_ms: 5,
            exit: Some(ops::ExecOutcome {
                code: None,
                signal: Some(9),
                timed_out: false,
                duration_ms: 3,
            }),
        };
        let events = [
            ops::ProcessEvent::Started(p.clone()),
            ops::ProcessEvent::Stdout(b"out\n".to_vec()),
            ops::ProcessEvent::Stderr(vec![0, 255]),
            ops::ProcessEvent::Pty(b"\x1b[0m".to_vec()),
            ops::ProcessEvent::Dropped(4096),
        ];
        for e in events {
            let line = serde_json::to_string(&process_event_to_wire(&e).unwrap()).unwrap();
            let back: api::ProcessEvent = serde_json::from_str(&line).unwrap();
            assert_eq!(process_line_from_wire(back).unwrap(), ProcessLine::Event(e));
        }
        let end = process_end_to_wire(&Ok(p.exit.unwrap()));
        assert_eq!(
            process_line_from_wire(end).unwrap(),
            ProcessLine::Exit(p.exit.unwrap())
        );
        assert_eq!(process_event_to_wire(&ops::ProcessEvent::Quiet), None);
        let err = ops::OpError::bad_input("no such process");
        match process_line_from_wire(process_end_to_wire(&Err(err.clone()))).unwrap() {
            ProcessLine::Error(e) => assert_eq!((e.kind, e.message), (err.kind, err.message)),
            other => panic!("{other:?}"),
        }
        assert!(process_segment(&ops::ProcessRef::Tag("12".into())).is_err());
        assert_eq!(process_segment(&ops::ProcessRef::Pid(12)).unwrap(), "12");
    }

    #[test]
    fn eval_keeps_the_legacy_fields() {
        let ok = ops::EvalOutcome {
            value: Some("3".into()),
            stdout: "hi\n".into(),
            stderr: String::new(),
            error: None,
            execution_count: 2,
            timed_out: false,
            duration_ms: 4,
        };
        let w = eval_to_wire(&ok);
        assert_eq!(
            (w.result.as_deref(), w.error, w.exit_code),
            (Some("3"), None, 0)
        );
        assert_eq!(eval_from_wire(eval_to_wire(&ok)), ok);
        let raised = ops::EvalOutcome {
            value: None,
            error: Some(ops::EvalError {
                name: "NameError".into(),
                value: "name 'x' is not defined".into(),
                traceback: "Traceback ...\nNameError: name 'x' is not defined".into(),
            }),
            ..ok.clone()
        };
        let w = eval_to_wire(&raised);
        assert_eq!(w.exit_code, 1);
        assert!(w.error.unwrap().ends_with("is not defined"));
        assert_eq!(eval_from_wire(eval_to_wire(&raised)), raised);
    }

    #[test]
    fn queries_are_escaped() {
        assert_eq!(query_value("/tmp/a b&c"), "/tmp/a%20b%26c");
        let opts = ops::WriteOptions {
            mode: Some(0o600),
            parents: Some(false),
            user: Some("user".into()),
        };
        assert_eq!(
            raw_write_query("/x y", &opts),
            "path=/x%20y&mode=384&mkdir=false&user=user"
        );
        assert_eq!(path_query("/a", None), "path=/a");
    }
}
