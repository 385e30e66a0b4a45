//! The routes inside a sandbox beyond `exec`: files, tar streams, watches
//! and processes the guest keeps. Like every route, each one decodes, calls
//! the operations seam and encodes; the streaming ones run the operation
//! through [`crate::pipe`].

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use forkd_api::convert;
use forkd_api::types::{
    parse_process, FileContent, FileReadQuery, FileWriteRequest, FileWritten, FollowQuery,
    ListQuery, MkdirRequest, MkdirResponse, PathQuery, ProcessInputRequest, ProcessStartRequest,
    PtySize, RawWriteQuery, RenameRequest, SignalRequest, WatchCreated, WatchPollQuery,
    WatchRequest,
};
use forkd_api::{decode_json, decode_query, ApiError, Validate};
use forkd_core::Fleet;
use forkd_ops::{OpError, Operations, ProcessEvent, ProcessRef};

use crate::ops::{Daemon, Reply};
use crate::pipe::{self, Sink};

/// Largest file a JSON read answers with (its base64 is a third larger);
/// bigger files are read raw.
pub const MAX_JSON_READ: u64 = 48 << 20;

/// What one call brought.
pub struct Input<'a> {
    pub params: &'a HashMap<&'static str, String>,
    pub query: Option<&'a str>,
    pub body: &'a [u8],
    pub body_limit: usize,
    /// The streamed body of a route that takes one.
    pub upload: Option<Box<dyn Read + Send>>,
}

impl Input<'_> {
    fn id(&self) -> String {
        self.params.get("id").cloned().unwrap_or_default()
    }

    fn json<T: serde::de::DeserializeOwned + Validate>(&self) -> Result<T, ApiError> {
        decode_json(self.body, self.body_limit)
    }

    fn query<T: serde::de::DeserializeOwned + Validate>(&self) -> Result<T, ApiError> {
        decode_query(self.query)
    }

    fn process(&self) -> Result<ProcessRef, ApiError> {
        let seg = self.params.get("process").map(String::as_str).unwrap_or("");
        parse_process(seg).map(convert::process_ref_from_wire)
    }

    fn watch(&self) -> Result<u32, ApiError> {
        let seg = self.params.get("watch").map(String::as_str).unwrap_or("");
        seg.parse()
            .map_err(|_| ApiError::field("watch", format!("`{seg}` is not a watch id")))
    }
}

/// A writer that refuses to grow past `limit` bytes.
struct Capped {
    buf: Vec<u8>,
    limit: u64,
}

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() as u64 + data.len() as u64 > self.limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                "file too large for a JSON answer",
            ));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn ndjson(v: &impl serde::Serialize) -> Vec<u8> {
    let mut l = serde_json::to_vec(v).expect("events serialise");
    l.push(b'\n');
    l
}

fn process_error_line(e: &OpError) -> Option<Vec<u8>> {
    Some(ndjson(&convert::process_end_to_wire(&Err(e.clone()))))
}

/// Follows a process into a stream: every event a line, then its end.
/// A client that goes away stops the following, not the process.
fn follow_into(
    sink: &mut Sink,
    run: impl FnOnce(
        &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<forkd_ops::ExecOutcome>, OpError>,
) -> Result<(), OpError> {
    let mut gone = false;
    let end = run(&mut |ev| {
        gone = match convert::process_event_to_wire(&ev) {
            Some(line) => !sink.send(ndjson(&line)),
            None => sink.closed(),
        };
        !gone
    })?;
    if let Some(out) = end {
        sink.send(ndjson(&convert::process_end_to_wire(&Ok(out))));
    }
    Ok(())
}

impl Daemon {
    /// Runs a route inside a sandbox; `None` when `op` is not one.
    pub(crate) fn guest_route(
        &self,
        op: &str,
        mut input: Input<'_>,
    ) -> Result<Option<Reply>, ApiError> {
        let id = input.id();
        let ops: &dyn Operations = &*self.fleet;
        let reply = match op {
            "writeFile" => {
                let req: FileWriteRequest = input.json()?;
                let data = req.content()?;
                let n = ops.write_file(
                    &id,
                    &req.path,
                    &convert::write_options_from_wire(&req),
                    &mut &data[..],
                )?;
                Reply::json(
                    200,
                    FileWritten {
                        path: req.path,
                        bytes: n,
                    },
                )
            }
            "readFile" => {
                let q: FileReadQuery = input.query()?;
                let mut out = Capped {
                    buf: Vec::new(),
                    limit: MAX_JSON_READ,
                };
                match ops.read_file(&id, &q.path, q.user.as_deref(), &mut out) {
                    Ok(_) => {}
                    Err(e) if out.buf.len() as u64 + (64 << 10) > MAX_JSON_READ => {
                        return Err(ApiError::Unprocessable(format!(
                            "{} is larger than the {} MiB a JSON answer carries; \
                             read it raw: GET /v1/sandboxes/{id}/files/raw ({})",
                            q.path,
                            MAX_JSON_READ >> 20,
                            e.message
                        )))
                    }
                    Err(e) => return Err(e.into()),
                }
                Reply::json(
                    200,
                    FileContent {
                        path: q.path,
                        content_b64: base64::Engine::encode(&forkd_api::validate::BASE64, &out.buf),
                    },
                )
            }
            "removeFile" => {
                let q: PathQuery = input.query()?;
                ops.remove_path(&id, &q.path, q.user.as_deref())?;
                Reply::Empty(204)
            }
            "uploadFile" => {
                let q: RawWriteQuery = input.query()?;
                let mut body = input.upload.take().ok_or_else(|| {
                    ApiError::Internal("the upload body did not reach the route".into())
                })?;
                let n =
                    ops.write_file(&id, &q.path, &convert::raw_write_from_wire(&q), &mut body)?;
                Reply::json(
                    200,
                    FileWritten {
                        path: q.path,
                        bytes: n,
                    },
                )
            }
            "downloadFile" => {
                let q: PathQuery = input.query()?;
                let fleet = self.fleet.clone();
                self.produce(
                    &id,
                    "download",
                    "application/octet-stream",
                    None,
                    move |id, sink| {
                        fleet_ops(&fleet)
                            .read_file(id, &q.path, q.user.as_deref(), sink)
                            .map(drop)
                    },
                )?
            }
            "statFile" => {
                let q: PathQuery = input.query()?;
                let f = ops.stat(&id, &q.path, q.user.as_deref())?;
                Reply::json(200, convert::file_info_to_wire(&f))
            }
            "listFiles" => {
                let q: ListQuery = input.query()?;
                let depth = q.depth.unwrap_or(forkd_ops::policy::LIST_DEPTH);
                let list = ops.list_dir(&id, &q.path, depth, q.user.as_deref())?;
                Reply::json(
                    200,
                    list.iter()
                        .map(convert::file_info_to_wire)
                        .collect::<Vec<_>>(),
                )
            }
            "makeDir" => {
                let req: MkdirRequest = input.json()?;
                let created = ops.make_dir(&id, &req.path, req.user.as_deref())?;
                Reply::json(
                    200,
                    MkdirResponse {
                        path: req.path,
                        created,
                    },
                )
            }
            "renameFile" => {
                let req: RenameRequest = input.json()?;
                let f = ops.rename_path(&id, &req.from, &req.to, req.user.as_deref())?;
                Reply::json(200, convert::file_info_to_wire(&f))
            }
            "uploadTar" => {
                let q: PathQuery = input.query()?;
                let mut body = input.upload.take().ok_or_else(|| {
                    ApiError::Internal("the upload body did not reach the route".into())
                })?;
                let t = ops.copy_in(&id, &q.path, q.user.as_deref(), &mut body)?;
                Reply::json(200, convert::tar_to_wire(&t))
            }
            "downloadTar" => {
                let q: PathQuery = input.query()?;
                let fleet = self.fleet.clone();
                self.produce(&id, "tar", "application/x-tar", None, move |id, sink| {
                    fleet_ops(&fleet)
                        .copy_out(id, &q.path, q.user.as_deref(), sink)
                        .map(drop)
                })?
            }
            "watchDir" => {
                let req: WatchRequest = input.json()?;
                let watch = ops.watch_dir(&id, &req.path, req.recursive, req.user.as_deref())?;
                Reply::json(201, WatchCreated { watch })
            }
            "pollWatch" => {
                let watch = input.watch()?;
                let q: WatchPollQuery = input.query()?;
                let wait = std::time::Duration::from_millis(q.wait_ms.unwrap_or(0));
                let events = ops.watch_events(&id, watch, wait)?;
                Reply::json(
                    200,
                    events
                        .iter()
                        .map(convert::fs_event_to_wire)
                        .collect::<Vec<_>>(),
                )
            }
            "deleteWatch" => {
                let watch = input.watch()?;
                ops.unwatch(&id, watch)?;
                Reply::Empty(204)
            }
            "startProcess" => {
                let req: ProcessStartRequest = input.json()?;
                let spec = convert::process_spec_from_wire(req);
                let fleet = self.fleet.clone();
                self.produce(
                    &id,
                    "process",
                    "application/x-ndjson",
                    Some(process_error_line),
                    move |id, sink| {
                        follow_into(sink, |on| fleet_ops(&fleet).run_process(id, &spec, on))
                    },
                )?
            }
            "listProcesses" => {
                let list = ops.list_processes(&id)?;
                Reply::json(
                    200,
                    list.iter()
                        .map(convert::process_info_to_wire)
                        .collect::<Vec<_>>(),
                )
            }
            "followProcess" => {
                let process = input.process()?;
                let q: FollowQuery = input.query()?;
                let fleet = self.fleet.clone();
                self.produce(
                    &id,
                    "follow",
                    "application/x-ndjson",
                    Some(process_error_line),
                    move |id, sink| {
                        follow_into(sink, |on| {
                            fleet_ops(&fleet).follow_process(id, &process, q.replay, on)
                        })
                    },
                )?
            }
            "processInput" => {
                let process = input.process()?;
                let req: ProcessInputRequest = input.json()?;
                ops.process_input(&id, &process, &req.data()?, req.close)?;
                Reply::Empty(204)
            }
            "signalProcess" => {
                let process = input.process()?;
                let req: SignalRequest = input.json()?;
                ops.signal_process(&id, &process, req.signal)?;
                Reply::Empty(204)
            }
            "resizeProcess" => {
                let process = input.process()?;
                let size: PtySize = input.json()?;
                ops.resize_process(
                    &id,
                    &process,
                    forkd_ops::PtySize {
                        cols: size.cols,
                        rows: size.rows,
                    },
                )?;
                Reply::Empty(204)
            }
            _ => return Ok(None),
        };
        Ok(Some(reply))
    }

    fn produce<F>(
        &self,
        id: &str,
        what: &str,
        content_type: &'static str,
        late_error: Option<pipe::LateError>,
        op: F,
    ) -> Result<Reply, ApiError>
    where
        F: FnOnce(&str, &mut Sink) -> Result<(), OpError> + Send + 'static,
    {
        let owned = id.to_string();
        let streamed = pipe::produce(
            format!("{what}-{id}"),
            content_type,
            late_error.unwrap_or(|_| None),
            move |sink| op(&owned, sink),
        )?;
        Ok(Reply::Streamed(streamed))
    }
}

fn fleet_ops(f: &Arc<Fleet>) -> &dyn Operations {
    &**f
}
