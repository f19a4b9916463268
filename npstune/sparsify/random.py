"""Random (DARE-family) masks: keep each entry with probability k, seeded per tensor chunk.

The generator for a chunk is seeded from (seed, task index, key, chunk start), so a merge is
reproducible whatever order tensors are processed in, and on any device (the draws are made
on the CPU).
"""

from __future__ import annotations

import zlib

import torch

from npstune.sparsify.topk import check_ratio


def chunk_seed(seed: int, task: int, key: str, start: int) -> int:
    """A stable 63-bit seed for one chunk of one task's tensor."""
    h = zlib.crc32(f"{seed}\x00{task}\x00{key}\x00{start}".encode())
    return (int(seed) * 1_000_003 + h) & ((1 << 63) - 1)


def bernoulli_mask(
    numel: int, k: float, *, seed: int, task: int, key: str, start: int = 0
) -> torch.Tensor:
    """Flat boolean mask where each entry is kept with probability ``k``."""
    check_ratio(k)
    g = torch.Generator(device="cpu")
    g.manual_seed(chunk_seed(seed, task, key, start))
    return torch.rand(numel, generator=g, dtype=torch.float32) < float(k)
