//! `forkd image build --from` and `forkd create --image` with container
//! images, end to end and offline: the test writes its own image (layers
//! with a static busybox, a whiteout, a 0755 tool, a non-root user, an Env
//! and a WorkingDir) as an OCI layout, an oci-archive and a docker-archive,
//! and pushes a variant to a real `docker-registry` on a free loopback port.
//! One guest boots from the registry image and shows the image's files,
//! Env, WorkingDir and User; a second build of a digest is a cache hit; a
//! corrupt archive or a missing tag fails with a clear error and leaves no
//! image behind. A registry behind Basic auth is read with the credentials
//! of Docker's `config.json`.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::registry::Registry;
use common::World;
use forkd_oci::{ClientOptions, Descriptor, Digest};
use serde_json::{json, Value};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

fn run(w: &World, args: &[&str]) -> Output {
    w.command().args(args).output().unwrap()
}

fn ok_json(w: &World, args: &[&str]) -> (Value, String) {
    let out = run(w, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "forkd {args:?}: {stderr}");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "forkd {args:?}: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (v, stderr)
}

/// One layer tar, built entry by entry.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }
    fn entry(mut self, kind: tar::EntryType, path: &str, data: &[u8], mode: u32, id: u64) -> Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(id);
        h.set_gid(id);
        h.set_mtime(1_700_000_000);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    fn dir(self, path: &str, owner: u64) -> Self {
        self.entry(tar::EntryType::Directory, path, b"", 0o755, owner)
    }
    fn file(self, path: &str, data: &[u8], mode: u32, owner: u64) -> Self {
        self.entry(tar::EntryType::Regular, path, data, mode, owner)
    }
    fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// A two-layer image; `nonce` makes its digest this run's own (built
/// images are shared by the suite's homes) and `greeting` tells variants apart.
struct TestImage {
    layers: Vec<Vec<u8>>,
    config: Vec<u8>,
}

impl TestImage {
    fn new(nonce: &str, greeting: &str) -> TestImage {
        let busybox = fs::read(forkd_guest::find_busybox().unwrap()).unwrap();
        let mut base = Layer::new()
            .dir("bin", 0)
            .file("bin/busybox", &busybox, 0o755, 0);
        for applet in ["sh", "cat", "stat", "id", "pwd", "test", "echo"] {
            base = base.symlink(&format!("bin/{applet}"), "busybox");
        }
        let base = base
            .dir("etc", 0)
            .file(
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
                0o644,
                0,
            )
            .file("etc/group", b"root:x:0:\napp:x:1000:\n", 0o644, 0)
            .file("etc/marker", nonce.as_bytes(), 0o644, 0)
            .dir("data", 0)
            .file("data/gone", b"deleted by the upper layer", 0o644, 0)
            .file("data/kept", b"kept", 0o644, 0)
            .dir("usr", 0)
            .dir("usr/local", 0)
            .dir("usr/local/bin", 0)
            .file(
                "usr/local/bin/tool",
                b"#!/bin/sh\necho tool ran\n",
                0o755,
                0,
            )
            .dir("home", 0)
            .dir("home/app", 1000)
            .dir("srv", 0)
            .dir("srv/app", 1000)
            .finish();
        let upper = Layer::new()
            .file("data/.wh.gone", b"", 0o644, 0)
            .file("srv/app/hello.txt", b"hello from the image", 0o644, 1000)
            .finish();
        let layers = vec![base, upper];
        let diff_ids: Vec<String> = layers.iter().map(|l| Digest::of(l).to_string()).collect();
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/bin:/bin", format!("GREETING={greeting}"), "SHARED=image"],
                "WorkingDir": "/srv/app",
                "User": "app",
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        TestImage { layers, config }
    }

    /// Layer blobs as a registry or layout holds them: the first gzipped.
    fn blobs(&self) -> Vec<(Vec<u8>, &'static str)> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&self.layers[0]).unwrap();
        vec![
            (gz.finish().unwrap(), LAYER_GZIP),
            (self.layers[1].clone(), LAYER_TAR),
        ]
    }

    fn manifest(&self, blobs: &[(Vec<u8>, &'static str)]) -> Vec<u8> {
        let layers: Vec<Descriptor> = blobs
            .iter()
            .map(|(b, mt)| Descriptor::of_bytes(mt, b))
            .collect();
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": Descriptor::of_bytes(OCI_CONFIG, &self.config),
            "layers": layers,
        }))
        .unwrap()
    }

    /// Writes an OCI layout at `dir`; returns the manifest digest.
    fn write_layout(&self, dir: &Path) -> Digest {
        let blobs = self.blobs();
        let manifest = self.manifest(&blobs);
        let dir_blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&dir_blobs).unwrap();
        let put = |b: &[u8]| fs::write(dir_blobs.join(Digest::of(b).hex()), b).unwrap();
        put(&self.config);
        put(&manifest);
        for (b, _) in &blobs {
            put(b);
        }
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = json!({"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": Digest::of(&manifest), "size": manifest.len(),
             "platform": {"architecture": "amd64", "os": "linux"}}]});
        fs::write(dir.join("index.json"), index.to_string()).unwrap();
        Digest::of(&manifest)
    }

    /// A `docker save` tarball; returns the config digest (its image ID).
    fn write_docker_archive(&self, path: &Path) -> Digest {
        let digest = Digest::of(&self.config);
        let mut b = tar::Builder::new(fs::File::create(path).unwrap());
        let mut add = |name: &str, bytes: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, bytes).unwrap();
        };
        let config_name = format!("{}.json", digest.hex());
        add(&config_name, &self.config);
        let mut names = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let name = format!("l{i}/layer.tar");
            add(&name, layer);
            names.push(name);
        }
        add(
            "manifest.json",
            json!([{"Config": config_name, "RepoTags": ["app:v1"], "Layers": names}])
                .to_string()
                .as_bytes(),
        );
        b.finish().unwrap();
        digest
    }

    /// Pushes it to `host` as `repo:tag`; returns the manifest digest.
    fn push(&self, host: &str, repo: &str, tag: &str) -> Digest {
        self.push_as(host, repo, tag, None)
    }

    fn push_as(&self, host: &str, repo: &str, tag: &str, login: Option<(&str, &str)>) -> Digest {
        let registry = forkd_oci::Registry::new(
            host,
            ClientOptions {
                insecure: true,
                docker_config: false,
                credentials: login.map(|(u, p)| forkd_oci::Credentials::new(u, p)),
                ..ClientOptions::default()
            },
        )
        .unwrap();
        let blobs = self.blobs();
        registry
            .ensure_blob(repo, &Digest::of(&self.config), &self.config)
            .unwrap();
        for (b, _) in &blobs {
            registry.ensure_blob(repo, &Digest::of(b), b).unwrap();
        }
        let manifest = self.manifest(&blobs);
        registry
            .put_manifest(repo, tag, OCI_MANIFEST, &manifest)
            .unwrap();
        Digest::of(&manifest)
    }
}

/// A tar of the directory `dir` (an oci-archive of a layout).
fn tar_dir(dir: &Path, path: &Path) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// Files of the images directory that belong to the build of `digest`
/// (the image, its defaults, temporaries and staging trees).
fn traces_of(w: &World, digest: &Digest) -> Vec<PathBuf> {
    let image = forkd_guest::tree::staged_image_path(&w.home, &format!("oci:{digest}"));
    let stem = image.file_stem().unwrap().to_string_lossy().into_owned();
    fs::read_dir(w.home.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&stem))
        .collect()
}

/// Deletes the images a failed run leaves in the suite's shared images
/// directory (a passing run removes them itself, with `image rm`).
struct Leftovers {
    dir: PathBuf,
    names: Vec<String>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = fs::remove_file(self.dir.join(format!("{name}.ext4")));
            let _ = fs::remove_file(self.dir.join(format!("{name}.json")));
        }
    }
}

#[test]
fn container_images_become_root_images_with_their_defaults() {
    let registry = Registry::start();
    let w = World::new("ociimg");
    let nonce = format!(
        "run {} {}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut built = Leftovers {
        dir: w.home.join("images"),
        names: Vec::new(),
    };

    // An OCI layout: unpacked and built, its config kept.
    let image = TestImage::new(&nonce, "from-layout");
    let layout = tmp.path().join("layout");
    let digest = image.write_layout(&layout);
    let from_layout = format!("oci-layout:{}", layout.display());
    let (a, _) = ok_json(&w, &["image", "build", "--from", &from_layout, "--json"]);
    let name = a["image"].as_str().unwrap().to_string();
    assert!(name.starts_with("tree-"), "{a}");
    assert_eq!(a["from"]["digest"], digest.to_string(), "{a}");
    assert_eq!(a["from"]["cached"], false, "{a}");
    assert_eq!(a["from"]["cwd"], "/srv/app", "{a}");
    assert_eq!(a["from"]["user"], "app", "{a}");
    assert_eq!(
        a["from"]["env"][1],
        json!(["GREETING", "from-layout"]),
        "{a}"
    );
    built.names.push(name.clone());

    // The same image as an oci-archive: the same digest, nothing rebuilt.
    let archive = tmp.path().join("image.tar");
    tar_dir(&layout, &archive);
    let (b, stderr) = ok_json(
        &w,
        &[
            "image",
            "build",
            "--from",
            &format!("oci-archive:{}", archive.display()),
            "--json",
        ],
    );
    assert_eq!(b["image"], a["image"], "{b}");
    assert_eq!(b["from"]["cached"], true, "{b}");
    assert!(stderr.contains("built already"), "{stderr}");

    // A docker-archive is keyed by its config digest: an image of its own.
    let docker = tmp.path().join("docker.tar");
    let config_digest = image.write_docker_archive(&docker);
    let (c, _) = ok_json(
        &w,
        &[
            "image",
            "build",
            "--from",
            &format!("docker-archive:{}", docker.display()),
            "--json",
        ],
    );
    assert_eq!(c["from"]["digest"], config_digest.to_string(), "{c}");
    assert_eq!(c["from"]["cached"], false, "{c}");
    assert_ne!(c["image"], a["image"]);
    built.names.push(c["image"].as_str().unwrap().to_string());
    // A one-shot `run` from it, by name, gets its defaults too.
    let (out, _) = ok_json(
        &w,
        &[
            "run",
            "--image",
            c["image"].as_str().unwrap(),
            "--json",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING|$(pwd)|$(id -u)\"",
        ],
    );
    assert_eq!(out["stdout"], "from-layout|/srv/app|1000\n", "{out}");

    // A registry image, built by `create` itself; the create's own env wins
    // over the image's, the exec's own over both.
    let pushed = TestImage::new(&nonce, "from-registry");
    let reference = format!("{}/team/app:v1", registry.host());
    let pushed_digest = pushed.push(&registry.host(), "team/app", "v1");
    let (created, _) = ok_json(
        &w,
        &[
            "create",
            "--image",
            &reference,
            "--insecure",
            "--env",
            "SHARED=create",
            "--json",
        ],
    );
    let id = created["id"].as_str().unwrap().to_string();
    let registry_name = created["image"].as_str().unwrap().to_string();
    assert!(registry_name.starts_with("tree-"), "{created}");
    built.names.push(registry_name.clone());
    let (out, _) = ok_json(
        &w,
        &[
            "exec",
            &id,
            "--json",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING|$SHARED|$(pwd)|$(id -u)\"; cat hello.txt; echo; cat /etc/marker; echo; \
             test -e /data/gone && echo gone-present || echo gone-absent; cat /data/kept; echo; \
             stat -c %a /usr/local/bin/tool; tool",
        ],
    );
    assert_eq!(out["exit_code"], 0, "{out}");
    assert_eq!(
        out["stdout"].as_str().unwrap(),
        format!(
            "from-registry|create|/srv/app|1000\nhello from the image\n{nonce}\ngone-absent\nkept\n755\ntool ran\n"
        ),
        "{out}"
    );
    let (out, _) = ok_json(
        &w,
        &[
            "exec",
            &id,
            "--env",
            "GREETING=exec",
            "--cwd",
            "/",
            "--json",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING|$(pwd)\"",
        ],
    );
    assert_eq!(out["stdout"], "exec|/\n", "{out}");

    // Children of a snapshot of it keep the image's defaults.
    let tag = format!("oci-{}", std::process::id());
    let ok = |args: &[&str]| {
        let out = run(&w, args);
        assert!(
            out.status.success(),
            "forkd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    ok(&["snapshot", &id, "--tag", &tag]);
    let spawned = ok(&["spawn", &tag, "-n", "1"]);
    let child = spawned.split_whitespace().next().unwrap().to_string();
    let (out, _) = ok_json(
        &w,
        &[
            "exec",
            &child,
            "--json",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING|$(pwd)|$(id -u)\"",
        ],
    );
    assert_eq!(out["stdout"], "from-registry|/srv/app|1000\n", "{out}");
    ok(&["kill", &child]);
    ok(&["rmi", &tag]);

    // Through the daemon: a registry reference boots (pulled and built on
    // the daemon's host, here found built); an image in a file on the
    // caller's host, or any path, is refused before anything starts.
    let sock = w.socket.to_str().unwrap().to_string();
    let (remote, _) = ok_json(
        &w,
        &[
            "--remote",
            &sock,
            "create",
            "--image",
            &reference,
            "--insecure",
            "--json",
        ],
    );
    let remote_id = remote["id"].as_str().unwrap().to_string();
    let (out, _) = ok_json(
        &w,
        &[
            "--remote",
            &sock,
            "exec",
            &remote_id,
            "--json",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING|$(pwd)|$(id -u)\"",
        ],
    );
    assert_eq!(out["stdout"], "from-registry|/srv/app|1000\n", "{out}");
    ok(&["kill", &remote_id]);
    let refused = run(&w, &["--remote", &sock, "create", "--image", &from_layout]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("push it to a registry"), "{err}");
    for bad in [
        "oci-archive:/etc/passwd",
        "/srv/root.ext4",
        "docker://./x",
        "a b",
    ] {
        let (status, body) = w.call(
            "POST",
            "/v1/sandboxes/boot",
            Some(serde_json::json!({ "container_image": bad })),
        );
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body.to_string().contains("container_image"),
            "{bad}: {body}"
        );
    }

    // Building the pushed tag again finds the image create built.
    let (d, stderr) = ok_json(
        &w,
        &[
            "image",
            "build",
            "--from",
            &reference,
            "--insecure",
            "--json",
        ],
    );
    assert_eq!(d["image"].as_str(), Some(registry_name.as_str()), "{d}");
    assert_eq!(d["from"]["digest"], pushed_digest.to_string(), "{d}");
    assert_eq!(d["from"]["cached"], true, "{d}");
    assert!(stderr.contains("built already"), "{stderr}");
    let (ls, _) = ok_json(&w, &["image", "ls", "--json"]);
    let entry = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == registry_name.as_str())
        .unwrap_or_else(|| panic!("{registry_name} not listed: {ls}"));
    assert_eq!(entry["from"], reference.as_str(), "{entry}");
    assert_eq!(
        entry["used_by"],
        json!([format!("sandbox {id}")]),
        "{entry}"
    );

    // A corrupt layer: refused by digest, and nothing of the build is left.
    let broken = TestImage::new(&format!("{nonce} broken"), "broken");
    let broken_layout = tmp.path().join("broken");
    let broken_digest = broken.write_layout(&broken_layout);
    let layer = Digest::of(&broken.blobs()[1].0);
    let layer_file = broken_layout.join("blobs/sha256").join(layer.hex());
    let mut bytes = fs::read(&layer_file).unwrap();
    // A flipped bit in a file's bytes: the tar still parses, the digest tells.
    let at = bytes
        .windows(10)
        .position(|w| w == b"hello from")
        .expect("the upper layer is stored plain");
    bytes[at] ^= 0x20;
    fs::write(&layer_file, bytes).unwrap();
    let broken_archive = tmp.path().join("broken.tar");
    tar_dir(&broken_layout, &broken_archive);
    let out = run(
        &w,
        &[
            "image",
            "build",
            "--from",
            &format!("oci-archive:{}", broken_archive.display()),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("corrupt") && stderr.contains(&layer.to_string()),
        "{stderr}"
    );
    assert_eq!(traces_of(&w, &broken_digest), Vec::<PathBuf>::new());

    // A tag the registry does not have, and a source that is no source.
    let out = run(
        &w,
        &[
            "image",
            "build",
            "--from",
            &format!("{}/team/app:nope", registry.host()),
            "--insecure",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("team/app") && stderr.contains("404"),
        "{stderr}"
    );
    let out = run(&w, &["image", "build", "--from", "oci-archive:"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("oci-archive:PATH"), "{stderr}");

    // Removing an image removes its defaults with it.
    assert!(run(&w, &["kill", &id]).status.success());
    for name in &built.names {
        let out = run(&w, &["image", "rm", name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(traces_of(&w, &digest), Vec::<PathBuf>::new());
    assert_eq!(traces_of(&w, &pushed_digest), Vec::<PathBuf>::new());
}

#[test]
fn a_registry_behind_basic_auth_is_read_with_docker_credentials() {
    use base64::Engine;
    let (user, password) = ("builder", "s3cret-pw");
    let registry = Registry::start_with(Some((user, password)));
    let w = World::new("ociauth");
    let nonce = format!("auth run {}", std::process::id());
    let digest = TestImage::new(&nonce, "authed").push_as(
        &registry.host(),
        "team/private",
        "v1",
        Some((user, password)),
    );
    let reference = format!("{}/team/private:v1", registry.host());
    let tmp = tempfile::tempdir().unwrap();
    let build = |docker_config: &Path| {
        w.command()
            .env("DOCKER_CONFIG", docker_config)
            .args([
                "image",
                "build",
                "--from",
                &reference,
                "--insecure",
                "--json",
            ])
            .output()
            .unwrap()
    };

    // No credentials for it: refused, with what to do.
    let empty = tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let out = build(&empty);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("docker login"), "{stderr}");
    assert_eq!(traces_of(&w, &digest), Vec::<PathBuf>::new());

    // Docker's config.json has them: built.
    let config = tmp.path().join("docker");
    fs::create_dir_all(&config).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    fs::write(
        config.join("config.json"),
        json!({"auths": {registry.host(): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    let out = build(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let _built = Leftovers {
        dir: w.home.join("images"),
        names: vec![v["image"].as_str().unwrap().to_string()],
    };
    assert_eq!(v["from"]["digest"], digest.to_string(), "{v}");
    assert_eq!(v["from"]["cached"], false, "{v}");
    let out = w
        .command()
        .args(["image", "rm", v["image"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(traces_of(&w, &digest), Vec::<PathBuf>::new());
}
