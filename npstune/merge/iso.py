"""Iso-C and Iso-CTS: isotropic merging with common and task-specific subspaces.

Paper: Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces (ICML 2025), https://arxiv.org/abs/2502.04959 (fusion_bench
``iso_c`` / ``iso_cts``). Matrix keys (ndim 2, not in ``exclude_keys``), M = Σ_t τ_t =
U S Vᵀ, p = min(m, n):
- Iso-C: Δ = α·mean(S)·U Vᵀ (the mean over all p singular values).
- Iso-CTS: c₀ = int(p·f), r = round((p − c₀)/T) (half to even), c = p − T·r (c < 0 is
  refused). Common part U_c, S_c, V_cᵀ = the top c of M; per task the top r triplets
  U'_t S'_t V'_tᵀ of W_t = τ_t − U_c U_cᵀ τ_t; Û = [U'_1 … U'_T U_c], V̂ᵀ likewise,
  s̄ = mean([S'_1 … S'_T S_c]) and Δ = α·s̄·polar(Û)·polar(V̂ᵀ).
Other keys: Δ = α·mean_t τ_t. Scope: one whole tensor at a time (float64).
"""

from __future__ import annotations

import torch
from pydantic import Field

from npstune.errors import ConfigError
from npstune.merge.base import MergeInputs, MergeSpec
from npstune.merge.tsv_m import (
    Matrices,
    MatrixCtx,
    MatrixParams,
    Scale,
    TaskMatrices,
    is_matrix,
    isotropic,
    prepare_matrix,
    summed,
    task_mean,
    taus64,
    top_triplets,
)
from npstune.taskvector import Chunk


class IsoCParams(MatrixParams):
    """α (fusion_bench ``scaling_factor``) scales every Δ."""

    alpha: Scale = 1.0


class IsoCtsParams(IsoCParams):
    """As Iso-C, plus the fraction f of the spectrum kept as the common subspace."""

    common_fraction: float = Field(0.8, ge=0, le=1)


def iso_cts_sizes(
    p: int, tasks: int, fraction: float, where: str = ""
) -> tuple[int, int]:
    """(c, r): the common and the per-task sizes as fusion_bench, c + T·r = p; a
    negative c (which fusion_bench slices wrongly) is a ConfigError."""
    c0 = int(p * fraction)  # double product, then truncation
    r = round((p - c0) / tasks)  # Python rounds half to even
    c = p - tasks * r
    if c < 0:
        raise ConfigError(
            f"iso-cts: {where or 'matrix'} (p = {p}, T = {tasks}): "
            f"common_fraction {fraction} gives {r} dims per task and a "
            f"negative common size {c}; raise common_fraction"
        )
    return c, r


def iso_c_merge(mats: Matrices) -> torch.Tensor:
    """mean(S)·U Vᵀ of the summed matrix."""
    u, s, vh = torch.linalg.svd(summed(mats), full_matrices=False)
    return (u @ vh).mul_(s.mean())


def iso_cts_merge(mats: Matrices, fraction: float, key: str = "") -> torch.Tensor:
    """s̄·polar(Û)·polar(V̂ᵀ) from the common subspace of Σ τ_t and each task's rest
    (``mats`` is iterated twice, holding one τ_t at a time)."""
    u, s, vh = torch.linalg.svd(summed(mats), full_matrices=False)
    c, r = iso_cts_sizes(min(u.shape[0], vh.shape[1]), len(mats), fraction, key)
    uc = u[:, :c]
    us: list[torch.Tensor] = []
    ss: list[torch.Tensor] = []
    vhs: list[torch.Tensor] = []
    if r:
        for w in mats:
            w.addmm_(uc, uc.T @ w, alpha=-1)  # W_t = τ_t − U_c U_cᵀ τ_t, in place
            ut, st, vht = top_triplets(w, r)
            del w
            us.append(ut)
            ss.append(st)
            vhs.append(vht)
    s_bar = torch.cat([*ss, s[:c]]).mean()
    us.append(uc)
    vhs.append(vh[:c])
    del u, uc, vh
    return isotropic(us, vhs, s_bar)


def _kernel(ctx: MatrixCtx, chunk: Chunk) -> torch.Tensor:
    if not is_matrix(ctx, chunk):
        delta = task_mean(taus64(chunk))
    elif isinstance(ctx.p, IsoCtsParams):
        mats = TaskMatrices(chunk)
        delta = iso_cts_merge(mats, ctx.p.common_fraction, chunk.key).reshape(-1)
    else:
        delta = iso_c_merge(TaskMatrices(chunk)).reshape(-1)
    return delta if ctx.scale == 1.0 else delta.mul_(ctx.scale)


def _prepare_c(inputs: MergeInputs, p: IsoCParams) -> MatrixCtx:
    return prepare_matrix(inputs, p, p.alpha)


def _prepare_cts(inputs: MergeInputs, p: IsoCtsParams) -> MatrixCtx:
    """Refuse before any arithmetic a matrix key whose common size would be negative."""
    ctx = prepare_matrix(inputs, p, p.alpha)
    plan = inputs.plan
    for key in plan.delta_keys:
        shape = plan.base.shape(key)
        if len(shape) == 2 and key not in ctx.exclude and min(shape) > 0:
            iso_cts_sizes(
                min(shape), inputs.tasks, p.common_fraction, f"{plan.base.path}:{key}"
            )
    return ctx


C_SPEC = MergeSpec(
    "iso-c",
    IsoCParams,
    kernel=_kernel,
    prepare=_prepare_c,
    whole_tensor=lambda p: True,
    lean_read=True,
    paper="https://arxiv.org/abs/2502.04959",
    summary="per matrix: flatten the spectrum of Σ τ_t to its mean singular value",
)
CTS_SPEC = MergeSpec(
    "iso-cts",
    IsoCtsParams,
    kernel=_kernel,
    prepare=_prepare_cts,
    whole_tensor=lambda p: True,
    lean_read=True,
    paper="https://arxiv.org/abs/2502.04959",
    summary="per matrix: common subspace of Σ τ_t + task-specific rest, isotropic",
)
