"""File helpers shared by every package: durable atomic writes and file hashes.

An atomic write goes to a temporary sibling, which is flushed and fsynced, then renamed
over the target (``os.replace``), then the directory is fsynced so that the rename
itself survives a crash: a reader sees the old file or the new one, never a part of
either.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from npstune.errors import CheckpointError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "replace_durably",
    "sha256_file",
]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync directory ``path`` (makes a rename inside it durable); a no-op where the
    platform cannot open directories (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Rename the finished file ``tmp`` over ``path``: fsync ``tmp``, ``os.replace``,
    then fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring)."""
    path = Path(path)
    # a unique sibling, created with the usual permissions (0666 & ~umask, as open()
    # gives; mkstemp would make it 0600)
    tmp = (
        path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.npstune-tmp"
    )
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(
    path: str | os.PathLike[str], text: str, encoding: str = "utf-8"
) -> Path:
    """Write ``text`` to ``path`` atomically and durably."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(
    path: str | os.PathLike[str], data: Any, *, indent: int | None = 2, **dumps: Any
) -> Path:
    """Write ``data`` as JSON (``indent`` 2, a final newline) atomically and durably;
    ``dumps`` go to :func:`json.dumps` (e.g. ``default=float``)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, **dumps) + "\n")


def sha256_file(path: str | os.PathLike[str], bufsize: int = 1 << 23) -> str:
    """Hex sha256 of a file, read in 8 MiB pieces; CheckpointError naming the file when
    it cannot be read."""
    h = hashlib.sha256()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    try:
        with open(path, "rb") as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    return h.hexdigest()
