"""TSV-M: Task Singular Vectors merge (and the helpers of the other SVD merges).

Paper: Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model
Merging (CVPR 2025), https://arxiv.org/abs/2412.00081 (fusion_bench
``TaskSingularVectorMerging``). Matrix keys (ndim 2, not in ``exclude_keys``), with
p = min(m, n) and r = int(p·(1/T)): keep the top r singular triplets of each
τ_t = U_t S_t V_tᵀ, put them side by side (Û m×Tr, Ŝ, V̂ᵀ Tr×n) and
Δ = polar(Û)·diag(Ŝ)·polar(V̂ᵀ), polar(A) = U Vᵀ of A's thin SVD. Other keys:
Δ = mean_t τ_t. A scalar α scales Δ; a per-task list scales each τ_t first (and nothing
at the end). Scope: one whole tensor at a time (the key's T matrices, float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field

from npstune.errors import ConfigError
from npstune.merge.base import MergeInputs, MergeSpec, MethodParams
from npstune.taskvector import Chunk, MergePlan

#: a non-negative scaling factor (α, λ)
Scale = Annotated[float, Field(ge=0, le=10)]


class MatrixParams(MethodParams):
    """Exact key names to treat as non-matrix (averaged) although they are 2-D."""

    exclude_keys: list[str] = Field([], max_length=1_000_000)


class TsvParams(MatrixParams):
    """α: a scalar scaling Δ, or one factor per task applied to τ_t first."""

    alpha: Scale | list[Scale] = 1.0


@dataclass
class MatrixCtx:
    """What the SVD kernels need: the params, excluded keys, per-task factors, scale."""

    p: MethodParams
    exclude: frozenset[str]
    weights: list[float] | None = None
    scale: float = 1.0


def check_keys(plan: MergePlan, names: list[str]) -> frozenset[str]:
    """``names`` as a set, ConfigError if one is not a key of the plan."""
    unknown = sorted(set(names) - set(plan.keys))
    if unknown:
        raise ConfigError(
            f"exclude_keys: {unknown[0]!r} is not a key of "
            f"{plan.base.path} ({len(unknown)} such names; names are "
            "exact, not patterns)"
        )
    return frozenset(names)


def per_task(value: float | list[float], tasks: int, name: str) -> list[float] | None:
    """A per-task list checked against the task count (None for a scalar)."""
    if not isinstance(value, list):
        return None
    if len(value) != tasks:
        raise ConfigError(
            f"{name}: expected one value per task ({tasks}), got {len(value)}"
        )
    return [float(v) for v in value]


def prepare_matrix(
    inputs: MergeInputs, p: MatrixParams, alpha: float | list[float] = 1.0
) -> MatrixCtx:
    """Check ``exclude_keys`` and resolve α (scalar: final scale; list: per task)."""
    weights = per_task(alpha, inputs.tasks, "alpha")
    scale = 1.0 if weights is not None else float(alpha)  # type: ignore[arg-type]
    return MatrixCtx(p, check_keys(inputs.plan, p.exclude_keys), weights, scale)


def taus64(chunk: Chunk, weights: list[float] | None = None) -> list[torch.Tensor]:
    """The chunk's τ_t in float64 (times α_t when per-task factors are given)."""
    taus = [t.to(torch.float64) for t in chunk.taus]
    return taus if weights is None else [w * t for w, t in zip(weights, taus)]


def task_mean(taus: list[torch.Tensor]) -> torch.Tensor:
    """mean_t τ_t = (1/T)·Σ_t τ_t."""
    total = taus[0].clone()
    for t in taus[1:]:
        total += t
    return total.div_(len(taus))


def matrices(
    ctx: MatrixCtx, chunk: Chunk, taus: list[torch.Tensor]
) -> list[torch.Tensor] | None:
    """The τ_t as m×n matrices when the key is a matrix key, else None."""
    if len(chunk.shape) != 2 or chunk.key in ctx.exclude:
        return None
    return [t.reshape(chunk.shape) for t in taus]


def polar(a: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of the thin SVD of ``a``: the nearest matrix with orthonormal columns
    (or rows)."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def tsv_merge(mats: list[torch.Tensor]) -> torch.Tensor:
    """Δ = polar(Û)·diag(Ŝ)·polar(V̂ᵀ) from each task's top int(p/T) triplets."""
    p = min(mats[0].shape)
    r = int(p * (1 / len(mats)))
    if r == 0:
        return torch.zeros_like(mats[0])
    us, ss, vhs = [], [], []
    for a in mats:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        us.append(u[:, :r].clone())
        ss.append(s[:r].clone())
        vhs.append(vh[:r].clone())
        del u, s, vh
    return polar(torch.cat(us, 1)) @ (torch.cat(ss)[:, None] * polar(torch.cat(vhs, 0)))


def tsv_m(ctx: MatrixCtx, chunk: Chunk) -> torch.Tensor:
    """α·Δ of one whole tensor (TSV-M on matrices, the mean elsewhere)."""
    taus = taus64(chunk, ctx.weights)
    mats = matrices(ctx, chunk, taus)
    delta = task_mean(taus) if mats is None else tsv_merge(mats).reshape(-1)
    return delta if ctx.scale == 1.0 else delta.mul_(ctx.scale)


def prepare(inputs: MergeInputs, p: TsvParams) -> MatrixCtx:
    """No global pass: check the excluded names and α."""
    return prepare_matrix(inputs, p, p.alpha)


SPEC = MergeSpec(
    "tsv-m",
    TsvParams,
    kernel=tsv_m,
    prepare=prepare,
    whole_tensor=lambda p: True,
    paper="https://arxiv.org/abs/2412.00081",
    summary="per matrix: each task's top 1/T singular triplets, orthogonalised U and V",
)
