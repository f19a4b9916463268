#!/usr/bin/env bash
# Install (idempotent) and run the product's main job on its embedded defaults:
# build the small offline zoo if missing, run the CI-sized NPS fusion search on local Ray,
# log everything to MLflow (sqlite:///mlflow.db here), print the best result against the
# baselines and how to open `mlflow ui`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled
exec .venv/bin/npstune search "${1:-searchspaces/nps-fusion-small.yaml}"
