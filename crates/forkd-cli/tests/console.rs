//! A guest cannot fill the host through its serial console, against a real
//! QEMU and kernel. A guest writes `/dev/ttyS0` at about 2 MB/s; QEMU wrote
//! it to `console.log` in the run directory (tmpfs: host RAM) without end.
//! Now the log keeps what the guest printed while it booted and everything
//! later goes to a 64 KiB ring in QEMU's memory: a parent and a child of it
//! each write 3 MB to their console, their logs do not grow, the ring holds
//! the newest output, and both answer on.

mod common;

use std::path::Path;
use std::time::Duration;

use common::World;

/// Writes 3 MB and then `marker` to the guest's serial console.
fn flood(w: &World, id: &str, marker: &str) {
    let out = w.cli_sh(
        id,
        &format!(
            "head -c 3000000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo {marker} > /dev/ttyS0; echo done"
        ),
    );
    assert_eq!(out.trim(), "done");
}

fn log_size(run_dir: &Path) -> u64 {
    std::fs::metadata(run_dir.join("console.log"))
        .unwrap()
        .len()
}

/// What QEMU's console ring holds now (reading empties it).
fn ring(run_dir: &Path) -> String {
    let mut qmp =
        forkd_vm::qmp::Qmp::connect(&run_dir.join("qmp.sock"), Duration::from_secs(10)).unwrap();
    let v = qmp
        .execute(
            "ringbuf-read",
            Some(serde_json::json!({
                "device": forkd_vm::console::CHARDEV,
                "size": forkd_vm::console::RING,
                "format": "utf8",
            })),
        )
        .unwrap();
    v.as_str().unwrap().to_string()
}

#[test]
fn a_guest_flooding_its_console_does_not_grow_the_host_log() {
    let w = World::new("console");
    let p = w.cli_ok(&["create", "--mem", "256"]).trim().to_string();
    w.cli_ok(&["branch", &p, "--tag", "con"]);
    let c = w.cli_spawn(&["con"]).remove(0);
    for (id, marker) in [(&p, "end-of-parent-flood"), (&c, "end-of-child-flood")] {
        let run_dir = w.runtime.join("sandboxes").join(id);
        let before = log_size(&run_dir);
        assert!(
            before < forkd_vm::console::RING,
            "{id}'s boot log is {before} bytes"
        );
        flood(&w, id, marker);
        assert_eq!(
            log_size(&run_dir),
            before,
            "{id}'s console log grew with what the guest wrote"
        );
        let kept = ring(&run_dir);
        assert!(
            kept.len() as u64 <= forkd_vm::console::RING,
            "the ring kept {} bytes",
            kept.len()
        );
        assert!(
            kept.trim_end().ends_with(marker),
            "the ring lacks the newest output: …{}",
            &kept[kept.len().saturating_sub(80)..]
        );
        assert_eq!(w.cli_sh(id, "echo alive").trim(), "alive");
    }
}
