"""Tiny seeded checkpoints for the fast tests (no downloads, no zoo)."""

from __future__ import annotations

from pathlib import Path

import torch

from npstune.checkpoints import write_sharded, write_state_dict

SHAPES = {
    "encoder.0.weight": (6, 5),
    "encoder.0.bias": (6,),
    "encoder.1.weight": (3, 6),
    "norm.weight": (3,),
    "position_ids": (1, 4),  # integer buffer: copied from the base
}


def tiny_state(
    seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A base state dict with float tensors of several shapes and one integer buffer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in SHAPES.items():
        if k == "position_ids":
            out[k] = torch.arange(4, dtype=torch.int64).reshape(shape)
        else:
            out[k] = torch.randn(shape, generator=g).to(dtype)
    return out


def finetune(
    base: dict[str, torch.Tensor], seed: int, scale: float = 0.1
) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' copy: heavy-tailed noise on every float tensor."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for k, v in base.items():
        if v.is_floating_point():
            noise = torch.randn(v.shape, generator=g) * scale
            noise = noise * torch.randn(v.shape, generator=g).abs()  # heavier tails
            out[k] = (v.float() + noise).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def write(state: dict[str, torch.Tensor], path: Path, form: str) -> Path:
    """Write ``state`` as a safetensors file, sharded dir, or torch file."""
    if form == "safetensors":
        return write_state_dict(path.with_suffix(".safetensors"), state)
    if form == "sharded":
        return write_sharded(path, state, max_shard_bytes=80)
    if form == "torch":
        return write_state_dict(path.with_suffix(".pt"), state)
    raise ValueError(form)


def make_set(
    tmp: Path,
    form: str = "safetensors",
    dtype: torch.dtype = torch.float32,
    tasks: int = 3,
):
    """Write a base and ``tasks`` fine-tuned models; return (base path,
    model paths, states)."""
    base = tiny_state(0, dtype)
    fts = [finetune(base, t) for t in range(tasks)]
    bp = write(base, tmp / "base", form)
    mps = [write(ft, tmp / f"task{t}", form) for t, ft in enumerate(fts)]
    return bp, mps, base, fts
