"""Exact order statistics of float64 streams without concatenating them (PCB's pass).

``order_stats(rows, ranks, n)`` returns, for each stream, the values at the given
0-based ranks of its ascending sort, reading ``rows()`` (one list of chunks per step,
one chunk per stream) a few times. Small inputs are sorted in memory. Otherwise a radix
select runs over the float64 bit patterns mapped to int64 keys whose signed order is the
values' order: each pass histograms one 16-bit digit (64 Ki counters per stream and
prefix) among the keys that share the digits found so far; once every statistic has at
most ``COLLECT`` candidates left, one more pass gathers them and a sort finishes. So the
result equals ``torch.sort(torch.cat(chunks)).values[rank]`` exactly, with memory
independent of the stream length. NaN is not allowed; -0.0 sorts just below +0.0.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

import torch

#: values per stream up to which one in-memory sort is used
IN_MEMORY = 1 << 22
#: candidates per statistic below which the radix passes stop and sort them
COLLECT = 1 << 20
_M63 = (1 << 63) - 1
_DIGITS = 1 << 16

Rows = Callable[[], Iterable[list[torch.Tensor]]]


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """float64 -> int64 keys whose signed order is the values' order."""
    b = x.to(torch.float64).contiguous().reshape(-1).view(torch.int64)
    return b ^ ((b >> 63) & _M63)


def _value(key: int) -> float:
    """The float64 whose :func:`_ordered` key is ``key``."""
    return struct.unpack("<d", struct.pack("<q", key ^ ((key >> 63) & _M63)))[0]


def _sorted(rows: Rows, ranks: list[list[int]]) -> list[list[float]]:
    cols: list[list[torch.Tensor]] = [[] for _ in ranks]
    for step in rows():
        for i, x in enumerate(step):
            cols[i].append(x.reshape(-1).to(torch.float64))
    srt = [torch.sort(torch.cat(c)).values for c in cols]
    return [[float(s[r]) for r in rs] for s, rs in zip(srt, ranks)]


def order_stats(
    rows: Rows, ranks: list[list[int]], n: int, in_memory: bool | None = None
) -> list[list[float]]:
    """Values at 0-based ``ranks[s]`` of stream ``s`` sorted ascending (``n`` values
    per stream; ``in_memory`` forces or forbids the one-sort path; by default it is
    taken when n ≤ ``IN_MEMORY``)."""
    if n <= IN_MEMORY if in_memory is None else in_memory:
        return _sorted(rows, ranks)
    # per statistic: (the key's digits found so far, its rank among keys sharing them)
    tgt = [[(0, r) for r in rs] for rs in ranks]
    for level in range(4):
        shift, width = 48 - 16 * level, 16 * level  # digit position, prefix bits
        hist = [
            {pf: torch.zeros(_DIGITS, dtype=torch.int64) for pf, _ in row}
            for row in tgt
        ]
        for step in rows():
            for i, x in enumerate(step):
                u = _ordered(x)
                for prefix in hist[i]:  # statistics with one prefix share a histogram
                    if level == 0:
                        dig = (u >> shift) + (_DIGITS >> 1)  # signed top -> 0..65535
                    else:
                        dig = (u[(u >> (64 - width)) == prefix] >> shift) & 0xFFFF
                    hist[i][prefix] += torch.bincount(dig, minlength=_DIGITS).cpu()
        most = 0
        counts = [[0] * len(row) for row in tgt]  # keys left per statistic
        for i, row in enumerate(tgt):
            cums = {pf: h.cumsum(0) for pf, h in hist[i].items()}
            for j, (prefix, r) in enumerate(row):
                cum = cums[prefix]
                b = int(torch.searchsorted(cum, torch.tensor(r), right=True))
                below = int(cum[b - 1]) if b else 0
                key = (prefix << 16) | b if level else b - (_DIGITS >> 1)
                row[j] = (key, r - below)
                counts[i][j] = int(hist[i][prefix][b])
                most = max(most, counts[i][j])
        if level == 3:
            return [[_value(key) for key, _ in row] for row in tgt]
        if most <= COLLECT:
            break
    width = 16 * (level + 1)
    # the candidates go into buffers sized from the histograms before the pass: kept
    # chunks of every size, allocated between the pass's big temporaries, would
    # fragment the heap (peak RSS grew with the stream's length, 4.9 GB at 438M)
    cand = [[torch.empty(c, dtype=torch.int64) for c in cs] for cs in counts]
    filled = [[0] * len(row) for row in tgt]
    for step in rows():
        for i, x in enumerate(step):
            u = _ordered(x)
            for j, (prefix, _) in enumerate(tgt[i]):
                got = u[(u >> (64 - width)) == prefix].cpu()
                cand[i][j][filled[i][j] : filled[i][j] + got.numel()] = got
                filled[i][j] += got.numel()
    return [
        [_value(int(torch.sort(c).values[r])) for c, (_, r) in zip(cs, row)]
        for cs, row in zip(cand, tgt)
    ]
