"""Read and write checkpoints tensor by tensor, in every form npstune accepts.

Forms (DESIGN §8): a ``.safetensors`` file, a sharded safetensors directory
(``model.safetensors.index.json``), a torch state-dict file (loaded with
``weights_only=True``), and a Hugging Face model directory (``config.json`` beside the
weights). Safetensors data is read with positioned reads into fresh buffers rather than
a memory map, so resident memory stays near the tensors being combined even for
checkpoints far larger than RAM; at most one shard file per checkpoint is open at a
time.

A PEFT LoRA adapter directory (``adapter_config.json`` beside ``adapter_model.*``) opens
as the fine-tuned model it describes over a base (:mod:`npstune.checkpoints.adapter`).

Writers produce the form the output's name names (:func:`output_form`: ``.safetensors``,
``.bin``/``.pt``/``.pth``, or a directory), else the base's, and are atomic: everything
goes to a temporary sibling that is renamed into place only after the last tensor is
written, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import threading
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from npstune.checkpoints.safetensors_format import (
    StreamingSafetensorsWriter,
    TensorInfo,
    read_header,
)
from npstune.errors import CheckpointError, ConfigError
from npstune.fsutil import (
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    replace_durably,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
HF_WEIGHT_FILES = (
    "model.safetensors",
    SAFETENSORS_INDEX,
    "pytorch_model.bin",
    TORCH_INDEX,
)
FORMS = ("safetensors", "sharded", "torch", "hf")


def checkpoint_name(path: str | os.PathLike[str]) -> str:
    """A task's NAME: its model file's stem (or the directory's name)."""
    p = Path(path)
    if p.name.endswith(".index.json"):
        p = p.parent
    return (
        p.stem
        if p.is_file() or p.suffix in (".safetensors", ".pt", ".bin", ".pth")
        else p.name
    )


class LazyCheckpoint(Mapping[str, torch.Tensor]):
    """A read-only mapping from tensor key to tensor that loads on access.

    ``shape(key)``/``dtype(key)`` come from headers without reading data; ``read(key,
    start, stop)`` loads a row-major range of elements, which lets large tensors be
    processed in chunks. Keys iterate in sorted order, the order every global pass uses.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        self.name = checkpoint_name(self.path)
        self.metadata: dict[str, str] = {}
        self.hf_dir: Path | None = None
        self.shard_of: dict[str, str] = {}  # key -> shard file name (sharded forms)
        self._infos: dict[str, TensorInfo] = {}
        self._file_of: dict[str, tuple[Path, int]] = {}  # key -> (file, data start)
        self._torch_state: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()
        self._open: tuple[Path, Any] | None = None
        self.form, self.weights = self._detect()
        self._keys = (
            sorted(self._infos)
            if self._torch_state is None
            else sorted(self._torch_state)
        )

    # ------------------------------------------------------------------ detection
    def _detect(self) -> tuple[str, Path]:
        p = self.path
        if p.is_dir():
            if (p / "config.json").is_file():
                for name in HF_WEIGHT_FILES:
                    if (p / name).is_file():
                        self.hf_dir = p
                        self._load_weights(p / name)
                        return "hf", p / name
                raise CheckpointError(
                    f"{p}: Hugging Face directory without weights "
                    f"(looked for {', '.join(HF_WEIGHT_FILES)})"
                )
            if (p / SAFETENSORS_INDEX).is_file():
                self._load_weights(p / SAFETENSORS_INDEX)
                return "sharded", p / SAFETENSORS_INDEX
            if (p / "model.safetensors").is_file():
                self._load_weights(p / "model.safetensors")
                return "sharded", p / "model.safetensors"
            if (p / "adapter_config.json").is_file():
                raise CheckpointError(
                    f"{p}: a PEFT adapter, not a full checkpoint: "
                    "open it with open_checkpoint(path, base=BASE)"
                )
            raise CheckpointError(
                f"{p}: directory holds no checkpoint "
                f"(no config.json, {SAFETENSORS_INDEX} or model.safetensors)"
            )
        if p.name.endswith(".index.json"):
            self._load_weights(p)
            return "sharded", p
        if p.suffix == ".safetensors":
            self._load_weights(p)
            return "safetensors", p
        self._load_weights(p)
        return "torch", p

    def _load_weights(self, f: Path) -> None:
        if f.name.endswith(".index.json"):
            try:
                index = json.loads(f.read_text())
                weight_map: dict[str, str] = index["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{f}: unreadable shard index ({exc})") from exc
            self.metadata = {
                str(k): str(v) for k, v in (index.get("metadata") or {}).items()
            }
            self.shard_of = dict(weight_map)
            if f.name == TORCH_INDEX:
                state: dict[str, torch.Tensor] = {}
                for shard in sorted(set(weight_map.values())):
                    state.update(_torch_load(f.parent / shard))
                self._torch_state = state
                return
            for shard in sorted(set(weight_map.values())):
                sp = f.parent / shard
                if not sp.is_file():
                    raise CheckpointError(f"{f}: shard {shard} is missing")
                infos, _, start = read_header(sp)
                for key, info in infos.items():
                    self._infos[key] = info
                    self._file_of[key] = (sp, start)
            missing = set(weight_map) - set(self._infos)
            if missing:
                raise CheckpointError(
                    f"{f}: index names tensors no shard holds: "
                    f"{', '.join(sorted(missing)[:3])}"
                )
            return
        if f.suffix == ".safetensors":
            infos, meta, start = read_header(f)
            self.metadata = meta
            self._infos = infos
            self._file_of = {k: (f, start) for k in infos}
            return
        self._torch_state = _torch_load(f)

    # ------------------------------------------------------------------ mapping API
    def __getitem__(self, key: str) -> torch.Tensor:
        if self._torch_state is not None:
            try:
                return self._torch_state[key]
            except KeyError:
                raise KeyError(key) from None
        info = self._info(key)
        return self.read(key).reshape(info.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        if self._torch_state is not None:
            return key in self._torch_state
        return key in self._infos

    def _info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(key) from None

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading its data."""
        if self._torch_state is not None:
            return tuple(self._torch_state[key].shape)
        return self._info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of ``key`` without reading its data."""
        if self._torch_state is not None:
            return self._torch_state[key].dtype
        return self._info(key).dtype

    def numel(self, key: str) -> int:
        """Element count of ``key``."""
        return math.prod(self.shape(key))

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of ``key`` in row-major order,
        as a flat tensor."""
        if self._torch_state is not None:
            return self._torch_state[key].reshape(-1)[start:stop]
        info = self._info(key)
        n = info.numel
        stop = n if stop is None else min(stop, n)
        item = torch.empty((), dtype=info.dtype).element_size()
        count = max(stop - start, 0)
        buf = torch.empty(count * item, dtype=torch.uint8)
        path, data_start = self._file_of[key]
        with self._lock:
            fh = self._handle(path)
            fh.seek(data_start + info.begin + start * item)
            got = fh.readinto(buf.numpy().data) if count else 0
        if got != count * item:
            raise CheckpointError(f"{path}:{key}: short read (file truncated?)")
        return buf.view(info.dtype)

    def _handle(self, path: Path) -> Any:
        if self._open is not None and self._open[0] == path:
            return self._open[1]
        if self._open is not None:
            self._open[1].close()
            self._open = None
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open ({exc})") from exc
        self._open = (path, fh)
        return fh

    def close(self) -> None:
        """Close the open shard handle (the mapping stays usable; it reopens lazily)."""
        with self._lock:
            if self._open is not None:
                self._open[1].close()
                self._open = None

    def open_files(self) -> int:
        """How many shard files this checkpoint holds open right now (0 or 1)."""
        return 0 if self._open is None else 1

    def __repr__(self) -> str:
        return (
            f"LazyCheckpoint({str(self.path)!r}, form={self.form!r}, "
            f"tensors={len(self)})"
        )


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Load a torch state-dict file safely (no code execution),
    memory-mapped if possible."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: loading it would execute code or it is not a state dict "
            f"(torch.load weights_only=True failed: {str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable torch file ({exc})") from exc
    if (
        isinstance(obj, Mapping)
        and "state_dict" in obj
        and isinstance(obj["state_dict"], Mapping)
    ):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{path}: not a flat state dict of tensors")
    return dict(obj)


def open_checkpoint(
    path: str | os.PathLike[str],
    base: LazyCheckpoint | str | os.PathLike[str] | None = None,
) -> LazyCheckpoint:
    """Open any supported checkpoint form lazily.

    A PEFT LoRA adapter directory opens as an
    :class:`~npstune.checkpoints.adapter.AdapterCheckpoint` over ``base`` (without one,
    over the local path its ``base_model_name_or_path`` names, once it is first read;
    merges bind it to their base). ``base`` is ignored for full checkpoints.
    """
    from npstune.checkpoints.adapter import AdapterCheckpoint, is_adapter_dir

    if is_adapter_dir(path):
        return AdapterCheckpoint(path, base)
    return LazyCheckpoint(path)


# ---------------------------------------------------------------------- writing
def _is_weight_file(p: Path) -> bool:
    return p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name.endswith(
        ".index.json"
    )


TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def output_form(out: str | os.PathLike[str], like: LazyCheckpoint) -> str:
    """The form ``out`` is written in: the one its name names, else ``like``'s.

    ``.safetensors`` -> one safetensors file (``"safetensors"``); ``.bin``, ``.pt``,
    ``.pth`` -> a torch state-dict file (``"torch"``); a directory (an existing one, a
    name ending in ``/`` or a name without a suffix) -> ``"hf"`` (the base's non-weight
    files beside the weights) when ``like`` is a Hugging Face directory, else
    ``"sharded"`` (``like``'s shard layout when it has one, else one
    ``model.safetensors``). Any other name (an unknown suffix, an existing file without
    one) takes ``like``'s form.
    """
    text = os.fspath(out)
    p = Path(text)
    suffix = p.suffix.lower()
    if suffix == ".safetensors" and not p.is_dir():
        return "safetensors"
    if suffix in TORCH_SUFFIXES and not p.is_dir():
        return "torch"
    slash = text.endswith(("/", os.sep))
    as_dir = p.is_dir() or slash or (suffix == "" and not p.exists())
    if as_dir:
        return "hf" if like.form == "hf" and like.hf_dir is not None else "sharded"
    return like.form


class CheckpointWriter:
    """Write a checkpoint tensor by tensor (or chunk by chunk), atomically, in the form
    :func:`output_form` gives for ``out`` (the one its name names, else ``like``'s).

    Use as a context manager: on a clean exit the temporary output is renamed to
    ``out``; on an exception it is removed and ``out`` is left as it was.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        like: LazyCheckpoint,
        specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.out = Path(out)
        like = getattr(like, "base_checkpoint", like)  # an adapter: its base's layout
        self.like = like
        self.specs = dict(specs)
        self.metadata = dict(metadata or {})
        self.form = output_form(out, like)
        parent = self.out.parent
        if not parent.exists():
            raise CheckpointError(
                f"{self.out}: parent directory {parent} does not exist"
            )
        self.tmp = parent / f".{self.out.name}.npstune-tmp-{os.getpid()}"
        self._writers: dict[str, StreamingSafetensorsWriter] = {}
        self._route: dict[str, str] = {}
        self._torch_state: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> CheckpointWriter:
        remove_path(self.tmp)
        if self.form == "torch":
            self._torch_state = {}
            return self
        if self.form == "safetensors":
            self._open_file(self.tmp, self.specs)
            return self
        self.tmp.mkdir()
        if self.form == "hf" and self.like.hf_dir is not None:
            _copy_non_weights(self.like.hf_dir, self.tmp)
        weights = self.like.weights
        sharded = (
            self.like.form in ("sharded", "hf")
            and bool(self.like.shard_of)
            and weights.name.endswith(".index.json")
        )
        if not sharded:
            self._open_file(self.tmp / "model.safetensors", self.specs)
            return self
        first = sorted(set(self.like.shard_of.values()))[0]
        groups: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}
        for key, spec in self.specs.items():
            shard = self.like.shard_of.get(key, first)
            if shard.endswith(".bin"):
                shard = (
                    shard[: -len(".bin")].replace("pytorch_model", "model")
                    + ".safetensors"
                )
            groups.setdefault(shard, {})[key] = spec
        for shard, specs in groups.items():
            self._open_file(self.tmp / shard, specs)
        total = sum(_nbytes(s) for s in self.specs.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: self._route[k] for k in sorted(self._route)},
        }
        atomic_write_text(self.tmp / SAFETENSORS_INDEX, json.dumps(index, indent=2))
        return self

    def _open_file(
        self, path: Path, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
    ) -> None:
        w = StreamingSafetensorsWriter(path, specs, self.metadata)
        self._writers[path.name] = w
        for key in specs:
            self._route[key] = path.name

    def write(self, key: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write a whole tensor, or a flat row-major chunk beginning at element
        ``start``."""
        if self._torch_state is not None:
            shape, dtype = self.specs[key]
            if start == 0 and tensor.numel() == math.prod(shape):
                self._torch_state[key] = (
                    tensor.detach().to(dtype).reshape(shape).clone()
                )
                return
            full = self._torch_state.setdefault(key, torch.empty(shape, dtype=dtype))
            full.view(-1)[start : start + tensor.numel()] = tensor.reshape(-1)
            return
        self._writers[self._route[key]].write(key, tensor, start)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            for w in self._writers.values():
                w.abort()
            remove_path(self.tmp)
            return
        try:
            if self._torch_state is not None:
                torch.save(self._torch_state, self.tmp)
            for w in self._writers.values():
                w.close()
        except BaseException:
            remove_path(self.tmp)
            raise
        replace_path(self.tmp, self.out)


def _nbytes(spec: tuple[tuple[int, ...], torch.dtype]) -> int:
    return math.prod(spec[0]) * torch.empty((), dtype=spec[1]).element_size()


def _copy_non_weights(src: Path, dst: Path) -> None:
    for item in src.rglob("*"):
        rel = item.relative_to(src)
        if item.is_dir() or (item.parent == src and _is_weight_file(item)):
            continue
        if any(part.startswith(".") for part in rel.parts):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(item, dst / rel)


def remove_path(p: Path) -> None:
    """Delete a file, link or directory tree if it exists."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def replace_path(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` (a file or a directory whose files are synced) to
    ``out``, replacing an existing file or directory only at the end; the rename is made
    durable (:func:`~npstune.fsutil.replace_durably` for a file; the parent fsynced)."""
    if out.is_dir() and not out.is_symlink():
        old = out.parent / f".{out.name}.npstune-old-{os.getpid()}"
        remove_path(old)
        out.rename(old)
        tmp.rename(out)
        remove_path(old)
        fsync_dir(out.parent)
    elif tmp.is_dir():
        os.replace(tmp, out)
        fsync_dir(out.parent)
    else:
        replace_durably(tmp, out)


def write_state_dict(
    out: str | os.PathLike[str],
    state: Mapping[str, torch.Tensor],
    like: LazyCheckpoint | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an in-memory state dict (small models, tests) in ``like``'s form.

    Without ``like`` the form follows the suffix of ``out``: ``.safetensors`` or a torch
    file.
    """
    out = Path(out)
    specs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    if like is None:
        if out.suffix == ".safetensors":
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.parent / f".{out.name}.npstune-tmp-{os.getpid()}"
            w = StreamingSafetensorsWriter(tmp, specs, metadata)
            try:
                for k, v in state.items():
                    w.write(k, v)
                w.close()
            except BaseException:
                w.abort()
                remove_path(tmp)
                raise
            replace_durably(tmp, out)
            return out
        if out.suffix in (".pt", ".pth", ".bin"):
            buf = io.BytesIO()
            torch.save({k: v.contiguous() for k, v in state.items()}, buf)
            atomic_write_bytes(out, buf.getvalue())
            return out
        raise ConfigError(
            f"{out}: cannot infer a checkpoint form from the name; pass like="
        )
    with CheckpointWriter(out, like, specs, metadata) as writer:
        for k in sorted(state):
            writer.write(k, state[k])
    return out


def write_sharded(
    out_dir: str | os.PathLike[str],
    state: Mapping[str, torch.Tensor],
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a state dict as a sharded safetensors directory with an index
    (tests, zoo)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(state):
        nb = state[k].numel() * state[k].element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += nb
    total = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{total:05d}.safetensors"
        write_state_dict(out / name, shard, metadata=metadata)
        weight_map.update({k: name for k in shard})
    index = {
        "metadata": {
            "total_size": sum(v.numel() * v.element_size() for v in state.values())
        },
        "weight_map": weight_map,
    }
    atomic_write_text(out / SAFETENSORS_INDEX, json.dumps(index, indent=2))
    return out
