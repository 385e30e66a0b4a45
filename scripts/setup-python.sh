#!/usr/bin/env bash
# Creates (or checks) the Python venv forkd's tests run the published SDKs in
# (E2B, the MCP client, forkd's legacy client), with exactly the pinned
# packages of tests/python/requirements.txt. Idempotent: a venv whose
# `pip freeze` already equals the pins is left alone.
#
#   scripts/setup-python.sh [VENV_DIR]      # default: $FORKD_PY_VENV, else target/py-venv
#
# Prints the venv's python on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-${FORKD_PY_VENV:-$PWD/target/py-venv}}"
req="tests/python/requirements.txt"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "setup-python.sh: $python is older than 3.11; the SDKs need 3.11 (set PYTHON=...)" >&2
    exit 1
fi
norm() { tr 'A-Z_' 'a-z-' | sort; }
wanted="$(grep -v '^\s*#' "$req" | grep -v '^\s*$' | norm)"
if [ -x "$venv/bin/python" ]; then
    have="$("$venv/bin/python" -m pip freeze --all 2>/dev/null | grep -v '^\(pip\|setuptools\|wheel\)==' | norm || true)"
    if [ "$have" = "$wanted" ]; then
        echo "$venv/bin/python"
        exit 0
    fi
    echo "setup-python.sh: $venv differs from $req; reinstalling" >&2
    rm -rf "$venv"
fi
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --require-virtualenv -r "$req"
"$venv/bin/python" -m pip check >&2
echo "$venv/bin/python"
