"""A built zoo on disk: its manifest, models, heads and splits (read side)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from npstune.errors import CheckpointError, ConfigError
from npstune.fsutil import sha256_file
from npstune.zoo.datasets import SPLITS
from npstune.zoo.recipe import ZooRecipe, get_recipe

ENV_VAR = "NPSTUNE_ZOO_DIR"
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``$NPSTUNE_ZOO_DIR``, else ``~/.cache/npstune/zoo``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "npstune" / "zoo"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return (
        Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    )


def zoo_dir(recipe: ZooRecipe, cache_dir: Path) -> Path:
    return cache_dir / f"{recipe.size}-{recipe.hash}"


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of the zoo at ``root``; None if absent,
    CheckpointError if corrupt."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: corrupt zoo manifest ({exc}); delete {root} and run "
            "`npstune zoo build` again"
        ) from exc
    if not isinstance(data, dict) or "tasks" not in data:
        raise CheckpointError(f"{path}: not a zoo manifest; delete {root} and rebuild")
    return data


def file_record(root: Path, rel: str) -> dict[str, Any]:
    p = root / rel
    return {"bytes": p.stat().st_size, "sha256": sha256_file(p)}


def build_command(
    size: str, cache_dir: Path | None = None, family: str = "text"
) -> str:
    """The command that builds (or repairs) a zoo, for error messages."""
    cmd = "npstune zoo build" + (f" --family {family}" if family != "text" else "")
    cmd += f" --size {size}"
    if cache_dir is not None and cache_dir != default_cache_dir():
        cmd += f" --cache-dir {cache_dir}"
    return cmd


def check_files(
    root: Path,
    files: dict[str, dict[str, Any]],
    *,
    hashes: bool,
    size: str,
    family: str = "text",
) -> None:
    """Raise CheckpointError naming the first missing, truncated or altered file."""
    for rel, rec in files.items():
        p = root / rel
        fix = f"run `{build_command(size, root.parent, family)}` to rebuild it"
        if not p.is_file():
            raise CheckpointError(f"{p}: zoo file is missing; {fix}")
        if p.stat().st_size != rec["bytes"]:
            raise CheckpointError(
                f"{p}: zoo file is corrupt ({p.stat().st_size} bytes, expected "
                f"{rec['bytes']}); {fix}"
            )
        if hashes and sha256_file(p) != rec["sha256"]:
            raise CheckpointError(f"{p}: zoo file is corrupt (sha256 mismatch); {fix}")


@dataclass(frozen=True)
class ZooTask:
    """One task of a zoo: its fine-tuned body (HF dir), head and labels."""

    name: str
    model_path: Path
    head_path: Path
    num_classes: int
    labels: tuple[str, ...]
    split_paths: dict[str, Path]
    accuracy: dict[str, float]


class Zoo:
    """A built zoo. Use :func:`load_zoo` or :func:`npstune.zoo.build_zoo` to get one."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        self._splits: dict[tuple[str, str], tuple[list[str], list[int]]] = {}

    def __repr__(self) -> str:
        return f"Zoo(size={self.size!r}, root='{self.root}', tasks={self.tasks})"

    @property
    def size(self) -> str:
        return self.manifest["recipe"]["size"]

    @property
    def recipe_hash(self) -> str:
        return self.manifest["recipe_hash"]

    @property
    def base_path(self) -> Path:
        """The pretrained body as an HF model dir."""
        return self.root / self.manifest["base"]["path"]

    @property
    def tasks(self) -> list[str]:
        """Task names in recipe order."""
        return list(self.manifest["recipe"]["tasks"])

    @cached_property
    def _task_objs(self) -> dict[str, ZooTask]:
        out = {}
        for name in self.tasks:
            t = self.manifest["tasks"][name]
            out[name] = ZooTask(
                name=name,
                model_path=self.root / t["model_path"],
                head_path=self.root / t["head_path"],
                num_classes=t["num_classes"],
                labels=tuple(t["labels"]),
                split_paths={s: self.root / p for s, p in t["split_paths"].items()},
                accuracy=dict(t["accuracy"]),
            )
        return out

    def task(self, name: str) -> ZooTask:
        try:
            return self._task_objs[name]
        except KeyError:
            raise ConfigError(
                f"task {name!r} is not in the {self.size} zoo; it has: "
                f"{', '.join(self.tasks)}"
            ) from None

    def split(self, name: str, split: str) -> tuple[list[str], list[int]]:
        """(texts, labels) of a task's ``train``, ``calibration`` or ``test`` split."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        key = (name, split)
        if key not in self._splits:
            path = self.task(name).split_paths[split]
            texts, labels = [], []
            try:
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        rec = json.loads(line)
                        texts.append(rec["text"])
                        labels.append(int(rec["label"]))
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(
                    f"{path}: corrupt split file ({exc}); run "
                    f"`{build_command(self.size, self.root.parent)}` to rebuild it"
                ) from exc
            self._splits[key] = (texts, labels)
        texts, labels = self._splits[key]
        return list(texts), list(labels)

    def verify(self, hashes: bool = True) -> None:
        """Check every file against the manifest (sizes, and sha256 with ``hashes``)."""
        check_files(
            self.root, self.manifest["base"]["files"], hashes=hashes, size=self.size
        )
        for name in self.tasks:
            check_files(
                self.root,
                self.manifest["tasks"][name]["files"],
                hashes=hashes,
                size=self.size,
            )


def load_zoo(
    size: str | ZooRecipe = "small",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = False,
) -> Zoo:
    """Open a built zoo; ConfigError if it was not built with the current recipe.

    File sizes are always checked; ``verify=True`` also checks every sha256.
    """
    recipe = get_recipe(size)
    cache = resolve_cache_dir(cache_dir)
    root = zoo_dir(recipe, cache)
    manifest = read_manifest(root)
    build_hint = f"run `{build_command(recipe.size, cache)}`"
    if manifest is None:
        raise ConfigError(
            f"the {recipe.size} zoo is not built in {cache}; {build_hint}"
        )
    pending = [
        t for t in recipe.tasks if manifest["tasks"].get(t, {}).get("status") != "built"
    ]
    if pending or manifest.get("status") != "built":
        raise ConfigError(
            f"the {recipe.size} zoo in {root} is only partly built (missing: "
            f"{', '.join(pending) or 'final checks'}); {build_hint} to finish it"
        )
    zoo = Zoo(root, manifest)
    zoo.verify(hashes=verify)
    return zoo
