"""Helpers for the search tests: a tiny real search (tiny checkpoints + a callable
evaluator written next to the config, so Ray workers import it by name), MLflow
reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.tiny import make_set

# The synthetic evaluator: task t "wants" θ* = θ_pre + 0.3·τ_t, so accuracy falls with
# the distance to it: w = 1 (λ = 1, three tasks summed) is far, small weights are
# better.
EVAL_MODULE = '''
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
_CACHE = {}


def _load(name):
    if name not in _CACHE:
        state = load_file(str(HERE / f"{name}.safetensors"))
        _CACHE[name] = {k: v.double() for k, v in state.items()
                        if v.is_floating_point()}
    return _CACHE[name]


def accuracy(state, task, split):
    base, ft = _load("base"), _load(task)
    num = den = 0.0
    for k, b in base.items():
        tau = ft[k] - b
        num += float((state[k].double() - (b + 0.3 * tau)).pow(2).sum())
        den += float(tau.pow(2).sum())
    return float(torch.exp(torch.tensor(-num / den)))


def slow(state, task, split):
    time.sleep(float(os.environ.get("NPSTUNE_TEST_SLEEP", "0.1")))
    return accuracy(state, task, split)


def flaky(state, task, split):
    """Raises for a third of the candidates (deterministically), NaN for another."""
    h = int(float(state["encoder.0.weight"].double().abs().sum()) * 1e6) % 3
    if h == 0:
        raise RuntimeError("injected evaluator failure")
    if h == 1 and task == "task0":
        return float("nan")
    return accuracy(state, task, split)
'''


def write_tiny_search(
    tmp: Path, name: str = "tiny", function: str = "accuracy", **sections: Any
) -> Path:
    """Tiny checkpoints, the evaluator module and a search-space file; returns the
    file."""
    tmp.mkdir(parents=True, exist_ok=True)
    bp, mps, *_ = make_set(tmp, tasks=3)
    (tmp / "tinyeval.py").write_text(EVAL_MODULE)
    cfg: dict[str, Any] = {
        "name": name,
        "use": "fusion",
        "base": str(bp),
        "models": [str(m) for m in mps],
        "evaluator": {"kind": "callable", "function": f"tinyeval:{function}"},
        "nps": {"subspaces": 4, "k": 0.5},
        "search": {"generations": 3, "population": 4, "seed": 7},
        "resources": {"cpus_per_trial": 1},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "report": {"baselines": ["pretrained", "task-arithmetic", "nps-w1"]},
        "output_dir": str(tmp / "out"),
    }
    for key, value in sections.items():
        if value is None:  # drop a section (e.g. nps: for a method search)
            cfg.pop(key, None)
        elif isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mlflow_runs(uri: str, experiment: str) -> tuple[list[Any], dict[str, list[Any]]]:
    """(parent runs, parent run id -> child runs) of an experiment (active runs
    only)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children: dict[str, list[Any]] = {}
    for r in runs:
        pid = r.data.tags.get("mlflow.parentRunId")
        if pid:
            children.setdefault(pid, []).append(r)
    return parents, children
