"""TALL masks and Consensus merging.

Paper: Wang et al., Localizing Task Information for Improved Model Merging and
Compression, https://arxiv.org/abs/2405.07813. With the multi-task vector τ_MTL (Σ_t τ_t
for Consensus TA, the TIES vector for Consensus TIES), task t's TALL mask is
``|τ_t| ≥ L·|τ_MTL − τ_t|`` (elementwise). Consensus keeps the entries of τ_MTL where at
least C masks are on (C = 2) and returns θ_pre + λ·kept. CLI defaults: L = 0.4;
consensus-ta λ = 0.3; consensus-ties k = 0.2, λ = 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from npstune.merge.base import MergeInputs, MergeSpec, MethodParams, Scope
from npstune.merge.masks import KernelOut
from npstune.merge.ties import TiesCtx, disjoint_mean, trimmed
from npstune.merge.ties import prepare as prepare_ties
from npstune.taskvector import Chunk


class ConsensusTaParams(MethodParams):
    """λ for the kept multi-task vector, TALL L, consensus count C."""

    lam: float = Field(0.3, ge=0, le=10)
    tall_lam: float = Field(0.4, ge=0, le=10)
    consensus: int = Field(2, ge=0)


class ConsensusTiesParams(ConsensusTaParams):
    """As Consensus TA with TIES's trim ratio and scope; λ defaults to 1."""

    lam: float = Field(1.0, ge=0, le=10)
    k: float = Field(0.2, gt=0, le=1)
    scope: Scope = "global"


def tall_masks(
    taus: Sequence[torch.Tensor], mtl: torch.Tensor, lams: Sequence[float]
) -> list[torch.Tensor]:
    """TALL mask per task (bool, τ's shape): |τ_t| ≥ λ_t·|τ_MTL − τ_t|."""
    return [tau.abs() >= lam * (mtl - tau).abs() for tau, lam in zip(taus, lams)]


def consensus_keep(masks: Sequence[torch.Tensor], at_least: int) -> torch.Tensor:
    """Entries (bool) where at least ``at_least`` of the boolean ``masks`` are on."""
    count = torch.stack([m.to(torch.int16) for m in masks]).sum(0)
    return count >= at_least


@dataclass
class ConsensusCtx:
    """The params (TA's or TIES's), the TIES context of Consensus TIES (None: TA), and
    the count of consensus entries kept so far."""

    p: ConsensusTaParams | ConsensusTiesParams
    ties: TiesCtx | None = None
    kept: int = 0

    def report(self) -> dict[str, list[int]]:
        """``{"kept": [consensus entries kept]}`` (one figure: the merged vector's)."""
        return {"kept": [self.kept]}


def _kernel(ctx: ConsensusCtx, chunk: Chunk) -> KernelOut:
    """λ·(τ_MTL where at least C TALL masks are on) for one chunk, with each task's
    TALL mask."""
    taus = chunk.taus
    if ctx.ties is None:
        mtl = torch.stack(list(taus)).sum(0)
    else:
        mtl = disjoint_mean(trimmed(ctx.ties, chunk)[0], ctx.ties.majority)
    masks = tall_masks(taus, mtl, [ctx.p.tall_lam] * len(taus))
    keep = consensus_keep(masks, ctx.p.consensus)
    ctx.kept += int(torch.count_nonzero(keep))
    return KernelOut(
        ctx.p.lam * torch.where(keep, mtl, torch.zeros((), dtype=mtl.dtype)),
        tuple(masks),
    )


def _prepare_ta(inputs: MergeInputs, p: ConsensusTaParams) -> ConsensusCtx:
    """No global pass: τ_MTL = Σ_t τ_t is computed chunk by chunk."""
    return ConsensusCtx(p)


def _prepare_ties(inputs: MergeInputs, p: ConsensusTiesParams) -> ConsensusCtx:
    """TIES's passes (trim thresholds, majority sign) for τ_MTL = the TIES vector."""
    from npstune.merge.ties import TiesParams

    return ConsensusCtx(
        p, prepare_ties(inputs, TiesParams(k=p.k, lam=1.0, scope=p.scope))
    )


TA_SPEC = MergeSpec(
    "consensus-ta",
    ConsensusTaParams,
    kernel=_kernel,
    prepare=_prepare_ta,
    paper="https://arxiv.org/abs/2405.07813",
    summary="TALL-mask consensus over Σ τ_t",
)
TIES_SPEC = MergeSpec(
    "consensus-ties",
    ConsensusTiesParams,
    kernel=_kernel,
    prepare=_prepare_ties,
    whole_tensor=lambda p: p.scope == "tensor",
    paper="https://arxiv.org/abs/2405.07813",
    summary="TALL-mask consensus over the TIES vector",
)
