"""Merge methods behind one registry (see :mod:`npstune.merge.registry`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from npstune.checkpoints import LazyCheckpoint
from npstune.merge.base import (
    MergeInputs,
    MergeResult,
    MergeSpec,
    MethodParams,
    run_merge,
)
from npstune.merge.masks import KernelOut, MaskCollector, MaskCounts, MaskSink
from npstune.merge.preprune import Prune, as_prune, prune_names
from npstune.merge.registry import get_method, method_names

__all__ = [
    "KernelOut",
    "MaskCollector",
    "MaskCounts",
    "MaskSink",
    "MergeInputs",
    "MergeResult",
    "MergeSpec",
    "MethodParams",
    "Prune",
    "get_method",
    "merge",
    "method_names",
    "prune_names",
    "run_merge",
]


def merge(
    base: str | os.PathLike[str] | LazyCheckpoint,
    models: Sequence[str | os.PathLike[str] | LazyCheckpoint],
    method: str,
    params: Mapping[str, Any] | MethodParams | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    data: Any = None,
    progress: bool = False,
    masks: MaskSink | None = None,
    prune: Prune | tuple[str, Mapping[str, Any]] | str | None = None,
) -> MergeResult:
    """Plan and run one merge: ``merge(base, [m1, m2], "ties", {"k": 0.2})``.

    Args:
        base: θ_pre, a path (any checkpoint form) or a
            :class:`~npstune.checkpoints.LazyCheckpoint`.
        models: the fine-tuned checkpoints θ_t (paths, LoRA adapter directories or
            checkpoints), at least one.
        method: a registered method name (:func:`method_names`).
        params: the method's parameters (validated; ConfigError on bad input).
        out: where to write the result (the form its name names, else the base's);
            None returns the merged state in memory (``MergeResult.state``).
        include, exclude: glob patterns of keys that take part / are copied from the
            base.
        device: where the arithmetic runs.
        data: calibration data for data-driven methods (Fisher, RegMean).
        progress: show a progress bar over tensors.
        masks: receives every task's keep mask block by block (see
            :mod:`npstune.merge.masks`).
        prune: prune every task vector first, then merge the pruned ones: a
            :class:`~npstune.merge.preprune.Prune`, a name (``"nps"``, ``"magnitude"``,
            ``"dare"``) or ``(name, params)``, e.g. ``("nps", {"k": 0.1})``.
    """
    from npstune.taskvector import plan_merge

    paths = [m if isinstance(m, LazyCheckpoint) else str(m) for m in models]
    plan = plan_merge(
        base if isinstance(base, LazyCheckpoint) else str(base), paths, include, exclude
    )
    return run_merge(
        plan,
        get_method(method),
        dict(params) if isinstance(params, Mapping) else params,
        out,
        device=device,
        data=data,
        progress=progress,
        masks=masks,
        prune=as_prune(prune),
    )
