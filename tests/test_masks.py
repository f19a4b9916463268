"""Keep masks as an output of the merge engine: per task, per block,
streamed to a sink."""

from __future__ import annotations

import pytest
import torch

from npstune.merge import MaskCollector, merge, run_merge
from npstune.merge.registry import get_method
from npstune.taskvector import plan_merge
from tests import oracle
from tests.tiny import make_set

FLOAT_KEYS = ["encoder.0.bias", "encoder.0.weight", "encoder.1.weight", "norm.weight"]


class Recorder:
    """A sink that keeps every call (task, key, start, mask) in arrival order."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, int, torch.Tensor]] = []

    def __call__(self, task, key, start, mask):
        self.calls.append((task, key, start, mask.clone()))


def collect(tmp_path, method, params, tasks=3, dtype=torch.float32):
    bp, mps, base, fts = make_set(tmp_path, dtype=dtype, tasks=tasks)
    plan = plan_merge(bp, mps)
    sink = MaskCollector(
        {k: plan.base.shape(k) for k in plan.delta_keys}, plan.task_names
    )
    res = run_merge(plan, get_method(method), params, masks=sink)
    return res, sink, plan, base, fts


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_magnitude_and_nps_masks_are_the_oracle_masks(tmp_path, scope):
    w = [1.5, 0.2, 1.0, 0.7, 2.0, 0.0, 1.1, 0.9]
    res, sink, plan, base, fts = collect(
        tmp_path, "nps", {"k": 0.3, "weights": w, "scope": scope}
    )
    _, t32, t64 = oracle.deltas(base, fts, FLOAT_KEYS)
    for t, name in enumerate(plan.task_names):
        if scope == "global":
            want = oracle.nps_prune(t32[t], t64[t], 0.3, w, 8)[0]
        else:
            parts, pos = [], 0
            for k in FLOAT_KEYS:
                n = base[k].numel()
                parts.append(
                    oracle.nps_prune(
                        t32[t][pos : pos + n], t64[t][pos : pos + n], 0.3, w, 8
                    )[0]
                )
                pos += n
            want = torch.cat(parts)
        got = oracle.flat(sink.masks[name], FLOAT_KEYS)
        assert torch.equal(got, want), name
        # the summary counts the same masks, per task and key
        assert res.masks[name] == {
            k: int(sink.masks[name][k].sum()) for k in FLOAT_KEYS
        }
        assert res.meta["kept"][t] == int(want.sum())


def test_ties_reports_trim_masks_and_consensus_reports_tall_masks(tmp_path):
    res, sink, plan, base, fts = collect(tmp_path, "ties", {"k": 0.2})
    _, t32, t64 = oracle.deltas(base, fts, FLOAT_KEYS)
    trims = [oracle.topk_mask(a.abs(), 0.2) for a in t32]
    for t, name in enumerate(plan.task_names):
        assert torch.equal(oracle.flat(sink.masks[name], FLOAT_KEYS), trims[t])
    res, sink, plan, base, fts = collect(tmp_path, "consensus-ta", {"tall_lam": 0.5})
    mtl = sum(t64)
    for t, name in enumerate(plan.task_names):
        want = t64[t].abs() >= 0.5 * (mtl - t64[t]).abs()
        assert torch.equal(oracle.flat(sink.masks[name], FLOAT_KEYS), want)
    assert res.meta["kept"] == [
        int(res.meta["kept"][0])
    ]  # consensus: its own kept figure


def test_dare_masks_are_where_the_merge_keeps_entries(tmp_path):
    res, sink, plan, base, _ = collect(tmp_path, "dare", {"k": 0.4, "seed": 3}, tasks=1)
    for k in FLOAT_KEYS:  # one task, τ nonzero everywhere: kept ⇔ output ≠ base
        assert torch.equal(
            sink.masks[plan.task_names[0]][k], res.state[k] != base[k]
        ), k


def test_masks_stream_block_by_block_in_position_order(tmp_path, monkeypatch):
    import npstune.taskvector as tv

    bp, mps, _, _ = make_set(tmp_path)
    monkeypatch.setattr(tv, "CHUNK", 7)
    rec = Recorder()
    res = merge(bp, mps, "magnitude", {"k": 0.3}, masks=rec)
    assert max(m.numel() for *_, m in rec.calls) <= 7  # never more than a read chunk
    order = [(key, start, task) for task, key, start, _ in rec.calls]
    assert order == sorted(order)  # keys sorted, then row-major, tasks inside a block
    per = {}
    for task, key, start, m in rec.calls:
        per.setdefault((task, key), []).append((start, m))
    plan = plan_merge(bp, mps)
    for (_task, key), parts in per.items():  # the blocks tile each tensor exactly
        assert [s for s, _ in parts] == [s for s, _ in plan.chunks(key)]
        assert sum(m.numel() for _, m in parts) == plan.numel[key]
    assert set(per) == {(t, k) for t in range(3) for k in plan.delta_keys}
    ref = merge(
        bp, mps, "magnitude", {"k": 0.3}
    )  # a sink changes nothing in the output
    assert all(torch.equal(ref.state[k], res.state[k]) for k in ref.state)
    assert res.masks == ref.masks


def test_methods_without_masks_report_none(tmp_path):
    bp, mps, _, _ = make_set(tmp_path)
    rec = Recorder()
    res = merge(bp, mps, "task-arithmetic", {}, masks=rec)
    assert res.masks is None and rec.calls == []


def test_emr_streams_its_masks_through_the_same_sink(tmp_path):
    bp, mps, _, _ = make_set(tmp_path)
    plan = plan_merge(bp, mps)
    sink = MaskCollector(
        {k: plan.base.shape(k) for k in plan.delta_keys}, plan.task_names
    )
    res = run_merge(plan, get_method("emr"), {}, masks=sink)
    for name in plan.task_names:
        for k in plan.delta_keys:
            assert torch.equal(sink.masks[name][k], res.meta["masks"][name][k])
        assert res.masks[name] == {
            k: int(sink.masks[name][k].sum()) for k in plan.delta_keys
        }


def test_duplicate_model_names_get_unique_task_names(tmp_path):
    bp, mps, _, _ = make_set(tmp_path, tasks=1)
    plan = plan_merge(bp, [mps[0], mps[0], mps[0]])
    assert plan.task_names == ["task0", "task0#2", "task0#3"]
    res = run_merge(plan, get_method("magnitude"), {"k": 0.5})
    assert list(res.masks) == plan.task_names
