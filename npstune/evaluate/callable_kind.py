"""Kind ``callable``: any ``fn(state, task, split) -> float`` named as ``module:attr``.

```yaml
kind: callable
function: myeval:accuracy     # the file's directory is importable
tasks: [a, b]                 # optional: the tasks it scores
```
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import field_validator

from npstune.errors import ConfigError
from npstune.evaluate.base import CallableEvaluator
from npstune.evaluate.kinds import BuildContext, EvaluatorKind, KindOptions


class DottedCallable:
    """``"module:attr"`` resolved lazily (so it pickles by name and imports in workers).

    ``search_path`` (the config file's directory) is put on ``sys.path`` first.
    """

    def __init__(self, target: str, search_path: str | None = None) -> None:
        self.target, self.search_path = target, search_path
        self._fn: Callable[..., float] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"target": self.target, "search_path": self.search_path, "_fn": None}

    def resolve(self) -> Callable[..., float]:
        if self._fn is None:
            if self.search_path and self.search_path not in sys.path:
                sys.path.insert(0, self.search_path)
            module, attr = self.target.split(":")
            try:
                obj: Any = importlib.import_module(module)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(
                    f"evaluator function {self.target!r} cannot be loaded: {exc}"
                ) from None
            if not callable(obj):
                raise ConfigError(f"evaluator function {self.target!r} is not callable")
            self._fn = obj
        return self._fn

    def __call__(
        self, state: Mapping[str, torch.Tensor], task: str, split: str
    ) -> float:
        return float(self.resolve()(state, task, split))


class CallableOptions(KindOptions):
    """``function: module:attr`` and, optionally, the task names it scores."""

    function: str
    tasks: list[str] | None = None

    @field_validator("function")
    @classmethod
    def _dotted(cls, v: str) -> str:
        if not re.fullmatch(r"[\w.]+:[\w.]+", v):
            raise ValueError("expected 'module:attr'")
        return v


def build(options: CallableOptions, ctx: BuildContext) -> CallableEvaluator:
    """Resolve the function now (fail early, in the driver) and wrap it."""
    fn = DottedCallable(options.function, str(ctx.root.resolve()))
    fn.resolve()
    tasks = (
        options.tasks
        if options.tasks is not None
        else (list(ctx.tasks) if ctx.tasks is not None else None)
    )
    return CallableEvaluator(fn, tasks)


KIND = EvaluatorKind(
    "callable",
    CallableOptions,
    build,
    summary="a Python function fn(state, task, split) -> float",
    needs_model=False,
)
