"""Exact top-k, NPS partition and random masks against hand-checked values and a sort
oracle."""

from __future__ import annotations

import pytest
import torch

import npstune.sparsify.topk as topk_mod
from npstune.errors import ConfigError
from npstune.sparsify import (
    bernoulli_mask,
    keep_count,
    partition,
    select,
    select_many,
    select_streams,
    subspace_bounds,
    topk_mask,
)
from tests import oracle


def apply(th, parts):
    cur = th.cursor()
    return torch.cat([cur.mask(p) for p in parts])


def test_keep_count_is_exact_ceiling():
    assert keep_count(0.07, 100) == 7  # naive float math gives 7.000000000000001 -> 8
    assert keep_count(0.05, 10) == 1
    assert keep_count(0.05, 21) == 2  # 1.05 -> 2
    assert keep_count(0.001, 5) == 1  # k·n < 1 still keeps one
    assert keep_count(1.0, 13) == 13


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "0.5"])
def test_ratio_outside_unit_interval_is_refused(bad):
    with pytest.raises(ConfigError, match="k must be in"):
        keep_count(bad, 10)


def test_ties_go_to_the_earlier_position_hand_checked():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert topk_mask(scores, 0.4).tolist() == [False, True, True, False, False]
    # across tensors: position order is tensor order, then row-major
    a, b = torch.tensor([3.0, 1.0]), torch.tensor([3.0, 3.0])
    th = select(lambda: [a, b], 2)
    assert th.value == 3.0 and th.quota == 2
    assert apply(th, [a, b]).tolist() == [True, False, True, False]


def test_keep_nothing_and_everything():
    x = torch.tensor([0.0, 0.0, 1.0])
    assert select(lambda: [x], 0).keep == 0
    assert apply(select(lambda: [x], 0), [x]).sum() == 0
    assert apply(select(lambda: [x], 3), [x]).all()


@pytest.mark.parametrize("use_radix", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_global_threshold_matches_brute_force_sort(use_radix, dtype, monkeypatch):
    if use_radix:  # force the two-pass histogram path even for small inputs
        monkeypatch.setattr(topk_mod, "SMALL", 0)
    g = torch.Generator().manual_seed(1)
    shapes = [(7, 3), (11,), (2, 2, 5), (1,)]
    for trial in range(20):
        parts = [torch.randn(s, generator=g).to(dtype).float().abs() for s in shapes]
        if trial % 3 == 0:  # plenty of exact ties
            parts = [torch.round(p * 2) / 2 for p in parts]
        flat = torch.cat([p.reshape(-1) for p in parts])
        k = [0.01, 0.05, 0.3, 0.5, 0.99, 1.0][trial % 6]
        th = select(lambda parts=parts: parts, keep_count(k, flat.numel()))
        got = apply(th, [p.reshape(-1) for p in parts])
        want = oracle.topk_mask(flat, k)
        assert torch.equal(got, want)
        assert int(got.sum()) == keep_count(k, flat.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_tensor_scope_matches_brute_force(dtype):
    g = torch.Generator().manual_seed(2)
    for shape in [(5,), (4, 6), (3, 3, 3), (300, 1000)]:
        x = torch.randn(shape, generator=g).to(dtype).float().abs()
        for k in (0.05, 0.2, 0.5):
            got = topk_mask(x.reshape(-1), k)
            assert torch.equal(got, oracle.topk_mask(x.reshape(-1), k))


def test_radix_path_on_a_large_tensor_matches_sort():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(400_000, generator=g) * 100).round().abs() / 100  # many ties
    parts = list(torch.split(x, 70_000))
    for k in (0.01, 0.05, 0.3):
        got = apply(select(lambda: parts, keep_count(k, x.numel())), parts)
        assert torch.equal(got, oracle.topk_mask(x, k))


@pytest.mark.parametrize("use_radix", [False, True])
def test_joint_select_over_streams_equals_one_select_per_stream(use_radix, monkeypatch):
    if use_radix:
        monkeypatch.setattr(topk_mod, "SMALL", 0)
    g = torch.Generator().manual_seed(5)
    n, streams = 3000, 3
    xs = [
        (torch.randn(n, generator=g) * (2 + s)).round().abs() / 4
        for s in range(streams)
    ]  # ties
    xs[2][:] = 0.5  # one stream all ties
    steps = [tuple(x[i : i + 250] for x in xs) for i in range(0, n, 250)]
    ks = [[0, 30, 1500], [1, n], [7, 2999]]
    got = select_streams(lambda: iter(steps), ks, n)
    for s in range(streams):
        want = select_many(lambda s=s: [st[s] for st in steps], ks[s], n)
        assert got[s] == want
        for K, th in zip(ks[s], got[s]):
            # the threshold counts the scores equal to it (what lets cursors skip scans)
            if K:
                assert (
                    th.equal == int((xs[s] == th.value).sum())
                    and 0 < th.quota <= th.equal
                )
            mask = apply(th, [st[s] for st in steps])
            assert int(mask.sum()) == K
            want_mask = torch.zeros(n, dtype=torch.bool)
            want_mask[torch.sort(-xs[s], stable=True).indices[:K]] = (
                True  # earlier wins ties
            )
            assert torch.equal(mask, want_mask)


def test_subspace_bounds_hand_checked():
    assert subspace_bounds(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert subspace_bounds(3, 4) == [(0, 0), (0, 1), (1, 2), (2, 3)]
    assert subspace_bounds(8, 1) == [(0, 8)]


def test_partition_labels_match_rank_ranges():
    tau = torch.tensor([0.1, -0.5, 0.3, 0.2, -0.4, 0.05, 0.6, -0.7]).abs()
    part = partition(lambda: [tau], 8, 2)
    ids = part.cursor().ids(tau)
    # ranks by |τ|: 7, 6, 1, 4 | 2, 3, 0, 5
    assert ids.tolist() == [1, 0, 1, 1, 0, 1, 0, 0]


@pytest.mark.parametrize("M", [1, 2, 3, 8])
def test_partition_with_ties_and_chunks_matches_oracle(M, monkeypatch):
    monkeypatch.setattr(topk_mod, "SMALL", 0)
    g = torch.Generator().manual_seed(M)
    x = (torch.randn(1000, generator=g) * 4).round().abs()
    parts = list(torch.split(x, 97))
    part = partition(lambda: parts, x.numel(), M)
    cur = part.cursor()
    ids = torch.cat([cur.ids(p) for p in parts])
    order = torch.sort(-x, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(x.numel())
    for m, (lo, hi) in enumerate(subspace_bounds(x.numel(), M)):
        assert torch.equal(ids == m, (rank >= lo) & (rank < hi))


def test_bernoulli_keeps_about_k_and_is_seeded():
    m1 = bernoulli_mask(100_000, 0.1, seed=3, task=0, key="w")
    m2 = bernoulli_mask(100_000, 0.1, seed=3, task=0, key="w")
    m3 = bernoulli_mask(100_000, 0.1, seed=4, task=0, key="w")
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert abs(m1.float().mean().item() - 0.1) < 0.005
