"""Task Arithmetic: θ = θ_pre + λ·Σ_t τ_t (elementwise; CLI default λ = 0.3).

Paper: Ilharco et al., Editing models with task arithmetic, https://arxiv.org/abs/2212.04089
"""

from __future__ import annotations

import torch
from pydantic import Field

from npstune.merge.base import MergeSpec, MethodParams
from npstune.taskvector import Chunk


class TaskArithmeticParams(MethodParams):
    """λ scales the summed task vectors."""

    lam: float = Field(0.3, ge=0, le=10)


def task_arithmetic(p: TaskArithmeticParams, chunk: Chunk) -> torch.Tensor:
    """λ·Σ_t τ_t for one chunk."""
    total = chunk.taus[0].clone()
    for tau in chunk.taus[1:]:
        total += tau
    return p.lam * total


SPEC = MergeSpec(
    "task-arithmetic",
    TaskArithmeticParams,
    kernel=task_arithmetic,
    paper="https://arxiv.org/abs/2212.04089",
    summary="θ_pre + λ·Σ τ_t",
)
