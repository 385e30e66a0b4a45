//! Persistent state of forkd: the SQLite state database shared by the CLI and the
//! daemon ([`Db`]), and the on-disk snapshot store ([`Store`]) with its manifests,
//! atomic publication, content verification and deletion policy.
//!
//! This crate only deals with files and rows. It must never start QEMU, talk to a
//! VM, or decide *when* something happens; callers (`forkd-core`) do that and use
//! these types to record and check what happened.

mod db;
mod error;
mod hash;
mod store;

pub use db::{Db, SandboxRow, SandboxState, SnapshotRow, SnapshotStatus, SCHEMA_VERSION};
pub use error::{Result, StoreError};
pub use hash::hash_file;
pub use store::{FileEntry, Manifest, Staging, Store, VerifyStats, MANIFEST_FORMAT};

/// Longest tag accepted by [`validate_tag`].
pub const MAX_TAG_LEN: usize = 64;

/// Checks a snapshot tag: `[A-Za-z0-9._-]{1,64}`, not starting with `.` (which
/// also rules out `.` and `..` and keeps tags apart from the store's own hidden
/// `.staging-*` / `.trash-*` directories).
///
/// Every place that turns a tag into a path goes through this one function.
pub fn validate_tag(tag: &str) -> Result<()> {
    let rule = if tag.is_empty() {
        Some("a tag must not be empty")
    } else if tag.len() > MAX_TAG_LEN {
        Some("a tag is at most 64 characters long")
    } else if tag == "." || tag == ".." {
        Some("`.` and `..` are not tags")
    } else if tag.starts_with('.') {
        Some("a tag must not start with `.`")
    } else if !tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("a tag may only contain letters, digits, `.`, `_` and `-`")
    } else {
        None
    };
    match rule {
        Some(rule) => Err(StoreError::InvalidTag {
            tag: tag.to_owned(),
            rule,
        }),
        None => Ok(()),
    }
}

/// Lists what still depends on snapshot `tag` and so blocks its deletion: live
/// sandboxes spawned from it (as `"sandbox <id>"`, state other than dead) and
/// snapshots layered on it (as `"snapshot <tag>"`). Empty means it may go.
pub fn deletion_blockers(db: &Db, tag: &str) -> Result<Vec<String>> {
    let mut blockers: Vec<String> = db
        .sandboxes_from_snapshot(tag)?
        .into_iter()
        .filter(|sandbox| sandbox.state != SandboxState::Dead)
        .map(|sandbox| format!("sandbox {}", sandbox.id))
        .collect();
    blockers.extend(
        db.children_of(tag)?
            .into_iter()
            .map(|child| format!("snapshot {child}")),
    );
    Ok(blockers)
}

/// Current time as unix seconds, the unit of every `created_at` in this crate.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_validation_table() {
        let long_ok = "a".repeat(64);
        let too_long = "a".repeat(65);
        let cases: &[(&str, bool)] = &[
            ("py", true),
            ("Py-3.12_base", true),
            ("a", true),
            ("0", true),
            ("a.b", true),
            ("a..b", true),
            ("-x", true),
            ("x.", true),
            (&long_ok, true),
            ("", false),
            (&too_long, false),
            (".", false),
            ("..", false),
            (".hidden", false),
            (".staging-x", false),
            ("a/b", false),
            ("../etc", false),
            ("a b", false),
            ("a\0b", false),
            ("é", false),
            ("a:b", false),
            ("tag\n", false),
        ];
        for (tag, ok) in cases {
            let result = validate_tag(tag);
            assert_eq!(result.is_ok(), *ok, "tag {tag:?}: {result:?}");
            if let Err(err) = result {
                let msg = err.to_string();
                assert!(msg.contains("invalid tag"), "{msg}");
                assert!(msg.contains(&format!("`{tag}`")), "{msg}");
            }
        }
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn deletion_blockers_lists_live_sandboxes_and_child_snapshots() {
        let tmp = tempfile::tempdir().unwrap();
        let db = Db::open(&tmp.path().join("forkd.db")).unwrap();
        let snap = |tag: &str, parent: Option<&str>| SnapshotRow {
            tag: tag.into(),
            status: SnapshotStatus::Ready,
            dir: PathBuf::from("/s").join(tag),
            parent: parent.map(Into::into),
            source: None,
            created_at: 1,
            pause_ms: Some(3.0),
            error: None,
        };
        let sandbox = |id: &str, state: SandboxState, from: &str| SandboxRow {
            id: id.into(),
            state,
            pid: 1,
            pid_start: 1,
            run_dir: PathBuf::from("/run").join(id),
            snapshot: Some(from.into()),
            config: serde_json::json!({}),
            created_at: 1,
        };
        db.insert_snapshot(&snap("base", None)).unwrap();
        db.insert_snapshot(&snap("leaf", Some("base"))).unwrap();
        assert!(deletion_blockers(&db, "leaf").unwrap().is_empty());

        db.insert_sandbox(&sandbox("a", SandboxState::Running, "base"))
            .unwrap();
        db.insert_sandbox(&sandbox("b", SandboxState::Pooled, "base"))
            .unwrap();
        db.insert_sandbox(&sandbox("c", SandboxState::Dead, "base"))
            .unwrap();
        db.insert_sandbox(&sandbox("d", SandboxState::Running, "leaf"))
            .unwrap();
        assert_eq!(
            deletion_blockers(&db, "base").unwrap(),
            ["sandbox a", "sandbox b", "snapshot leaf"]
        );
        assert_eq!(deletion_blockers(&db, "leaf").unwrap(), ["sandbox d"]);
        assert!(deletion_blockers(&db, "unknown").unwrap().is_empty());
    }
}
