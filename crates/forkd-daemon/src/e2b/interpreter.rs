//! The code interpreter's port (49999): every route (`/execute`,
//! `/contexts`, `/contexts/{id}/restart`, `DELETE /contexts/{id}`,
//! `/health`) is relayed as it is to the server the guest runs
//! (`crates/forkd-e2b/guest/code_interpreter.py`, started by the agent on
//! first use; the open `/health` only asks a running one). Its contexts are guest processes, so their variables live on
//! between calls and into every fork; `/execute` streams its NDJSON as the
//! cell runs.
//!
//! Why hyper: the guest's server answers HTTP/1.1 with chunked bodies; the
//! relayed connection is a byte stream, and hyper's client connection
//! speaks HTTP over any byte stream, so nothing here parses HTTP by hand.
//! The seam's [`PortConn`] is blocking; two blocking threads pump it to and
//! from an in-memory duplex pipe that hyper drives.

use std::io::{Read, Write};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::response::Response;
use forkd_e2b::envd::files::error_body;
use forkd_e2b::routes::{RouteMatch, CODE_INTERPRETER_PORT};
use forkd_ops::PortConn;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{blocking, read_body, reply, E2b};

/// Largest request relayed.
const MAX_BODY: usize = 4 << 20;

/// Bytes in flight between the relay and hyper, each way.
const PIPE: usize = 64 << 10;

fn failed(status: u16, message: &str) -> Response {
    reply(status, "application/json", error_body(status, message))
}

/// Relays a code-interpreter route for sandbox `id` (token checked).
pub(crate) async fn dispatch(e2b: Arc<E2b>, id: String, m: RouteMatch, req: Request) -> Response {
    // `/health` needs no token, so it never starts the server: it answers
    // whether one runs.
    let start = m.route.path != "/health";
    let (parts, body) = req.into_parts();
    let body = match read_body(body, MAX_BODY).await {
        Ok(b) => b,
        Err(msg) => return failed(400, &msg),
    };
    let ops = e2b.ops.clone();
    let conn = blocking(move || {
        if start {
            ops.code_interpreter(&id, CODE_INTERPRETER_PORT)?;
        }
        ops.connect_port(&id, CODE_INTERPRETER_PORT)
    })
    .await;
    let conn = match conn {
        Ok(c) => c,
        // The SDK reads a 502 from the sandbox port as "port is not open".
        Err(e) => return failed(502, &format!("port is not open: {}", e.message)),
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let mut out = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(path)
        .header(header::HOST, format!("127.0.0.1:{CODE_INTERPRETER_PORT}"));
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        out = out.header(header::CONTENT_TYPE, ct.clone());
    }
    let out = match out.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return failed(400, &format!("the request cannot be relayed: {e}")),
    };
    let io = pump(conn);
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(io).await {
        Ok(h) => h,
        Err(e) => return failed(502, &format!("the code interpreter did not answer: {e}")),
    };
    tokio::spawn(connection);
    match sender.send_request(out).await {
        Ok(answer) => {
            let (parts, incoming) = answer.into_parts();
            Response::from_parts(parts, Body::new(incoming))
        }
        Err(e) => failed(502, &format!("the code interpreter did not answer: {e}")),
    }
}

/// An async byte stream over the blocking relay: one blocking thread copies
/// what the guest sends into the pipe, another what hyper writes to the
/// guest. Each ends when its source ends or its destination is gone, so a
/// client that goes away ends the relay.
fn pump(conn: PortConn) -> TokioIo<tokio::io::DuplexStream> {
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let (mut from_hyper, mut to_hyper) = tokio::io::split(theirs);
    let PortConn {
        mut reader,
        mut writer,
    } = conn;
    let rt = tokio::runtime::Handle::current();
    let rt2 = rt.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if rt.block_on(to_hyper.write_all(&buf[..n])).is_err() {
                break;
            }
        }
        let _ = rt.block_on(to_hyper.shutdown());
    });
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match rt2.block_on(from_hyper.read(&mut buf)) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if writer
                .write_all(&buf[..n])
                .and_then(|()| writer.flush())
                .is_err()
            {
                break;
            }
        }
    });
    TokioIo::new(ours)
}
