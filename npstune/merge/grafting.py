"""Model Grafting: masks γ_t learnt on each task's loss, θ = θ_pre + λ·Σ_t γ_t ⊙ τ_t.

Paper: Panigrahi et al., Task-Specific Skill Localization in Fine-tuned Language Models,
https://arxiv.org/abs/2302.06600 (code: Skill-Localization-by-grafting). Per task t,
relax γ = σ(s) with real scores s, initialised from the exact top-k of |τ_t| (s = +b
inside, −b outside); then ``steps`` plain gradient steps on L_t(θ_pre + λ·σ(s) ⊙ τ_t):
s ← s − lr·λ·ḡ ⊙ τ_t ⊙ σ(s)(1 − σ(s)), ḡ = mean ∂L_t/∂θ over ``examples`` calibration
examples at the current relaxed θ (the reference's update: its γ_base + (1 − 2γ_base)·
σ(p − b) is σ(s) with s = ±(b − p); p starts at 0 here, not at random). The final γ_t
keeps exactly the top-k of s (⌈k·n⌉, ties to the earlier position, DESIGN §2); scope
global over τ_t's tensors (default) or per tensor. Holds s for one task at a time and
a boolean mask per task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from pydantic import Field

from npstune.errors import ConfigError
from npstune.merge.base import MergeInputs, MergeSpec, MethodParams, Scope
from npstune.merge.data import GradientFn, gradient_fns
from npstune.merge.pruning import PruneAdd, Pruner, Values, prune_add_kernel
from npstune.sparsify import Threshold, keep_count, select, topk_mask
from npstune.taskvector import Chunk, MergePlan, TaskVector


class GraftingParams(MethodParams):
    """Keep ratio k, scaling λ, the mask's optimisation (steps, lr, init bias b,
    calibration examples per gradient) and the top-k scope."""

    k: float = Field(0.1, gt=0, le=1)
    lam: float = Field(1.0, ge=0, le=10)
    steps: int = Field(10, ge=0, le=10_000)
    #: large: ∂L/∂s carries the factors τ and σ'(s), both small
    lr: float = Field(1e7, ge=0, le=1e12)
    bias: float = Field(3.0, gt=0, le=50)
    examples: int = Field(64, ge=1, le=1_000_000)
    scope: Scope = "global"


@dataclass
class MaskPruner(Pruner):
    """Keeps the entries of a mask found beforehand (flat, per key)."""

    masks: Mapping[str, torch.Tensor] | None = None

    def keep(self, chunk: Chunk) -> tuple[torch.Tensor, Values]:
        assert self.masks is not None
        m = self.masks[chunk.key][chunk.start : chunk.stop]
        return m.to(chunk.taus[self.task].device), lambda t: t


class RelaxedState(Mapping[str, torch.Tensor]):
    """θ_pre + λ·σ(s) ⊙ τ on the keys of ``s``, θ_pre elsewhere; each tensor made
    when asked for (in the base's dtype), so a state costs one tensor at a time."""

    def __init__(
        self,
        plan: MergePlan,
        tv: TaskVector,
        scores: Mapping[str, torch.Tensor],
        lam: float,
    ) -> None:
        self.plan, self.tv, self.scores, self.lam = plan, tv, scores, lam

    def __getitem__(self, key: str) -> torch.Tensor:
        b = self.plan.base[key]
        s = self.scores.get(key)
        if s is None:
            return b
        theta = b.float().reshape(-1) + self.lam * torch.sigmoid(s) * self.tv.delta(key)
        return theta.reshape(b.shape).to(b.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.plan.keys)

    def __len__(self) -> int:
        return len(self.plan.keys)


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of the float32 values ``x`` (-0.0 as +0.0)."""
    b = (x.float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(b >= 0, b + (1 << 31), (1 << 31) - 1 - (b & 0x7FFFFFFF))


def signed_threshold(chunks: Callable[[], Iterable[torch.Tensor]], K: int) -> Threshold:
    """Exact threshold keeping the top ``K`` of float32 scores of any sign (the
    streaming select takes non-negative ones): a bisection over the values' order keys,
    one count pass over ``chunks()`` per bit (32)."""
    lo, hi = 0, (1 << 32) - 1  # the K-th largest key lies in [lo, hi]
    if K == 0:
        return Threshold(float("inf"), 0, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ge = sum(int((_order_keys(c) >= mid).sum()) for c in chunks())
        lo, hi = (mid, hi) if ge >= K else (lo, mid - 1)
    gt = eq = 0
    for c in chunks():
        keys = _order_keys(c)
        gt += int((keys > lo).sum())
        eq += int((keys == lo).sum())
    # the inverse of _order_keys: non-negative bits, or the magnitude's bits with the
    # sign bit set (as a signed int32)
    bits = lo - (1 << 31) if lo >= (1 << 31) else ((1 << 31) - 1 - lo) - (1 << 31)
    value = float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])
    return Threshold(value, K - gt, K, eq)


def graft_mask(
    plan: MergePlan, task: int, grad: GradientFn, p: GraftingParams
) -> dict[str, torch.Tensor]:
    """Task ``task``'s final mask, flat per delta key (see module docstring)."""
    keys = plan.delta_keys
    tv = plan.task_vectors()[task]
    init = _topk(lambda key: tv.delta(key).abs(), plan, p.k, p.scope, signed=False)
    s = {
        key: torch.where(m, p.bias, -p.bias).to(torch.float32)
        for key, m in init.items()
    }
    del init
    for _ in range(p.steps):
        g = grad(RelaxedState(plan, tv, s, p.lam))
        for key in keys:
            if key not in g:  # no gradient (a parameter the loss does not use)
                continue
            sig = torch.sigmoid(s[key])
            gk = g[key].reshape(-1).to(torch.float32)
            if not bool(torch.isfinite(gk).all()):
                raise ConfigError(
                    f"{plan.models[task].name}:{key}: the loss gradient is not finite "
                    "(lower lr or check the calibration data)"
                )
            s[key] -= (p.lr * p.lam) * gk * tv.delta(key) * sig * (1 - sig)
    return _topk(s.__getitem__, plan, p.k, p.scope, signed=True)


def _topk(
    scores: Callable[[str], torch.Tensor],
    plan: MergePlan,
    k: float,
    scope: str,
    signed: bool,
) -> dict[str, torch.Tensor]:
    """Exact top-k masks of ``scores(key)`` over the delta keys (DESIGN §2), globally or
    per tensor; ``signed``: scores of any sign (else non-negative)."""
    keys = plan.delta_keys
    if scope == "tensor" and not signed:
        return {key: topk_mask(scores(key), k) for key in keys}
    groups = [keys] if scope == "global" else [[key] for key in keys]
    out = {}
    for group in groups:
        n = sum(plan.numel[key] for key in group)
        K = keep_count(k, n)

        def chunks(group: list[str] = group) -> Iterator[torch.Tensor]:
            return (scores(key) for key in group)

        th = signed_threshold(chunks, K) if signed else select(chunks, K, n)
        cur = th.cursor()
        out.update({key: cur.mask(scores(key)) for key in group})
    return out


def prepare(inputs: MergeInputs, p: GraftingParams) -> PruneAdd:
    """Learn every task's mask on its own task (one after the other)."""
    grads = gradient_fns(inputs.data, inputs.plan, p.examples)
    pruners = [
        MaskPruner(task=t, masks=graft_mask(inputs.plan, t, g, p))
        for t, g in enumerate(grads)
    ]
    return PruneAdd(pruners, p.lam)


SPEC = MergeSpec(
    "grafting",
    GraftingParams,
    kernel=prune_add_kernel,
    prepare=prepare,
    needs_data=True,
    paper="https://arxiv.org/abs/2302.06600",
    summary="mask on τ_t learnt on task t's loss (top-k of sigmoid scores), "
    "θ_pre + λ·Σ",
)
