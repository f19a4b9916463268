"""Merge methods behind one registry (see :mod:`npstune.merge.registry`)."""

from npstune.merge.base import MergeInputs, MergeResult, MergeSpec, MethodParams, run_merge
from npstune.merge.masks import KernelOut, MaskCollector, MaskCounts, MaskSink
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
    "get_method",
    "merge",
    "method_names",
    "run_merge",
]


def merge(base, models, method, params=None, out=None, *, include=None, exclude=None,
          device="cpu", data=None, progress=False, masks=None):
    """Plan and run one merge: ``merge(base, [m1, m2], "ties", {"k": 0.2})``.

    ``base``/``models`` are paths or :class:`~npstune.checkpoints.LazyCheckpoint`; the
    result is written to ``out`` in the base's form, or returned in memory if ``out`` is None.
    ``masks`` receives every task's keep mask block by block (see
    :mod:`npstune.merge.masks`).
    """
    from npstune.taskvector import plan_merge

    plan = plan_merge(base, models, include, exclude)
    return run_merge(plan, get_method(method), params, out, device=device, data=data,
                     progress=progress, masks=masks)
