"""PCB-Merging (data-free): balance parameter competition within and across tasks.

Paper: Du et al., Parameter Competition Balancing for Model Merging (NeurIPS 2024),
https://arxiv.org/abs/2410.02396 (``PCB_merge`` in duguodong7/pcb-merging). On each
task's row x of X (T×d): clamp(x; a, b) clips x to [sort↑(x)[int(d·a)],
sort↑(x)[int(d·(1−b) − 1)]] (0-based); minmax(x) = (x − min)/(max − min), 0 on a
constant row. A = clamp(|X|; q, q), C = sign(X)·A,
β = exp(T·minmax(A)²)·tanh(X ⊙ Σ_t X_t), scale = minmax(clamp(β; 1 − ρ, 0)),
τ_m = Σ_t λ_t C_t ⊙ scale_t / max(Σ_t scale_t, 1e-12) and θ = θ_pre + τ_m.
Scope: ``global`` (the repo's: every delta key flattened into the rows; ``exclude_keys``
keep θ_pre) finds the order statistics by exact streaming passes
(:mod:`npstune.merge.orderstats`), then applies chunk by chunk; ``per_tensor`` (alias
``tensor``) applies the rule to each whole key on its own. Frozen tensors are not in X
(npstune's rule for n); ``plan_merge(..., frozen=False)`` puts their zeros in, as the
repo does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field

from npstune.merge.base import MergeInputs, MergeSpec, MethodParams
from npstune.merge.orderstats import Rows, order_stats
from npstune.merge.tsv_m import Scale, check_keys, per_task, taus64
from npstune.taskvector import Chunk


class PcbParams(MethodParams):
    """Keep ratio ρ, scaling λ (scalar or per task), clip fraction q, scope."""

    ratio: float = Field(0.1, gt=0, le=1)
    lam: Scale | list[Scale] = 1.0
    clip: float = Field(1e-4, ge=0, lt=0.5)
    scope: Literal["global", "per_tensor", "tensor"] = "global"
    exclude_keys: list[str] = Field([], max_length=1_000_000)


#: float64 elements per step of the global order-statistic passes
PASS_BLOCK = 1 << 20


def clamp_indices(d: int, a: float, b: float) -> tuple[int, int]:
    """0-based ranks of the clamp bounds: int(d·a), int(d·(1−b) − 1) (Python int())."""
    return min(max(int(d * a), 0), d - 1), min(max(int(d * (1 - b) - 1), 0), d - 1)


@dataclass
class RowStats:
    """Per task: the |x| clamp bounds (lo, hi), the β threshold and max."""

    lo: list[float]
    hi: list[float]
    thr: list[float] = field(default_factory=list)
    top: list[float] = field(default_factory=list)


def _minmax(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (x - lo).div_(hi - lo) if hi > lo else torch.zeros_like(x)


def clipped_scores(
    taus: list[torch.Tensor], st: RowStats, with_c: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(C_t, β_t) of one chunk, given each row's clamp bounds (C_t only
    ``with_c``; else an empty list)."""
    total = taus[0].clone()
    for t in taus[1:]:
        total += t
    cs, betas = [], []
    for x, lo, hi in zip(taus, st.lo, st.hi):
        a = x.abs().clamp_(min=lo).clamp_(max=hi)  # torch.clamp(x, lo, hi), lo > hi too
        if with_c:
            cs.append(torch.sign(x).mul_(a))
        intra = _minmax(a, min(lo, hi), hi).square_().mul_(len(taus)).exp_()
        betas.append(intra.mul_(torch.tanh(x.mul(total))))
    return cs, betas


def row_stats(
    rows: Rows, d: int, tasks: int, p: PcbParams, in_memory: bool | None = None
) -> RowStats:
    """The order statistics of every row: 2 selections (|X|, then β)."""
    ilo, ihi = clamp_indices(d, p.clip, p.clip)
    got = order_stats(
        lambda: ([x.abs() for x in r] for r in rows()),
        [[ilo, ihi]] * tasks,
        d,
        in_memory,
    )
    st = RowStats([g[0] for g in got], [g[1] for g in got])
    ithr = clamp_indices(d, 1 - p.ratio, 0)[0]
    got = order_stats(
        lambda: (clipped_scores(r, st, with_c=False)[1] for r in rows()),
        [[ithr, d - 1]] * tasks,
        d,
        in_memory,
    )
    st.thr, st.top = [g[0] for g in got], [g[1] for g in got]
    return st


@dataclass
class PcbCtx:
    p: PcbParams
    lams: list[float]
    exclude: frozenset[str]
    stats: RowStats | None = None  # global scope
    kept: list[int] = field(default_factory=list)

    def report(self) -> dict[str, list[int]]:
        return {"kept": self.kept}


def pcb_merge(
    taus: list[torch.Tensor],
    st: RowStats,
    lams: list[float],
    kept: list[int] | None = None,
) -> torch.Tensor:
    """τ_m = Σ_t λ_t C_t ⊙ scale_t / max(Σ_t scale_t, 1e-12) of one chunk."""
    cs, betas = clipped_scores(taus, st)
    num = torch.zeros_like(taus[0])
    den = torch.zeros_like(taus[0])
    for t, (c, beta) in enumerate(zip(cs, betas)):
        scale = _minmax(beta.clamp_(min=st.thr[t]), st.thr[t], st.top[t])
        if kept is not None:
            kept[t] += int(torch.count_nonzero(scale))
        num.add_(c.mul_(scale), alpha=lams[t])
        den += scale
    return num.div_(den.clamp_(min=1e-12))


def prepare(inputs: MergeInputs, p: PcbParams) -> PcbCtx:
    """Check names and λ; global scope: the rows' order statistics (streaming)."""
    plan, tasks = inputs.plan, inputs.tasks
    lams = per_task(p.lam, tasks, "lam") or [float(p.lam)] * tasks  # type: ignore
    ctx = PcbCtx(p, lams, check_keys(plan, p.exclude_keys), kept=[0] * tasks)
    if p.scope == "global":
        keys = [k for k in plan.delta_keys if k not in ctx.exclude and plan.numel[k]]
        d = sum(plan.numel[k] for k in keys)

        def rows() -> Iterable[list[torch.Tensor]]:
            # float64 rows in blocks of a read chunk: the passes' temporaries follow
            # the block, not the chunk
            for key in keys:
                for start, stop in plan.chunks(key):
                    chunk = plan.read_chunk(key, start, stop, inputs.device)
                    for lo in range(0, stop - start, PASS_BLOCK):
                        yield taus64(chunk.slice(lo, lo + PASS_BLOCK))

        if d:
            ctx.stats = row_stats(rows, d, tasks, p)
    return ctx


def pcb(ctx: PcbCtx, chunk: Chunk) -> torch.Tensor:
    """τ_m of one chunk (global stats) or of one whole tensor (per tensor)."""
    taus = taus64(chunk)
    if chunk.key in ctx.exclude:
        return torch.zeros_like(taus[0])
    st = ctx.stats
    if st is None:  # per tensor: this key's rows, sorted in memory
        st = row_stats(lambda: [taus], taus[0].numel(), len(taus), ctx.p, True)
    return pcb_merge(taus, st, ctx.lams, ctx.kept)


SPEC = MergeSpec(
    "pcb",
    PcbParams,
    kernel=pcb,
    prepare=prepare,
    whole_tensor=lambda p: p.scope != "global",
    paper="https://arxiv.org/abs/2410.02396",
    summary="PCB: intra/inter balancing scores, keep top ρ, score-weighted mean",
)
