//! A small blocking HTTP/1.1 client for the daemon, over its UNIX socket or
//! TCP: one request per connection, JSON in and out. Enough for the CLI's
//! `--remote` and for benchmarks; not a general HTTP client.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// Where the daemon is.
#[derive(Debug, Clone)]
pub enum Target {
    Unix(PathBuf),
    /// `host:port`
    Tcp(String),
}

/// Talks to one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
    token: Option<String>,
    timeout: Duration,
}

/// A failed call: transport problems, or the daemon's `{"error": ...}`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent a malformed answer: {0}")]
    Protocol(String),
    /// The daemon answered with an error status.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
}

/// A successful answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Result<Value, ClientError> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

impl Client {
    /// `spec` is a socket path (`/run/forkd.sock`, `unix:/…`) or a URL
    /// (`http://127.0.0.1:8889`).
    pub fn new(spec: &str, token: Option<String>) -> Result<Client, String> {
        let target = if let Some(rest) = spec.strip_prefix("http://") {
            Target::Tcp(rest.trim_end_matches('/').to_string())
        } else if spec.starts_with("https://") {
            return Err("https is not supported; put a TLS proxy in front of the daemon".into());
        } else if let Some(p) = spec.strip_prefix("unix:") {
            Target::Unix(PathBuf::from(p))
        } else if spec.starts_with('/') || spec.starts_with('.') {
            Target::Unix(PathBuf::from(spec))
        } else {
            return Err(format!(
                "`{spec}` is neither a socket path nor an http:// URL"
            ));
        };
        Ok(Client {
            target,
            token,
            timeout: Duration::from_secs(600),
        })
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Unix(p) => p.display().to_string(),
            Target::Tcp(a) => format!("http://{a}"),
        }
    }

    /// Sends one request; `Err(Api)` for 4xx and 5xx answers.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ClientError> {
        let raw = self.raw(method, path, body.map(|b| b.to_string().into_bytes()))?;
        api_error(raw)
    }

    /// Sends one request and passes a 2xx body to `on_data` as it arrives
    /// (for `application/x-ndjson` streams); `Err(Api)` for error statuses.
    pub fn stream(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        on_data: &mut dyn FnMut(&[u8]),
    ) -> Result<u16, ClientError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let raw = self.exchange(method, path, body, Some(on_data))?;
        Ok(api_error(raw)?.status)
    }

    /// Sends one request and returns whatever status came back.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ClientError> {
        self.exchange(method, path, body, None)
    }

    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        on_data: Option<&mut OnData<'_>>,
    ) -> Result<Answer, ClientError> {
        let connect_err = |source| ClientError::Connect {
            target: self.describe(),
            source,
        };
        let (mut stream, host): (Box<dyn ReadWrite>, String) = match &self.target {
            Target::Unix(p) => {
                let s = UnixStream::connect(p).map_err(connect_err)?;
                s.set_read_timeout(Some(self.timeout))?;
                (Box::new(s), "localhost".into())
            }
            Target::Tcp(a) => {
                let s = std::net::TcpStream::connect(a).map_err(connect_err)?;
                s.set_read_timeout(Some(self.timeout))?;
                s.set_nodelay(true)?;
                (Box::new(s), a.clone())
            }
        };
        let body = body.unwrap_or_default();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        if let Some(t) = &self.token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        head.push_str("\r\n");
        let sent = stream
            .write_all(head.as_bytes())
            .and_then(|_| stream.write_all(&body))
            .and_then(|_| stream.flush());
        // The daemon may answer (413) and close before taking the whole
        // body: its answer is still there to read.
        match (sent, read_response(BufReader::new(stream), on_data)) {
            (_, Ok(answer)) => Ok(answer),
            (Err(e), Err(_)) => Err(e.into()),
            (Ok(()), Err(e)) => Err(e),
        }
    }
}

/// `Err(Api)` with the daemon's message for 4xx and 5xx answers.
fn api_error(raw: Answer) -> Result<Answer, ClientError> {
    if raw.status >= 400 {
        let message = serde_json::from_slice::<Value>(&raw.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&raw.body).into_owned());
        return Err(ClientError::Api {
            status: raw.status,
            message,
        });
    }
    Ok(raw)
}

/// Receives a streamed body as it arrives.
type OnData<'a> = dyn FnMut(&[u8]) + 'a;

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Reads one response. With `on_data`, a 2xx body goes to it as it arrives
/// instead of into [`Answer::body`].
fn read_response(
    mut r: impl BufRead,
    mut on_data: Option<&mut OnData<'_>>,
) -> Result<Answer, ClientError> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("status line {line:?}")))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse().ok();
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    let streaming = status < 300;
    let mut deliver = |body: &mut Vec<u8>, bytes: &[u8]| match on_data.as_mut() {
        Some(f) if streaming => f(bytes),
        _ => body.extend_from_slice(bytes),
    };
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| ClientError::Protocol(format!("chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0u8; size];
            r.read_exact(&mut chunk)?;
            deliver(&mut body, &chunk);
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        let mut all = vec![0u8; n];
        r.read_exact(&mut all)?;
        deliver(&mut body, &all);
    } else {
        let mut all = Vec::new();
        r.read_to_end(&mut all)?;
        deliver(&mut body, &all);
    }
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_response_all(bytes: &[u8]) -> Result<Answer, ClientError> {
        read_response(bytes, None)
    }

    #[test]
    fn chunks_are_delivered_as_they_come() {
        let mut seen = Vec::new();
        let a = read_response(
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"[..],
            Some(&mut |b: &[u8]| seen.push(b.to_vec())),
        )
        .unwrap();
        assert_eq!((a.status, a.body.len()), (200, 0));
        assert_eq!(seen, [b"abc".to_vec(), b"de".to_vec()]);
        // An error body is kept for the message, not streamed.
        let a = read_response(
            &b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}"[..],
            Some(&mut |_: &[u8]| panic!("streamed an error")),
        )
        .unwrap();
        assert_eq!(a.body, b"{}");
    }

    #[test]
    fn responses_with_length_chunks_or_neither_are_read() {
        let a =
            read_response_all(&b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}"[..]).unwrap();
        assert_eq!((a.status, &a.body[..]), (201, &b"{}"[..]));
        let a = read_response_all(&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"[..],
        )
        .unwrap();
        assert_eq!(a.body, b"abcde");
        let a = read_response_all(&b"HTTP/1.1 204 No Content\r\n\r\n"[..]).unwrap();
        assert_eq!((a.status, a.body.len()), (204, 0));
        assert!(read_response_all(&b"garbage\r\n\r\n"[..]).is_err());
    }

    #[test]
    fn targets_are_parsed() {
        assert!(matches!(
            Client::new("/run/f.sock", None).unwrap().target,
            Target::Unix(_)
        ));
        assert!(matches!(
            Client::new("http://127.0.0.1:8889/", None).unwrap().target,
            Target::Tcp(ref a) if a == "127.0.0.1:8889"
        ));
        assert!(Client::new("https://x", None).is_err());
        assert!(Client::new("nonsense", None).is_err());
    }
}
