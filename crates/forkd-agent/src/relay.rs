//! TCP relays: the host reaches `127.0.0.1:PORT` inside the guest over the
//! agent channel (`TcpConnect`), e.g. E2B's code interpreter on port 49999,
//! without guest networking or port forwards.
//!
//! One thread copies the guest socket to the host (windowed `Data` frames,
//! an empty one at the socket's EOF), the request's own thread copies the
//! host's frames to the socket (an empty frame shuts the socket's writing
//! side). The relay ends when both directions have, or when it is cancelled
//! (the socket is shut both ways at once).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use forkd_protocol::{ErrorCode, ErrorReply, Event, Kind, Response};

use crate::session::{Recv, Stream};

/// Connect timeout when the request names none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one `TcpConnect` on `stream`; returns its last response.
pub fn relay(stream: &Arc<Stream>, port: u16, timeout_ms: Option<u64>) -> Response {
    let timeout = timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(CONNECT_TIMEOUT)
        .max(Duration::from_millis(1));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let sock = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return Response::Error(connect_error(port, &e)),
    };
    let _ = sock.set_nodelay(true);
    let (reader, shutter) = match (sock.try_clone(), sock.try_clone()) {
        (Ok(r), Ok(s)) => (r, s),
        (Err(e), _) | (_, Err(e)) => {
            return Response::Error(ErrorReply::new(ErrorCode::Io, format!("relay socket: {e}")))
        }
    };
    stream.on_cancel(Box::new(move || {
        let _ = shutter.shutdown(Shutdown::Both);
    }));
    stream.send_event(&Event::Connected);

    let received = Arc::new(AtomicU64::new(0));
    let to_host = {
        let (stream, received) = (Arc::clone(stream), Arc::clone(&received));
        std::thread::Builder::new()
            .name("relay-out".into())
            .spawn(move || guest_to_host(reader, &stream, &received))
    };
    let sent = host_to_guest(sock, stream);
    if let Ok(h) = to_host {
        let _ = h.join();
    }
    Response::RelayClosed {
        sent,
        received: received.load(Ordering::Relaxed),
    }
}

fn connect_error(port: u16, e: &io::Error) -> ErrorReply {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorReply::new(
            ErrorCode::ConnectionRefused,
            format!("port {port} is not open in the guest (nothing listens on 127.0.0.1:{port})"),
        ),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrorReply::new(
            ErrorCode::TimedOut,
            format!("connecting to 127.0.0.1:{port} in the guest timed out"),
        ),
        _ => ErrorReply::new(
            ErrorCode::Io,
            format!("connecting to 127.0.0.1:{port} in the guest: {e}"),
        ),
    }
}

fn guest_to_host(mut sock: TcpStream, stream: &Stream, received: &AtomicU64) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match sock.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            // EOF (or a reset): tell the host this direction is done.
            if !stream.is_cancelled() {
                let _ = stream.send_data(Kind::Data, &[]);
            }
            return;
        }
        received.fetch_add(n as u64, Ordering::Relaxed);
        if stream.send_data(Kind::Data, &buf[..n]).is_err() {
            return;
        }
    }
}

/// Copies the host's frames to the socket; returns the bytes written.
fn host_to_guest(mut sock: TcpStream, stream: &Stream) -> u64 {
    let mut sent = 0u64;
    loop {
        match stream.recv(None) {
            Recv::Data(d) => {
                if sock.write_all(&d).is_err() {
                    // The guest side is gone; its reader sees the end too.
                    let _ = sock.shutdown(Shutdown::Both);
                    return sent;
                }
                sent += d.len() as u64;
            }
            Recv::Eof => {
                let _ = sock.shutdown(Shutdown::Write);
                return sent;
            }
            Recv::Cancelled | Recv::Idle => {
                let _ = sock.shutdown(Shutdown::Both);
                return sent;
            }
        }
    }
}
