//! Filesystem operations, watches and tar streams against the real client
//! over a socketpair. The agent's command root is a directory of this host
//! with its own `/etc/passwd` (a `user` account), as a root disk would be:
//! every operation runs chrooted there, as the asking user.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{tempdir, Agent};
use forkd_protocol::client::{ClientError, WriteOptions};
use forkd_protocol::{ErrorCode, FileKind, FsEvent, FsEventKind};

fn code(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Agent(r) => r.code,
        other => panic!("expected an agent error, got {other}"),
    }
}

/// A guest root: /etc/passwd with root and user (1000), /home/user owned by
/// it, /root private.
fn guest_root(tag: &str) -> PathBuf {
    let root = tempdir(tag);
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/bash\n",
    )
    .unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    fs::create_dir_all(root.join("home/user")).unwrap();
    std::os::unix::fs::chown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
    fs::create_dir_all(root.join("root")).unwrap();
    fs::set_permissions(root.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::create_dir_all(root.join("tmp")).unwrap();
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    root
}

#[test]
fn stat_list_mkdir_remove_and_move() {
    let root = guest_root("fsops");
    let agent = Agent::new(Some(root.clone()));
    let c = agent.connect();
    fs::create_dir_all(root.join("data/sub/deeper")).unwrap();
    fs::write(root.join("data/a.txt"), "hello").unwrap();
    fs::set_permissions(root.join("data/a.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(root.join("data/sub/b.txt"), "b").unwrap();
    fs::write(root.join("data/sub/deeper/c.txt"), "c").unwrap();
    // An absolute link: it must resolve inside the guest root, not the host's.
    std::os::unix::fs::symlink("/data/sub", root.join("data/link")).unwrap();
    std::os::unix::fs::chown(root.join("data/a.txt"), Some(1000), Some(1000)).unwrap();

    let a = c.stat("/data/a.txt", None).unwrap();
    assert_eq!((a.kind, a.size, a.mode), (FileKind::File, 5, 0o640));
    assert_eq!(a.permissions, "-rw-r-----");
    assert_eq!((a.name.as_str(), a.path.as_str()), ("a.txt", "/data/a.txt"));
    assert_eq!((a.owner.as_str(), a.group.as_str()), ("user", "user"));
    assert!(a.mtime_ns > 0);
    let l = c.stat("/data/link", None).unwrap();
    assert_eq!(l.kind, FileKind::Symlink);
    assert_eq!(l.target_kind, Some(FileKind::Dir));
    assert_eq!(l.symlink_target.as_deref(), Some("/data/sub"));
    assert!(l.permissions.starts_with('L'));
    assert_eq!(
        code(c.stat("/data/missing", None).unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(c.stat("/data/a.txt/x", None).unwrap_err()),
        ErrorCode::NotADirectory
    );

    let names = |entries: Vec<forkd_protocol::FileInfo>| {
        let mut v: Vec<String> = entries.into_iter().map(|e| e.path).collect();
        v.sort();
        v
    };
    assert_eq!(
        names(c.list_dir("/data", 1, None).unwrap()),
        ["/data/a.txt", "/data/link", "/data/sub"]
    );
    // Depth 2 goes into sub, not through the link.
    assert_eq!(
        names(c.list_dir("/data", 2, None).unwrap()),
        [
            "/data/a.txt",
            "/data/link",
            "/data/sub",
            "/data/sub/b.txt",
            "/data/sub/deeper"
        ]
    );
    assert_eq!(
        code(c.list_dir("/data/a.txt", 1, None).unwrap_err()),
        ErrorCode::NotADirectory
    );
    assert_eq!(
        code(c.list_dir("/nope", 1, None).unwrap_err()),
        ErrorCode::NotFound
    );

    c.make_dir("/made/with/parents", Some(0o750), None).unwrap();
    let m = fs::metadata(root.join("made/with/parents")).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.mode() & 0o777, 0o750);
    assert_eq!(
        code(c.make_dir("/made/with/parents", None, None).unwrap_err()),
        ErrorCode::AlreadyExists
    );
    assert_eq!(
        code(c.make_dir("/data/a.txt", None, None).unwrap_err()),
        ErrorCode::NotADirectory
    );

    assert_eq!(
        code(c.remove("/data/sub", false, None).unwrap_err()),
        ErrorCode::NotEmpty
    );
    c.remove("/data/sub/deeper/c.txt", false, None).unwrap();
    c.remove("/data/sub", true, None).unwrap();
    assert!(!root.join("data/sub").exists());
    assert_eq!(
        code(c.remove("/data/sub", true, None).unwrap_err()),
        ErrorCode::NotFound
    );

    let moved = c
        .rename("/data/a.txt", "/elsewhere/new/a2.txt", None)
        .unwrap();
    assert_eq!(moved.path, "/elsewhere/new/a2.txt");
    assert_eq!(moved.size, 5);
    assert_eq!(
        fs::read(root.join("elsewhere/new/a2.txt")).unwrap(),
        b"hello"
    );
    assert_eq!(
        code(c.rename("/data/a.txt", "/x", None).unwrap_err()),
        ErrorCode::NotFound
    );
    // A directory is not a file to read.
    assert_eq!(
        code(c.read_file("/made", Vec::new()).unwrap_err()),
        ErrorCode::IsADirectory
    );
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_user_acts_with_its_own_permissions_and_owns_what_it_creates() {
    let root = guest_root("asuser");
    let agent = Agent::new(Some(root.clone()));
    let c = agent.connect();
    let opts = WriteOptions {
        mode: None,
        parents: true,
        user: Some("user".into()),
    };
    // Relative paths and ~ are the user's home.
    c.write_file_with("notes/today.txt", &opts, &b"mine"[..])
        .unwrap();
    let f = root.join("home/user/notes/today.txt");
    assert_eq!(fs::read(&f).unwrap(), b"mine");
    assert_eq!(fs::metadata(&f).unwrap().uid(), 1000);
    assert_eq!(fs::metadata(f.parent().unwrap()).unwrap().uid(), 1000);
    assert_eq!(
        c.stat("~/notes/today.txt", Some("user")).unwrap().owner,
        "user"
    );
    c.make_dir("~/d", None, Some("user")).unwrap();
    assert_eq!(fs::metadata(root.join("home/user/d")).unwrap().gid(), 1000);
    // /root is root's alone.
    let e = c
        .write_file_with("/root/secret", &opts, &b"x"[..])
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::PermissionDenied);
    assert_eq!(
        code(c.list_dir("/root", 1, Some("user")).unwrap_err()),
        ErrorCode::PermissionDenied
    );
    // Root can; without parents a missing directory is NotFound.
    let e = c
        .write_file_with("/root/deep/x", &WriteOptions::default(), &b"x"[..])
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::NotFound);
    c.write_file_with(
        "/root/deep/x",
        &WriteOptions {
            parents: true,
            ..WriteOptions::default()
        },
        &b"x"[..],
    )
    .unwrap();
    assert_eq!(fs::read(root.join("root/deep/x")).unwrap(), b"x");
    assert_eq!(
        code(c.stat("/x", Some("nobody-at-all")).unwrap_err()),
        ErrorCode::UnknownUser
    );
    fs::remove_dir_all(root).unwrap();
}

fn poll_until(
    c: &forkd_protocol::client::AgentClient,
    watch: u32,
    want: &[FsEvent],
) -> Vec<FsEvent> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !want.iter().all(|w| seen.contains(w)) {
        assert!(Instant::now() < deadline, "saw {seen:?}, want {want:?}");
        seen.extend(
            c.watch_poll(watch, Duration::from_millis(500))
                .unwrap()
                .events,
        );
    }
    seen
}

fn ev(name: &str, kind: FsEventKind) -> FsEvent {
    FsEvent {
        name: name.into(),
        kind,
    }
}

#[test]
fn watches_report_changes_and_outlive_the_session() {
    let root = guest_root("watch");
    let agent = Agent::new(Some(root.clone()));
    let c = agent.connect();
    fs::create_dir_all(root.join("w")).unwrap();
    let id = c.watch_start("/w", true, None).unwrap();
    // Nothing happened: a poll waits its time and returns nothing.
    let t = Instant::now();
    assert!(c
        .watch_poll(id, Duration::from_millis(300))
        .unwrap()
        .events
        .is_empty());
    assert!(t.elapsed() >= Duration::from_millis(250));

    let w = root.join("w");
    fs::write(w.join("a.txt"), "1").unwrap();
    fs::write(w.join("a.txt"), "12").unwrap();
    fs::set_permissions(w.join("a.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(w.join("a.txt"), w.join("b.txt")).unwrap();
    fs::remove_file(w.join("b.txt")).unwrap();
    poll_until(
        &c,
        id,
        &[
            ev("a.txt", FsEventKind::Create),
            ev("a.txt", FsEventKind::Write),
            ev("a.txt", FsEventKind::Chmod),
            ev("a.txt", FsEventKind::Rename),
            ev("b.txt", FsEventKind::Create),
            ev("b.txt", FsEventKind::Remove),
        ],
    );
    // A subdirectory made after the start is watched too.
    fs::create_dir(w.join("sub")).unwrap();
    poll_until(&c, id, &[ev("sub", FsEventKind::Create)]);
    // The watch lives in the agent: a later session polls it.
    drop(c);
    let c = agent.connect();
    fs::write(w.join("sub/inner.txt"), "x").unwrap();
    poll_until(&c, id, &[ev("sub/inner.txt", FsEventKind::Create)]);
    c.watch_stop(id).unwrap();
    assert_eq!(
        code(c.watch_poll(id, Duration::ZERO).unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(c.watch_start("/no/such/dir", false, None).unwrap_err()),
        ErrorCode::NotFound
    );
    // A non-recursive watch does not see into subdirectories.
    let flat = c.watch_start("/w", false, None).unwrap();
    fs::write(w.join("sub/ignored.txt"), "x").unwrap();
    fs::write(w.join("top.txt"), "x").unwrap();
    let seen = poll_until(&c, flat, &[ev("top.txt", FsEventKind::Create)]);
    assert!(!seen.iter().any(|e| e.name.contains("ignored")), "{seen:?}");
    c.watch_stop(flat).unwrap();
    fs::remove_dir_all(root).unwrap();
}

/// (path, mode, file content, link target) of every entry under a directory.
type Tree = Vec<(String, u32, Option<Vec<u8>>, Option<PathBuf>)>;

fn tree(dir: &Path) -> Tree {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            if m.file_type().is_symlink() {
                out.push((rel, 0, None, Some(fs::read_link(&p).unwrap())));
            } else if m.is_dir() {
                out.push((rel, m.mode() & 0o7777, None, None));
                stack.push(p);
            } else {
                out.push((rel, m.mode() & 0o7777, Some(fs::read(&p).unwrap()), None));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn tar_streams_copy_trees_both_ways_keeping_modes_and_links() {
    let root = guest_root("tar");
    let agent = Agent::new(Some(root.clone()));
    let c = agent.connect();
    let src = root.join("src/proj");
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::create_dir_all(src.join("empty")).unwrap();
    fs::write(src.join("README"), "read me").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(src.join("big.bin"), &big).unwrap();
    fs::write(src.join("bin/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(src.join("bin/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(src.join("bin"), fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink("bin/run.sh", src.join("link")).unwrap();

    let mut archive = Vec::new();
    let out = c.tar_read("/src/proj", None, &mut archive).unwrap();
    assert_eq!(out.bytes, archive.len() as u64);
    assert_eq!(out.entries, 7);
    // Into a directory that does not exist yet (parents are created).
    let back = c.tar_write("/dst/a/b", None, &archive[..]).unwrap();
    assert_eq!(back.entries, 7);
    assert_eq!(back.bytes, archive.len() as u64);
    assert_eq!(tree(&src), tree(&root.join("dst/a/b/proj")));
    // One file.
    let mut one = Vec::new();
    assert_eq!(
        c.tar_read("/src/proj/README", None, &mut one)
            .unwrap()
            .entries,
        1
    );
    c.tar_write("/single", Some("user"), &one[..]).unwrap_err();
    c.tar_write("~/single", Some("user"), &one[..]).unwrap();
    let f = root.join("home/user/single/README");
    assert_eq!(fs::read(&f).unwrap(), b"read me");
    assert_eq!(fs::metadata(&f).unwrap().uid(), 1000);
    // Errors: a missing source, garbage instead of an archive, and the
    // session is fine afterwards.
    assert_eq!(
        code(c.tar_read("/nope", None, Vec::new()).unwrap_err()),
        ErrorCode::NotFound
    );
    let garbage = vec![0x5au8; 10_000];
    assert!(c.tar_write("/g", None, &garbage[..]).is_err());
    assert!(c.ping(Duration::from_secs(5)).is_ok());
    fs::remove_dir_all(root).unwrap();
}
