//! The agent's protocol-2 capabilities in real guests (QEMU and the Debian
//! kernel; TCG here): what E2B's SDK and the MCP server need below the
//! operations seam. Processes that outlive the host connection, bash in the
//! default image, exit-code conventions, files, tar and watches on the root
//! disk, the TCP relay, eval and the code interpreter in `debian-python`,
//! and their state inherited by spawned children.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::sh;
use forkd_core::{ArtifactOptions, Artifacts, BootOptions, Env, Fleet, Image};
use forkd_ops::PartialFailure;
use forkd_protocol::client::{AgentClient, AttachEvent, Attachment, ClientError, WriteOptions};
use forkd_protocol::{
    AttachOptions, ErrorCode, ExecRequest, FileKind, FsEventKind, ProcSelector, ProcSpec, PtySize,
};

const T: Option<Duration> = Some(Duration::from_secs(60));

fn code(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Agent(r) => r.code,
        other => panic!("expected an agent error, got {other}"),
    }
}

/// Everything an attachment delivers, to its end.
fn follow(mut a: Attachment) -> (String, String, Option<forkd_protocol::ExitStatus>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match a.next(T).unwrap() {
            AttachEvent::Stdout(b) | AttachEvent::Pty(b) => out.extend(b),
            AttachEvent::Stderr(b) => err.extend(b),
            AttachEvent::Dropped(n) => panic!("{n} bytes dropped"),
            AttachEvent::Ended(s) => {
                return (
                    String::from_utf8_lossy(&out).into(),
                    String::from_utf8_lossy(&err).into(),
                    Some(s),
                )
            }
            AttachEvent::Detached => {
                return (
                    String::from_utf8_lossy(&out).into(),
                    String::from_utf8_lossy(&err).into(),
                    None,
                )
            }
        }
    }
}

fn replay() -> AttachOptions {
    AttachOptions {
        replay: true,
        backpressure: false,
    }
}

/// A fleet of its own (state database, runtime directory).
struct World {
    env: Env,
    fleet: Fleet,
}

impl World {
    fn new(name: &str) -> World {
        let root =
            std::env::temp_dir().join(format!("forkd-agentcaps-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let env = Env {
            home: root.join("home"),
            runtime: root.join("run"),
        };
        let fleet = Fleet::open(&env).unwrap();
        World { env, fleet }
    }

    fn create(&self, artifacts: &Artifacts, image: &str) -> String {
        let opts = BootOptions {
            mem_mib: 512,
            ..BootOptions::default()
        };
        self.fleet.create(artifacts, image, &opts).unwrap().0.id
    }
}

impl Drop for World {
    fn drop(&mut self) {
        common::kill_all(&self.fleet);
        let _ = std::fs::remove_dir_all(self.env.home.parent().unwrap());
        let _ = std::fs::remove_dir_all(&self.env.runtime);
    }
}

/// The debian-python artifacts (the image is built by scripts/setup.sh).
fn python_artifacts() -> Artifacts {
    let opts = ArtifactOptions {
        image: Image::Recipe("debian-python".parse().unwrap()),
        ..ArtifactOptions::default()
    };
    forkd_core::artifacts::ensure(&Env::from_process(), &opts, &|m| eprintln!("{m}"))
        .expect("the debian-python image (scripts/setup.sh builds it)")
}

#[test]
fn bash_and_the_exit_code_conventions_in_the_default_image() {
    let s = common::boot();
    let agent = s.vm().agent();
    // E2B's SDK runs every command like this.
    let out = s
        .exec_collect(ExecRequest {
            argv: vec![
                "/bin/bash".into(),
                "-l".into(),
                "-c".into(),
                "echo ${BASH_VERSION%%.*}; echo $((6 * 7)); [[ -n $HOME ]] && echo $HOME".into(),
            ],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(out.status.code, Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "5\n42\n/root\n");
    // A program that does not exist: 127 in the result, one line saying so.
    let out = s
        .exec_collect(ExecRequest {
            argv: vec!["no-such-program".into()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(out.status.code, Some(127));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "no-such-program: command not found\n"
    );
    // Through bash it is bash's 127.
    let out = s
        .exec_collect(ExecRequest {
            argv: vec![
                "/bin/bash".into(),
                "-l".into(),
                "-c".into(),
                "nope-nope".into(),
            ],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(out.status.code, Some(127));
    // A missing working directory is its own error, not a missing program.
    let e = s
        .exec_collect(ExecRequest {
            argv: vec!["true".into()],
            cwd: Some("/no/such/dir".into()),
            ..Default::default()
        })
        .unwrap_err();
    match e {
        forkd_core::CoreError::Vm(forkd_vm::VmError::Agent(ClientError::Agent(r))) => {
            assert_eq!(r.code, ErrorCode::CwdNotFound);
            assert!(r.message.contains("/no/such/dir"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
    // The image's unprivileged account, E2B's default user.
    let mut spec = ProcSpec::new([
        "/bin/bash",
        "-l",
        "-c",
        "id -u; id -g; echo $HOME $USER; pwd",
    ]);
    spec.user = Some("user".into());
    let (out, err, status) = follow(agent.proc_start_attached(spec, true).unwrap());
    assert_eq!(status.unwrap().code, Some(0), "{err}");
    assert_eq!(out, "1000\n1000\n/home/user user\n/home/user\n");
    let e = agent
        .proc_start({
            let mut p = ProcSpec::new(["true"]);
            p.cwd = Some("/nope".into());
            p
        })
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::CwdNotFound);
}

#[test]
fn processes_outlive_the_session_with_stdin_signals_and_a_terminal() {
    let w = World::new("procs");
    let id = w.create(common::artifacts(), "busybox");
    let (cat, sleeper) = {
        let vm = w.fleet.attach(&id).unwrap();
        let a = vm.agent();
        a.set_env(&[("FROM_CREATE".into(), "yes".into())]).unwrap();
        let mut spec = ProcSpec::shell("echo \"started $FROM_CREATE\"; cat");
        spec.stdin = true;
        spec.tag = Some("cat".into());
        let cat = a.proc_start(spec).unwrap();
        let mut spec = ProcSpec::new(["/bin/bash", "-c", "sleep 300 & wait"]);
        spec.timeout_ms = Some(600_000);
        let sleeper = a.proc_start(spec).unwrap();
        (cat, sleeper)
        // The session ends here, as the daemon's idle sessions do.
    };
    // Another command in between, on another session.
    common::run_ok(&w.fleet, &id, "true");
    let vm = w.fleet.attach(&id).unwrap();
    let a = vm.agent();
    let listed = a.proc_list().unwrap();
    for pid in [cat.pid, sleeper.pid] {
        let p = listed.iter().find(|p| p.pid == pid).expect("still listed");
        assert!(p.exit.is_none(), "{p:?}");
    }
    let att = a
        .proc_attach(ProcSelector::Tag("cat".into()), replay())
        .unwrap();
    a.proc_input(ProcSelector::Tag("cat".into()), b"line one\n", false)
        .unwrap();
    a.proc_input(cat.pid, b"line two\n", true).unwrap();
    let (out, _, status) = follow(att);
    assert_eq!(out, "started yes\nline one\nline two\n");
    assert_eq!(status.unwrap().code, Some(0));
    // A signal reaches bash and its child; the end says so.
    a.proc_signal(sleeper.pid, 9).unwrap();
    let st = a.proc_wait(sleeper.pid, T).unwrap();
    assert_eq!(st.signal, Some(9));
    assert_eq!(
        code(a.proc_signal(sleeper.pid, 9).unwrap_err()),
        ErrorCode::NotFound
    );
    // A terminal: size, echo, resize.
    let mut spec = ProcSpec::new([
        "/bin/sh",
        "-c",
        "stty size; read x; echo \"<$x>\"; stty size",
    ]);
    spec.pty = Some(PtySize { cols: 80, rows: 24 });
    let mut att = a.proc_start_attached(spec, true).unwrap();
    let pid = att.info().pid;
    let mut seen = String::new();
    while !seen.contains("24 80") {
        match att.next(T).unwrap() {
            AttachEvent::Pty(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("{other:?} after {seen:?}"),
        }
    }
    a.proc_resize(
        pid,
        PtySize {
            cols: 120,
            rows: 40,
        },
    )
    .unwrap();
    a.proc_input(pid, b"typed\n", false).unwrap();
    let (out, _, status) = follow(att);
    assert!(out.contains("<typed>") && out.contains("40 120"), "{out:?}");
    assert_eq!(status.unwrap().code, Some(0));
}

#[test]
fn files_tar_and_watches_on_the_root_disk() {
    let s = common::boot();
    let a = s.vm().agent();
    // Write as the user, creating parents; it owns what it made.
    let opts = WriteOptions {
        mode: Some(0o640),
        parents: true,
        user: Some("user".into()),
    };
    a.write_file_with("~/proj/src/main.py", &opts, &b"print('hi')\n"[..])
        .unwrap();
    let info = a.stat("/home/user/proj/src/main.py", None).unwrap();
    assert_eq!(
        (info.kind, info.size, info.mode),
        (FileKind::File, 12, 0o640)
    );
    assert_eq!((info.owner.as_str(), info.group.as_str()), ("user", "user"));
    assert_eq!(info.permissions, "-rw-r-----");
    assert_eq!(a.stat("/home/user/proj", None).unwrap().owner, "user");
    // The user may not write into root's home.
    let e = a.write_file_with("/root/x", &opts, &b"x"[..]).unwrap_err();
    assert_eq!(code(e), ErrorCode::PermissionDenied);
    a.make_dir("/home/user/proj/empty", None, Some("user"))
        .unwrap();
    assert_eq!(
        code(a.make_dir("/home/user/proj/empty", None, None).unwrap_err()),
        ErrorCode::AlreadyExists
    );
    let mut names: Vec<String> = a
        .list_dir("/home/user/proj", 2, None)
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "/home/user/proj/empty",
            "/home/user/proj/src",
            "/home/user/proj/src/main.py"
        ]
    );
    assert_eq!(
        code(a.read_file("/home/user/proj", Vec::new()).unwrap_err()),
        ErrorCode::IsADirectory
    );
    // A tree out of the guest and into another place, modes kept.
    s.exec_collect(sh(
        "ln -s src/main.py /home/user/proj/link; chmod 750 /home/user/proj/src",
    ))
    .unwrap();
    let mut archive = Vec::new();
    let sent = a.tar_read("/home/user/proj", None, &mut archive).unwrap();
    assert_eq!(sent.entries, 5);
    let got = a.tar_write("/tmp/copy/of", None, &archive[..]).unwrap();
    assert_eq!(got.entries, 5);
    let out = s
        .exec_collect(sh(
            "cd /tmp/copy/of/proj && stat -c '%n %a' src src/main.py && readlink link && cat src/main.py",
        ))
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "src 750\nsrc/main.py 640\nsrc/main.py\nprint('hi')\n"
    );
    let moved = a
        .rename("/tmp/copy/of/proj", "/tmp/moved/proj", None)
        .unwrap();
    assert_eq!(moved.kind, FileKind::Dir);
    a.remove("/tmp/moved", true, None).unwrap();
    assert_eq!(
        code(a.stat("/tmp/moved", None).unwrap_err()),
        ErrorCode::NotFound
    );
    // A watch sees a command's changes.
    let watch = a.watch_start("/home/user/proj", true, None).unwrap();
    s.exec_collect(sh(
        "echo x > /home/user/proj/new.txt; mkdir /home/user/proj/d; echo y > /home/user/proj/d/in.txt; rm /home/user/proj/new.txt",
    ))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let want = [
        ("new.txt", FsEventKind::Create),
        ("d", FsEventKind::Create),
        ("d/in.txt", FsEventKind::Create),
        ("new.txt", FsEventKind::Remove),
    ];
    while !want.iter().all(|(n, k)| {
        seen.iter()
            .any(|e: &forkd_protocol::FsEvent| e.name == *n && e.kind == *k)
    }) {
        assert!(Instant::now() < deadline, "{seen:?}");
        seen.extend(a.watch_poll(watch, Duration::from_secs(1)).unwrap().events);
    }
    a.watch_stop(watch).unwrap();
}

#[test]
fn a_relay_reaches_a_port_in_the_guest() {
    let s = common::boot();
    let a = s.vm().agent();
    let e = a.tcp_connect(8080, Duration::from_secs(10)).unwrap_err();
    assert_eq!(code(e), ErrorCode::ConnectionRefused);
    a.write_file_with(
        "/www/index.html",
        &WriteOptions {
            parents: true,
            ..WriteOptions::default()
        },
        &b"hello from the guest\n"[..],
    )
    .unwrap();
    let httpd = a
        .proc_start(ProcSpec::new([
            "busybox",
            "httpd",
            "-f",
            "-p",
            "127.0.0.1:8080",
            "-h",
            "/www",
        ]))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let relay = loop {
        match a.tcp_connect(8080, Duration::from_secs(10)) {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(code(e), ErrorCode::ConnectionRefused);
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let (mut r, mut w) = relay.split();
    w.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    r.set_timeout(T);
    r.read_to_string(&mut resp).unwrap();
    assert!(
        resp.starts_with("HTTP/1.") && resp.contains(" 200 "),
        "{resp}"
    );
    assert!(resp.ends_with("hello from the guest\n"), "{resp}");
    w.shutdown().unwrap();
    a.proc_signal(httpd.pid, 15).unwrap();
}

/// One HTTP/1.1 request over a relay; the response text.
fn http(a: &AgentClient, port: u16, method: &str, path: &str, body: &str) -> String {
    let relay = a.tcp_connect(port, Duration::from_secs(10)).unwrap();
    let (mut r, mut w) = relay.split();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    w.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    r.set_timeout(Some(Duration::from_secs(120)));
    r.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn eval_and_the_code_interpreter_keep_state_into_spawned_children() {
    let w = World::new("eval");
    let artifacts = python_artifacts();
    let parent = w.create(&artifacts, "debian-python");
    let t = Some(Duration::from_secs(120));
    {
        let vm = w.fleet.attach(&parent).unwrap();
        let a = vm.agent();
        let r = a.eval_collect("x = 41\nprint('set')", &[], t).unwrap();
        assert_eq!(r.stdout, b"set\n");
        let r = a.eval_collect("x + 1", &[], t).unwrap();
        assert_eq!(r.result.value.as_deref(), Some("42"));
        let r = a.eval_collect("1/0", &[], t).unwrap();
        assert_eq!(r.result.error.unwrap().name, "ZeroDivisionError");
        // E2B's code interpreter on its port, reached through the relay.
        a.code_interpreter(49999, None, Duration::from_secs(180))
            .unwrap();
        let resp = http(
            a,
            49999,
            "POST",
            "/execute",
            r#"{"code":"y = 'from-parent'\ny"}"#,
        );
        assert!(resp.contains(r#""text": "from-parent""#), "{resp}");
        // A background process, to be found in the children.
        let mut spec = ProcSpec::shell("while :; do sleep 1; done");
        spec.tag = Some("ticker".into());
        a.proc_start(spec).unwrap();
    }
    w.fleet.snapshot(&parent, "py-warm").unwrap();
    let kids: Vec<_> = w
        .fleet
        .spawn("py-warm", 1, 1, true, PartialFailure::Keep, &|_, _| {})
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let child = &kids[0].sandbox.id;
    let vm = w.fleet.attach(child).unwrap();
    let a = vm.agent();
    // The interpreter is in guest memory: the child has its variables.
    let r = a.eval_collect("x * 2", &[], t).unwrap();
    assert_eq!(r.result.value.as_deref(), Some("82"));
    let resp = http(
        a,
        49999,
        "POST",
        "/execute",
        r#"{"code":"y + '-in-child'"}"#,
    );
    assert!(resp.contains(r#""text": "from-parent-in-child""#), "{resp}");
    // And the agent's process table.
    let ticker = a
        .proc_list()
        .unwrap()
        .into_iter()
        .find(|p| p.tag.as_deref() == Some("ticker"))
        .expect("the parent's process is in the child's table");
    assert!(ticker.exit.is_none());
    a.proc_signal(ticker.pid, 9).unwrap();
    assert_eq!(a.proc_wait(ticker.pid, T).unwrap().signal, Some(9));
    // The child's state is its own: the parent still has x = 41.
    a.eval_collect("x = 0", &[], t).unwrap();
    drop(vm);
    let vm = w.fleet.attach(&parent).unwrap();
    let r = vm.agent().eval_collect("x", &[], t).unwrap();
    assert_eq!(r.result.value.as_deref(), Some("41"));
}
