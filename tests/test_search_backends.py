"""The searcher contract suite, over every registered backend (STYLE §5, §8).

Direct Searcher API: suggestions within bounds and tagged by generation, seeded
determinism, save/restore round trip (same next suggestions), NaN/±inf/error/missing
results get the penalty and the generation completes. Under Ray Tune
(``ray.init(num_cpus=2)``): a real run with failing and non-finite trials finishes every
generation, retries a failing trial only ``max_failures`` times, and records penalties.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("cma")
pytest.importorskip("nevergrad")

from npstune.errors import SearchError  # noqa: E402
from npstune.search.backends import BACKENDS, make_searcher  # noqa: E402
from npstune.search.space import Bounds, NpsSpec, ParamSpace, SearchSettings  # noqa: E402

SPACE = ParamSpace(
    NpsSpec(subspaces=3, k=Bounds(low=0.01, high=0.3, init=0.05)), tasks=2
)
POP = 5
PENALTY = -1.0
ALL = sorted(BACKENDS)


def searcher(
    backend: str, seed: int = 3, generations: int = 4, space: ParamSpace = SPACE
):
    s = make_searcher(
        backend,
        space,
        SearchSettings(seed=seed, generations=generations, penalty=PENALTY),
        POP,
        POP,
    )
    s.set_search_properties("objective", "max", {})
    return s


def inner(s):
    return getattr(s, "searcher", s)


def f(cfg: dict) -> float:
    """A smooth objective with its maximum inside the box."""
    return -sum((cfg[n] - 0.6) ** 2 for n in SPACE.names)


def run_generation(s, g: int, results=None) -> list[dict]:
    cfgs = [s.suggest(f"g{g}t{i}") for i in range(POP)]
    assert all(isinstance(c, dict) for c in cfgs)
    assert s.suggest(f"g{g}extra") is None  # the next generation waits for this one
    for i, c in enumerate(cfgs):
        kw = results[i] if results else {"result": {"objective": f(c)}}
        s.on_trial_complete(f"g{g}t{i}", **kw)
    return cfgs


def params(cfgs: list[dict]) -> list[list[float]]:
    return [[c[n] for n in SPACE.names] for c in cfgs]


@pytest.mark.parametrize("backend", ALL)
def test_suggestions_within_bounds_and_tagged(backend):
    s = searcher(backend, generations=3)
    for g in range(3):
        cfgs = run_generation(s, g)
        assert [c["index"] for c in cfgs] == list(range(POP))
        assert {c["generation"] for c in cfgs} == {g}
        for c in cfgs:
            for p in SPACE.params:
                assert p.low <= c[p.name] <= p.high
    assert s.suggest("after") == "FINISHED"
    assert inner(s).generation == 3


@pytest.mark.parametrize("backend", ALL)
def test_seeded_determinism(backend):
    a, b, c = (
        searcher(backend, seed=11),
        searcher(backend, seed=11),
        searcher(backend, seed=12),
    )
    for g in range(2):
        pa, pb, pc = (params(run_generation(x, g)) for x in (a, b, c))
        assert pa == pb
        assert pa != pc


@pytest.mark.parametrize("backend", ALL)
def test_save_restore_round_trip(backend, tmp_path):
    s = searcher(backend)
    for g in range(2):
        run_generation(s, g)
    path = tmp_path / "searcher.pkl"
    s.save(str(path))
    expected = params(run_generation(s, 2))

    fresh = searcher(backend)
    fresh.restore(str(path))
    assert inner(fresh).generation == 2
    assert params(run_generation(fresh, 2)) == expected

    # a checkpoint is only ever taken at a boundary; one restored with part of the
    # next generation handed out (a killed run) asks that generation again
    again = searcher(backend)
    again.restore(str(path))
    [again.suggest(f"x{i}") for i in range(2)]
    assert inner(again).generation == 2


@pytest.mark.parametrize("backend", ALL)
def test_restore_refuses_another_space(backend, tmp_path):
    s = searcher(backend)
    run_generation(s, 0)
    s.save(str(tmp_path / "s.pkl"))
    other = searcher(backend, space=ParamSpace(NpsSpec(subspaces=2), tasks=2))
    with pytest.raises(SearchError, match="another search space"):
        other.restore(str(tmp_path / "s.pkl"))
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(SearchError, match="unreadable searcher state"):
        other.restore(str(tmp_path / "bad.pkl"))


@pytest.mark.parametrize("backend", ALL)
def test_invalid_values_get_the_penalty(backend):
    s = searcher(backend, generations=2)
    results = [
        {"result": {"objective": float("nan")}},
        {"result": {"objective": float("inf")}},
        {"result": {"objective": float("-inf")}},
        {"result": None, "error": True},
        {"result": {"other_metric": 1.0}},
    ]
    run_generation(s, 0, results)
    assert inner(s).generation == 1  # the generation completed
    nxt = s.suggest("next")
    assert isinstance(nxt, dict) and nxt["generation"] == 1
    if backend == "cma":
        # every value was replaced by the penalty (mode max: CMA minimises -value)
        assert sorted(inner(s).es.fit.fit) == [-PENALTY] * POP
        assert inner(s).best[0] == PENALTY
    else:
        assert inner(s)._nevergrad_opt.num_tell == POP


@pytest.mark.parametrize("backend", ALL)
def test_one_dimension_pushed_to_its_bound(backend):
    """One searched parameter whose best is its upper bound (a method search over λ
    alone): pycma's per-coordinate std cap used to raise inside tell() here."""
    from npstune.search.params import MethodSpace

    space = MethodSpace(
        "task-arithmetic", {"lam": {"low": 0.1, "high": 2.0}}, [], 1, "t"
    )
    assert space.dim == 1
    if backend == "nevergrad" and importlib.util.find_spec("fcmaes") is None:
        with pytest.raises(SearchError, match="one-parameter search needs the fcmaes"):
            searcher(backend, generations=8, space=space)
        return
    s = searcher(backend, generations=8, space=space)
    for g in range(8):
        cfgs = [s.suggest(f"g{g}t{i}") for i in range(POP)]
        for i, c in enumerate(cfgs):
            assert 0.1 <= c["lam"] <= 2.0
            s.on_trial_complete(f"g{g}t{i}", result={"objective": c["lam"]})
    assert inner(s).failure is None and inner(s).generation == 8
    assert s.suggest("after") == "FINISHED"


@pytest.mark.parametrize("backend", ALL)
def test_an_optimizer_error_ends_the_search_with_its_reason(backend, monkeypatch):
    """Ray Tune logs an exception of on_trial_complete and waits for suggestions
    forever: the searcher keeps the reason and finishes instead."""
    s = searcher(backend)
    first = s.suggest("g0t0")
    assert isinstance(first, dict)
    opt = inner(s).es if backend == "cma" else inner(s)._nevergrad_opt

    def broken(*a, **k):
        raise ValueError("not yet initialized")

    monkeypatch.setattr(opt, "tell", broken)
    cfgs = [first] + [s.suggest(f"g0t{i}") for i in range(1, POP)]
    for i, c in enumerate(cfgs):
        s.on_trial_complete(f"g0t{i}", result={"objective": f(c)})
    assert inner(s).failure == f"{backend}: ValueError: not yet initialized"
    assert inner(s).generation == 0
    assert s.suggest("next") == "FINISHED"


# ------------------------------------------------------------------------- under Ray
# Tune
@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _trainable(config, attempts_dir):
    from ray import tune

    tid = tune.get_context().get_trial_id()
    with open(Path(attempts_dir) / tid, "a") as fh:
        fh.write("x")
    i = config["index"]
    if (
        i == 0 and config["generation"] == 0
    ):  # actor restarts are slow: fail in gen 0 only
        raise RuntimeError("injected trial failure")
    value = {1: float("nan"), 2: float("inf"), 3: float("-inf")}.get(i)
    tune.report({"objective": f(config) if value is None else value})


@pytest.mark.slow
@pytest.mark.parametrize("backend", ALL)
def test_tune_run_with_failing_trials(ray_local, backend, tmp_path):
    from ray import tune

    from npstune.search.monitor import Ledger, SearchMonitor

    gens = 2
    s = searcher(backend, generations=gens)
    ledger = Ledger(tmp_path / "ledger.json")
    saves: list[int] = []
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    monitor = SearchMonitor(
        space=SPACE,
        population=POP,
        generations=gens,
        penalty=PENALTY,
        ledger=ledger,
        checkpoint=lambda: saves.append(inner(s).generation),
    )
    tuner = tune.Tuner(
        tune.with_parameters(_trainable, attempts_dir=str(attempts)),
        param_space={},
        tune_config=tune.TuneConfig(search_alg=s, num_samples=-1, reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "ray"),
            verbose=0,
            callbacks=[monitor],
            failure_config=tune.FailureConfig(max_failures=1),
        ),
    )
    tuner.fit()
    assert inner(s).generation == gens
    assert saves == [1, 2]  # one checkpoint per finished generation, after the tell
    assert [g.generation for g in ledger.generations] == [0, 1]
    assert len(ledger.records) == gens * POP
    by_index = {(r.generation, r.index): r for r in ledger.records}
    assert by_index[(0, 0)].status == "error" and by_index[(1, 0)].status == "ok"
    for g in range(gens):
        assert {by_index[(g, i)].status for i in (1, 2, 3)} == {"invalid"}
        assert by_index[(g, 4)].status == "ok"
        assert all(by_index[(g, i)].value == PENALTY for i in range(1, 4))
        assert math.isfinite(by_index[(g, 4)].value)
    assert by_index[(0, 0)].value == PENALTY
    counts = {p.name: len(p.read_text()) for p in attempts.iterdir()}
    assert (
        counts[by_index[(0, 0)].trial_id] == 2
    )  # 1 try + max_failures retries, then penalty
    assert ledger.best().index in (0, 4)


# ------------------------------------------------------------------ actor reuse
def test_spare_actor_cache_keeps_n_idle_and_flushes_all_at_the_end():
    from ray.tune.execution import tune_controller
    from ray.tune.utils.object_cache import _ObjectCache

    from npstune.search.actor_cache import keep_idle_actors

    with keep_idle_actors(2) as patched:
        assert patched
        cache = tune_controller._ObjectCache(may_keep_one=True)
        # nothing pending (max 0): Tune alone would keep one, this keeps two
        assert cache.cache_object("cpu", "a1") and cache.cache_object("cpu", "a2")
        assert not cache.cache_object("cpu", "a3")
        assert list(cache.flush_cached_objects()) == []  # kept between generations
        assert cache.pop_cached_object("cpu") == "a1"
        assert sorted(cache.flush_cached_objects(force_all=True)) == ["a2"]
        assert cache.num_cached_objects == 0
    assert tune_controller._ObjectCache is _ObjectCache  # restored
    with keep_idle_actors(1) as patched:
        assert not patched and tune_controller._ObjectCache is _ObjectCache
