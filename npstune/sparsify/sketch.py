"""An NPS candidate's exact top-k threshold in one streaming pass (DESIGN §2, "Better
still", in bounded memory).

A search asks for the top-k threshold of the reweighted magnitudes ``fl(w_m·|τ|)`` for
hundreds of weight vectors w over the same τ. The rank partition depends on τ alone, and
so does a :class:`Sketch`: per subspace m, a histogram of |τ| over the high 16 bits of
its float32 bit pattern (32 Ki counters; non-negative float32 patterns sort like the
numbers). It costs no pass of its own: a bin is a contiguous range of ranks (every
entry of a higher bin is larger) and so is a subspace, so ``hist[m, d]`` is the overlap
of bin d's ranks with subspace m's, from the histogram of all |τ| that the partition's
first pass counted (:attr:`Partition.digits`).

For a given w, every reweighted value in bin d of subspace m lies in
``[fl(w_m·lo_d), fl(w_m·hi_d)]`` (lo_d, hi_d: the bin's smallest and largest float32;
a float32 product by w_m ≥ 0 is monotone in |τ|). So for any t the histogram bounds
``count(r ≥ t)`` from below (bins whose lowest product is ≥ t) and from above (bins
whose highest product is ≥ t). Two binary searches over float32 bit patterns give the
bracket ``[t_lo, t_hi]``: ``t_lo`` the largest t whose lower bound reaches K, ``t_hi``
the largest whose upper bound does. The K-th largest value lies in the bracket, and
fewer than K values lie above it. One pass over τ then counts the values above ``t_hi``
and counts every float32 pattern inside the bracket (one counter per pattern), which
pins down the exact threshold and its tie quota: the same :class:`Threshold` as
:func:`~npstune.sparsify.topk.select_streams` finds in two passes, bit for bit.

Memory: M·32 Ki counters per task vector, plus at most ``BRACKET`` counters per stream
during the pass, whatever n is. A bracket wider than ``BRACKET`` patterns (possible
when a weight is tiny or huge next to the others) falls back to the two-pass select.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from npstune.errors import ConfigError
from npstune.sparsify.nps import Partition, subspace_bounds
from npstune.sparsify.topk import Threshold, select_streams

_BINS = 1 << 15  # high 16 bits of a non-negative float32 (sign bit clear)
_INF_BITS = 0x7F800000
#: float32 patterns a pass may count per stream (32 MiB of int64); wider: two passes
BRACKET = 1 << 22

Steps = Callable[[], Iterable[Sequence[torch.Tensor]]]


def _f32(bits: np.ndarray | int) -> np.ndarray:
    return np.asarray(bits, dtype=np.int32).view(np.float32)


#: each bin's smallest and largest float32 (bins at and above +inf's pattern hold no
#: finite value: +inf, so that no count is ever placed there)
_LO_EDGE = _f32(np.arange(_BINS, dtype=np.int64) << 16).copy()
_HI_EDGE = _f32((np.arange(_BINS, dtype=np.int64) << 16) | 0xFFFF).copy()
_LO_EDGE[_INF_BITS >> 16 :] = np.inf
_HI_EDGE[_INF_BITS >> 16 :] = np.inf


def _bits(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1)
    return (x if x.dtype == torch.float32 else x.float()).view(torch.int32)


@dataclass(frozen=True)
class Sketch:
    """One task vector's partition plus, per subspace, the histogram of |τ|'s high
    float32 digits (``hist[m, d]``: entries of subspace m whose pattern >> 16 is d)."""

    partition: Partition
    hist: np.ndarray  # (M, 32 Ki) int64
    #: the fine histogram's suffix counts and the boundaries' tie ends
    #: (:func:`~npstune.sparsify.onepass.fine_pass`), for the one-pass build; None
    #: until a pass counts them
    fine: np.ndarray | None = field(default=None, compare=False, repr=False)
    ends: tuple[int, ...] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, part: Partition) -> Sketch:
        """The sketch of a partition that knows its digits (no pass over τ)."""
        if part.digits is None or int(part.digits.sum()) != part.n:
            raise ConfigError("this partition does not know its |τ| digit histogram")
        H = part.digits.astype(np.int64)
        # ranks (0 = largest) of bin d: [start[d], start[d] + H[d]), higher bins first
        start = np.cumsum(H[::-1])[::-1] - H
        bounds = np.asarray(subspace_bounds(part.n, part.subspaces), dtype=np.int64)
        lo = np.maximum(start[None, :], bounds[:, :1])
        hi = np.minimum((start + H)[None, :], bounds[:, 1:])
        return cls(part, np.maximum(hi - lo, 0))

    @property
    def n(self) -> int:
        return self.partition.n

    def bracket(self, weights: torch.Tensor, K: int) -> tuple[int, int]:
        """Bit patterns ``(lo, hi)`` of a bracket holding the K-th largest reweighted
        magnitude, with fewer than K values above ``hi`` (1 ≤ K ≤ n)."""
        w = weights.detach().cpu().to(torch.float32).numpy()[:, None]
        with np.errstate(over="ignore", invalid="ignore"):
            rlo, rhi = w * _LO_EDGE[None, :], w * _HI_EDGE[None, :]
        # w = 0 gives 0·inf = nan on the empty top bins: they hold nothing, keep order
        rlo, rhi = np.nan_to_num(rlo, nan=np.inf), np.nan_to_num(rhi, nan=np.inf)
        # suffix[m, d] = entries of subspace m in bins d.. (one extra 0 at the end)
        suffix = np.zeros((self.hist.shape[0], _BINS + 1), dtype=np.int64)
        suffix[:, :-1] = np.cumsum(self.hist[:, ::-1], axis=1)[:, ::-1]
        rows = np.arange(self.hist.shape[0])

        def at_least(edges: np.ndarray, t: np.float32) -> int:
            # per subspace, bins d with edges[m, d] >= t (edges non-decreasing in d)
            idx = [int(np.searchsorted(e, t, side="left")) for e in edges]
            return int(suffix[rows, idx].sum())

        return _largest(lambda t: at_least(rlo, t) >= K), _largest(
            lambda t: at_least(rhi, t) >= K
        )


def _largest(holds: Callable[[np.float32], bool]) -> int:
    """The largest non-negative float32 pattern t with ``holds(t)`` (true at 0,
    monotone: true up to some t, false above)."""
    lo, hi = 0, _INF_BITS
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if holds(np.float32(_f32(mid))):
            lo = mid
        else:
            hi = mid - 1
    return lo


def sketch_thresholds(
    reweighted: Steps,
    sks: Sequence[Sketch],
    weights: Sequence[torch.Tensor],
    K: int,
) -> list[Threshold]:
    """Exact thresholds keeping the top ``K`` of each stream's reweighted magnitudes
    (``reweighted()`` yields one tuple of float32 chunks per step, stream i reweighted
    by ``weights[i]``). One pass; two when a bracket is too wide (see module doc)."""
    n = sks[0].n if sks else 0
    if any(s.n != n for s in sks):
        raise ConfigError("sketches of one joint pass must have the same length")
    if K < 0 or K > n:
        raise ConfigError(f"cannot keep {K} of {n} entries")
    if K == 0 or not sks:
        return [Threshold(math.inf, 0, 0) for _ in sks]
    brackets = [sk.bracket(w, K) for sk, w in zip(sks, weights)]
    if any(hi - lo + 1 > BRACKET for lo, hi in brackets):
        return [ts[0] for ts in select_streams(reweighted, [[K]] * len(sks), n)]
    above = [0] * len(sks)
    counts = [torch.zeros(hi - lo + 1, dtype=torch.int64) for lo, hi in brackets]
    seen = [0] * len(sks)
    for step in reweighted():
        for i, r in enumerate(step):
            b = _bits(r)
            seen[i] += b.numel()
            lo, hi = brackets[i]
            above[i] += int((b > hi).sum())
            inside = b[(b >= lo) & (b <= hi)]
            if inside.numel():
                c = torch.bincount((inside - lo).to(torch.int64)).cpu()
                counts[i][: c.numel()] += c
    out = []
    for i, (lo, _) in enumerate(brackets):
        if seen[i] != n:
            raise ConfigError(f"expected {n} scores, saw {seen[i]}")
        need = K - above[i]  # values to take from the bracket, from its top
        top = counts[i].flip(0).cumsum(0)
        if not 0 < need <= int(top[-1]):
            raise AssertionError(  # the sketch does not describe these scores
                f"stream {i}: bracket holds {int(top[-1])}, {above[i]} above, K={K}"
            )
        j = int(torch.searchsorted(top, need, side="left"))
        p = counts[i].numel() - 1 - j  # the threshold's offset in the bracket
        equal = int(counts[i][p])
        gt = above[i] + int(top[j]) - equal
        value = float(_f32(lo + p))
        out.append(Threshold(value, K - gt, K, equal))
    return out


__all__ = ["BRACKET", "Sketch", "sketch_thresholds"]
