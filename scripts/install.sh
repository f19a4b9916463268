#!/usr/bin/env bash
# Create .venv (if missing) and install npstune with the CPU torch build and all extras.
# GPU machines: see README "GPU install" (install a CUDA torch==2.13.0 first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[all]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import npstune, torch; print('npstune', npstune.__version__, 'torch', torch.__version__)"
