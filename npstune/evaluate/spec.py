"""Evaluator files: YAML naming a kind, its tasks and their data (DESIGN §8).

```yaml
kind: causal-lm            # any registered kind (npstune.evaluate.kinds)
model: null                # optional: HF dir whose config/tokenizer to use
batch_size: 16             # optional
precision: auto            # optional: auto | fp32 | bf16 (forward-pass autocast)
tasks: {...}               # the kind's own keys (its options model) from here on
```

Relative paths are relative to the file. A search-space file may name such a file
(``evaluator: eval.yaml``) or hold the same keys inline under ``evaluator:``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from npstune.errors import ConfigError, first_line
from npstune.evaluate.kinds import BuildContext, KindOptions, check_precision, get_kind

#: Keys every evaluator file may hold besides its kind's own.
COMMON_KEYS = ("kind", "model", "batch_size", "precision")


@dataclass(frozen=True)
class EvaluatorFile:
    """A validated evaluator description."""

    kind: str
    options: KindOptions
    root: Path
    model: Path | None = None
    batch_size: int | None = None
    source: str = "evaluator"
    precision: str | None = None

    def build(
        self,
        *,
        model: str | Path | None = None,
        device: str = "cpu",
        batch_size: int | None = None,
        max_examples: Mapping[str, int | None] | None = None,
        fraction: Mapping[str, float] | None = None,
        zoo: Any = None,
        tasks: Sequence[str] | None = None,
        prepare: Sequence[str] = (),
        precision: str | None = None,
    ) -> Any:
        """The evaluator, with ``prepare``'s splits loaded (the file's model wins;
        ``precision`` given here wins over the file's, whose default is ``auto``)."""
        kind = get_kind(self.kind)
        m = self.model or (Path(model) if model is not None else None)
        if kind.needs_model and m is None:
            raise ConfigError(
                f"{self.source}: kind {self.kind} needs a model directory "
                "(give model: in the file, or evaluate an HF directory)"
            )
        if m is not None and m.is_file() and self.model is None:
            m = m.parent if (m.parent / "config.json").is_file() else m
        ctx = BuildContext(
            model=m,
            root=self.root,
            device=device,
            batch_size=batch_size or self.batch_size or 32,
            max_examples=dict(max_examples or {}),
            fraction=dict(fraction or {}),
            zoo=zoo,
            tasks=tuple(tasks) if tasks is not None else None,
            prepare=tuple(prepare),
            precision=check_precision(
                precision or self.precision or "auto", self.source
            ),
            source=self.source,
        )
        return kind.build(self.options, ctx)


def parse_evaluator(
    data: Mapping[str, Any], root: str | Path, source: str = "evaluator"
) -> EvaluatorFile:
    """Validate an evaluator mapping (a file's content or a search's inline section)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with kind: and tasks:")
    if "kind" not in data:
        raise ConfigError(f"{source}: kind: is missing")
    kind = get_kind(str(data["kind"]))
    root = Path(root)
    opts = {k: v for k, v in data.items() if k not in COMMON_KEYS}
    try:
        options = kind.options.model_validate(opts)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {one_line(exc)}") from None
    bs = data.get("batch_size")
    if bs is not None and (not isinstance(bs, int) or bs < 1):
        raise ConfigError(f"{source}: batch_size: expected an integer >= 1, got {bs!r}")
    precision = data.get("precision")
    if precision is not None:
        check_precision(str(precision), source)
    model = data.get("model")
    mp = None
    if model:
        mp = Path(str(model)).expanduser()
        mp = mp if mp.is_absolute() else root / mp
        if not mp.exists():
            raise ConfigError(f"{source}: model: {mp} does not exist")
    return EvaluatorFile(
        kind.name,
        options,
        root,
        mp,
        bs,
        source,
        str(precision) if precision is not None else None,
    )


def load_evaluator_file(path: str | Path) -> EvaluatorFile:
    """Read and validate an evaluator YAML file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such evaluator file") from None
    except (OSError, yaml.YAMLError) as exc:
        first = first_line(exc)
        raise ConfigError(f"{p}: not valid YAML ({first})") from None
    return parse_evaluator(data or {}, p.resolve().parent, str(p))


def one_line(exc: ValidationError) -> str:
    """A pydantic error as ``loc: message; loc: message``
    (union branch names dropped)."""
    out = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"] if not _is_branch(str(x))) or "config"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        out.append(f"{loc}: {msg.removeprefix('Value error, ')}")
    return "; ".join(dict.fromkeys(out))


def _is_branch(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list", "dict") or "[" in part
