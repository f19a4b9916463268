"""Evaluators: a model state and a task in, an accuracy out (DESIGN §5).

- :class:`TextClassificationEvaluator`: zoo text tasks, body + the task's own head.
- :class:`CallableEvaluator`: any ``fn(state, task, split) -> float``.
- :class:`~npstune.evaluate.clip.ClipZeroShotEvaluator`: CLIP zero-shot heads (needs the
  ``clip`` extra; imported lazily).
"""

from __future__ import annotations

from typing import Any

from npstune.evaluate.base import CallableEvaluator, Evaluator, State, evaluate_many

__all__ = [
    "CallableEvaluator",
    "ClipZeroShotEvaluator",
    "Evaluator",
    "State",
    "TextClassificationEvaluator",
    "evaluate_many",
]


def __getattr__(name: str) -> Any:  # lazy: keep `import npstune.evaluate` light
    if name == "TextClassificationEvaluator":
        from npstune.evaluate.text import TextClassificationEvaluator

        return TextClassificationEvaluator
    if name == "ClipZeroShotEvaluator":
        from npstune.evaluate.clip import ClipZeroShotEvaluator

        return ClipZeroShotEvaluator
    raise AttributeError(f"module 'npstune.evaluate' has no attribute {name!r}")
