"""CMA-ES (pycma ask/tell) behind a Ray Tune ``Searcher``: one candidate per trial.

CMA-ES works in the unit box ``[0, 1]^n`` of :class:`~npstune.search.space.ParamSpace`
(pycma's ``BoundTransform`` keeps candidates inside), so ``sigma0`` is a fraction of
every parameter's range. A generation is asked when its first trial is requested, handed
out one candidate per trial, and told when its last trial finishes; failed, NaN or ±inf
trials get ``penalty``, so a generation always completes. Each generation is sampled
under its own seed (``seed``, generation), so a search restored from :meth:`save` asks
exactly the candidates the uninterrupted one would have, whatever else used numpy's
global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import cma
import numpy as np
from ray.tune.search import ConcurrencyLimiter, Searcher

from npstune.errors import SearchError
from npstune.search.backends.state import (
    STATE_VERSION,
    check_state,
    read_state,
    value_or_penalty,
    write_state,
)
from npstune.search.space import METRIC, MODE, ParamSpace


@contextmanager
def seeded(seed: int, generation: int) -> Iterator[None]:
    """Seed numpy's global RNG (pycma samples from it) and restore it afterwards."""
    saved = np.random.get_state()
    np.random.seed((seed * 1_000_003 + generation + 1) % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)


class CmaSearcher(Searcher):
    """Generational CMA-ES; metric/mode are given here only (never to TuneConfig)."""

    def __init__(
        self,
        space: ParamSpace,
        *,
        population: int,
        sigma0: float,
        seed: int,
        generations: int,
        penalty: float = 0.0,
        max_concurrent: int | None = None,
        metric: str = METRIC,
        mode: str = MODE,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.space = space
        self.population, self.seed, self.generations = population, seed, generations
        self.penalty = float(penalty)
        self.max_concurrent = max_concurrent or population
        opts = {
            "bounds": [0.0, 1.0],
            "popsize": population,
            "seed": seed,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        if space.dim == 1:
            # pycma 4.x caps each std at 1/3 of the bounds' range, and for one
            # dimension that cap raises inside tell() ("not yet initialized") the
            # first time it applies: no cap there (a search it would have stopped)
            opts["maxstd"] = math.inf
        with seeded(seed, -1):
            self.es = cma.CMAEvolutionStrategy(list(space.x0()), sigma0, opts)
        self.generation = 0  # finished (told) generations
        self.best: tuple[float, dict[str, Any]] | None = None
        #: why the optimizer could not go on (its tell raised); the search then ends
        #: and the runner reports it, instead of Ray logging it and waiting forever
        self.failure: str | None = None
        self._reset_generation()

    def _reset_generation(self) -> None:
        self._asked: list[np.ndarray] | None = None
        self._next = 0
        self._values: dict[int, float] = {}
        self._live_trial_mapping: dict[str, int] = {}  # trial_id -> index in generation

    # -- Searcher API
    # ----------------------------------------------------------------------
    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        if config:
            raise SearchError(
                "the cma backend owns its search space; pass param_space={}"
            )
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = max_concurrent
        return True

    # Ray's hint (dict | None) leaves out Searcher.FINISHED, a str Ray itself returns
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        if self.generation >= self.generations or self.failure:
            return Searcher.FINISHED
        if self._asked is None:
            with seeded(self.seed, self.generation):
                self._asked = [np.asarray(x, dtype=float) for x in self.es.ask()]
        if (
            self._next >= len(self._asked)
            or len(self._live_trial_mapping) >= self.max_concurrent
        ):
            return None  # wait for this generation to finish
        i = self._next
        self._next += 1
        self._live_trial_mapping[trial_id] = i
        return {
            **self.space.from_unit(self._asked[i]),
            "generation": self.generation,
            "index": i,
        }

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        i = self._live_trial_mapping.pop(trial_id, None)
        if i is None:
            return
        raw = None if error or not result else result.get(self._metric)
        value = self.value_of(raw)
        self._values[i] = value
        if self.best is None or self._better(value, self.best[0]):
            assert self._asked is not None
            self.best = (value, self.space.from_unit(self._asked[i]))
        if self._asked is not None and len(self._values) == len(self._asked):
            losses = [self._loss(self._values[j]) for j in range(len(self._asked))]
            try:
                self.es.tell(self._asked, losses)
            except Exception as exc:  # noqa: BLE001 - Ray would log it and wait forever
                self.failure = f"cma: {type(exc).__name__}: {exc}"
                return
            self.generation += 1
            self._reset_generation()

    def value_of(self, raw: Any) -> float:
        """A reported metric, or the penalty when it is missing, NaN or infinite."""
        return value_or_penalty(raw, self.penalty)

    def _loss(self, value: float) -> float:
        return -value if self._mode == "max" else value

    def _better(self, a: float, b: float) -> bool:
        return a > b if self._mode == "max" else a < b

    # -- state
    # -----------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Versioned state: the strategy and the bookkeeping of finished generations.

        A generation in flight is not part of it: restoring re-asks it (same
        candidates).
        """
        return {
            "version": STATE_VERSION,
            "backend": "cma",
            "names": list(self.space.names),
            "population": self.population,
            "seed": self.seed,
            "es": self.es,
            "generation": self.generation,
            "best": self.best,
            "metric": self._metric,
            "mode": self._mode,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        check_state(state, "cma", list(self.space.names), self.population)
        self.es, self.generation, self.best = (
            state["es"],
            state["generation"],
            state["best"],
        )
        _rebind_randn(self.es)
        self.seed, self._metric, self._mode = (
            state["seed"],
            state["metric"],
            state["mode"],
        )
        self._reset_generation()

    def save(self, checkpoint_path: str) -> None:
        write_state(checkpoint_path, self.get_state())

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(read_state(checkpoint_path))


def _rebind_randn(es: Any) -> None:
    """Point an unpickled strategy back at numpy's global RNG.

    pycma keeps ``np.random.randn`` (a bound method of the global RandomState) in its
    options and sampler; pickling copies that RandomState, so a restored strategy would
    sample from a private copy that :func:`seeded` does not reach.
    """
    for holder in (es.opts, getattr(getattr(es, "sm", None), "__dict__", {})):
        for key, val in list(holder.items()):
            if isinstance(getattr(val, "__self__", None), np.random.RandomState):
                holder[key] = np.random.randn


def make(
    space: ParamSpace, settings: Any, population: int, concurrency: int
) -> ConcurrencyLimiter:
    """The ``cma`` backend, wrapped in a ``ConcurrencyLimiter``.

    The searcher enforces ``concurrency`` itself (``set_max_concurrency``); the wrapper
    is what tells Tune how many trials it may keep pending: without it Tune keeps one
    pending trial for a custom searcher, and trials then start one at a time.
    """
    searcher = CmaSearcher(
        space,
        population=population,
        sigma0=settings.sigma0,
        seed=settings.seed,
        generations=settings.generations,
        penalty=settings.penalty,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=concurrency, batch=False)
