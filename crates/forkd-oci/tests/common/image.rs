//! Builds container images for the tests, with no network: layer tars with
//! whiteouts, opaque dirs, symlinks, hard links, modes, owners and xattrs,
//! written as an OCI layout, an oci-archive, a docker-archive, or pushed to
//! the test registry.

use std::fs;
use std::io::Write;
use std::path::Path;

use forkd_oci::{Descriptor, Digest, Registry};
use tar::{EntryType, Header};

#[derive(Clone, Copy)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub struct LayerBuilder(tar::Builder<Vec<u8>>);

impl Default for LayerBuilder {
    fn default() -> Self {
        LayerBuilder(tar::Builder::new(Vec::new()))
    }
}

fn header(kind: EntryType, size: u64, mode: u32, uid: u64, gid: u64) -> Header {
    let mut h = Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_700_000_000);
    h
}

impl LayerBuilder {
    pub fn dir(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = header(EntryType::Directory, 0, mode, uid, gid);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }
    pub fn file(mut self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = header(EntryType::Regular, data.len() as u64, mode, uid, gid);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(EntryType::Symlink, 0, 0o777, 0, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(EntryType::Link, 0, 0o644, 0, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    /// A file preceded by a pax header carrying `SCHILY.xattr.` attributes.
    pub fn file_with_xattr(mut self, path: &str, data: &[u8], name: &str, value: &str) -> Self {
        let record = |key: &str, value: &str| {
            let body = format!(" {key}={value}\n");
            let mut len = body.len() + 1;
            while format!("{len}{body}").len() != len {
                len += 1;
            }
            format!("{len}{body}")
        };
        let pax = record(&format!("SCHILY.xattr.{name}"), value);
        let mut h = header(EntryType::XHeader, pax.len() as u64, 0o644, 0, 0);
        self.0
            .append_data(&mut h, "PaxHeaders/x", pax.as_bytes())
            .unwrap();
        self.file(path, data, 0o644, 0, 0)
    }
    /// An entry whose name is written as is (no checks): hostile layers.
    pub fn raw_file(mut self, name: &str, data: &[u8]) -> Self {
        let mut h = header(EntryType::Regular, data.len() as u64, 0o644, 0, 0);
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

pub struct TestImage {
    pub layers: Vec<(Vec<u8>, Compression)>,
    pub env: Vec<String>,
}

pub struct Built {
    pub config: Vec<u8>,
    /// (blob bytes, media type)
    pub layers: Vec<(Vec<u8>, String)>,
    pub manifest: Vec<u8>,
    pub manifest_digest: Digest,
}

fn compress(tar: &[u8], c: Compression) -> (Vec<u8>, &'static str) {
    match c {
        Compression::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            (
                e.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Compression::Zstd => (
            zstd::encode_all(tar, 3).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    }
}

impl TestImage {
    /// The standard fixture: three layers (gzip, zstd, plain).
    pub fn fixture() -> TestImage {
        let base = LayerBuilder::default()
            .dir("etc", 0o755, 0, 0)
            .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644, 0, 0)
            .file("etc/shadow", b"root:*:1::::::\n", 0o640, 0, 42)
            .dir("usr", 0o755, 0, 0)
            .dir("usr/bin", 0o755, 0, 0)
            .file("usr/bin/real", b"#!/bin/sh\necho real\n", 0o755, 0, 0)
            .dir("bin", 0o755, 0, 0)
            .file("bin/tool", b"tool", 0o4755, 0, 0)
            .hardlink("bin/tool-link", "bin/tool")
            .symlink("bin/sh", "/usr/bin/real")
            .dir("home", 0o755, 0, 0)
            .dir("home/user", 0o700, 1000, 1000)
            .file("home/user/notes", b"mine", 0o600, 1000, 1000)
            .dir("data", 0o755, 0, 0)
            .file("data/old", b"old", 0o644, 0, 0)
            .file("data/gone", b"gone", 0o644, 0, 0)
            .file_with_xattr("data/tagged", b"x", "user.forkd", "hello")
            .dir("opq", 0o755, 0, 0)
            .file("opq/a", b"a", 0o644, 0, 0)
            .dir("opq/sub", 0o755, 0, 0)
            .file("opq/sub/b", b"b", 0o644, 0, 0)
            .finish();
        let upper = LayerBuilder::default()
            .file("data/.wh.gone", b"", 0o644, 0, 0)
            .file("opq/.wh..wh..opq", b"", 0o644, 0, 0)
            .file("opq/new", b"new", 0o644, 0, 0)
            .file(
                "etc/passwd",
                b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
                0o644,
                0,
                0,
            )
            .finish();
        let top = LayerBuilder::default()
            .symlink("lib64", "/usr/lib")
            .dir("usr/lib", 0o755, 0, 0)
            .file("lib64/ld.so", b"ld", 0o755, 0, 0)
            .dir("srv", 0o755, 0, 0)
            .finish();
        TestImage {
            layers: vec![
                (base, Compression::Gzip),
                (upper, Compression::Zstd),
                (top, Compression::None),
            ],
            env: vec!["PATH=/usr/bin:/bin".into(), "GREETING=hi".into()],
        }
    }

    pub fn config(&self, arch: &str) -> Vec<u8> {
        let diff_ids: Vec<String> = self
            .layers
            .iter()
            .map(|(tar, _)| Digest::of(tar).to_string())
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Env": self.env, "WorkingDir": "/srv", "User": "1000:1000",
                       "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }

    pub fn build(&self, arch: &str) -> Built {
        let config = self.config(arch);
        let layers: Vec<(Vec<u8>, String)> = self
            .layers
            .iter()
            .map(|(tar, c)| {
                let (bytes, mt) = compress(tar, *c);
                (bytes, mt.to_owned())
            })
            .collect();
        let layer_descs: Vec<Descriptor> = layers
            .iter()
            .map(|(b, mt)| Descriptor::of_bytes(mt, b))
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": Descriptor::of_bytes("application/vnd.oci.image.config.v1+json", &config),
            "layers": layer_descs,
        }))
        .unwrap();
        let manifest_digest = Digest::of(&manifest);
        Built {
            config,
            layers,
            manifest,
            manifest_digest,
        }
    }

    /// An index with linux/arm64 (first) and linux/amd64 manifests.
    fn index(amd64: &Built, arm64: &Built) -> Vec<u8> {
        let entry = |b: &Built, arch: &str| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": b.manifest_digest, "size": b.manifest.len(),
                "platform": {"architecture": arch, "os": "linux"},
            })
        };
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [entry(arm64, "arm64"), entry(amd64, "amd64")],
        }))
        .unwrap()
    }

    /// Writes an OCI layout whose index.json points to a multi-platform
    /// index; returns the amd64 manifest digest.
    pub fn write_oci_layout(&self, dir: &Path) -> Digest {
        let amd64 = self.build("amd64");
        let arm64 = self.build("arm64");
        let index = Self::index(&amd64, &arm64);
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| fs::write(blobs.join(Digest::of(bytes).hex()), bytes).unwrap();
        for b in [&amd64, &arm64] {
            put(&b.config);
            put(&b.manifest);
            for (layer, _) in &b.layers {
                put(layer);
            }
        }
        put(&index);
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let top = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                           "digest": Digest::of(&index), "size": index.len()}],
        });
        fs::write(dir.join("index.json"), top.to_string()).unwrap();
        amd64.manifest_digest
    }

    /// A tar of an OCI layout; returns the amd64 manifest digest.
    pub fn write_oci_archive(&self, path: &Path) -> Digest {
        let dir = tempfile::tempdir().unwrap();
        let digest = self.write_oci_layout(dir.path());
        let mut b = tar::Builder::new(fs::File::create(path).unwrap());
        b.append_dir_all(".", dir.path()).unwrap();
        b.finish().unwrap();
        digest
    }

    /// A `docker save`-style tarball (old layout: `<n>/layer.tar`, plain
    /// tars); returns the config digest, the image ID.
    pub fn write_docker_archive(&self, path: &Path) -> Digest {
        let config = self.config("amd64");
        let config_digest = Digest::of(&config);
        let mut b = tar::Builder::new(fs::File::create(path).unwrap());
        let mut add = |name: &str, bytes: &[u8]| {
            let mut h = Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, bytes).unwrap();
        };
        let config_name = format!("{}.json", config_digest.hex());
        add(&config_name, &config);
        let mut layer_names = Vec::new();
        for (i, (tar, _)) in self.layers.iter().enumerate() {
            let name = format!("layer{i}/layer.tar");
            add(&name, tar);
            layer_names.push(name);
        }
        let manifest = serde_json::json!([{"Config": config_name, "RepoTags": ["test:latest"], "Layers": layer_names}]);
        add("manifest.json", manifest.to_string().as_bytes());
        b.finish().unwrap();
        config_digest
    }

    /// Pushes both platforms and tags the index; returns the amd64 manifest digest.
    pub fn push(&self, registry: &Registry, repo: &str, tag: &str) -> Digest {
        let amd64 = self.build("amd64");
        let arm64 = self.build("arm64");
        for b in [&amd64, &arm64] {
            registry
                .ensure_blob(repo, &Digest::of(&b.config), &b.config)
                .unwrap();
            for (layer, _) in &b.layers {
                registry
                    .ensure_blob(repo, &Digest::of(layer), layer)
                    .unwrap();
            }
            registry
                .put_manifest(
                    repo,
                    b.manifest_digest.as_str(),
                    "application/vnd.oci.image.manifest.v1+json",
                    &b.manifest,
                )
                .unwrap();
        }
        let index = Self::index(&amd64, &arm64);
        registry
            .put_manifest(repo, tag, "application/vnd.oci.image.index.v1+json", &index)
            .unwrap();
        amd64.manifest_digest
    }
}
