"""Fisher merging: θ = Σ_t F_t ⊙ θ_t / Σ_t F_t with diagonal Fishers F_t (elementwise).

Paper: Matena & Raffel, Merging Models with Fisher-Weighted Averaging,
https://arxiv.org/abs/2111.09832. F_t is the diagonal empirical Fisher of model t on 256
calibration examples of its task (``npstune.merge.data``). Entries where every Fisher is
below ``floor`` fall back to the plain average. Written as θ_pre + Σ F_t τ_t / Σ F_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from npstune.merge.base import MergeInputs, MergeSpec, MethodParams
from npstune.merge.data import stats_for
from npstune.taskvector import Chunk


class FisherParams(MethodParams):
    """λ scales the merged task vector (1 = plain Fisher merging);
    floor guards zeros."""

    lam: float = Field(1.0, ge=0, le=10)
    floor: float = Field(1e-12, ge=0)


@dataclass
class FisherCtx:
    fishers: list  # per task: key -> Fisher tensor
    p: FisherParams


def prepare(inputs: MergeInputs, p: FisherParams) -> FisherCtx:
    """Compute (or take) one diagonal Fisher per model."""
    return FisherCtx(stats_for(inputs.data, "fisher", inputs.plan), p)


def fisher(ctx: FisherCtx, chunk: Chunk) -> torch.Tensor:
    """λ·Σ F_t τ_t / Σ F_t for one chunk (plain mean where all F_t are ~0)."""
    dt = chunk.taus[0].dtype
    fs = [
        f[chunk.key].reshape(-1)[chunk.start : chunk.stop].to(chunk.taus[0].device, dt)
        for f in ctx.fishers
    ]
    fs = [f.clamp_min(ctx.p.floor) for f in fs]
    num = sum(f * t for f, t in zip(fs, chunk.taus))
    den = sum(fs)
    return ctx.p.lam * num / den


SPEC = MergeSpec(
    "fisher",
    FisherParams,
    kernel=fisher,
    prepare=prepare,
    needs_data=True,
    paper="https://arxiv.org/abs/2111.09832",
    summary="Fisher-weighted average (256 examples)",
)
