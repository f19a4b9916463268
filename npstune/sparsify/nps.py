"""NPS subspaces: rank τ by |τ|, split the ranks into M equal parts, reweight, top-k.

Subspace m (1-based) holds ranks ⌊(m−1)·n/M⌋ … ⌊m·n/M⌋−1 (rank 0 = largest |τ|, ties to
the earlier position). The partition depends only on τ, so it is computed once per task
vector: it is M−1 exact top-K thresholds (:func:`npstune.sparsify.topk.select_many`),
and an entry's subspace is the number of those thresholds it falls below. Reweighting
multiplies the entries of subspace m by w_m; the mask keeps the top-k of the reweighted
magnitudes under the same exact rule; the pruned vector is mask ⊙ τ' (DESIGN §2, NPS
steps 1–3).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from npstune.errors import ConfigError
from npstune.sparsify.topk import Threshold, ThresholdCursor, select_streams_digits

DEFAULT_SUBSPACES = 8


def subspace_bounds(n: int, m_count: int) -> list[tuple[int, int]]:
    """Rank ranges ``[lo, hi)`` of the M subspaces of ``n`` entries (DESIGN §2)."""
    return [((m - 1) * n // m_count, m * n // m_count) for m in range(1, m_count + 1)]


@dataclass(frozen=True)
class Partition:
    """The rank partition of one task vector: ``bounds[j-1]`` keeps ranks < ⌊j·n/M⌋.

    ``digits``: the histogram of |τ|'s high 16 float32 bits (32 Ki counters) that the
    partition's first pass counted, when known; a
    :class:`~npstune.sparsify.sketch.Sketch` is made from it without another pass."""

    n: int
    subspaces: int
    bounds: tuple[Threshold, ...]
    digits: np.ndarray | None = field(default=None, compare=False, repr=False)

    def cursor(self) -> PartitionCursor:
        """A fresh cursor that labels consecutive chunks
        (position order) with subspaces."""
        return PartitionCursor(self)


class PartitionCursor:
    """Labels chunks of |τ| (in position order) with 0-based subspace indices
    (uint8)."""

    def __init__(self, partition: Partition) -> None:
        self.partition = partition
        self._cursors = [ThresholdCursor(t) for t in partition.bounds]

    @property
    def cursors(self) -> list[ThresholdCursor]:
        """One cursor per subspace boundary (to save and restore where they stand)."""
        return self._cursors

    def ids(self, scores: torch.Tensor) -> torch.Tensor:
        """Subspace index of every entry of ``scores`` (same shape, int32).

        s = #{j : entry not in the top ⌊j·n/M⌋}. A boundary whose tie quota is spent
        counts ``score <= v``, one that covers every equal score to come ``score < v``:
        both are ``score < u`` (u = v, or the next float32 above v), so one
        ``bucketize`` over the sorted u's labels the chunk in a single pass; only a
        boundary whose quota runs out inside this chunk needs its position-ordered tie
        scan.
        """
        flat = scores.reshape(-1)
        strict: list[float] = []
        scans = []
        for c in self._cursors:
            rule = c.rule
            if rule == "scan":
                scans.append(c)
            else:
                strict.append(
                    c.threshold.value if rule == ">=" else _next_up(c.threshold.value)
                )
        if strict:
            u = torch.tensor(sorted(strict), dtype=torch.float32, device=flat.device)
            # #{u > x} = len(u) - #{u <= x}
            s = torch.bucketize(flat, u, right=True, out_int32=True)
            s = s.neg_().add_(len(strict))
        else:
            s = torch.zeros(flat.shape, dtype=torch.int32, device=flat.device)
        for c in scans:
            v = c.threshold.value
            s += flat < v
            eq = flat == v
            if bool(eq.any()):
                s += eq & ~c.mask(
                    flat
                )  # equal to the boundary but past its quota: below it
        return s.reshape(scores.shape)


def partition(
    chunks: Callable[[], Iterable[torch.Tensor]],
    n: int,
    subspaces: int = DEFAULT_SUBSPACES,
) -> Partition:
    """Compute the rank partition of the scores ``chunks()`` yields (two passes)."""
    return partitions(lambda: ((c,) for c in chunks()), n, subspaces, 1)[0]


def partitions(
    chunks: Callable[[], Iterable[Sequence[torch.Tensor]]],
    n: int,
    subspaces: int,
    streams: int,
) -> list[Partition]:
    """The rank partitions of several score streams read together (``chunks()`` yields
    one tuple of chunks per step; two passes in all, one when M = 1, see
    :func:`~npstune.sparsify.topk.select_streams`)."""
    if not isinstance(subspaces, int) or subspaces < 1 or subspaces > 255:
        raise ConfigError(
            f"subspaces must be an integer in [1, 255], got {subspaces!r}"
        )
    ks = [j * n // subspaces for j in range(1, subspaces)]
    bounds, digits = select_streams_digits(chunks, [ks] * streams, n)
    return [Partition(n, subspaces, tuple(b), d) for b, d in zip(bounds, digits)]


def check_weights(weights: Sequence[float], subspaces: int) -> torch.Tensor:
    """Validate subspace weights (M non-negative finite values) as a float32 tensor."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    if w.numel() != subspaces:
        raise ConfigError(f"expected {subspaces} subspace weights, got {w.numel()}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ConfigError(
            f"subspace weights must be finite and >= 0, got {list(weights)}"
        )
    return w


def task_weight_rows(
    weights: Sequence[float] | None, tasks: int, subspaces: int
) -> list[list[float]]:
    """One row of M subspace weights per task from NPS ``--weights``: None (all 1), M
    values (shared by every task) or T·M values, task-major (row t is values
    ``t·M … t·M + M − 1``). ConfigError for any other count."""
    if weights is None:
        return [[1.0] * subspaces for _ in range(tasks)]
    w = [float(x) for x in weights]
    if len(w) == subspaces:
        return [list(w) for _ in range(tasks)]
    if len(w) == tasks * subspaces:
        return [w[t * subspaces : (t + 1) * subspaces] for t in range(tasks)]
    raise ConfigError(
        f"--weights: expected {subspaces} values (shared) or {tasks}·{subspaces} = "
        f"{tasks * subspaces} (one row per task, task-major), got {len(w)}"
    )


def reweight(
    tau: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """τ' = w[subspace] · τ, in τ's dtype (``ids``: int32 or int64 subspace labels)."""
    w = weights.to(device=tau.device, dtype=tau.dtype)
    return torch.index_select(w, 0, ids.reshape(-1)).reshape(tau.shape) * tau


def _next_up(v: float) -> float:
    """The next float32 above ``v`` (+inf stays +inf)."""
    t = torch.tensor(v, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(float("inf"))))
