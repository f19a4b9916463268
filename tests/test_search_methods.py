"""Any registered method is searchable: the space comes from the method's declaration,
and the same Ray Tune / backends / MLflow / report machinery runs it."""

from __future__ import annotations

import os

import pytest

from npstune.errors import ConfigError
from npstune.search.params import MethodSpace, declared
from npstune.search.space import load_config
from tests.test_search_support import mlflow_runs, write_tiny_search


def test_the_declaration_is_the_one_source_of_names_types_and_ranges():
    from npstune.merge import get_method

    d = declared(get_method("ties").params)
    assert (d["k"].low, d["k"].low_open, d["k"].high) == (0.0, True, 1.0)
    assert d["lam"].numeric and not d["scope"].numeric
    s = MethodSpace(
        "darex",
        {"q": {"low": 0.1, "high": 1.0}, "lam": {"low": 0.5, "high": 3.0}, "seed": 3},
        [],
        tasks=2,
    )
    assert s.names == ["q", "lam"] and s.init_config() == {"q": 0.55, "lam": 1.0}
    cand = s.candidate(s.from_unit([0.0, 1.0]))
    assert cand.params == {"seed": 3, "q": 0.1, "lam": 3.0}
    # the method's declared defaults with the file's fixed values
    assert s.baseline().params == {"k": 0.1, "lam": 1.0, "seed": 3, "q": None}
    # a per-task parameter: one searched value per task, handed over as a list
    p = MethodSpace("pcb", {"lam": {"low": 0.5, "high": 1.5}}, ["lam"], tasks=3)
    assert p.names == ["t0_lam", "t1_lam", "t2_lam"]
    assert p.candidate({"t0_lam": 0.5, "t1_lam": 1.0, "t2_lam": 1.5}).params == {
        "lam": [0.5, 1.0, 1.5]
    }
    # integers are rounded
    w = MethodSpace("wudi", {"steps": {"low": 1, "high": 10}}, [], tasks=2)
    assert w.candidate({"steps": 4.6}).params == {"steps": 5}


@pytest.mark.parametrize(
    "params,per_task,needle",
    [
        (
            {"bogus": {"low": 0, "high": 1}},
            [],
            "has no parameter 'bogus'; valid: k, lam, scope",
        ),
        (
            {"k": {"low": 0.0, "high": 0.5}},
            [],
            "bound 0 is outside ties's declared range (0.0, 1.0]",
        ),
        ({"lam": {"low": 2, "high": 1}}, [], "not finite with low <= high"),
        ({"k": {"high": 0.5}}, [], "give low and high (declared range (0.0, 1.0])"),
        ({"scope": {"low": 0, "high": 1}}, [], "not a numeric parameter"),
        (
            {"lam": {"low": 0.5, "high": 1.5}},
            ["lam"],
            "takes one value, not one per task",
        ),
        ({"k": 0.3}, [], "give bounds {low, high} for at least one"),
    ],
)
def test_bad_method_spaces_are_one_clear_line(tmp_path, params, per_task, needle):
    path = write_tiny_search(
        tmp_path, method="ties", params=params, per_task=per_task, nps=None
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_nps_keeps_its_own_section(tmp_path):
    path = write_tiny_search(
        tmp_path, method="nps", params={"k": {"low": 0.1, "high": 0.5}}
    )
    with pytest.raises(ConfigError, match="its search space is the nps: section"):
        load_config(path)
    path = write_tiny_search(
        tmp_path, method="ties", params={"k": {"low": 0.1, "high": 0.5}}
    )
    with pytest.raises(ConfigError, match="the nps: section is for method nps"):
        load_config(path)  # write_tiny_search always writes an nps: section
    path = write_tiny_search(tmp_path, method="nope", nps=None)
    with pytest.raises(ConfigError, match="unknown method 'nope'; valid: "):
        load_config(path)


@pytest.mark.slow
def test_a_ties_search_runs_through_ray_tune_and_mlflow(tmp_path):
    import ray

    from npstune.search.runner import run_search

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    path = write_tiny_search(
        tmp_path,
        name="ties-tiny",
        method="ties",
        params={"k": {"low": 0.1, "high": 1.0}, "lam": {"low": 0.05, "high": 1.5}},
        report={"baselines": ["pretrained", "defaults"]},
        nps=None,
    )
    cfg = load_config(path)
    assert cfg.method == "ties"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = run_search(cfg)
    finally:
        ray.shutdown()
    rep = outcome.report
    searched, defaults = rep.row("ties"), rep.row("defaults")
    assert defaults.label == "ties (defaults)" and defaults.params["k"] == 0.2
    # the evaluator wants 0.3·τ_t per task: TIES at λ 1 is far, a smaller λ is better
    assert searched.calibration["objective"] > defaults.calibration["objective"]
    assert 0.05 <= searched.params["lam"] < 1.0
    parents, children = mlflow_runs(cfg.tracking.uri, "ties-tiny")
    kids = children[parents[0].info.run_id]
    assert len(kids) == 12
    assert all(set(k.data.params) == {"k", "lam", "generation"} for k in kids)
    best = outcome.best
    assert best is not None and best.value == pytest.approx(
        searched.calibration["objective"]
    )
    assert (outcome.out / "best_model.safetensors").exists()
