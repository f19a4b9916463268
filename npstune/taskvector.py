"""Task vectors: τ_t = θ_t − θ_pre, per tensor, read lazily.

:func:`plan_merge` checks keys, shapes and dtypes across all checkpoints before any
arithmetic (DESIGN §1): only floating tensors present in every checkpoint with equal
shapes take part; integer buffers are copied from the base; a key in one checkpoint
only, a shape mismatch or a float/non-float clash is an error naming the file and key,
unless the user gave an include/exclude filter (then keys outside it are copied from the
base).

Numerics. Magnitudes used for ranking are float32 (``|fl32(θ_t) − fl32(θ_pre)|``) for
every checkpoint dtype. Values added back to the base are computed in
:func:`compute_dtype` (float64 for fp32 checkpoints, so θ_pre + 1·τ reproduces θ_t bit
for bit; float32 for fp16/bf16, where the same holds) and cast to the base's dtype at
the end.

LoRA adapters. A model that is a PEFT adapter
(:class:`~npstune.checkpoints.adapter.AdapterCheckpoint`, bound to the plan's base by
:func:`plan_merge`) gives its task vector exactly: τ = ``model.delta(...)`` (B·A·scale
computed in float64 from the adapter's tensors), not θ_ft rounded to the base's dtype
minus θ_pre. Keys it does not update have τ = 0 and count as frozen like bitwise-equal
tensors.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

import torch

from npstune.checkpoints import AdapterCheckpoint, LazyCheckpoint, open_checkpoint
from npstune.errors import CheckpointError, ConfigError, ShapeMismatchError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Elements per chunk when a pass walks a tensor (bounds temporaries to tens of MB).
CHUNK = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which values for a tensor of ``dtype`` are combined."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN or Inf. One ``aminmax`` (NaN propagates to both
    ends, ±Inf shows at one): ~30× cheaper than ``isfinite(t).all()`` on CPU."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _raise_not_finite(
    key: str,
    read: Sequence[tuple[LazyCheckpoint, torch.Tensor]],
    model: LazyCheckpoint,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Raise for a task-vector chunk that is not finite: name the checkpoint holding
    NaN/Inf (``read``: (checkpoint, its chunk) pairs), else say the difference
    overflows."""
    for ck, x in read:
        if not all_finite(x):
            raise CheckpointError(f"{ck.path}:{key}: tensor holds NaN or Inf")
    raise CheckpointError(f"{model.path}:{key}: task vector overflows {dtype}")


def _matches(key: str, patterns: Sequence[str] | None) -> bool:
    return bool(patterns) and any(fnmatch.fnmatchcase(key, p) for p in patterns or ())


@dataclass
class MergePlan:
    """Which keys are merged (``delta_keys``) and which are copied from the base."""

    base: LazyCheckpoint
    models: list[LazyCheckpoint]
    delta_keys: list[str]
    copy_keys: list[str]
    filtered: bool = False
    numel: dict[str, int] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        """Every key of the output, in sorted (position) order."""
        return sorted(self.delta_keys + self.copy_keys)

    @property
    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Output shape and dtype per key (the base's)."""
        return {k: (self.base.shape(k), self.base.dtype(k)) for k in self.keys}

    @property
    def task_names(self) -> list[str]:
        """Each model's task NAME, its identity (its file stem or directory name, as
        DESIGN §8 says), in model order; a name given twice gets ``#2``, ``#3`` … on its
        later occurrences so that the names stay unique."""
        seen: dict[str, int] = {}
        out = []
        for m in self.models:
            seen[m.name] = seen.get(m.name, 0) + 1
            out.append(m.name if seen[m.name] == 1 else f"{m.name}#{seen[m.name]}")
        return out

    @property
    def n(self) -> int:
        """Entries in scope of a task vector (all delta keys)."""
        return sum(self.numel[k] for k in self.delta_keys)

    def read_chunk(
        self,
        key: str,
        start: int = 0,
        stop: int | None = None,
        device: str | torch.device = "cpu",
        lean: bool = False,
    ) -> Chunk:
        """Read ``[start, stop)`` of ``key`` from the base and every model,
        once each.

        ``lean``: keep the models' reads instead of T ready task vectors in two dtypes;
        ``taus`` and ``taus32`` are then :class:`FreshTaus`, each τ_t made (with the
        same bits) when it is asked for. For kernels that consume τ_t one at a time (the
        SVD merges, WUDI): an fp32 key's chunk holds 12 + 4·T bytes per entry instead
        of 12 + 12·T. NaN/Inf is checked in the reads (so a τ that overflows float32
        is not refused here); a plan with LoRA adapter models reads as usual."""
        b = self.base.read(key, start, stop).to(device)
        cd = compute_dtype(b.dtype)
        b32 = b.float()
        bcd = b32 if cd == torch.float32 else b.to(cd)
        if lean and not any(self._adapter(m) is not None for m in self.models):
            reads, base_ok = [], all_finite(b)
            for m in self.models:
                f = m.read(key, start, stop).to(device)
                if not (base_ok and all_finite(f)):
                    _raise_not_finite(key, ((m, f), (self.base, b)), m)
                reads.append(f)
            shape = self.base.shape(key)
            return Chunk(
                key, start, shape, b, bcd, FreshTaus(reads, bcd), FreshTaus(reads, b32)
            )
        taus, taus32 = [], []
        for m in self.models:
            ad = self._adapter(m)
            if ad is not None:  # a LoRA adapter: τ exactly, not rounded through θ_ft
                d = ad.delta(key, start, start + b.numel(), cd).to(device)
                taus32.append(d if cd == torch.float32 else d.float())
                taus.append(d)
                continue
            f = m.read(key, start, stop).to(device)
            t32 = self._delta32(key, m, f, b, b32)
            taus32.append(t32)
            taus.append(t32 if cd == torch.float32 else f.to(cd) - bcd)
        return Chunk(key, start, self.base.shape(key), b, bcd, taus, taus32)

    def _adapter(self, m: LazyCheckpoint) -> AdapterCheckpoint | None:
        """``m`` when it is an adapter over this plan's base (τ from its factors)."""
        return m if isinstance(m, AdapterCheckpoint) and m.is_over(self.base) else None

    def joint_score_chunks(
        self,
        tasks: Sequence[int],
        keys: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """One tuple (|τ_t| for t in ``tasks``, float32, flat) per chunk, in position
        order: the base is read once per chunk for all the tasks."""
        for key in self.delta_keys if keys is None else keys:
            for start, stop in self.chunks(key):
                b = self.base.read(key, start, stop).to(device)
                b32 = b.float()
                yield tuple(
                    self._score(key, self.models[t], start, stop, b, b32, device)
                    for t in tasks
                )

    def _score(
        self,
        key: str,
        m: LazyCheckpoint,
        start: int,
        stop: int,
        b: torch.Tensor,
        b32: torch.Tensor,
        device: str | torch.device,
    ) -> torch.Tensor:
        """|τ| of one model's chunk in float32 (an adapter's exactly)."""
        ad = self._adapter(m)
        if ad is not None:
            return ad.delta(key, start, stop, torch.float32).to(device).abs_()
        return self._delta32(key, m, m.read(key, start, stop).to(device), b, b32).abs_()

    def _delta32(
        self,
        key: str,
        model: LazyCheckpoint,
        f: torch.Tensor,
        b: torch.Tensor,
        b32: torch.Tensor,
    ) -> torch.Tensor:
        """fl32(θ_t) − fl32(θ_pre) for one chunk (``f``, ``b`` as read; ``b32`` =
        b.float()), refusing NaN/Inf with the checkpoint that holds it."""
        d = f.float() - b32
        if not all_finite(d):
            _raise_not_finite(key, ((model, f), (self.base, b)), model)
        return d

    def task_vectors(self) -> list[TaskVector]:
        """One lazy task vector per model, in the order the models were given."""
        return [TaskVector(self.base, m, self.delta_keys) for m in self.models]

    def chunks(self, key: str, chunk: int | None = None) -> Iterator[tuple[int, int]]:
        """Row-major element ranges ``[start, stop)`` covering ``key``
        (``CHUNK`` each)."""
        chunk = chunk or CHUNK
        n = self.numel[key]
        if n == 0:
            return
        for start in range(0, n, chunk):
            yield start, min(start + chunk, n)


class FreshTaus(Sequence[torch.Tensor]):
    """The τ_t of one chunk, each made when it is asked for from the models' reads:
    ``read_t.to(dtype) − base`` (``base`` in ``dtype``), the expression of a full read,
    so the same bits. Every access gives a new tensor that the caller may change;
    nothing is cached."""

    def __init__(self, reads: list[torch.Tensor], base: torch.Tensor):
        self.reads = reads
        self.base = base

    def __len__(self) -> int:
        return len(self.reads)

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, i: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.reads[i].to(self.base.dtype) - self.base


@dataclass
class Chunk:
    """One row-major element range of one key, read from every checkpoint.

    ``base`` is in the checkpoint's dtype, ``base_cd`` and ``taus`` in the compute
    dtype, ``taus32`` in float32 (the values every ranking uses; ``abs()`` gives the
    scores).
    """

    key: str
    start: int
    shape: tuple[int, ...]
    base: torch.Tensor
    base_cd: torch.Tensor
    #: lists, or :class:`FreshTaus` from a lean read
    taus: Sequence[torch.Tensor]
    taus32: Sequence[torch.Tensor]

    @property
    def stop(self) -> int:
        return self.start + self.base.numel()

    def slice(self, lo: int, hi: int) -> Chunk:
        """Elements ``[lo, hi)`` of this chunk (relative offsets; views, no copies)."""
        return Chunk(
            self.key,
            self.start + lo,
            self.shape,
            self.base[lo:hi],
            self.base_cd[lo:hi],
            [t[lo:hi] for t in self.taus],
            [t[lo:hi] for t in self.taus32],
        )


def plan_merge(
    base: LazyCheckpoint | str,
    models: Sequence[LazyCheckpoint | str],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    frozen: bool = True,
) -> MergePlan:
    """Check every checkpoint against the base and decide each key's role.

    Args:
        base: the pretrained checkpoint (θ_pre).
        models: fine-tuned checkpoints (θ_t), at least one.
        include: glob patterns of keys that take part (default: all).
        exclude: glob patterns of keys that don't (copied from the base).
        frozen: detect frozen tensors (bitwise equal in the base and every model, e.g.
            embeddings frozen during fine-tuning): they are copied from the base and do
            not count in ``n``, the entries a keep ratio refers to (DESIGN §3, §7).
    """
    base = base if isinstance(base, LazyCheckpoint) else open_checkpoint(base)
    cks = [_open_model(m, base) for m in models]
    if not cks:
        raise ConfigError("no models given: pass at least one fine-tuned checkpoint")
    filtered = bool(include) or bool(exclude)
    base_keys = set(base.keys())
    if not filtered:
        for m in cks:
            mk = set(m.keys())
            if mk != base_keys:
                only_m = sorted(mk - base_keys)
                only_b = sorted(base_keys - mk)
                if only_m:
                    raise CheckpointError(
                        f"{m.path}:{only_m[0]}: key not in base {base.path} "
                        f"({len(only_m)} such keys; pass --exclude to skip them)"
                    )
                raise CheckpointError(
                    f"{m.path}:{only_b[0]}: key missing (present in base {base.path}; "
                    f"{len(only_b)} such keys; pass --exclude to skip them)"
                )
    delta_keys: list[str] = []
    copy_keys: list[str] = []
    numel: dict[str, int] = {}
    mergeable = 0
    for key in sorted(base_keys):
        numel[key] = base.numel(key)
        in_scope = (not include or _matches(key, include)) and not _matches(
            key, exclude
        )
        bdt = base.dtype(key)
        if not in_scope:
            copy_keys.append(key)
            continue
        for m in cks:
            if key not in m:
                raise CheckpointError(
                    f"{m.path}:{key}: key missing (present in base {base.path})"
                )
            if m.shape(key) != base.shape(key):
                raise ShapeMismatchError(
                    f"{m.path}:{key}: shape {tuple(m.shape(key))} does not match base "
                    f"{base.path} shape {tuple(base.shape(key))}"
                )
            if (m.dtype(key) in FLOAT_DTYPES) != (bdt in FLOAT_DTYPES):
                raise CheckpointError(
                    f"{m.path}:{key}: dtype {m.dtype(key)} vs base dtype {bdt}: "
                    "a float tensor cannot be merged with a non-float one"
                )
        mergeable += bdt in FLOAT_DTYPES
        if bdt not in FLOAT_DTYPES or (frozen and _is_frozen(key, base, cks)):
            copy_keys.append(key)
        else:
            delta_keys.append(key)
    if not mergeable:
        raise ConfigError(
            f"{base.path}: no floating tensors to merge (check --include/--exclude)"
        )
    return MergePlan(base, cks, delta_keys, copy_keys, filtered, numel)


def _open_model(m: LazyCheckpoint | str, base: LazyCheckpoint) -> LazyCheckpoint:
    """Open a model path; bind an adapter to ``base`` (its shapes are checked now)."""
    if isinstance(m, AdapterCheckpoint):
        return m.with_base(base)
    if isinstance(m, LazyCheckpoint):
        return m
    return open_checkpoint(m, base=base)


_PROBE = 4096


def _is_frozen(
    key: str, base: LazyCheckpoint, models: Sequence[LazyCheckpoint]
) -> bool:
    """True when every model holds exactly the base's tensor (probe first, then chunks).

    An adapter over ``base`` answers for itself: untouched keys and zero B·A are
    unchanged, so they need no read."""
    rest = []
    for m in models:
        same = None
        if isinstance(m, AdapterCheckpoint) and m.is_over(base):
            same = m.unchanged(key)
        if same is False:
            return False
        if same is None:
            rest.append(m)
    models = rest
    if not models:
        return True
    n = base.numel(key)
    probe = base.read(key, 0, _PROBE)
    if any(
        m.dtype(key) != base.dtype(key)
        or not torch.equal(m.read(key, 0, _PROBE), probe)
        for m in models
    ):
        return False
    for start in range(_PROBE, n, CHUNK):
        b = base.read(key, start, start + CHUNK)
        if any(not torch.equal(m.read(key, start, start + CHUNK), b) for m in models):
            return False
    return True


class TaskVector:
    """τ = θ_ft − θ_pre over ``keys``, read lazily (or held in memory after arithmetic).

    ``delta(key, start, stop)`` returns a flat float32 chunk; ``values(key, start, stop,
    dtype)`` the same in another dtype (see :func:`compute_dtype`). Arithmetic (``+``,
    ``-``, ``*`` by a scalar) materialises a new in-memory task vector, which suits
    small models and tests; the merge pipeline never needs it.
    """

    def __init__(
        self,
        base: LazyCheckpoint | None,
        model: LazyCheckpoint | None,
        keys: Sequence[str],
        name: str | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.base = base
        self.model = model
        self.keys = list(keys)
        self.name = name or (model.name if model is not None else "task")
        self._tensors = dict(tensors) if tensors is not None else None

    @classmethod
    def from_checkpoints(
        cls,
        base: LazyCheckpoint | str,
        model: LazyCheckpoint | str,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> TaskVector:
        """Plan (check) one model against its base and return its task vector."""
        plan = plan_merge(base, [model], include, exclude)
        return plan.task_vectors()[0]

    def values(
        self,
        key: str,
        start: int = 0,
        stop: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Flat chunk ``[start, stop)`` of τ[key] in ``dtype``; NaN/Inf is an error."""
        if self._tensors is not None:
            return self._tensors[key].reshape(-1)[start:stop].to(dtype)
        assert self.base is not None and self.model is not None
        if isinstance(self.model, AdapterCheckpoint) and self.model.is_over(self.base):
            return self.model.delta(key, start, stop, dtype)
        d = self.model.read(key, start, stop).to(dtype) - self.base.read(
            key, start, stop
        ).to(dtype)
        if not all_finite(d):
            _raise_not_finite(
                key,
                [(ck, ck.read(key, start, stop)) for ck in (self.model, self.base)],
                self.model,
                dtype,
            )
        return d

    def delta(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Flat float32 chunk of τ[key] (the magnitudes every ranking uses)."""
        return self.values(key, start, stop, torch.float32)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of τ[key]."""
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        assert self.base is not None
        return self.base.shape(key)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Materialise τ as a dict of float32 tensors (small models only)."""
        return {k: self.delta(k).reshape(self.shape(k)) for k in self.keys}

    # -------------------------------------------------------------- arithmetic
    def _combine(self, other: TaskVector, sign: float) -> TaskVector:
        if self.keys != other.keys:
            diff = sorted(set(self.keys) ^ set(other.keys))
            raise ConfigError(f"task vectors differ in keys (e.g. {diff[:1]})")
        tensors = {}
        for k in self.keys:
            a, b = self.delta(k), other.delta(k)
            if a.shape != b.shape:
                raise ShapeMismatchError(
                    f"{k}: shapes {self.shape(k)} and {other.shape(k)}"
                )
            tensors[k] = (a + sign * b).reshape(self.shape(k))
        return TaskVector(
            self.base,
            None,
            self.keys,
            f"{self.name}{'+-'[sign < 0]}{other.name}",
            tensors,
        )

    def __add__(self, other: TaskVector) -> TaskVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: TaskVector) -> TaskVector:
        return self._combine(other, -1.0)

    def __mul__(self, scale: float) -> TaskVector:
        tensors = {
            k: self.delta(k).reshape(self.shape(k)) * float(scale) for k in self.keys
        }
        return TaskVector(self.base, None, self.keys, self.name, tensors)

    __rmul__ = __mul__

    def __neg__(self) -> TaskVector:
        return self * -1.0

    def apply_to(
        self, base: Mapping[str, torch.Tensor], scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """θ_pre + scale·τ for every key of ``base`` (keys outside τ are copied)."""
        out = {}
        for k in base:
            b = base[k]
            if k in self.keys:
                cd = compute_dtype(b.dtype)
                v = self.values(k, dtype=cd).reshape(b.shape)
                out[k] = (b.to(cd) + scale * v).to(b.dtype)
            else:
                out[k] = b.clone()
        return out
