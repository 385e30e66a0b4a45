//! Each sandbox's network gateway (`forkd-net`): started before its QEMU on
//! the socket QEMU's NIC connects to, and gone when that QEMU is. A sandbox
//! that outlives its caller gets a detached helper (this executable re-run,
//! see [`crate::helper`]) that drops to its QEMU's unprivileged uid once
//! its socket is bound; an ephemeral one (and a program that cannot host
//! helpers) serves it on a thread of its own.
//!
//! Also the one mapping between the rules as recorded ([`forkd_vm::Egress`])
//! and as reported ([`forkd_ops::NetworkPolicy`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forkd_net::{EgressPolicy, Mode};
use forkd_ops::{Network, NetworkPolicy};
use forkd_vm::{Egress, VmConfig};

use crate::helper::{self, Job};
use crate::CoreError;

/// How long a gateway waits for its QEMU to connect.
const ACCEPT_WITHIN: Duration = Duration::from_secs(120);
/// How long a caller waits for a detached gateway's socket.
const SOCKET_WITHIN: Duration = Duration::from_secs(10);

/// The rules of `egress`, parsed; a rule that does not parse is the
/// caller's mistake.
pub(crate) fn policy_of(egress: &Egress) -> Result<EgressPolicy, CoreError> {
    let mode = if egress.deny_all {
        Mode::None
    } else {
        Mode::Default
    };
    EgressPolicy::parse(mode, &egress.allow_out, &egress.deny_out)
        .map_err(|e| CoreError::BadRequest(e.to_string()))
}

/// The network a VM with `config` has, as the seam reports it.
pub(crate) fn view(config: &VmConfig) -> NetworkPolicy {
    let mode = match config.network {
        forkd_vm::Network::None => Network::None,
        forkd_vm::Network::User => Network::Slirp,
        forkd_vm::Network::Gateway if config.egress.deny_all => Network::None,
        forkd_vm::Network::Gateway => Network::Default,
    };
    NetworkPolicy {
        mode,
        allow_out: config.egress.allow_out.clone(),
        deny_out: config.egress.deny_out.clone(),
    }
}

/// Starts the gateway of a VM about to launch with `config` (nothing when
/// it has no gateway NIC); returns once the socket accepts connections.
/// `detached`: the gateway must outlive this process (a helper), else it
/// runs on a thread and dies with this process.
pub(crate) fn start(config: &VmConfig, detached: bool) -> Result<(), CoreError> {
    if config.network != forkd_vm::Network::Gateway {
        return Ok(());
    }
    let socket = config
        .net_socket
        .clone()
        .ok_or_else(|| CoreError::Network("the VM has a gateway NIC but no socket".into()))?;
    let policy = policy_of(&config.egress)?;
    // Decide (and record) the VM's uid now, before a helper or QEMU asks.
    qemu_user(&socket)?;
    if detached && helper::can_host() {
        helper::start(&Job::NetGateway {
            socket: socket.clone(),
            egress: config.egress.clone(),
        })?;
        return wait_for(&socket);
    }
    let listener = bind(&socket)?;
    std::thread::Builder::new()
        .name("forkd-net".into())
        .spawn(move || {
            let _ = forkd_net::gateway::serve_listener(listener, policy, ACCEPT_WITHIN);
        })
        .map_err(|e| CoreError::Network(format!("starting its thread: {e}")))?;
    Ok(())
}

/// Binds the socket and gives it to the user QEMU will run as.
fn bind(socket: &Path) -> Result<std::os::unix::net::UnixListener, CoreError> {
    let listener =
        forkd_net::gateway::bind(socket).map_err(|e| CoreError::Network(e.to_string()))?;
    if let Some(r) = qemu_user(socket)? {
        std::os::unix::fs::chown(socket, Some(r.uid), Some(r.gid))
            .map_err(CoreError::host("handing QEMU the gateway socket", socket))?;
    }
    Ok(listener)
}

/// The user the QEMU whose gateway listens on `socket` runs as (the
/// gateway drops to the same one).
fn qemu_user(socket: &Path) -> Result<Option<forkd_vm::confine::RunAs>, CoreError> {
    let dir = socket.parent().unwrap_or(Path::new("/"));
    forkd_vm::confine::run_as_for(dir).map_err(|e| CoreError::Network(e.to_string()))
}

fn wait_for(socket: &Path) -> Result<(), CoreError> {
    let deadline = Instant::now() + SOCKET_WITHIN;
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(CoreError::Network(format!(
                "its socket {} did not appear within {SOCKET_WITHIN:?}",
                socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The detached helper's job: bind, drop to QEMU's user, serve until QEMU
/// hangs up.
pub(crate) fn run_helper(socket: PathBuf, egress: Egress) -> Result<(), CoreError> {
    let policy = policy_of(&egress)?;
    let listener = bind(&socket)?;
    if let Some(r) = qemu_user(&socket)? {
        drop_privileges(r)?;
    }
    forkd_net::gateway::serve_listener(listener, policy, ACCEPT_WITHIN)
        .map_err(|e| CoreError::Network(e.to_string()))
}

/// Becomes `r` for good: no supplementary groups, its gid, its uid (all
/// three ids of each), and no way back.
fn drop_privileges(r: forkd_vm::confine::RunAs) -> Result<(), CoreError> {
    let fail = |what: &str| {
        CoreError::Network(format!(
            "dropping to uid {} gid {} ({what}): {}",
            r.uid,
            r.gid,
            std::io::Error::last_os_error()
        ))
    };
    // SAFETY: plain syscalls on this process's credentials; no memory is
    // passed except the null group list of length 0.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setresgid(r.gid, r.gid, r.gid) != 0 {
            return Err(fail("setresgid"));
        }
        if libc::setresuid(r.uid, r.uid, r.uid) != 0 {
            return Err(fail("setresuid"));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(fail("no_new_privs"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_checked_and_reported_as_given() {
        let e = Egress {
            deny_all: false,
            allow_out: vec!["pypi.org".into()],
            deny_out: vec!["not a rule".into()],
        };
        let err = policy_of(&e).unwrap_err();
        assert!(matches!(err, CoreError::BadRequest(_)), "{err}");
        assert!(err.to_string().contains("\"not a rule\""));
        let ok = Egress {
            deny_out: vec!["10.0.0.0/8".into()],
            ..e
        };
        assert_eq!(policy_of(&ok).unwrap().mode, Mode::Default);
        assert_eq!(
            policy_of(&Egress {
                deny_all: true,
                ..Egress::default()
            })
            .unwrap()
            .mode,
            Mode::None
        );
    }
}
