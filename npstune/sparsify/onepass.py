"""An NPS candidate in one streaming pass over τ (the streamed search's build).

The two-pass build (:func:`~npstune.sparsify.sketch.sketch_thresholds`, then the θ pass)
labels every entry with its subspace in both passes: a ``bucketize`` against the M − 1
boundaries, a reweighting and a threshold compare per entry and task, about 15× the
cost of reading τ. Here every entry costs one table lookup instead, and the threshold is
settled after the pass, from the few entries that need it.

**Tables.** A float32 |τ| lies in one of 32 Ki *coarse bins* (its high 16 bits). A bin
that holds no subspace boundary lies wholly in one subspace m, so its reweighted values
``fl(w_m·|τ|)`` lie in ``[fl(w_m·lo), fl(w_m·hi)]`` (lo, hi: the bin's edges). A
*fine* histogram of |τ| (its high 20 of 31 bits, 1 Mi counters, counted once per
task vector and cached with its partition) brackets the top-K threshold of the
reweighted values for any w (:func:`fine_bracket`) within a few fine bins. The
lookup table is per fine bin too. So before the pass each bin is known to be kept
(every value above the bracket), dropped (every value below it) or
*special* (it holds a boundary, or reaches into the bracket). The table maps a bin to
w_m, 0 or +inf.

**Ties at a boundary.** A boundary keeps the scores above its value and the first
``quota`` equal to it in position order. The pass that counts the fine histogram also
finds each boundary's *tie end*, the position where its quota runs out
(:func:`fine_pass`); an equal score before it is on the boundary's upper side. So a
bin whose entries all equal a boundary's value (the rule with bf16 checkpoints, whose τ
takes few values) is not special: its table value is its side's weight (or 0), set per
chunk, and only the one chunk holding a tie end decides its entries one by one.

**The pass.** Per chunk and task: ``c = table[bin(τ)]·τ·λ`` added into Δ, in the exact
path's order (:meth:`OnePass.chunk`). A special entry gives ±inf or NaN; there (a few
per cent of the entries at most) each task's value is recomputed exactly: its subspace
from the boundaries (value, tie end), the reweighted value compared with the bracket.
A value inside the
bracket is *pending*: its position waits, with base and values, until the pass has
counted everything above the bracket; then the K − above largest pending values are
kept (earlier position first at equal value: the exact rule's tie quota) and those
positions are written (:meth:`OnePass.finish`).

**Exactness.** A kept entry adds ``fl(fl(w_m·τ)·λ)`` exactly as the two-pass build
does (``index_add_`` rounds the product and the sum separately, as here). A dropped one
adds ±0, which leaves any sum unchanged except for the sign of a zero sum; that sign
shows in θ only where θ_pre is −0, and those positions are recomputed exactly too. So
the state is the same, bit for bit (tested against the two-pass build on tie-heavy and
bf16 inputs).

**Memory.** Per task: the 1 Mi-entry table, the 1 Mi-counter fine histogram, the
partition and its tie ends; per pass: a few chunk-sized buffers and the pending
positions, at most :data:`PENDING` of them (the fine histogram bounds their count
before the pass). More, and :func:`settle` first finds each threshold and its tie
quota exactly, in a pass that looks at the special entries only (a histogram of the
float32 patterns inside the bracket); the pass then keeps r > t and the first ties at
t in position order, and holds nothing back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from npstune.errors import ConfigError
from npstune.sparsify.nps import Partition, _next_up, subspace_bounds
from npstune.sparsify.sketch import _INF_BITS, _f32, _largest
from npstune.sparsify.topk import Threshold

FINE_SHIFT = 11
FINE_BINS = 1 << (31 - FINE_SHIFT)
#: union positions a pass may hold back for its threshold (about 40 B each for 3 tasks)
PENDING = 1 << 22
_INT32_MIN = -(1 << 31)  # the pattern of float32 −0.0
_INF = float("inf")
#: the widest bracket (in float32 patterns) :func:`settle` histograms (8 B each)
SETTLE_PATTERNS = 1 << 22


def _edges(shift: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Each bin's smallest and largest float32 (+inf for bins at and above +inf's
    pattern: they hold no finite value)."""
    base = np.arange(bins, dtype=np.int64) << shift
    lo = _f32(base).copy()
    hi = _f32(base | ((1 << shift) - 1)).copy()
    lo[_INF_BITS >> shift :] = np.inf
    hi[_INF_BITS >> shift :] = np.inf
    return lo, hi


_FINE_LO, _FINE_HI = _edges(FINE_SHIFT, FINE_BINS)


def fine_suffixes(
    chunks: Iterable[Sequence[torch.Tensor]], n: int, streams: int
) -> list[np.ndarray]:
    """Per stream, ``S[e]``: how many of its ``n`` non-negative float32 scores
    (``chunks`` yields one tuple of chunks per step) lie in fine bins ≥ e
    (``FINE_BINS + 1`` counters, ``S[0] = n``). One pass."""
    return [s for s, _ in fine_pass(chunks, n, [()] * streams)]


def fine_pass(
    chunks: Iterable[Sequence[torch.Tensor]],
    n: int,
    bounds: Sequence[Sequence[Threshold]],
) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    """Per stream (``bounds[i]``: its partition's boundaries), its fine suffix counts
    (:func:`fine_suffixes`) and the *tie end* of each boundary, in one pass.

    A boundary keeps the scores above its value and the first ``quota`` equal to it in
    position order; its tie end is the position (in the stream's order, from 0) before
    which every equal score is among those: 0 when the quota is 0, n when it takes them
    all, else one past the quota-th equal score. Ties are then decided by position
    alone, so a chunk that lies wholly on one side of every tie end needs no count."""
    hists = [torch.zeros(FINE_BINS, dtype=torch.int64) for _ in bounds]
    seen = [0] * len(bounds)
    # per stream: boundary -> [value, ties still to pass before the end]
    open_: list[dict[int, list[Any]]] = []
    ends: list[list[int]] = []
    for bs in bounds:
        e: list[int] = []
        todo = {}
        for j, th in enumerate(bs):
            if th.quota == 0:
                e.append(0)
            elif th.equal is not None and th.quota == th.equal:
                e.append(n)
            else:
                e.append(-1)
                todo[j] = [torch.tensor(th.value, dtype=torch.float32), th.quota]
        ends.append(e)
        open_.append(todo)
    for step in chunks:
        for i, c in enumerate(step):
            b = c.reshape(-1)
            b = b if b.dtype == torch.float32 else b.float()
            at = torch.bitwise_right_shift(b.view(torch.int32), FINE_SHIFT)
            hists[i] += torch.bincount(at, minlength=FINE_BINS).to(hists[i].device)
            for j, slot in list(open_[i].items()):
                eq = b == slot[0].to(b.device)
                cnt = int(eq.sum())
                if cnt >= slot[1]:
                    last = eq.nonzero()[slot[1] - 1, 0]
                    ends[i][j] = seen[i] + int(last) + 1
                    del open_[i][j]
                else:
                    slot[1] -= cnt
            seen[i] += b.numel()
    out = []
    for h, s, e, todo in zip(hists, seen, ends, open_):
        if s != n:
            raise ConfigError(f"expected {n} scores, saw {s}")
        if todo:
            raise ConfigError(f"boundaries {sorted(todo)} have fewer ties than quota")
        suffix = np.zeros(FINE_BINS + 1, dtype=np.int64)
        suffix[:-1] = np.cumsum(h.numpy()[::-1])[::-1]
        out.append((suffix, tuple(e)))
    return out


def _products(w: np.ndarray, edges: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        r = w[:, None] * edges[None, :]
    return np.nan_to_num(r, nan=np.inf)  # 0·inf on the empty top bins


def fine_bracket(
    suffix: np.ndarray, n: int, subspaces: int, weights: torch.Tensor, K: int
) -> tuple[int, int, int]:
    """``(lo, hi, pending)``: float32 patterns of a bracket holding the K-th largest
    reweighted magnitude, with fewer than K values above ``hi``, and an upper bound on
    the values inside it.

    Ranks ``[0, S[e])`` are the entries of fine bins ≥ e, and subspace m holds ranks
    ``[a_m, b_m)``, so ``max(0, min(S[e], b_m) − a_m)`` of subspace m's entries lie in
    those bins: a lower bound of ``count(r ≥ t)`` from the bins whose smallest product
    is ≥ t, an upper one from those whose largest is."""
    w = weights.detach().cpu().to(torch.float32).numpy()
    ab = np.asarray(subspace_bounds(n, subspaces), dtype=np.int64)
    rlo, rhi = _products(w, _FINE_LO), _products(w, _FINE_HI)

    def count(prod: np.ndarray, t: np.float32) -> int:
        total = 0
        for m in range(prod.shape[0]):
            e = int(np.searchsorted(prod[m], t, side="left"))
            total += max(0, min(int(suffix[e]), int(ab[m, 1])) - int(ab[m, 0]))
        return total

    lo = _largest(lambda t: count(rlo, t) >= K)
    hi = _largest(lambda t: count(rhi, t) >= K)
    above = count(rlo, np.float32(_f32(hi + 1))) if hi + 1 <= _INF_BITS else 0
    return lo, hi, count(rhi, np.float32(_f32(lo))) - above


@dataclass
class Settled:
    """A task's top-K threshold, known before the pass (:func:`settle`): keep r > t
    and the first ``quota`` of the r == t in position order. Nothing waits."""

    t: float
    quota: int
    left: int = field(init=False)  # quota not yet spent

    def __post_init__(self) -> None:
        self.left = self.quota


@dataclass
class TaskTable:
    """One task's lookup table for one candidate, and what the pass learns of it."""

    lut: torch.Tensor  # (FINE_BINS,) float32: w_m (kept), 0 (dropped), +inf (special)
    counted: torch.Tensor  # (FINE_BINS,) bool: bins whose entries ``above`` counts
    sub: torch.Tensor  # (FINE_BINS,) int32: boundaries whose value's bin is above
    #: every boundary: (its value's bin, value, the next float32 up, tie end); in its
    #: bin, an equal score before the tie end is on the boundary's upper side
    edges: list[tuple[int, float, float, int]]
    #: bins holding more than one boundary (their side is always decided exactly)
    shared: frozenset[int]
    weights: torch.Tensor  # (M,) float32
    lo: int  # bracket, float32 patterns
    hi: int
    above: int  # values above the bracket: the kept bins' counts, then the pass's
    #: pure boundary bins (every entry equal to the boundaries' value) whose every
    #: side is kept or dropped: (bin, table value per side, the sides' tie ends); the
    #: side of a position is the number of tie ends at or before it
    dynamic: list[tuple[int, list[float], list[int]]]
    #: per bin, for this chunk: below a boundary in it means ``|τ| < cut`` (0
    #: elsewhere, and where :attr:`scans` decides)
    cut: torch.Tensor = field(default_factory=lambda: torch.zeros(FINE_BINS))
    #: this chunk's boundaries decided by position: (bin, value, tie end)
    scans: list[tuple[int, float, int]] = field(default_factory=list)
    #: the top-K threshold when :func:`settle` found it before the pass: keep r > t
    #: and the first ``quota`` r == t in position order, nothing held back; None:
    #: values in the bracket wait for the end of the pass
    settled: Settled | None = None

    @classmethod
    def build(
        cls,
        part: Partition,
        suffix: np.ndarray,
        ends: Sequence[int],
        weights: torch.Tensor,
        lo: int,
        hi: int,
    ) -> TaskTable:
        """The table of ``part``'s task vector (fine suffix counts ``suffix`` and
        tie ends ``ends``: :func:`fine_pass`) for weights ``weights`` and bracket
        ``[lo, hi]`` (module docstring)."""
        if len(ends) != len(part.bounds):
            raise ConfigError(f"{len(ends)} tie ends for {len(part.bounds)} boundaries")
        w = weights.detach().cpu().to(torch.float32).numpy()
        count = suffix[:-1] - suffix[1:]
        d = np.arange(FINE_BINS)
        vbins = [
            int(np.float32(t.value).view(np.int32)) >> FINE_SHIFT for t in part.bounds
        ]
        sub = np.zeros(FINE_BINS, dtype=np.int64)
        for vb in vbins:
            sub += vb > d  # a bin below boundary j's value is past its ranks
        wd = w[sub]
        with np.errstate(over="ignore", invalid="ignore"):
            plo = np.nan_to_num(wd * _FINE_LO, nan=np.inf)
            phi = np.nan_to_num(wd * _FINE_HI, nan=np.inf)
        t_lo, t_hi = _f32(lo), _f32(hi)
        kept, dropped = plo > t_hi, phi < t_lo
        boundary = np.zeros(FINE_BINS, dtype=bool)
        dynamic: list[tuple[int, list[float], list[int]]] = []
        above = 0
        for b in sorted({vb for vb in vbins if vb < _INF_BITS >> FINE_SHIFT}):
            boundary[b] = True
            js = [j for j, vb in enumerate(vbins) if vb == b]
            values = {part.bounds[j].value for j in js}
            eq = part.bounds[js[0]].equal
            v = np.float32(values.pop())
            if values or eq is None or int(count[b]) != eq:
                # values besides the boundary's: each side's products span the bin's
                sides = w[int(sub[b]) : int(sub[b]) + len(js) + 1]
                if bool((sides * _FINE_HI[b] < t_lo).all()):
                    boundary[b], dropped[b] = False, True  # no side reaches the bracket
                elif bool((sides * _FINE_LO[b] > t_hi).all()) and len(set(sides)) == 1:
                    boundary[b], kept[b] = False, True  # kept, one weight either side
                continue  # else special: each entry's side decided one by one
            # every entry of bin b equals v: side s (s boundaries at v whose tie end
            # it is past) is subspace sub[b] + s; the quotas give each side's size
            first = int(sub[b])
            prods = w[first : first + len(js) + 1] * v
            if bool(((prods >= t_lo) & (prods <= t_hi)).any()):
                continue  # a side in the bracket: its entries wait for the threshold
            side = [
                float(w[first + s]) if p > t_hi else 0.0 for s, p in enumerate(prods)
            ]
            quotas = [0, *(part.bounds[j].quota for j in js), eq]
            sizes = [quotas[s + 1] - quotas[s] for s in range(len(js) + 1)]
            above += sum(n for n, val in zip(sizes, side) if val > 0)
            boundary[b] = False
            kept[b], dropped[b] = False, False
            dynamic.append((b, side, [int(ends[j]) for j in js]))
        kept &= ~boundary
        dropped &= ~boundary
        counted = kept.copy()
        for b, _, _ in dynamic:  # counted above, side by side, once
            counted[b] = True
        lut = np.where(kept, wd, np.where(dropped, np.float32(0), np.float32(np.inf)))
        lut[_INF_BITS >> FINE_SHIFT :] = 0  # no finite |τ| there
        per_bin: dict[int, int] = {}
        for vb in vbins:
            per_bin[vb] = per_bin.get(vb, 0) + 1
        return cls(
            torch.from_numpy(lut.astype(np.float32)),
            torch.from_numpy(counted),
            torch.from_numpy(sub.astype(np.int32)),
            [
                (vb, float(t.value), _next_up(t.value), int(e))
                for vb, t, e in zip(vbins, part.bounds, ends)
            ],
            frozenset(b for b, c in per_bin.items() if c > 1),
            torch.from_numpy(w.copy()),
            lo,
            hi,
            above + int(count[kept].sum()),
            dynamic,
        )

    def for_chunk(self, start: int, stop: int) -> None:
        """Set the boundary bins' cut values and the dynamic bins' table values for
        the positions ``[start, stop)``: a boundary whose tie end lies inside is
        decided by position (:attr:`scans`), a dynamic bin whose sides differ there
        is special."""
        self.scans = []
        for b, v, up, end in self.edges:
            if b >= FINE_BINS:
                continue
            if b in self.shared or start < end < stop:
                self.cut[b] = 0.0
                self.scans.append((b, v, end))
            else:  # ties above the boundary before its end, below it after
                self.cut[b] = v if stop <= end else up
        for b, side, ends in self.dynamic:
            first = sum(1 for e in ends if e <= start)
            last = sum(1 for e in ends if e < stop)
            vals = set(side[first : last + 1])
            self.lut[b] = vals.pop() if len(vals) == 1 else np.inf

    def reweighted(
        self, tu: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w, r = w·|τ|, fine bins)`` of entries ``tu`` at stream positions ``pos``
        of the current chunk. The subspace is the bin's, but in a boundary's bin the
        boundary tells the side: above its value, or equal to it before its tie end."""
        a = tu.abs()
        bins = _bins(tu)
        ids = self.sub.index_select(0, bins)
        # below a boundary whose side is a plain compare
        ids += a < self.cut.index_select(0, bins)
        for b, v, end in self.scans:  # decided by value, and ties by position
            m = bins == b
            if bool(m.any()):
                am = a[m]
                upper = (am > v) | ((am == v) & (pos[m] < end))
                ids[m] += ~upper
        wsel = torch.index_select(self.weights, 0, ids)
        return wsel, wsel * a, bins


def settle(
    tables: Sequence[TaskTable],
    chunks: Iterable[tuple[Sequence[torch.Tensor], int]],
    K: int,
) -> bool:
    """Settle each table's top-K threshold exactly (:class:`Settled`) in one pass
    over τ (``chunks``: the float32 τ of each task and the stream position of the
    chunk, in position order), for a build whose values in the bracket are too many
    to hold back. Only the special entries are looked at: those above the bracket
    are counted, those inside it histogrammed by their float32 pattern; then the
    K-th largest and its tie quota follow. False, reading nothing, when a bracket
    spans more than :data:`SETTLE_PATTERNS` patterns (the caller takes two passes)."""
    spans = [tab.hi - tab.lo + 1 for tab in tables]
    if max(spans, default=0) > SETTLE_PATTERNS:
        return False
    hists = [torch.zeros(span, dtype=torch.int64) for span in spans]
    above = [tab.above for tab in tables]  # the kept bins' entries, counted already
    for taus, at in chunks:
        for i, (tab, tau) in enumerate(zip(tables, taus)):
            flat = tau.reshape(-1)
            tab.for_chunk(at, at + flat.numel())
            idx = torch.eq(tab.lut.index_select(0, _bins(flat)), _INF)
            idx = idx.nonzero().squeeze(1)
            if not idx.numel():
                continue
            _, r, bins = tab.reweighted(flat.index_select(0, idx), idx + at)
            rb = r.view(torch.int32)
            above[i] += int(((rb > tab.hi) & ~tab.counted.index_select(0, bins)).sum())
            inside = rb[(rb >= tab.lo) & (rb <= tab.hi)] - tab.lo
            hists[i] += torch.bincount(inside.long(), minlength=spans[i])
    for i, (tab, h) in enumerate(zip(tables, hists)):
        # at_least[p]: values ≥ the pattern lo + p
        at_least = above[i] + np.cumsum(h.numpy()[::-1])[::-1]
        if not above[i] < K <= int(at_least[0]):
            raise AssertionError(  # the bracket does not describe these values
                f"task {i}: {above[i]} above the bracket, "
                f"{int(at_least[0]) - above[i]} in it, K={K}"
            )
        p = int(np.nonzero(at_least >= K)[0][-1])
        higher = int(at_least[p + 1]) if p + 1 < len(at_least) else above[i]
        tab.settled = Settled(float(_f32(tab.lo + p)), K - higher)
    return True


def combine(
    values: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor],
    lams: Sequence[float],
) -> torch.Tensor:
    """Σ_t λ_t·v_t over the kept entries, in the exact path's order and rounding: the
    first task's kept values written over +0, each further one's ``fl(λ·v)`` added
    (−0 elsewhere: the sum is unchanged, its zero's sign too)."""
    d: torch.Tensor | None = None
    for v, keep, lam in zip(values, keeps, lams):
        c = v if lam == 1.0 else v * lam
        if d is None:
            d = torch.where(keep, c, 0.0)
        else:
            d = d + torch.where(keep, c, -0.0)
    assert d is not None
    return d


def _bins(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fine bin of |x| (float32, flat) as int32."""
    b = torch.bitwise_right_shift(x.view(torch.int32), FINE_SHIFT, out=out)
    return b.bitwise_and_(FINE_BINS - 1)


class OnePass:
    """One candidate: feed the chunks in position order (:meth:`chunk`), then
    :meth:`finish` the held-back positions."""

    def __init__(
        self, tables: Sequence[TaskTable], lams: Sequence[float], K: int, size: int
    ) -> None:
        self.tables = list(tables)
        self.lams = [float(x) for x in lams]
        self.K = K
        self._hi = torch.empty(size, dtype=torch.int32)
        self._c = torch.empty(size, dtype=torch.float32)
        self._delta = torch.empty(size, dtype=torch.float32)
        self._theta = torch.empty(size, dtype=torch.float32)
        #: held back, per chunk: (tag, offsets, base, per task (v, kept, pending, r))
        self._held: list[tuple[object, torch.Tensor, torch.Tensor, list[Status]]] = []
        self.held = 0
        #: entries looked at exactly (special for their task), over all tasks
        self.special = 0

    def chunk(
        self,
        tag: object,
        taus32: Sequence[torch.Tensor],
        base32: torch.Tensor,
        at: int,
    ) -> torch.Tensor:
        """θ = θ_pre + Σ_t λ_t·τ̂_t (float32, flat) of one chunk that starts at
        position ``at`` of the stream (the order of the tie ends); held-back positions
        are wrong until :meth:`finish` gives them. The result is a reused buffer."""
        n = base32.numel()
        hi, c, delta = self._hi[:n], self._c[:n], self._delta[:n]
        taus = [t.reshape(-1) for t in taus32]
        own: list[tuple[torch.Tensor, Status] | None] = []
        for t, (tab, flat) in enumerate(zip(self.tables, taus)):
            tab.for_chunk(at, at + n)
            out = delta if t == 0 else c
            torch.index_select(tab.lut, 0, _bins(flat, hi), out=out)
            # +inf marks a special bin (no table value is −inf or NaN): one compare,
            # where isinf would take |x| first
            idx = torch.eq(out, _INF).nonzero().squeeze(1)
            out.mul_(flat)
            lam = self.lams[t]
            if lam != 1.0:
                out.mul_(lam)
            if idx.numel():
                st = self._exact(tab, flat.index_select(0, idx), idx + at)
                v, keep = st[0], st[1]
                out.index_copy_(
                    0, idx, torch.where(keep, v if lam == 1.0 else v * lam, 0.0)
                )
                own.append((idx, st))
                self.special += int(idx.numel())
            else:
                own.append(None)
            if t > 0:
                delta.add_(c)
        b = base32.reshape(-1)
        theta = torch.add(b, delta, out=self._theta[:n])
        fix = [o[0][o[1][2]] for o in own if o is not None]
        negz = b.view(torch.int32) == _INT32_MIN
        if bool(negz.any()):  # the sign of a zero Δ shows there: recompute exactly
            fix.append(negz.nonzero().squeeze(1))
        if fix:
            where = torch.unique(torch.cat(fix))  # sorted
            if where.numel():
                self._settle(tag, where, taus, b, own, theta)
        return theta

    def _exact(self, tab: TaskTable, tu: torch.Tensor, pos: torch.Tensor) -> Status:
        """(v, kept, pending, r) of a task's special entries ``tu`` at stream
        positions ``pos`` (:meth:`TaskTable.reweighted`): kept above the bracket,
        pending inside it; with a settled threshold kept above t, and the ties at t
        while its quota lasts, in position order."""
        wsel, r, bins = tab.reweighted(tu, pos)
        st = tab.settled
        if st is not None:  # the threshold is known: nothing waits
            keep = r > st.t
            if st.left:
                ties = (r == st.t).nonzero().squeeze(1)[: st.left]
                keep[ties] = True
                st.left -= int(ties.numel())
            return wsel * tu, keep, torch.zeros_like(keep), r
        rb = r.view(torch.int32)
        keep = rb > tab.hi
        pend = (rb >= tab.lo) & ~keep
        tab.above += int((keep & ~tab.counted.index_select(0, bins)).sum())
        return wsel * tu, keep, pend, r

    def _settle(
        self,
        tag: object,
        at: torch.Tensor,
        taus: Sequence[torch.Tensor],
        base: torch.Tensor,
        own: Sequence[tuple[torch.Tensor, Status] | None],
        theta: torch.Tensor,
    ) -> None:
        """Every task's status at positions ``at`` (sorted; the special ones' from
        :meth:`_exact`, the others' from the table): θ written exactly where none is
        pending, the rest held back."""
        per: list[Status] = []
        for tab, flat, o in zip(self.tables, taus, own):
            tu = flat.index_select(0, at)
            w = tab.lut.index_select(0, _bins(tu))
            v, keep = w * tu, w > 0
            pend = torch.zeros(at.numel(), dtype=torch.bool)
            r = v.abs()
            if o is not None:
                idx, (ov, okeep, opend, orr) = o
                j = torch.searchsorted(idx, at).clamp_(max=idx.numel() - 1)
                hit = idx[j] == at
                jj = j[hit]
                v[hit], keep[hit], pend[hit], r[hit] = (
                    ov[jj],
                    okeep[jj],
                    opend[jj],
                    orr[jj],
                )
            per.append((v, keep, pend, r))
        wait = torch.stack([p[2] for p in per]).any(0)
        d = combine([p[0] for p in per], [p[1] for p in per], self.lams)
        done = ~wait
        theta[at[done]] = base[at[done]] + d[done]
        if bool(wait.any()):
            k = wait.nonzero().squeeze(1)
            self._held.append(
                (
                    tag,
                    at[k].to(torch.int64),
                    base[at[k]],
                    [(v[k], kp[k], p[k], r[k]) for v, kp, p, r in per],
                )
            )
            self.held += int(k.numel())
            if self.held > PENDING:
                raise AssertionError(
                    f"{self.held} held-back positions, over the bound checked before"
                )

    def finish(self) -> Iterable[tuple[object, torch.Tensor, torch.Tensor]]:
        """The held-back positions settled: ``(tag, offsets, θ float32)`` per chunk
        that held some back."""
        for t, tab in enumerate(self.tables):
            if tab.settled is not None:  # decided in the pass
                if tab.settled.left:
                    raise AssertionError(
                        f"task {t}: {tab.settled.left} of the tie quota not spent"
                    )
                continue
            need = self.K - tab.above
            rs = [h[3][t][3][h[3][t][2]] for h in self._held]
            pend_r = torch.cat(rs) if rs else torch.zeros(0)
            if not 0 < need <= pend_r.numel():
                raise AssertionError(  # the bracket does not describe these values
                    f"task {t}: {pend_r.numel()} pending, {tab.above} above, K={self.K}"
                )
            # the need largest; at equal value the earlier position (a stable sort)
            order = torch.sort(pend_r, descending=True, stable=True).indices
            take = torch.zeros(pend_r.numel(), dtype=torch.bool)
            take[order[:need]] = True
            pos = 0
            for h in self._held:
                _, keep, pend, _ = h[3][t]
                m = int(pend.sum())
                keep[pend] = take[pos : pos + m]
                pos += m
        for tag, offsets, base, per in self._held:
            d = combine([p[0] for p in per], [p[1] for p in per], self.lams)
            yield tag, offsets, base + d


#: (values fl(w·τ), kept, pending, reweighted |τ|) of some entries of one task
Status = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

__all__ = [
    "FINE_BINS",
    "OnePass",
    "PENDING",
    "SETTLE_PATTERNS",
    "Settled",
    "TaskTable",
    "combine",
    "fine_bracket",
    "fine_pass",
    "fine_suffixes",
    "settle",
]
