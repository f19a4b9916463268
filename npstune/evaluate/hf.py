"""Hugging Face model helpers shared by the evaluator kinds:
skeletons and state loading."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from npstune.errors import CheckpointError, ShapeMismatchError
from npstune.evaluate.kinds import check_precision

logger = logging.getLogger(__name__)


def read_state(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint (any form npstune reads), keyed as stored."""
    from npstune.checkpoints import open_checkpoint

    ck = open_checkpoint(path)
    try:
        return {k: ck[k] for k in ck.keys()}
    finally:
        ck.close()


def is_target(src: Tensor, dst: Tensor) -> bool:
    """Whether ``src`` already is ``dst``'s memory (a candidate written in place into
    the module by :meth:`targets`): same storage, offset, shape, strides, dtype and
    device, so copying would change nothing."""
    return (
        src.data_ptr() == dst.data_ptr()
        and src.dtype == dst.dtype
        and src.device == dst.device
        and src.shape == dst.shape
        and src.stride() == dst.stride()
    )


def copy_into(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)`` across device and dtype, skipped when ``src`` is ``dst``'s
    own memory (:func:`is_target`). Callers hold ``torch.no_grad()``."""
    if not is_target(src, dst):
        dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


def module_targets(module: nn.Module) -> dict[str, Tensor]:
    """The module's own tensors by state key (detached views of its parameters and
    persistent buffers): what a writer fills in place instead of building a state."""
    return {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()}


def load_into_module(
    module: nn.Module, state: Mapping[str, Tensor], source: str = "state"
) -> None:
    """Copy ``state`` into ``module`` in place, checked by key and shape.

    Keys the module does not have are an error; keys the module has but ``state``
    lacks are allowed only when they share storage with a key it does give (tied
    weights, e.g. ``lm_head.weight`` tied to the embeddings) or are non-persistent.
    """
    own = module.state_dict(keep_vars=True)
    extra = [k for k in state if k not in own and not k.endswith("position_ids")]
    if extra:
        raise CheckpointError(
            f"{source}: key {extra[0]!r} is not in the model "
            f"({len(extra)} unexpected keys)"
        )
    given_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [
        k for k, v in own.items() if k not in state and v.data_ptr() not in given_ptrs
    ]
    if missing:
        raise CheckpointError(
            f"{source}: key {missing[0]!r} is missing ({len(missing)} missing keys)"
        )
    with torch.no_grad():
        for k, v in state.items():
            if k not in own:
                continue
            dst = own[k]
            if tuple(v.shape) != tuple(dst.shape):
                raise ShapeMismatchError(
                    f"{source}:{k}: shape {tuple(v.shape)} != model {tuple(dst.shape)}"
                )
            copy_into(dst, v)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16, as oneDNN
    sees it): bf16 autocast is then faster than fp32, not an emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> Any:
    """The autocast dtype of a forward pass on ``device`` (None: plain fp32).

    ``auto``: bf16 on CUDA and on CPUs with native bf16 (:func:`cpu_has_bf16`), fp32 on
    other CPUs; ``fp32``: None; ``bf16``: bf16 anywhere (a CPU without native bf16
    emulates it: slower, warned once).

    Why ``auto`` takes bf16 on such CPUs: on the zoos' recorded searches
    (``benchmarks/results/search_cost*.md``) every candidate's bf16 calibration score
    stayed within 0.0052 of its fp32 one (2 examples of 384; 3 of 800 on the full zoo),
    and bf16's best is a best in fp32 too (regret 0; on the full zoo it picked the
    other of two candidates tied in fp32), at 2.2-2.6x the evaluations per hour.
    """
    check_precision(precision)
    if precision == "fp32":
        return None
    if precision == "auto" and device.type != "cuda":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    if device.type == "cpu" and not cpu_has_bf16():
        _warn_emulated()
    return torch.bfloat16


@functools.cache
def _warn_emulated() -> None:
    logger.warning(
        "precision bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): emulated, "
        "likely slower than fp32"
    )


def autocast(device: torch.device, precision: str = "auto") -> Any:
    """The autocast context of :func:`autocast_dtype` (a no-op context for fp32).

    Enter it around a whole split, not per batch: the weights' bf16 casts are then made
    once per candidate, not once per batch."""
    dt = autocast_dtype(device, precision)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dt)


def fp32_region(device: torch.device) -> Any:
    """A context where autocast is off: what follows a bf16 forward pass in fp32
    (heads, zero-shot logits, log-softmax)."""
    return torch.autocast(device.type, enabled=False)


def stats_precision(device: torch.device, precision: str) -> str:
    """The precision of a statistics pass (Fisher, Gram matrices of the data-driven
    merges): ``auto`` keeps fp32 on CPUs (bf16's tolerance was measured for scoring,
    not for statistics); otherwise ``precision``."""
    return "fp32" if precision == "auto" and device.type != "cuda" else precision
