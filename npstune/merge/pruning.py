"""Per-task pruners shared by the methods that "prune each τ_t, then add λ·Σ_t" (§8).

A pruner is prepared once (its global pass, if any) and then called chunk by chunk in
position order; it returns the keep-mask and the (rescaled / reweighted) values of that
chunk of τ_t. The kernels hand the masks on to the engine (:mod:`npstune.merge.masks`),
which counts them (a merge's exact ``kept`` and ``density``) and streams them to its
sink.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from npstune.merge.base import MergeInputs
from npstune.merge.masks import KernelOut
from npstune.sparsify import (
    Partition,
    ThresholdCursor,
    bernoulli_mask,
    check_weights,
    keep_count,
    partition,
    partitions,
    reweight,
    select_streams,
    topk_mask,
)
from npstune.sparsify.sketch import Sketch, sketch_thresholds
from npstune.taskvector import Chunk

logger = logging.getLogger(__name__)

#: maps a chunk of τ_t (any float dtype) to the values a pruner keeps of it
Values = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class Pruner:
    """Base pruner: keeps everything. Subclasses override :meth:`keep`.

    A global-scope pruner is stateful: it must see the chunks in position order (its
    threshold cursors spend their tie quotas in order). :meth:`state` and
    :meth:`restore` save and put back where it stands, so that a reader can revisit a
    position (:class:`~npstune.merge.preprune.PrunedPlan`)."""

    task: int

    def __call__(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep mask, values) of task ``self.task``'s part of ``chunk`` (flat)."""
        return self.mask_values(chunk)

    def mask_values(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        mask, values = self.keep(chunk)
        return mask, values(chunk.taus[self.task])

    def keep(self, chunk: Chunk) -> tuple[torch.Tensor, Values]:
        """The keep mask of task ``self.task``'s part of ``chunk`` and the map from τ
        to the values kept (the same map for τ in the compute dtype and in float32)."""
        tau = chunk.taus[self.task]
        return torch.ones_like(tau, dtype=torch.bool), _same

    @property
    def per_tensor(self) -> bool:
        """True when a mask needs the whole tensor in one chunk (per-tensor scope)."""
        return False

    def state(self) -> tuple[Any, ...]:
        """Where the pruner stands in position order (stateless pruners: ())."""
        return ()

    def restore(self, state: tuple[Any, ...]) -> None:
        """Put the pruner back where :meth:`state` found it."""


@dataclass
class MagnitudePruner(Pruner):
    """Top-k of |τ_t|, globally (one streaming threshold) or per tensor."""

    k: float = 0.05
    cursor: ThresholdCursor | None = None  # global scope

    @classmethod
    def prepare_all(
        cls, inputs: MergeInputs, k: float, scope: str, tasks: list[int] | None = None
    ) -> list[MagnitudePruner]:
        """One pruner per task (default: all), the global thresholds found in one joint
        two-pass select over every task vector."""
        ts = list(range(inputs.tasks)) if tasks is None else tasks
        pruners = [cls(task=t, k=k) for t in ts]
        if scope == "global":
            n = inputs.plan.n
            K = keep_count(k, n)
            for p, (th,) in zip(
                pruners, select_streams(inputs.joint_scores(ts), [[K]] * len(ts), n)
            ):
                p.cursor = th.cursor()
        return pruners

    def keep(self, chunk: Chunk) -> tuple[torch.Tensor, Values]:
        scores = chunk.taus32[self.task].abs()
        mask = self.cursor.mask(scores) if self.cursor else topk_mask(scores, self.k)
        return mask, _same

    @property
    def per_tensor(self) -> bool:
        return self.cursor is None

    def state(self) -> tuple[Any, ...]:
        return (self.cursor.snapshot(),) if self.cursor else ()

    def restore(self, state: tuple[Any, ...]) -> None:
        if self.cursor:
            self.cursor.restore(state[0])


@dataclass
class RandomPruner(Pruner):
    """DARE: keep with probability k (seeded), rescale kept values by 1/rescale.

    The draws are keyed by (seed, ``name`` — the task's identity, not its position in
    the plan —, key, fixed element block): each task gets its own mask, the same in a
    plan of its own as in a plan of many, whatever the read chunk size."""

    k: float = 0.1
    rescale: float = 0.1
    seed: int = 0
    name: str = ""

    def keep(self, chunk: Chunk) -> tuple[torch.Tensor, Values]:
        tau = chunk.taus[self.task]
        mask = bernoulli_mask(
            tau.numel(),
            self.k,
            seed=self.seed,
            task=self.name,
            key=chunk.key,
            start=chunk.start,
        ).to(tau.device)
        return mask, lambda t: t / self.rescale


@dataclass
class NpsPruner(Pruner):
    """NPS: rank partition into M subspaces, reweight by w,
    top-k of the reweighted |τ|."""

    k: float = 0.05
    weights: torch.Tensor = field(default_factory=lambda: torch.ones(8))
    subspaces: int = 8
    partition: Partition | None = None  # global scope
    cursors: tuple | None = None

    @classmethod
    def prepare_all(
        cls,
        inputs: MergeInputs,
        k: float,
        scope: str,
        rows: Sequence[Sequence[float]],
        subspaces: int,
        tasks: list[int] | None = None,
    ) -> list[NpsPruner]:
        """One pruner per task (weights ``rows[i]`` for ``tasks[i]``; default all
        tasks); global scope: the partitions and their sketches (a joint two-pass
        select over every task vector), kept for the next weights on the same
        checkpoints, then the reweighted thresholds (one pass,
        :func:`~npstune.sparsify.sketch.sketch_thresholds`): 3 passes for a first
        merge, 1 for each further one, whatever the task count."""
        ts = list(range(inputs.tasks)) if tasks is None else tasks
        ws = [check_weights(r, subspaces) for r in rows]
        pruners = [
            cls(task=t, k=k, weights=w, subspaces=subspaces) for t, w in zip(ts, ws)
        ]
        if scope == "global":
            n = inputs.plan.n
            scores = inputs.joint_scores(ts)
            sks = nps_sketches(inputs, ts, subspaces)
            parts = [sk.partition for sk in sks]

            def reweighted():
                pcs = [part.cursor() for part in parts]
                for step in scores():
                    yield tuple(
                        reweight(s, pc.ids(s), w) for w, pc, s in zip(ws, pcs, step)
                    )

            thresholds = sketch_thresholds(reweighted, sks, ws, keep_count(k, n))
            for p, part, thr in zip(pruners, parts, thresholds):
                p.partition = part
                p.cursors = (part.cursor(), thr.cursor())
        return pruners

    @property
    def per_tensor(self) -> bool:
        return self.cursors is None

    def state(self) -> tuple[Any, ...]:
        if self.cursors is None:
            return ()
        pcur, tcur = self.cursors
        return (*(c.snapshot() for c in pcur.cursors), tcur.snapshot())

    def restore(self, state: tuple[Any, ...]) -> None:
        if self.cursors is None:
            return
        pcur, tcur = self.cursors
        for c, st in zip((*pcur.cursors, tcur), state):
            c.restore(st)

    def keep(self, chunk: Chunk) -> tuple[torch.Tensor, Values]:
        scores = chunk.taus32[self.task].abs()
        if self.cursors is None:  # per-tensor scope: this chunk is the whole tensor
            n = scores.numel()
            part = partition(lambda: [scores], n, self.subspaces)
            ids = part.cursor().ids(scores)
            mask = topk_mask(reweight(scores, ids, self.weights), self.k)
        else:
            pcur, tcur = self.cursors
            ids = pcur.ids(scores)
            mask = tcur.mask(reweight(scores, ids, self.weights))
        return mask, lambda t: reweight(t, ids, self.weights)


#: The rank partitions and their sketches (:mod:`npstune.sparsify.sketch`) of the task
#: vectors last pruned by NPS in this process: they depend on τ alone, never on w, so a
#: search's candidates (and repeated merges of the same checkpoints) skip their two
#: passes. Keyed by every input file's path, size and modification time, the delta
#: keys, M and the device. Each holds M·32 Ki counters per task, whatever n is.
_SKETCHES: OrderedDict[tuple[Any, ...], list[Sketch]] = OrderedDict()
#: entries kept (each a few MiB per task vector): a streamed compression search keys
#: one entry per task, so fewer than its task count would recompute partitions on
#: every candidate
_SKETCHES_KEPT = 16


def nps_sketches(
    inputs: MergeInputs,
    tasks: Sequence[int],
    subspaces: int,
    fine: bool = False,
    store: Path | None = None,
) -> list[Sketch]:
    """The NPS partitions of ``tasks``' task vectors with their sketches, from the
    process's cache (:data:`_SKETCHES`), from ``store`` (a directory other processes
    share: a search's trials and its driver) or computed (two joint passes) and kept
    in both. ``fine``: with their fine histograms too (one more pass, the first
    time)."""
    from dataclasses import replace

    from npstune.sparsify.onepass import fine_pass

    key = _plan_fingerprint(inputs, tasks, subspaces)
    sks = _SKETCHES.get(key) if key else None
    if sks is None and key and store is not None:
        sks = _load_sketches(store, key)
    ts = list(tasks)
    computed = False
    if sks is None:
        parts = partitions(inputs.joint_scores(ts), inputs.plan.n, subspaces, len(ts))
        sks = [Sketch.of(p) for p in parts]
        computed = True
    if fine and any(sk.fine is None or sk.ends is None for sk in sks):
        got = fine_pass(
            inputs.joint_scores(ts)(),
            inputs.plan.n,
            [sk.partition.bounds for sk in sks],
        )
        sks = [replace(sk, fine=f, ends=e) for sk, (f, e) in zip(sks, got)]
        computed = True
    if key:
        _SKETCHES[key] = sks
        _SKETCHES.move_to_end(key)
        while len(_SKETCHES) > _SKETCHES_KEPT:
            _SKETCHES.popitem(last=False)
        if computed and store is not None:
            _save_sketches(store, key, sks)
    return sks


#: the format of a stored sketch file (:func:`_save_sketches`)
_STORE_VERSION = 2  # 2: the sketches' tie ends


def _store_file(store: Path, key: tuple[Any, ...]) -> Path:
    import hashlib

    return store / f"sketches-{hashlib.sha256(repr(key).encode()).hexdigest()[:24]}.pkl"


def _load_sketches(store: Path, key: tuple[Any, ...]) -> list[Sketch] | None:
    """The sketches ``store`` holds for ``key``, or None (absent, unreadable, another
    format or another key: then they are computed again)."""
    import pickle

    path = _store_file(store, key)
    try:
        with path.open("rb") as f:
            data = pickle.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except Exception as exc:  # a torn or foreign file: recompute, never fail a trial
        logger.warning("ignoring the unreadable sketch file %s: %s", path, exc)
        return None
    if (
        not isinstance(data, dict)
        or data.get("version") != _STORE_VERSION
        or data.get("key") != key
    ):
        return None
    return list(data["sketches"])


def _save_sketches(store: Path, key: tuple[Any, ...], sks: list[Sketch]) -> None:
    """Write ``sks`` for ``key`` into ``store`` atomically (a reader sees the old file
    or the new one); a store that cannot be written is skipped with a warning."""
    import os
    import pickle

    path = _store_file(store, key)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        store.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            pickle.dump(
                {"version": _STORE_VERSION, "key": key, "sketches": sks},
                f,
                protocol=pickle.HIGHEST_PROTOCOL,
            )
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not store the sketches in %s: %s", store, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _plan_fingerprint(
    inputs: MergeInputs, tasks: Sequence[int], subspaces: int
) -> tuple[Any, ...] | None:
    """What the partitions of ``tasks`` depend on, or None when it cannot be told
    (a derived plan such as a pruned one, an in-memory checkpoint)."""
    from npstune.taskvector import MergePlan

    plan = inputs.plan
    if type(plan) is not MergePlan:
        return None
    files = []
    for ck in (plan.base, *(plan.models[t] for t in tasks)):
        path = getattr(ck, "path", None)
        if path is None:
            return None
        p = Path(path)
        try:
            found = (
                [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
            )
            files.append(
                tuple(
                    (str(f), st.st_size, st.st_mtime_ns)
                    for f in found
                    for st in [f.stat()]
                )
            )
        except OSError:
            return None
    return (tuple(files), tuple(plan.delta_keys), subspaces, str(inputs.device))


@dataclass
class PruneAdd:
    """Context of prune-then-add methods: θ_pre + λ·Σ_t mask_t ⊙ values_t (one pruner
    per task, in plan order)."""

    pruners: Sequence[Pruner]
    lam: float


def prune_add_kernel(ctx: PruneAdd, chunk: Chunk) -> KernelOut:
    """Σ_t λ·mask_t ⊙ values_t for one chunk, with each task's mask."""
    total = torch.zeros_like(chunk.base_cd)
    masks = []
    for pr in ctx.pruners:
        mask, values = pr(chunk)
        total += torch.where(
            mask, values, torch.zeros((), dtype=values.dtype, device=values.device)
        )
        masks.append(mask)
    return KernelOut(ctx.lam * total, tuple(masks))
