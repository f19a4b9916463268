"""The one-pass NPS threshold from per-subspace sketches, against the two-pass select.

Every threshold (value, tie quota, kept count, equal count) must equal
:func:`~npstune.sparsify.topk.select_streams`'s on the same reweighted scores, on inputs
where ties abound: bf16-rounded magnitudes, a third of the entries exactly zero, a
weight of 0 (a whole subspace ties at 0) and a weight of 10⁶ (its bins land far from
the others').
"""

from __future__ import annotations

import math

import pytest
import torch

import npstune.sparsify.sketch as sketch_mod
from npstune.errors import ConfigError
from npstune.sparsify import keep_count, partitions, reweight, select_streams
from npstune.sparsify.sketch import Sketch, sketch_thresholds

CHUNK = 7_777  # chunks that cut subspaces, ties and brackets anywhere


def _streams(xs):
    """``steps()`` over several equally long score vectors, chunk by chunk."""
    n = xs[0].numel()

    def steps():
        for i in range(0, n, CHUNK):
            yield tuple(x[i : i + CHUNK] for x in xs)

    return steps


def _setup(xs, M):
    steps = _streams(xs)
    parts = partitions(steps, xs[0].numel(), M, len(xs))
    return steps, parts, [Sketch.of(p) for p in parts]


def _reweighted(steps, parts, ws, calls=None):
    def gen():
        if calls is not None:
            calls.append(1)
        pcs = [p.cursor() for p in parts]
        for step in steps():
            yield tuple(reweight(s, pc.ids(s), w) for s, pc, w in zip(step, pcs, ws))

    return gen


def _scores(g, n, zeros=False):
    x = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16).float().abs()
    if zeros:
        x[torch.randperm(n, generator=g)[: n // 3]] = 0.0
    return x


@pytest.mark.parametrize("case", range(12))
def test_thresholds_equal_the_two_pass_select(case):
    g = torch.Generator().manual_seed(case)
    n = [3_000, 40_000, 300_001][case % 3]  # one sort below SMALL scores, radix above
    M = [1, 3, 8, 16][case % 4]
    xs = [_scores(g, n, zeros=case % 2 == 0) for _ in range(2)]
    steps, parts, sks = _setup(xs, M)
    assert [sk.hist.sum() for sk in sks] == [n, n]
    for x, sk, part in zip(xs, sks, parts):  # the sketch, counted directly
        ids = part.cursor().ids(x).long()
        direct = torch.bincount(
            ids * (1 << 15) + (x.view(torch.int32) >> 16).long(), minlength=M << 15
        ).view(M, 1 << 15)
        assert (direct.numpy() == sk.hist).all()
    for trial in range(4):
        ws = [torch.rand(M, generator=g) * 2 for _ in xs]
        if trial == 1:
            ws[0][0] = 0.0  # the largest magnitudes all reweighted to 0: ties at 0
        if trial == 2:
            ws[1][-1] = 1e6
        K = keep_count([0.001, 0.05, 0.3, 0.9][trial], n)
        rw = _reweighted(steps, parts, ws)
        got = sketch_thresholds(rw, sks, ws, K)
        want = [ts[0] for ts in select_streams(rw, [[K]] * 2, n)]
        assert got == want


def test_hand_checked_ties_and_extremes():
    # |τ| = 4, 3, 3, 2, 1, 0 ; M = 2: subspace 1 = ranks 0..2 (4, 3, 3), 2 = the rest
    x = torch.tensor([3.0, 0.0, 4.0, 1.0, 3.0, 2.0])
    steps, parts, sks = _setup([x], 2)
    assert sks[0].hist.sum(axis=1).tolist() == [3, 3]
    w = torch.tensor([0.5, 1.0])  # reweighted: 1.5, 0, 2, 1, 1.5, 2
    rw = _reweighted(steps, parts, [w])
    # keep 3 of 6: the two 2.0s, then one 1.5 of two (the quota decides by position)
    (th,) = sketch_thresholds(rw, sks, [w], 3)
    assert (th.value, th.quota, th.keep, th.equal) == (1.5, 1, 3, 2)
    (th,) = sketch_thresholds(rw, sks, [w], 6)  # everything: down to the zero
    assert (th.value, th.quota, th.keep, th.equal) == (0.0, 1, 6, 1)
    (th,) = sketch_thresholds(rw, sks, [w], 1)  # the first 2.0 only
    assert (th.value, th.quota, th.keep, th.equal) == (2.0, 1, 1, 2)
    (th,) = sketch_thresholds(rw, sks, [w], 0)
    assert th.value == math.inf and th.keep == 0


def test_one_pass_and_the_wide_bracket_fallback(monkeypatch):
    g = torch.Generator().manual_seed(3)
    n, M = 300_001, 8
    x = _scores(g, n, zeros=True)
    steps, parts, sks = _setup([x], M)
    w = torch.rand(M, generator=g) * 2
    K = keep_count(0.05, n)
    calls: list[int] = []
    rw = _reweighted(steps, parts, [w], calls)
    (one,) = sketch_thresholds(rw, sks, [w], K)
    assert len(calls) == 1
    lo, hi = sks[0].bracket(w, K)
    assert 0 <= lo <= hi and hi - lo + 1 <= sketch_mod.BRACKET
    monkeypatch.setattr(sketch_mod, "BRACKET", 1)  # every bracket too wide: two passes
    calls.clear()
    (two,) = sketch_thresholds(rw, sks, [w], K)
    assert len(calls) == 2 and two == one


def test_memory_does_not_grow_with_n():
    g = torch.Generator().manual_seed(4)
    small = _setup([_scores(g, 5_000)], 8)[2][0]
    large = _setup([_scores(g, 500_000)], 8)[2][0]
    assert small.hist.shape == large.hist.shape == (8, 1 << 15)


def test_a_partition_without_digits_is_refused():
    from npstune.sparsify import Partition

    with pytest.raises(ConfigError, match="digit histogram"):
        Sketch.of(Partition(4, 2, ()))


def test_bad_inputs():
    x = torch.tensor([3.0, 1.0, 2.0, 0.5])
    steps, parts, sks = _setup([x], 2)
    w = torch.ones(2)
    with pytest.raises(ConfigError, match="cannot keep 5 of 4"):
        sketch_thresholds(_reweighted(steps, parts, [w]), sks, [w], 5)
    y = torch.tensor([1.0, 2.0])
    other = _setup([y], 2)[2][0]
    with pytest.raises(ConfigError, match="same length"):
        sketch_thresholds(_reweighted(steps, parts, [w, w]), [sks[0], other], [w, w], 1)
    # a sketch of other scores than the ones streamed is caught, never a wrong answer
    stale = Sketch(sks[0].partition, sks[0].hist * 0)
    with pytest.raises(AssertionError, match="bracket holds"):
        sketch_thresholds(_reweighted(steps, parts, [w]), [stale], [w], 2)


def test_merges_on_the_same_checkpoints_reuse_the_sketches(tmp_path, monkeypatch):
    """A search's candidates: the partition (and sketch) passes run once per set of
    checkpoints, and the outputs are those of a fresh process (cache cleared)."""
    import npstune.merge.pruning as pruning
    from npstune.checkpoints import write_state_dict
    from npstune.merge import merge

    g = torch.Generator().manual_seed(5)
    base = {
        "a": torch.randn(300, 200, generator=g),
        "b": torch.randn(5000, generator=g),
    }
    paths = [write_state_dict(tmp_path / "base.safetensors", base)]
    for t in range(2):
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(write_state_dict(tmp_path / f"t{t}.safetensors", ft))
    built: list[int] = []
    real = pruning.partitions
    monkeypatch.setattr(pruning, "partitions", lambda *a: built.append(1) or real(*a))
    monkeypatch.setattr(pruning, "_SKETCHES", type(pruning._SKETCHES)())
    outs = []
    for w in ([1.0, 0.5, 2.0, 1.0], [0.2, 1.7, 1.0, 0.9]):
        p = {"k": 0.1, "subspaces": 4, "weights": w}
        outs.append(merge(paths[0], paths[1:], "nps", p).state)
    assert len(built) == 1
    pruning._SKETCHES.clear()
    fresh = merge(paths[0], paths[1:], "nps", p).state
    assert len(built) == 2
    assert all(torch.equal(fresh[k], outs[1][k]) for k in base)
    assert not torch.equal(outs[0]["a"], outs[1]["a"])


def _three_checkpoints(tmp_path, seed=6):
    from npstune.checkpoints import write_state_dict

    g = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(120, 50, generator=g), "b": torch.randn(900, generator=g)}
    paths = [write_state_dict(tmp_path / "base.safetensors", base)]
    for t in range(2):
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(write_state_dict(tmp_path / f"t{t}.safetensors", ft))
    return paths


def _inputs(paths):
    from npstune.merge.base import MergeInputs
    from npstune.taskvector import plan_merge

    return MergeInputs(plan_merge(paths[0], paths[1:]))


def test_a_sketch_store_shares_the_sketches_between_processes(tmp_path, monkeypatch):
    """What one process computed, another (its cache empty) reads from the store
    instead of passing over τ again: the same partitions, histograms and fine
    suffixes; a changed checkpoint, a torn file or another format are recomputed."""
    import os

    import numpy as np

    import npstune.merge.pruning as pruning

    paths = _three_checkpoints(tmp_path)
    store = tmp_path / "store"
    built: list[int] = []
    real = pruning.partitions
    monkeypatch.setattr(pruning, "partitions", lambda *a: built.append(1) or real(*a))
    monkeypatch.setattr(pruning, "_SKETCHES", type(pruning._SKETCHES)())
    first = pruning.nps_sketches(_inputs(paths), [0, 1], 4, fine=True, store=store)
    files = sorted(store.glob("sketches-*.pkl"))
    assert len(built) == 1 and len(files) == 1
    assert not list(store.glob("*.tmp"))

    def same(a, b):
        assert [s.partition.bounds for s in a] == [s.partition.bounds for s in b]
        assert all(np.array_equal(x.hist, y.hist) for x, y in zip(a, b))
        assert all(np.array_equal(x.fine, y.fine) for x, y in zip(a, b))

    pruning._SKETCHES.clear()  # "another process"
    again = pruning.nps_sketches(_inputs(paths), [0, 1], 4, fine=True, store=store)
    assert len(built) == 1  # read, not computed
    same(first, again)
    # without a store: computed again
    pruning._SKETCHES.clear()
    pruning.nps_sketches(_inputs(paths), [0, 1], 4, fine=True)
    assert len(built) == 2
    # a torn file: a warning, recomputed, and the store repaired
    pruning._SKETCHES.clear()
    files[0].write_bytes(files[0].read_bytes()[:50])
    fixed = pruning.nps_sketches(_inputs(paths), [0, 1], 4, fine=True, store=store)
    assert len(built) == 3
    same(first, fixed)
    pruning._SKETCHES.clear()
    pruning.nps_sketches(_inputs(paths), [0, 1], 4, fine=True, store=store)
    assert len(built) == 3
    # a checkpoint rewritten (its mtime moves): another key, computed again
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    pruning._SKETCHES.clear()
    pruning.nps_sketches(_inputs(paths), [0, 1], 4, fine=True, store=store)
    assert len(built) == 4
    assert len(list(store.glob("sketches-*.pkl"))) == 2


def test_a_store_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    import npstune.merge.pruning as pruning

    paths = _three_checkpoints(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(pruning, "_SKETCHES", type(pruning._SKETCHES)())
    sks = pruning.nps_sketches(_inputs(paths), [0, 1], 4, store=blocker / "store")
    assert len(sks) == 2 and sks[0].n == 120 * 50 + 900
