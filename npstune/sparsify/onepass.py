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

**The pass.** Per chunk and task: ``c = table[bin(τ)]·τ·λ`` added into Δ, in the exact
path's order (:meth:`OnePass.chunk`). A special entry gives ±inf or NaN, so one
``isfinite`` over Δ finds every position that some task marked special; there (a few
per cent of the entries) each task's value is recomputed exactly: the partition's
cursors label it, the reweighted value is compared with the bracket. A value inside the
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

**Memory.** Per task: the 32 Ki-entry table, the 1 Mi-counter fine histogram, the
partition; per pass: a few chunk-sized buffers and the pending positions, at most
:data:`PENDING` of them (the fine histogram bounds their count before the pass; more,
and the caller takes the two-pass build).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from npstune.errors import ConfigError
from npstune.sparsify.nps import Partition, PartitionCursor, _next_up, subspace_bounds
from npstune.sparsify.sketch import _INF_BITS, _f32, _largest
from npstune.sparsify.topk import ThresholdCursor

FINE_SHIFT = 11
FINE_BINS = 1 << (31 - FINE_SHIFT)
#: union positions a pass may hold back for its threshold (about 40 B each for 3 tasks)
PENDING = 1 << 22
_INT32_MIN = -(1 << 31)  # the pattern of float32 −0.0


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
    hists = [torch.zeros(FINE_BINS, dtype=torch.int64) for _ in range(streams)]
    seen = [0] * streams
    for step in chunks:
        for i, c in enumerate(step):
            b = c.reshape(-1)
            b = (b if b.dtype == torch.float32 else b.float()).view(torch.int32)
            hists[i] += torch.bincount(
                torch.bitwise_right_shift(b, FINE_SHIFT), minlength=FINE_BINS
            )
            seen[i] += b.numel()
    out = []
    for h, s in zip(hists, seen):
        if s != n:
            raise ConfigError(f"expected {n} scores, saw {s}")
        suffix = np.zeros(FINE_BINS + 1, dtype=np.int64)
        suffix[:-1] = np.cumsum(h.numpy()[::-1])[::-1]
        out.append(suffix)
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
class TaskTable:
    """One task's lookup table for one candidate, and what the pass learns of it."""

    lut: torch.Tensor  # (FINE_BINS,) float32: w_m (kept), 0 (dropped), +inf (special)
    counted: torch.Tensor  # (FINE_BINS,) bool: bins whose entries ``above`` counts
    sub: torch.Tensor  # (FINE_BINS,) int32: boundaries whose value's bin is above
    #: (bin, cursor) of every boundary: in its bin, the cursor tells the side
    edges: list[tuple[int, ThresholdCursor]]
    weights: torch.Tensor  # (M,) float32
    cursor: PartitionCursor
    lo: int  # bracket, float32 patterns
    hi: int
    above: int  # values above the bracket: the kept bins' counts, then the pass's
    #: pure boundary bins that are kept in either subspace: (bin, first subspace,
    #: cursors of the boundaries at their value); their weight follows the cursors
    dynamic: list[tuple[int, int, list[ThresholdCursor]]]
    #: per bin, for this chunk: below a boundary in it means ``|τ| < cut`` (0
    #: elsewhere, and where :attr:`scans` decides)
    cut: torch.Tensor = field(default_factory=lambda: torch.zeros(FINE_BINS))
    #: this chunk's boundaries whose cursor scans (or that share a bin)
    scans: list[tuple[int, ThresholdCursor]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        part: Partition,
        suffix: np.ndarray,
        weights: torch.Tensor,
        lo: int,
        hi: int,
    ) -> TaskTable:
        """The table of ``part``'s task vector (fine suffix counts ``suffix``) for
        weights ``weights`` and bracket ``[lo, hi]`` (module docstring)."""
        w = weights.detach().cpu().to(torch.float32).numpy()
        count = suffix[:-1] - suffix[1:]
        d = np.arange(FINE_BINS)
        cursor = part.cursor()
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
        dynamic: list[tuple[int, int, list[ThresholdCursor]]] = []
        for b in sorted({vb for vb in vbins if vb < _INF_BITS >> FINE_SHIFT}):
            boundary[b] = True
            js = [j for j, vb in enumerate(vbins) if vb == b]
            values = {part.bounds[j].value for j in js}
            eq = part.bounds[js[0]].equal
            v = np.float32(values.pop())
            if values or eq is None or int(count[b]) != eq:
                continue  # values besides the boundary's: special
            # every entry of bin b equals v: in subspace sub[b] + (boundaries at v
            # whose quota is spent), fixed within a chunk unless one is scanning
            first = int(sub[b])
            prods = w[first : first + len(js) + 1] * v
            if bool((prods > t_hi).all()):
                kept[b], boundary[b] = True, False
                dynamic.append((b, first, [cursor.cursors[j] for j in js]))
            elif bool((prods < t_lo).all()):
                dropped[b], boundary[b] = True, False
        kept &= ~boundary
        dropped &= ~boundary
        lut = np.where(kept, wd, np.where(dropped, np.float32(0), np.float32(np.inf)))
        lut[_INF_BITS >> FINE_SHIFT :] = 0  # no finite |τ| there
        return cls(
            torch.from_numpy(lut.astype(np.float32)),
            torch.from_numpy(kept),
            torch.from_numpy(sub.astype(np.int32)),
            [(vb, c) for vb, c in zip(vbins, cursor.cursors)],
            torch.from_numpy(w.copy()),
            cursor,
            lo,
            hi,
            int(count[kept].sum()),
            dynamic,
        )

    def for_chunk(self) -> None:
        """Set the boundary bins' cut values and the dynamic bins' weights from where
        their cursors stand (special for a chunk in which a quota may run out)."""
        shared = {b for b, _ in self.edges}
        shared = {b for b in shared if sum(1 for e, _ in self.edges if e == b) > 1}
        self.scans = []
        for b, cur in self.edges:
            if b >= FINE_BINS:
                continue
            rule = cur.rule
            if rule == "scan" or b in shared:
                self.cut[b] = 0.0
                self.scans.append((b, cur))
            else:
                v = cur.threshold.value
                self.cut[b] = v if rule == ">=" else _next_up(v)
        for b, first, cursors in self.dynamic:
            rules = [c.rule for c in cursors]
            if "scan" in rules:
                self.lut[b] = np.inf
            else:
                self.lut[b] = float(self.weights[first + rules.count(">")])


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
        self, tag: object, taus32: Sequence[torch.Tensor], base32: torch.Tensor
    ) -> torch.Tensor:
        """θ = θ_pre + Σ_t λ_t·τ̂_t (float32, flat) of one chunk; held-back positions
        are wrong until :meth:`finish` gives them. The result is a reused buffer."""
        n = base32.numel()
        hi, c, delta = self._hi[:n], self._c[:n], self._delta[:n]
        taus = [t.reshape(-1) for t in taus32]
        own: list[tuple[torch.Tensor, Status] | None] = []
        for t, (tab, flat) in enumerate(zip(self.tables, taus)):
            tab.for_chunk()
            out = delta if t == 0 else c
            torch.index_select(tab.lut, 0, _bins(flat, hi), out=out)
            idx = torch.isinf(out).nonzero().squeeze(1)
            out.mul_(flat)
            lam = self.lams[t]
            if lam != 1.0:
                out.mul_(lam)
            if idx.numel():
                st = self._exact(tab, flat.index_select(0, idx))
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
            at = torch.unique(torch.cat(fix))  # sorted
            if at.numel():
                self._settle(tag, at, taus, b, own, theta)
        return theta

    def _exact(self, tab: TaskTable, tu: torch.Tensor) -> Status:
        """(v, kept, pending, r) of a task's special entries ``tu`` (in position
        order). The subspace is the bin's, but in a boundary's bin the boundary's
        cursor tells the side (spending its tie quota in position order)."""
        a = tu.abs()
        bins = _bins(tu)
        ids = tab.sub.index_select(0, bins)
        ids += a < tab.cut.index_select(
            0, bins
        )  # below a boundary whose side is a plain compare
        for b, cur in tab.scans:  # a tie quota to spend in position order
            m = bins == b
            if bool(m.any()):
                ids[m] += ~cur.mask(a[m])
        wsel = torch.index_select(tab.weights, 0, ids)
        r = wsel * a
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
    "TaskTable",
    "combine",
    "fine_bracket",
    "fine_suffixes",
]
