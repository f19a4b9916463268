"""Calibration statistics for the data-driven merges (Fisher, RegMean, Tailor,
Grafting), from an evaluator.

The statistics themselves live in the evaluate layer, behind
:class:`~npstune.evaluate.stats.CalibrationStats` and
:class:`~npstune.evaluate.stats.GradientStats` (zoo, ``text-classification``,
``causal-lm``). :class:`EvaluatorData` maps each model of a merge to its task and asks
the evaluator for that model's statistics on at most ``examples`` calibration examples.
Merges can also be given precomputed statistics (``{"fisher": [...]}`` /
``{"gram": [...]}``, and for the gradient at a state one callable per model,
``{"gradient": [fn(state) -> {key: ∂L/∂θ}, ...]}``), which is how the tests pin the
formulas down.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from npstune.checkpoints import LazyCheckpoint
from npstune.errors import ConfigError
from npstune.evaluate.base import State
from npstune.evaluate.stats import DEFAULT_EXAMPLES, CalibrationStats, GradientStats

#: a model's loss gradient at a state: state -> {key: mean ∂L/∂θ}
GradientFn = Callable[[State], Mapping[str, Tensor]]


class _StatsEvaluator(CalibrationStats, Protocol):
    """An evaluator (every kind names its tasks) that gives calibration statistics."""

    @property
    def tasks(self) -> Sequence[str]: ...


class EvaluatorData:
    """The ``data`` of data-driven methods: an evaluator that gives statistics.

    ``task_of(model, index)`` names each model's task: by default the model's name
    (its file stem) when it is one of the evaluator's tasks, else the task at the same
    position when there are as many tasks as models.
    """

    def __init__(
        self,
        evaluator: Any,
        examples: int = DEFAULT_EXAMPLES,
        task_of: Callable[[LazyCheckpoint, int], str] | None = None,
        models: int | None = None,
    ) -> None:
        if not isinstance(evaluator, CalibrationStats):
            raise ConfigError(
                f"{type(evaluator).__name__} gives no calibration statistics; the "
                "data-driven merges (fisher, regmean, tailor, grafting) need an "
                "evaluator of kind zoo, text-classification or causal-lm"
            )
        # the check above is the statistics' part; every evaluator kind has tasks
        self.evaluator = cast(_StatsEvaluator, evaluator)
        self.examples = examples
        self._task_of = task_of
        self.models = models

    def task_of(self, model: LazyCheckpoint, index: int = 0) -> str:
        if self._task_of is not None:
            return self._task_of(model, index)
        tasks = list(self.evaluator.tasks)
        if model.name in tasks:
            return model.name
        if self.models is not None and len(tasks) == self.models:
            return tasks[index]
        raise ConfigError(
            f"{model.path}: no task named {model.name!r} in the "
            f"evaluator (tasks: {', '.join(tasks)}); name each model's "
            "file after its task, or give one task per model, in order"
        )

    def _state(self, model: LazyCheckpoint) -> dict[str, Tensor]:
        return {k: model[k] for k in model.keys()}

    def fisher(
        self, model: LazyCheckpoint, keys: list[str], index: int = 0
    ) -> dict[str, Tensor]:
        """Diagonal empirical Fisher of ``model`` on its task's calibration examples."""
        return self.evaluator.fisher(
            self._state(model), self.task_of(model, index), keys, self.examples
        )

    def grams(
        self, model: LazyCheckpoint, keys: list[str], index: int = 0
    ) -> dict[str, Tensor]:
        """Σ xᵀx of the inputs of each linear layer whose weight key is in ``keys``."""
        return self.evaluator.grams(
            self._state(model), self.task_of(model, index), keys, self.examples
        )

    def gradients(
        self,
        model: LazyCheckpoint,
        state: State,
        keys: list[str],
        index: int = 0,
        examples: int | None = None,
    ) -> dict[str, Tensor]:
        """Mean loss gradient at ``state`` on ``model``'s task's calibration examples
        (``examples``: at most that many; default this data's)."""
        ev = self.evaluator
        if not isinstance(ev, GradientStats):
            raise ConfigError(
                f"{type(ev).__name__} gives no loss gradients; grafting needs an "
                "evaluator of kind zoo, text-classification or causal-lm"
            )
        n = self.examples if examples is None else examples
        return ev.gradients(state, self.task_of(model, index), keys, n)


def zoo_data(
    zoo: Any, device: str | torch.device = "cpu", examples: int = DEFAULT_EXAMPLES
) -> EvaluatorData:
    """Zoo-backed statistics: one example per pass, each model's task by its path."""
    from npstune.evaluate import TextClassificationEvaluator

    ev = TextClassificationEvaluator(
        zoo, device=device, batch_size=1, max_examples=examples
    )

    def task_of(model: LazyCheckpoint, index: int = 0) -> str:
        path = Path(model.path).resolve()
        for name in zoo.tasks:
            mp = Path(zoo.task(name).model_path).resolve()
            if path == mp or path.is_relative_to(mp) or mp.is_relative_to(path):
                return name
        if model.name in zoo.tasks:
            return model.name
        raise ConfigError(
            f"{model.path}: not a model of the {zoo.size} zoo "
            f"(tasks: {', '.join(zoo.tasks)})"
        )

    return EvaluatorData(ev, examples, task_of)


def stats_for(data: Any, kind: str, plan: Any) -> list[Mapping[str, Tensor]]:
    """Per-model statistics ``kind`` ("fisher"/"gram"): precomputed or from ``data``."""
    if isinstance(data, Mapping):
        if kind not in data:
            raise ConfigError(f"data has no {kind!r} statistics")
        stats = list(data[kind])
        if len(stats) != len(plan.models):
            raise ConfigError(
                f"{kind}: expected {len(plan.models)} entries, got {len(stats)}"
            )
        return stats
    if data is None:
        raise ConfigError("this method needs calibration data: an evaluator or a zoo")
    if getattr(data, "models", 0) is None:
        data.models = len(plan.models)
    fn = data.fisher if kind == "fisher" else data.grams
    return [fn(m, plan.delta_keys, i) for i, m in enumerate(plan.models)]


def gradient_fns(data: Any, plan: Any, examples: int | None = None) -> list[GradientFn]:
    """Per model, its loss gradient at a state: precomputed callables
    (``{"gradient": [...]}``) or from ``data``'s evaluator over ``plan.delta_keys``."""
    if isinstance(data, Mapping):
        if "gradient" not in data:
            raise ConfigError("data has no 'gradient' statistics")
        fns = list(data["gradient"])
        if len(fns) != len(plan.models):
            raise ConfigError(
                f"gradient: expected {len(plan.models)} entries, got {len(fns)}"
            )
        if not all(callable(f) for f in fns):
            raise ConfigError("gradient: expected one callable(state) per model")
        return fns
    if data is None:
        raise ConfigError("this method needs calibration data: an evaluator or a zoo")
    if getattr(data, "models", 0) is None:
        data.models = len(plan.models)
    keys = list(plan.delta_keys)
    return [
        functools.partial(_gradient_at, data, m, keys, i, examples)
        for i, m in enumerate(plan.models)
    ]


def _gradient_at(
    data: EvaluatorData,
    model: LazyCheckpoint,
    keys: list[str],
    index: int,
    examples: int | None,
    state: State,
) -> Mapping[str, Tensor]:
    return data.gradients(model, state, keys, index, examples)


def data_for(
    zoo_size: str | None,
    device: Any = "cpu",
    evaluator: str | None = None,
    base: str | None = None,
) -> EvaluatorData:
    """The data of ``npstune merge --method fisher|regmean``: ``--evaluator FILE``
    (its calibration split; architecture from ``base``) or ``--zoo SIZE``."""
    if evaluator:
        from npstune.evaluate.spec import load_evaluator_file

        ev = load_evaluator_file(evaluator).build(
            model=base, device=str(device), batch_size=1, prepare=("calibration",)
        )
        return EvaluatorData(ev)
    if not zoo_size:
        raise ConfigError(
            "this method needs calibration data: pass --evaluator FILE "
            "or --zoo small|full"
        )
    from npstune.zoo import load_zoo

    return zoo_data(load_zoo(zoo_size), device=device)
