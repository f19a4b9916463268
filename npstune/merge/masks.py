"""Keep masks as an output of the merge engine, per task and per block, streamed.

A pruning method's kernel returns, with each block's merged delta, one flat boolean keep
mask per task (:class:`KernelOut`, masks in the plan's model order). The engine hands
every block's masks to an optional sink, ``sink(task, key, start, mask)``, in position
order (keys sorted, then row-major) right after merging the block, and counts the kept
entries per task and key for :attr:`~npstune.merge.base.MergeResult.masks`. Nothing
holds a whole model's masks unless the consumer chooses to (:class:`MaskCollector`,
small models).

The mask a method reports for task t (``npstune methods`` names it too):

- magnitude, nps, dare, darex: τ_t's prune mask (its entries kept, before the sum);
- ties: τ_t's trim mask (top-k of |τ_t|, before the sign election);
- consensus-ta, consensus-ties: τ_t's TALL mask ``|τ_t| ≥ L·|τ_MTL − τ_t|``;
- emr: τ_t's mask M_t (entries whose sign agrees with the elected one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from npstune.taskvector import Chunk


class MaskSink(Protocol):
    """Receives one task's keep mask of one block (flat bool, on the merge's device):
    elements ``[start, start + mask.numel())`` of tensor ``key``, task ``task`` (its
    index in the plan's models)."""

    def __call__(self, task: int, key: str, start: int, mask: torch.Tensor) -> None: ...


@dataclass
class KernelOut:
    """A kernel's result for one block: the merged delta (compute dtype) and, for
    pruning methods, one flat boolean keep mask per task (plan order)."""

    delta: torch.Tensor
    masks: tuple[torch.Tensor, ...] = ()


class Block(NamedTuple):
    """One merged block of a delta tensor, as :func:`~npstune.merge.base.merged_blocks`
    yields it: its element range, its input chunk, θ_base + delta in the base's dtype,
    and the per-task keep masks (empty for methods that keep no mask)."""

    start: int
    stop: int
    chunk: Chunk
    merged: torch.Tensor
    masks: tuple[torch.Tensor, ...]


class MaskCounts:
    """A sink that counts kept entries per task and key (what ``MergeResult.masks``
    reports); keys appear in position order."""

    def __init__(self, tasks: int) -> None:
        self.kept: list[dict[str, int]] = [{} for _ in range(tasks)]

    def __call__(self, task: int, key: str, start: int, mask: torch.Tensor) -> None:
        per_key = self.kept[task]
        per_key[key] = per_key.get(key, 0) + int(torch.count_nonzero(mask))

    def totals(self) -> list[int]:
        """Kept entries per task, over every key."""
        return [sum(k.values()) for k in self.kept]

    def summary(self, names: Sequence[str]) -> dict[str, dict[str, int]]:
        """``{task name: {key: kept}}`` (``names`` in plan order, unique)."""
        return {name: dict(k) for name, k in zip(names, self.kept)}


class MaskCollector:
    """A sink that assembles every task's masks in memory, shaped like the tensors (for
    small models and tests; a large model's masks should be streamed instead).

    Args:
        shapes: key -> tensor shape (e.g. ``{k: plan.base.shape(k) for k in
            plan.delta_keys}``).
        names: task names in plan order (``plan.task_names``); :attr:`masks` is keyed
            by them.
    """

    def __init__(
        self, shapes: Mapping[str, tuple[int, ...]], names: Sequence[str]
    ) -> None:
        self.shapes = dict(shapes)
        self.names = list(names)
        self.masks: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.names}

    def __call__(self, task: int, key: str, start: int, mask: torch.Tensor) -> None:
        per_key = self.masks[self.names[task]]
        full = per_key.get(key)
        if full is None:
            full = per_key[key] = torch.zeros(self.shapes[key], dtype=torch.bool)
        full.view(-1)[start : start + mask.numel()] = mask.reshape(-1).cpu()


def tee(*sinks: MaskSink | None) -> MaskSink:
    """One sink that forwards every mask to each of ``sinks`` (None entries skipped)."""
    live = [s for s in sinks if s is not None]

    def forward(task: int, key: str, start: int, mask: torch.Tensor) -> None:
        for s in live:
            s(task, key, start, mask)

    return forward
