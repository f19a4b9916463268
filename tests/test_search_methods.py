"""Any registered method is searchable: the space comes from the method's declaration,
and the same Ray Tune / backends / MLflow / report machinery runs it."""

from __future__ import annotations

import os

import pytest
import torch

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


# ------------------------------------------------------------ a pruning step first
def test_prune_section_searches_the_pruning_for_the_merge_that_follows(tmp_path):
    from npstune.merge import merge

    path = write_tiny_search(
        tmp_path,
        method="tsv-m",
        params={"alpha": {"low": 0.5, "high": 1.5}},
        prune={"method": "nps", "subspaces": 2, "k": {"low": 0.1, "high": 0.9}},
        nps=None,
    )
    cfg = load_config(path)
    space = MethodSpace(cfg.method, cfg.params, cfg.per_task, 3, "t", cfg.prune)
    assert space.names == ["alpha", "prune_k", "prune_w0", "prune_w1"]
    cand = space.candidate(
        {"alpha": 0.8, "prune_k": 0.4, "prune_w0": 0.5, "prune_w1": 1.5}
    )
    assert cand.as_dict() == {
        "alpha": 0.8,
        "prune": {
            "method": "nps",
            "params": {"k": 0.4, "subspaces": 2, "weights": [0.5, 1.5]},
        },
    }
    base = cfg.base
    got = merge(base, cfg.models, "tsv-m", cand.params, prune=cand.prune_step()).state
    want = merge(
        base,
        cfg.models,
        "tsv-m",
        {"alpha": 0.8},
        prune=("nps", {"k": 0.4, "subspaces": 2, "weights": [0.5, 1.5]}),
    ).state
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the start: every weight 1 (magnitude pruning) at the start k
    assert space.baseline().prune["params"]["weights"] == [1.0, 1.0]
    # one weight row per task: task t's merge gets its own row
    cfg2 = load_config(
        write_tiny_search(
            tmp_path / "b",
            method="task-arithmetic",
            params={"lam": {"low": 0.1, "high": 1.0}},
            prune={"method": "nps", "subspaces": 2, "weights": {"per_task": True}},
            nps=None,
        )
    )
    sp2 = MethodSpace(cfg2.method, cfg2.params, [], 3, "t", cfg2.prune)
    assert [n for n in sp2.names if n.startswith("prune_")] == [
        f"prune_t{t}_w{m}" for t in range(3) for m in range(2)
    ]
    c2 = sp2.candidate({**sp2.init_config(), "prune_t1_w0": 0.25})
    assert c2.prune_step(1, 3).params["weights"] == [0.25, 1.0]
    assert c2.prune_step().params["weights"] == [1, 1, 0.25, 1, 1, 1]


@pytest.mark.parametrize(
    "prune, method, needle",
    [
        (
            {"method": "trim"},
            "tsv-m",
            "unknown pruning 'trim'; valid: nps, magnitude, dare",
        ),
        ({"method": "magnitude", "weights": {}}, "tsv-m", "takes no weights"),
        ({"method": "dare", "subspaces": 4}, "tsv-m", "subspaces is for prune nps"),
        (
            {"method": "magnitude", "k": {"low": 0.1, "high": 1.5}},
            "tsv-m",
            "outside the magnitude pruning's declared range",
        ),
        ("nps", "nps", "it is a pruning itself"),
    ],
)
def test_bad_prune_sections_are_one_clear_line(tmp_path, prune, method, needle):
    path = write_tiny_search(
        tmp_path,
        method=method,
        params={"alpha": {"low": 0.5, "high": 1.5}} if method != "nps" else None,
        prune=prune,
        **({"nps": None} if method != "nps" else {}),
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_overlay_sweep_axes_set_several_keys_per_value(tmp_path):
    from npstune.search.space import load_configs

    path = write_tiny_search(
        tmp_path,
        method="task-arithmetic",
        params={"lam": {"low": 0.1, "high": 1.0}},
        nps=None,
        sweep={
            "@merge": [
                {"label": "ta", "method": "task-arithmetic"},
                {
                    "label": "tsv",
                    "method": "tsv-m",
                    "params": {"alpha": {"low": 0.5, "high": 1.0}},
                },
            ],
            "prune": [None, {"method": "magnitude", "k": 0.3}],
        },
    )
    cfgs = load_configs(path)
    assert [c.name for c in cfgs] == [
        "tiny-merge=ta-prune=None",
        "tiny-merge=ta-prune=magnitude",
        "tiny-merge=tsv-prune=None",
        "tiny-merge=tsv-prune=magnitude",
    ]
    assert cfgs[3].method == "tsv-m" and cfgs[3].prune.k == 0.3
    assert cfgs[1].params == {"lam": {"low": 0.1, "high": 1.0}}
    bad = write_tiny_search(
        tmp_path / "bad",
        nps=None,
        method="task-arithmetic",
        params={"lam": {"low": 0.1, "high": 1.0}},
        sweep={"@merge": ["ta"]},
    )
    with pytest.raises(ConfigError, match="an overlay axis takes mappings"):
        load_configs(bad)


@pytest.mark.slow
def test_a_pruned_method_search_runs_through_ray_tune_and_mlflow(tmp_path):
    import ray

    from npstune.checkpoints import open_checkpoint
    from npstune.merge import merge
    from npstune.search.runner import run_search

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    path = write_tiny_search(
        tmp_path,
        name="pruned-tiny",
        method="task-arithmetic",
        params={"lam": {"low": 0.05, "high": 1.5}},
        prune={"method": "nps", "subspaces": 2, "k": {"low": 0.2, "high": 1.0}},
        report={"baselines": ["defaults"]},
        search={"generations": 2, "population": 4, "seed": 3},
        nps=None,
    )
    cfg = load_config(path)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = run_search(cfg)
    finally:
        ray.shutdown()
    rep = outcome.report
    searched, start = rep.rows[-1], rep.row("defaults")
    assert searched.label == "nps → task-arithmetic (searched)"
    assert start.label == "nps w=1 → task-arithmetic (defaults)"
    assert searched.params["prune"]["method"] == "nps"
    assert searched.calibration["objective"] >= start.calibration["objective"]
    parents, children = mlflow_runs(cfg.tracking.uri, "pruned-tiny")
    kids = children[parents[0].info.run_id]
    assert len(kids) == 8
    assert all(
        set(k.data.params) == {"lam", "prune_k", "prune_w0", "prune_w1", "generation"}
        for k in kids
    )
    # the written best model is the merge of the best candidate, pruning included
    best = open_checkpoint(outcome.out / "best_model.safetensors")
    p = searched.params
    want = merge(
        cfg.base,
        cfg.models,
        "task-arithmetic",
        {"lam": p["lam"]},
        prune=(p["prune"]["method"], p["prune"]["params"]),
    ).state
    assert all(torch.equal(best[k], want[k]) for k in want)
