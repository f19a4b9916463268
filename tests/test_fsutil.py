"""The shared file helpers: durable atomic writes and file hashes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from npstune import fsutil
from npstune.errors import CheckpointError


def test_atomic_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    p = tmp_path / "state.json"
    p.write_text("old")
    fsutil.atomic_write_json(p, {"a": [1, 2]})
    assert p.read_text() == json.dumps({"a": [1, 2]}, indent=2) + "\n"
    fsutil.atomic_write_text(p, "héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    fsutil.atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["state.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (
        p.stat().st_mode & 0o777 == 0o666 & ~umask
    )  # open()'s mode, not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fsutil.atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]


def test_every_write_is_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))
    )
    fsutil.atomic_write_text(tmp_path / "a.txt", "x")
    assert events == ["fsync", "replace", "fsync"]  # file, rename, directory
    events.clear()
    tmp = tmp_path / ".b.tmp"
    tmp.write_text("y")
    fsutil.replace_durably(tmp, tmp_path / "b.txt")
    assert events == ["fsync", "replace", "fsync"]


def test_sha256_file_and_its_error(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc" * 1000)
    assert fsutil.sha256_file(p) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert fsutil.sha256_file(p, bufsize=7) == fsutil.sha256_file(p)
    with pytest.raises(CheckpointError, match="cannot read"):
        fsutil.sha256_file(tmp_path / "missing")
