//! `forkd tree`: snapshots and sandboxes as one lineage tree. A booted
//! sandbox is a root; a snapshot hangs under the sandbox it was branched
//! from (or under its parent snapshot when that sandbox is gone); a spawned
//! sandbox hangs under its snapshot. Building the tree and drawing it are
//! pure and tested without a fleet; the command only fetches and prints.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;

use anyhow::Result;
use forkd_ops::{Operations, Sandbox, Snapshot};
use serde::Serialize;

/// One node of the lineage tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    /// `snapshot` or `sandbox`.
    pub kind: &'static str,
    /// Tag or id.
    pub name: String,
    /// Snapshot status or sandbox state.
    pub status: String,
    /// Snapshot: bytes its own layer takes on disk. Sandbox: guest RAM.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    pub children: Vec<Node>,
}

/// Builds the forest. `sizes` maps snapshot tags to their on-disk bytes.
pub fn build(
    snapshots: &[Snapshot],
    sizes: &HashMap<String, u64>,
    sandboxes: &[Sandbox],
) -> Vec<Node> {
    let live: HashSet<&str> = sandboxes.iter().map(|s| s.id.as_str()).collect();
    let tags: HashSet<&str> = snapshots.iter().map(|s| s.tag.as_str()).collect();
    let mut seen = HashSet::new();
    let mut roots = Vec::new();
    for s in sandboxes {
        if s.snapshot.as_deref().is_none_or(|t| !tags.contains(t)) {
            roots.push(sandbox_node(
                s, snapshots, sizes, sandboxes, &live, &mut seen,
            ));
        }
    }
    for s in snapshots {
        let under_sandbox = s.source.as_deref().is_some_and(|id| live.contains(id));
        let under_parent = s.parent.as_deref().is_some_and(|p| tags.contains(p));
        if !under_sandbox && !under_parent {
            roots.push(snapshot_node(
                s, snapshots, sizes, sandboxes, &live, &mut seen,
            ));
        }
    }
    roots.sort_by_key(|n| n.created_at);
    roots
}

fn snapshot_node(
    s: &Snapshot,
    snapshots: &[Snapshot],
    sizes: &HashMap<String, u64>,
    sandboxes: &[Sandbox],
    live: &HashSet<&str>,
    seen: &mut HashSet<String>,
) -> Node {
    seen.insert(format!("t:{}", s.tag));
    let mut children = Vec::new();
    for c in sandboxes
        .iter()
        .filter(|c| c.snapshot.as_deref() == Some(&s.tag))
    {
        if !seen.contains(&format!("s:{}", c.id)) {
            children.push(sandbox_node(c, snapshots, sizes, sandboxes, live, seen));
        }
    }
    // Snapshots made from this one whose source sandbox is gone.
    for c in snapshots.iter().filter(|c| {
        c.parent.as_deref() == Some(&s.tag)
            && !c.source.as_deref().is_some_and(|id| live.contains(id))
    }) {
        if !seen.contains(&format!("t:{}", c.tag)) {
            children.push(snapshot_node(c, snapshots, sizes, sandboxes, live, seen));
        }
    }
    children.sort_by_key(|n| n.created_at);
    Node {
        kind: "snapshot",
        name: s.tag.clone(),
        status: s.status.as_str().to_string(),
        bytes: sizes.get(&s.tag).copied().unwrap_or(0),
        created_at: s.created_at,
        children,
    }
}

fn sandbox_node(
    s: &Sandbox,
    snapshots: &[Snapshot],
    sizes: &HashMap<String, u64>,
    sandboxes: &[Sandbox],
    live: &HashSet<&str>,
    seen: &mut HashSet<String>,
) -> Node {
    seen.insert(format!("s:{}", s.id));
    let mut children = Vec::new();
    for c in snapshots
        .iter()
        .filter(|c| c.source.as_deref() == Some(&s.id))
    {
        if !seen.contains(&format!("t:{}", c.tag)) {
            children.push(snapshot_node(c, snapshots, sizes, sandboxes, live, seen));
        }
    }
    children.sort_by_key(|n| n.created_at);
    Node {
        kind: "sandbox",
        name: s.id.clone(),
        status: s.state.as_str().to_string(),
        bytes: s.mem_mib << 20,
        created_at: s.created_at,
        children,
    }
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

fn age(now: u64, then: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// Draws the forest with box-drawing branches, one node a line.
pub fn render(roots: &[Node], now: u64) -> String {
    fn line(n: &Node, now: u64) -> String {
        let size = match n.kind {
            "snapshot" => format!("layer {}", human_bytes(n.bytes)),
            _ => format!("ram {}", human_bytes(n.bytes)),
        };
        format!(
            "{} [{} {}] {}, {}",
            n.name,
            n.kind,
            n.status,
            size,
            age(now, n.created_at)
        )
    }
    fn walk(n: &Node, prefix: &str, last: bool, now: u64, out: &mut String) {
        out.push_str(prefix);
        out.push_str(if last { "└── " } else { "├── " });
        out.push_str(&line(n, now));
        out.push('\n');
        let deeper = format!("{prefix}{}", if last { "    " } else { "│   " });
        for (i, c) in n.children.iter().enumerate() {
            walk(c, &deeper, i + 1 == n.children.len(), now, out);
        }
    }
    let mut out = String::new();
    for r in roots {
        out.push_str(&line(r, now));
        out.push('\n');
        for (i, c) in r.children.iter().enumerate() {
            walk(c, "", i + 1 == r.children.len(), now, &mut out);
        }
    }
    out
}

pub fn tree(ops: &dyn Operations, json: bool) -> Result<ExitCode> {
    let snapshots = ops.snapshots()?;
    let sandboxes: Vec<Sandbox> = ops
        .list()?
        .into_iter()
        .filter(|s| s.state != forkd_ops::SandboxState::Dead)
        .collect();
    let mut sizes = HashMap::new();
    for s in &snapshots {
        // A snapshot deleted meanwhile just shows no size.
        if let Ok(d) = ops.snapshot_info(&s.tag) {
            sizes.insert(s.tag.clone(), d.allocated);
        }
    }
    let roots = build(&snapshots, &sizes, &sandboxes);
    if json {
        println!("{}", serde_json::to_string_pretty(&roots)?);
    } else {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        print!("{}", render(&roots, now));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkd_ops::{SandboxState, SnapshotStatus};

    fn snap(tag: &str, parent: Option<&str>, source: Option<&str>, at: u64) -> Snapshot {
        Snapshot {
            tag: tag.into(),
            status: SnapshotStatus::Ready,
            dir: format!("/s/{tag}").into(),
            parent: parent.map(Into::into),
            source: source.map(Into::into),
            created_at: at,
            pause_ms: None,
            error: None,
        }
    }

    fn sandbox(id: &str, from: Option<&str>, at: u64) -> Sandbox {
        Sandbox {
            id: id.into(),
            state: SandboxState::Running,
            pid: 1,
            snapshot: from.map(Into::into),
            image: "busybox".into(),
            mem_mib: 256,
            cpus: 1,
            created_at: at,
            branches: 0,
            network: Default::default(),
            lifetime: Default::default(),
            access_token: None,
        }
    }

    #[test]
    fn lineage_hangs_branches_under_sources_and_children_under_snapshots() {
        let snapshots = [
            snap("warm", None, Some("sb-root"), 10),
            snap("kid", Some("warm"), Some("sb-1"), 30),
            // Its source is gone: it hangs under its parent snapshot.
            snap("orphan", Some("warm"), Some("sb-gone"), 40),
        ];
        let sandboxes = [
            sandbox("sb-root", None, 0),
            sandbox("sb-1", Some("warm"), 20),
        ];
        let sizes = HashMap::from([("warm".to_string(), 3 << 20)]);
        let roots = build(&snapshots, &sizes, &sandboxes);
        assert_eq!(roots.len(), 1);
        let text = render(&roots, 100);
        assert_eq!(
            text,
            "sb-root [sandbox running] ram 256.0 MiB, 1m ago\n\
             └── warm [snapshot ready] layer 3.0 MiB, 1m ago\n\
             \u{20}   ├── sb-1 [sandbox running] ram 256.0 MiB, 1m ago\n\
             \u{20}   │   └── kid [snapshot ready] layer 0.0 MiB, 1m ago\n\
             \u{20}   └── orphan [snapshot ready] layer 0.0 MiB, 1m ago\n"
        );
    }

    #[test]
    fn a_pulled_snapshot_with_no_sandbox_is_a_root() {
        let roots = build(&[snap("pulled", None, None, 5)], &HashMap::new(), &[]);
        assert_eq!(roots[0].name, "pulled");
        assert!(roots[0].children.is_empty());
        assert_eq!(age(100, 5), "1m ago");
    }
}
