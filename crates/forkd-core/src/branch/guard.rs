//! What happens when a branch's writer is gone: the source runs on.
//!
//! QEMU 7.2 leaves guest RAM write-protected when a background snapshot's
//! stream fails (its consumer died, the socket broke): the guest freezes on
//! its next write, QMP stops answering, and the next live branch is
//! refused (see [`forkd_vm::unfreeze`], which also says why `migrate_cancel`
//! cannot help). Nothing in QEMU brings it back, so forkd does, in one
//! place, [`Fleet::fail_branch`]: release the write protection of the
//! source, resume it if a dead brancher left it paused, then record the
//! branch `failed` and delete what it wrote. Everyone who can see a writer
//! die calls it:
//!
//! - the **guard**: a detached writer is two processes, the guard
//!   ([`supervise_writer`], the helper the brancher starts) and the writer
//!   it starts as its own child and waits for. When the writer dies (a
//!   `kill -9`, a crash, the OOM killer), the guard's wait returns at once
//!   and it thaws the source within milliseconds;
//! - the writer itself, when it fails;
//! - a brancher that waits for the snapshot and finds the writer's lock free;
//! - every forkd command, when guard and writer are both gone
//!   ([`Fleet::reconcile`]).

use std::process::{Command, Stdio};
use std::time::Duration;

use forkd_ops::SnapshotStatus;

use super::WriterJob;
use crate::fleet::Fleet;
use crate::helper::{Job, JOB_VAR};
use crate::{CoreError, Env};

/// The body of a detached writer helper: starts the writer as a child
/// process, waits for it, and fails the branch (releasing its source) if
/// the writer ended without recording an outcome.
pub fn supervise_writer(job: WriterJob) -> Result<(), CoreError> {
    let fleet = Fleet::open(&Env {
        home: job.home.clone(),
        runtime: job.runtime.clone(),
    })?;
    let tag = job.tag.clone();
    let started = std::env::current_exe()
        .map_err(|e| CoreError::Writer(format!("finding this executable: {e}")))
        .and_then(|exe| {
            let json = serde_json::to_string(&Job::BranchStream(Box::new(job)))
                .expect("helper jobs serialise");
            Command::new(exe)
                .env(JOB_VAR, json)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| CoreError::Writer(format!("starting the writer: {e}")))
        });
    let why = match started.map(|mut w| w.wait()) {
        Ok(Ok(status)) if status.success() => return Ok(()),
        Ok(Ok(status)) => format!(
            "its writer ended ({})",
            forkd_vm::process::describe(status, None)
        ),
        Ok(Err(e)) => format!("waiting for its writer failed: {e}"),
        Err(e) => e.to_string(),
    };
    // A writer that failed has recorded why (and released the source); one
    // that was killed has not.
    fleet.fail_branch(&tag, &format!("{why} before the snapshot was complete"))?;
    Ok(())
}

impl Fleet {
    /// Records branch `tag` failed with `reason`, if it is still being
    /// written, after releasing its source: the guest memory a failed live
    /// snapshot left write-protected, and the pause a dead brancher left.
    /// Returns whether this call recorded the failure. What the branch
    /// wrote (a published directory, staging) is deleted.
    pub fn fail_branch(&self, tag: &str, reason: &str) -> Result<bool, CoreError> {
        let Some(row) = self.db().get_snapshot(tag)? else {
            return Ok(false);
        };
        if row.status != SnapshotStatus::Writing {
            return Ok(false);
        }
        // The source first, while the row still says `writing`: no other
        // snapshot of it can start until the row changes.
        let mut reason = reason.to_string();
        if let Some(source) = &row.source {
            if let Some(note) = self.release_source(source) {
                reason.push_str(&format!(" ({note})"));
            }
        }
        let recorded = self.db().transition_snapshot(
            tag,
            SnapshotStatus::Writing,
            SnapshotStatus::Failed,
            Some(&reason),
        )?;
        if recorded {
            self.store().remove_if_present(tag)?;
            self.db().forget_verified_under(&self.store().dir(tag))?;
            self.store().sweep_staging();
            let _ = std::fs::remove_file(super::writer_lock(&self.env().runtime, tag));
        }
        Ok(recorded)
    }

    /// Makes sandbox `id` run again after a snapshot of it failed: lifts a
    /// write protection its QEMU was left with, and resumes it if it was
    /// left paused. Says what it did, or why it could not.
    fn release_source(&self, id: &str) -> Option<String> {
        let row = self.db().get_sandbox(id).ok()??;
        if !forkd_vm::process::pid_alive(row.pid, row.pid_start) {
            return None;
        }
        let mut notes = Vec::new();
        match forkd_vm::unfreeze::release_write_protection(row.pid, row.pid_start) {
            Ok(r) if r.was_frozen() => notes.push(format!(
                "the source's memory was left write-protected by QEMU and has been released ({} MiB)",
                r.bytes >> 20
            )),
            Ok(_) => {}
            Err(e) => notes.push(e.to_string()),
        }
        if let Ok(vm) = self.control(id) {
            let mut qmp = vm.qmp();
            let limit = Duration::from_secs(5);
            let status = qmp
                .execute_timeout("query-status", None, limit)
                .ok()
                .and_then(|v| v["status"].as_str().map(str::to_string));
            if let Some(status) = status {
                if matches!(status.as_str(), "paused" | "postmigrate")
                    && qmp.execute_timeout("cont", None, limit).is_ok()
                {
                    notes.push(format!("the source was left {status} and has been resumed"));
                }
            }
        }
        (!notes.is_empty()).then(|| notes.join("; "))
    }
}
