"""PEFT LoRA adapters read as checkpoints, and merged adapters written back.

An adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` or
``adapter_model.bin``, as ``peft`` saves it; ``peft`` itself is not needed) describes a
fine-tuned model over a base: for every targeted layer θ_ft = θ_pre + ΔW with

- Linear: ΔW = s·B·A (``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]); transposed
  when ``fan_in_fan_out`` (GPT-2's Conv1D stores [in, out]);
- Embedding: ΔW = s·(B·A)ᵀ (``lora_embedding_A`` [r, num_embeddings],
  ``lora_embedding_B`` [dim, r]);
- Conv: ΔW = s·B·A over the flattened kernels (B is a 1×1 conv);
- ``lora_bias``: Δbias = s·``lora_B.bias``;
- ``modules_to_save`` (and any other full tensor the adapter holds): Δ = saved − base;

with s = α/r (α/√r with ``use_rslora``), r and α per module from ``rank_pattern`` /
``alpha_pattern`` (PEFT's matching: ``(.*\\.)?(pattern)$`` on the module name). Keys the
adapter does not touch have Δ = 0, so plans treat them like bitwise-equal (frozen)
tensors.

Design. :class:`AdapterCheckpoint` is a :class:`~npstune.checkpoints.io.LazyCheckpoint`
of the fine-tuned model over the base's keys (``keys/shape/dtype/read`` as for any
checkpoint, ``read`` giving θ_pre + ΔW rounded to the base's dtype), so everything
downstream works unchanged. Rounding θ_ft to a bf16 base would lose most of a small
ΔW, so the task vector is also exposed exactly: :meth:`AdapterCheckpoint.delta`
computes ΔW rows in float64 from A and B as stored, for the requested element range
only (one layer's rows at a time, never the whole model), and
:class:`~npstune.taskvector.MergePlan` uses it as τ instead of ``read − base`` whenever
a model is an adapter over the plan's base. Every mismatch with the base (a target the
base lacks, ranks that disagree with each other or with the config, ΔW's shape ≠ the
base tensor's) is one :class:`~npstune.errors.CheckpointError` raised when the adapter
is bound to its base, at plan time, before anything is written. DoRA and other PEFT
types are refused.

:func:`write_combined_adapter` writes Σ_t w_t·ΔW_t as one exact LoRA adapter by
concatenating ranks: B' = [w_1 s_1 B_1 … w_T s_T B_T], A' = [A_1; …; A_T], r' = Σ r_t,
α = r' (scale 1), in at least float32.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import torch

from npstune.checkpoints.io import LazyCheckpoint, remove_path, replace_path
from npstune.checkpoints.safetensors_format import StreamingSafetensorsWriter
from npstune.errors import CheckpointError, ConfigError
from npstune.fsutil import atomic_write_text

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_A_PARTS = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}
_B_PARTS = {v: k for k, v in _A_PARTS.items()}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: leading key components a target may gain or lose to match the base (``model.`` etc.)
_MAX_PREFIX = 2


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """True for a directory holding ``adapter_config.json`` (a PEFT adapter)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _finite(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def pattern_key(patterns: Sequence[str], module: str) -> str | None:
    """The first of ``patterns`` matching ``module`` (PEFT's ``get_pattern_key``)."""
    for pat in patterns:
        try:
            if re.match(rf"(.*\.)?({pat})$", module):
                return pat
        except re.error:
            if module == pat or module.endswith("." + pat):
                return pat
    return None


@dataclass(frozen=True)
class LoraTerm:
    """One targeted weight: ΔW[key] = scale · (B·A, transposed when ``transpose``)."""

    key: str  # the base's key
    module: str  # the module's name in the adapter (no ``base_model.model.``)
    a: str  # adapter file key of A
    b: str  # adapter file key of B
    kind: str  # "linear" | "embedding" | "conv"
    rank: int
    alpha: float
    scale: float
    transpose: bool

    def shape(self, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
        """ΔW's shape from A's and B's."""
        if self.kind == "embedding":
            return (a[1], b[0])
        if self.kind == "conv":
            return (b[0], *a[1:])
        return (a[1], b[0]) if self.transpose else (b[0], a[1])


@dataclass(frozen=True)
class BiasTerm:
    """``lora_bias``: Δbias[key] = scale · ``lora_B.bias``."""

    key: str
    file_key: str
    scale: float
    module: str


@dataclass
class _Parsed:
    """An adapter's file keys sorted into LoRA pairs, biases and full tensors."""

    pairs: dict[str, dict[str, str]]  # module -> {"lora_A": file key, ...}
    biases: dict[str, str]  # module -> file key of lora_B.bias
    full: dict[str, str]  # target name (module.param) -> file key


class AdapterCheckpoint(LazyCheckpoint):
    """A PEFT LoRA adapter read as the fine-tuned checkpoint θ_pre + ΔW over its base.

    Keys, shapes and dtypes are the base's. ``read`` gives θ_ft in the base's dtype;
    :meth:`delta` gives τ = ΔW exactly (computed in float64, cast to the dtype asked).
    The base is given, or bound by :func:`~npstune.taskvector.plan_merge`, or else taken
    from the config's ``base_model_name_or_path`` when that is a local checkpoint.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        base: LazyCheckpoint | str | os.PathLike[str] | None = None,
    ) -> None:
        # A LazyCheckpoint by interface; its own state replaces the file-form internals.
        self.path = Path(path)
        if not is_adapter_dir(self.path):
            raise CheckpointError(
                f"{self.path}: not a PEFT adapter directory (no {ADAPTER_CONFIG})"
            )
        self.name = self.path.name
        self.form = "adapter"
        self.hf_dir = None
        self.shard_of = {}
        self._lock = threading.Lock()
        self._open = None
        self._torch_state = None
        self._infos = {}
        self._file_of = {}
        self.config = self._read_config()
        self.weights = self._weights_file()
        self.files = LazyCheckpoint(self.weights)
        self.metadata = dict(self.files.metadata)
        self._parsed = self._parse_keys()
        self._base: LazyCheckpoint | None = None
        self.lora: dict[str, LoraTerm] = {}
        self.bias: dict[str, BiasTerm] = {}
        self.full: dict[str, str] = {}  # base key -> adapter file key
        self._keys: list[str] = []
        self._cache: tuple[str, torch.Tensor, torch.Tensor] | None = None
        self._cache_lock = threading.Lock()
        if base is not None:
            self.bind(base)

    # ------------------------------------------------------------------ config
    def _read_config(self) -> dict[str, Any]:
        f = self.path / ADAPTER_CONFIG
        try:
            cfg = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{f}: unreadable adapter config ({exc})") from exc
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{f}: adapter config is not a JSON object")
        ptype = str(cfg.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise CheckpointError(
                f"{self.path}: peft_type {ptype} is not supported "
                "(npstune reads LoRA adapters only)"
            )
        if cfg.get("use_dora"):
            raise CheckpointError(
                f"{self.path}: DoRA adapters (use_dora: true) are "
                "not supported: their update is not B·A·scale"
            )
        for field in ("r", "lora_alpha"):
            if field in cfg and not isinstance(cfg[field], (int, float)):
                raise CheckpointError(
                    f"{f}: {field} must be a number, got {cfg[field]!r}"
                )
        return cfg

    def _weights_file(self) -> Path:
        for name in ADAPTER_WEIGHTS:
            if (self.path / name).is_file():
                return self.path / name
        raise CheckpointError(
            f"{self.path}: adapter without weights "
            f"(looked for {', '.join(ADAPTER_WEIGHTS)})"
        )

    def _parse_keys(self) -> _Parsed:
        pairs: dict[str, dict[str, str]] = {}
        biases: dict[str, str] = {}
        full: dict[str, str] = {}
        names: set[str] = set()
        for fk in self.files.keys():
            key = fk[len(PEFT_PREFIX) :] if fk.startswith(PEFT_PREFIX) else fk
            parts = key.split(".")
            if "lora_magnitude_vector" in parts:
                raise self._fail(
                    fk, "DoRA magnitude vector: DoRA adapters are not supported"
                )
            idx = [i for i, p in enumerate(parts) if p in _A_PARTS or p in _B_PARTS]
            if idx:
                i = idx[-1]
                part, mod, rest = parts[i], ".".join(parts[:i]), parts[i + 1 :]
                embedding = part.startswith("lora_embedding")
                param = "weight"
                if not embedding and rest and rest[-1] in ("weight", "bias"):
                    param = rest.pop()
                if len(rest) > 1 or not mod or (embedding and param != "weight"):
                    raise self._fail(fk, "unrecognised LoRA tensor name")
                names.update(rest)
                if param == "bias":
                    if part != "lora_B":
                        raise self._fail(fk, "only lora_B may have a bias")
                    biases[mod] = fk
                    continue
                slot = pairs.setdefault(mod, {})
                if part in slot:
                    raise self._fail(fk, f"a second {part} for module {mod}")
                slot[part] = fk
                continue
            if any(
                p.startswith("lora_") or p == "trainable_tokens_delta" for p in parts
            ):
                raise self._fail(
                    fk,
                    "unsupported adapter tensor (npstune reads LoRA "
                    "A/B, lora_B bias and full tensors)",
                )
            if "original_module" in parts:
                continue  # the untouched copy PEFT keeps beside modules_to_save
            if "modules_to_save" in parts:
                j = parts.index("modules_to_save")
                names.update(parts[j + 1 : j + 2])
                parts = parts[:j] + parts[j + 2 :]
            parts = [p for p in parts if p != "base_layer"]
            target = ".".join(parts)
            if target in full:
                raise self._fail(fk, f"a second tensor for {target}")
            full[target] = fk
        if len(names) > 1:
            raise CheckpointError(
                f"{self.path}: holds several adapters "
                f"({', '.join(sorted(names))}); npstune reads one "
                "adapter per directory"
            )
        for mod, slot in pairs.items():
            for a, b in _A_PARTS.items():
                if (a in slot) != (b in slot):
                    have, miss = (a, b) if a in slot else (b, a)
                    raise self._fail(
                        slot[have], f"{have} without {miss} for module {mod}"
                    )
            if len(slot) != 2:
                raise CheckpointError(
                    f"{self.path}: module {mod} has both lora_A and "
                    "lora_embedding_A tensors"
                )
        for mod, fk in biases.items():
            if mod not in pairs:
                raise self._fail(fk, "lora_B bias without lora_A/B weights")
        return _Parsed(pairs, biases, full)

    # ------------------------------------------------------------------ binding
    @property
    def base_checkpoint(self) -> LazyCheckpoint:
        """The base this adapter is read over (bound on first use if not yet)."""
        if self._base is None:
            ref = self.config.get("base_model_name_or_path")
            cand = [Path(ref), self.path / ref] if isinstance(ref, str) and ref else []
            local = next((c for c in cand if c.exists()), None)
            if local is None:
                raise CheckpointError(
                    f"{self.path}: a LoRA adapter needs its base, and "
                    f"base_model_name_or_path {ref!r} is not a local checkpoint: pass "
                    "the base (npstune merge --base BASE, or open_checkpoint(path, "
                    "base=BASE))"
                )
            self.bind(local)
        assert self._base is not None
        return self._base

    def is_over(self, base: LazyCheckpoint) -> bool:
        """True when this adapter is bound to exactly ``base`` (the same object)."""
        return self._base is base

    def with_base(self, base: LazyCheckpoint) -> AdapterCheckpoint:
        """This adapter over ``base``: itself if unbound or bound to it, else a copy."""
        if self._base is base:
            return self
        if self._base is None:
            self.bind(base)
            return self
        return AdapterCheckpoint(self.path, base)

    def bind(self, base: LazyCheckpoint | str | os.PathLike[str]) -> None:
        """Map every adapter tensor onto a key of ``base``; check ranks and shapes."""
        from npstune.checkpoints.io import open_checkpoint

        ck = base if isinstance(base, LazyCheckpoint) else open_checkpoint(base)
        if isinstance(ck, AdapterCheckpoint):
            raise CheckpointError(
                f"{ck.path}: the base of {self.path} is itself an "
                "adapter; give the full base checkpoint"
            )
        keys = set(ck.keys())
        index = _prefix_index(keys)
        cfg = self.config
        r_default = cfg.get("r", 8)
        a_default = cfg.get("lora_alpha", 8)
        rank_pat = dict(cfg.get("rank_pattern") or {})
        alpha_pat = dict(cfg.get("alpha_pattern") or {})
        rslora = bool(cfg.get("use_rslora", False))
        fifo = bool(cfg.get("fan_in_fan_out", False))
        lora: dict[str, LoraTerm] = {}
        bias: dict[str, BiasTerm] = {}
        full: dict[str, str] = {}
        owner: dict[str, str] = {}

        def claim(key: str, fk: str) -> None:
            if key in owner:
                raise self._fail(
                    fk, f"updates base key {key} which {owner[key]} already updates"
                )
            owner[key] = fk

        for mod in sorted(self._parsed.pairs):
            slot = self._parsed.pairs[mod]
            embedding = "lora_embedding_A" in slot
            a_fk = slot["lora_embedding_A" if embedding else "lora_A"]
            b_fk = slot["lora_embedding_B" if embedding else "lora_B"]
            key = self._match(f"{mod}.weight", keys, index, ck, a_fk)
            a_shape, b_shape = self.files.shape(a_fk), self.files.shape(b_fk)
            for fk in (a_fk, b_fk):
                if self.files.dtype(fk) not in _FLOATS:
                    raise self._fail(
                        fk, f"dtype {self.files.dtype(fk)} is not a float dtype"
                    )
            if embedding:
                kind = "embedding"
                ok = len(a_shape) == 2 and len(b_shape) == 2
            elif len(a_shape) == 2 and len(b_shape) == 2:
                kind = "linear"
                ok = True
            else:
                kind = "conv"
                ok = len(a_shape) == len(b_shape) >= 3 and all(
                    s == 1 for s in b_shape[2:]
                )
            if not ok:
                raise self._fail(
                    a_fk,
                    f"A {a_shape} and B {b_shape} are not a LoRA "
                    f"pair npstune reads (base {key} {ck.shape(key)})",
                )
            rank = a_shape[0]
            if b_shape[1] != rank:
                raise self._fail(
                    b_fk,
                    f"rank {b_shape[1]} (B {b_shape}) differs from "
                    f"A's rank {rank} (A {a_shape}) for base key {key}",
                )
            rp = pattern_key(list(rank_pat), mod)
            r_cfg = rank_pat[rp] if rp is not None else r_default
            if rank != r_cfg:
                where = f"rank_pattern[{rp!r}]" if rp is not None else "r"
                raise self._fail(
                    a_fk,
                    f"rank {rank} (A {a_shape}, B {b_shape}) but "
                    f"{ADAPTER_CONFIG} says {where}={r_cfg} for base key "
                    f"{key}",
                )
            ap = pattern_key(list(alpha_pat), mod)
            alpha = float(alpha_pat[ap] if ap is not None else a_default)
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
            term = LoraTerm(
                key,
                mod,
                a_fk,
                b_fk,
                kind,
                rank,
                alpha,
                scale,
                transpose=fifo and kind == "linear",
            )
            got = term.shape(a_shape, b_shape)
            if got != tuple(ck.shape(key)):
                fifo_note = ", fan_in_fan_out" if term.transpose else ""
                raise self._fail(
                    a_fk,
                    f"B·A has shape {got} (A {a_shape}, B {b_shape}"
                    f"{fifo_note}) but base {ck.path} key {key} has shape "
                    f"{tuple(ck.shape(key))}",
                )
            if ck.dtype(key) not in _FLOATS:
                raise self._fail(
                    a_fk,
                    f"base key {key} has dtype {ck.dtype(key)}; "
                    "LoRA needs a float tensor",
                )
            claim(key, a_fk)
            lora[key] = term
            if mod in self._parsed.biases:
                fk = self._parsed.biases[mod]
                bkey = self._match(f"{mod}.bias", keys, index, ck, fk)
                if (self.files.shape(fk),) != (tuple(ck.shape(bkey)),):
                    raise self._fail(
                        fk,
                        f"lora_B bias shape {self.files.shape(fk)} "
                        f"but base {ck.path} key {bkey} has shape "
                        f"{tuple(ck.shape(bkey))}",
                    )
                claim(bkey, fk)
                bias[bkey] = BiasTerm(bkey, fk, scale, mod)
        for target in sorted(self._parsed.full):
            fk = self._parsed.full[target]
            key = self._match(target, keys, index, ck, fk)
            if key in lora and ".base_layer." in fk:
                # PEFT saves the frozen base layer of a LoRA'd embedding beside its
                # A/B (save_embedding_layers): the base's own tensor, nothing to add
                if torch.equal(self.files[fk], ck[key].to(self.files.dtype(fk))):
                    continue
                raise self._fail(
                    fk,
                    f"holds a base layer for {key} that differs from "
                    f"{ck.path}: this adapter was made for another base",
                )
            if tuple(self.files.shape(fk)) != tuple(ck.shape(key)):
                raise self._fail(
                    fk,
                    f"shape {self.files.shape(fk)} but base {ck.path} "
                    f"key {key} has shape {tuple(ck.shape(key))}",
                )
            if (self.files.dtype(fk) in _FLOATS) != (ck.dtype(key) in _FLOATS):
                raise self._fail(
                    fk,
                    f"dtype {self.files.dtype(fk)} vs base key {key} "
                    f"dtype {ck.dtype(key)}",
                )
            claim(key, fk)
            full[key] = fk
        self._base, self.lora, self.bias, self.full = ck, lora, bias, full
        self._keys = sorted(keys)
        self._cache = None

    def _match(
        self,
        target: str,
        keys: set[str],
        index: Mapping[str, list[str]],
        base: LazyCheckpoint,
        fk: str,
    ) -> str:
        """The base key ``target`` names: as is, else with a leading prefix added or
        removed (at most ``_MAX_PREFIX`` components; the match must be unique)."""
        if target in keys:
            return target
        parts = target.split(".")
        hits = {
            ".".join(parts[j:])
            for j in range(1, _MAX_PREFIX + 1)
            if len(parts) - j >= 2 and ".".join(parts[j:]) in keys
        }
        hits.update(index.get(target, ()))
        if len(hits) == 1:
            return hits.pop()
        if hits:
            raise self._fail(
                fk,
                f"{target} matches several base keys "
                f"({', '.join(sorted(hits)[:3])}) of {base.path}",
            )
        raise self._fail(
            fk,
            f"targets {target}, which base {base.path} does not hold "
            "(also tried with a leading prefix added or removed)",
        )

    def _fail(self, file_key: str, message: str) -> CheckpointError:
        """The error for one adapter tensor: ``ADAPTER_DIR:FILE_KEY: message``."""
        return CheckpointError(f"{self.path}:{file_key}: {message}")

    # ------------------------------------------------------------------ mapping API
    def _need(self) -> LazyCheckpoint:
        return self._base if self._base is not None else self.base_checkpoint

    def __getitem__(self, key: str) -> torch.Tensor:
        base = self._need()
        if key not in base:
            raise KeyError(key)
        return self.read(key).reshape(base.shape(key))

    def __iter__(self) -> Iterator[str]:
        self._need()
        return iter(self._keys)

    def __len__(self) -> int:
        self._need()
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._need()

    def shape(self, key: str) -> tuple[int, ...]:
        """The base's shape of ``key``."""
        return self._need().shape(key)

    def dtype(self, key: str) -> torch.dtype:
        """The base's dtype of ``key``."""
        return self._need().dtype(key)

    def targets(self, key: str) -> bool:
        """True when the adapter updates ``key`` (LoRA, lora bias or a full tensor)."""
        self._need()
        return key in self.lora or key in self.bias or key in self.full

    def unchanged(self, key: str) -> bool | None:
        """True when ΔW[key] is exactly zero, False when not, None when only reading
        tells (a full tensor: compare it with the base)."""
        self._need()
        if key in self.full:
            return None
        if key in self.bias:
            return not bool(self.files[self.bias[key].file_key].any())
        if key in self.lora:
            t = self.lora[key]
            return not (bool(self.files[t.a].any()) and bool(self.files[t.b].any()))
        return True

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """θ_ft elements ``[start, stop)`` of ``key`` (flat) in the base's dtype."""
        base = self._need()
        b = base.read(key, start, stop)
        if key in self.full:
            return self.files.read(self.full[key], start, start + b.numel()).to(b.dtype)
        if key not in self.lora and key not in self.bias:
            return b
        cd = _compute_dtype(b.dtype)
        return (b.to(cd) + self.delta(key, start, start + b.numel(), cd)).to(b.dtype)

    def delta(
        self,
        key: str,
        start: int = 0,
        stop: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """τ[key] elements ``[start, stop)`` (flat) in ``dtype``, computed in float64
        from the adapter's tensors (only the rows the range covers); zeros for keys the
        adapter does not touch."""
        base = self._need()
        n = base.numel(key)
        stop = n if stop is None else min(stop, n)
        count = max(stop - start, 0)
        if key in self.full:
            fk = self.full[key]
            d = self.files.read(fk, start, stop).to(torch.float64) - base.read(
                key, start, stop
            ).to(torch.float64)
        elif key in self.bias:
            t = self.bias[key]
            d = self.files.read(t.file_key, start, stop).to(torch.float64) * t.scale
        elif key in self.lora:
            d = self._lora_rows(self.lora[key], base.shape(key), start, stop)
        else:
            return torch.zeros(count, dtype=dtype)
        if not _finite(d):
            raise CheckpointError(f"{self.path}:{key}: adapter update holds NaN or Inf")
        return d.to(dtype)

    def _factors(self, t: LoraTerm) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of ``t`` as float64 matrices [r, ·] and [·, r] (one layer cached)."""
        with self._cache_lock:
            if self._cache is not None and self._cache[0] == t.key:
                return self._cache[1], self._cache[2]
        a = self.files[t.a].to(torch.float64).reshape(t.rank, -1)
        b = self.files[t.b].to(torch.float64).reshape(-1, t.rank)
        if not (_finite(a) and _finite(b)):
            bad = t.a if not _finite(a) else t.b
            raise CheckpointError(f"{self.path}:{bad}: tensor holds NaN or Inf")
        with self._cache_lock:
            self._cache = (t.key, a, b)
        return a, b

    def _lora_rows(
        self, t: LoraTerm, shape: tuple[int, ...], start: int, stop: int
    ) -> torch.Tensor:
        """Flat float64 ΔW elements ``[start, stop)``, from the rows that hold them."""
        if stop <= start:
            return torch.zeros(0, dtype=torch.float64)
        a, b = self._factors(t)
        rows = shape[0]
        cols = 1
        for s in shape[1:]:
            cols *= s
        r0, r1 = start // cols, min(rows, -(-stop // cols))
        if t.kind == "embedding" or t.transpose:  # ΔW = (B·A)ᵀ: rows = A's columns
            m = (b @ a[:, r0:r1]).T
        else:  # linear and conv: ΔW = B·A over flattened kernels
            m = b[r0:r1] @ a
        m = m.reshape(-1)[start - r0 * cols : stop - r0 * cols]
        return m * t.scale

    def close(self) -> None:
        """Close the adapter's file handle (the base is left to its owner)."""
        self.files.close()

    def open_files(self) -> int:
        """Open adapter file handles (0 or 1)."""
        return self.files.open_files()

    def __repr__(self) -> str:
        base = self._base.path if self._base is not None else None
        return (
            f"AdapterCheckpoint({str(self.path)!r}, base={str(base)!r}, "
            f"lora={len(self.lora)}, full={len(self.full)})"
        )


def _prefix_index(keys: set[str]) -> dict[str, list[str]]:
    """name -> base keys that are ``name`` behind up to ``_MAX_PREFIX`` components."""
    index: dict[str, list[str]] = {}
    for k in keys:
        parts = k.split(".")
        for j in range(1, _MAX_PREFIX + 1):
            if len(parts) - j >= 2:
                index.setdefault(".".join(parts[j:]), []).append(k)
    return index


# ---------------------------------------------------------------------- writing
def check_combinable(
    adapters: Sequence[LazyCheckpoint], what: str = "--out-format adapter"
) -> list[AdapterCheckpoint]:
    """The inputs as adapters over one base, same targets; ConfigError otherwise."""
    out: list[AdapterCheckpoint] = []
    for m in adapters:
        if not isinstance(m, AdapterCheckpoint):
            raise ConfigError(
                f"{what}: {m.path} is not a LoRA adapter; every --models "
                "input must be a PEFT LoRA adapter directory"
            )
        out.append(m)
    if not out:
        raise ConfigError(f"{what}: no adapters given")
    first = out[0]
    base = first.base_checkpoint
    for m in out[1:]:
        if not m.is_over(base):
            raise ConfigError(
                f"{what}: {m.path} is read over another base than {first.path}"
            )
        groups = (
            ("LoRA", m.lora, first.lora),
            ("lora bias", m.bias, first.bias),
            ("full-tensor", m.full, first.full),
        )
        for name, mine, theirs in groups:
            diff = sorted(set(mine) ^ set(theirs))
            if diff:
                has, lacks = (m, first) if diff[0] in mine else (first, m)
                raise ConfigError(
                    f"{what}: {has.path} has a {name} update of "
                    f"{diff[0]} but {lacks.path} does not (all adapters "
                    "must target the same keys)"
                )
        for key, t in m.lora.items():
            f = first.lora[key]
            if (t.kind, t.transpose) != (f.kind, f.transpose):
                raise ConfigError(
                    f"{what}: {m.path} and {first.path} store {key} "
                    f"differently ({t.kind}, transposed {t.transpose} vs "
                    f"{f.kind}, transposed {f.transpose})"
                )
    return out


def check_adapter_out(out: str | os.PathLike[str]) -> Path:
    """``out`` as an adapter directory path; ConfigError for a file name."""
    p = Path(out)
    if p.suffix.lower() in (".safetensors", ".bin", ".pt", ".pth") or (
        p.exists() and not p.is_dir()
    ):
        raise ConfigError(
            f"--out {out}: an adapter is a directory; give a directory path"
        )
    if not p.parent.is_dir():
        raise CheckpointError(f"{p}: parent directory {p.parent} does not exist")
    return p


def _weight_of(m: AdapterCheckpoint, bt: BiasTerm) -> str:
    """The base key of the weight whose LoRA module carries lora bias ``bt``."""
    return next((k for k, t in m.lora.items() if t.module == bt.module), "")


def _peft_key(module: str, tail: str) -> str:
    return f"{PEFT_PREFIX}{module}.{tail}"


def _common(values: Sequence[Any]) -> Any:
    return values[0] if all(v == values[0] for v in values) else None


def write_combined_adapter(
    out: str | os.PathLike[str],
    adapters: Sequence[AdapterCheckpoint],
    weights: Sequence[float],
    keys: Sequence[str] | set[str],
    full_value: Callable[[str], torch.Tensor],
    base_name: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write Σ_t ``weights[t]``·ΔW_t as one PEFT LoRA adapter directory, atomically.

    LoRA (and lora bias) updates of base keys in ``keys`` (the merge's delta keys; the
    others are left out, i.e. zero) are written exactly by concatenating ranks
    (B' = [w_t s_t B_t]_t, A' = [A_t]_t, α = r' so the scale is 1), in at least float32;
    a lora bias becomes Σ_t w_t s_t b_t. Full tensors (``modules_to_save``) are written
    as ``full_value(key)`` (the merged tensor in the base's dtype). Returns the config.
    """
    adapters = check_combinable(adapters)
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weights for {len(adapters)} adapters")
    out = check_adapter_out(out)
    first = adapters[0]
    wanted = set(keys)
    lora_keys = [k for k in sorted(first.lora) if k in wanted]
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    plan: list[tuple[str, str, str]] = []  # (kind, base key, file key)
    ranks: dict[str, int] = {}
    for key in lora_keys:
        terms = [m.lora[key] for m in adapters]
        t0 = terms[0]
        r = sum(t.rank for t in terms)
        ranks[t0.module] = r
        a_shape = tuple(first.files.shape(t0.a))
        b_shape = tuple(first.files.shape(t0.b))
        stored = [m.files.dtype(x) for m, t in zip(adapters, terms) for x in (t.a, t.b)]
        dt = reduce(torch.promote_types, stored, torch.float32)
        a_name, b_name = ("lora_A.weight", "lora_B.weight")
        if t0.kind == "embedding":
            a_name, b_name = ("lora_embedding_A", "lora_embedding_B")
        a_key, b_key = _peft_key(t0.module, a_name), _peft_key(t0.module, b_name)
        specs[a_key] = ((r, *a_shape[1:]), dt)
        specs[b_key] = ((b_shape[0], r, *b_shape[2:]), dt)
        plan += [("A", key, a_key), ("B", key, b_key)]
        for bt in (bt for bt in first.bias.values() if bt.module == t0.module):
            if bt.key in wanted:
                fk = _peft_key(t0.module, "lora_B.bias")
                specs[fk] = ((first.shape(bt.key)[0],), dt)
                plan.append(("bias", bt.key, fk))
    for bt in first.bias.values():
        if bt.key in wanted and _weight_of(first, bt) not in wanted:
            raise ConfigError(
                f"--out-format adapter: {bt.key} takes part but its "
                f"module's weight {_weight_of(first, bt)} does not; "
                "include both or neither"
            )
    for key in sorted(first.full):
        fk = first.full[key]
        name = fk[len(PEFT_PREFIX) :] if fk.startswith(PEFT_PREFIX) else fk
        parts = name.split(".")
        if "modules_to_save" in parts:
            j = parts.index("modules_to_save")
            parts = parts[:j] + parts[j + 2 :]
        fk = PEFT_PREFIX + ".".join(p for p in parts if p != "base_layer")
        specs[fk] = (tuple(first.shape(key)), first.dtype(key))
        plan.append(("full", key, fk))
    config = _combined_config(
        adapters, ranks, base_name, bool(any(kind == "bias" for kind, _, _ in plan))
    )
    tmp = out.parent / f".{out.name}.npstune-tmp-{os.getpid()}"
    remove_path(tmp)
    tmp.mkdir()
    writer = None
    try:
        writer = StreamingSafetensorsWriter(tmp / ADAPTER_WEIGHTS[0], specs, metadata)
        for kind, key, fk in plan:
            dt = specs[fk][1]
            if kind == "A":
                a = torch.cat([m.files[m.lora[key].a].to(dt) for m in adapters], 0)
                writer.write(fk, a)
            elif kind == "B":
                b = torch.cat(
                    [
                        (
                            m.files[m.lora[key].b].to(torch.float64)
                            * (w * m.lora[key].scale)
                        ).to(dt)
                        for m, w in zip(adapters, weights)
                    ],
                    1,
                )
                writer.write(fk, b)
            elif kind == "bias":
                total = torch.zeros(specs[fk][0], dtype=torch.float64)
                for m, w in zip(adapters, weights):
                    if key in m.bias:
                        t = m.bias[key]
                        total += m.files[t.file_key].to(torch.float64) * (w * t.scale)
                writer.write(fk, total.to(dt))
            else:
                writer.write(fk, full_value(key).to(dt).contiguous())
        writer.close()
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        atomic_write_text(tmp / ADAPTER_CONFIG, text)
    except BaseException:
        if writer is not None:
            writer.abort()
        remove_path(tmp)
        raise
    replace_path(tmp, out)
    return config


def _combined_config(
    adapters: Sequence[AdapterCheckpoint],
    ranks: Mapping[str, int],
    base_name: str | None,
    lora_bias: bool,
) -> dict[str, Any]:
    """PEFT's adapter_config.json for the concatenated adapter (scale 1 everywhere)."""
    cfgs = [m.config for m in adapters]
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r_main = max(counts, key=lambda r: (counts[r], r)) if counts else 8
    others = {re.escape(mod): r for mod, r in sorted(ranks.items()) if r != r_main}
    targeting = (
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
    )
    same = all(all(c.get(f) == cfgs[0].get(f) for c in cfgs) for f in targeting)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": r_main,
        "lora_alpha": r_main,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": any(t.transpose for t in adapters[0].lora.values())
        or bool(cfgs[0].get("fan_in_fan_out", False)),
        "lora_dropout": 0.0,
        "bias": _common([c.get("bias", "none") for c in cfgs]) or "none",
        "lora_bias": lora_bias,
        "inference_mode": True,
        "init_lora_weights": True,
        "base_model_name_or_path": _common(
            [c.get("base_model_name_or_path") for c in cfgs]
        )
        or base_name,
        "task_type": _common([c.get("task_type") for c in cfgs]),
        "modules_to_save": sorted(
            {m for c in cfgs for m in (c.get("modules_to_save") or [])}
        )
        or None,
    }
    if same:
        config.update({f: cfgs[0][f] for f in targeting if cfgs[0].get(f) is not None})
    if not same or config.get("target_modules") is None:
        config["target_modules"] = sorted({t.module for t in adapters[0].lora.values()})
    if not lora_bias:
        del config["lora_bias"]  # a newer PEFT field: written only when needed
    return config
