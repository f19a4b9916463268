"""Pruning before any merge: ``--prune nps|magnitude|dare`` in front of a method.

The paper's claim is that pruning τ is the preprocessing every merge depends on. Here a
pruning method (``nps``, ``magnitude`` or ``dare`` — DAREx's rescaling with ``q``) is
prepared on the plan as it would be for its own merge, and then *replaces each task
vector by its pruned one*: τ̂_t = mask_t ⊙ values_t (NPS: the reweighted τ', DARE: τ/q,
magnitude: τ). Any method that reads task vectors from the plan — TA, TIES, TSV-M,
Iso-CTS, WUDI, PCB, EMR … — then merges τ̂_t instead of τ_t, unchanged. The pruner's own
λ is 1: the merge that follows does the scaling.

:class:`PrunedPlan` is a :class:`~npstune.taskvector.MergePlan` whose reads are pruned.
Memory stays per chunk: a global-scope pruner's threshold cursors must see the entries
in position order, so the plan saves where they stand at the end of every read and
puts them back when a later read starts there (a method's passes re-read the plan from
the start; a read elsewhere first walks the entries in between). A per-tensor-scope
pruner needs whole tensors: the plan prunes one whole tensor and serves slices of it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from npstune import taskvector
from npstune.errors import ConfigError
from npstune.merge.base import MergeInputs, MergeSpec, MethodParams
from npstune.merge.pruning import Pruner
from npstune.taskvector import Chunk, MergePlan

#: ``--prune`` name -> the registered pruning method it prepares (``dare`` takes
#: DAREx's ``q``; without it q = k, plain DARE)
PRUNE_METHODS: dict[str, str] = {
    "nps": "nps",
    "magnitude": "magnitude",
    "dare": "darex",
}


def prune_names() -> list[str]:
    """The valid ``--prune`` names."""
    return list(PRUNE_METHODS)


@dataclass(frozen=True)
class Prune:
    """A pruning step in front of a merge: ``Prune("nps", {"k": 0.1, "weights": w})``.

    ``params`` are the pruning method's own (k, scope, subspaces, weights for nps;
    k, scope for magnitude; k, seed, q for dare), validated against its declaration;
    its λ is not one of them (the merge that follows scales)."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> MergeSpec[Any]:
        from npstune.merge.registry import get_method

        if self.method not in PRUNE_METHODS:
            raise ConfigError(
                f"prune: unknown pruning {self.method!r}; valid: "
                f"{', '.join(PRUNE_METHODS)}"
            )
        return get_method(PRUNE_METHODS[self.method])

    def names(self) -> list[str]:
        """The parameters this pruning takes (its method's, less λ)."""
        return [n for n in self.spec.params.model_fields if n != "lam"]

    def resolved(self) -> MethodParams:
        """The pruning method's validated params, λ = 1 (ConfigError on bad input)."""
        spec = self.spec
        if "lam" in self.params:
            raise ConfigError(
                f"prune {self.method}: lam is not a pruning parameter (the merge that "
                "follows scales); valid: " + ", ".join(self.names())
            )
        unknown = sorted(set(self.params) - set(self.names()))
        if unknown:
            raise ConfigError(
                f"prune {self.method}: {unknown[0]!r} is not one of its parameters; "
                "valid: " + ", ".join(self.names())
            )
        return spec.make_params({**self.params, "lam": 1.0})

    def describe(self) -> dict[str, Any]:
        """``{"method", "params"}`` of this pruning (for a merge's metadata)."""
        params = self.resolved().model_dump()
        params.pop("lam", None)
        return {"method": self.method, "params": params}


def as_prune(value: Prune | tuple[str, Mapping[str, Any]] | str | None) -> Prune | None:
    """A :class:`Prune` from a name, ``(name, params)`` or a Prune (None stays None)."""
    if value is None or isinstance(value, Prune):
        return value
    if isinstance(value, str):
        return Prune(value)
    name, params = value
    return Prune(name, dict(params))


def check_prunable(spec: MergeSpec[Any]) -> None:
    """Refuse methods whose inputs are not task vectors read from the plan."""
    if spec.needs_data:
        raise ConfigError(
            f"--prune: {spec.name} merges from the fine-tuned models' own statistics, "
            "not from their task vectors; prune before a task-vector method instead"
        )


class PrunedPlan(MergePlan):
    """A plan whose every read returns the pruned task vectors τ̂_t (see module doc).

    Build with :func:`pruned_plan`. ``raw`` is the plan underneath; ``kept`` counts the
    entries each task keeps (filled as the merge reads)."""

    raw: MergePlan
    pruners: Sequence[Pruner]
    prune: Prune

    def setup(self, raw: MergePlan, prune: Prune, device: str | torch.device) -> None:
        p = prune.resolved()
        ctx = prune.spec.prepare(MergeInputs(raw, device), p)
        self.raw, self.prune, self.pruners = raw, prune, list(ctx.pruners)
        self._per_tensor = any(pr.per_tensor for pr in self.pruners)
        self._offsets: dict[str, int] = {}
        pos = 0
        for key in self.delta_keys:  # position order: sorted keys, then row-major
            self._offsets[key] = pos
            pos += self.numel[key]
        self._starts = list(self._offsets.values())
        self._order = list(self._offsets)
        self._states: dict[int, list[tuple[Any, ...]]] = {
            0: [pr.state() for pr in self.pruners]
        }
        self._known = [0]
        self._whole: tuple[tuple[str, str], Chunk] | None = None
        self._kept: list[dict[str, dict[tuple[int, int], int]]] = [
            {} for _ in self.pruners
        ]

    # ------------------------------------------------------------------ reads
    def read_chunk(
        self,
        key: str,
        start: int = 0,
        stop: int | None = None,
        device: str | torch.device = "cpu",
        lean: bool = False,
    ) -> Chunk:
        """Elements ``[start, stop)`` of ``key`` with every τ_t pruned (``lean``
        applies to the keys with nothing to prune: pruned τ_t are made once)."""
        if key not in self._offsets:  # a copied key: nothing to prune
            return self.raw.read_chunk(key, start, stop, device, lean)
        n = self.numel[key]
        stop = n if stop is None else stop
        if self._per_tensor:
            where = (key, str(device))
            if self._whole is None or self._whole[0] != where:
                self._whole = (
                    where,
                    self._pruned(self.raw.read_chunk(key, 0, n, device)),
                )
            full = self._whole[1]
            return full if (start, stop) == (0, n) else full.slice(start, stop)
        self._seek(self._offsets[key] + start, device)
        out = self._pruned(self.raw.read_chunk(key, start, stop, device))
        self._save(self._offsets[key] + stop)
        return out

    def joint_score_chunks(
        self,
        tasks: Sequence[int],
        keys: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """|τ̂_t| (float32, flat) per chunk, in position order."""
        for key in self.delta_keys if keys is None else keys:
            for start, stop in self.chunks(key):
                c = self.read_chunk(key, start, stop, device)
                yield tuple(c.taus32[t].abs() for t in tasks)

    def task_vectors(self) -> list[Any]:
        raise ConfigError(
            "a pruned plan is read chunk by chunk (read_chunk); it has no whole "
            "task vectors"
        )

    # --------------------------------------------------------------- pruning
    def _pruned(self, raw: Chunk) -> Chunk:
        taus, taus32 = [], []
        for t, pr in enumerate(self.pruners):
            mask, values = pr.keep(raw)
            tau, tau32 = raw.taus[t], raw.taus32[t]
            v = torch.where(mask, values(tau), torch.zeros((), dtype=tau.dtype))
            v32 = (
                v
                if tau32 is tau
                else torch.where(
                    mask, values(tau32), torch.zeros((), dtype=tau32.dtype)
                )
            )
            taus.append(v)
            taus32.append(v32)
            self._kept[t].setdefault(raw.key, {})[(raw.start, raw.stop)] = int(
                torch.count_nonzero(mask)
            )
        return Chunk(raw.key, raw.start, raw.shape, raw.base, raw.base_cd, taus, taus32)

    def _save(self, pos: int) -> None:
        if pos not in self._states:
            bisect.insort(self._known, pos)
        self._states[pos] = [pr.state() for pr in self.pruners]

    def _restore(self, pos: int) -> None:
        for pr, st in zip(self.pruners, self._states[pos]):
            pr.restore(st)

    def _seek(self, pos: int, device: str | torch.device) -> None:
        """Put the pruners where they stand at global position ``pos``, walking the
        entries from the last saved position before it when it was never reached."""
        at = self._known[bisect.bisect_right(self._known, pos) - 1]
        self._restore(at)
        while at < pos:
            i = bisect.bisect_right(self._starts, at) - 1
            key, off = self._order[i], self._starts[i]
            s = at - off
            step = taskvector.CHUNK
            e = min((s // step + 1) * step, self.numel[key], pos - off)
            raw = self.raw.read_chunk(key, s, e, device)
            for pr in self.pruners:
                pr.keep(raw)
            at = off + e
            self._save(at)

    # --------------------------------------------------------------- report
    def kept(self) -> list[int]:
        """Entries each task's pruning kept, over the tensors read so far."""
        out = []
        for per_key in self._kept:
            total = 0
            for key, parts in per_key.items():
                whole = parts.get((0, self.numel[key]))
                total += whole if whole is not None else sum(parts.values())
            out.append(total)
        return out

    def report(self) -> dict[str, Any]:
        """The pruning step for a merge's metadata: method, params, kept, density."""
        kept = self.kept()
        return {
            **self.prune.describe(),
            "kept": kept,
            "density": [k / self.n if self.n else 0.0 for k in kept],
        }


def pruned_plan(
    plan: MergePlan, prune: Prune, device: str | torch.device = "cpu"
) -> PrunedPlan:
    """``plan`` with every task vector pruned by ``prune`` (its global passes run
    now)."""
    if isinstance(plan, PrunedPlan):
        raise ConfigError("prune: the plan is already pruned")
    out = PrunedPlan(**{f.name: getattr(plan, f.name) for f in fields(plan)})
    out.setup(plan, prune, device)
    return out
