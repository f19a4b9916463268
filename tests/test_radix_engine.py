"""The merge engine above the radix select's size threshold, against a dense oracle.

The other fast merge tests use models of a few dozen entries, which
:func:`~npstune.sparsify.topk.select_streams` ranks by one sort (up to ``SMALL``
scores). Here the task vectors hold more than ``SMALL`` entries, globally and in one
tensor, so the two-pass radix select, its switch from buffered scores to histograms, and
the tie quota spent across read chunks all run; bf16 checkpoints make |τ| full of exact
ties, so the position rule decides many kept entries. Every output is compared bit for
bit with a dense sort-based oracle computed in the engine's arithmetic (float32 for
bf16).
"""

from __future__ import annotations

import pytest
import torch

from npstune.checkpoints import write_state_dict
from npstune.merge import MaskCollector, run_merge
from npstune.merge.registry import get_method
from npstune.sparsify.topk import SMALL
from npstune.taskvector import plan_merge
from tests import oracle

SHAPES = {"a": (600, 500), "b": (20_000,), "c": (50, 100)}
KEYS = sorted(SHAPES)
TASKS = 2
K = 0.1
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A bf16 base and two fine-tuned bf16 models (θ_t on the bf16 grid: many ties)."""
    d = tmp_path_factory.mktemp("radix")
    g = torch.Generator().manual_seed(7)
    base = {k: torch.randn(s, generator=g).to(BF16) for k, s in SHAPES.items()}
    fts = []
    for _ in range(TASKS):
        ft = {}
        for k, v in base.items():
            noise = (torch.randn(v.shape, generator=g) * 0.02).to(BF16).float()
            ft[k] = (v.float() + noise).to(BF16)
        fts.append(ft)
    bp = write_state_dict(d / "base.safetensors", base)
    mps = [write_state_dict(d / f"t{i}.safetensors", ft) for i, ft in enumerate(fts)]
    return bp, mps, base, fts


@pytest.fixture
def small_chunks(monkeypatch):
    """Read chunks of 64 Ki elements: tie quotas and partitions cross chunk borders."""
    import npstune.taskvector as tv

    monkeypatch.setattr(tv, "CHUNK", 1 << 16)


def run(models, method, params):
    bp, mps, _, _ = models
    plan = plan_merge(bp, mps)
    sink = MaskCollector(
        {k: plan.base.shape(k) for k in plan.delta_keys}, plan.task_names
    )
    res = run_merge(plan, get_method(method), params, masks=sink)
    masks = [oracle.flat(sink.masks[n], KEYS) for n in plan.task_names]
    return oracle.flat(res.state, KEYS), masks


def dense(models):
    _, _, base, fts = models
    b = oracle.flat(base, KEYS)
    t32 = [oracle.flat(f, KEYS).float() - b.float() for f in fts]
    return b, t32


def per_scope(fn, scope, n_total):
    """``fn(lo, hi)`` over the whole flat vector
    (global) or per tensor, concatenated."""
    if scope == "global":
        return fn(0, n_total)
    parts, pos = [], 0
    for k in KEYS:
        n = torch.Size(SHAPES[k]).numel()
        parts.append(fn(pos, pos + n))
        pos += n
    return (
        torch.cat(parts)
        if not isinstance(parts[0], tuple)
        else tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    )


def finish(b, delta32):
    return (b.float() + delta32).to(BF16)


def test_the_models_are_above_the_threshold_and_full_of_ties(models):
    b, t32 = dense(models)
    n = b.numel()
    assert n > SMALL and SHAPES["a"][0] * SHAPES["a"][1] > SMALL
    kth = torch.sort(t32[0].abs(), descending=True).values[oracle.K(K, n) - 1]
    ties = int((t32[0].abs() == kth).sum())
    kept_at_kth = oracle.K(K, n) - int((t32[0].abs() > kth).sum())
    assert (
        ties > kept_at_kth > 0
    )  # the position rule decides who is kept at the threshold


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_magnitude_masks_and_output_equal_the_dense_oracle(models, small_chunks, scope):
    b, t32 = dense(models)
    got, masks = run(models, "magnitude", {"k": K, "lam": 0.7, "scope": scope})
    total = torch.zeros_like(t32[0])
    for t, tau in enumerate(t32):
        want = per_scope(
            lambda lo, hi, tau=tau: oracle.topk_mask(tau[lo:hi].abs(), K),
            scope,
            b.numel(),
        )
        assert torch.equal(masks[t], want), t
        total += torch.where(want, tau, torch.zeros(()))
    assert torch.equal(got.view(torch.int16), finish(b, 0.7 * total).view(torch.int16))


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_nps_masks_and_output_equal_the_dense_oracle(models, small_chunks, scope):
    b, t32 = dense(models)
    w = [1.5, 0.2, 1.0, 0.7, 2.0, 0.0, 1.1, 0.9]
    got, masks = run(models, "nps", {"k": K, "scope": scope, "weights": w})
    total = torch.zeros_like(t32[0])
    for t, tau in enumerate(t32):
        mask, vals = per_scope(
            lambda lo, hi, tau=tau: oracle.nps_prune(tau[lo:hi], tau[lo:hi], K, w, 8),
            scope,
            b.numel(),
        )
        assert torch.equal(masks[t], mask), t
        total += torch.where(mask, vals, torch.zeros(()))
    assert torch.equal(got.view(torch.int16), finish(b, total).view(torch.int16))


def ties_dense(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """TIES over one scope, stacked: elected sign, a zero sum with kept entries taking
    sign(Σ elected); mean of the agreeing entries, summed in task order."""
    st = torch.stack(trimmed)
    total = trimmed[0].clone()
    for t in trimmed[1:]:
        total = total + t
    el = torch.sign(total)
    balance = int((el > 0).sum()) - int((el < 0).sum())
    el[(total == 0) & (st != 0).any(0)] = float((balance > 0) - (balance < 0))
    agree = (torch.sign(st) == el) & (st != 0)
    num = torch.zeros_like(total)
    for t in range(len(trimmed)):
        num = num + torch.where(agree[t], st[t], torch.zeros(()))
    return num / agree.sum(0).clamp_min(1).to(num.dtype)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_trim_masks_and_output_equal_the_dense_oracle(models, small_chunks, scope):
    b, t32 = dense(models)
    got, masks = run(models, "ties", {"k": 0.3, "lam": 1.3, "scope": scope})

    def ties_in(lo, hi):
        trims = [oracle.topk_mask(tau[lo:hi].abs(), 0.3) for tau in t32]
        kept = [
            torch.where(m, tau[lo:hi], torch.zeros(())) for m, tau in zip(trims, t32)
        ]
        return (ties_dense(kept), *trims)

    merged, *trims = per_scope(ties_in, scope, b.numel())
    for t in range(TASKS):
        assert torch.equal(masks[t], trims[t]), t
    st = torch.stack(
        [torch.where(m, tau, torch.zeros(())) for m, tau in zip(trims, t32)]
    )
    zero_sums = (st.sum(0) == 0) & (st != 0).any(0)
    assert (
        int(zero_sums.sum()) > 0
    )  # bf16: some sums cancel exactly (the majority rule runs)
    assert torch.equal(got.view(torch.int16), finish(b, merged * 1.3).view(torch.int16))
