#!/usr/bin/env bash
# The test suite: installs what it needs (scripts/setup.sh), then runs every
# test, including the ones that boot real VMs under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
export FORKD_HOME="${FORKD_HOME:-$PWD/target/forkd-home}"
scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo test --workspace --release 2>&1
