"""MLflow tracking (sqlite store in tmp_path) and the search plots."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("mlflow")

from npstune.search.monitor import GenerationSummary, Ledger, TrialRecord  # noqa: E402
from npstune.tracking import ui_command  # noqa: E402
from npstune.tracking.mlflow_tracker import MlflowTracker  # noqa: E402
from tests.test_search_support import mlflow_runs  # noqa: E402


def record(g: int, i: int, value: float, status: str = "ok") -> TrialRecord:
    return TrialRecord(
        f"t{g}{i}",
        g,
        i,
        {"w0": 0.5 + i, "k": 0.05},
        {"objective": value, "storage_bits": 123.0, "acc/a": value},
        value,
        status,
    )


def summary(g: int, best: float) -> GenerationSummary:
    return GenerationSummary(g, best, best, best / 2, 2, 0, 1.0, f"t{g}0")


@pytest.fixture(scope="module")
def _migrated_store(tmp_path_factory):
    """An MLflow sqlite store whose tables are created once (4-5 s per new store)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, _migrated_store):
    """A fresh, empty sqlite store of this test's own (a copy of the migrated one)."""
    path = tmp_path / "m.db"
    shutil.copyfile(_migrated_store, path)
    return f"sqlite:///{path}"


def test_parent_children_curve_and_resume(tmp_path, store):
    uri = store
    tr = MlflowTracker(uri, "exp", "search-1")
    assert not tr.continued
    tr.log_params({"backend": "cma", "population": 2})
    for g in range(3):
        tr.on_trial(record(g, 0, 0.1 * g))
        tr.on_trial(record(g, 1, float("nan"), status="invalid"))
        tr.on_generation(summary(g, 0.1 * g), None)
    (tmp_path / "results.md").write_text("| a |\n")
    tr.log_artifacts([tmp_path / "results.md", tmp_path / "absent.png"])
    parents, children = mlflow_runs(uri, "exp")
    assert len(parents) == 1 and len(children[tr.run_id]) == 6
    kid = next(k for k in children[tr.run_id] if k.info.run_name == "g001-00")
    assert kid.data.params == {"w0": "0.5", "k": "0.05", "generation": "1"}
    assert kid.data.metrics["objective"] == pytest.approx(0.1)
    assert kid.data.tags["npstune.generation"] == "1" and kid.info.status == "FINISHED"
    bad = next(k for k in children[tr.run_id] if k.info.run_name == "g001-01")
    assert (
        bad.info.status == "FAILED" and "objective" not in bad.data.metrics
    )  # NaN skipped

    # a resumed search: continue the same parent, drop the unfinished generation's runs
    again = MlflowTracker(uri, "exp", "search-1", run_id=tr.run_id)
    assert again.continued and again.run_id == tr.run_id
    assert again.discard_from(2) == 2
    again.log_params({"backend": "cma", "population": 2, "new": 1})  # no conflict
    again.log_metrics({"test_objective": 0.7, "skip": float("nan")})
    again.finish()
    parents, children = mlflow_runs(uri, "exp")
    assert len(parents) == 1 and len(children[tr.run_id]) == 4
    p = parents[0]
    assert p.info.status == "FINISHED" and p.data.params["new"] == "1"
    assert p.data.metrics["test_objective"] == 0.7 and "skip" not in p.data.metrics
    curve = again.client.get_metric_history(tr.run_id, "best_so_far")
    assert [m.step for m in curve] == [0, 1, 2]
    assert [a.path for a in again.client.list_artifacts(tr.run_id)] == ["results.md"]


def test_unknown_run_id_starts_a_new_run(store):
    tr = MlflowTracker(store, "exp", "s", run_id="0" * 32)
    assert not tr.continued and tr.run_id != "0" * 32


def test_ui_command():
    assert (
        ui_command("sqlite:///mlflow.db")
        == "mlflow ui --backend-store-uri sqlite:///mlflow.db"
    )


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from npstune.search.report import Row
    from npstune.tracking.plots import accuracy_storage_plot, convergence_plot

    ledger = Ledger(tmp_path / "l.json")
    for g in range(3):
        ledger.records += [record(g, 0, 0.5 + 0.1 * g), record(g, 1, 0.0, "error")]
        ledger.generations.append(summary(g, 0.5 + 0.1 * g))
    rows = [
        Row("magnitude", "magnitude", {"objective": 0.4}, {"objective": 0.4}, 100),
        Row("nps", "NPS", {"objective": 0.7}, {}, 100),
    ]
    for f in (
        convergence_plot(ledger, tmp_path / "c.png", reference=0.4),
        accuracy_storage_plot(ledger, rows, tmp_path / "s.png"),
    ):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000


def test_log_benchmark(tmp_path, store):
    from npstune.tracking import log_benchmark

    uri = store
    (tmp_path / "r.md").write_text("x")
    rid = log_benchmark(
        "speed",
        params={"machine.cores": "2"},
        metrics={"t": 1.5},
        artifacts=[tmp_path / "r.md"],
        uri=uri,
    )
    parents, _ = mlflow_runs(uri, "npstune-benchmarks")
    assert [p.info.run_id for p in parents] == [rid]
    assert (
        parents[0].data.metrics == {"t": 1.5} and parents[0].info.status == "FINISHED"
    )
    assert parents[0].data.tags["npstune.kind"] == "benchmark"


def test_experiments_open_on_the_runs_view(tmp_path):
    """MLflow 3's UI opens an experiment without mlflow.experimentKind on its GenAI
    (traces) overview; ours carry the tag for the runs table, also when the experiment
    was made before (by another tool)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    old = client.create_experiment("made-elsewhere")
    MlflowTracker(uri, "made-elsewhere", "run")
    MlflowTracker(uri, "new", "run")
    for name in ("made-elsewhere", "new"):
        exp = client.get_experiment_by_name(name)
        assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert client.get_experiment_by_name("made-elsewhere").experiment_id == old
