"""Model Tailor: a patch of τ_t kept by salience and sensitivity, compensated per row.

Paper: Zhu et al., Model Tailor: Mitigating Catastrophic Forgetting in Multi-modal
Large Language Models, https://arxiv.org/abs/2402.12048. Per task t and entry i:
salience a_i = |τ_i|, sensitivity c_i = ½·F_i·τ_i² (the loss change when τ_i is
removed, to second order, the diagonal Fisher F of θ_t on task t for the Hessian);
fused score S_i = (1 − β)·a_i / mean(a) + β·c_i / mean(c) (means over the scope, so the
units cancel; a zero mean drops its term). The patch M keeps exactly the top-k of S
(⌈k·n⌉, ties to the earlier position), scope global (default) or per tensor.
Compensation, per linear weight (out × in) with task t's input Gram G = Σ xᵀx, damped
H = G + damp·mean(diag G)·I: in each row the kept entries S get
ΔW'_S = τ_S + H_SS⁻¹ G_SU τ_U (U: the removed entries), the minimiser over ΔW' zero on
U of (ΔW' − τ) H (ΔW' − τ)ᵀ = ‖(ΔW' − τ) X‖² + damping, OBS's update for removing τ_U.
Other tensors: ΔW' = M ⊙ τ. Merge: θ = θ_pre + λ·Σ_t ΔW'_t.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from npstune.merge.base import MergeInputs, MergeSpec, MethodParams, Scope
from npstune.merge.data import stats_for
from npstune.merge.masks import KernelOut
from npstune.sparsify import ThresholdCursor, keep_count, select, topk_mask
from npstune.taskvector import Chunk, MergePlan

#: bytes of float64 per-row systems solved at once (rows batched to stay under it)
SOLVE_BYTES = 1 << 26


class TailorParams(MethodParams):
    """Keep ratio k, scaling λ, sensitivity weight β in the fused score, whether to
    compensate and its relative damping, ranking scope."""

    k: float = Field(0.1, gt=0, le=1)
    lam: float = Field(1.0, ge=0, le=10)
    beta: float = Field(0.5, ge=0, le=1)
    compensate: bool = True
    damp: float = Field(0.01, ge=0, le=1)
    scope: Scope = "global"


def fused_scores(
    tau: torch.Tensor, fisher: torch.Tensor, w_sal: float, w_sens: float
) -> torch.Tensor:
    """w_sal·|τ| + w_sens·½Fτ² (float32; the weights carry β and the means)."""
    t = tau.float()
    return w_sal * t.abs() + w_sens * (0.5 * fisher.float() * t * t)


def compensate(
    delta: torch.Tensor,
    mask: torch.Tensor,
    gram: torch.Tensor,
    damp: float = 0.01,
    budget: int = SOLVE_BYTES,
) -> torch.Tensor:
    """ΔW' (float64, zero off ``mask``): per row, the kept entries moved to minimise
    (ΔW' − Δ) H (ΔW' − Δ)ᵀ (module docstring); rows solved in batches of padded
    |S|×|S| systems of at most ``budget`` bytes, by Cholesky (pseudo-inverse where
    H_SS is singular)."""
    d = delta.double()
    m = mask.bool()
    g = gram.to(d.device, torch.float64)
    out = torch.where(m, d, torch.zeros((), dtype=d.dtype, device=d.device))
    scale = float(torch.diagonal(g).mean()) if g.numel() else 0.0
    if scale <= 0:  # no input energy: nothing to make up for
        return out
    gd = g + (damp * scale) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    counts = m.sum(1)
    need = (counts > 0) & ((d != 0) & ~m).any(1)
    rows = need.nonzero().squeeze(1)
    if rows.numel() == 0:
        return out
    rhs_all = torch.where(m, torch.zeros((), dtype=d.dtype, device=d.device), d) @ g
    width = int(counts[rows].max())
    step = max(1, budget // (8 * width * width))
    for lo in range(0, rows.numel(), step):
        r = rows[lo : lo + step]
        s = int(counts[r].max())
        # each row's kept columns first (ascending), padded with removed ones
        idx = torch.argsort((~m[r]).to(torch.int8), dim=1, stable=True)[:, :s]
        valid = torch.arange(s, device=d.device) < counts[r, None]
        pair = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(s, dtype=g.dtype, device=g.device).expand(len(r), s, s)
        a = torch.where(pair, gd[idx[:, :, None], idx[:, None, :]], eye)
        b = rhs_all[r].gather(1, idx) * valid
        chol, info = torch.linalg.cholesky_ex(a)
        e = torch.cholesky_solve(b[:, :, None], chol)[:, :, 0]
        bad = info != 0
        if bool(bad.any()):
            e[bad] = (torch.linalg.pinv(a[bad], hermitian=True) @ b[bad, :, None])[
                :, :, 0
            ]
        vals = torch.where(valid, d[r].gather(1, idx) + e, torch.zeros_like(e))
        out[r] = torch.zeros_like(out[r]).scatter_(1, idx, vals)
    return out


@dataclass
class TailorCtx:
    fishers: Sequence[Mapping[str, torch.Tensor]]
    grams: Sequence[Mapping[str, torch.Tensor]]
    #: global scope: per task, the fused score's weights and the threshold cursor
    weights: list[tuple[float, float]] | None
    cursors: list[ThresholdCursor] | None
    p: TailorParams

    def fisher(
        self, t: int, key: str, like: torch.Tensor, start: int = 0
    ) -> torch.Tensor:
        """F_t[key]'s elements ``[start, start + like.numel())`` like ``like`` (zeros
        where the statistics have no such key)."""
        f = self.fishers[t].get(key)
        if f is None:
            return torch.zeros_like(like, dtype=torch.float32)
        f = f.reshape(-1)[start : start + like.numel()]
        return f.to(like.device, torch.float32)


def _weights(sal: float, sens: float, n: int, beta: float) -> tuple[float, float]:
    """(w_sal, w_sens) = ((1 − β)/mean(a), β/mean(c)), a term with a zero mean
    dropped."""
    w_sal = (1 - beta) * n / sal if sal > 0 else 0.0
    w_sens = beta * n / sens if sens > 0 else 0.0
    return w_sal, w_sens


def _global(inputs: MergeInputs, ctx: TailorCtx) -> None:
    """The global scope's pass: each task's score weights (one pass of sums), then
    its exact top-k threshold (the streaming select's two passes)."""
    plan: MergePlan = inputs.plan
    n = plan.n
    weights = []
    for t in range(inputs.tasks):
        sal = sens = 0.0
        for tau, f in _task_chunks(plan, ctx, t, inputs.device):
            sal += float(tau.abs().double().sum())
            sens += float((0.5 * f.double() * tau.double() ** 2).sum())
        weights.append(_weights(sal, sens, n, ctx.p.beta))
    K = keep_count(ctx.p.k, n)
    cursors = []
    for t, (ws, wc) in enumerate(weights):

        def chunks(
            t: int = t, ws: float = ws, wc: float = wc
        ) -> Iterator[torch.Tensor]:
            for tau, f in _task_chunks(plan, ctx, t, inputs.device):
                yield fused_scores(tau, f, ws, wc)

        cursors.append(select(chunks, K, n).cursor())
    ctx.weights, ctx.cursors = weights, cursors


def _task_chunks(
    plan: MergePlan, ctx: TailorCtx, t: int, device: str | torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(τ_t, F_t) float32 chunks in position order."""
    tv = plan.task_vectors()[t]
    for key in plan.delta_keys:
        for start, stop in plan.chunks(key):
            tau = tv.delta(key, start, stop).to(device)
            yield tau, ctx.fisher(t, key, tau, start)


def prepare(inputs: MergeInputs, p: TailorParams) -> TailorCtx:
    """Each model's Fisher (and Grams, to compensate) on its own task; global scope:
    the thresholds."""
    plan = inputs.plan
    fishers = stats_for(inputs.data, "fisher", plan)
    grams = (
        stats_for(inputs.data, "gram", plan)
        if p.compensate
        else [{}] * len(plan.models)
    )
    ctx = TailorCtx(fishers, grams, None, None, p)
    if p.scope == "global":
        _global(inputs, ctx)
    return ctx


def tailor(ctx: TailorCtx, chunk: Chunk) -> KernelOut:
    """λ·Σ_t ΔW'_t for one whole tensor, with each task's patch M_t."""
    total = torch.zeros_like(chunk.base_cd)
    masks = []
    for t, tau32 in enumerate(chunk.taus32):
        f = ctx.fisher(t, chunk.key, tau32)
        if ctx.cursors is not None and ctx.weights is not None:
            mask = ctx.cursors[t].mask(fused_scores(tau32, f, *ctx.weights[t]))
        else:
            sal = float(tau32.abs().double().sum())
            sens = float((0.5 * f.double() * tau32.double() ** 2).sum())
            w = _weights(sal, sens, tau32.numel(), ctx.p.beta)
            mask = topk_mask(fused_scores(tau32, f, *w), ctx.p.k)
        tau = chunk.taus[t]
        g = ctx.grams[t].get(chunk.key)
        shape = chunk.shape
        if (
            ctx.p.compensate
            and g is not None
            and len(shape) == 2
            and tuple(g.shape) == (shape[1], shape[1])
        ):
            kept = compensate(
                tau.reshape(shape), mask.reshape(shape), g, ctx.p.damp
            ).reshape(-1)
            total += kept.to(total.dtype)
        else:
            zero = torch.zeros((), dtype=tau.dtype, device=tau.device)
            total += torch.where(mask, tau, zero)
        masks.append(mask)
    return KernelOut(ctx.p.lam * total, tuple(masks))


SPEC = MergeSpec(
    "tailor",
    TailorParams,
    kernel=tailor,
    prepare=prepare,
    needs_data=True,
    whole_tensor=lambda p: True,
    paper="https://arxiv.org/abs/2402.12048",
    summary="top-k of fused salience |τ| + sensitivity ½Fτ², linear layers "
    "compensated from Grams; θ_pre + λ·Σ",
)
