//! Files, tar streams, watches and guest processes through the daemon's
//! `/v1` routes and the client's side of the seam, and `forkd cp` both
//! locally and with `--remote`, against real guests.

mod common;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::World;
use forkd_ops::{
    ErrorKind, FileKind, FsEventKind, Operations, ProcessEvent, ProcessRef, ProcessSpec,
};
use serde_json::json;

fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[test]
fn files_tar_watches_and_processes_over_v1() {
    let w = World::new("files");
    let id = w.ok(
        "POST",
        "/v1/sandboxes/boot",
        Some(json!({ "memory_mib": 512 })),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let c = w.client();
    let base = format!("/v1/sandboxes/{id}");

    // JSON writes make parent directories, unless told not to.
    let r = w.ok(
        "PUT",
        &format!("{base}/files"),
        Some(json!({"path": "/tmp/deep/a/b.txt", "content_b64": b64(b"hello"), "mode": 0o640})),
    );
    assert_eq!(r, json!({"path": "/tmp/deep/a/b.txt", "bytes": 5}));
    let (st, e) = w.call(
        "PUT",
        &format!("{base}/files"),
        Some(json!({"path": "/tmp/none/x", "content_b64": "", "mkdir": false})),
    );
    assert_eq!(st, 404, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("directory /tmp/none does not exist"),
        "{e}"
    );
    // Reading a directory is a 400 that says so.
    let (st, e) = w.call("GET", &format!("{base}/files?path=/tmp/deep"), None);
    assert_eq!(st, 400, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("is a directory"),
        "{e}"
    );
    // stat, list (sorted, two levels), mkdir, rename, remove.
    let f = w.ok(
        "GET",
        &format!("{base}/files/stat?path=/tmp/deep/a/b.txt"),
        None,
    );
    assert_eq!(
        (f["type"].as_str(), f["size"].as_u64(), f["mode"].as_u64()),
        (Some("file"), Some(5), Some(0o640))
    );
    let list = w.ok(
        "GET",
        &format!("{base}/files/list?path=/tmp/deep&depth=2"),
        None,
    );
    let paths: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/tmp/deep/a", "/tmp/deep/a/b.txt"]);
    let m = w.ok(
        "POST",
        &format!("{base}/files/mkdir"),
        Some(json!({"path": "/tmp/made/x"})),
    );
    assert_eq!(m["created"], true);
    let m = w.ok(
        "POST",
        &format!("{base}/files/mkdir"),
        Some(json!({"path": "/tmp/made/x"})),
    );
    assert_eq!(m["created"], false);
    let moved = w.ok(
        "POST",
        &format!("{base}/files/rename"),
        Some(json!({"from": "/tmp/deep/a/b.txt", "to": "/tmp/made/b.txt"})),
    );
    assert_eq!(moved["path"], "/tmp/made/b.txt");
    let (st, _) = w.call("DELETE", &format!("{base}/files?path=/tmp/deep"), None);
    assert_eq!(st, 204);
    let (st, e) = w.call("GET", &format!("{base}/files/stat?path=/tmp/deep"), None);
    assert_eq!((st, e["kind"].as_str()), (404, Some("not_found")), "{e}");

    // A raw upload larger than any JSON body, streamed both ways, intact.
    let big: Vec<u8> = (0..70u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let n = c
        .write_file(&id, "/tmp/big", &Default::default(), &mut &big[..])
        .unwrap();
    assert_eq!(n, big.len() as u64);
    let mut back = Vec::new();
    assert_eq!(
        c.read_file(&id, "/tmp/big", None, &mut back).unwrap(),
        big.len() as u64
    );
    assert!(back == big, "the 70 MiB file came back different");
    drop(back);
    // An upload to a sandbox that does not exist is a clean 404, not a
    // broken pipe half-way through the body.
    let e = c
        .write_file(
            "sb-nothere",
            "/tmp/x",
            &Default::default(),
            &mut &big[..8 << 20],
        )
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    drop(big);

    // Tar in and out through the client; entries counted on both sides.
    let mut tar = tar::Builder::new(Vec::new());
    for (name, mode, data) in [
        ("t/run.sh", 0o755, &b"#!/bin/sh\necho ran\n"[..]),
        ("t/d/x", 0o600, b"x"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let sum = c.copy_in(&id, "/srv", None, &mut &tar[..]).unwrap();
    assert_eq!(sum.entries, 2);
    let out = w.sh(&id, "/srv/t/run.sh && stat -c %a /srv/t/d/x");
    assert_eq!(out["stdout"], "ran\n600\n");
    let mut packed = Vec::new();
    let sum = c.copy_out(&id, "/srv/t", None, &mut packed).unwrap();
    assert_eq!(sum.bytes, packed.len() as u64);
    let names: Vec<String> = tar::Archive::new(&packed[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(sum.entries, names.len() as u64, "{names:?}");
    assert!(names.contains(&"t/d/x".to_string()), "{names:?}");

    // A watch sees a file made under it.
    assert!(c.make_dir(&id, "/tmp/w", None).unwrap());
    let watch = c.watch_dir(&id, "/tmp/w", false, None).unwrap();
    w.sh(&id, "echo x > /tmp/w/new");
    let mut events = Vec::new();
    for _ in 0..10 {
        events.extend(c.watch_events(&id, watch, Duration::from_secs(2)).unwrap());
        if events
            .iter()
            .any(|e| e.name == "new" && e.kind == FsEventKind::Create)
        {
            break;
        }
    }
    assert!(
        events
            .iter()
            .any(|e| e.name == "new" && e.kind == FsEventKind::Create),
        "{events:?}"
    );
    c.unwatch(&id, watch).unwrap();

    // A process the guest keeps: stdin from another caller, found by tag.
    let spec = ProcessSpec {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "read x; echo got $x; echo oops >&2; exit 4".into(),
        ],
        stdin: true,
        tag: Some("reader".into()),
        ..ProcessSpec::default()
    };
    let feeder = {
        let c = w.client();
        let id = id.clone();
        std::thread::spawn(move || {
            for _ in 0..200 {
                let running = c.list_processes(&id).unwrap();
                if running
                    .iter()
                    .any(|p| p.tag.as_deref() == Some("reader") && p.exit.is_none())
                {
                    return c.process_input(&id, &ProcessRef::Tag("reader".into()), b"hi\n", true);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("the process never showed up in the list");
        })
    };
    let (mut started, mut stdout, mut stderr) = (None, Vec::new(), Vec::new());
    let end = c
        .run_process(&id, &spec, &mut |ev| {
            match ev {
                ProcessEvent::Started(p) => started = Some(p),
                ProcessEvent::Stdout(b) => stdout.extend(b),
                ProcessEvent::Stderr(b) => stderr.extend(b),
                other => panic!("unexpected {other:?}"),
            }
            true
        })
        .unwrap()
        .expect("it ran to its end");
    feeder.join().unwrap().unwrap();
    assert_eq!(started.unwrap().tag.as_deref(), Some("reader"));
    assert_eq!(
        (stdout.as_slice(), stderr.as_slice()),
        (&b"got hi\n"[..], &b"oops\n"[..])
    );
    assert_eq!(end.exit_code(), 4);

    // Following a running process, and a signal ending it.
    let ticker = ProcessSpec {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "while true; do echo tick; sleep 0.2; done".into(),
        ],
        tag: Some("ticker".into()),
        ..ProcessSpec::default()
    };
    let mut pid = 0;
    let first = c
        .run_process(&id, &ticker, &mut |ev| {
            if let ProcessEvent::Started(p) = ev {
                pid = p.pid;
            }
            false // stop following at once; it keeps running
        })
        .unwrap();
    assert!(first.is_none() && pid > 0);
    let signaller = {
        let c = w.client();
        let id = id.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(800));
            c.signal_process(&id, &ProcessRef::Pid(pid), 15)
        })
    };
    let mut ticks = 0;
    let end = c
        .follow_process(&id, &ProcessRef::Tag("ticker".into()), false, &mut |ev| {
            if let ProcessEvent::Stdout(b) = ev {
                ticks += b.windows(4).filter(|w| w == b"tick").count();
            }
            true
        })
        .unwrap()
        .expect("it ended");
    signaller.join().unwrap().unwrap();
    assert!(ticks >= 1, "no output while following");
    assert_eq!((end.signal, end.exit_code()), (Some(15), 143));
    // Unknown processes and tags that are numbers are refused, by kind.
    let e = c
        .follow_process(&id, &ProcessRef::Pid(999_999), false, &mut |_| true)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    let (st, _) = w.call(
        "POST",
        &format!("{base}/processes"),
        Some(json!({"args": ["true"], "tag": "123"})),
    );
    assert_eq!(st, 400);
    let stat = c.stat(&id, "/srv/t", None).unwrap();
    assert_eq!(stat.kind, FileKind::Dir);
}

fn write_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("a.txt"), "alpha\n").unwrap();
    std::fs::set_permissions(root.join("a.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(root.join("sub/run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(
        root.join("sub/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn cp_moves_files_and_trees_both_ways_locally_and_remotely() {
    let w = World::new("cp");
    let scratch = w.home.join("scratch");
    write_tree(&scratch.join("src"));
    let forkd = |remote: bool, args: &[&str]| {
        let mut c = w.command();
        if remote {
            c.arg("--remote").arg(&w.socket);
        }
        let out = c.args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, id, err) = forkd(false, &["create"]);
    assert_eq!(code, Some(0), "{err}");
    let id = id.trim().to_string();
    let src = scratch.join("src");
    let src = src.to_str().unwrap();

    for remote in [false, true] {
        let work = if remote { "/rwork" } else { "/work" };
        // A directory becomes a path that does not exist yet.
        let (code, out, err) = forkd(remote, &["cp", "--json", src, &format!("{id}:{work}")]);
        assert_eq!(code, Some(0), "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["entries"], 5, "{v}");
        let (code, out, err) = forkd(
            false,
            &[
                "exec",
                &id,
                "--",
                "sh",
                "-c",
                &format!(
                    "cd {work} && stat -c '%n %a' a.txt sub/run.sh && readlink link && sub/run.sh"
                ),
            ],
        );
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out, "a.txt 600\nsub/run.sh 755\na.txt\nrun\n");
        // A file into an existing directory, and onto a new name with parents.
        let (code, _, err) = forkd(
            remote,
            &[
                "cp",
                "-q",
                &format!("{src}/a.txt"),
                &format!("{id}:{work}/sub"),
            ],
        );
        assert_eq!(code, Some(0), "{err}");
        let (code, _, err) = forkd(
            remote,
            &[
                "cp",
                "-q",
                &format!("{src}/a.txt"),
                &format!("{id}:/new/dirs/b.txt"),
            ],
        );
        assert_eq!(code, Some(0), "{err}");
        let (_, out, _) = forkd(
            false,
            &[
                "exec",
                &id,
                "--",
                "cat",
                &format!("{work}/sub/a.txt"),
                "/new/dirs/b.txt",
            ],
        );
        assert_eq!(out, "alpha\nalpha\n");

        // Out again: a new path, then the contents into an existing directory.
        let back = scratch.join(if remote { "rback" } else { "back" });
        let (code, _, err) = forkd(
            remote,
            &["cp", &format!("{id}:{work}"), back.to_str().unwrap()],
        );
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(
            std::fs::read_to_string(back.join("sub/run.sh")).unwrap(),
            "#!/bin/sh\necho run\n"
        );
        assert_eq!(
            (mode(&back.join("a.txt")), mode(&back.join("sub/run.sh"))),
            (0o600, 0o755)
        );
        assert_eq!(
            std::fs::read_link(back.join("link")).unwrap(),
            Path::new("a.txt")
        );
        let into = scratch.join(if remote { "rinto" } else { "into" });
        std::fs::create_dir_all(&into).unwrap();
        std::fs::write(into.join("keep"), "kept").unwrap();
        let (code, _, err) = forkd(
            remote,
            &["cp", &format!("{id}:{work}/."), into.to_str().unwrap()],
        );
        assert_eq!(code, Some(0), "{err}");
        assert!(into.join("sub/run.sh").exists() && into.join("keep").exists());
        assert!(
            std::fs::read_dir(&into).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".forkd-cp")),
            "a staging directory was left behind"
        );
        // `-` is a tar on stdout.
        let mut c = w.command();
        if remote {
            c.arg("--remote").arg(&w.socket);
        }
        let out = c
            .args(["cp", "-q", &format!("{id}:{work}/sub"), "-"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let names: Vec<String> = tar::Archive::new(&out.stdout[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"sub/run.sh".to_string()), "{names:?}");

        // Errors name the problem and leave nothing behind.
        let (code, _, err) = forkd(
            remote,
            &["cp", &format!("{id}:/nope"), back.to_str().unwrap()],
        );
        assert_eq!(code, Some(125));
        assert!(err.contains("/nope does not exist"), "{err}");
        let (code, _, err) = forkd(remote, &["cp", src, "sb-nothere:/x"]);
        assert_eq!(code, Some(125));
        assert!(err.contains("no sandbox `sb-nothere`"), "{err}");
        let (code, _, err) = forkd(remote, &["cp", src, back.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("ID:/path"), "{err}");
        let (code, _, err) = forkd(remote, &["cp", src, &format!("{id}:/new/dirs/b.txt")]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("not a directory"), "{err}");
    }
    let mut f = std::fs::File::create(scratch.join("done")).unwrap();
    f.write_all(b"ok").unwrap();
}
