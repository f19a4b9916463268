"""Sparsifiers: pure mask functions over task-vector chunks (no I/O, no logging).

- :mod:`~npstune.sparsify.topk`: exact top-k (global via streaming radix select, or per
  tensor)
- :mod:`~npstune.sparsify.random`: seeded Bernoulli masks (DARE, DAREx)
- :mod:`~npstune.sparsify.nps`: NPS rank partition, reweighting
- :mod:`~npstune.sparsify.sketch`: an NPS candidate's threshold in one pass, from
  per-subspace histograms built once
"""

from npstune.sparsify.nps import (
    DEFAULT_SUBSPACES,
    Partition,
    PartitionCursor,
    check_weights,
    partition,
    partitions,
    reweight,
    subspace_bounds,
    task_weight_rows,
)
from npstune.sparsify.random import bernoulli_mask
from npstune.sparsify.topk import (
    Threshold,
    ThresholdCursor,
    check_ratio,
    keep_count,
    select,
    select_many,
    select_streams,
    topk_mask,
)

__all__ = [
    "DEFAULT_SUBSPACES",
    "Partition",
    "PartitionCursor",
    "Threshold",
    "ThresholdCursor",
    "bernoulli_mask",
    "check_ratio",
    "check_weights",
    "keep_count",
    "partition",
    "partitions",
    "reweight",
    "select",
    "select_many",
    "select_streams",
    "subspace_bounds",
    "task_weight_rows",
    "topk_mask",
]
