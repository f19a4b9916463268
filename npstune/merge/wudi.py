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
from collections.abc import Callable

import torch
from pydantic import Field

from npstune.merge.base import MergeInputs, MergeSpec
from npstune.merge.tsv_m import (
    Matrices,
    MatrixCtx,
    MatrixParams,
    TaskMatrices,
    is_matrix,
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


def wudi_start(
    mats: Matrices,
) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], None]]:
    """X₀ = Σ_t τ_t and ``grad(X, out)``, which writes ∇L(X) =
    2 Σ_t (X − τ_t) τ_tᵀτ_t / ‖τ_t‖² (zero tasks dropped) into ``out``.

    Written as 2·(X·G − B) with the constants B = Σ_t τ_t G_t and G = Σ_t G_t,
    G_t = τ_tᵀτ_t / ‖τ_t‖² (n×n), when that is cheaper (n ≤ 2·T·m): one pass over the
    τ_t, which are not kept. Else per task as 2·Σ_t ((X τ_tᵀ) τ_t − (τ_t τ_tᵀ) τ_t) /
    ‖τ_t‖² with m×m products, keeping the τ_t."""
    x: torch.Tensor | None = None
    gram = b = None
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for a in mats:
        m, n = a.shape
        if x is None:
            x = a.clone()
        else:
            x += a
        nrm = float(torch.sum(a * a))
        if nrm == 0:
            continue
        if n <= 2 * len(mats) * m:
            g_t = (a.T @ a).div_(nrm)
            gram = g_t if gram is None else gram.add_(g_t)
            b = a @ g_t if b is None else b.addmm_(a, g_t)
        else:
            kept.append((a, a / nrm))
        del a
    assert x is not None, "no task matrices"

    if gram is not None and b is not None:
        g_sum, b_sum = gram, b

        def by_gram(xs: torch.Tensor, out: torch.Tensor) -> None:
            torch.matmul(xs, g_sum, out=out)
            out.sub_(b_sum).mul_(2)

        return x, by_gram
    const = torch.zeros_like(x)
    for t, sc in kept:
        const.addmm_(t @ sc.T, t)

    def per_task(xs: torch.Tensor, out: torch.Tensor) -> None:
        out.zero_()
        for t, sc in kept:
            out.addmm_(xs @ sc.T, t)
        out.sub_(const).mul_(2)

    return x, per_task


def wudi_solve(mats: Matrices, steps: int, lr: float) -> torch.Tensor:
    """X_N of Adam on L from X₀ = Σ_t τ_t (torch.optim.Adam's update rule). Holds X,
    Adam's two moments, one work tensor and (Gram form) B: five m×n tensors."""
    b1, b2 = BETAS
    x, grad = wudi_start(mats)
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    work = torch.empty_like(x)
    for s in range(1, steps + 1):
        grad(x, work)  # work = g
        m.mul_(b1).add_(work, alpha=1 - b1)
        v.mul_(b2).addcmul_(work, work, value=1 - b2)
        torch.sqrt(v, out=work).div_(math.sqrt(1 - b2**s)).add_(EPS)  # work = denom
        x.addcdiv_(m, work, value=-lr / (1 - b1**s))
    return x


def wudi(ctx: MatrixCtx, chunk: Chunk) -> torch.Tensor:
    """Δ of one whole tensor: X_N on matrix keys, the mean elsewhere."""
    if not is_matrix(ctx, chunk):
        return task_mean(taus64(chunk))
    p: WudiParams = ctx.p  # type: ignore[assignment]
    return wudi_solve(TaskMatrices(chunk), p.steps, p.lr).reshape(-1)


def prepare(inputs: MergeInputs, p: WudiParams) -> MatrixCtx:
    """No global pass: check the excluded names."""
    return prepare_matrix(inputs, p)


SPEC = MergeSpec(
    "wudi",
    WudiParams,
    kernel=wudi,
    prepare=prepare,
    whole_tensor=lambda p: True,
    lean_read=True,
    paper="https://arxiv.org/abs/2503.08099",
    summary="per matrix: Adam steps on Σ_t ‖(X − τ_t)τ_tᵀ‖²/‖τ_t‖² from Σ τ_t",
)
