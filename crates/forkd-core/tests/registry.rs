//! Two hosts on one machine (separate homes and runtime directories)
//! sharing snapshots through a real `docker-registry` (Debian's
//! distribution 2.8) on a free loopback port behind htpasswd Basic auth:
//! host A warms a sandbox, branches it live and pushes; host B pulls and
//! spawns children that see A's warm state; A branches again and pushes;
//! B's second pull moves only the chunks that changed. Also: credentials
//! are required and refused when wrong, a corrupt blob is refused with
//! nothing published, and an interrupted pull resumes.

mod common;

use std::fs::{self, File};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forkd_core::{BootOptions, Env, Fleet};
use forkd_ops::{
    BranchMode as Mode, ErrorKind, Operations, PartialFailure, PullRequest, PushRequest,
};

const USER: &str = "alice";
const PASSWORD: &str = "correct horse";

/// A `docker-registry` on 127.0.0.1 with its own storage, behind htpasswd.
struct Registry {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let out = Command::new("htpasswd")
            .args(["-Bbn", USER, PASSWORD])
            .output()
            .expect("htpasswd (apt-get install apache2-utils)");
        assert!(out.status.success());
        fs::write(dir.path().join("htpasswd"), out.stdout).unwrap();
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: forkd-test\nauth:\n  htpasswd:\n    realm: forkd-test\n    path: {}\n",
                dir.path().join("storage").display(),
                dir.path().join("htpasswd").display()
            ),
        )
        .unwrap();
        let log = File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Credentials as `docker login` leaves them.
        let docker = dir.path().join("docker");
        fs::create_dir_all(&docker).unwrap();
        fs::write(docker.join("config.json"), "{}").unwrap();
        Registry {
            child: Some(child),
            port,
            dir,
        }
    }

    fn reference(&self, repo_tag: &str) -> String {
        format!("127.0.0.1:{}/{repo_tag}", self.port)
    }

    /// Writes `config.json` with `password` for this registry.
    fn login(&self, password: &str) {
        fs::write(
            self.dir.path().join("docker").join("config.json"),
            format!(
                r#"{{"auths":{{"127.0.0.1:{}":{{"username":"{USER}","password":"{password}"}}}}}}"#,
                self.port
            ),
        )
        .unwrap();
    }

    /// The chunk blobs in the registry's storage, biggest first.
    fn blobs(&self) -> Vec<PathBuf> {
        let root = self
            .dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256");
        let mut out = Vec::new();
        for a in fs::read_dir(root).unwrap().flatten() {
            for b in fs::read_dir(a.path()).unwrap().flatten() {
                out.push(b.path().join("data"));
            }
        }
        out.sort_by_key(|p| std::cmp::Reverse(fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
        out
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One host: its own home and runtime directory.
struct Host {
    env: Env,
    fleet: Fleet,
}

impl Host {
    fn new(name: &str) -> Host {
        let root =
            std::env::temp_dir().join(format!("forkd-registry-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let env = Env {
            home: root.join("home"),
            runtime: PathBuf::from(format!(
                "/dev/shm/forkd-registry-{name}-{}",
                std::process::id()
            )),
        };
        fs::create_dir_all(&env.home).unwrap();
        let fleet = Fleet::open(&env).unwrap();
        Host { env, fleet }
    }

    fn run(&self, id: &str, script: &str) -> String {
        common::run_ok(&self.fleet, id, script)
    }

    fn push(
        &self,
        tag: &str,
        reference: &str,
    ) -> Result<forkd_ops::PushOutcome, forkd_ops::OpError> {
        Operations::push(
            &self.fleet,
            &PushRequest {
                tag: tag.into(),
                reference: reference.into(),
                insecure: true,
            },
            &|_| {},
        )
    }

    fn pull(&self, reference: &str) -> Result<forkd_ops::PullOutcome, forkd_ops::OpError> {
        Operations::pull(
            &self.fleet,
            &PullRequest {
                reference: reference.into(),
                tag: None,
                insecure: true,
            },
            &|_| {},
        )
    }

    fn spawn(&self, tag: &str, n: usize) -> Vec<String> {
        self.fleet
            .spawn(tag, n, n, true, PartialFailure::Kill, &|_, _| {})
            .unwrap()
            .into_iter()
            .map(|c| c.unwrap().sandbox.id)
            .collect()
    }

    fn tags(&self) -> Vec<String> {
        self.fleet
            .snapshots()
            .unwrap()
            .into_iter()
            .map(|s| s.tag)
            .collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        common::kill_all(&self.fleet);
        let _ = fs::remove_dir_all(self.env.home.parent().unwrap());
        let _ = fs::remove_dir_all(&self.env.runtime);
    }
}

fn under(p: &Path, dir: &Path) -> bool {
    p.starts_with(dir)
}

#[test]
fn two_hosts_share_warm_snapshots_through_a_registry() {
    let registry = Registry::start();
    std::env::set_var("DOCKER_CONFIG", registry.dir.path().join("docker"));
    let a = Host::new("a");
    let b = Host::new("b");
    let v1 = registry.reference("team/agent:v1");
    let v2 = registry.reference("team/agent:v2");

    // Host A warms a sandbox: a file on its disk, a process only in RAM.
    let (src, _) = a
        .fleet
        .create(
            common::artifacts(),
            "busybox",
            &BootOptions {
                mem_mib: 256,
                ..BootOptions::default()
            },
        )
        .unwrap();
    let src = src.id;
    let warm = a.run(
        &src,
        "head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /root/warm; \
         sleep 100000 & echo $! > /root/pid; cat /root/warm",
    );
    let pid = a.run(&src, "cat /root/pid");
    a.fleet
        .branch(&src, "warm1", Mode::Live, true, None)
        .unwrap();

    // No credentials, then wrong ones: refused, saying so.
    let e = a.push("warm1", &v1).unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}");
    registry.login("wrong");
    let e = a.push("warm1", &v1).unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}");
    assert!(e.message.contains("refused the credentials"), "{e}");
    registry.login(PASSWORD);

    let push1 = a.push("warm1", &v1).unwrap();
    eprintln!("push 1: {:?}", push1.counts);
    assert_eq!(push1.snapshots, ["warm1"]);
    assert!(push1.counts.chunks_transferred > 0);
    assert!(push1.counts.zero_bytes > 0, "holes are never sent");

    // Host B: a corrupt chunk is refused and nothing is published.
    let victim = registry.blobs()[0].clone();
    let good = fs::read(&victim).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    fs::write(&victim, &bad).unwrap();
    let e = b.pull(&v1).unwrap_err();
    assert!(e.message.contains("corrupt"), "{e}");
    assert!(b.tags().is_empty(), "a refused pull publishes nothing");
    fs::write(&victim, &good).unwrap();

    // The pull resumes from what the failed one left, then publishes.
    let pull1 = b.pull(&v1).unwrap();
    eprintln!("pull 1: {:?}", pull1.counts);
    assert_eq!(pull1.published, ["warm1"]);
    assert!(
        pull1.counts.chunks_reused > 0,
        "the first attempt's verified chunks are kept"
    );
    // Everything the snapshot needs now lives in B's home.
    let info = b.fleet.snapshot_detail("warm1").unwrap();
    assert!(under(&info.snapshot.dir, &b.env.home));
    let manifest = b.fleet.store().load("warm1").unwrap();
    let machine: forkd_core::fleet::SandboxConfig =
        serde_json::from_value(manifest.machine).unwrap();
    assert!(
        under(&machine.vm.kernel, &b.env.home),
        "{:?}",
        machine.vm.kernel
    );
    assert!(under(&machine.vm.initramfs, &b.env.home));

    // Three children on B see A's warm state: the file and the process.
    for id in b.spawn("warm1", 3) {
        assert_eq!(b.run(&id, "cat /root/warm"), warm);
        b.run(&id, &format!("kill -0 {pid}"));
    }

    // A changes a little and branches again; only the change travels.
    a.run(&src, "head -c 3000000 /dev/urandom > /root/more; sync");
    a.fleet
        .branch(&src, "warm2", Mode::Live, true, None)
        .unwrap();
    let push2 = a.push("warm2", &v2).unwrap();
    eprintln!("push 2: {:?}", push2.counts);
    assert!(push2.counts.chunks_reused > 0);
    assert!(
        push2.counts.bytes_transferred * 3 < push1.counts.bytes_transferred,
        "push 2 sent {} bytes, push 1 {}",
        push2.counts.bytes_transferred,
        push1.counts.bytes_transferred
    );
    let pull2 = b.pull(&v2).unwrap();
    eprintln!("pull 2: {:?}", pull2.counts);
    assert!(
        pull2.counts.bytes_transferred * 3 < pull1.counts.bytes_transferred,
        "pull 2 moved {} bytes, pull 1 {}",
        pull2.counts.bytes_transferred,
        pull1.counts.bytes_transferred
    );
    assert!(pull2.counts.chunks_reused > 0);
    let kid = b.spawn("warm2", 1).remove(0);
    assert_eq!(b.run(&kid, "wc -c < /root/more").trim(), "3000000");
    assert_eq!(b.run(&kid, "cat /root/warm"), warm);

    // Pulling the same thing again moves and publishes nothing.
    let again = b.pull(&v2).unwrap();
    assert!(again.published.is_empty());
    assert_eq!(again.reused.first().map(String::as_str), Some("warm2"));
    assert_eq!(again.counts.bytes_transferred, 0);
    // Under another tag it is refused: one snapshot, one tag.
    let e = Operations::pull(
        &b.fleet,
        &PullRequest {
            reference: v2.clone(),
            tag: Some("other".into()),
            insecure: true,
        },
        &|_| {},
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
    assert!(
        e.message.contains("already has that snapshot, as `warm2`"),
        "{e}"
    );
}
