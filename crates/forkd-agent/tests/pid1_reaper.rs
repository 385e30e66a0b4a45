//! The PID-1 reaper (`waitpid(-1)` for every child) with the real server.
//! Its own test binary: reaping all children is only safe in a process whose
//! children are all the agent's.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use forkd_agent::reaper::Reaper;
use forkd_agent::server::{Config, Server};
use forkd_protocol::client::{AgentClient, ClientError};
use forkd_protocol::{ErrorCode, ExecRequest, FrameReader, ProcSpec};

#[test]
fn pid1_reaper_serves_execs_failed_spawns_and_orphans() {
    let (host, guest) = UnixStream::pair().unwrap();
    let server = Server::new(
        Config {
            root: None,
            reaper: Reaper::pid1().unwrap(),
            power_off: false,
        },
        Box::new(guest.try_clone().unwrap()),
    );
    std::thread::spawn(move || server.serve(&mut FrameReader::new(guest)));
    let c = AgentClient::connect(host, Duration::from_secs(5)).unwrap();
    let sh = |s: &str| ExecRequest {
        argv: vec!["sh".into(), "-c".into(), s.into()],
        ..Default::default()
    };
    for _ in 0..5 {
        // A failed exec: std waits for that child itself; the reaper must
        // not steal it. It is reported as the shell does: exit code 127.
        let out = c
            .exec_collect(
                ExecRequest {
                    argv: vec!["/does/not/exist".into()],
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        assert_eq!(out.status.code, Some(127));
        // And the same for an agent process, which reports it as an error.
        let e = c.proc_start(ProcSpec::new(["/does/not/exist"]));
        assert!(
            matches!(e, Err(ClientError::Agent(ref r)) if r.code == ErrorCode::CommandNotFound),
            "{e:?}"
        );
        let p = c.proc_start(ProcSpec::shell("exit 4")).unwrap();
        assert_eq!(
            c.proc_wait(p.pid, Some(Duration::from_secs(10)))
                .unwrap()
                .code,
            Some(4)
        );
        // Children that exit at once, and orphans left behind.
        let out = c.exec_collect(sh("(sleep 0.01 &) ; exit 5"), None).unwrap();
        assert_eq!(out.status.code, Some(5));
    }
    assert!(c.ping(Duration::from_secs(5)).is_ok());
}
