"""NPS candidates streamed from the checkpoints: memory bounded by one model, not by
n·T·16 bytes (the ranked path's).

The ranked path (:class:`~npstune.search.objective.ObjectivePayload`) keeps every task
vector in rank order in RAM and ships it through Ray's object store: about 16 bytes
per entry per task plus 12 per entry for the base and the candidate buffers, and the
object store's copy beside it. That is the fastest candidate there is, and it is out of
reach for a 7B model. Here nothing per entry stays resident:

- the payload holds paths (workers open the checkpoints by path: on a cluster, shared
  storage) and the search space;
- per task, the NPS partition and its sketches (:mod:`npstune.sparsify.sketch`; M·32 Ki
  counters, and 2²⁰ for the one-pass build) are computed by the first candidate of the
  search, cached by the pruning module for the next ones and stored in the run's state
  directory (``state/sketches``), where the other trial processes, a resumed search and
  the driver's final report read them instead of passing over τ again;
- a candidate costs one streaming pass over τ that writes θ = θ_pre + Σ_t λ_t·τ̂_t key
  by key into one reused state in the base's dtypes, settling its top-k threshold from
  the few entries near it (:mod:`npstune.sparsify.onepass`); where too many values
  pile up at the threshold to hold them back (bf16 checkpoints at scale), a first
  pass over the special entries settles the thresholds exactly, and the pass then
  holds nothing back.

The arithmetic is the ranked path's (:func:`~npstune.sparsify.ranked.fuse`): τ̂_t in
float32, the first task's λ·τ̂ written, the others added with ``index_add_``, the sum
added to the float32 base and cast once. So both paths give the same state, bit for
bit, and a search picks the same best candidate on either.

:func:`choose_path` decides between them from a memory estimate, printed at the start.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from npstune.search.objective import BaseObjective, Payload
from npstune.search.space import Candidate

GIB = 1 << 30
#: the ranked path is taken when its estimate is at most this share of the memory
#: available at the start (the evaluator's model, Ray and the OS need the rest)
MEMORY_SHARE = 0.5


def ranked_bytes(n: int, tasks: int) -> int:
    """What the ranked path holds for ``tasks`` task vectors of ``n`` entries: per task
    int64 positions, τ in rank order and the negated magnitudes (16 B/entry), the
    float32 base and two candidate buffers (12 B/entry), and the object store's copy of
    the payload (16 B/entry/task + 4 B/entry) while Ray holds it."""
    return 2 * 16 * n * tasks + 16 * n


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class PathChoice:
    """Which candidate path a search takes, and the sentence saying why."""

    path: str  # "memory" (ranked) or "stream"
    reason: str


def choose_path(
    requested: str, n: int, tasks: int, available: int | None = None
) -> PathChoice:
    """``memory`` or ``stream`` for ``requested`` (``auto`` decides by the estimate)."""
    need = ranked_bytes(n, tasks)
    avail = available_bytes() if available is None else available
    have = "unknown" if avail is None else f"{avail / GIB:.1f} GiB"
    est = f"in memory needs about {need / GIB:.2f} GiB ({have} available)"
    if requested == "memory":
        return PathChoice("memory", f"ranked in memory, as asked; {est}")
    if requested == "stream":
        return PathChoice("stream", f"streamed from the checkpoints, as asked; {est}")
    if avail is None or need <= MEMORY_SHARE * avail:
        return PathChoice("memory", f"ranked in memory: {est}")
    return PathChoice(
        "stream",
        f"streamed from the checkpoints: {est}, more than {MEMORY_SHARE:.0%} of it",
    )


def writable_targets(evaluator: Any, plan: Any) -> dict[str, torch.Tensor] | None:
    """The evaluator's own tensors for the keys of ``plan`` (its ``targets()``), when
    it has one for every delta key, each of the key's shape and contiguous; else None
    (the candidate goes into a state of its own, which the evaluator copies). Copy keys
    it lacks stay the base's."""
    fn = getattr(evaluator, "targets", None)
    if not callable(fn):
        return None
    own = fn()
    out = {}
    for k in plan.keys:
        t = own.get(k)
        if t is None and k in plan.copy_keys:
            continue
        if t is None or tuple(t.shape) != tuple(plan.base.shape(k)):
            return None
        if not t.is_contiguous():
            return None
        out[k] = t
    return out


def build_candidate(
    plan: Any,
    state: dict[str, torch.Tensor],
    dtypes: dict[str, torch.dtype],
    subspaces: int,
    weights: Iterable[Iterable[float]],
    k: float,
    lams: Iterable[float],
    one_pass: bool = True,
    store: Path | None = None,
) -> str:
    """Write the NPS candidate θ_pre + Σ_t λ_t·τ̂_t of ``plan``'s models into
    ``state`` (every delta key; each chunk cast to ``dtypes[key]``, then to the
    state's tensor) and say how:

    - ``"one-pass"``: one pass over τ (:mod:`npstune.sparsify.onepass`), the few
      values at the threshold held back;
    - ``"settled"``: where the fine sketch says more than
      :data:`~npstune.sparsify.onepass.PENDING` might wait, a pass that settles the
      thresholds from the special entries alone (:func:`~npstune.sparsify.onepass.
      settle`), then the one pass, holding nothing back;
    - ``"two-pass"``: ``one_pass`` False (or a bracket too wide to settle): the
      pruners' thresholds, then θ.

    All give the same bits. ``store``: a directory where the partitions and
    sketches of these checkpoints are kept for other processes
    (:func:`~npstune.merge.pruning.nps_sketches`)."""
    from npstune.merge.base import MergeInputs
    from npstune.merge.pruning import nps_sketches

    job = _Job(
        plan, state, dtypes, subspaces, [list(r) for r in weights], k, list(lams)
    )
    # the sketches once, in this process's cache (and the store): both paths use them
    sks = nps_sketches(
        MergeInputs(plan), range(len(plan.models)), subspaces, one_pass, store
    )
    if one_pass:
        how = _one_pass(job, sks)
        if how:
            return how
    _two_pass(job)
    return "two-pass"


@dataclass(frozen=True)
class _Job:
    """One candidate to write: ``plan``'s models into ``state`` (cast per key to
    ``dtypes``), M subspaces, weight rows, k and a λ per task."""

    plan: Any
    state: dict[str, torch.Tensor]
    dtypes: dict[str, torch.dtype]
    M: int
    rows: list[list[float]]
    k: float
    lam: list[float]

    def write(self, key: str, at: slice | torch.Tensor, theta: torch.Tensor) -> None:
        """θ (float32) of ``key`` at ``at``, rounded as a loaded state is: the
        checkpoint's dtype first, then the target's."""
        flat = self.state[key].view(-1)
        if isinstance(at, torch.Tensor):
            at = at.to(flat.device)
        flat[at] = theta.to(self.dtypes[key]).to(device=flat.device, dtype=flat.dtype)


def _one_pass(job: _Job, sks: list[Any]) -> str:
    from npstune.sparsify import check_weights, keep_count, onepass

    plan, M = job.plan, job.M
    n = plan.n
    fines = [sk.fine for sk in sks]
    assert all(f is not None and sk.ends is not None for f, sk in zip(fines, sks))
    ws = [check_weights(r, M) for r in job.rows]
    K = keep_count(job.k, n)
    brackets = [onepass.fine_bracket(f, n, M, w, K) for f, w in zip(fines, ws)]
    tables = [
        onepass.TaskTable.build(sk.partition, sk.fine, sk.ends, w, lo, hi)
        for sk, w, (lo, hi, _) in zip(sks, ws, brackets)
    ]
    how = "one-pass"
    if sum(b[2] for b in brackets) > onepass.PENDING:  # too many to hold back
        taus = (
            (plan.read_chunk(key, start, stop).taus32, pos)
            for key, start, stop, pos in _spans(plan)
        )
        if not onepass.settle(tables, taus, K):
            return ""
        how = "settled"
    widest = max((stop - start for _, start, stop, _ in _spans(plan)), default=0)
    op = onepass.OnePass(tables, job.lam, K, widest)
    for key, start, stop, pos in _spans(plan):
        ch = plan.read_chunk(key, start, stop)
        b32 = ch.base_cd if ch.base_cd.dtype == torch.float32 else ch.base.float()
        theta = op.chunk((key, start), ch.taus32, b32.reshape(-1), pos)
        job.write(key, slice(start, stop), theta)
    for tag, offsets, theta in op.finish():
        key, start = tag  # type: ignore[misc]
        job.write(key, offsets + start, theta)
    return how


def _spans(plan: Any) -> Iterator[tuple[str, int, int, int]]:
    """``(key, start, stop, stream position of start)`` of every read chunk, keys in
    the plan's order: the positions the sketches' tie ends count in."""
    at = 0
    for key in plan.delta_keys:
        for start, stop in plan.chunks(key):
            yield key, start, stop, at + start
        at += plan.numel[key]


def _two_pass(job: _Job) -> None:
    from npstune.merge.base import MergeInputs
    from npstune.merge.pruning import NpsPruner

    plan, lam = job.plan, job.lam
    pruners = NpsPruner.prepare_all(MergeInputs(plan), job.k, "global", job.rows, job.M)
    for key in plan.delta_keys:
        for start, stop in plan.chunks(key):
            ch = plan.read_chunk(key, start, stop)
            delta = torch.zeros(stop - start, dtype=torch.float32)
            for t, pr in enumerate(pruners):
                mask, values = pr.keep(ch)
                keep = mask.reshape(-1)
                v = values(ch.taus32[t]).reshape(-1)[keep]
                if t == 0:  # as fuse: the first task written, the others added
                    delta[keep] = v if lam[t] == 1.0 else v * lam[t]
                else:
                    idx = keep.nonzero().squeeze(1)
                    delta.index_add_(0, idx, v, alpha=lam[t])
            # a new tensor: the base as read may be the checkpoint's own buffer
            theta = torch.add(ch.base.reshape(-1).float(), delta)
            job.write(key, slice(start, stop), theta)


@dataclass(kw_only=True)
class StreamPayload(Payload):
    """The NPS search without per-entry state: paths and the space only."""

    frozen: int = 0
    #: where the trials and the driver share the partitions and sketches (the run's
    #: state directory): computed by the first candidate of one process, read by the
    #: others, a resumed search and the final report ("" keeps them per process)
    sketch_dir: str = ""

    def objective(self) -> StreamObjective:
        return StreamObjective(self)


class StreamObjective(BaseObjective):
    """NPS candidates built by streaming τ from the checkpoints (module docstring)."""

    p: StreamPayload

    def __init__(self, payload: StreamPayload) -> None:
        from npstune.errors import CheckpointError
        from npstune.taskvector import plan_merge

        super().__init__(payload)
        try:
            self.plan = plan_merge(payload.base_path, payload.model_paths)
        except CheckpointError as exc:  # a node of a cluster without the storage
            raise CheckpointError(
                f"{exc}; a streamed search opens the checkpoints by path on every "
                "node: they must be on storage each node sees at the same path"
            ) from None
        # one plan per task vector for the states of one task (compression), so that
        # a candidate reads only that task's checkpoint; each keeps the full plan's
        # keys (a key one model leaves unchanged is still in scope: the ranked path's
        # n and partition)
        self._single = [replace(self.plan, models=[m]) for m in self.plan.models]
        base = self.plan.base
        self._dtypes = {k: base.dtype(k) for k in self.plan.keys}
        #: build candidates in one pass where it can (tests force the two-pass one)
        self.one_pass = True
        #: candidates built per way (:func:`build_candidate`'s answer)
        self.builds: dict[str, int] = {}
        targets = writable_targets(self.p.get_evaluator(), self.plan)
        #: candidates are written into the evaluator's own model (one model per
        #: trial), not into a state of their own that the evaluator then copies
        self.in_place = targets is not None
        if targets is not None:
            self._state = targets
            for k in self.plan.copy_keys:  # once: no candidate changes them
                t = targets.get(k)
                if t is None:  # not the module's (a buffer it does not persist)
                    self._state[k] = base[k]
                else:
                    t.copy_(base[k].to(device=t.device, dtype=t.dtype))
        else:
            self._state = {
                k: torch.empty(base.shape(k), dtype=base.dtype(k))
                for k in self.plan.delta_keys
            }
            for k in self.plan.copy_keys:
                self._state[k] = base[k]

    def build(
        self,
        plan: Any,
        weights: Iterable[Iterable[float]],
        k: float,
        lams: Iterable[float],
    ) -> dict[str, torch.Tensor]:
        """θ_pre + Σ_t λ_t·τ̂_t over ``plan``'s models into the reused state (use it
        before asking for the next)."""
        how = build_candidate(
            plan,
            self._state,
            self._dtypes,
            self.space.nps.subspaces,
            weights,
            k,
            lams,
            one_pass=self.one_pass,
            store=Path(self.p.sketch_dir) if self.p.sketch_dir else None,
        )
        self.builds[how] = self.builds.get(how, 0) + 1
        return dict(self._state)

    def states(
        self, cand: Candidate
    ) -> Iterable[tuple[list[str], dict[str, torch.Tensor]]]:
        if self.use.per_vector_states:
            for t, task in enumerate(self.p.vector_tasks):
                yield (
                    [task],
                    self.build(
                        self._single[t], [cand.weights[t]], cand.k, [cand.lam[t]]
                    ),
                )
        else:
            yield (
                self.p.eval_tasks,
                self.build(self.plan, cand.weights, cand.k, cand.lam),
            )

    def bits(self, cand: Any) -> int:
        from npstune.search.objective import nps_bits

        k = cand.k if isinstance(cand, Candidate) else cand
        return nps_bits(len(self.p.model_paths), self.p.n, k)


__all__ = [
    "PathChoice",
    "StreamObjective",
    "StreamPayload",
    "available_bytes",
    "build_candidate",
    "choose_path",
    "ranked_bytes",
    "writable_targets",
]
