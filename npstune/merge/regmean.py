"""RegMean: merge each linear layer in closed form from its input Gram matrices.

Paper: Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models,
https://arxiv.org/abs/2212.09849. For a linear layer y = x Wᵀ with Gram matrices
G_t = Σ xᵀx of its inputs under model t (256 calibration examples), off-diagonals scaled
by α (0.95): G̃_t = α·G_t + (1−α)·diag(G_t), the merged weight solves
min_W Σ_t ||X_t Wᵀ − X_t W_tᵀ||² regularised the same way:
Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ. Every other tensor (biases, LayerNorm) is averaged.
Scope: one whole weight matrix at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from npstune.merge.base import MergeInputs, MergeSpec, MethodParams
from npstune.merge.data import stats_for
from npstune.taskvector import Chunk


class RegMeanParams(MethodParams):
    """α scales the Gram off-diagonals; λ scales the merged task vector."""

    alpha: float = Field(0.95, ge=0, le=1)
    lam: float = Field(1.0, ge=0, le=10)


@dataclass
class RegMeanCtx:
    grams: list  # per task: weight key -> Gram matrix (in × in)
    p: RegMeanParams


def regmean_solve(
    grams: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], alpha: float
) -> torch.Tensor:
    """Closed-form RegMean weight (out × in) from per-task Grams and weights
    (float64)."""
    # float64 zeros: the same sums as from the int 0 (0.0 + x == 0 + x, any device)
    lhs = torch.zeros((), dtype=torch.float64)
    rhs = torch.zeros((), dtype=torch.float64)
    for g, w in zip(grams, weights):
        g = g.double()
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        lhs = lhs + g
        rhs = rhs + g @ w.double().T
    return torch.linalg.lstsq(lhs, rhs).solution.T


def prepare(inputs: MergeInputs, p: RegMeanParams) -> RegMeanCtx:
    """Compute (or take) the Gram matrices of every linear layer of every model."""
    return RegMeanCtx(stats_for(inputs.data, "gram", inputs.plan), p)


def regmean(ctx: RegMeanCtx, chunk: Chunk) -> torch.Tensor:
    """λ·(W_regmean − W_pre) for linear weights; λ·mean τ for everything else."""
    if all(chunk.key in g for g in ctx.grams) and len(chunk.shape) == 2:
        base = chunk.base_cd.reshape(chunk.shape)
        ws = [base + t.reshape(chunk.shape) for t in chunk.taus]
        merged = regmean_solve([g[chunk.key] for g in ctx.grams], ws, ctx.p.alpha)
        delta = merged.to(base.dtype) - base
        return ctx.p.lam * delta.reshape(-1)
    return ctx.p.lam * torch.stack(list(chunk.taus)).mean(0)


SPEC = MergeSpec(
    "regmean",
    RegMeanParams,
    kernel=regmean,
    prepare=prepare,
    needs_data=True,
    whole_tensor=lambda p: True,
    paper="https://arxiv.org/abs/2212.09849",
    summary="closed-form linear-layer merge from Gram matrices",
)
