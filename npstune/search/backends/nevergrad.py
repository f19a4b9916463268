"""nevergrad's ``ParametrizedCMA`` through Ray Tune's own ``NevergradSearch``.

The parametrization is the unit box of :class:`~npstune.search.space.ParamSpace` (an
``ng.p.Array`` with bounds [0, 1], mutation sigma = ``sigma0``), seeded with ``seed``.
:class:`GenerationalNevergradSearch` adds what the product needs on top of Ray's class:
one generation (``population`` asks) in flight at a time, the penalty for failed or
non-finite trials (Ray's class drops errors and tells NaN), ``generation``/``index``
tags, natural values in trial configs, and a versioned state. It is wrapped in a
``ConcurrencyLimiter`` (``batch=False``: the searcher already waits for its generation).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import nevergrad as ng
import numpy as np
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.nevergrad import NevergradSearch

from npstune.errors import SearchError
from npstune.search.backends.state import (
    STATE_VERSION,
    check_state,
    read_state,
    value_or_penalty,
    write_state,
)
from npstune.search.space import METRIC, MODE, ParamSpace


class GenerationalNevergradSearch(NevergradSearch):
    """``NevergradSearch`` asking and telling one generation at a time (see module
    doc)."""

    def __init__(
        self,
        space: ParamSpace,
        *,
        population: int,
        sigma0: float,
        seed: int,
        generations: int,
        penalty: float = 0.0,
        metric: str = METRIC,
        mode: str = MODE,
    ) -> None:
        if space.dim == 1 and importlib.util.find_spec("fcmaes") is None:
            # nevergrad's CMA switches to the fcmaes package for one dimension and
            # fails at the first ask without it: say so before any trial runs
            raise SearchError(
                "backend nevergrad: a one-parameter search needs the fcmaes package "
                "(nevergrad's CMA uses it for one dimension): pip install fcmaes, or "
                "use backend: cma"
            )
        param = ng.p.Array(init=space.x0(), lower=0.0, upper=1.0).set_mutation(
            sigma=sigma0
        )
        param.random_state = np.random.RandomState(seed)
        opt = ng.optimizers.ParametrizedCMA(popsize=population)(
            parametrization=param, budget=population * generations
        )
        self.names = list(space.names)
        super().__init__(
            optimizer=opt,
            space=[f"x{i}" for i in range(space.dim)],
            metric=metric,
            mode=mode,
        )
        self.ps = space
        self.population, self.generations, self.penalty = (
            population,
            generations,
            penalty,
        )
        self.generation = 0
        self._asked_in_gen = self._done_in_gen = 0
        self._index: dict[str, int] = {}
        #: why the optimizer could not go on (its tell raised); see CmaSearcher
        self.failure: str | None = None

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        if config:
            raise SearchError(
                "the nevergrad backend owns its search space; pass param_space={}"
            )
        return True

    # Ray's hint (dict | None) leaves out Searcher.FINISHED, a str Ray itself returns
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        if self.generation >= self.generations or self.failure:
            return Searcher.FINISHED
        if self._asked_in_gen >= self.population:
            return None  # wait for this generation to finish
        raw = super().suggest(trial_id)
        assert raw is not None  # NevergradSearch.suggest returns a config or raises
        x = [raw[f"x{i}"] for i in range(self.ps.dim)]
        i = self._index[trial_id] = self._asked_in_gen
        self._asked_in_gen += 1
        return {**self.ps.from_unit(x), "generation": self.generation, "index": i}

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id not in self._live_trial_mapping:
            return
        raw = None if error or not result else result.get(self._metric)
        value = value_or_penalty(raw, self.penalty)
        candidate = self._live_trial_mapping.pop(trial_id)
        self._index.pop(trial_id, None)
        opt = self._nevergrad_opt
        assert opt is not None  # set up before any trial was suggested
        try:
            opt.tell(candidate, self._metric_op * value)
        except Exception as exc:  # noqa: BLE001 - Ray would log it and wait forever
            self.failure = f"nevergrad: {type(exc).__name__}: {exc}"
            return
        self._done_in_gen += 1
        if self._done_in_gen >= self.population:
            self.generation += 1
            self._asked_in_gen = self._done_in_gen = 0

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "backend": "nevergrad",
            "names": self.names,
            "population": self.population,
            "optimizer": self._nevergrad_opt,
            "generation": self.generation,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        check_state(state, "nevergrad", self.names, self.population)
        self._nevergrad_opt, self.generation = state["optimizer"], state["generation"]
        self._asked_in_gen = self._done_in_gen = 0
        self._live_trial_mapping, self._index = {}, {}

    def save(self, checkpoint_path: str) -> None:
        write_state(checkpoint_path, self.get_state())

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(read_state(checkpoint_path))


def make(
    space: ParamSpace, settings: Any, population: int, concurrency: int
) -> ConcurrencyLimiter:
    """The ``nevergrad`` backend, wrapped in a ConcurrencyLimiter."""
    inner = GenerationalNevergradSearch(
        space,
        population=population,
        sigma0=settings.sigma0,
        seed=settings.seed,
        generations=settings.generations,
        penalty=settings.penalty,
    )
    return ConcurrencyLimiter(inner, max_concurrent=concurrency, batch=False)
