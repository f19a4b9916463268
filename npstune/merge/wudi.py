"""WUDI-Merging: per matrix, gradient steps on the task vectors' own interference loss.

Paper: Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free
Model Merging via Task Vectors (ICML 2025), https://arxiv.org/abs/2503.08099
(fusion_bench ``wudi_merging``). Matrix keys (ndim 2, not in ``exclude_keys``): minimise
L(X) = Σ_t ‖(X − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F from X₀ = Σ_t τ_t by N steps of Adam
(lr 1e-5, β = (0.9, 0.999), ε = 1e-8, torch's update rule) and Δ = X_N; a task with
τ_t = 0 is dropped from L (its term is 0/0 in fusion_bench). Other keys: Δ = mean_t τ_t.
Deterministic. Scope: one whole tensor at a time (float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import cast

import torch
from pydantic import Field

from npstune.merge.base import MergeInputs, MergeSpec
from npstune.merge.tsv_m import (
    MatrixCtx,
    MatrixParams,
    matrices,
    prepare_matrix,
    task_mean,
    taus64,
)
from npstune.taskvector import Chunk

BETAS = (0.9, 0.999)
EPS = 1e-8


class WudiParams(MatrixParams):
    """Adam steps N (fusion_bench ``iter_num``) and learning rate."""

    steps: int = Field(400, ge=1, le=100_000)
    lr: float = Field(1e-5, gt=0, le=1)


def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(terms)`` (0 + t_1 + ...) of a non-empty stream of tensors."""
    return cast(torch.Tensor, sum(terms))


def wudi_gradient(mats: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """X ↦ ∇L(X) = 2 Σ_t (X − τ_t) τ_tᵀτ_t / ‖τ_t‖², zero tasks dropped.

    Written as 2·(X·G − B) with the constants B = Σ_t τ_t G_t and G = Σ_t G_t,
    G_t = τ_tᵀτ_t / ‖τ_t‖² (n×n), when that is cheaper (n ≤ 2·T·m); else per task as
    2·Σ_t ((X τ_tᵀ) τ_t − (τ_t τ_tᵀ) τ_t) / ‖τ_t‖² with m×m products."""
    kept = [(a, float(torch.sum(a * a))) for a in mats]
    kept = [(a, nrm) for a, nrm in kept if nrm > 0]
    if not kept:
        return lambda x: torch.zeros_like(x)
    m, n = kept[0][0].shape
    if n <= 2 * len(kept) * m:
        g = _total(a.T @ a / nrm for a, nrm in kept)
        b = _total(a @ (a.T @ a) / nrm for a, nrm in kept)
        return lambda x: 2 * (x @ g - b)
    scaled = [(a, a / nrm) for a, nrm in kept]
    b = _total((a @ s.T) @ a for a, s in scaled)
    return lambda x: 2 * (_total((x @ s.T) @ a for a, s in scaled) - b)


def wudi_solve(mats: list[torch.Tensor], steps: int, lr: float) -> torch.Tensor:
    """X_N of Adam on L from X₀ = Σ_t τ_t (torch.optim.Adam's update rule)."""
    b1, b2 = BETAS
    x = sum(mats[1:], mats[0].clone())
    grad = wudi_gradient(mats)
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for s in range(1, steps + 1):
        g = grad(x)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = v.sqrt().div_(math.sqrt(1 - b2**s)).add_(EPS)
        x.addcdiv_(m, denom, value=-lr / (1 - b1**s))
    return x


def wudi(ctx: MatrixCtx, chunk: Chunk) -> torch.Tensor:
    """Δ of one whole tensor: X_N on matrix keys, the mean elsewhere."""
    taus = taus64(chunk)
    mats = matrices(ctx, chunk, taus)
    if mats is None:
        return task_mean(taus)
    p: WudiParams = ctx.p  # type: ignore[assignment]
    return wudi_solve(mats, p.steps, p.lr).reshape(-1)


def prepare(inputs: MergeInputs, p: WudiParams) -> MatrixCtx:
    """No global pass: check the excluded names."""
    return prepare_matrix(inputs, p)


SPEC = MergeSpec(
    "wudi",
    WudiParams,
    kernel=wudi,
    prepare=prepare,
    whole_tensor=lambda p: True,
    paper="https://arxiv.org/abs/2503.08099",
    summary="per matrix: Adam steps on Σ_t ‖(X − τ_t)τ_tᵀ‖²/‖τ_t‖² from Σ τ_t",
)
