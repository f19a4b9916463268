"""Evaluator kinds: a name -> a small module's ``KIND`` (like the merge registry).

A kind turns the kind-specific part of an evaluator file (validated by its own pydantic
``options`` model) plus a :class:`BuildContext` (the model directory, the file's
directory, device, limits) into an :class:`~npstune.evaluate.base.Evaluator`.
Third-party kinds register through the ``npstune.evaluators`` entry-point group, each
pointing at an :class:`EvaluatorKind`. A new kind is one file plus one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

#: Built-in kinds: name -> "module:KIND", imported on first use.
KINDS: dict[str, str] = {
    "zoo": "npstune.evaluate.zoo_kind:KIND",
    "text-classification": "npstune.evaluate.text_classification:KIND",
    "causal-lm": "npstune.evaluate.causal_lm:KIND",
    "clip": "npstune.evaluate.clip_kind:KIND",
    "callable": "npstune.evaluate.callable_kind:KIND",
}

SPLITS = ("calibration", "test")

#: ``precision`` of an evaluator's forward passes: ``auto`` (bf16 autocast on CUDA
#: and on CPUs with native bf16, fp32 elsewhere:
#: :func:`npstune.evaluate.hf.autocast_dtype`), ``fp32`` or ``bf16`` (forced).
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def check_precision(precision: str, source: str = "evaluator") -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; a one-line ConfigError naming
    ``source`` otherwise."""
    if precision not in PRECISIONS:
        from npstune.errors import ConfigError

        valid = ", ".join(PRECISIONS)
        raise ConfigError(f"{source}: precision {precision!r}: expected one of {valid}")
    return precision


class KindOptions(BaseModel):
    """Base of every kind's options model: frozen, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class BuildContext:
    """What a kind needs beyond its own options.

    Attributes:
        model: the model whose architecture, config and tokenizer the evaluator uses
            (an HF directory; the file's own ``model:`` wins). ``None`` if unknown.
        root: the directory relative paths in the evaluator file resolve against.
        device: where inference runs.
        batch_size: examples per forward pass.
        max_examples: per split, score only the first N examples (None: all).
        fraction: per split, then keep this fraction of them (ablations; 1 = all).
        zoo: a built zoo (kind ``zoo`` only).
        tasks: the tasks that will be scored (None: all the file names).
        prepare: splits to load and tokenize now (so workers never read data files).
        precision: ``auto``, ``fp32`` or ``bf16``: the autocast of forward passes
            (:func:`npstune.evaluate.hf.autocast_dtype`).
        source: where the options came from, for error messages.
    """

    model: Path | None = None
    root: Path = Path(".")
    device: str = "cpu"
    batch_size: int = 32
    max_examples: Mapping[str, int | None] = field(default_factory=dict)
    fraction: Mapping[str, float] = field(default_factory=dict)
    zoo: Any = None
    tasks: tuple[str, ...] | None = None
    prepare: tuple[str, ...] = ()
    precision: str = "auto"
    source: str = "evaluator"

    def path(self, p: str | Path) -> Path:
        """``p`` resolved against the file's directory (absolute paths kept)."""
        q = Path(p).expanduser()
        return q if q.is_absolute() else (self.root / q)

    def limit(self, split: str, n: int) -> int:
        """How many of a split's ``n`` examples to score."""
        m = self.max_examples.get(split)
        k = n if m is None else min(n, m)
        frac = self.fraction.get(split, 1.0)
        return max(1, int(k * frac + 1e-9)) if k else 0


@dataclass(frozen=True)
class EvaluatorKind:
    """A registered evaluator kind.

    Attributes:
        name: the ``kind:`` value of evaluator files.
        options: pydantic model of the kind's own keys.
        build: ``build(options, ctx) -> Evaluator``.
        summary: one line for ``npstune methods``-style listings.
        needs_model: whether the kind loads a model architecture (an HF dir).
    """

    name: str
    options: type[KindOptions]
    build: Callable[[Any, BuildContext], Any]
    summary: str = ""
    needs_model: bool = True


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="npstune.evaluators")}


def kind_names() -> list[str]:
    """Every registered kind (built-ins and plugins)."""
    return sorted({**KINDS, **_plugins()})


def get_kind(name: str) -> EvaluatorKind:
    """The kind registered under ``name``; ConfigError listing valid names otherwise."""
    from npstune.lazy import load_entry

    return load_entry(
        "evaluator kind", name, {**_plugins(), **KINDS}, kind_names(), EvaluatorKind
    )
