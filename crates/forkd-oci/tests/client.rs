//! The registry client's blob paths against a real registry: chunked PATCH
//! uploads, downloads into a file that resume with `Range` (and restart when
//! the partial file is wrong), cross-repository mounts, size-limited reads,
//! and the HTTPS-by-default message.

mod common;

use std::fs;

use common::{noise, Auth, TestRegistry};
use forkd_oci::{ClientOptions, Descriptor, Digest, OciError, Registry, Upload};

#[test]
fn chunked_upload_ranged_download_and_mount() {
    let registry = TestRegistry::start(Auth::None);
    let options = ClientOptions {
        upload_chunk_bytes: 64 * 1024,
        ..registry.options(None)
    };
    let client = Registry::new(&registry.host(), options).unwrap();
    let blob = noise(1_000_003, 11);
    let digest = Digest::of(&blob);
    // 1 MB in 64 KiB PATCHes.
    assert_eq!(
        client.ensure_blob("a/one", &digest, &blob).unwrap(),
        Upload::Sent
    );
    assert_eq!(
        client.ensure_blob("a/one", &digest, &blob).unwrap(),
        Upload::Present
    );
    assert_eq!(
        client.blob_size("a/one", &digest).unwrap(),
        Some(blob.len() as u64)
    );
    assert_eq!(fs::read(registry.blob_data(&digest)).unwrap(), blob);

    let desc = Descriptor::new(
        "application/octet-stream",
        digest.clone(),
        blob.len() as u64,
    );
    let dir = tempfile::tempdir().unwrap();
    // A download that stopped half way resumes from where it stopped.
    let partial = dir.path().join("partial");
    fs::write(&partial, &blob[..400_000]).unwrap();
    let received = client
        .fetch_blob_to_file("a/one", &desc, "blob", &partial)
        .unwrap();
    assert_eq!(
        received,
        blob.len() as u64 - 400_000,
        "only the missing tail was fetched"
    );
    assert_eq!(fs::read(&partial).unwrap(), blob);
    // A complete file is only verified.
    assert_eq!(
        client
            .fetch_blob_to_file("a/one", &desc, "blob", &partial)
            .unwrap(),
        0
    );
    // A partial file with wrong bytes fails verification and is removed; the
    // next call starts over and succeeds.
    let wrong = dir.path().join("wrong");
    fs::write(&wrong, noise(400_000, 12)).unwrap();
    let e = client
        .fetch_blob_to_file("a/one", &desc, "blob", &wrong)
        .unwrap_err();
    assert!(matches!(e, OciError::DigestMismatch { .. }), "{e}");
    assert!(!wrong.exists());
    assert_eq!(
        client
            .fetch_blob_to_file("a/one", &desc, "blob", &wrong)
            .unwrap(),
        blob.len() as u64
    );
    assert_eq!(fs::read(&wrong).unwrap(), blob);

    // Another repository gets the blob by mount, without sending it.
    assert_eq!(client.blob_size("b/two", &digest).unwrap(), None);
    assert_eq!(
        client.mount_blob("b/two", &digest, "a/one").unwrap(),
        Some(Upload::Present)
    );
    assert_eq!(
        client.blob_size("b/two", &digest).unwrap(),
        Some(blob.len() as u64)
    );

    // In-memory reads are bounded before anything is downloaded.
    let e = client
        .fetch_blob_bytes("a/one", &desc, "blob", 1000)
        .unwrap_err();
    assert!(matches!(e, OciError::TooLarge { .. }), "{e}");
    // A descriptor that promises fewer bytes than the registry sends is refused.
    let short = Descriptor::new("application/octet-stream", digest.clone(), 10);
    let e = client
        .fetch_blob_bytes("a/one", &short, "blob", 1 << 20)
        .unwrap_err();
    assert!(matches!(e, OciError::SizeMismatch { .. }), "{e}");

    // An unknown manifest is a clear 404.
    let e = client.get_manifest("a/one", "nope").unwrap_err();
    assert!(
        e.to_string().contains("404") && e.to_string().contains("a/one:nope"),
        "{e}"
    );
}

#[test]
fn https_is_the_default_and_the_error_names_insecure() {
    let registry = TestRegistry::start(Auth::None);
    let options = ClientOptions {
        insecure: false,
        ..registry.options(None)
    };
    let e = Registry::new(&registry.host(), options)
        .unwrap()
        .ping()
        .unwrap_err();
    assert!(matches!(e, OciError::Connect { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("https://") && text.contains("--insecure"),
        "{text}"
    );
}
