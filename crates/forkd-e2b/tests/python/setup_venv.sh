#!/usr/bin/env bash
# Creates (or checks) the Python venv with the pinned E2B SDKs and pytest that
# forkd-e2b's Python tests run in. Idempotent: a venv whose `pip freeze`
# already equals requirements.txt is left alone. Meant to be called from
# scripts/setup.sh; needs python3 (3.11+) with the venv module and PyPI.
#
#   crates/forkd-e2b/tests/python/setup_venv.sh [VENV_DIR]
#
# VENV_DIR defaults to $FORKD_E2B_VENV, else target/e2b-venv in the repo.
# Prints the venv's python on the last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../../.." && pwd)"
venv="${1:-${FORKD_E2B_VENV:-$repo/target/e2b-venv}}"
req="$here/requirements.txt"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "setup_venv.sh: $python is older than 3.11; the e2b SDK needs 3.11 (set PYTHON=...)" >&2
    exit 1
fi

wanted="$(grep -v '^\s*#' "$req" | grep -v '^\s*$' | tr 'A-Z_' 'a-z-' | sort)"
if [ -x "$venv/bin/python" ]; then
    have="$("$venv/bin/python" -m pip freeze --all 2>/dev/null | grep -v '^\(pip\|setuptools\|wheel\)==' | tr 'A-Z_' 'a-z-' | sort || true)"
    if [ "$have" = "$wanted" ]; then
        echo "$venv/bin/python"
        exit 0
    fi
    echo "setup_venv.sh: $venv differs from requirements.txt; reinstalling" >&2
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --require-virtualenv -r "$req"
"$venv/bin/python" -m pip check >&2
echo "$venv/bin/python"
