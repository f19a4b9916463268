"""Random (DARE-family) masks: keep each entry with probability k, on a fixed block
grid.

A tensor's entries are split into fixed blocks of :data:`DRAW_BLOCK` elements from its
first element (row-major); block b's draws come from a generator seeded by (seed, task
identity, key, b). The task identity is the task's name (its model file's stem), not its
position among the models. So a task's mask is its own (two tasks never share one), the
same whether it is merged alone or with others, in any tensor order, for any read chunk
or kernel block size, and on any device (the draws are made on the CPU).
"""

from __future__ import annotations

import hashlib

import torch

from npstune.sparsify.topk import check_ratio

#: Elements per random-draw block (divides the engine's read chunks and kernel blocks,
#: so no block is drawn twice in a merge).
DRAW_BLOCK = 1 << 16


def block_seed(seed: int, task: str, key: str, block: int) -> int:
    """A stable 63-bit seed for block ``block`` of tensor ``key`` of task ``task``."""
    msg = f"{int(seed)}\x00{task}\x00{key}\x00{int(block)}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") >> 1


def bernoulli_mask(
    numel: int, k: float, *, seed: int, task: str | int, key: str, start: int = 0
) -> torch.Tensor:
    """Flat boolean mask of elements ``[start, start + numel)`` of ``key``, each kept
    with probability ``k``: the same entries whatever range of the tensor is asked
    for."""
    check_ratio(k)
    if numel <= 0:
        return torch.zeros(0, dtype=torch.bool)
    out = torch.empty(numel, dtype=torch.bool)
    buf = torch.empty(DRAW_BLOCK, dtype=torch.float32)
    g = torch.Generator(device="cpu")
    stop = start + numel
    for b in range(start // DRAW_BLOCK, (stop - 1) // DRAW_BLOCK + 1):
        g.manual_seed(block_seed(seed, str(task), key, b))
        torch.rand(DRAW_BLOCK, generator=g, dtype=torch.float32, out=buf)
        lo, hi = max(start, b * DRAW_BLOCK), min(stop, (b + 1) * DRAW_BLOCK)
        off = b * DRAW_BLOCK
        torch.lt(buf[lo - off : hi - off], float(k), out=out[lo - start : hi - start])
    return out
