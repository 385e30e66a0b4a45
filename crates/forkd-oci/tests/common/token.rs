//! A tiny bearer-token server for the registry's `auth: token` mode: checks
//! Basic credentials, grants the scopes asked for, and signs an RS256 JWT
//! whose `x5c` header carries a self-signed certificate the registry trusts
//! (its `rootcertbundle`). Keys, certificate and signatures come from the
//! `openssl` command.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;

pub const SERVICE: &str = "forkd-test-registry";
pub const ISSUER: &str = "forkd-test-issuer";

pub struct TokenServer {
    port: u16,
    dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    pub issued: Arc<AtomicUsize>,
    pub refused: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

fn openssl(args: &[&str], dir: &Path, stdin: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl TokenServer {
    pub fn start() -> TokenServer {
        let dir = tempfile::tempdir().unwrap();
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-subj",
                "/CN=forkd-test-token",
                "-days",
                "2",
            ],
            dir.path(),
            b"",
        );
        let der = openssl(
            &["x509", "-in", "cert.pem", "-outform", "DER"],
            dir.path(),
            b"",
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let (stop2, issued2, refused2) = (stop.clone(), issued.clone(), refused.clone());
        let key_dir = dir.path().to_owned();
        let x5c = base64::engine::general_purpose::STANDARD.encode(der);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                match serve(stream, &key_dir, &x5c) {
                    Ok(true) => issued2.fetch_add(1, Ordering::SeqCst),
                    _ => refused2.fetch_add(1, Ordering::SeqCst),
                };
            }
        });
        TokenServer {
            port,
            dir,
            stop,
            issued,
            refused,
            thread: Some(thread),
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Answers one request; true when a token was issued.
fn serve(mut stream: TcpStream, key_dir: &Path, x5c: &str) -> std::io::Result<bool> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 64 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        request.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&request).into_owned();
    let target = text.split_whitespace().nth(1).unwrap_or("");
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let expected = format!(
        "basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            super::USER,
            super::PASSWORD
        ))
    );
    let authorized = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .any(|(k, v)| {
            k.eq_ignore_ascii_case("authorization") && v.trim().eq_ignore_ascii_case(&expected)
        });
    if !authorized {
        let body =
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"token server: bad credentials"}]}"#;
        write!(stream, "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
        return Ok(false);
    }
    let mut access = Vec::new();
    for pair in query.split('&') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        if k != "scope" {
            continue;
        }
        let scope = percent_decode(v);
        let mut parts = scope.splitn(3, ':');
        let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let actions: Vec<&str> = actions.split(',').collect();
        access.push(serde_json::json!({"type": kind, "name": name, "actions": actions}));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": super::USER, "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": format!("{now}-{}", std::process::id()),
        "access": access,
    });
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = openssl(
        &["dgst", "-sha256", "-sign", "key.pem"],
        key_dir,
        input.as_bytes(),
    );
    let token = format!("{input}.{}", b64url(&signature));
    let body = serde_json::json!({"token": token, "expires_in": 300}).to_string();
    write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    Ok(true)
}
