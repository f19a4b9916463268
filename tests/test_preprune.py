"""Pruning before any merge (``--prune``): the merge sees exactly the pruned τ̂_t."""

from __future__ import annotations

import json

import pytest
import torch

import npstune.taskvector as tv
from npstune.checkpoints import open_checkpoint
from npstune.cli import main
from npstune.errors import ConfigError
from npstune.merge import Prune, merge
from npstune.merge.masks import MaskCollector
from npstune.merge.preprune import pruned_plan
from npstune.taskvector import plan_merge
from tests.tiny import make_set

FLOAT_KEYS = ["encoder.0.bias", "encoder.0.weight", "encoder.1.weight", "norm.weight"]


def close(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_prune_then_task_arithmetic_is_the_pruning_method_itself(tmp_path):
    """TA at λ=1 over the pruned vectors is exactly magnitude / nps / dare at λ=1."""
    base, models, *_ = make_set(tmp_path, tasks=3)
    w = [0.5, 2.0, 1.0, 0.2]
    cases = [
        ("magnitude", {"k": 0.3}, "magnitude", {"k": 0.3}),
        (
            "magnitude",
            {"k": 0.3, "scope": "tensor"},
            "magnitude",
            {"k": 0.3, "scope": "tensor"},
        ),
        (
            "nps",
            {"k": 0.25, "subspaces": 4, "weights": w},
            "nps",
            {"k": 0.25, "subspaces": 4, "weights": w},
        ),
        (
            "nps",
            {"k": 0.25, "subspaces": 4, "weights": w, "scope": "tensor"},
            "nps",
            {"k": 0.25, "subspaces": 4, "weights": w, "scope": "tensor"},
        ),
        ("dare", {"k": 0.5, "seed": 3}, "dare", {"k": 0.5, "seed": 3}),
        (
            "dare",
            {"k": 0.5, "seed": 3, "q": 0.8},
            "darex",
            {"k": 0.5, "seed": 3, "q": 0.8},
        ),
    ]
    for prune, pp, method, mp in cases:
        got = merge(base, models, "task-arithmetic", {"lam": 1.0}, prune=(prune, pp))
        want = merge(base, models, method, {**mp, "lam": 1.0})
        close(got.state, want.state)
        if method != "dare" and method != "darex":
            kept = got.meta["prune"]["kept"]
            assert kept == [sum(m.values()) for m in want.masks.values()]


def test_prune_is_the_same_whatever_the_read_chunks(tmp_path, monkeypatch):
    """Global cursors are saved and restored by position: chunked reads, whole-tensor
    reads (TSV-M) and out-of-order reads give the one pruning."""
    base, models, *_ = make_set(tmp_path, tasks=3)
    prune = ("nps", {"k": 0.2, "subspaces": 4, "weights": [1.5, 0.3, 1.0, 2.0]})
    ref = {
        m: merge(base, models, m, prune=prune).state for m in ("ties", "tsv-m", "pcb")
    }
    monkeypatch.setattr(tv, "CHUNK", 7)
    for m, want in ref.items():
        close(merge(base, models, m, prune=prune).state, want)
    # reading the keys backwards, then one chunk in the middle, gives the same values
    plan = plan_merge(base, models)
    fwd = pruned_plan(plan, Prune(*prune))
    forward = {k: fwd.read_chunk(k).taus32 for k in plan.delta_keys}
    back = pruned_plan(plan, Prune(*prune))
    for k in reversed(plan.delta_keys):
        for a, b in zip(back.read_chunk(k).taus32, forward[k]):
            assert torch.equal(a, b)
    k = plan.delta_keys[1]
    mid = pruned_plan(plan, Prune(*prune)).read_chunk(k, 7, 14).taus32
    for a, b in zip(mid, forward[k]):
        assert torch.equal(a, b[7:14])


def test_pruned_vectors_keep_exactly_k_and_the_masks_values(tmp_path):
    base, models, *_ = make_set(tmp_path, tasks=2)
    plan = plan_merge(base, models)
    pp = pruned_plan(plan, Prune("magnitude", {"k": 0.25}))
    n = plan.n
    for t in range(2):
        vals = torch.cat([pp.read_chunk(k).taus32[t] for k in plan.delta_keys])
        raw = torch.cat([plan.read_chunk(k).taus32[t] for k in plan.delta_keys])
        kept = vals != 0
        assert int(kept.sum()) == -(-n // 4)  # ⌈0.25·n⌉ (no zero entries in τ here)
        assert torch.equal(vals[kept], raw[kept])
        assert raw[kept].abs().min() >= raw[~kept].abs().max()
    assert pp.kept() == [-(-n // 4)] * 2


def test_prune_before_emr_and_mask_sink(tmp_path):
    base, models, *_ = make_set(tmp_path, tasks=2)
    out = tmp_path / "emr"
    res = merge(base, models, "emr", out=out, prune=("magnitude", {"k": 0.5}))
    assert res.meta["prune"]["method"] == "magnitude"
    # each EMR task model only changes entries the pruning kept for that task
    plan = plan_merge(base, models)
    col = MaskCollector(
        {k: plan.base.shape(k) for k in plan.delta_keys}, plan.task_names
    )
    merge(base, models, "magnitude", {"k": 0.5}, masks=col)
    b = open_checkpoint(base)
    for name, masks in col.masks.items():
        task = open_checkpoint(next(out.glob(f"{name}*")))
        for k in FLOAT_KEYS:
            changed = task[k] != b[k]
            assert not bool((changed & ~masks[k]).any())


def test_prune_errors(tmp_path):
    base, models, *_ = make_set(tmp_path, tasks=2)
    with pytest.raises(ConfigError, match="valid: nps, magnitude, dare"):
        merge(base, models, "ties", prune="trim")
    with pytest.raises(ConfigError, match="lam is not a pruning parameter"):
        merge(base, models, "ties", prune=("nps", {"lam": 2.0}))
    with pytest.raises(ConfigError, match="'alpha' is not one of its parameters"):
        merge(base, models, "tsv-m", prune=("magnitude", {"alpha": 1}))
    with pytest.raises(ConfigError, match="k"):
        merge(base, models, "tsv-m", prune=("magnitude", {"k": 1.5}))
    with pytest.raises(ConfigError, match="own statistics"):
        merge(base, models, "fisher", prune="nps", data=object())


def test_cli_prune_and_param(tmp_path, capsys):
    base, models, *_ = make_set(tmp_path, tasks=2)
    out = tmp_path / "out.safetensors"
    args = [
        "merge",
        "--method",
        "tsv-m",
        "--base",
        str(base),
        "--models",
        *map(str, models),
    ]
    rc = main(
        [
            *args,
            "--out",
            str(out),
            "--prune",
            "nps",
            "--k",
            "0.3",
            "--subspaces",
            "2",
            "--weights",
            "1.5,0.5",
            "--param",
            "alpha=0.7",
            "--quiet",
        ]
    )
    assert rc in (0, None)
    want = merge(
        base,
        models,
        "tsv-m",
        {"alpha": 0.7},
        prune=("nps", {"k": 0.3, "subspaces": 2, "weights": [1.5, 0.5]}),
    ).state
    got = open_checkpoint(out)
    for k in FLOAT_KEYS:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    meta = json.loads(got.metadata["npstune_prune"])
    assert meta == {
        "method": "nps",
        "params": {"k": 0.3, "scope": "global", "subspaces": 2, "weights": [1.5, 0.5]},
    }
