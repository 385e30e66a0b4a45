//! The operations inside a sandbox, over the daemon's file, watch and
//! process routes. Files move raw (`application/octet-stream`) and tar
//! streams as `application/x-tar`, both streamed in each direction; process
//! output arrives as NDJSON lines.

use std::io::{self, Read, Write};
use std::time::Duration;

use forkd_api::convert::{self, ProcessLine};
use forkd_api::types as api;
use forkd_ops::{
    ExecOutcome, FileInfo, FsEvent, OpError, ProcessEvent, ProcessInfo, ProcessRef, ProcessSpec,
    PtySize, TarSummary, WriteOptions,
};
use serde_json::json;

use crate::tarcount::TarCounter;
use crate::{segment, to_value, Client, ClientError};

/// Copies `data` into the body's writer until the end, an error reading
/// `data` (returned, and passed on to the body), or the daemon no longer
/// reading (it answered early).
fn pump(data: &mut dyn Read, mut writer: crate::pipe::PipeWriter) -> Option<io::Error> {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match data.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                if writer.write_all(&buf[..n]).is_err() {
                    return None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                writer.fail(e);
                return Some(copy);
            }
        }
    }
}

impl Client {
    fn sandbox_path(&self, id: &str, rest: &str) -> Result<String, OpError> {
        segment("id", id)?;
        Ok(format!("/v1/sandboxes/{id}{rest}"))
    }

    /// Sends `data` as a streamed body; returns the answer once the daemon
    /// has read it all (or answered early). `data` is read on this thread
    /// while another sends, so it need not be `Send`.
    fn upload(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        data: &mut dyn Read,
    ) -> Result<crate::Answer, OpError> {
        let (reader, writer) = crate::pipe::pipe(4);
        let body = reqwest::blocking::Body::new(reader);
        let (answer, read_error) = std::thread::scope(|s| {
            let sender = s.spawn(|| -> Result<crate::Answer, ClientError> {
                let resp = self.send_body(method, path, content_type, body)?;
                let status = resp.status().as_u16();
                let body = resp.bytes().map_err(|e| self.transport(e))?.to_vec();
                Ok(crate::Answer { status, body })
            });
            // `pump` owns the writer: when it returns, the body has ended.
            let read_error = pump(data, writer);
            (sender.join(), read_error)
        });
        if let Some(e) = read_error {
            return Err(OpError::bad_input(format!("reading what to send: {e}")));
        }
        let answer = answer.map_err(|_| OpError::internal("the upload thread panicked"))?;
        Ok(crate::api_error(answer?)?)
    }

    /// Streams a 2xx body into `out`; an answer that breaks off is an error.
    fn download(&self, path: &str, out: &mut dyn Write) -> Result<u64, OpError> {
        let mut resp = self.send("GET", path, None)?;
        let status = resp.status().as_u16();
        if status >= 400 {
            return Err(self.error_answer(resp));
        }
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            let n = match resp.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(OpError::internal(format!(
                        "the daemon broke the download of {path} off after {total} bytes ({e}); \
                         the guest side failed, see the daemon's log"
                    )))
                }
            };
            out.write_all(&buf[..n])
                .map_err(|e| OpError::internal(format!("writing what arrived: {e}")))?;
            total += n as u64;
        }
    }

    /// Follows an NDJSON process stream to its end.
    fn process_stream(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        on_event: &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<ExecOutcome>, OpError> {
        let mut resp = self.send(method, path, body.map(|b| b.to_string().into_bytes()))?;
        let status = resp.status().as_u16();
        if status >= 400 {
            return Err(self.error_answer(resp));
        }
        let mut reader = io::BufReader::new(&mut resp);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = io::BufRead::read_until(&mut reader, b'\n', &mut line).map_err(|e| {
                OpError::internal(format!("reading the daemon's process stream: {e}"))
            })?;
            if n == 0 {
                return Err(OpError::internal(
                    "the daemon's process stream ended without the process's end",
                ));
            }
            let ev: api::ProcessEvent = serde_json::from_slice(&line).map_err(|e| {
                OpError::internal(format!("the daemon sent a malformed process line: {e}"))
            })?;
            match convert::process_line_from_wire(ev).map_err(OpError::internal)? {
                ProcessLine::Event(ev) => {
                    if !on_event(ev) {
                        // Dropping the answer disconnects; the daemon stops
                        // following and the process goes on.
                        return Ok(None);
                    }
                }
                ProcessLine::Exit(out) => return Ok(Some(out)),
                ProcessLine::Error(e) => return Err(e),
            }
        }
    }

    fn process_path(&self, id: &str, p: &ProcessRef, rest: &str) -> Result<String, OpError> {
        let seg = convert::process_segment(p)?;
        self.sandbox_path(id, &format!("/processes/{seg}{rest}"))
    }

    pub(crate) fn guest_write(
        &self,
        id: &str,
        path: &str,
        opts: &WriteOptions,
        data: &mut dyn Read,
    ) -> Result<u64, OpError> {
        let url = self.sandbox_path(
            id,
            &format!("/files/raw?{}", convert::raw_write_query(path, opts)),
        )?;
        let a = self.upload("PUT", &url, "application/octet-stream", data)?;
        let w: api::FileWritten = serde_json::from_slice(&a.body)
            .map_err(|e| OpError::internal(format!("the daemon's answer to a write: {e}")))?;
        Ok(w.bytes)
    }

    pub(crate) fn guest_read(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        out: &mut dyn Write,
    ) -> Result<u64, OpError> {
        let url = self.sandbox_path(
            id,
            &format!("/files/raw?{}", convert::path_query(path, user)),
        )?;
        self.download(&url, out)
    }

    pub(crate) fn guest_stat(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<FileInfo, OpError> {
        let url = self.sandbox_path(
            id,
            &format!("/files/stat?{}", convert::path_query(path, user)),
        )?;
        let f: api::FileInfo = self.json("GET", &url, None)?;
        Ok(convert::file_info_from_wire(f))
    }

    pub(crate) fn guest_list(
        &self,
        id: &str,
        path: &str,
        depth: u32,
        user: Option<&str>,
    ) -> Result<Vec<FileInfo>, OpError> {
        let url = self.sandbox_path(
            id,
            &format!(
                "/files/list?{}&depth={depth}",
                convert::path_query(path, user)
            ),
        )?;
        let v: Vec<api::FileInfo> = self.json("GET", &url, None)?;
        Ok(v.into_iter().map(convert::file_info_from_wire).collect())
    }

    pub(crate) fn guest_mkdir(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<bool, OpError> {
        let url = self.sandbox_path(id, "/files/mkdir")?;
        let r: api::MkdirResponse =
            self.json("POST", &url, Some(json!({ "path": path, "user": user })))?;
        Ok(r.created)
    }

    pub(crate) fn guest_remove(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
    ) -> Result<(), OpError> {
        let url = self.sandbox_path(id, &format!("/files?{}", convert::path_query(path, user)))?;
        self.call("DELETE", &url, None)?;
        Ok(())
    }

    pub(crate) fn guest_rename(
        &self,
        id: &str,
        from: &str,
        to: &str,
        user: Option<&str>,
    ) -> Result<FileInfo, OpError> {
        let url = self.sandbox_path(id, "/files/rename")?;
        let f: api::FileInfo = self.json(
            "POST",
            &url,
            Some(json!({ "from": from, "to": to, "user": user })),
        )?;
        Ok(convert::file_info_from_wire(f))
    }

    pub(crate) fn guest_copy_in(
        &self,
        id: &str,
        dir: &str,
        user: Option<&str>,
        tar: &mut dyn Read,
    ) -> Result<TarSummary, OpError> {
        let url = self.sandbox_path(
            id,
            &format!("/files/tar?{}", convert::path_query(dir, user)),
        )?;
        let a = self.upload("PUT", &url, "application/x-tar", tar)?;
        let t: api::TarSummary = serde_json::from_slice(&a.body)
            .map_err(|e| OpError::internal(format!("the daemon's answer to an unpack: {e}")))?;
        Ok(convert::tar_from_wire(&t))
    }

    pub(crate) fn guest_copy_out(
        &self,
        id: &str,
        path: &str,
        user: Option<&str>,
        tar: &mut dyn Write,
    ) -> Result<TarSummary, OpError> {
        let url = self.sandbox_path(
            id,
            &format!("/files/tar?{}", convert::path_query(path, user)),
        )?;
        let mut counter = TarCounter::new(tar);
        self.download(&url, &mut counter)?;
        Ok(TarSummary {
            bytes: counter.bytes(),
            entries: counter.entries(),
        })
    }

    pub(crate) fn guest_watch(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
        user: Option<&str>,
    ) -> Result<u32, OpError> {
        let url = self.sandbox_path(id, "/watches")?;
        let w: api::WatchCreated = self.json(
            "POST",
            &url,
            Some(json!({ "path": path, "recursive": recursive, "user": user })),
        )?;
        Ok(w.watch)
    }

    pub(crate) fn guest_watch_events(
        &self,
        id: &str,
        watch: u32,
        wait: Duration,
    ) -> Result<Vec<FsEvent>, OpError> {
        let wait_ms = wait.as_millis().min(u128::from(api::MAX_WATCH_WAIT_MS));
        let url = self.sandbox_path(id, &format!("/watches/{watch}?wait_ms={wait_ms}"))?;
        let v: Vec<api::FsEvent> = self.json("GET", &url, None)?;
        Ok(v.into_iter().map(convert::fs_event_from_wire).collect())
    }

    pub(crate) fn guest_unwatch(&self, id: &str, watch: u32) -> Result<(), OpError> {
        let url = self.sandbox_path(id, &format!("/watches/{watch}"))?;
        self.call("DELETE", &url, None)?;
        Ok(())
    }

    pub(crate) fn guest_run(
        &self,
        id: &str,
        spec: &ProcessSpec,
        on_event: &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<ExecOutcome>, OpError> {
        let url = self.sandbox_path(id, "/processes")?;
        let body = to_value(convert::process_spec_to_wire(spec));
        self.process_stream("POST", &url, Some(&body), on_event)
    }

    pub(crate) fn guest_follow(
        &self,
        id: &str,
        process: &ProcessRef,
        replay: bool,
        on_event: &mut dyn FnMut(ProcessEvent) -> bool,
    ) -> Result<Option<ExecOutcome>, OpError> {
        let url = self.process_path(id, process, &format!("/stream?replay={replay}"))?;
        self.process_stream("GET", &url, None, on_event)
    }

    pub(crate) fn guest_input(
        &self,
        id: &str,
        process: &ProcessRef,
        data: &[u8],
        close: bool,
    ) -> Result<(), OpError> {
        use base64::Engine as _;
        let url = self.process_path(id, process, "/input")?;
        // One request carries at most this much; more goes in several.
        const PIECE: usize = 512 << 10;
        let mut pieces: Vec<&[u8]> = data.chunks(PIECE).collect();
        if pieces.is_empty() {
            pieces.push(&[]);
        }
        let last = pieces.len() - 1;
        for (i, piece) in pieces.into_iter().enumerate() {
            let body = json!({
                "data_b64": forkd_api::validate::BASE64.encode(piece),
                "close": close && i == last,
            });
            self.call("POST", &url, Some(&body))?;
        }
        Ok(())
    }

    pub(crate) fn guest_signal(
        &self,
        id: &str,
        process: &ProcessRef,
        signal: i32,
    ) -> Result<(), OpError> {
        let url = self.process_path(id, process, "/signal")?;
        self.call("POST", &url, Some(&json!({ "signal": signal })))?;
        Ok(())
    }

    pub(crate) fn guest_resize(
        &self,
        id: &str,
        process: &ProcessRef,
        size: PtySize,
    ) -> Result<(), OpError> {
        let url = self.process_path(id, process, "/resize")?;
        self.call(
            "POST",
            &url,
            Some(&json!({ "cols": size.cols, "rows": size.rows })),
        )?;
        Ok(())
    }

    pub(crate) fn guest_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, OpError> {
        let url = self.sandbox_path(id, "/processes")?;
        let v: Vec<api::ProcessInfo> = self.json("GET", &url, None)?;
        Ok(v.into_iter().map(convert::process_info_from_wire).collect())
    }
}
