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

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Protocol

import torch
from pydantic import Field

from npstune.errors import ConfigError
from npstune.merge.base import MergeInputs, MergeSpec, MethodParams
from npstune.taskvector import Chunk, FreshTaus, MergePlan

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


def is_matrix(ctx: MatrixCtx, chunk: Chunk) -> bool:
    """Whether the key is a matrix key (2-D and not excluded)."""
    return len(chunk.shape) == 2 and chunk.key not in ctx.exclude


class Matrices(Protocol):
    """The T task matrices of one key: a list, or a :class:`TaskMatrices`."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[torch.Tensor]: ...


class TaskMatrices:
    """The chunk's τ_t as float64 m×n matrices (times α_t when per-task factors are
    given), made one at a time as they are iterated: each is a fresh tensor the
    consumer may change, and only the ones it keeps stay in memory. Iterable again."""

    def __init__(self, chunk: Chunk, weights: list[float] | None = None):
        self.chunk = chunk
        self.weights = weights

    def __len__(self) -> int:
        return len(self.chunk.taus)

    def __iter__(self) -> Iterator[torch.Tensor]:
        shape = self.chunk.shape
        fresh = isinstance(self.chunk.taus, FreshTaus)  # a new tensor per access
        for i, t in enumerate(self.chunk.taus):
            a = t.to(torch.float64, copy=not fresh).reshape(shape)
            if self.weights is not None:
                a.mul_(self.weights[i])
            yield a


def summed(mats: Matrices) -> torch.Tensor:
    """Σ_t τ_t, holding one τ_t besides the total (a new tensor)."""
    total: torch.Tensor | None = None
    for a in mats:
        if total is None:
            total = a.clone()
        else:
            total += a
        del a
    assert total is not None, "no task matrices"
    return total


def polar(a: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of the thin SVD of ``a``: the nearest matrix with orthonormal columns
    (or rows)."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def polar_cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """polar(cat(parts, dim)); ``parts`` is emptied first, so that the pieces and
    their concatenation are not both held through the SVD."""
    a = torch.cat(parts, dim)
    parts.clear()
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    del a
    return u @ vh


def top_triplets(
    a: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of the top r singular triplets (U m×r, S r, Vᵀ r×n) of ``a``."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :r].clone(), s[:r].clone(), vh[:r].clone()


def isotropic(
    us: list[torch.Tensor], vhs: list[torch.Tensor], s: torch.Tensor | float
) -> torch.Tensor:
    """polar([U…])·diag(s)·polar([Vᵀ…]) (s a scalar or one value per column); the
    lists are emptied."""
    u_hat = polar_cat(us, 1)
    v_hat = polar_cat(vhs, 0)
    v_hat.mul_(s[:, None] if isinstance(s, torch.Tensor) and s.ndim else s)
    return u_hat @ v_hat


def tsv_merge(mats: Matrices) -> torch.Tensor:
    """Δ = polar(Û)·diag(Ŝ)·polar(V̂ᵀ) from each task's top int(p/T) triplets."""
    us: list[torch.Tensor] = []
    ss: list[torch.Tensor] = []
    vhs: list[torch.Tensor] = []
    for a in mats:
        r = int(min(a.shape) * (1 / len(mats)))
        if r == 0:
            return torch.zeros_like(a)
        u, s, vh = top_triplets(a, r)
        del a
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    return isotropic(us, vhs, torch.cat(ss))


def tsv_m(ctx: MatrixCtx, chunk: Chunk) -> torch.Tensor:
    """α·Δ of one whole tensor (TSV-M on matrices, the mean elsewhere)."""
    if is_matrix(ctx, chunk):
        delta = tsv_merge(TaskMatrices(chunk, ctx.weights)).reshape(-1)
    else:
        delta = task_mean(taus64(chunk, ctx.weights))
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
    lean_read=True,
    paper="https://arxiv.org/abs/2412.00081",
    summary="per matrix: each task's top 1/T singular triplets, orthogonalised U and V",
)
