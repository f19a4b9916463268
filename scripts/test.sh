#!/usr/bin/env bash
# Install (idempotent) and run the test suite. Exit code 5 (no tests collected) counts as a failure
# only when tests exist; CI calls this same script through .ci/run. Tests run in
# NPSTUNE_TEST_WORKERS pytest-xdist workers (default 2; 0 runs them in this process), each
# test file in one worker, so a module's fixtures (a built probe zoo) are built once.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled
WORKERS=${NPSTUNE_TEST_WORKERS:-2}
if [ "$WORKERS" -gt 0 ]; then
  set -- -n "$WORKERS" --dist loadfile "$@"
fi
.venv/bin/python -m pytest -q --durations=25 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests"
  exit 1
fi
exit "$rc"
