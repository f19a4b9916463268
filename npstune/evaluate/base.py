"""The evaluator interface: a body state and a task name in, an accuracy out."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, runtime_checkable

from torch import Tensor

State = Mapping[str, Tensor]


@runtime_checkable
class Evaluator(Protocol):
    """Scores a model state on a task's labelled split (the TaskPool idea).

    ``state`` holds the body's tensors under the base checkpoint's keys; the evaluator
    adds the task's own head. ``split`` is ``"test"`` (reported numbers) or
    ``"calibration"`` (searches); the two never overlap.
    """

    def evaluate(self, state: State, task: str, split: str = "test") -> float:
        """Accuracy of ``state`` on ``task``'s ``split``."""
        ...


def evaluate_many(evaluator: Evaluator, state: State, tasks: Iterable[str],
                  split: str = "test") -> dict[str, float]:
    """Accuracy per task; uses the evaluator's own ``evaluate_many`` when it has one."""
    own = getattr(evaluator, "evaluate_many", None)
    if callable(own):
        return dict(own(state, list(tasks), split))
    return {t: float(evaluator.evaluate(state, t, split)) for t in tasks}


class CallableEvaluator:
    """Wrap ``fn(state, task, split) -> float`` as an :class:`Evaluator`."""

    def __init__(self, fn: Callable[[State, str, str], float],
                 tasks: Iterable[str] | None = None):
        self.fn = fn
        self.tasks = list(tasks) if tasks is not None else None

    def evaluate(self, state: State, task: str, split: str = "test") -> float:
        return float(self.fn(state, task, split))

    def evaluate_many(self, state: State, tasks: Iterable[str] | None = None,
                      split: str = "test") -> dict[str, float]:
        names = list(tasks) if tasks is not None else list(self.tasks or [])
        return {t: self.evaluate(state, t, split) for t in names}
