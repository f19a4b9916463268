"""The one-pass NPS candidate build against the two-pass one, bit for bit.

The inputs are built to hurt it: τ drawn from a handful of values (ties at every
subspace boundary and at the threshold, several tie quotas running out inside one read
chunk), bf16 checkpoints (τ's bf16 duplicates), θ_pre with −0.0 entries (the sign of a
zero Δ shows there), subspace weights of 0 and repeated weights, λ of 1, of another
value and negative, k from 0.05 to 1, one task and three.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import npstune.taskvector as tv
from npstune.merge import pruning
from npstune.search.stream import build_candidate
from npstune.sparsify import onepass
from npstune.sparsify.onepass import combine, fine_bracket, fine_suffixes
from npstune.taskvector import plan_merge
from tests.tiny import write

SHAPES = {"a.weight": (7, 13), "b.weight": (50,), "c.bias": (3,), "d.weight": (9, 9)}


def _tie_heavy_set(tmp_path, dtype, tasks, seed):
    """A base and ``tasks`` models whose τ takes a few values only."""
    g = torch.Generator().manual_seed(seed)
    base = {}
    for k, shape in SHAPES.items():
        b = torch.randn(shape, generator=g) * 0.05
        b.view(-1)[::5] = -0.0  # −0.0 entries in θ_pre
        base[k] = b.to(dtype)
    levels = torch.tensor([0.0, 2.0**-10, -(2.0**-10), 3 * 2.0**-10, -(2.0**-9), 0.5])
    fts = []
    for _ in range(tasks):
        ft = {}
        for k, b in base.items():
            pick = torch.randint(0, len(levels), b.shape, generator=g)
            # mostly the first four levels: ties everywhere, a few large entries
            pick = torch.where(torch.rand(b.shape, generator=g) < 0.9, pick % 4, pick)
            ft[k] = (b.float() + levels[pick]).to(dtype)
        fts.append(ft)
    bp = write(base, tmp_path / "base", "safetensors")
    mps = [write(ft, tmp_path / f"m{t}", "safetensors") for t, ft in enumerate(fts)]
    return plan_merge(bp, mps)


def _build(plan, one_pass, rows, k, lams, subspaces):
    state = {
        key: torch.full(plan.base.shape(key), float("nan"), dtype=plan.base.dtype(key))
        for key in plan.delta_keys
    }
    dtypes = {key: plan.base.dtype(key) for key in plan.delta_keys}
    used = build_candidate(
        plan, state, dtypes, subspaces, rows, k, lams, one_pass=one_pass
    )
    return used, state


def _bits(t):
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def _assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(_bits(a[key]), _bits(b[key])), key


@pytest.fixture(autouse=True)
def _fresh_sketches():
    pruning._SKETCHES.clear()
    yield
    pruning._SKETCHES.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 22], ids=["c7", "c64", "whole"])
@pytest.mark.parametrize("tasks", [1, 3])
def test_one_pass_equals_two_passes(tmp_path, monkeypatch, dtype, chunk, tasks):
    monkeypatch.setattr(tv, "CHUNK", chunk)
    plan = _tie_heavy_set(tmp_path, dtype, tasks, seed=chunk + tasks)
    M = 4
    g = torch.Generator().manual_seed(7)
    cases = [
        ([[1.0] * M] * tasks, 0.05, [1.0] * tasks),
        ([[0.0, 1.0, 1.0, 2.0]] * tasks, 0.3, [0.37] * tasks),  # a zero weight
        (
            [torch.rand(M, generator=g).tolist() for _ in range(tasks)],
            0.9,
            [-0.5 + t for t in range(tasks)],  # negative and 1.5
        ),
        ([[2.0, 0.5, 0.5, 0.25]] * tasks, 1.0, [1.0] * tasks),
        ([[1.0, 3.0, 0.1, 1.0]] * tasks, 0.12, [0.8] * tasks),
    ]
    ways = []
    for rows, k, lams in cases:
        used, a = _build(plan, True, rows, k, lams, M)
        two, b = _build(plan, False, rows, k, lams, M)
        assert two == "two-pass"
        _assert_same_bits(a, b)
        # the same again with nothing held back: the thresholds settled first
        monkeypatch.setattr(onepass, "PENDING", 0)
        settled, c = _build(plan, True, rows, k, lams, M)
        monkeypatch.setattr(onepass, "PENDING", 1 << 22)
        assert settled == "settled"
        _assert_same_bits(c, b)
        ways.append(used)
    # k = 1 may pile everything at the top (then settled first)
    assert ways.count("one-pass") >= len(cases) - 1


def test_over_the_held_back_budget_the_thresholds_are_settled_first(
    tmp_path, monkeypatch
):
    """Over :data:`PENDING`, a settling pass; a bracket too wide for it: the
    two-pass build. The same bits every way."""
    monkeypatch.setattr(tv, "CHUNK", 16)
    plan = _tie_heavy_set(tmp_path, torch.float32, 3, seed=1)
    rows, k, lams = [[1.0, 0.5, 2.0, 1.0]] * 3, 0.2, [0.7, 1.0, 1.3]
    used, a = _build(plan, True, rows, k, lams, 4)
    assert used == "one-pass"
    monkeypatch.setattr(onepass, "PENDING", 0)
    used, b = _build(plan, True, rows, k, lams, 4)
    assert used == "settled"
    _assert_same_bits(a, b)
    monkeypatch.setattr(onepass, "SETTLE_PATTERNS", 0)
    used, c = _build(plan, True, rows, k, lams, 4)
    assert used == "two-pass"
    _assert_same_bits(a, c)


def test_combine_keeps_the_exact_paths_sums_and_zero_signs():
    v0 = torch.tensor([-0.0, 1.0, 3.0, -0.0, 0.1])
    v1 = torch.tensor([2.0, -0.0, -3.0, -0.0, 0.2])
    k0 = torch.tensor([False, True, True, True, True])
    k1 = torch.tensor([False, False, True, True, True])
    d = combine([v0, v1], [k0, k1], [1.0, 0.5])
    # nothing kept: +0 (the exact path's zeros); kept −0s add to −0
    assert (
        _bits(d).tolist()
        == _bits(torch.tensor([0.0, 1.0, 3.0 + (-1.5), -0.0, 0.1 + 0.1])).tolist()
    )
    assert math.copysign(1, float(d[0])) == 1 and math.copysign(1, float(d[3])) == -1
    # the product and the sum rounded separately, as index_add_ does
    x, y = torch.tensor([1.0 + 2**-23]), torch.tensor([1.0 / 3])
    lam = 0.1
    t = torch.tensor([True])
    expect = x.clone().index_add_(0, torch.tensor([0]), y, alpha=lam)
    assert torch.equal(combine([x, y], [t, t], [1.0, lam]), expect)


def _suffix(values):
    s = torch.tensor(values, dtype=torch.float32)
    return fine_suffixes([(s,)], s.numel(), 1)[0]


def test_fine_bracket_hand_checked():
    # one subspace, w = 1: the K-th largest of (1, 2, 3, 4) is 4, 3, 2, 1
    suf = _suffix([1.0, 2.0, 3.0, 4.0])
    assert suf[0] == 4 and suf[-1] == 0
    for K, kth in [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]:
        lo, hi, pend = fine_bracket(suf, 4, 1, torch.ones(1), K)
        lo_v = float(np.int32(lo).view(np.float32))
        hi_v = float(np.int32(hi).view(np.float32))
        assert lo_v <= kth <= hi_v
        # fewer than K above the bracket, at least K at or above its bottom
        assert sum(x > hi_v for x in (1, 2, 3, 4)) < K
        assert sum(x >= lo_v for x in (1, 2, 3, 4)) >= K
        assert pend >= sum(lo_v <= x <= hi_v for x in (1, 2, 3, 4)) >= 1
    # two subspaces of 2 (ranks 0-1: 4, 3; ranks 2-3: 2, 1), w = (1, 3): reweighted
    # 4, 3, 6, 3 → the 2nd largest is 4
    lo, hi, _ = fine_bracket(suf, 4, 2, torch.tensor([1.0, 3.0]), 2)
    assert (
        float(np.int32(lo).view(np.float32))
        <= 4.0
        <= float(np.int32(hi).view(np.float32))
    )


def test_fine_bracket_property_on_random_scores():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5000, generator=g).abs() * 0.01).float()
    x[::7] = x[3]  # ties
    n, M = x.numel(), 5
    suf = fine_suffixes([(x,)], n, 1)[0]
    order = torch.sort(x, descending=True, stable=True).indices
    sub = torch.empty(n, dtype=torch.int64)
    for m in range(M):
        sub[order[m * n // M : (m + 1) * n // M]] = m
    for trial in range(5):
        w = torch.rand(M, generator=g) * 2
        r = w[sub] * x
        for K in (1, 17, n // 3, n):
            lo, hi, pend = fine_bracket(suf, n, M, w, K)
            lo_v = float(np.int32(lo).view(np.float32))
            hi_v = float(np.int32(hi).view(np.float32))
            kth = float(torch.sort(r, descending=True).values[K - 1])
            assert lo_v <= kth <= hi_v, (trial, K)
            assert int((r > hi_v).sum()) < K
            assert pend >= int(((r >= lo_v) & (r <= hi_v)).sum())


def test_fine_suffixes_refuse_a_short_stream():
    from npstune.errors import ConfigError

    with pytest.raises(ConfigError, match="expected 5 scores, saw 3"):
        fine_suffixes([(torch.ones(3),)], 5, 1)


@pytest.mark.parametrize("settle", [False, True], ids=["held", "settled"])
@pytest.mark.parametrize(
    ("chunk", "boundary_ties"),
    [(8, 0), (5, 5), (7, 7), (96, 48)],
    ids=["end-at-a-chunk-start", "c5", "c7", "whole"],
)
def test_ties_are_decided_by_their_position(
    tmp_path, monkeypatch, chunk, boundary_ties, settle
):
    """Hand-checked: τ = 48 × 1.0 (positions 0–47), 16 × 2.0, 32 × 0.01 and M = 2.
    The boundary at rank 48 takes 32 of the 1.0 ties, the first in position order, so
    its tie end is 32; with w = (1, 3) the ties before it weigh 1, those after 3.
    k = 0.83 keeps ⌈79.68⌉ = 80: the 1.0 and 2.0 entries and, of the 32 at the
    threshold t = fl(3·0.01), the first 16 (positions 64–79): held back and settled
    after the pass, or (``PENDING`` 0) settled by a pass before it, holding nothing.
    Of the tie bin, entries are looked at one by one only in a chunk that holds its
    tie end strictly inside (c5: 30–34; c7: 28–34; whole: all 48); those of the
    threshold's bin always (32)."""
    monkeypatch.setattr(tv, "CHUNK", chunk)
    tau = torch.cat([torch.ones(48), torch.full((16,), 2.0), torch.full((32,), 0.01)])
    bp = write({"w": torch.zeros(96)}, tmp_path / "base", "safetensors")
    mp = write({"w": tau}, tmp_path / "m", "safetensors")
    plan = plan_merge(bp, [mp])
    (sk,) = pruning.nps_sketches(pruning.MergeInputs(plan), [0], 2, fine=True)
    (th,) = sk.partition.bounds
    assert (th.value, th.quota, th.equal) == (1.0, 32, 48)
    assert sk.ends == (32,)
    ops: list[onepass.OnePass] = []
    real = onepass.OnePass.__init__

    def record(self, *a, **kw):
        real(self, *a, **kw)
        ops.append(self)

    monkeypatch.setattr(onepass.OnePass, "__init__", record)
    if settle:
        monkeypatch.setattr(onepass, "PENDING", 0)
    used, state = _build(plan, True, [[1.0, 3.0]], 0.83, [1.0], 2)
    assert used == ("settled" if settle else "one-pass")
    want = torch.cat(
        [
            torch.ones(32),
            torch.full((16,), 3.0),
            torch.full((16,), 2.0),
            torch.full((16,), np.float32(3) * np.float32(0.01)),
            torch.zeros(16),
        ]
    )
    assert torch.equal(state["w"], want)
    st = ops[0].tables[0].settled
    t = float(np.float32(3) * np.float32(0.01))
    if settle:
        assert st is not None and (st.t, st.quota, st.left) == (t, 16, 0)
        assert ops[0].held == 0
    else:
        assert st is None and ops[0].held == 32
    assert ops[0].special == boundary_ties + 32
    _, b = _build(plan, False, [[1.0, 3.0]], 0.83, [1.0], 2)
    _assert_same_bits(state, b)
