#!/usr/bin/env bash
# Installs everything forkd needs on a fresh Debian 12 machine, idempotently:
# Debian packages, the static guest agent, the forkd binary, and the guest
# artifacts (Debian cloud kernel, initramfs, busybox root image).
#
#   scripts/setup.sh            # release build (what the demo uses)
#   FORKD_HOME=... scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

# --- Debian packages -------------------------------------------------------
# Debian 12 ships QEMU 7.2; these machines may come with a newer qemu-utils
# from backports, which conflicts with qemu-system-x86 7.2. Install both at
# the same version, in one transaction (a downgrade of qemu-utils if needed).
# docker-registry (the reference distribution registry), apache2-utils
# (htpasswd) and openssl: forkd-oci's tests run a real registry on loopback.
# bash-static: the busybox image's /bin/bash (E2B's SDK runs `/bin/bash -l -c`).
# mmdebstrap: bootstraps the debian-python image (eval, the code interpreter).
# fonts-dejavu-core: the text of the PNG chart bench/branch_plot draws.
PKGS=(qemu-system-x86 busybox-static bash-static e2fsprogs cpio kmod dpkg binutils docker-registry apache2-utils openssl mmdebstrap fonts-dejavu-core)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
version_of() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if ! installed qemu-utils || [ "$(version_of qemu-utils)" != "$(version_of qemu-system-x86)" ]; then
  missing+=(qemu-utils)
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  qver=$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: //p')
  [ -n "$qver" ] && [ "$qver" != "(none)" ] || { echo "setup: no qemu-system-x86 in the Debian archive" >&2; exit 1; }
  pkgs=()
  for p in "${missing[@]}"; do
    case "$p" in qemu-system-x86|qemu-utils) ;; *) pkgs+=("$p") ;; esac
  done
  apt-get install -y -qq --no-install-recommends --allow-downgrades \
    "qemu-system-x86=$qver" "qemu-utils=$qver" ${pkgs[@]+"${pkgs[@]}"} >/dev/null
fi

# The docker-registry package enables a system-wide registry on :5000 where
# systemd runs; the tests start their own on free loopback ports, so keep the
# packaged one stopped.
if installed docker-registry && [ -d /run/systemd/system ]; then
  systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
fi

# --- QEMU's users ----------------------------------------------------------
# forkd started as root runs each QEMU as a uid of its own (-runas, from
# 2100000000 up; no passwd entry needed, SECURITY.md).
# An unprivileged QEMU needs userfaultfd for live branches: QEMU 7.2 opens it
# with the system call, which Debian keeps to privileged processes unless 1.
if [ "$(id -u)" = 0 ] && [ "$(cat /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null)" = 0 ]; then
  log "allowing unprivileged userfaultfd (live branches of a QEMU that is not root)"
  sysctl -qw vm.unprivileged_userfaultfd=1
  [ -d /etc/sysctl.d ] && echo "vm.unprivileged_userfaultfd = 1" > /etc/sysctl.d/60-forkd.conf
fi

# --- binaries --------------------------------------------------------------
scripts/build-agent.sh
log "building forkd (release)"
cargo build --release -q -p forkd-cli

# --- Python SDKs the tests drive (E2B, MCP, forkd's legacy client) ----------
log "checking the Python test venv (target/py-venv)"
scripts/setup-python.sh >/dev/null

# --- guest artifacts -------------------------------------------------------
log "building guest artifacts (kernel, initramfs, busybox image)"
./target/release/forkd image build --image busybox >/dev/null
# The Debian image with python3: eval and the E2B code interpreter run in it,
# and their tests boot it. Bootstrapped once from the Debian mirror (minutes),
# then cached by recipe.
log "building the debian-python image (first time: minutes)"
./target/release/forkd image build --image debian-python >/dev/null
log "done: $(./target/release/forkd --version)"
