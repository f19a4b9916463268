"""Dense, sort-based reference implementations of DESIGN §2 (the test oracle).

Written independently of npstune's streaming code: everything is flattened and
concatenated in sorted key order, ranks come from one stable sort.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def K(k: float, n: int) -> int:
    return min(n, math.ceil(Fraction(repr(k)) * n))


def flat(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1) for k in keys])


def unflat(
    vec: torch.Tensor, like: dict[str, torch.Tensor], keys: list[str]
) -> dict[str, torch.Tensor]:
    out, pos = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[pos : pos + n].reshape(like[k].shape)
        pos += n
    return out


def topk_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """Keep ⌈k·n⌉ largest; earlier position wins ties."""
    n = scores.numel()
    order = torch.sort(-scores.float(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[: K(k, n)]] = True
    return mask


def nps_prune(
    tau32: torch.Tensor, tau_v: torch.Tensor, k: float, w: list[float], M: int
):
    """(mask, reweighted values) of one flat task vector."""
    n = tau32.numel()
    order = torch.sort(-tau32.abs(), stable=True).indices
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    sub = torch.empty(n, dtype=torch.long)
    for m in range(1, M + 1):
        lo, hi = (m - 1) * n // M, m * n // M
        sub[(rank >= lo) & (rank < hi)] = m - 1
    wt = torch.tensor(w, dtype=torch.float32)
    rew = wt[sub] * tau32.abs()
    mask = topk_mask(rew, k)
    return mask, wt.to(tau_v.dtype)[sub] * tau_v


def deltas(base, fts, keys):
    """float32 and float64 flat task vectors (ranking uses float32)."""
    b = flat(base, keys)
    t32 = [flat(f, keys).float() - b.float() for f in fts]
    t64 = [flat(f, keys).double() - b.double() for f in fts]
    return b, t32, t64


def finish(b: torch.Tensor, delta64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cd = torch.float64 if dtype == torch.float32 else torch.float32
    return (b.to(cd) + delta64.to(cd)).to(dtype)


def ties_vector(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """TIES over one flat scope: elected = sign(Σ); a zero sum with a kept entry takes
    the majority sign sign(Σ elected) (reference TIES' resolve_zero_signs); disjoint
    mean."""
    st = torch.stack(trimmed)
    el = torch.sign(st.sum(0))
    majority = math.copysign(1.0, float(el.sum())) if float(el.sum()) else 0.0
    el[(st.sum(0) == 0) & (st != 0).any(0)] = majority
    out = torch.zeros(st.shape[1], dtype=st.dtype)
    for i in range(st.shape[1]):
        vals = [
            float(st[t, i])
            for t in range(st.shape[0])
            if st[t, i] != 0 and math.copysign(1, st[t, i]) == el[i]
        ]
        out[i] = sum(vals) / len(vals) if vals else 0.0
    return out
