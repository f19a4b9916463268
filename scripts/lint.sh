#!/usr/bin/env bash
# Lint as CI runs it (.ci/run): ruff check, ruff format --check and mypy (config in
# pyproject.toml). Installs first only when the venv has no ruff. All three always run;
# the exit code is non-zero if any failed, and the failed ones are named at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/ruff ]; then
  bash scripts/install.sh >/dev/null
fi
failed=()
.venv/bin/ruff check npstune benchmarks tests || failed+=("ruff check")
.venv/bin/ruff format --check npstune benchmarks tests || failed+=("ruff format --check")
.venv/bin/mypy || failed+=("mypy")
if [ "${#failed[@]}" -ne 0 ]; then
  for f in "${failed[@]}"; do
    echo "lint failed: $f" >&2
  done
  exit 1
fi
echo "lint passed: ruff check, ruff format --check, mypy"
