//! The daemon's metrics and their Prometheus text exposition (format 0.0.4).
//!
//! A fixed, small set: sandbox and snapshot counts (set by the server from the
//! state database before each render), latency histograms for spawn, branch
//! pause and exec, and request counts per operation and status. Written here
//! rather than with a Prometheus client crate because the set is fixed, needs no
//! labels beyond three, and the format is a page of code that a test pins down.
//!
//! Metric names kept from the legacy runtime: `forkd_snapshots_total`,
//! `forkd_sandboxes_active`, `forkd_build_info`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::types::{SandboxState, SnapshotStatus};

/// Bucket upper bounds (seconds) for spawn and exec latency.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Bucket upper bounds (seconds) for branch pauses: milliseconds matter.
pub const PAUSE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves plain numbers behind; they are
    // still worth reporting.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A histogram with fixed buckets; observing is thread-safe.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Debug, Default, Clone)]
struct HistogramState {
    /// Non-cumulative count per bucket; one more than `bounds` for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    /// A histogram with these (increasing) upper bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new(HistogramState {
                counts: vec![0; bounds.len() + 1],
                sum: 0.0,
            }),
        }
    }

    /// Records one value, in seconds. NaN is ignored.
    pub fn observe(&self, seconds: f64) {
        if seconds.is_nan() {
            return;
        }
        let bucket = self
            .bounds
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(self.bounds.len());
        let mut state = lock(&self.state);
        state.counts[bucket] += 1;
        state.sum += seconds;
    }

    /// Records one duration.
    pub fn observe_duration(&self, duration: Duration) {
        self.observe(duration.as_secs_f64());
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        lock(&self.state).counts.iter().sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let state = lock(&self.state).clone();
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (i, count) in state.counts.iter().enumerate() {
            cumulative += count;
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| format_float(*b));
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum {}", format_float(state.sum));
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Everything `GET /metrics` reports.
#[derive(Debug)]
pub struct Metrics {
    sandboxes: Mutex<BTreeMap<&'static str, u64>>,
    snapshots: Mutex<BTreeMap<&'static str, u64>>,
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    rejected_busy: AtomicU64,
    /// Time from a spawn request to its children answering, per call.
    pub spawn_latency: Histogram,
    /// How long the source sandbox was paused, per branch.
    pub branch_pause: Histogram,
    /// Wall time of each exec, guest command included.
    pub exec_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All counts zero, all histograms empty.
    pub fn new() -> Self {
        Self {
            sandboxes: Mutex::new(BTreeMap::new()),
            snapshots: Mutex::new(BTreeMap::new()),
            requests: Mutex::new(BTreeMap::new()),
            rejected_busy: AtomicU64::new(0),
            spawn_latency: Histogram::new(LATENCY_BUCKETS),
            branch_pause: Histogram::new(PAUSE_BUCKETS),
            exec_latency: Histogram::new(LATENCY_BUCKETS),
        }
    }

    /// Sets how many sandboxes are in each state (states not given are 0).
    pub fn set_sandboxes(&self, counts: &[(SandboxState, u64)]) {
        let mut map = lock(&self.sandboxes);
        map.clear();
        for (state, n) in counts {
            *map.entry(sandbox_label(*state)).or_default() += n;
        }
    }

    /// Sets how many snapshots are in each status (statuses not given are 0).
    pub fn set_snapshots(&self, counts: &[(SnapshotStatus, u64)]) {
        let mut map = lock(&self.snapshots);
        map.clear();
        for (status, n) in counts {
            *map.entry(snapshot_label(*status)).or_default() += n;
        }
    }

    /// Counts one answered request.
    pub fn count_request(&self, operation_id: &'static str, status: u16) {
        *lock(&self.requests)
            .entry((operation_id, status))
            .or_default() += 1;
        if status == 429 {
            self.rejected_busy.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();

        header(
            &mut out,
            "forkd_build_info",
            "forkd's version; always 1.",
            "gauge",
        );
        let _ = writeln!(
            out,
            "forkd_build_info{{version=\"{}\"}} 1",
            escape_label(env!("CARGO_PKG_VERSION"))
        );

        let sandboxes = lock(&self.sandboxes).clone();
        let running = sandboxes.get("running").copied().unwrap_or(0);
        header(
            &mut out,
            "forkd_sandboxes_active",
            "Sandboxes running and handed out.",
            "gauge",
        );
        let _ = writeln!(out, "forkd_sandboxes_active {running}");
        header(&mut out, "forkd_sandboxes", "Sandboxes by state.", "gauge");
        for state in [
            SandboxState::Starting,
            SandboxState::Running,
            SandboxState::Pooled,
            SandboxState::Dead,
        ] {
            let label = sandbox_label(state);
            let n = sandboxes.get(label).copied().unwrap_or(0);
            let _ = writeln!(out, "forkd_sandboxes{{state=\"{label}\"}} {n}");
        }

        let snapshots = lock(&self.snapshots).clone();
        header(
            &mut out,
            "forkd_snapshots_total",
            "Snapshots in the store, any status.",
            "gauge",
        );
        let _ = writeln!(
            out,
            "forkd_snapshots_total {}",
            snapshots.values().sum::<u64>()
        );
        header(&mut out, "forkd_snapshots", "Snapshots by status.", "gauge");
        for status in [
            SnapshotStatus::Writing,
            SnapshotStatus::Ready,
            SnapshotStatus::Failed,
            SnapshotStatus::Broken,
        ] {
            let label = snapshot_label(status);
            let n = snapshots.get(label).copied().unwrap_or(0);
            let _ = writeln!(out, "forkd_snapshots{{status=\"{label}\"}} {n}");
        }

        self.spawn_latency.render(
            &mut out,
            "forkd_spawn_seconds",
            "Time to spawn the children of one request, in seconds.",
        );
        self.branch_pause.render(
            &mut out,
            "forkd_branch_pause_seconds",
            "How long the source sandbox was paused by one branch, in seconds.",
        );
        self.exec_latency.render(
            &mut out,
            "forkd_exec_seconds",
            "Wall time of one exec, in seconds.",
        );

        header(
            &mut out,
            "forkd_api_requests_total",
            "API requests answered, by operation and status.",
            "counter",
        );
        for ((operation, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "forkd_api_requests_total{{operation=\"{}\",status=\"{status}\"}} {n}",
                escape_label(operation)
            );
        }
        header(
            &mut out,
            "forkd_api_rejected_busy_total",
            "Requests refused with 429 by a concurrency limit.",
            "counter",
        );
        let _ = writeln!(
            out,
            "forkd_api_rejected_busy_total {}",
            self.rejected_busy.load(Ordering::Relaxed)
        );
        out
    }
}

fn sandbox_label(state: SandboxState) -> &'static str {
    match state {
        SandboxState::Starting => "starting",
        SandboxState::Running => "running",
        SandboxState::Pooled => "pooled",
        SandboxState::Dead => "dead",
    }
}

fn snapshot_label(status: SnapshotStatus) -> &'static str {
    match status {
        SnapshotStatus::Writing => "writing",
        SnapshotStatus::Ready => "ready",
        SnapshotStatus::Failed => "failed",
        SnapshotStatus::Broken => "broken",
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Prometheus float syntax: `+Inf`, `-Inf`, `NaN`, else Rust's shortest form.
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        v.to_string()
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the exposition line by line: every sample belongs to a family
    /// declared by HELP and TYPE before it, and parses as `name{labels} value`.
    fn assert_valid_exposition(text: &str) {
        let mut declared: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                assert!(rest.split_once(' ').is_some(), "{line}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
                declared.push((name.to_owned(), kind.to_owned()));
            } else {
                let (series, value) = line.rsplit_once(' ').expect(line);
                let name = series.split('{').next().unwrap();
                assert!(
                    name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "{line}");
                let (family, kind) = declared.last().expect("a sample before any TYPE");
                let ok = name == family
                    || (kind == "histogram"
                        && [
                            format!("{family}_bucket"),
                            format!("{family}_sum"),
                            format!("{family}_count"),
                        ]
                        .contains(&name.to_owned()));
                assert!(ok, "{line} outside its family {family}");
                if series.contains('{') {
                    assert!(series.ends_with('}'), "{line}");
                }
            }
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 2.0, f64::NAN] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "t_seconds", "test");
        let expected = "# HELP t_seconds test\n# TYPE t_seconds histogram\n\
            t_seconds_bucket{le=\"0.1\"} 2\n\
            t_seconds_bucket{le=\"1\"} 3\n\
            t_seconds_bucket{le=\"+Inf\"} 4\n\
            t_seconds_sum 2.65\n\
            t_seconds_count 4\n";
        assert_eq!(out, expected);
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn render_is_valid_and_complete() {
        let m = Metrics::new();
        m.set_sandboxes(&[(SandboxState::Running, 3), (SandboxState::Pooled, 2)]);
        m.set_snapshots(&[(SnapshotStatus::Ready, 4), (SnapshotStatus::Writing, 1)]);
        m.spawn_latency.observe_duration(Duration::from_millis(350));
        m.branch_pause.observe(0.004);
        m.exec_latency.observe(0.02);
        m.count_request("spawnSandboxes", 201);
        m.count_request("branch", 429);
        let text = m.render();
        assert_valid_exposition(&text);
        for needle in [
            "forkd_sandboxes_active 3\n",
            "forkd_sandboxes{state=\"pooled\"} 2\n",
            "forkd_snapshots_total 5\n",
            "forkd_snapshots{status=\"failed\"} 0\n",
            "forkd_spawn_seconds_bucket{le=\"0.5\"} 1\n",
            "forkd_spawn_seconds_bucket{le=\"0.25\"} 0\n",
            "forkd_branch_pause_seconds_bucket{le=\"0.005\"} 1\n",
            "forkd_exec_seconds_count 1\n",
            "forkd_api_requests_total{operation=\"branch\",status=\"429\"} 1\n",
            "forkd_api_rejected_busy_total 1\n",
            "forkd_build_info{version=\"",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn observe_from_many_threads() {
        let m = std::sync::Arc::new(Metrics::new());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.exec_latency.observe(0.01);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.exec_latency.count(), 8000);
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
