//! Where the state database, the snapshot store, the runtime directory and
//! the processes of this host disagree, and the repairs that make them
//! agree again (`forkd doctor`, `forkd doctor --repair`).
//!
//! The database is the truth about what exists; files and processes follow
//! it. Found here: snapshots that cannot spawn (`broken`) or failed, a
//! failed snapshot that left files, a store directory no row names, a
//! snapshot whose disk still depends on a sandbox's run directory (made
//! before stored disks were self-contained), dead sandboxes, run
//! directories and QEMUs of this home that no row names, and cached RAM
//! images nothing references. Repairs never delete a snapshot the database
//! lists: failed and broken ones are only reported (deleting them is the
//! user's call).

use forkd_ops::SnapshotStatus;
use serde::Serialize;

use crate::fleet::{Fleet, DISK_IMAGE};
use crate::CoreError;

/// What kind of disagreement a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A `ready` snapshot cheap checks find unable to spawn.
    BrokenSnapshot,
    /// A snapshot that failed while being written.
    FailedSnapshot,
    /// A failed snapshot whose directory is still in the store.
    FailedWithFiles,
    /// A store directory that no row names.
    StrayDirectory,
    /// A snapshot whose disk names a file of a sandbox's run directory.
    DiskInRunDirectory,
    /// A sandbox whose QEMU is gone.
    DeadSandbox,
    /// A run directory of this home (and its QEMUs) that no row names.
    OrphanRunDirectory,
    /// Cached RAM images no snapshot references.
    UnreferencedCache,
}

/// One disagreement.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: Kind,
    /// The snapshot tag, sandbox id or path it is about.
    pub subject: String,
    pub detail: String,
    /// Whether `--repair` fixes it.
    pub repairable: bool,
}

fn finding(kind: Kind, subject: impl Into<String>, detail: impl Into<String>) -> Finding {
    let repairable = !matches!(kind, Kind::BrokenSnapshot | Kind::FailedSnapshot);
    Finding {
        kind,
        subject: subject.into(),
        detail: detail.into(),
        repairable,
    }
}

/// Every disagreement of `fleet`'s home and runtime directory.
pub fn findings(fleet: &Fleet) -> Result<Vec<Finding>, CoreError> {
    let mut out = Vec::new();
    let rows = fleet.db().list_snapshots()?;
    for s in fleet.snapshots()? {
        match s.status {
            SnapshotStatus::Broken => out.push(finding(
                Kind::BrokenSnapshot,
                &s.tag,
                s.error.clone().unwrap_or_default(),
            )),
            SnapshotStatus::Failed => {
                out.push(finding(
                    Kind::FailedSnapshot,
                    &s.tag,
                    s.error.clone().unwrap_or_default(),
                ));
                if fleet.store().exists(&s.tag) {
                    out.push(finding(
                        Kind::FailedWithFiles,
                        &s.tag,
                        format!("{} holds files of a failed snapshot", s.dir.display()),
                    ));
                }
            }
            SnapshotStatus::Ready => {
                let disk = s.dir.join(DISK_IMAGE);
                if let Ok(chain) = forkd_vm::disk::backing_chain(&disk) {
                    if let Some(f) = chain
                        .iter()
                        .find(|f| f.starts_with(fleet.env().runtime.join("sandboxes")))
                    {
                        out.push(finding(
                            Kind::DiskInRunDirectory,
                            &s.tag,
                            format!(
                                "its disk is backed by {}, which goes when sandbox {} is killed",
                                f.display(),
                                s.source.as_deref().unwrap_or("?")
                            ),
                        ));
                    }
                }
            }
            SnapshotStatus::Writing => {}
        }
    }
    for tag in fleet.store().list_dirs() {
        if !rows.iter().any(|r| r.tag == tag) {
            out.push(finding(
                Kind::StrayDirectory,
                &tag,
                format!(
                    "{} is in the store but no snapshot row names it",
                    fleet.store().dir(&tag).display()
                ),
            ));
        }
    }
    for s in fleet.list()? {
        if s.state == forkd_ops::SandboxState::Dead {
            out.push(finding(
                Kind::DeadSandbox,
                &s.id,
                format!("its QEMU (pid {}) is gone", s.pid),
            ));
        }
    }
    for dir in fleet.orphan_run_dirs()? {
        out.push(finding(
            Kind::OrphanRunDirectory,
            dir.display().to_string(),
            "a run directory of this home that no sandbox row names (with any QEMU still using it)",
        ));
    }
    let unreferenced = fleet.unreferenced_cache()?;
    if !unreferenced.is_empty() {
        out.push(finding(
            Kind::UnreferencedCache,
            fleet
                .env()
                .runtime
                .join(crate::fleet::CACHE_DIR)
                .display()
                .to_string(),
            format!(
                "{} cached RAM image(s) no snapshot references: {}",
                unreferenced.len(),
                unreferenced.join(", ")
            ),
        ));
    }
    Ok(out)
}

/// Repairs what `found` lists as repairable; returns one line per repair
/// (what was done, or why it could not be).
pub fn repair(fleet: &Fleet, found: &[Finding]) -> Vec<String> {
    let mut done = Vec::new();
    let mut note = |what: String, r: Result<(), CoreError>| {
        done.push(match r {
            Ok(()) => what,
            Err(e) => format!("{what}: failed: {e}"),
        })
    };
    for f in found.iter().filter(|f| f.repairable) {
        match f.kind {
            Kind::FailedWithFiles | Kind::StrayDirectory => note(
                format!("deleted the store directory of `{}`", f.subject),
                fleet
                    .store()
                    .remove_if_present(&f.subject)
                    .map(drop)
                    .map_err(CoreError::from),
            ),
            Kind::DiskInRunDirectory => {
                let r = (|| {
                    let row = fleet.db().get_snapshot(&f.subject)?.ok_or_else(|| {
                        CoreError::NoSnapshot {
                            tag: f.subject.clone(),
                        }
                    })?;
                    let source = row.source.unwrap_or_default();
                    let run_dir = fleet.env().runtime.join("sandboxes").join(&source);
                    fleet.repair_disk(&source, &run_dir, &f.subject)
                })();
                note(
                    format!("made the disk of `{}` independent of its source", f.subject),
                    r,
                )
            }
            Kind::DeadSandbox => note(
                format!("removed dead sandbox {}", f.subject),
                fleet.kill(&f.subject),
            ),
            Kind::OrphanRunDirectory | Kind::UnreferencedCache => {}
            Kind::BrokenSnapshot | Kind::FailedSnapshot => {}
        }
    }
    if found.iter().any(|f| f.kind == Kind::OrphanRunDirectory) {
        match fleet.kill_orphans() {
            Ok(pids) => done.push(format!(
                "removed the run directories no sandbox names, killing {} QEMU(s)",
                pids.len()
            )),
            Err(e) => done.push(format!("removing orphan run directories failed: {e}")),
        }
    }
    if found.iter().any(|f| f.kind == Kind::UnreferencedCache) {
        match fleet.gc() {
            Ok(r) => done.push(format!(
                "deleted {} cached RAM image(s), {} MiB",
                r.removed.len(),
                r.freed_bytes >> 20
            )),
            Err(e) => done.push(format!("collecting the RAM image cache failed: {e}")),
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testing::{fleet, snapshot};

    #[test]
    fn stray_directories_and_failed_leftovers_are_found_and_repaired() {
        let (_tmp, f) = fleet();
        snapshot(&f, "good", None);
        snapshot(&f, "stray", None);
        f.db().delete_snapshot_row("stray").unwrap();
        snapshot(&f, "t1", None);
        f.db()
            .set_snapshot_status("t1", SnapshotStatus::Failed, Some("boom"))
            .unwrap();
        let found = findings(&f).unwrap();
        let kinds: Vec<(Kind, &str)> = found.iter().map(|x| (x.kind, x.subject.as_str())).collect();
        assert!(
            kinds.contains(&(Kind::StrayDirectory, "stray")),
            "{kinds:?}"
        );
        assert!(kinds.contains(&(Kind::FailedSnapshot, "t1")), "{kinds:?}");
        assert!(kinds.contains(&(Kind::FailedWithFiles, "t1")), "{kinds:?}");
        assert!(!kinds.iter().any(|(_, s)| *s == "good"), "{kinds:?}");
        let done = repair(&f, &found);
        assert_eq!(done.len(), 2, "{done:?}");
        assert!(!f.store().exists("stray") && !f.store().exists("t1"));
        let after: Vec<Kind> = findings(&f).unwrap().into_iter().map(|x| x.kind).collect();
        assert_eq!(after, [Kind::FailedSnapshot]);
    }
}
