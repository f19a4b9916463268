"""Exact top-k over many tensors without concatenating them (DESIGN §2).

The rule: keep exactly ``K = ⌈k·n⌉`` of the ``n`` entries in scope; at equal score the
earlier position wins (tensors in sorted key order, then row-major index).

How: scores are non-negative float32, whose bit patterns sort like the numbers, so the
K-th largest score is found by a two-pass radix select over the bits: pass 1 histograms
the high 16 bits of every score, which pins down the bucket holding the K-th largest;
pass 2 histograms the low 16 bits inside that bucket, which pins down the exact value
``t``. The result is a :class:`Threshold` (``t`` and a tie quota ``q``): an entry is
kept when its score is ``> t``, or ``== t`` and it is among the first ``q`` such entries
in position order. Memory: two histograms of 64 Ki counters, whatever ``n`` is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from npstune.errors import ConfigError

_HI = 1 << 15  # non-negative float32 bit patterns have the sign bit clear
_LO = 1 << 16
SMALL = 1 << 18  # up to this many scores, one sort beats two 64 Ki-bucket histograms


def keep_count(k: float, n: int) -> int:
    """``⌈k·n⌉`` computed exactly on the decimal value of ``k`` (0.07·100 is 7,
    not 8)."""
    check_ratio(k)
    return min(n, math.ceil(Fraction(repr(float(k))) * n))


def check_ratio(k: float, name: str = "k") -> None:
    """Raise ConfigError unless ``0 < k <= 1``."""
    if (
        not isinstance(k, (int, float))
        or isinstance(k, bool)
        or not (0.0 < float(k) <= 1.0)
    ):
        raise ConfigError(f"{name} must be in (0, 1], got {k!r}")


@dataclass(frozen=True)
class Threshold:
    """Keep ``score > value``, plus the first ``quota`` entries with ``score == value``.

    ``keep`` is the total kept (``count_gt + quota``). ``value`` is +inf when nothing is
    kept. ``equal`` counts the scores equal to ``value`` (None: not known); when the
    quota takes them all, the rule is simply ``score >= value`` and needs no position
    bookkeeping.
    """

    value: float
    quota: int
    keep: int
    equal: int | None = None

    def cursor(self) -> ThresholdCursor:
        """A fresh cursor, to apply this threshold over tensors in position order."""
        return ThresholdCursor(self)


class ThresholdCursor:
    """Applies a :class:`Threshold` to consecutive chunks, spending the tie quota in
    order.

    Only chunks where the quota is partly spent need a scan of the equal scores: once it
    is spent the rule is ``score > value``, and while it covers every equal score still
    to come (known when the threshold counts them) it is ``score >= value``.
    """

    def __init__(self, threshold: Threshold) -> None:
        self.threshold = threshold
        self.left = threshold.quota
        #: equal scores not yet passed (None: unknown)
        self.equal_left = threshold.equal
        self._t = torch.tensor(threshold.value, dtype=torch.float32)

    def snapshot(self) -> tuple[int, int | None]:
        """Where this cursor stands: the tie quota left and the equal scores still to
        come (restore with :meth:`restore`)."""
        return self.left, self.equal_left

    def restore(self, state: tuple[int, int | None]) -> None:
        """Put the cursor back where a :meth:`snapshot` found it."""
        self.left, self.equal_left = state

    @property
    def rule(self) -> str:
        """``">"``, ``">="`` or ``"scan"``: how the next chunk's equal scores are
        decided."""
        if self.left == 0:
            return ">"
        return ">=" if self.left == self.equal_left else "scan"

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask for the next chunk of scores (float32, any shape)."""
        t = self._t.to(scores.device)
        rule = self.rule
        if rule == ">=":
            return scores >= t
        keep = scores > t
        if rule == "scan":
            eq = (scores == t).reshape(-1)
            idx = eq.nonzero().squeeze(1)
            if idx.numel():
                take = idx[: self.left]
                keep.view(-1)[take] = True
                self.left -= int(take.numel())
                if self.equal_left is not None:
                    self.equal_left -= int(idx.numel())
        return keep


def _bits(scores: torch.Tensor) -> torch.Tensor:
    s = scores.reshape(-1)
    if s.dtype != torch.float32:
        s = s.float()
    return s.view(torch.int32)


def select_many(
    chunks: Callable[[], Iterable[torch.Tensor]],
    ks: Sequence[int],
    n: int | None = None,
) -> list[Threshold]:
    """Exact thresholds keeping the top ``ks[i]`` scores, for several ``ks`` at once.

    ``chunks()`` must yield the non-negative float32 scores in position order each time
    it is called (it is called twice: one pass per 16-bit digit). NaN scores are not
    allowed.
    """
    return select_streams(lambda: ((c,) for c in chunks()), [ks], n)[0]


def select_streams(
    chunks: Callable[[], Iterable[Sequence[torch.Tensor]]],
    ks: Sequence[Sequence[int]],
    n: int | None = None,
) -> list[list[Threshold]]:
    """:func:`select_many` for several score streams read together (e.g. the task
    vectors of one merge, which share the base's reads): ``chunks()`` yields one tuple
    of chunks per step, ``ks[s]`` are stream ``s``'s keep counts; returns one list per
    stream. Two passes over ``chunks()`` whatever the number of streams."""
    return select_streams_digits(chunks, ks, n)[0]


def select_streams_digits(
    chunks: Callable[[], Iterable[Sequence[torch.Tensor]]],
    ks: Sequence[Sequence[int]],
    n: int | None = None,
) -> tuple[list[list[Threshold]], list[np.ndarray]]:
    """:func:`select_streams`, plus each stream's histogram of the high 16 bits of its
    scores (32 Ki int64 counters, from the first pass; what
    :class:`~npstune.sparsify.sketch.Sketch` is made of)."""
    S = len(ks)
    hi: list[torch.Tensor | None] = [None] * S
    total = [0] * S
    small: list[list[torch.Tensor] | None] = [
        [] for _ in range(S)
    ]  # few scores: sort instead
    for step in chunks():
        for i, sc in enumerate(step):
            b = _bits(sc)
            if b.numel() == 0:
                continue
            total[i] += b.numel()
            sm = small[i]
            if sm is not None:
                sm.append(b)
                if total[i] <= SMALL:
                    continue
                b = torch.cat(sm)
                small[i] = None
            h = torch.bincount(b >> 16, minlength=_HI).cpu()
            prev = hi[i]
            hi[i] = h if prev is None else prev + h
    for i in range(S):
        if n is not None and n != total[i]:
            raise ConfigError(f"expected {n} scores, saw {total[i]}")
        for K in ks[i]:
            if K < 0 or K > total[i]:
                raise ConfigError(f"cannot keep {K} of {total[i]} entries")
    out: dict[int, list[Threshold]] = {}  # stream -> its thresholds
    plans: list[list[tuple[int, int, int] | None]] = [[] for _ in range(S)]
    digits: list[list[int]] = [[] for _ in range(S)]
    for i in range(S):
        sm = small[i]
        if sm is not None:
            held = (
                torch.cat([b.cpu() for b in sm])
                if sm
                else torch.empty(0, dtype=torch.int32)
            )
            hi[i] = torch.bincount(held >> 16, minlength=_HI)
            out[i] = _select_sorted(held, ks[i])
            continue
        h_i = hi[i]
        assert h_i is not None  # a stream leaves the small path with its histogram
        hist_hi = h_i.numpy()
        above_hi = _above(
            hist_hi
        )  # above[d] = number of scores whose high digit is > d
        for K in ks[i]:
            if K == 0:
                plans[i].append(None)
                continue
            d = _digit(above_hi, hist_hi, K)
            plans[i].append((K, d, int(above_hi[d])))
        digits[i] = sorted({p[1] for p in plans[i] if p is not None})
    lo = [{d: torch.zeros(_LO, dtype=torch.int64) for d in digits[i]} for i in range(S)]
    if any(lo):
        # per stream: lookup table of its boundary digits (cheaper than isin)
        member = []
        for ds in digits:
            lut = torch.zeros(_HI, dtype=torch.bool)
            lut[ds] = True
            member.append(lut)
        for step in chunks():
            for i, sc in enumerate(step):
                if not lo[i]:
                    continue
                b = _bits(sc)
                if b.numel() == 0:
                    continue
                top = b >> 16
                ds = digits[i]
                inset = top == ds[0] if len(ds) == 1 else member[i].to(b.device)[top]
                b, top = b[inset], top[inset]
                for d in ds:
                    sel = b[top == d]
                    if sel.numel():
                        lo[i][d] += torch.bincount(sel & 0xFFFF, minlength=_LO).cpu()
    for i in range(S):
        if i in out:
            continue
        res = []
        lo_np = {d: h.numpy() for d, h in lo[i].items()}
        above_lo = {d: _above(h) for d, h in lo_np.items()}
        for p in plans[i]:
            if p is None:
                res.append(Threshold(math.inf, 0, 0))
                continue
            K, d, above = p
            j = _digit(above_lo[d] + above, lo_np[d], K)
            bits = (d << 16) | j
            value = float(np.array([bits], dtype=np.int32).view(np.float32)[0])
            res.append(
                Threshold(value, K - int(above_lo[d][j] + above), K, int(lo_np[d][j]))
            )
        out[i] = res
    digits_hist = [
        h.numpy() if h is not None else np.zeros(_HI, dtype=np.int64) for h in hi
    ]
    return [out[i] for i in range(S)], digits_hist


def _select_sorted(bits: torch.Tensor, ks: Sequence[int]) -> list[Threshold]:
    """Same result as the radix passes, by one sort (few scores)."""
    desc = torch.sort(bits, descending=True).values
    out = []
    for K in ks:
        if K == 0:
            out.append(Threshold(math.inf, 0, 0))
            continue
        v = desc[K - 1]
        gt = int(torch.searchsorted(-desc, -v, right=False))  # entries strictly greater
        ge = int(torch.searchsorted(-desc, -v, right=True))  # entries greater or equal
        value = float(
            v.view(torch.float32).item()
            if v.dim()
            else v.reshape(1).view(torch.float32)[0]
        )
        out.append(Threshold(value, K - gt, K, ge - gt))
    return out


def _above(hist: np.ndarray) -> np.ndarray:
    """above[d] = sum of hist[d+1:] (how many scores lie in higher digits)."""
    total = np.cumsum(hist[::-1])[::-1]
    return total - hist


def _digit(above: np.ndarray, hist: np.ndarray, K: int) -> int:
    """The one digit d with above[d] < K <= above[d] + hist[d]."""
    return int(np.flatnonzero((above < K) & (above + hist >= K))[0])


def select(
    chunks: Callable[[], Iterable[torch.Tensor]], k_count: int, n: int | None = None
) -> Threshold:
    """Exact threshold keeping the top ``k_count`` scores (see :func:`select_many`)."""
    return select_many(chunks, [k_count], n)[0]


def topk_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """Exact top-``k`` keep-mask of one tensor of non-negative scores
    (per-tensor scope)."""
    n = scores.numel()
    th = select(lambda: [scores], keep_count(k, n), n)
    return th.cursor().mask(scores.float())
