"""The evaluator interface: a body state and a task name in, an accuracy out."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypedDict, runtime_checkable

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


def evaluate_many(
    evaluator: Evaluator, state: State, tasks: Iterable[str], split: str = "test"
) -> dict[str, float]:
    """Accuracy per task; uses the evaluator's own ``evaluate_many`` when it has one."""
    own = getattr(evaluator, "evaluate_many", None)
    if callable(own):
        return dict(own(state, list(tasks), split))
    return {t: float(evaluator.evaluate(state, t, split)) for t in tasks}


class CallableEvaluator:
    """Wrap ``fn(state, task, split) -> float`` as an :class:`Evaluator`."""

    def __init__(
        self, fn: Callable[[State, str, str], float], tasks: Iterable[str] | None = None
    ):
        self.fn = fn
        self.tasks = list(tasks) if tasks is not None else None

    def evaluate(self, state: State, task: str, split: str = "test") -> float:
        return float(self.fn(state, task, split))

    def evaluate_many(
        self, state: State, tasks: Iterable[str] | None = None, split: str = "test"
    ) -> dict[str, float]:
        names = list(tasks) if tasks is not None else list(self.tasks or [])
        return {t: self.evaluate(state, t, split) for t in names}


# ---- optional parts of the protocol -------------------------------------------------
# Kinds may also define ``metric(task) -> str`` (default "accuracy"),
# ``report_value(task, score) -> float`` (the value people read, e.g. perplexity from
# the searched score -log(ppl); default: the score itself) and
# ``examples(task, split) -> int`` (how many examples a split scores) and
# ``targets() -> dict[str, Tensor]`` (the model's own tensors by state key, on its
# device and in its dtype: a streamed search candidate is written there in place, and a
# state whose tensors are those very tensors loads without a copy).


def metric_of(evaluator: Evaluator, task: str) -> str:
    """The name of ``task``'s metric ("accuracy" unless the evaluator says
    otherwise)."""
    fn = getattr(evaluator, "metric", None)
    return str(fn(task)) if callable(fn) else "accuracy"


def reported(evaluator: Evaluator, task: str, score: float) -> float:
    """The value people read for a searched ``score`` (perplexity for -log ppl)."""
    fn = getattr(evaluator, "report_value", None)
    return float(fn(task, score)) if callable(fn) else float(score)


def examples_of(evaluator: Evaluator, task: str, split: str) -> int | None:
    """How many examples ``task``'s ``split`` scores
    (None if the evaluator can't say)."""
    fn = getattr(evaluator, "examples", None)
    return int(fn(task, split)) if callable(fn) else None


class EvaluationReport(TypedDict):
    """What :func:`evaluation_report` returns (a plain dict, JSON-ready)."""

    scores: dict[str, float]
    metrics: dict[str, str]
    examples: dict[str, int | None]
    mean: float


def evaluation_report(
    evaluator: Evaluator, state: State, tasks: Iterable[str], split: str = "test"
) -> EvaluationReport:
    """The ``npstune eval --evaluator --json`` object: scores, metrics, examples, mean.

    ``scores`` holds each task's reported value (accuracy, exact match, perplexity);
    ``mean`` is their mean.
    """
    names = list(tasks)
    raw = evaluate_many(evaluator, state, names, split)
    scores = {t: reported(evaluator, t, raw[t]) for t in names}
    return {
        "scores": scores,
        "metrics": {t: metric_of(evaluator, t) for t in names},
        "examples": {t: examples_of(evaluator, t, split) for t in names},
        "mean": sum(scores.values()) / len(scores) if scores else float("nan"),
    }
