//! File sets against a real registry: sparse round trip, dedup of a changed
//! second push, pulls that take chunks from local files, refusal of corrupt
//! and truncated blobs, resumption after the registry dies mid-transfer, and
//! the overflow of chunk lists into carrier manifests (GC-safe).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{noise, read_all, sparse_ram, Auth, TestRegistry};
use forkd_oci::fileset::{
    self, FileSpec, LocalSources, PullOptions, PushOptions, PushSummary, PULL_WORK_DIR,
};
use forkd_oci::{allocated_bytes, Chunking, FileIndex, OciError, Reference, Registry};

const MIB: u64 = 1024 * 1024;
const CHUNK: u64 = 256 * 1024;

fn reference(registry: &TestRegistry, repo_tag: &str) -> Reference {
    Reference::parse(&format!("{}/{repo_tag}", registry.host())).unwrap()
}

/// A snapshot-like set: a 64 MiB sparse RAM image (1 MiB of data every
/// 2 MiB), a small dense "disk", and a manifest.
fn make_set(dir: &Path, seed: u64) -> Vec<FileSpec> {
    fs::create_dir_all(dir).unwrap();
    let ram = dir.join("ram.img");
    sparse_ram(&ram, 64 * MIB, MIB, seed);
    let disk = dir.join("disk.qcow2");
    fs::write(&disk, noise(3 * MIB as usize + 123, seed + 1000)).unwrap();
    fs::set_permissions(&disk, fs::Permissions::from_mode(0o600)).unwrap();
    let manifest = dir.join("manifest.json");
    fs::write(&manifest, br#"{"format":1}"#).unwrap();
    vec![
        FileSpec::new("ram.img", ram),
        FileSpec::new("disk.qcow2", disk),
        FileSpec::new("manifest.json", manifest),
    ]
}

fn push(
    client: &Registry,
    r: &Reference,
    files: &[FileSpec],
    local: &LocalSources,
) -> Result<PushSummary, OciError> {
    fileset::push(
        client,
        r,
        br#"{"tag":"t"}"#,
        files,
        local,
        &PushOptions::default(),
        &mut |_| {},
    )
}

fn assert_same_files(a: &Path, b: &Path, names: &[&str]) {
    for name in names {
        assert!(
            read_all(&a.join(name)) == read_all(&b.join(name)),
            "{name} differs"
        );
        let (ma, mb) = (
            fs::metadata(a.join(name)).unwrap(),
            fs::metadata(b.join(name)).unwrap(),
        );
        assert_eq!(
            ma.permissions().mode() & 0o7777,
            mb.permissions().mode() & 0o7777,
            "{name} mode"
        );
    }
}

const NAMES: [&str; 3] = ["ram.img", "disk.qcow2", "manifest.json"];

#[test]
fn sparse_round_trip_keeps_holes_and_bytes() {
    let registry = TestRegistry::start(Auth::None);
    let client = registry.client(None);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let files = make_set(&src, 1);
    let r = reference(&registry, "team/snap:v1");
    let mut reports = 0;
    let pushed = fileset::push(
        &client,
        &r,
        br#"{"tag":"t"}"#,
        &files,
        &LocalSources::new(),
        &PushOptions::default(),
        &mut |p| {
            reports += 1;
            assert!(p.stats.done_bytes <= p.stats.total_bytes);
        },
    )
    .unwrap();
    assert!(reports > 100, "progress was reported {reports} times");
    let s = &pushed.stats;
    assert_eq!(s.total_bytes, 64 * MIB + 3 * MIB + 123 + 12);
    assert_eq!(
        s.zero_bytes,
        32 * MIB,
        "the holes of the RAM image are zero runs"
    );
    assert_eq!(s.chunks_reused, 0);
    assert_eq!(s.chunks_transferred, s.chunks);
    // 32 MiB of RAM data + the disk in 256 KiB chunks + the manifest.
    assert_eq!(s.chunks, 32 * MIB / CHUNK + (3 * MIB / CHUNK + 1) + 1);

    let staging = work.path().join("staging");
    let pulled = fileset::pull(
        &client,
        &r,
        &staging,
        &LocalSources::new(),
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(pulled.config, br#"{"tag":"t"}"#);
    assert_eq!(pulled.digest, pushed.digest);
    assert_eq!(pulled.stats.chunks_transferred, s.chunks);
    assert_eq!(pulled.stats.bytes_transferred, s.bytes_transferred);
    assert_same_files(&src, &staging, &NAMES);
    assert!(!staging.join(PULL_WORK_DIR).exists());
    let (a, b) = (
        allocated_bytes(&src.join("ram.img")).unwrap(),
        allocated_bytes(&staging.join("ram.img")).unwrap(),
    );
    // Filesystem metadata (an extent block) may differ by a few KiB.
    assert!(
        b <= a + 64 * 1024,
        "pulled RAM image allocates {b} bytes, the original {a}"
    );
    assert!(
        b <= 33 * MIB,
        "holes were filled: {b} bytes allocated for 32 MiB of data"
    );
    assert_eq!(pulled.indexes, pushed.indexes);
}

/// Overwrites runs of `run` bytes every `period` bytes inside the RAM
/// image's data regions; returns the 256 KiB chunk numbers touched.
fn change_runs(path: &Path, run: u64, period: u64, seed: u64) -> HashSet<u64> {
    let f = fs::File::options().write(true).open(path).unwrap();
    let mut touched = HashSet::new();
    let mut offset = 0;
    while offset < 64 * MIB {
        // Data lives in the even MiBs.
        if (offset / MIB).is_multiple_of(2) {
            f.write_all_at(&noise(run as usize, seed + offset), offset)
                .unwrap();
            for c in offset / CHUNK..=(offset + run - 1) / CHUNK {
                touched.insert(c);
            }
        }
        offset += period;
    }
    touched
}

#[test]
fn second_push_and_pull_move_only_changed_chunks() {
    let registry = TestRegistry::start(Auth::None);
    let client = registry.client(None);
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    let files_a = make_set(&a, 2);
    let first = push(
        &client,
        &reference(&registry, "team/snap:a"),
        &files_a,
        &LocalSources::new(),
    )
    .unwrap();

    // B: the same set with 5% of the RAM image's data rewritten, in 64 KiB runs.
    let b = work.path().join("b");
    fs::create_dir_all(&b).unwrap();
    for name in NAMES {
        let out = Command::new("cp")
            .arg("--sparse=always")
            .arg("-p")
            .arg(a.join(name))
            .arg(b.join(name))
            .status()
            .unwrap();
        assert!(out.success());
    }
    let touched = change_runs(&b.join("ram.img"), 64 * 1024, 1280 * 1024, 99);
    let files_b: Vec<FileSpec> = NAMES.iter().map(|n| FileSpec::new(*n, b.join(n))).collect();

    // Offer A's files as local sources: B's push then skips compressing reused chunks.
    let mut local_a = LocalSources::new();
    for (name, index) in &first.indexes {
        local_a.add(a.join(name), index);
    }
    let second = push(
        &client,
        &reference(&registry, "team/snap:b"),
        &files_b,
        &local_a,
    )
    .unwrap();
    let s = &second.stats;
    assert_eq!(
        s.chunks_transferred,
        touched.len() as u64,
        "only the touched chunks are uploaded"
    );
    assert_eq!(s.chunks_reused, s.chunks - touched.len() as u64);
    let old_blobs: HashSet<_> = first
        .indexes
        .values()
        .flat_map(|i| i.data_chunks().map(|c| c.blob.clone()))
        .collect();
    let new_bytes: u64 = second.indexes["ram.img"]
        .data_chunks()
        .filter(|c| !old_blobs.contains(&c.blob))
        .map(|c| c.blob_size.unwrap())
        .sum();
    assert_eq!(s.bytes_transferred, new_bytes);
    let changed_fraction = touched.len() as f64 / (32 * MIB / CHUNK) as f64;
    assert!(changed_fraction < 0.6, "{changed_fraction}");

    // A host that has A pulls B: only the changed chunks come over the wire.
    let host = work.path().join("host");
    let have_a = host.join("a");
    let got_a = fileset::pull(
        &client,
        &reference(&registry, "team/snap:a"),
        &have_a,
        &LocalSources::new(),
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let mut local = LocalSources::new();
    for (name, index) in &got_a.indexes {
        local.add(have_a.join(name), index);
    }
    let staging_b = host.join("b");
    let got_b = fileset::pull(
        &client,
        &reference(&registry, "team/snap:b"),
        &staging_b,
        &local,
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(got_b.stats.chunks_transferred, touched.len() as u64);
    assert_eq!(got_b.stats.bytes_transferred, new_bytes);
    assert_eq!(
        got_b.stats.chunks_reused,
        got_b.stats.chunks - touched.len() as u64
    );
    assert_same_files(&b, &staging_b, &NAMES);

    // A local source that no longer matches its index is not trusted.
    fs::write(
        have_a.join("disk.qcow2"),
        noise(3 * MIB as usize + 123, 555),
    )
    .unwrap();
    let again = fileset::pull(
        &client,
        &reference(&registry, "team/snap:b"),
        &host.join("b2"),
        &local,
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(
        again.stats.chunks_transferred,
        touched.len() as u64 + (3 * MIB / CHUNK + 1)
    );
    assert_same_files(&b, &host.join("b2"), &NAMES);
}

fn first_chunk_blob(index: &FileIndex) -> forkd_oci::Digest {
    index.data_chunks().next().unwrap().blob.clone().unwrap()
}

#[test]
fn corrupt_and_truncated_blobs_are_refused_by_name() {
    let registry = TestRegistry::start(Auth::None);
    let client = registry.client(None);
    let work = tempfile::tempdir().unwrap();
    let files = make_set(&work.path().join("src"), 3);
    let r = reference(&registry, "team/snap:v1");
    let pushed = push(&client, &r, &files, &LocalSources::new()).unwrap();

    // Flip one byte of a chunk blob in the registry's storage.
    let blob = first_chunk_blob(&pushed.indexes["disk.qcow2"]);
    let data = registry.blob_data(&blob);
    let mut bytes = fs::read(&data).unwrap();
    let original = bytes.clone();
    bytes[10] ^= 0xff;
    fs::write(&data, &bytes).unwrap();
    let staging = work.path().join("staging");
    let e = fileset::pull(
        &client,
        &r,
        &staging,
        &LocalSources::new(),
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, OciError::DigestMismatch { .. }), "{text}");
    assert!(
        text.contains(blob.as_str()) && text.contains("disk.qcow2") && text.contains("corrupt"),
        "{text}"
    );
    for name in NAMES {
        assert!(
            !staging.join(name).exists(),
            "{name} was published from a failed pull"
        );
    }

    // Truncate it instead.
    fs::write(&data, &original[..original.len() / 2]).unwrap();
    let e = fileset::pull(
        &client,
        &r,
        &staging,
        &LocalSources::new(),
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, OciError::SizeMismatch { .. }), "{text}");
    assert!(
        text.contains(blob.as_str())
            && text.contains(&format!(
                "expected {} bytes, got {}",
                original.len(),
                original.len() / 2
            )),
        "{text}"
    );

    // Repaired, the same pull resumes and completes.
    fs::write(&data, &original).unwrap();
    let ok = fileset::pull(
        &client,
        &r,
        &staging,
        &LocalSources::new(),
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(
        ok.stats.chunks_reused > 0,
        "the earlier attempts' chunks were reused"
    );
    assert_same_files(&work.path().join("src"), &staging, &NAMES);

    // A file index that lies about the chunks is refused too.
    let wrong = fileset::pull(
        &client,
        &r,
        &work.path().join("s2"),
        &LocalSources::new(),
        &PullOptions {
            artifact_type: "application/x-other".into(),
            only: None,
        },
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(wrong, OciError::WrongArtifact { .. }), "{wrong}");
}

#[test]
fn push_and_pull_resume_after_the_registry_dies() {
    let mut registry = TestRegistry::start(Auth::None);
    let client = registry.client(None);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let files = make_set(&src, 4);
    let r = reference(&registry, "team/snap:v1");

    let kill_after = 20;
    let e = fileset::push(
        &client,
        &r,
        b"{}",
        &files,
        &LocalSources::new(),
        &PushOptions::default(),
        &mut |p| {
            if p.stats.chunks_transferred == kill_after {
                registry.kill();
            }
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, OciError::Connect { .. } | OciError::Status { .. }),
        "{e}"
    );
    registry.restart();
    let pushed = fileset::push(
        &client,
        &r,
        b"{}",
        &files,
        &LocalSources::new(),
        &PushOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(
        pushed.stats.chunks_reused, kill_after,
        "chunks uploaded before the crash are skipped"
    );
    assert_eq!(
        pushed.stats.chunks_transferred,
        pushed.stats.chunks - kill_after
    );

    let staging = work.path().join("staging");
    let e = fileset::pull(
        &client,
        &r,
        &staging,
        &LocalSources::new(),
        &PullOptions::default(),
        &mut |p| {
            if p.stats.chunks_transferred == kill_after {
                registry.kill();
            }
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, OciError::Connect { .. } | OciError::Status { .. }),
        "{e}"
    );
    for name in NAMES {
        assert!(
            !staging.join(name).exists(),
            "half pull left {name} visible"
        );
    }
    assert!(staging.join(PULL_WORK_DIR).exists());
    registry.restart();
    let pulled = fileset::pull(
        &client,
        &r,
        &staging,
        &LocalSources::new(),
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(
        pulled.stats.chunks_reused, kill_after,
        "chunks pulled before the crash are kept"
    );
    assert_eq!(
        pulled.stats.chunks_transferred,
        pulled.stats.chunks - kill_after
    );
    assert_same_files(&src, &staging, &NAMES);
}

#[test]
fn chunk_lists_overflow_into_carriers_that_gc_keeps() {
    let mut registry = TestRegistry::start(Auth::None);
    let client = registry.client(None);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let files = make_set(&src, 5);
    let r = reference(&registry, "team/big:v1");
    let options = PushOptions {
        max_manifest_bytes: 4096,
        chunking: Chunking::Fixed { size: 64 * 1024 },
        annotations: BTreeMap::from([("org.opencontainers.image.created".into(), "now".into())]),
        ..PushOptions::default()
    };
    let pushed = fileset::push(
        &client,
        &r,
        b"{}",
        &files,
        &LocalSources::new(),
        &options,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(pushed.media_type, forkd_oci::OCI_INDEX);
    let (_, bytes, _) = client.get_manifest("team/big", "v1").unwrap();
    let index: forkd_oci::ImageIndex = serde_json::from_slice(&bytes).unwrap();
    assert!(
        index.manifests.len() > 10,
        "{} manifests",
        index.manifests.len()
    );
    for m in &index.manifests {
        assert!(m.size <= 4096);
    }

    // The registry's own garbage collector keeps every chunk.
    registry.kill();
    let out = Command::new("docker-registry")
        .arg("garbage-collect")
        .arg(registry.dir.path().join("config.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    registry.restart();
    let staging = work.path().join("staging");
    fileset::pull(
        &client,
        &r,
        &staging,
        &LocalSources::new(),
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_same_files(&src, &staging, &NAMES);
}

#[test]
fn names_are_checked_before_anything_is_sent() {
    let registry = TestRegistry::start(Auth::None);
    let client = registry.client(None);
    let work = tempfile::tempdir().unwrap();
    let path: PathBuf = work.path().join("f");
    fs::write(&path, b"x").unwrap();
    for bad in ["../x", ".hidden", "a/b"] {
        let e = push(
            &client,
            &reference(&registry, "a:b"),
            &[FileSpec::new(bad, &path)],
            &LocalSources::new(),
        )
        .unwrap_err();
        assert!(matches!(e, OciError::InvalidFileName { .. }), "{e}");
    }
    let e = push(
        &client,
        &reference(&registry, "a:b"),
        &[FileSpec::new("x", &path), FileSpec::new("x", &path)],
        &LocalSources::new(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
}

#[test]
fn content_defined_chunking_round_trips_and_dedups() {
    let registry = TestRegistry::start(Auth::None);
    let client = registry.client(None);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let files = make_set(&src, 6);
    let options = PushOptions {
        chunking: Chunking::Cdc {
            min: 16 * 1024,
            avg: 64 * 1024,
            max: 256 * 1024,
        },
        ..PushOptions::default()
    };
    let r = reference(&registry, "team/cdc:v1");
    let first = fileset::push(
        &client,
        &r,
        b"{}",
        &files,
        &LocalSources::new(),
        &options,
        &mut |_| {},
    )
    .unwrap();
    assert!(matches!(
        first.indexes["ram.img"].chunking,
        Chunking::Cdc { .. }
    ));
    // Each 1 MiB hole loses at most one maximal chunk at either edge to the data around it.
    let zero = first.stats.zero_bytes;
    assert!((16 * MIB..=32 * MIB).contains(&zero), "{zero} zero bytes");
    // Pushing the same set again sends nothing.
    let again = fileset::push(
        &client,
        &reference(&registry, "team/cdc:v2"),
        b"{}",
        &files,
        &LocalSources::new(),
        &options,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(again.stats.chunks_transferred, 0);
    assert_eq!(again.stats.bytes_transferred, 0);
    let staging = work.path().join("staging");
    fileset::pull(
        &client,
        &r,
        &staging,
        &LocalSources::new(),
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_same_files(&src, &staging, &NAMES);
    let (a, b) = (
        allocated_bytes(&src.join("ram.img")).unwrap(),
        allocated_bytes(&staging.join("ram.img")).unwrap(),
    );
    assert!(b <= a + 64 * 1024, "{b} > {a}");
}
