#!/usr/bin/env bash
# The main job, for now: boot a real Linux microVM, run a command in it,
# print the timings, tear it down.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
./target/release/forkd doctor || true
echo
./target/release/forkd run --timings -- sh -c \
  'echo "hello from $(hostname): $(uname -sr)"; echo "root disk: $(df -h / | tail -1)"; ip -4 addr show eth0 | grep inet'
