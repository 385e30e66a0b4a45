//! Agent sessions shared by concurrent calls to one sandbox.
//!
//! The guest agent serves one connection at a time and its protocol
//! multiplexes requests, so a long-lived process (the daemon, an MCP server)
//! keeps one connection per sandbox for all its calls, and closes it when it
//! has been idle for [`IDLE`] so that other processes (the CLI) can connect.
//! Two calls that arrive together share one connection: the second waits for
//! the first to open it instead of opening another (which would block on the
//! agent until the first closes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkd_vm::Vm;

/// How long an unused session is kept open.
pub const IDLE: Duration = Duration::from_secs(2);

/// One agent connection to a sandbox.
pub struct Session {
    vm: Vm,
    last_used: Mutex<Instant>,
}

impl Session {
    pub(crate) fn new(vm: Vm) -> Session {
        Session {
            vm,
            last_used: Mutex::new(Instant::now()),
        }
    }

    /// The VM handle (agent session; QMP connects lazily, only if used).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Marks the session used now (it is not idle).
    pub fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn usable(&self) -> bool {
        self.vm.is_alive() && self.vm.agent().closed_reason().is_none()
    }
}

/// The open sessions of one process.
#[derive(Default)]
pub(crate) struct Sessions {
    open: Mutex<HashMap<String, Arc<Session>>>,
    /// One gate per sandbox around opening its session.
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl Sessions {
    /// The session of sandbox `id`, opened with `connect` if there is none
    /// that still works.
    pub(crate) fn get<E>(
        &self,
        id: &str,
        connect: impl FnOnce() -> Result<Vm, E>,
    ) -> Result<Arc<Session>, E> {
        if let Some(s) = self.cached(id) {
            return Ok(s);
        }
        let gate = self
            .opening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone();
        let _opening = gate.lock().unwrap_or_else(|p| p.into_inner());
        // Someone else may have opened it while we waited.
        if let Some(s) = self.cached(id) {
            return Ok(s);
        }
        let s = Arc::new(Session::new(connect()?));
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), s.clone());
        Ok(s)
    }

    fn cached(&self, id: &str) -> Option<Arc<Session>> {
        let map = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.get(id)?;
        if s.usable() {
            s.touch();
            return Some(s.clone());
        }
        None
    }

    /// Forgets the session of `id` (it broke, or the sandbox is going).
    pub(crate) fn drop_session(&self, id: &str) {
        self.opening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Whether a call of this process holds sandbox `id`'s session now (a
    /// long exec or a followed process: the sandbox is not idle).
    pub(crate) fn busy(&self, id: &str) -> bool {
        let map = self.open.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).is_some_and(|s| Arc::strong_count(s) > 1)
    }

    /// Closes sessions nobody used for [`IDLE`] and nobody holds.
    pub(crate) fn close_idle(&self) {
        let mut map = self.open.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, s| {
            Arc::strong_count(s) > 1
                || s.last_used
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .elapsed()
                    < IDLE
        });
    }
}
