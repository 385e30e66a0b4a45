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
    let out = run(&w, &["image", "rm", "tree-nope"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no root image `tree-nope`"));
    let out = run(&w, &["create", "--image", "tree-nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no root image `tree-nope`"));
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
