"""The store's ``manifest.json``: what was compressed, how, and the checksums to trust
it.

Layout of a store directory::

    manifest.json          this file (format, method and params, base reference, tasks)
    tasks/<NAME>.npsz      one data file per task: its blocks' blobs back to back
    base/<name>            a copy of the base (only with ``copy_base``)

Each tensor of a task is cut into blocks (row-major element ranges, the merge engine's
chunks). A block is one record ``[start, stop, kept, codec, pos_len, val_len, exc_count,
exc_len, blake2b]``: its position, value and exception blobs follow each other in the
data file, in block order, so offsets are running sums and the file size is their total.
``blake2b`` (8-byte digest, hex) covers the three blobs; each task file also has a
sha256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from npstune.checkpoints import LazyCheckpoint
from npstune.errors import CheckpointError
from npstune.fsutil import sha256_file

FORMAT = "npstune-sparse-task-vectors"
VERSION = 1
MANIFEST = "manifest.json"

DTYPES: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

Block = tuple[int, int, int, str, int, int, int, int, str]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileRef(_Model):
    """One file: path relative to its checkpoint's directory, size and sha256."""

    name: str
    size: int
    sha256: str


class BaseRef(_Model):
    """Where the base is (relative paths are inside the store) and its content
    hashes."""

    path: str
    copied: bool
    form: str
    files: list[FileRef]


class TensorEntry(_Model):
    """One tensor of one task: its kept entries, value dtype and blocks."""

    key: str
    shape: list[int]
    dtype: str
    values: str
    kept: int
    blocks: list[Block]


class TaskEntry(_Model):
    """One compressed task: what rebuilds it, its data file and its tensors."""

    name: str
    source: str
    method: str
    params: dict[str, Any]
    metadata: dict[str, str]
    lossless: bool
    n: int
    kept: int
    exceptions: int
    file: str
    size: int
    sha256: str
    tensors: list[TensorEntry]


class Manifest(_Model):
    """The whole store."""

    format: Literal["npstune-sparse-task-vectors"]
    version: Literal[1]
    npstune: str
    method: str
    params: dict[str, Any]
    value_dtype: str | None
    zstd_level: int
    base: BaseRef
    keys: dict[
        str, int
    ]  # every base key -> numel (decides frozen vs merged accounting)
    tasks: list[TaskEntry]

    def task(self, name: str) -> TaskEntry:
        """The task called ``name`` (CheckpointError listing the names otherwise)."""
        for t in self.tasks:
            if t.name == name:
                return t
        names = ", ".join(t.name for t in self.tasks)
        raise CheckpointError(f"no task {name!r} in the store (tasks: {names})")


def read_manifest(store: Path) -> Manifest:
    """Load and validate ``store/manifest.json``; errors name the file."""
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{store}: not an npstune store (no {MANIFEST})")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}; corrupted?)") from exc
    if (
        isinstance(raw, dict)
        and raw.get("format") == FORMAT
        and raw.get("version") != VERSION
    ):
        raise CheckpointError(
            f"{path}: store format version {raw.get('version')} is not "
            f"supported (this npstune reads version {VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise CheckpointError(
            f"{path}: malformed manifest at {loc}: {first['msg']}"
        ) from None


def dumps(obj: Any, indent: int = 0) -> str:
    """JSON with one level of indentation per nesting, lists of scalars on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [
            f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and any(
        isinstance(x, (dict, list, tuple)) for x in obj
    ):
        return (
            "[\n"
            + ",\n".join(inner + dumps(x, indent + 1) for x in obj)
            + "\n"
            + pad
            + "]"
        )
    return json.dumps(obj, separators=(",", ":"))


def weight_files(ck: LazyCheckpoint) -> list[tuple[str, Path]]:
    """(name relative to the checkpoint's directory,
    path) of every file holding weights."""
    anchor = ck.path if ck.path.is_dir() else ck.path.parent
    files = {ck.weights} | {ck.weights.parent / s for s in set(ck.shard_of.values())}
    return sorted((str(f.relative_to(anchor)), f) for f in files)


def hash_checkpoint(ck: LazyCheckpoint) -> list[FileRef]:
    """Size and sha256 of every weight file of ``ck``."""
    return [
        FileRef(name=name, size=f.stat().st_size, sha256=sha256_file(f))
        for name, f in weight_files(ck)
    ]


def verify_base(ck: LazyCheckpoint, ref: BaseRef) -> None:
    """Refuse a base whose form, file sizes or sha256 differ from the manifest's."""
    files = weight_files(ck)
    want = sorted((f.size, f.sha256) for f in ref.files)
    if ck.form != ref.form or sorted(f.stat().st_size for _, f in files) != [
        s for s, _ in want
    ]:
        raise CheckpointError(
            f"{ck.path}: base does not match the store (expected a {ref.form} "
            f"checkpoint of {len(ref.files)} weight file(s), sizes "
            f"{[s for s, _ in want]}); refusing to use it"
        )
    hashed = [(name, f.stat().st_size, sha256_file(f)) for name, f in files]
    if sorted((s, h) for _, s, h in hashed) != want:
        bad = next(name for name, s, h in hashed if (s, h) not in want)
        raise CheckpointError(
            f"{ck.path}: base file {bad} has a different sha256 than the store "
            "recorded; the base changed since compression, refusing to use it"
        )
