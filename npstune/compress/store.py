"""Compress task models into a sparse store, rebuild them exactly, and account for
bytes.

Compression runs, per task, exactly the single-task merge ``npstune merge --method M
--base B --models T`` (same plan, same pruner passes, same chunks, same kernel) and, for
each block the engine merges, keeps the entries where the merge output ``o`` may differ
from the base: the keep mask the engine gives with the block
(:class:`~npstune.merge.masks.Block`; plus, defensively, any entry whose output bits
differ from ``base + 0``). Rather than τ̂ itself it stores, per kept entry, ``s = (o −
θ_pre)`` rounded to the value dtype: ``(θ_pre + s)`` cast to the checkpoint dtype
rebuilds ``o``. Where it does not, bit for bit (rare: catastrophic cancellation, fp16
overflow), a lossless store adds ``o`` as an exception, so decompression writes the same
bytes as the merge. Everything streams per chunk of a tensor: memory stays near a few
chunks whatever the model size.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zstandard

import npstune
from npstune.checkpoints import CheckpointWriter, LazyCheckpoint, open_checkpoint
from npstune.checkpoints.io import remove_path, replace_path
from npstune.compress import codec
from npstune.compress.accounting import storage_bits
from npstune.compress.manifest import (
    DTYPE_NAMES,
    DTYPES,
    MANIFEST,
    BaseRef,
    Manifest,
    TaskEntry,
    TensorEntry,
    dumps,
    hash_checkpoint,
    read_manifest,
    verify_base,
    weight_files,
)
from npstune.errors import CheckpointError, ConfigError
from npstune.fsutil import atomic_write_text, sha256_file
from npstune.merge.base import (
    MergeInputs,
    MergeSpec,
    MethodParams,
    merged_blocks,
    progress_bar,
)
from npstune.merge.registry import get_method
from npstune.sparsify import keep_count, task_weight_rows
from npstune.taskvector import MergePlan, compute_dtype, plan_merge

logger = logging.getLogger(__name__)

#: compress method name -> merge method whose single-task output the store rebuilds
SPARSE_METHODS = {
    "nps": "nps",
    "magnitude": "magnitude",
    "dare": "dare",
    "darex": "darex",
    "ties-trim": "ties",
}


class _TaskFile:
    """Appends blocks' blobs to a task data file, hashing as it goes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def add(self, *blobs: bytes) -> str:
        digest = hashlib.blake2b(digest_size=8)
        for b in blobs:
            self.fh.write(b)
            self.sha.update(b)
            digest.update(b)
            self.size += len(b)
        return digest.hexdigest()

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


# ---------------------------------------------------------------------------- compress
def compress(
    base: str | os.PathLike[str],
    models: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    method: str = "nps",
    params: dict[str, Any] | None = None,
    *,
    value_dtype: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    copy_base: bool = False,
    zstd_level: int = 3,
    progress: bool = False,
    names: Sequence[str] | None = None,
) -> Manifest:
    """Compress ``models`` against ``base`` into the store directory ``out``
    (atomically).

    Args:
        method: ``nps`` (default, w = 1), ``magnitude``, ``dare``, ``darex`` or
            ``ties-trim``; ``params`` are that merge method's (k, lam, scope, subspaces,
            weights: M values or T·M task-major, seed, q).
        value_dtype: None (each tensor's own dtype: lossless) or ``fp16``/``bf16``
            (lossy).
        copy_base: keep a copy of the base inside the store instead of a reference.
        names: each model's task name in the store (default: its file stem, or its
            directory's name for a directory). DARE's random draws follow the model's
            own name (its stem), not this one, so that a task rebuilds exactly what
            ``npstune merge`` writes for that model alone (two models with one stem
            draw the same DARE mask).
    """
    if method not in SPARSE_METHODS:
        raise ConfigError(
            f"compress: method {method!r} does not produce a sparse task "
            f"vector; valid: {', '.join(SPARSE_METHODS)}"
        )
    if value_dtype is not None and value_dtype not in DTYPES:
        raise ConfigError(
            f"--value-dtype {value_dtype!r}: expected one of {', '.join(DTYPES)}"
        )
    if not 1 <= zstd_level <= 22:
        raise ConfigError(f"zstd level must be in [1, 22], got {zstd_level}")
    spec = get_method(SPARSE_METHODS[method])
    shared = spec.make_params(params)
    base_ck = open_checkpoint(base)
    cks = [open_checkpoint(m) for m in models]
    if not cks:
        raise ConfigError("compress: no models given")
    if names is not None and len(names) != len(cks):
        raise ConfigError(f"compress: {len(names)} names for {len(cks)} models")
    names = list(names) if names is not None else [c.name for c in cks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(
            f"compress: two models share the task name {dup[0]!r} (a task's "
            "name is its file stem); rename one or pass names"
        )
    task_params = _per_task_params(spec, shared, len(cks))
    out = Path(out)
    if out.exists() and not (
        out.is_dir() and ((out / MANIFEST).is_file() or not any(out.iterdir()))
    ):
        raise ConfigError(
            f"--out {out}: exists and is not an npstune store; choose another path"
        )
    if not out.parent.is_dir():
        raise CheckpointError(f"{out}: parent directory {out.parent} does not exist")
    plans = [
        plan_merge(base_ck, [c], include, exclude) for c in cks
    ]  # check all up front
    tmp = out.parent / f".{out.name}.npstune-tmp-{os.getpid()}"
    remove_path(tmp)
    (tmp / "tasks").mkdir(parents=True)
    try:
        base_ref = BaseRef(
            path=str(base_ck.path.resolve()),
            copied=False,
            form=base_ck.form,
            files=hash_checkpoint(base_ck),
        )
        cctx = zstandard.ZstdCompressor(level=zstd_level)
        tasks = []
        for plan, p, name in zip(plans, task_params, names):
            tasks.append(
                _compress_task(plan, spec, p, name, value_dtype, tmp, cctx, progress)
            )
            logger.info(
                "compressed %s: %d kept of %d", name, tasks[-1].kept, tasks[-1].n
            )
        if copy_base:
            base_ref = _copy_base(base_ck, tmp, base_ref)
        manifest = Manifest(
            format="npstune-sparse-task-vectors",
            version=1,
            npstune=npstune.__version__,
            method=method,
            params=shared.model_dump(),
            value_dtype=value_dtype,
            zstd_level=zstd_level,
            base=base_ref,
            keys={k: base_ck.numel(k) for k in sorted(base_ck.keys())},
            tasks=tasks,
        )
        atomic_write_text(
            tmp / MANIFEST, dumps(manifest.model_dump(mode="json")) + "\n"
        )
    except BaseException:
        remove_path(tmp)
        raise
    replace_path(tmp, out)
    return manifest


def _per_task_params(
    spec: MergeSpec[Any], shared: MethodParams, tasks: int
) -> list[MethodParams]:
    """Each task's own params: NPS weights (M shared or T·M task-major) become its
    row."""
    weights = getattr(shared, "weights", None)
    if weights is None:
        return [shared] * tasks
    rows = task_weight_rows(weights, tasks, shared.subspaces)  # type: ignore[attr-defined]
    return [spec.make_params({**shared.model_dump(), "weights": row}) for row in rows]


def _compress_task(
    plan: MergePlan,
    spec: MergeSpec[Any],
    p: MethodParams,
    name: str,
    value_dtype: str | None,
    tmp: Path,
    cctx: zstandard.ZstdCompressor,
    progress: bool,
) -> TaskEntry:
    ctx = spec.prepare(MergeInputs(plan), p)
    whole = spec.whole_tensor(p)
    rel = f"tasks/{name}.npsz"
    f = _TaskFile(tmp / rel)
    tensors, kept, exceptions, lossless = [], 0, 0, True
    try:
        for key in progress_bar(plan.delta_keys, progress, f"compress {name}"):
            dtype = plan.base.dtype(key)
            vdt = DTYPES[value_dtype] if value_dtype else dtype
            lossless &= vdt == dtype
            blocks, t_kept = [], 0
            for blk in merged_blocks(plan, spec, ctx, key, whole):
                if (
                    len(blk.masks) != 1
                ):  # the engine's mask output: this task's keep mask
                    raise ConfigError(
                        f"compress: {spec.name} gives no keep mask per task"
                    )
                enc = _encode_block(
                    blk.chunk.base_cd, blk.merged, blk.masks[0], vdt, cctx
                )
                digest = f.add(enc.pos, enc.vals, enc.exc)
                blocks.append(
                    (
                        blk.start,
                        blk.stop,
                        enc.kept,
                        enc.codec,
                        len(enc.pos),
                        len(enc.vals),
                        enc.exc_count,
                        len(enc.exc),
                        digest,
                    )
                )
                t_kept += enc.kept
                exceptions += enc.exc_count
            kept += t_kept
            tensors.append(
                TensorEntry(
                    key=key,
                    shape=list(plan.base.shape(key)),
                    dtype=DTYPE_NAMES[dtype],
                    values=DTYPE_NAMES[vdt],
                    kept=t_kept,
                    blocks=blocks,
                )
            )
    finally:
        f.close()
    metadata = {"npstune_method": spec.name, "npstune_params": p.model_dump_json()}
    return TaskEntry(
        name=name,
        source=str(plan.models[0].path),
        method=spec.name,
        params=p.model_dump(),
        metadata=metadata,
        lossless=lossless,
        n=plan.n,
        kept=kept,
        exceptions=exceptions,
        file=rel,
        size=f.size,
        sha256=f.sha.hexdigest(),
        tensors=tensors,
    )


@dataclass
class _Encoded:
    kept: int
    codec: str
    pos: bytes
    vals: bytes
    exc_count: int
    exc: bytes


def _encode_block(
    base_cd: torch.Tensor,
    out: torch.Tensor,
    mask: torch.Tensor | None,
    vdt: torch.dtype,
    cctx: zstandard.ZstdCompressor,
) -> _Encoded:
    """Store what rebuilds ``out`` from the base: kept positions, values, exceptions."""
    dtype = out.dtype
    plain = (base_cd + 0.0).to(dtype)  # the merge's output where nothing is kept
    keep = codec.bits_of(out) != codec.bits_of(plain)
    if mask is not None:
        keep |= mask.reshape(-1).to(keep.device)
    idx = keep.nonzero().squeeze(1)
    o, b = out[idx], base_cd[idx]
    s = (o.to(base_cd.dtype) - b).to(vdt)
    rebuilt = (b + s.to(base_cd.dtype)).to(dtype)
    if vdt == dtype:
        bad = codec.bits_of(rebuilt) != codec.bits_of(o)
    else:  # lossy values: only an overflow (inf) is kept exact
        bad = ~torch.isfinite(rebuilt)
    exc = bad.nonzero().squeeze(1)
    name, pos = codec.encode_positions(keep, cctx)
    return _Encoded(
        int(idx.numel()),
        name,
        pos,
        codec.encode_values(s, cctx),
        int(exc.numel()),
        codec.encode_exceptions(exc, o[exc]),
    )


def _copy_base(ck: LazyCheckpoint, tmp: Path, ref: BaseRef) -> BaseRef:
    """Copy the base into ``tmp/base``: a directory whole, a file with its shards."""
    dest = tmp / "base"
    dest.mkdir()
    if ck.path.is_dir():
        shutil.copytree(ck.path, dest / ck.path.name)
    else:  # a single file, or a shard index given by path: copy it and its shards
        for name, f in weight_files(ck):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / name)
    return ref.model_copy(update={"path": f"base/{ck.path.name}", "copied": True})


# -------------------------------------------------------------------------- decompress
def open_base(
    store: Path, manifest: Manifest, base: str | os.PathLike[str] | None
) -> LazyCheckpoint:
    """The store's base (or ``base``), refused unless its hashes match the manifest."""
    ref = manifest.base
    path = (
        Path(base)
        if base is not None
        else (store / ref.path if ref.copied else Path(ref.path))
    )
    if not path.exists():
        raise CheckpointError(
            f"{path}: the store's base checkpoint is missing; pass --base "
            "with its new location"
        )
    ck = open_checkpoint(path)
    verify_base(ck, ref)
    if {k: ck.numel(k) for k in ck.keys()} != manifest.keys:
        raise CheckpointError(f"{path}: base keys or shapes differ from the store's")
    return ck


def decompress(
    store: str | os.PathLike[str],
    task: str,
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Path:
    """Rebuild ``task`` from the store into ``out`` (the base's form), atomically.

    A lossless store writes exactly the bytes ``npstune merge`` writes for that task
    alone.
    """
    store = Path(store)
    manifest = read_manifest(store)
    entry = manifest.task(task)
    ck = open_base(store, manifest, base)
    data = store / entry.file
    size = data.stat().st_size if data.is_file() else -1
    if size != entry.size:
        got = "missing" if size < 0 else f"{size} bytes"
        raise CheckpointError(
            f"{data}: task file is truncated or changed ({got}, the manifest "
            f"says {entry.size} bytes)"
        )
    tensors = {t.key: t for t in entry.tensors}
    specs = {k: (ck.shape(k), ck.dtype(k)) for k in sorted(ck.keys())}
    for key, t in tensors.items():
        if tuple(t.shape) != specs[key][0] or DTYPES[t.dtype] != specs[key][1]:
            raise CheckpointError(
                f"{ck.path}:{key}: shape/dtype differ from the store's"
            )
    with open(data, "rb") as fh, CheckpointWriter(out, ck, specs, entry.metadata) as w:
        for key in progress_bar(list(specs), progress, f"decompress {task}"):
            if key not in tensors:
                w.write(key, ck[key], 0)
                continue
            t = tensors[key]
            if ck.numel(key) == 0:
                w.write(key, ck[key], 0)
            for i, block in enumerate(t.blocks):
                where = f"{data}:{key} block {i}"
                w.write(
                    key,
                    _decode_block(ck, key, block, DTYPES[t.values], fh, where),
                    block[0],
                )
    return Path(out)


def _decode_block(
    ck: LazyCheckpoint, key: str, block: tuple, vdt: torch.dtype, fh: Any, where: str
) -> torch.Tensor:
    start, stop, kept, name, pos_len, val_len, exc_count, exc_len, digest = block
    blobs = []
    for length in (pos_len, val_len, exc_len):
        blob = fh.read(length)
        if len(blob) != length:
            raise CheckpointError(f"{where}: file ends early (truncated)")
        blobs.append(blob)
    h = hashlib.blake2b(digest_size=8)
    for blob in blobs:
        h.update(blob)
    if h.hexdigest() != digest:
        raise CheckpointError(
            f"{where}: checksum mismatch (the store file is corrupted)"
        )
    b = ck.read(key, start, stop)
    dtype = b.dtype
    b_cd = b.to(compute_dtype(dtype))
    plain = (b_cd + 0.0).to(dtype)
    idx = codec.decode_positions(name, blobs[0], stop - start, kept, where)
    s = codec.decode_values(blobs[1], vdt, kept, where)
    o = (b_cd[idx] + s.to(b_cd.dtype)).to(dtype)
    ei, ev = codec.decode_exceptions(blobs[2], exc_count, dtype, kept, where)
    o[ei] = ev
    plain[idx] = o
    return plain


# ----------------------------------------------------------------------------- inspect
def inspect_store(store: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """Storage table of a store: the paper's bits and the real bytes, per task and
    total.

    N counts the entries of every tensor some task changed (its task vector); the others
    (frozen, filtered out, integer buffers) are base-only. ``verify`` checks every task
    file's size and sha256 (a corrupted store raises CheckpointError naming the file).
    """
    store = Path(store)
    m = read_manifest(store)
    merged = {t.key for task in m.tasks for t in task.tensors}
    n = sum(v for k, v in m.keys.items() if k in merged)
    frozen = sum(v for k, v in m.keys.items() if k not in merged)
    k = m.params.get("k")
    per_task_bits = 32 * keep_count(k, n) + n if k is not None else None
    tasks: list[dict[str, Any]] = []
    for t in m.tasks:
        path = store / t.file
        size = path.stat().st_size if path.is_file() else -1
        if verify and (size != t.size or sha256_file(path) != t.sha256):
            raise CheckpointError(
                f"{path}: task file is corrupted or truncated ({size} bytes, "
                f"manifest says {t.size} and another sha256)"
            )
        tasks.append(
            {
                "name": t.name,
                "n": t.n,
                "kept": t.kept,
                "exceptions": t.exceptions,
                "lossless": t.lossless,
                "paper_bits": per_task_bits,
                "disk_bytes": size,
                "ratio": 8 * size / per_task_bits if per_task_bits else None,
            }
        )
    manifest_bytes = (store / MANIFEST).stat().st_size
    task_bytes = sum(t["disk_bytes"] for t in tasks)
    base_dir = store / "base"
    base_bytes = (
        sum(p.stat().st_size for p in base_dir.rglob("*") if p.is_file())
        if m.base.copied
        else sum(f.size for f in m.base.files)
    )
    T = len(m.tasks)
    sparse_paper = T * per_task_bits if per_task_bits is not None else None
    total = storage_bits(
        m.method,
        T,
        n,
        k,
        frozen=frozen,
        disk_bytes=base_bytes + task_bytes + manifest_bytes,
    )
    methods = {
        name: storage_bits(
            name, T, n, k if name == "nps" else None, frozen=frozen
        ).as_dict()
        for name in ("finetuned", "merged", "tall-ties", "nps")
    }
    return {
        "store": str(store),
        "method": m.method,
        "params": m.params,
        "value_dtype": m.value_dtype,
        "tasks_count": T,
        "n": n,
        "frozen": frozen,
        "tasks": tasks,
        "sparse": {
            "paper_bits": sparse_paper,
            "disk_bytes": task_bytes + manifest_bytes,
            "manifest_bytes": manifest_bytes,
            "ratio": 8 * (task_bytes + manifest_bytes) / sparse_paper
            if sparse_paper
            else None,
        },
        "base": {
            "paper_bits": 32 * n,
            "frozen_bits": 32 * frozen,
            "disk_bytes": base_bytes,
            "copied": m.base.copied,
            "path": m.base.path,
        },
        "total": total.as_dict(),
        "methods": methods,
    }
