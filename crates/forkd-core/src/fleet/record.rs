//! Sandbox records: what a row's `config` column holds and the views the
//! seam reports ([`forkd_ops::Sandbox`]); rows are written before their QEMU
//! starts ([`super::starting`]). The view functions are pure and tested
//! without a VM.

use std::collections::HashMap;

use forkd_ops::Sandbox;
use forkd_store::{SandboxRow, SnapshotRow};
use forkd_vm::VmConfig;
use serde::{Deserialize, Serialize};

use crate::CoreError;

/// What a sandbox row's `config` column holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxConfig {
    pub vm: VmConfig,
    /// Human-readable image name ("busybox", "busybox (from warm)").
    pub image: String,
    pub accel_reason: String,
}

impl SandboxConfig {
    /// The configuration recorded in `row`.
    pub fn of(row: &SandboxRow) -> Result<SandboxConfig, CoreError> {
        serde_json::from_value(row.config.clone()).map_err(|e| CoreError::BadRecord {
            id: row.id.clone(),
            reason: e.to_string(),
        })
    }
}

/// A sandbox as the seam reports it. A row whose configuration cannot be
/// read still shows (image `?`), so that it can be listed and killed.
pub fn view(row: &SandboxRow, branches: Option<u32>) -> Sandbox {
    let config: Option<SandboxConfig> = serde_json::from_value(row.config.clone()).ok();
    Sandbox {
        id: row.id.clone(),
        state: row.state,
        pid: row.pid,
        snapshot: row.snapshot.clone(),
        image: config
            .as_ref()
            .map(|c| c.image.clone())
            .unwrap_or_else(|| "?".into()),
        mem_mib: config.as_ref().map(|c| c.vm.mem_mib).unwrap_or(0),
        cpus: config.as_ref().map(|c| c.vm.cpus).unwrap_or(0),
        created_at: row.created_at,
        branches: branches.unwrap_or(0),
        network: config
            .as_ref()
            .map(|c| crate::netgw::view(&c.vm))
            .unwrap_or_default(),
        lifetime: super::lifetime::of(row),
        access_token: super::lifetime::access_token_of(row),
    }
}

/// How many snapshots each sandbox was branched into.
pub fn branch_counts(snapshots: &[SnapshotRow]) -> HashMap<String, u32> {
    let mut counts = HashMap::new();
    for s in snapshots {
        if let Some(src) = &s.source {
            *counts.entry(src.clone()).or_default() += 1;
        }
    }
    counts
}

/// The image name a child of `tag` shows.
pub fn child_image(parent_image: &str, tag: &str) -> String {
    // A grandchild's parent already says where it came from.
    let base = parent_image
        .split_once(" (from ")
        .map(|(b, _)| b)
        .unwrap_or(parent_image);
    format!("{base} (from {tag})")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use forkd_ops::{SandboxState, SnapshotStatus};

    use super::*;

    fn row(id: &str, config: serde_json::Value) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            state: SandboxState::Running,
            pid: 7,
            pid_start: 9,
            run_dir: PathBuf::from("/run").join(id),
            snapshot: Some("warm".into()),
            config,
            created_at: 5,
        }
    }

    #[test]
    fn an_unreadable_config_still_lists_and_says_why_when_used() {
        let r = row("sb-1", serde_json::json!({"nonsense": true}));
        let v = view(&r, Some(2));
        assert_eq!((v.image.as_str(), v.mem_mib, v.branches), ("?", 0, 2));
        let e = SandboxConfig::of(&r).unwrap_err();
        assert!(matches!(e, CoreError::BadRecord { .. }), "{e}");
        assert!(e
            .to_string()
            .starts_with("sandbox `sb-1` has an unreadable record"));
    }

    #[test]
    fn branches_are_counted_per_source() {
        let snap = |tag: &str, source: Option<&str>| SnapshotRow {
            tag: tag.into(),
            status: SnapshotStatus::Ready,
            dir: PathBuf::from("/s"),
            parent: None,
            source: source.map(Into::into),
            created_at: 1,
            pause_ms: None,
            error: None,
        };
        let counts = branch_counts(&[
            snap("a", Some("sb-1")),
            snap("b", Some("sb-1")),
            snap("c", Some("sb-2")),
            snap("d", None),
        ]);
        assert_eq!(counts.get("sb-1"), Some(&2));
        assert_eq!(counts.get("sb-2"), Some(&1));
        assert_eq!(counts.len(), 2);
    }

    #[test]
    fn children_name_their_snapshot_once() {
        assert_eq!(child_image("busybox", "warm"), "busybox (from warm)");
        assert_eq!(
            child_image("busybox (from warm)", "kid"),
            "busybox (from kid)"
        );
    }
}
