//! Test support: a real `docker-registry` (Debian's distribution 2.8) on a
//! free loopback port with its own config and storage, optionally behind
//! htpasswd Basic auth or a bearer-token server, and builders for sparse
//! files and OCI images.

#![allow(dead_code)]

pub mod image;
pub mod token;

use std::fs::{self, File};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forkd_oci::{ClientOptions, Credentials, Digest, Registry};

pub const USER: &str = "alice";
pub const PASSWORD: &str = "correct horse";

/// How the registry authenticates.
pub enum Auth {
    None,
    Htpasswd,
    /// Bearer tokens from the given token server.
    Token(token::TokenServer),
}

pub struct TestRegistry {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    config: PathBuf,
    pub token: Option<token::TokenServer>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TestRegistry {
    pub fn start(auth: Auth) -> TestRegistry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).unwrap();
        let mut token = None;
        let auth_section = match auth {
            Auth::None => String::new(),
            Auth::Htpasswd => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", USER, PASSWORD])
                    .output()
                    .expect("htpasswd (apt-get install apache2-utils)");
                assert!(out.status.success());
                let file = dir.path().join("htpasswd");
                fs::write(&file, out.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: forkd-test\n    path: {}\n",
                    file.display()
                )
            }
            Auth::Token(server) => {
                let section = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    server.realm(),
                    token::SERVICE,
                    token::ISSUER,
                    server.cert_path().display()
                );
                token = Some(server);
                section
            }
        };
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: forkd-test-secret\n{auth_section}",
                storage.display()
            ),
        )
        .unwrap();
        let mut registry = TestRegistry {
            child: None,
            port,
            dir,
            config,
            token,
        };
        registry.run();
        registry
    }

    fn run(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Kills the registry (SIGKILL), as a crash or a network cut would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn options(&self, credentials: Option<Credentials>) -> ClientOptions {
        ClientOptions {
            insecure: true,
            credentials,
            docker_config: false,
            timeout: Duration::from_secs(20),
            ..ClientOptions::default()
        }
    }

    pub fn client(&self, credentials: Option<Credentials>) -> Registry {
        Registry::new(&self.host(), self.options(credentials)).unwrap()
    }

    /// Where the registry keeps the bytes of a blob.
    pub fn blob_data(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn creds() -> Credentials {
    Credentials::new(USER, PASSWORD)
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse "RAM image": `size` bytes, data in every other `region` (with
/// some half-text, half-noise content so it compresses a bit), holes between.
pub fn sparse_ram(path: &Path, size: u64, region: u64, seed: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut offset = 0;
    let mut i = 0;
    while offset < size {
        if i % 2 == 0 {
            let len = region.min(size - offset) as usize;
            let mut data = noise(len, seed + i);
            for (j, b) in data.iter_mut().enumerate() {
                if (j / 512) % 2 == 0 {
                    *b = b"forkd "[j % 6];
                }
            }
            f.write_all_at(&data, offset).unwrap();
        }
        offset += region;
        i += 1;
    }
}

/// Rewrites `fraction` of the 4 KiB pages that hold data in `path` (every
/// n-th data page, so the changes are spread out) with new noise.
pub fn change_pages(path: &Path, every: u64, seed: u64) -> u64 {
    let f = File::options().read(true).write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut page = vec![0u8; 4096];
    let mut changed = 0;
    let mut data_pages = 0u64;
    for p in 0..size / 4096 {
        f.read_exact_at(&mut page, p * 4096).unwrap();
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        data_pages += 1;
        if data_pages.is_multiple_of(every) {
            f.write_all_at(&noise(4096, seed + p), p * 4096).unwrap();
            changed += 1;
        }
    }
    changed
}

pub fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(path).unwrap().read_to_end(&mut v).unwrap();
    v
}
