//! Reconciling the state database with the processes that exist, after a
//! crash or restart of whatever drove the fleet. The quick part
//! ([`Fleet::reconcile`]) runs whenever a fleet is opened, so every forkd
//! command heals what a dead one left; the daemon runs the full report at
//! start ([`Fleet::recover`]).

use forkd_ops::{SandboxState, SnapshotStatus};
use serde::Serialize;

use super::Fleet;
use crate::CoreError;

/// How old (seconds) a `writing` row must be before a free writer lock
/// means its writer died: a writer takes its lock within milliseconds of
/// the row being written, but not at the same instant.
const WRITER_GRACE_S: u64 = 10;

/// What [`Fleet::recover`] found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recovery {
    /// Sandboxes whose QEMU still runs.
    pub running: Vec<String>,
    /// Sandboxes whose QEMU is gone (marked dead).
    pub dead: Vec<String>,
    /// Sandboxes whose creator died before they ran (their QEMU killed).
    pub abandoned: Vec<String>,
    /// `writing` snapshots whose writer still runs (they finish by themselves).
    pub writing: Vec<String>,
    /// `writing` snapshots whose writer is gone (marked failed, their
    /// source released).
    pub failed: Vec<String>,
}

/// What [`Fleet::reconcile`] did.
#[derive(Debug, Clone, Default)]
pub struct Reconciled {
    pub abandoned: Vec<String>,
    pub failed: Vec<String>,
}

impl Fleet {
    /// The quick repairs every forkd process makes when it opens the fleet:
    /// `starting` sandboxes whose creator died are killed and removed, and
    /// `writing` snapshots whose writer died are failed, after their
    /// source's memory is released if the failed stream left it frozen.
    pub fn reconcile(&self) -> Result<Reconciled, CoreError> {
        let abandoned = self.reap_dead_starts()?;
        let mut failed = Vec::new();
        let now = forkd_store::unix_now();
        let writing: Vec<_> = self
            .db()
            .list_snapshots()?
            .into_iter()
            .filter(|s| s.status == SnapshotStatus::Writing)
            .collect();
        for snap in writing {
            let orphaned = now.saturating_sub(snap.created_at) > WRITER_GRACE_S
                && crate::branch::writer_gone(&self.env().runtime, &snap.tag);
            if orphaned
                && self.fail_branch(
                    &snap.tag,
                    "its writer died before it was complete (found by a later forkd command)",
                )?
            {
                failed.push(snap.tag);
            }
        }
        Ok(Reconciled { abandoned, failed })
    }

    /// Brings the state database in line with the processes that exist,
    /// after a crash or restart of whatever drove the fleet: sandboxes whose
    /// QEMU is gone are marked dead (running ones are left alone), those
    /// whose creator died mid-start are killed, and `writing` snapshots
    /// whose writer is gone are marked failed, their source released and
    /// their staging removed. Writers that still run are left to finish.
    pub fn recover(&self) -> Result<Recovery, CoreError> {
        let reconciled = self.reconcile()?;
        let mut out = Recovery {
            abandoned: reconciled.abandoned,
            failed: reconciled.failed,
            ..Recovery::default()
        };
        for s in self.list()? {
            match s.state {
                SandboxState::Dead => out.dead.push(s.id),
                SandboxState::Running | SandboxState::Pooled | SandboxState::Starting => {
                    out.running.push(s.id)
                }
            }
        }
        for snap in self.db().list_snapshots()? {
            if snap.status == SnapshotStatus::Writing {
                out.writing.push(snap.tag);
            }
        }
        self.store().sweep_staging();
        Ok(out)
    }
}
