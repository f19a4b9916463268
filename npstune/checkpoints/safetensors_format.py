"""The safetensors file format, read and written tensor by tensor.

Layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length,
a JSON header ``{key: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
{...}}``, then the raw little-endian tensor bytes. We parse the header ourselves so a
truncated file is caught before any tensor is read, and we write files in a streaming
fashion: the header is known from the plan (shapes and dtypes), so each tensor goes
straight to its offset and no full state dict is ever held in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from npstune.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
ALIGN = 8


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and byte range (relative to the data section) of one stored
    tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Element count."""
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns (tensor infos by key, metadata, byte offset of the data section). Raises
    CheckpointError naming the file when the header is malformed or the file is shorter
    than the header says (a truncated download or copy).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file (file too short)"
                )
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > MAX_HEADER or 8 + hlen > size:
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header length "
                    f"{hlen} but file has {size} bytes)"
                )
            header = json.loads(f.read(hlen))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header")
    meta = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    data_len = size - 8 - hlen
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}:{key}: malformed header entry ({exc})"
            ) from exc
        info = TensorInfo(shape, dtype, begin, end)
        if end - begin != info.numel * _itemsize(dtype):
            raise CheckpointError(
                f"{path}:{key}: byte range does not match shape {shape}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}:{key}: file is truncated (tensor ends at byte {end} of the "
                f"data section, which has only {data_len} bytes)"
            )
        infos[key] = info
    return infos, dict(meta), 8 + hlen


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """Write one safetensors file tensor by tensor, at offsets fixed up front.

    ``specs`` maps key -> (shape, dtype) for every tensor the file will hold. Tensors
    may then be written in any order with :meth:`write`; :meth:`close` checks that every
    key was written. The file is written to ``path`` directly: callers make it atomic by
    writing into a temporary location and renaming (see ``checkpoints.io``).
    """

    def __init__(
        self,
        path: Path,
        specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        header: dict[str, object] = {}
        meta = {"format": "pt", **(metadata or {})}
        header["__metadata__"] = {str(k): str(v) for k, v in meta.items()}
        self._offsets: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
        pos = 0
        for key in sorted(specs):
            shape, dtype = specs[key]
            if dtype not in DTYPE_NAMES:
                raise CheckpointError(f"{path}:{key}: dtype {dtype} cannot be stored")
            nbytes = _itemsize(dtype)
            for s in shape:
                nbytes *= int(s)
            header[key] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": [int(s) for s in shape],
                "data_offsets": [pos, pos + nbytes],
            }
            self._offsets[key] = (pos, nbytes, tuple(int(s) for s in shape), dtype)
            pos += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(len(blob) + 8) % ALIGN)
        self._data_start = 8 + len(blob)
        self._written: set[str] = set()
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)))
        self._fh.write(blob)
        self._fh.truncate(self._data_start + pos)

    def write(self, key: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write ``tensor`` (or a row-major chunk of it beginning at element
        ``start``)."""
        try:
            off, nbytes, shape, dtype = self._offsets[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: key {key!r} was not planned") from None
        if tensor.dtype != dtype:
            raise CheckpointError(
                f"{self.path}:{key}: expected dtype {dtype}, got {tensor.dtype}"
            )
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        item = flat.element_size()
        if start * item + flat.numel() * item > nbytes:
            raise CheckpointError(
                f"{self.path}:{key}: chunk runs past the tensor's end"
            )
        self._fh.seek(self._data_start + off + start * item)
        if flat.numel():
            self._fh.write(flat.view(torch.uint8).numpy().data)
        if start * item + flat.numel() * item == nbytes:
            self._written.add(key)

    def close(self) -> None:
        """Flush and close; raise if a planned tensor was never written in full."""
        missing = set(self._offsets) - self._written
        zero = {k for k in missing if self._offsets[k][1] == 0}
        missing -= zero
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if missing:
            raise CheckpointError(
                f"{self.path}: tensors never written: {', '.join(sorted(missing)[:5])}"
            )

    def abort(self) -> None:
        """Close without checks (the caller removes the temporary file)."""
        if not self._fh.closed:
            self._fh.close()
