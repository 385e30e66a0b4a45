//! `forkd image build --from-dir`, `image ls` and `image rm` against a real
//! guest: a root tree from a directory boots and keeps its files and modes,
//! the directory is never written, the image is cached by content, and an
//! image a sandbox backs onto cannot be deleted.

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::process::Output;

use common::World;
use serde_json::Value;

fn run(w: &World, args: &[&str]) -> Output {
    w.command().args(args).output().unwrap()
}

fn ok_json(w: &World, args: &[&str]) -> Value {
    let out = run(w, args);
    assert!(
        out.status.success(),
        "forkd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "forkd {args:?}: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn listing(dir: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("find")
        .arg(dir)
        .arg("-printf")
        .arg("%P %m %y\n")
        .output()
        .unwrap();
    let mut lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

#[test]
fn a_directory_becomes_a_bootable_image_that_is_kept_while_used() {
    let w = World::new("images");
    // A minimal root tree: a static busybox as /bin/sh and a file to find.
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("srv/app")).unwrap();
    let busybox = forkd_guest::find_busybox().unwrap();
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "stat", "ls"] {
        symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let secret = format!("from-dir {}\n", std::process::id());
    std::fs::write(root.join("srv/app/data.txt"), &secret).unwrap();
    std::fs::set_permissions(
        root.join("srv/app/data.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let before = listing(root);

    let built = ok_json(
        &w,
        &[
            "image",
            "build",
            "--from-dir",
            root.to_str().unwrap(),
            "--json",
        ],
    );
    let name = built["image"].as_str().unwrap().to_string();
    assert!(name.starts_with("tree-"), "{built}");
    assert_eq!(listing(root), before, "the source directory was changed");
    // The same content is the same image (and no rebuild).
    let again = ok_json(
        &w,
        &[
            "image",
            "build",
            "--from-dir",
            root.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(again["image"], built["image"]);
    assert!(again["seconds"].as_f64().unwrap() < built["seconds"].as_f64().unwrap() + 1.0);

    // It boots, with the tree's files and modes.
    let out = run(&w, &["create", "--image", &name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = run(
        &w,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "cat /srv/app/data.txt; stat -c %a /srv/app/data.txt",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{secret}640\n")
    );

    // While the sandbox backs onto it, the image is listed as used and kept.
    let list = ok_json(&w, &["image", "ls", "--json"]);
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name.as_str())
        .unwrap_or_else(|| panic!("{name} not in {list}"));
    assert_eq!(entry["kind"], "tree");
    assert_eq!(
        entry["used_by"],
        serde_json::json!([format!("sandbox {id}")])
    );
    let out = run(&w, &["image", "rm", &name]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("in use by sandbox {id}")), "{err}");
    assert!(w.home.join("images").join(format!("{name}.ext4")).is_file());

    // Once nothing uses it, it goes.
    assert!(run(&w, &["kill", &id]).status.success());
    let gone = ok_json(&w, &["image", "rm", &name, "--json"]);
    assert_eq!(gone["removed"][0]["name"], name.as_str(), "{gone}");
    let list = ok_json(&w, &["image", "ls", "--json"]);
    assert!(!list.to_string().contains(&name), "{list}");

    // Bad input is named.
    let missing = "tree-0123456789abcdef";
    let out = run(&w, &["image", "rm", missing]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("no root image `{missing}`")), "{err}");
    let out = run(&w, &["create", "--image", missing]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("no root image `{missing}`")), "{err}");
    let out = run(&w, &["image", "build", "--packages", "git"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--packages needs --image debian-python"));
    let out = run(
        &w,
        &[
            "image",
            "build",
            "--image",
            "debian-python",
            "--packages",
            "git,Bad;rm",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a Debian package name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = root.join("srv/app/data.txt");
    let out = run(
        &w,
        &["image", "build", "--from-dir", file.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a directory"));
}

/// The mounts of `dir`'s tree that `pid` sees (`self` for this process).
fn mounts_seen_by(pid: &str, dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    forkd_guest::mounts::mounts_under(&info, dir)
}

#[test]
fn a_debian_build_killed_mid_bootstrap_leaves_no_mount_and_its_sweep_spares_dev_shm() {
    use std::time::{Duration, Instant};
    let w = World::new("images-killed");
    // A private images dir, so the build really bootstraps.
    let images = w.home.join("images");
    let _ = std::fs::remove_file(&images);
    std::fs::create_dir_all(&images).unwrap();
    let home = std::fs::canonicalize(&w.home).unwrap();
    let marker = std::path::PathBuf::from(format!(
        "/dev/shm/forkd-images-killed-marker-{}",
        std::process::id()
    ));
    std::fs::write(&marker, b"keep").unwrap();
    let log = w.home.join("build.log");
    let mut build = w
        .command()
        .args(["image", "build", "--image", "debian-python"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();

    // Wait until the bootstrap has its mounts (proc, sys, dev/pts and a bind
    // of the host's /dev/shm) inside the tree it builds.
    let needle = home.to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(300);
    let bootstrap = loop {
        let mounted = common::pids_with_arg(&needle)
            .into_iter()
            .filter(|&p| p != build.id())
            .find(|p| !mounts_seen_by(&p.to_string(), &home).is_empty());
        if let Some(pid) = mounted {
            break pid;
        }
        if let Some(status) = build.try_wait().unwrap() {
            panic!(
                "the build ended ({status}) before its bootstrap mounted anything: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no bootstrap mounted inside {} within 5 min: {}",
            home.display(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let theirs = mounts_seen_by(&bootstrap.to_string(), &home);
    assert!(
        theirs.iter().any(|m| m.ends_with("dev/shm")),
        "the bootstrap's mounts: {theirs:?}"
    );
    // Its mounts are its own: this process (the host's namespace) sees none.
    assert_eq!(
        mounts_seen_by("self", &home),
        Vec::<std::path::PathBuf>::new()
    );

    build.kill().unwrap();
    build.wait().unwrap();
    // The bootstrap is told (SIGTERM) and ends by itself.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !common::pids_with_arg(&needle).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the bootstrap outlived its killed build by 2 min: pids {:?}",
            common::pids_with_arg(&needle)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let leftovers = |images: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(images)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    };
    assert_eq!(leftovers(&images).len(), 1, "{:?}", leftovers(&images));

    // The next build sweeps the dead build's tree; the host's /dev/shm and
    // this world's runtime dir keep their files.
    let out = run(&w, &["image", "build", "--image", "busybox"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(leftovers(&images), Vec::<String>::new());
    assert_eq!(std::fs::read(&marker).unwrap(), b"keep");
    assert!(
        w.socket.exists(),
        "the daemon's socket in /dev/shm was removed"
    );
    std::fs::remove_file(&marker).unwrap();
}
