"""Search-space files: validation errors, extends/sweep, the parameter vector (no
Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from npstune.errors import ConfigError
from npstune.search.space import Bounds, NpsSpec, ParamSpace, load_config, load_configs

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


ZOO = {"zoo": "small"}


def test_minimal_zoo_config_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ZOO, "my-search.yaml"))
    assert cfg.name == "my-search" and cfg.use == "fusion"
    assert cfg.search.backend == "cma" and cfg.search.seed == 1
    assert cfg.search.sigma0 == pytest.approx(1 / 6)
    assert cfg.tracking.uri == "sqlite:///mlflow.db"
    assert cfg.out == Path("npstune_runs/my-search")
    assert cfg.baselines == [
        "pretrained",
        "individual",
        "task-arithmetic",
        "ties",
        "nps-w1",
    ]


@pytest.mark.parametrize(
    "data, needle",
    [
        ({**ZOO, "populaton": 4}, "populaton: unknown key"),
        ({**ZOO, "search": {"generatons": 3}}, "search.generatons: unknown key"),
        ({**ZOO, "nps": {"k": {"low": 0.3, "high": 0.1}}}, "bound low 0.3 > high 0.1"),
        ({**ZOO, "nps": {"lam": {"low": 2, "high": 1}}}, "bound low 2.0 > high 1.0"),
        (
            {**ZOO, "nps": {"weights": {"low": 1.5, "high": 1.0, "init": 1.2}}},
            "bound low 1.5 > high",
        ),
        ({**ZOO, "nps": {"k": {"low": 0.0, "high": 0.1}}}, "k must lie in (0, 1]"),
        ({"use": "fusion"}, "missing model"),
        ({"base": "b", "models": []}, "missing model"),
        ({**ZOO, "search": {"seed": 0}}, "search.seed"),
        ({**ZOO, "search": {"backend": "optuna"}}, "search.backend"),
        ({**ZOO, "use": "transfer"}, "use transfer needs a transfer"),
        (
            {**ZOO, "evaluator": {"kind": "callable"}},
            "evaluator: function: Field required",
        ),
        (
            {**ZOO, "evaluator": {"kind": "nope"}},
            "unknown evaluator kind 'nope'; valid: callable, causal-lm, clip",
        ),
        (
            {**ZOO, "evaluator": {"kind": "callable", "function": "m:f", "bogus": 1}},
            "evaluator: bogus: unknown key",
        ),
        ({**ZOO, "resources": {"gpus_per_trial": -1}}, "resources.gpus_per_trial"),
    ],
)
def test_validation_errors_are_one_line(tmp_path, data, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, data))
    msg = str(exc.value)
    assert needle in msg
    assert "\n" not in msg and msg.startswith(str(tmp_path))
    assert (
        "function-after" not in msg and "constrained" not in msg
    )  # no pydantic internals
    if "bound low" in needle:
        assert "valid number" not in msg  # the number branch of "number or bounds"


def test_missing_model_path(tmp_path):
    base = tmp_path / "base.safetensors"
    base.write_bytes(b"x")
    data = {
        "base": str(base),
        "models": [str(tmp_path / "nope.safetensors")],
        "evaluator": {"kind": "callable", "function": "m:f"},
    }
    with pytest.raises(
        ConfigError, match=r"missing model: .*nope.safetensors does not exist"
    ):
        load_config(write(tmp_path, data))


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("zoo: [small\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such search-space file"):
        load_config(tmp_path / "absent.yaml")


def test_backend_override_and_extends(tmp_path):
    write(
        tmp_path,
        {**ZOO, "nps": {"subspaces": 4, "k": 0.1}, "search": {"generations": 9}},
        "parent.yaml",
    )
    child = write(
        tmp_path, {"extends": "parent.yaml", "nps": {"subspaces": 2}}, "child.yaml"
    )
    cfg = load_config(child, **{"search.backend": "nevergrad"})
    assert cfg.nps.subspaces == 2 and cfg.nps.k == 0.1  # deep merge keeps k
    assert cfg.search.generations == 9 and cfg.search.backend == "nevergrad"
    assert cfg.name == "child"


def test_sweep_expands_to_named_variants(tmp_path):
    p = write(
        tmp_path,
        {
            **ZOO,
            "name": "abl",
            "output_dir": "o",
            "sweep": {"nps.subspaces": [1, 2], "search.seed": [1, 2, 3]},
        },
    )
    cfgs = load_configs(p)
    assert len(cfgs) == 6
    assert (
        cfgs[0].name == "abl-subspaces=1-seed=1"
        and cfgs[-1].name == "abl-subspaces=2-seed=3"
    )
    assert {c.experiment for c in cfgs} == {"abl"}
    assert cfgs[4].out == Path("o/subspaces=2-seed=2")
    assert len({c.out for c in cfgs}) == 6
    with pytest.raises(ConfigError, match="holds a sweep of 6"):
        load_config(p)


def test_sweep_values_are_validated(tmp_path):
    p = write(tmp_path, {**ZOO, "sweep": {"nps.k": [0.05, 2.0]}})
    with pytest.raises(ConfigError, match=r"\[k=2\].*k must lie"):
        load_configs(p)


def test_shipped_search_spaces_load():
    files = sorted((ROOT / "searchspaces").rglob("*.yaml"))
    names = {f.name for f in files}
    for must in (
        "nps-fusion-small.yaml",
        "nps-fusion.yaml",
        "nps-transfer.yaml",
        "nps-compression.yaml",
    ):
        assert must in names
    total = 0
    # the LLM spaces leave the evaluator's tasks to the LLM zoo or the user
    llm_tasks = {"t": {"mode": "perplexity", "data": {"calibration": "t.jsonl"}}}
    for f in files:
        if f.name.startswith("nps-llm-"):
            with pytest.raises(ConfigError, match="tasks"):
                load_configs(f)
            models = {"base": str(ROOT), "models": [str(ROOT)]}  # dirs that exist
            cfgs = load_configs(f, **models, **{"evaluator.tasks": llm_tasks})
            assert all(c.evaluator.kind == "causal-lm" for c in cfgs)
            total += len(cfgs)
        else:
            total += len(load_configs(f))
    assert total >= 4 + 5 + 3 + 6


def test_ablation_sweeps_cover_the_issue_grid():
    abl = ROOT / "searchspaces" / "ablations"
    m = {c.nps.subspaces for c in load_configs(abl / "subspaces.yaml")}
    assert m == {1, 2, 4, 8, 16}
    fr = {
        c.evaluator.calibration_fraction
        for c in load_configs(abl / "calibration-size.yaml")
    }
    assert fr == {0.25, 0.5, 1.0}
    ks = {c.nps.k for c in load_configs(abl / "keep-ratio.yaml")}
    assert min(ks) == 0.01 and max(ks) == 0.3 and len(ks) >= 5
    cells = {
        (c.method, c.prune.method if c.prune else None)
        for c in load_configs(abl / "prune-before-merge.yaml")
    }
    assert cells == {
        (m, p)
        for m in ("task-arithmetic", "ties", "tsv-m", "iso-cts")
        for p in (None, "magnitude", "nps")
    }


def test_prune_table_pivots_the_cells():
    from benchmarks.ablations import prune_table

    cells = [
        ("none", "tsv-m", 0.70, 0.71),
        ("nps", "tsv-m", 0.72, 0.74),
        ("magnitude", "tsv-m", 0.71, 0.72),
        ("none", "ties", 0.69, 0.7),
    ]
    rows = [
        {
            "sweep": "prune-before-merge",
            "value": f"{p} → {m}",
            "test_mean": t,
            "calibration_mean": c,
        }
        for (p, m, t, c) in cells
    ] + [{"sweep": "keep-ratio", "value": 0.1, "test_mean": 0.1, "calibration_mean": 0}]
    assert prune_table(rows) == [
        {
            "merge": "tsv-m",
            "none": "0.7000 (0.7100)",
            "nps": "0.7200 (0.7400)",
            "magnitude": "0.7100 (0.7200)",
            "nps_minus_none": 0.02,
        },
        {"merge": "ties", "none": "0.6900 (0.7000)"},
    ]


# ---------------------------------------------------------------------------- the
# vector
def test_param_space_shared_weights():
    sp = ParamSpace(NpsSpec(subspaces=3), tasks=2)
    assert sp.names == ["w0", "w1", "w2"] and sp.dim == 3
    assert sp.default_population() == 4 + int(3 * np.log(3))
    assert np.allclose(sp.x0(), 0.5)  # w = 1 is the middle of [0, 2]
    cfg = sp.from_unit([0.0, 0.25, 1.0])
    assert cfg == {"w0": 0.0, "w1": 0.5, "w2": 2.0}
    assert np.allclose(sp.to_unit(cfg), [0.0, 0.25, 1.0])
    c = sp.candidate({**cfg, "generation": 0})
    assert (
        c.weights == ((0.0, 0.5, 2.0), (0.0, 0.5, 2.0))
        and c.k == 0.05
        and c.lam == (1.0, 1.0)
    )
    assert sp.baseline().weights == ((1.0,) * 3,) * 2


def test_param_space_per_task_k_lam():
    nps = NpsSpec(
        subspaces=2,
        weights={"per_task": True},
        k=Bounds(low=0.01, high=0.3, init=0.05),
        lam=Bounds(low=0.5, high=2.0),
        lam_per_task=True,
    )
    sp = ParamSpace(nps, tasks=2)
    assert sp.names == ["t0_w0", "t0_w1", "t1_w0", "t1_w1", "k", "t0_lam", "t1_lam"]
    cfg = sp.init_config()
    assert cfg["k"] == 0.05 and cfg["t0_lam"] == 1.25
    cfg.update(t1_w0=0.2, t1_lam=1.9)
    c = sp.candidate(cfg)
    assert (
        c.weights == ((1.0, 1.0), (0.2, 1.0)) and c.lam == (1.25, 1.9) and c.k == 0.05
    )
    x = sp.from_unit(np.full(sp.dim, 2.0))  # outside the box: clipped
    assert x["k"] == 0.3 and x["t0_w0"] == 2.0
    assert sp.baseline().k == 0.05 and sp.baseline().lam == (1.25, 1.25)


def test_tracking_uri_env_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert load_config(write(tmp_path, ZOO)).tracking_uri == "http://mlflow:5000"
    explicit = {**ZOO, "tracking": {"uri": "sqlite:///mlflow.db"}}
    assert load_config(write(tmp_path, explicit)).tracking_uri == "sqlite:///mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert load_config(write(tmp_path, ZOO)).tracking_uri == "sqlite:///mlflow.db"


def test_an_empty_baseline_list_means_none(tmp_path):
    assert (
        load_config(write(tmp_path, {**ZOO, "report": {"baselines": []}})).baselines
        == []
    )
    assert "ties" in load_config(write(tmp_path, ZOO, "d.yaml")).baselines


def test_evaluator_precision_from_the_search_or_its_evaluator_file(
    tmp_path, monkeypatch
):
    """A search's evaluator precision: the inline section's, else its evaluator file's,
    else auto; it reaches the evaluator's build, and a bad value is a one-line error."""
    from npstune.evaluate import spec as spec_mod
    from npstune.search.objective import make_evaluator

    (tmp_path / "eval.yaml").write_text(
        yaml.safe_dump({"kind": "callable", "function": "m:f", "precision": "fp32"})
    )
    from_file = load_config(write(tmp_path, {**ZOO, "evaluator": "eval.yaml"}))
    assert from_file.evaluator.precision == "fp32"
    inline = {"kind": "callable", "function": "m:f", "precision": "bf16"}
    cfg = load_config(write(tmp_path, {**ZOO, "evaluator": inline}, "b.yaml"))
    assert (
        cfg.evaluator.precision == "bf16" and "precision" not in cfg.evaluator.options
    )
    plain = {"kind": "callable", "function": "m:f"}
    assert (
        load_config(
            write(tmp_path, {**ZOO, "evaluator": plain}, "c.yaml")
        ).evaluator.precision
        == "auto"
    )
    with pytest.raises(ConfigError, match="precision"):
        load_config(
            write(tmp_path, {**ZOO, "evaluator": {**plain, "precision": "x"}}, "d.yaml")
        )
    seen = []
    monkeypatch.setattr(
        spec_mod.EvaluatorFile, "build", lambda self, **kw: seen.append(kw["precision"])
    )
    for c in (from_file, cfg):
        make_evaluator(c, None, [], "calibration")
    assert seen == ["fp32", "bf16"]
