//! The guest's serial console, bounded. QEMU writes it to `console.log` in
//! the run directory while the guest boots (what a failed boot needs to
//! say why); from the moment the guest can run code of its own (its agent
//! answered, or before a snapshot's state is loaded into a child) forkd
//! moves it to a ring of [`RING`] bytes in QEMU's memory. A guest writes
//! its serial port at about 2 MB/s under TCG: into a file, that would fill
//! the host's runtime directory (tmpfs: its RAM) without end.

use serde_json::json;

use crate::qmp::{Qmp, QmpError};

/// The console's chardev id on QEMU's command line.
pub const CHARDEV: &str = "console0";

/// Bytes the ring keeps (QEMU wants a power of two); older output is
/// overwritten.
pub const RING: u64 = 64 << 10;

/// Moves the console from its log file to QEMU's ring (QMP
/// `chardev-change`, which keeps the serial device and the guest's view of
/// it as they were).
pub fn bound(qmp: &mut Qmp) -> Result<(), QmpError> {
    qmp.execute(
        "chardev-change",
        Some(json!({
            "id": CHARDEV,
            "backend": { "type": "ringbuf", "data": { "size": RING } },
        })),
    )
    .map(drop)
}
