"""The rank-order fast path equals the streaming reference path bit for bit."""

from __future__ import annotations

import pytest
import torch

from npstune.checkpoints import write_state_dict
from npstune.errors import ConfigError
from npstune.merge import merge
from npstune.sparsify.ranked import RankedTaskVector, fuse
from tests import oracle


def _taus(seed, dtype, ties):
    g = torch.Generator().manual_seed(seed)
    taus = {
        "a": torch.randn(37, 5, generator=g),
        "b": torch.randn(101, generator=g),
        "c": torch.randn(3, 4, 2, generator=g),
    }
    if ties:  # coarse grid: many equal magnitudes, across subspace boundaries too
        taus = {k: torch.round(v * 3) / 3 for k, v in taus.items()}
    return {k: v.to(dtype).float() for k, v in taus.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("M", [1, 2, 4, 8, 16])
def test_fast_prune_equals_reference_oracle(dtype, ties, M):
    taus = _taus(M, dtype, ties)
    r = RankedTaskVector(taus, M)
    flat = oracle.flat(taus, sorted(taus))
    g = torch.Generator().manual_seed(100 + M)
    for k in (0.001, 0.05, 0.3, 1.0):
        for w in (
            torch.ones(M),
            torch.rand(M, generator=g) * 2,
            torch.round(torch.rand(M, generator=g) * 2),
        ):  # rounded: zeros and ties
            got = r.prune(w, k).dense()
            mask, vals = oracle.nps_prune(flat, flat, k, w.tolist(), M)
            want = torch.where(mask, vals, torch.zeros(()))
            assert torch.equal(got, want), (k, w)
            assert r.prune(w, k).positions.numel() == oracle.K(k, flat.numel())


def test_fast_fusion_equals_the_merge_engine(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"x": torch.randn(50, 4, generator=g), "y": torch.randn(33, generator=g)}
    fts = [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for _ in range(3)
    ]
    bp = write_state_dict(tmp_path / "b.safetensors", base)
    mps = [
        write_state_dict(tmp_path / f"m{i}.safetensors", f) for i, f in enumerate(fts)
    ]
    ws = [[2.0, 0.5, 1.0, 0.0], [1.0, 1.0, 1.5, 0.2], [0.3, 1.7, 1.0, 1.0]]
    params = {"k": 0.2, "lam": 1.0, "subspaces": 4, "weights": sum(ws, [])}
    ref = merge(bp, mps, "nps", params).state
    ranked = [
        RankedTaskVector({k: (f[k].float() - base[k].float()) for k in base}, 4)
        for f in fts
    ]
    delta = fuse(ranked, ws, 0.2, 1.0)
    # the masks and values agree exactly; the engine sums in float64 before rounding
    got = ranked[0].unflatten(delta)
    for k in base:
        torch.testing.assert_close(base[k] + got[k], ref[k], rtol=1e-6, atol=1e-6)
    for t in range(len(fts)):
        single = merge(
            bp, [mps[t]], "nps", {"k": 0.2, "subspaces": 4, "weights": ws[t]}
        ).state
        sd = ranked[t].prune(ws[t], 0.2)
        dense = ranked[t].unflatten(sd.dense())
        for k in base:
            assert torch.equal((single[k] != base[k]), dense[k] != 0)


def test_bad_weights_refused():
    r = RankedTaskVector({"a": torch.randn(10)}, 2)
    with pytest.raises(ConfigError):
        r.prune([1.0], 0.5)
    with pytest.raises(ConfigError):
        r.prune([1.0, -1.0], 0.5)
    with pytest.raises(ConfigError):
        r.prune([1.0, 1.0], 0.0)
