#!/usr/bin/env bash
# Creates ./.venv with the pinned CPU stack and installs mlip_fast into it (editable).
# Idempotent: does nothing when the pinned requirements and setup.py are unchanged since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp_value=$(cat requirements/cpu.txt requirements/nodeps.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$VENV/.mlip_fast_stamp" ] && [ "$(cat "$VENV/.mlip_fast_stamp")" = "$stamp_value" ]; then
    exit 0
fi
echo "[setup] creating $VENV and installing the pinned stack (about a minute on a fresh machine)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch first and exact: anything that pulls an unpinned torch before it would fetch a CUDA build.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$(grep -E '^torch==' requirements/cpu.txt)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements/cpu.txt
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements/nodeps.txt
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "$stamp_value" > "$VENV/.mlip_fast_stamp"
echo "[setup] done" >&2
