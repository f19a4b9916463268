"""Weight averaging: θ = mean_t θ_t = θ_pre + (1/T)·Σ_t τ_t (elementwise, any scope).

Paper: Wortsman et al., Model soups, https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

import torch

from npstune.merge.base import MergeSpec, MethodParams
from npstune.taskvector import Chunk


class AverageParams(MethodParams):
    """Averaging has no parameters."""


def average(p: AverageParams, chunk: Chunk) -> torch.Tensor:
    """Mean of the task vectors of one chunk."""
    return torch.stack(list(chunk.taus)).mean(0)


SPEC = MergeSpec(
    "average",
    AverageParams,
    kernel=average,
    paper="https://arxiv.org/abs/2203.05482",
    summary="mean of the fine-tuned weights",
)
