#!/usr/bin/env bash
# Builds the guest agent as a static executable (it is PID 1 of the guest's
# initramfs and cannot load shared libraries). The musl target is not
# installable here; glibc's static CRT works for this program.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "setup: building the static guest agent" >&2
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release -q -p forkd-agent --target x86_64-unknown-linux-gnu
file_out=target/x86_64-unknown-linux-gnu/release/forkd-agent
if readelf -l "$file_out" | grep -q "Requesting program interpreter"; then
  echo "error: $file_out is dynamically linked" >&2
  exit 1
fi
