"""NPS candidates without re-sorting: a task vector kept in rank order (DESIGN §2
"Better still").

A search evaluates hundreds of weight vectors w for the same τ. The rank partition does
not depend on w, so :class:`RankedTaskVector` sorts |τ| once (stable: equal magnitudes
keep position order) and stores τ in rank order with each entry's position. Subspace m
is then the contiguous slice ``[lo_m, hi_m)`` of that order, and within it the
reweighted magnitudes ``fl(w_m·|τ|)`` are still non-increasing. So:

- the top-k threshold for any w is the K-th largest value of M sorted lists, found by a
  binary search over float32 bit patterns where each count is a ``searchsorted`` per
  subspace: O(32·M·log n), without touching τ;
- the kept entries are a prefix of each subspace's slice (plus the tied entries at the
  threshold, resolved by position exactly as the streaming path does), so building the
  candidate is a zero fill plus a scatter of the kept k·n entries.

Results are identical, bit for bit, to the streaming reference path
(:class:`npstune.merge.pruning.NpsPruner`): same mask, same values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from npstune.errors import ConfigError
from npstune.sparsify.nps import DEFAULT_SUBSPACES, check_weights, subspace_bounds
from npstune.sparsify.topk import Threshold, keep_count

_F32_INF_BITS = 0x7F800000


@dataclass(frozen=True)
class SparseDelta:
    """A pruned task vector: flat positions (int64, ascending rank order) and values."""

    positions: torch.Tensor
    values: torch.Tensor
    n: int

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = torch.zeros(self.n, dtype=dtype, device=self.positions.device)
        out[self.positions] = self.values.to(dtype)
        return out


class RankedTaskVector:
    """τ (float32, flattened over ``keys`` in sorted order) held in rank order.

    Args:
        taus: key -> τ tensor (any float dtype; ranked as float32, as everywhere).
        subspaces: M, the number of rank subspaces.
        device: where τ lives and candidates are built.
    """

    def __init__(
        self,
        taus: Mapping[str, torch.Tensor],
        subspaces: int = DEFAULT_SUBSPACES,
        device: str | torch.device = "cpu",
    ) -> None:
        if not isinstance(subspaces, int) or not 1 <= subspaces <= 255:
            raise ConfigError(
                f"subspaces must be an integer in [1, 255], got {subspaces!r}"
            )
        self.keys = sorted(taus)
        self.shapes = {k: tuple(taus[k].shape) for k in self.keys}
        self.subspaces = subspaces
        self.device = torch.device(device)
        flat = torch.cat([taus[k].reshape(-1).float() for k in self.keys]).to(
            self.device
        )
        self.n = flat.numel()
        mags = flat.abs()
        # stable descending sort: equal magnitudes keep position order (rank rule)
        order = torch.sort(mags, descending=True, stable=True).indices
        self.positions = order  # rank -> position (int64)
        self.sorted_tau = flat[order]  # τ in rank order
        del flat, mags
        neg = (-self.sorted_tau.abs()).cpu().numpy()  # ascending: -|τ| by rank
        self.bounds = subspace_bounds(self.n, subspaces)
        self._neg = [neg[lo:hi] for lo, hi in self.bounds]

    # ---------------------------------------------------------------- threshold
    def _count_ge(self, w: np.ndarray, t: np.float32) -> tuple[list[int], int]:
        """Entries per subspace with fl(w_m·|τ|) >= t (each a prefix of its slice)."""
        counts = []
        for wm, neg in zip(w, self._neg):
            if neg.size == 0:
                counts.append(0)
                continue
            if t <= 0:
                counts.append(neg.size)
                continue
            if wm == 0:
                counts.append(0)
                continue
            x = np.float32(
                t / wm
            )  # smallest |τ| whose product reaches t, up to rounding
            while x > 0 and np.float32(wm * np.nextafter(x, np.float32(0))) >= t:
                x = np.nextafter(x, np.float32(0))
            while np.isfinite(x) and np.float32(wm * x) < t:
                x = np.nextafter(x, np.float32(np.inf))
            # count |τ| >= x  <=>  -|τ| <= -x
            counts.append(int(np.searchsorted(neg, -x, side="right")))
        return counts, sum(counts)

    def threshold(self, weights: Sequence[float] | torch.Tensor, k: float) -> Threshold:
        """Exact top-k threshold of the reweighted magnitudes, in O(32·M·log n)."""
        w = check_weights(list(map(float, weights)), self.subspaces).numpy()
        K = keep_count(k, self.n)
        if K == 0:
            return Threshold(float("inf"), 0, 0)
        lo, hi = 0, _F32_INF_BITS  # largest t (as bits) with count_ge(t) >= K
        while lo < hi:
            mid = (lo + hi + 1) // 2
            t = np.array([mid], dtype=np.int32).view(np.float32)[0]
            if self._count_ge(w, t)[1] >= K:
                lo = mid
            else:
                hi = mid - 1
        t = np.array([lo], dtype=np.int32).view(np.float32)[0]
        above = np.array([lo + 1], dtype=np.int32).view(np.float32)[0]
        gt = self._count_ge(w, above)[1] if lo + 1 <= _F32_INF_BITS else 0
        return Threshold(float(t), K - gt, K)

    # ---------------------------------------------------------------- candidates
    def _kept(
        self, weights: Sequence[float] | torch.Tensor, k: float
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The kept entries as (positions, τ values, w_m) parts: one prefix per
        subspace, plus the tied entries at the threshold that win by position."""
        w = check_weights(list(map(float, weights)), self.subspaces)
        th = self.threshold(w, k)
        wn = w.numpy()
        t = np.float32(th.value)
        gt_counts, _ = self._count_ge(wn, np.nextafter(t, np.float32(np.inf)))
        ge_counts, _ = self._count_ge(wn, t)
        parts = []
        tie_pos, tie_val = [], []
        for m, (lo, _) in enumerate(self.bounds):
            g, e = gt_counts[m], ge_counts[m]
            wm = w[m].to(self.device)
            if g:
                parts.append(
                    (self.positions[lo : lo + g], self.sorted_tau[lo : lo + g], wm)
                )
            if e > g:
                tie_pos.append(self.positions[lo + g : lo + e])
                tie_val.append(wm * self.sorted_tau[lo + g : lo + e])
        if th.quota and tie_pos:
            tp, tv = torch.cat(tie_pos), torch.cat(tie_val)
            first = torch.sort(tp).indices[: th.quota]  # earlier position wins the tie
            parts.append((tp[first], tv[first], torch.ones((), device=self.device)))
        return parts

    def prune(self, weights: Sequence[float] | torch.Tensor, k: float) -> SparseDelta:
        """τ̂ = mask ⊙ (w[subspace]·τ) as positions and values (exact top-k rule)."""
        parts = self._kept(weights, k)
        if not parts:
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            return SparseDelta(empty, empty.float(), self.n)
        return SparseDelta(
            torch.cat([p for p, _, _ in parts]),
            torch.cat([wm * v for _, v, wm in parts]),
            self.n,
        )

    def scatter_into(
        self,
        out: torch.Tensor,
        weights: Sequence[float] | torch.Tensor,
        k: float,
        lam: float = 1.0,
        accumulate: bool = False,
    ) -> int:
        """Write (or, with ``accumulate``, add) λ·τ̂ into the flat float32 ``out``.

        No concatenation and no pass over the n entries: only the k·n kept entries are
        touched. ``out`` must be zero where τ̂ is written unless ``accumulate``. Returns
        the number of entries kept.
        """
        kept = 0
        for pos, vals, wm in self._kept(weights, k):
            v = wm * vals
            if accumulate:
                out.index_add_(0, pos, v, alpha=float(lam))
            else:
                # index_copy_ is ~2x faster than scatter_ on CPU for unique positions
                out.index_copy_(0, pos, v if lam == 1.0 else v * float(lam))
            kept += pos.numel()
        return kept

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector over this task vector's keys (views, no copy)."""
        out, pos = {}, 0
        for k in self.keys:
            size = math.prod(self.shapes[k])
            out[k] = flat[pos : pos + size].view(self.shapes[k])
            pos += size
        return out


def fuse(
    ranked: Sequence[RankedTaskVector],
    weights: Sequence[Sequence[float]],
    k: float | Sequence[float],
    lam: float | Sequence[float],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat Σ_t λ_t·τ̂_t (float32) over tasks that share keys: the fusion candidate's
    delta.

    ``out`` (length n, float32) is reused if given, so a search allocates it once.
    """
    if not ranked:
        raise ConfigError("fuse needs at least one task vector")
    n = ranked[0].n
    if any(r.n != n or r.keys != ranked[0].keys for r in ranked):
        raise ConfigError("task vectors to fuse must cover the same keys")
    ks = [k] * len(ranked) if isinstance(k, (int, float)) else list(k)
    lams = [lam] * len(ranked) if isinstance(lam, (int, float)) else list(lam)
    if out is None:
        out = torch.zeros(n, dtype=torch.float32, device=ranked[0].device)
    else:
        out.zero_()
    for t, (r, w, kt, lt) in enumerate(zip(ranked, weights, ks, lams)):
        r.scatter_into(out, w, kt, lt, accumulate=t > 0)
    return out
