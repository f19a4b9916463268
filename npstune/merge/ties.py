"""TIES-merging: trim, elect sign, disjoint mean.

Paper: Yadav et al., https://arxiv.org/abs/2306.01708. Trim each τ_t to its top-k |τ_t|
(k = 0.2; scope global by default, as the reference code ranks the whole flattened
vector); elected sign = sign(Σ_t trimmed τ_t), and where that sum is exactly 0 the
majority sign, sign(Σ over the scope of the elected signs), as the reference code's
``resolve_zero_signs(..., "majority")`` does (global scope: over every entry of the task
vectors, a streaming statistics pass before the merge; per tensor: over the tensor; a
majority sum of 0 leaves those signs 0, so their entries merge to 0); merged τ = mean
over t of the trimmed entries whose sign equals the elected one (zeros ignored); θ =
θ_pre + λ·τ (λ = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from pydantic import Field

from npstune.merge.base import MergeInputs, MergeSpec, MethodParams, Scope
from npstune.merge.masks import KernelOut
from npstune.merge.pruning import MagnitudePruner, Pruner
from npstune.taskvector import Chunk


class TiesParams(MethodParams):
    """Trim ratio k, scaling λ, trim scope."""

    k: float = Field(0.2, gt=0, le=1)
    lam: float = Field(1.0, ge=0, le=10)
    scope: Scope = "global"


@dataclass
class TiesCtx:
    """One trim pruner per task (plan order), λ, and the majority sign of the global
    scope (None: per tensor, each kernel call sees a whole tensor and finds its own)."""

    pruners: Sequence[Pruner]
    lam: float
    majority: int | None = None


def prepare(inputs: MergeInputs, p: TiesParams) -> TiesCtx:
    """One trim threshold per task (global scope: two joint streaming passes), then, for
    the global scope, the majority sign (one more streaming pass)."""
    ctx = TiesCtx(MagnitudePruner.prepare_all(inputs, p.k, p.scope), p.lam)
    if p.scope == "global":
        ctx.majority = majority_sign(inputs, ctx.pruners)
    return ctx


def _sum(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """Σ_t trimmed_t, left to right in task order (a new tensor)."""
    total = trimmed[0].clone()
    for t in trimmed[1:]:
        total += t
    return total


def _sign_balance(total: torch.Tensor) -> int:
    """#{total > 0} − #{total < 0}: Σ sign(total), exactly (an integer count)."""
    return int(torch.count_nonzero(total > 0)) - int(torch.count_nonzero(total < 0))


def majority_sign(inputs: MergeInputs, pruners: Sequence[Pruner]) -> int:
    """sign(Σ over every entry in scope of sign(Σ_t trimmed τ_t)): the elected sign
    that zero sums take, from one streaming pass over the plan (fresh copies of the
    pruners, whose tie quotas are spent in position order). One task needs no pass: its
    sum is 0 only where its trimmed entry is, which merges to 0 whatever the sign."""
    if len(pruners) < 2:
        return 0
    fresh = [
        replace(p, cursor=p.cursor.threshold.cursor())
        if isinstance(p, MagnitudePruner) and p.cursor is not None
        else p
        for p in pruners
    ]
    ctx = TiesCtx(fresh, 1.0)
    plan, balance = inputs.plan, 0
    for key in plan.delta_keys:
        for start, stop in plan.chunks(key):
            kept, _ = trimmed(ctx, plan.read_chunk(key, start, stop, inputs.device))
            balance += _sign_balance(_sum(kept))
    return (balance > 0) - (balance < 0)


def elect_signs(
    trimmed: list[torch.Tensor], majority: int | None = None
) -> torch.Tensor:
    """sign(Σ_t trimmed_t), with ``majority`` where the sum is exactly 0 and some
    trimmed entry is not (where all are 0 the sign is left 0: those entries merge to 0
    anyway). ``majority`` None: the majority sign of this input itself (its scope)."""
    total = _sum(trimmed)
    elected = torch.sign(total)
    if majority is None:
        b = _sign_balance(elected)
        majority = (b > 0) - (b < 0)
    if majority:
        fix = trimmed[0] != 0
        for t in trimmed[1:]:
            fix |= t != 0
        fix &= total == 0
        elected.masked_fill_(fix, float(majority))
    return elected


def disjoint_mean(
    trimmed: list[torch.Tensor], majority: int | None = None
) -> torch.Tensor:
    """Elect sign (:func:`elect_signs`: sign(Σ trimmed), a zero sum taking the majority
    sign ``majority``, or this input's own when None); mean of the nonzero entries that
    agree with it.

    Sums run left to right in task order (as a loop over the tasks would; torch's
    stacked ``sum(0)`` agrees for up to three tasks and may round differently beyond).

    Computed without stacking the tasks: ``v_t = max(trimmed_t · elected, 0)`` is
    ``|trimmed_t|`` where it agrees (same sign, nonzero; multiplying by ±1 or 0 is
    exact) and 0 elsewhere, so the mean is ``elected · Σ v_t / #{v_t > 0}``, bit for bit
    the direct formula's (agreeing entries share a sign, and fl(−a − b) = −fl(a + b)).
    Consumes ``trimmed`` (the tensors are reused in place)."""
    elected = elect_signs(trimmed, majority)
    num = trimmed[0].mul_(elected).clamp_min_(0)  # Σ v_t, accumulated in v_0
    count = (num > 0).to(num.dtype)
    for t in trimmed[1:]:
        v = t.mul_(elected).clamp_min_(0)
        num += v
        count += v > 0
    return num.mul_(elected).div_(count.clamp_min_(1))


def trimmed(
    ctx: TiesCtx, chunk: Chunk
) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Each task's chunk with the untrimmed entries zeroed,
    and each task's trim mask."""
    out, masks = [], []
    for pr in ctx.pruners:
        mask, values = pr(chunk)
        out.append(torch.where(mask, values, torch.zeros((), dtype=values.dtype)))
        masks.append(mask)
    return out, tuple(masks)


def ties(ctx: TiesCtx, chunk: Chunk) -> KernelOut:
    """λ·disjoint_mean(trim(τ_t)) for one chunk, with each task's trim mask."""
    kept, masks = trimmed(ctx, chunk)
    merged = disjoint_mean(kept, ctx.majority)
    return KernelOut(merged if ctx.lam == 1.0 else merged.mul_(ctx.lam), masks)


SPEC = MergeSpec(
    "ties",
    TiesParams,
    kernel=ties,
    prepare=prepare,
    whole_tensor=lambda p: p.scope == "tensor",
    paper="https://arxiv.org/abs/2306.01708",
    summary="trim top-k, elect sign, disjoint mean",
)
