"""Block codec: the kept entries of one row-major range of one tensor, as three blobs.

- positions: whichever is smaller of (a) the gaps between consecutive kept indices
  (``np.diff``), stored in the narrowest unsigned width that holds the largest gap,
  byte-shuffled, zstd; (b) the keep-mask packed to bits (``np.packbits``), zstd. Both
  land near the entropy of the mask (gaps win at small k, the bitmask at large k).
  Codecs: ``none`` (nothing kept), ``all`` (everything kept), ``bits``, ``gaps1|2|4|8``.
- values: one value per kept entry in the value dtype, byte-shuffled (byte j of every
  value together: sign/exponent bytes repeat a lot, mantissa bytes hardly), zstd.
- exceptions: uncompressed ``uint64`` indices into the kept list, then the exact output
  values (checkpoint dtype) there. A lossless store writes one where the stored value
  does not rebuild the merge output bit for bit (rare: large cancellations, fp16
  overflow).

All multi-byte data is little-endian. Pure functions: no I/O, no checksums (the store
adds those).
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from npstune.errors import CheckpointError

POSITION_CODECS = ("none", "all", "bits", "gaps1", "gaps2", "gaps4", "gaps8")
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def shuffle(raw: np.ndarray, width: int) -> bytes:
    """Byte planes: byte 0 of every item, then byte 1, ... (``raw`` is flat uint8)."""
    return raw.reshape(-1, width).T.tobytes() if width > 1 else raw.tobytes()


def unshuffle(data: bytes, width: int) -> np.ndarray:
    """Inverse of :func:`shuffle`: a flat uint8 array in item order."""
    arr = np.frombuffer(data, dtype=np.uint8)
    out = arr.reshape(width, -1).T.reshape(-1) if width > 1 else arr
    return out if out.flags.writeable else out.copy()


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor,
    as a signed integer tensor of equal width."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def encode_positions(
    mask: torch.Tensor, cctx: zstandard.ZstdCompressor
) -> tuple[str, bytes]:
    """(codec, blob) of a flat boolean keep-mask."""
    m = mask.cpu().numpy()
    kept = int(m.sum())
    if kept == 0:
        return "none", b""
    if kept == m.size:
        return "all", b""
    bits = cctx.compress(np.packbits(m, bitorder="little").tobytes())
    gaps = np.diff(np.flatnonzero(m), prepend=-1) - 1
    width = next(w for w in (1, 2, 4, 8) if int(gaps.max()) < 1 << (8 * w))
    raw = gaps.astype(f"<u{width}").view(np.uint8)
    gap_blob = cctx.compress(shuffle(raw, width))
    return ("bits", bits) if len(bits) < len(gap_blob) else (f"gaps{width}", gap_blob)


def decode_positions(
    codec: str, blob: bytes, n: int, kept: int, where: str
) -> torch.Tensor:
    """Kept indices (int64, ascending) of a block of ``n`` entries;
    errors name ``where``."""
    if codec == "none":
        idx = np.empty(0, dtype=np.int64)
    elif codec == "all":
        idx = np.arange(n, dtype=np.int64)
    elif codec == "bits":
        raw = _unzstd(blob, (n + 7) // 8, where)
        mask = np.unpackbits(np.frombuffer(raw, np.uint8), count=n, bitorder="little")
        idx = np.flatnonzero(mask).astype(np.int64)
    elif codec.startswith("gaps") and codec in POSITION_CODECS:
        width = int(codec[4:])
        packed = unshuffle(_unzstd(blob, kept * width, where), width)
        gaps = packed.view(f"<u{width}").astype(np.int64)
        idx = np.cumsum(gaps + 1) - 1
    else:
        raise CheckpointError(f"{where}: unknown position codec {codec!r}")
    if idx.size != kept or (idx.size and (idx[-1] >= n or idx[0] < 0)):
        raise CheckpointError(
            f"{where}: positions do not match the manifest (corrupted?)"
        )
    return torch.from_numpy(idx)


def encode_values(values: torch.Tensor, cctx: zstandard.ZstdCompressor) -> bytes:
    """Byte-shuffled, zstd-compressed values (flat, any dtype)."""
    if values.numel() == 0:
        return b""
    v = values.contiguous().cpu()
    return cctx.compress(shuffle(v.view(torch.uint8).numpy(), v.element_size()))


def decode_values(
    blob: bytes, dtype: torch.dtype, count: int, where: str
) -> torch.Tensor:
    """Inverse of :func:`encode_values`."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    width = torch.empty((), dtype=dtype).element_size()
    raw = unshuffle(_unzstd(blob, count * width, where), width)
    return torch.from_numpy(raw).view(dtype)


def encode_exceptions(idx: torch.Tensor, exact: torch.Tensor) -> bytes:
    """Indices into the kept list (uint64) followed by the exact values' bytes."""
    if idx.numel() == 0:
        return b""
    head = idx.cpu().numpy().astype("<u8").tobytes()
    return head + exact.contiguous().cpu().view(torch.uint8).numpy().tobytes()


def decode_exceptions(
    blob: bytes, count: int, dtype: torch.dtype, kept: int, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices into the kept list, exact values) of :func:`encode_exceptions`."""
    width = torch.empty((), dtype=dtype).element_size()
    if len(blob) != count * (8 + width):
        raise CheckpointError(
            f"{where}: exception list has the wrong size (corrupted?)"
        )
    if count == 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=dtype)
    idx = np.frombuffer(blob[: 8 * count], dtype="<u8").astype(np.int64)
    if int(idx.max()) >= kept:
        raise CheckpointError(f"{where}: exception index out of range (corrupted?)")
    vals = torch.from_numpy(np.frombuffer(blob[8 * count :], np.uint8).copy()).view(
        dtype
    )
    return torch.from_numpy(idx), vals


def _unzstd(blob: bytes, size: int, where: str) -> bytes:
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CheckpointError(
            f"{where}: cannot decompress ({exc}; corrupted?)"
        ) from exc
    if len(raw) != size:
        raise CheckpointError(
            f"{where}: decoded {len(raw)} bytes, expected {size} (corrupted?)"
        )
    return raw
