//! Container images as templates, built locally (no network): the same
//! three-layer image read from an OCI layout, an oci-archive, a
//! docker-archive and the test registry unpacks to the same tree, with
//! whiteouts, opaque dirs, links, modes, owners and xattrs applied; tampered
//! layers and path traversal are refused.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::image::{Compression, LayerBuilder, TestImage};
use common::{Auth, TestRegistry};
use forkd_oci::image::{self, ImageSource, UnpackOptions};
use forkd_oci::{ClientOptions, Digest, OciError};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Checks the tree the fixture image must produce.
fn check_fixture_tree(root: &Path) {
    let mode = |p: &str| {
        fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    // Whiteout and opaque dir.
    assert!(root.join("data/old").exists());
    assert!(!root.join("data/gone").exists() && !root.join("data/.wh.gone").exists());
    let mut opq: Vec<String> = fs::read_dir(root.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    opq.sort();
    assert_eq!(opq, vec!["new"]);
    // The upper layer's passwd replaced the lower one.
    assert!(fs::read_to_string(root.join("etc/passwd"))
        .unwrap()
        .contains("user:x:1000"));
    // Modes, setuid included; hard link; absolute symlink kept as written.
    assert_eq!(mode("bin/tool"), 0o4755);
    assert_eq!(mode("etc/shadow"), 0o640);
    assert_eq!(mode("home/user"), 0o700);
    assert_eq!(
        fs::metadata(root.join("bin/tool")).unwrap().ino(),
        fs::metadata(root.join("bin/tool-link")).unwrap().ino()
    );
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("/usr/bin/real")
    );
    // A file written through the layer's absolute symlink lands inside the root.
    assert_eq!(fs::read(root.join("usr/lib/ld.so")).unwrap(), b"ld");
    // Extended attribute from the pax header.
    assert_eq!(
        xattr::get(root.join("data/tagged"), "user.forkd")
            .unwrap()
            .as_deref(),
        Some(&b"hello"[..])
    );
    if is_root() {
        let meta = fs::metadata(root.join("home/user/notes")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
        assert_eq!(fs::metadata(root.join("etc/shadow")).unwrap().gid(), 42);
    }
}

fn unpack(source: &ImageSource, client: &ClientOptions) -> (tempfile::TempDir, image::ImageInfo) {
    let dest = tempfile::tempdir().unwrap();
    let info = image::unpack_image(source, dest.path(), client, &UnpackOptions::default()).unwrap();
    (dest, info)
}

fn check_info(info: &image::ImageInfo, digest: &Digest) {
    assert_eq!(&info.digest, digest);
    assert_eq!(info.layers.len(), 3);
    let c = &info.config;
    assert_eq!(
        c.env.as_deref().unwrap(),
        ["PATH=/usr/bin:/bin", "GREETING=hi"]
    );
    assert_eq!(c.working_dir.as_deref(), Some("/srv"));
    assert_eq!(c.user.as_deref(), Some("1000:1000"));
    assert_eq!(c.entrypoint.as_deref().unwrap(), ["/bin/sh", "-c"]);
    assert_eq!(c.cmd.as_deref().unwrap(), ["echo hi"]);
    assert_eq!(info.layers[1].whiteouts, 1);
    assert_eq!(info.layers[1].opaque_dirs, 1);
}

#[test]
fn layout_and_archives_unpack_to_the_same_tree() {
    let fixture = TestImage::fixture();
    let work = tempfile::tempdir().unwrap();
    let client = ClientOptions::default();

    let layout = work.path().join("layout");
    let digest = fixture.write_oci_layout(&layout);
    let (tree, info) = unpack(
        &ImageSource::parse(&format!("oci-layout:{}", layout.display())).unwrap(),
        &client,
    );
    check_fixture_tree(tree.path());
    check_info(&info, &digest);

    let archive = work.path().join("image.tar");
    let digest = fixture.write_oci_archive(&archive);
    let (tree, info) = unpack(
        &ImageSource::parse(&format!("oci-archive:{}", archive.display())).unwrap(),
        &client,
    );
    check_fixture_tree(tree.path());
    check_info(&info, &digest);

    let docker = work.path().join("docker.tar");
    let config_digest = fixture.write_docker_archive(&docker);
    let (tree, info) = unpack(
        &ImageSource::parse(&format!("docker-archive:{}", docker.display())).unwrap(),
        &client,
    );
    check_fixture_tree(tree.path());
    check_info(&info, &config_digest);
}

#[test]
fn registry_images_resolve_amd64_and_unpack() {
    let registry = TestRegistry::start(Auth::Htpasswd);
    let client = registry.client(Some(common::creds()));
    let digest = TestImage::fixture().push(&client, "tools/base", "1.0");
    let options = registry.options(Some(common::creds()));
    let source = ImageSource::parse(&format!("{}/tools/base:1.0", registry.host())).unwrap();
    let resolved = image::resolve(&source, &options).unwrap();
    assert_eq!(
        resolved.digest(),
        &digest,
        "the amd64 manifest, not the index or arm64"
    );
    let (tree, info) = unpack(&source, &options);
    check_fixture_tree(tree.path());
    check_info(&info, &digest);
    // By digest too.
    let by_digest =
        ImageSource::parse(&format!("{}/tools/base@{digest}", registry.host())).unwrap();
    assert_eq!(
        image::resolve(&by_digest, &options).unwrap().digest(),
        &digest
    );

    // A tampered layer in the registry is refused after it was read.
    let built = TestImage::fixture().build("amd64");
    let layer = Digest::of(&built.layers[2].0);
    let data = registry.blob_data(&layer);
    let mut bytes = fs::read(&data).unwrap();
    let at = bytes.len() - 2000;
    bytes[at] ^= 1;
    fs::write(&data, &bytes).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let e =
        image::unpack_image(&source, dest.path(), &options, &UnpackOptions::default()).unwrap_err();
    assert!(matches!(e, OciError::DigestMismatch { .. }), "{e}");
    assert!(e.to_string().contains(layer.as_str()), "{e}");
}

#[test]
fn hostile_layers_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let evil = TestImage {
        layers: vec![(
            LayerBuilder::default()
                .file("ok", b"1", 0o644, 0, 0)
                .raw_file("../../escaped", b"x")
                .finish(),
            Compression::Gzip,
        )],
        env: vec![],
    };
    let archive = work.path().join("evil.tar");
    evil.write_oci_archive(&archive);
    let dest = work.path().join("a/b/root");
    fs::create_dir_all(&dest).unwrap();
    let source = ImageSource::parse(&format!("oci-archive:{}", archive.display())).unwrap();
    let e = image::unpack_image(
        &source,
        &dest,
        &ClientOptions::default(),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, OciError::UnsafeEntry { .. }), "{e}");
    assert!(e.to_string().contains("../../escaped"), "{e}");
    assert!(!work.path().join("a/escaped").exists() && !work.path().join("escaped").exists());

    // A layout whose blob does not match its descriptor.
    let layout = work.path().join("layout");
    TestImage::fixture().write_oci_layout(&layout);
    let layer = Digest::of(&TestImage::fixture().build("amd64").layers[0].0);
    let path = layout.join("blobs/sha256").join(layer.hex());
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let e = image::unpack_image(
        &ImageSource::OciLayout(layout),
        dest.path(),
        &ClientOptions::default(),
        &UnpackOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            OciError::SizeMismatch { .. } | OciError::Unpack { .. } | OciError::Io { .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains(layer.as_str()), "{e}");
}
