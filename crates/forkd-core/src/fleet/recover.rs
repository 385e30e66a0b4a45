//! Reconciling the state database with the processes that exist, after a
//! crash or restart of whatever drove the fleet.

use forkd_ops::{SandboxState, SnapshotStatus};
use serde::Serialize;

use super::Fleet;
use crate::CoreError;

/// What [`Fleet::recover`] found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recovery {
    /// Sandboxes whose QEMU still runs.
    pub running: Vec<String>,
    /// Sandboxes whose QEMU is gone (marked dead).
    pub dead: Vec<String>,
    /// `writing` snapshots whose writer still runs (they finish by themselves).
    pub writing: Vec<String>,
    /// `writing` snapshots whose writer is gone (marked failed).
    pub failed: Vec<String>,
}

impl Fleet {
    /// Brings the state database in line with the processes that exist,
    /// after a crash or restart of whatever drove the fleet: sandboxes whose
    /// QEMU is gone are marked dead (running ones are left alone), and
    /// `writing` snapshots whose writer is gone are marked failed, their
    /// staging removed. Writers that still run are left to finish.
    pub fn recover(&self) -> Result<Recovery, CoreError> {
        let mut out = Recovery::default();
        for s in self.list()? {
            match s.state {
                SandboxState::Dead => out.dead.push(s.id),
                SandboxState::Running | SandboxState::Pooled => out.running.push(s.id),
            }
        }
        let now = forkd_store::unix_now();
        let snapshots = self.db().list_snapshots()?;
        for snap in snapshots {
            if snap.status != SnapshotStatus::Writing {
                continue;
            }
            // A writer takes its lock within milliseconds of the row being
            // written; a young row may not have one yet.
            let orphaned = now.saturating_sub(snap.created_at) > 10
                && crate::branch::writer_gone(&self.env().runtime, &snap.tag);
            if orphaned {
                let _ = std::fs::remove_file(crate::branch::writer_lock(
                    &self.env().runtime,
                    &snap.tag,
                ));
                self.db().set_snapshot_status(
                    &snap.tag,
                    SnapshotStatus::Failed,
                    Some("its writer died before it was complete (recovered after a restart)"),
                )?;
                out.failed.push(snap.tag);
            } else {
                out.writing.push(snap.tag);
            }
        }
        self.store().sweep_staging();
        Ok(out)
    }
}
