"""End-to-end searches on tiny checkpoints with a callable evaluator (no zoo, ~1 min).

A real search each time: Ray Tune trials, the cma/nevergrad searchers, MLflow on a
sqlite store in tmp_path, the final report and the best model. The kill -9 + --resume
test runs the CLI in subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")
pytest.importorskip("mlflow")

from npstune.checkpoints import open_checkpoint  # noqa: E402
from npstune.search.monitor import Ledger  # noqa: E402
from npstune.search.runner import run_search  # noqa: E402
from npstune.search.space import load_config  # noqa: E402
from tests.test_search_support import mlflow_runs, write_tiny_search  # noqa: E402

pytestmark = (
    pytest.mark.slow
)  # every test starts Ray (a local one, or `npstune search`)

ROOT = Path(__file__).resolve().parents[1]
NPSTUNE = str(Path(sys.executable).with_name("npstune"))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


LOCAL_NICENESS = """
import os, ray
from npstune.search.runner import connect_ray
assert connect_ray(lambda m: None)
@ray.remote
def nice():
    return os.nice(0)
print(os.nice(0), ray.get(nice.remote()), os.environ.get("RAY_worker_niceness"),
      os.environ.get("RAY_AUTH_MODE"))
ray.shutdown()
"""


@pytest.mark.parametrize("chosen", [None, "19"])
def test_the_local_instance_runs_trials_at_the_drivers_priority(chosen):
    """Ray nices its workers to 15; the embedded instance starts them at the
    driver's priority unless the user chose a niceness, and leaves the environment of
    this process as it was."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_worker_niceness", "RAY_AUTH_MODE")
    }
    if chosen is not None:
        env["RAY_worker_niceness"] = chosen
    out = subprocess.run(
        [sys.executable, "-c", LOCAL_NICENESS],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    driver, worker, var, auth = out.stdout.split()
    assert int(worker) == (int(driver) if chosen is None else 19)
    assert var == (chosen or "None") and auth == "None"


def test_tiny_search_end_to_end(ray_local, tmp_path):
    path = write_tiny_search(tmp_path)
    cfg = load_config(path)
    lines: list[str] = []
    outcome = run_search(cfg, echo=lines.append)
    assert outcome.generations == 3 and outcome.trials == 12
    assert [ln for ln in lines if ln.startswith("generation ")][-1].startswith(
        "generation 3/3"
    )

    # beats NPS with w = 1 (plain magnitude) on calibration, and on test here too
    rep = outcome.report
    mag, nps = rep.row("nps-w1"), rep.row("nps")
    assert nps.calibration["objective"] > mag.calibration["objective"]
    assert nps.test["objective"] > mag.test["objective"]
    assert outcome.best.value == pytest.approx(nps.calibration["objective"])

    # MLflow: one parent run, one child per trial, curves and artifacts
    parents, children = mlflow_runs(cfg.tracking.uri, "tiny")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_id == outcome.run_id
    kids = children[parent.info.run_id]
    assert len(kids) == 12
    assert (
        sorted(int(k.data.tags["npstune.generation"]) for k in kids)
        == [0] * 4 + [1] * 4 + [2] * 4
    )
    for k in kids:
        assert set(k.data.params) == {"w0", "w1", "w2", "w3", "generation"}
        assert {"objective", "storage_bits", "accuracy"} <= set(k.data.metrics)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    curve = client.get_metric_history(parent.info.run_id, "best_so_far")
    assert [m.step for m in curve] == [0, 1, 2]
    assert all(a.value <= b.value for a, b in zip(curve, curve[1:]))
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "convergence.png",
        "accuracy_vs_storage.png",
        "results.md",
        "results.json",
        "best_candidate.json",
        "search.yaml",
    } <= arts
    assert parent.data.metrics["test_objective"] == pytest.approx(nps.test["objective"])
    assert parent.data.params["backend"] == "cma"

    # the saved model is the candidate; `npstune merge` with the printed command agrees
    out = cfg.out
    best = json.loads((out / "best_candidate.json").read_text())
    merged = tmp_path / "merged.safetensors"
    cmd = (
        best["merge_command"]
        .replace("npstune ", f"{NPSTUNE} ", 1)
        .replace("OUT", str(merged))
    )
    subprocess.run(cmd, shell=True, check=True, capture_output=True)
    saved, ref = (
        open_checkpoint(out / "best_model.safetensors"),
        open_checkpoint(merged),
    )
    assert sorted(saved.keys()) == sorted(ref.keys())
    for k in saved.keys():
        torch.testing.assert_close(saved[k], ref[k], rtol=0, atol=1e-6)
    assert (out / "convergence.png").stat().st_size > 1000


def test_same_file_runs_with_the_nevergrad_backend(ray_local, tmp_path):
    from click.testing import CliRunner

    from npstune.cli import cli

    path = write_tiny_search(tmp_path, search={"generations": 2})
    res = CliRunner().invoke(cli, ["search", str(path), "--backend", "nevergrad"])
    assert res.exit_code == 0, res.output
    assert "generation 2/2" in res.output and "NPS (searched)" in res.output
    assert "mlflow ui --backend-store-uri sqlite:///" in res.output
    parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny")
    assert len(parents) == 1 and parents[0].data.params["backend"] == "nevergrad"
    assert len(children[parents[0].info.run_id]) == 8


def test_failing_trials_are_retried_then_penalised(ray_local, tmp_path):
    path = write_tiny_search(
        tmp_path, function="flaky", search={"generations": 2, "max_failures": 1}
    )
    cfg = load_config(path)
    outcome = run_search(cfg)
    ledger = Ledger.load(cfg.out / "state" / "ledger.json")
    assert outcome.generations == 2 and len(ledger.records) == 8
    statuses = {r.status for r in ledger.records}
    assert "error" in statuses and "invalid" in statuses
    assert all(r.value == 0.0 for r in ledger.records if r.status != "ok")
    parents, children = mlflow_runs(cfg.tracking.uri, "tiny")
    kids = children[parents[0].info.run_id]
    assert sum(k.info.status == "FAILED" for k in kids) == sum(
        r.status != "ok" for r in ledger.records
    )


def test_gpu_request_on_a_cluster_without_gpu_fails_fast(ray_local, tmp_path):
    from npstune.errors import SearchError

    path = write_tiny_search(tmp_path, resources={"gpus_per_trial": 0.5})
    with pytest.raises(SearchError, match="has no GPU"):
        run_search(load_config(path))
    parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny")
    assert parents[0].info.status == "FAILED"
    assert not children.get(parents[0].info.run_id)  # fails before any trial starts


def test_kill_and_resume(tmp_path):
    """kill -9 after the first generation's checkpoint, then --resume: the generation
    counter continues, at most one generation is lost, one MLflow parent run."""
    gens, pop = 4, 4
    path = write_tiny_search(
        tmp_path, function="slow", search={"generations": gens, "population": pop}
    )
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "NPSTUNE_TEST_SLEEP": "0.4",
        "PYTHONPATH": str(ROOT),
    }
    ckpt = tmp_path / "out" / "state" / "searcher.pkl"
    proc = subprocess.Popen(
        [NPSTUNE, "search", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while not ckpt.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "no generation finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    first = proc.stdout.read().decode()
    done_before = Ledger.load(tmp_path / "out" / "state" / "ledger.json").generations
    assert 1 <= len(done_before) < gens, first

    res = subprocess.run(
        [NPSTUNE, "search", str(path), "--resume"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        start_new_session=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    resumed = [ln for ln in res.stdout.splitlines() if ln.startswith("resuming after")]
    assert resumed, res.stdout
    g0 = int(resumed[0].split()[3].split("/")[0])
    assert g0 >= len(done_before) - 0 and g0 >= 1
    nums = [
        int(ln.split()[1].split("/")[0])
        for ln in res.stdout.splitlines()
        if ln.startswith("generation ")
    ]
    assert nums == list(range(g0 + 1, gens + 1))  # continues from the next generation

    ledger = Ledger.load(tmp_path / "out" / "state" / "ledger.json")
    assert [g.generation for g in ledger.generations] == list(range(gens))
    assert sorted((r.generation, r.index) for r in ledger.records) == [
        (g, i) for g in range(gens) for i in range(pop)
    ]
    parents, children = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny")
    assert len(parents) == 1, "the parent run must be continued, not duplicated"
    assert parents[0].info.status == "FINISHED"
    kids = children[parents[0].info.run_id]
    assert sorted(
        (int(k.data.tags["npstune.generation"]), k.info.run_name) for k in kids
    ) == sorted((g, f"g{g:03d}-{i:02d}") for g in range(gens) for i in range(pop))


def test_transfer_use_scores_h_score(ray_local, tmp_path):
    path = write_tiny_search(
        tmp_path,
        use="transfer",
        transfer={"target": "task0", "pre_tasks": ["task1", "task2"]},
        nps={"subspaces": 4, "k": 0.5, "lam": {"low": 0.2, "high": 2.0, "init": 1.0}},
        search={"generations": 2},
        report={"baselines": ["pretrained", "individual", "nps-w1"]},
    )
    cfg = load_config(path)
    outcome = run_search(cfg)
    nps = outcome.report.row("nps")
    t = nps.test
    h = (
        2
        * t["pre_accuracy"]
        * t["target_accuracy"]
        / (t["pre_accuracy"] + t["target_accuracy"])
    )
    assert t["objective"] == pytest.approx(h) and t["h_score"] == pytest.approx(h)
    assert t["pre_accuracy"] == pytest.approx((t["acc/task1"] + t["acc/task2"]) / 2)
    assert set(outcome.best.params) == {"w0", "w1", "w2", "w3", "lam"}
    assert outcome.report.row("individual").label == "fine-tuned (target)"
    assert (cfg.out / "best_model.safetensors").is_file()
    best = json.loads((cfg.out / "best_candidate.json").read_text())
    assert best["tasks"] == ["task0"] and "--models" in best["merge_command"]


def test_compression_use_writes_a_sparse_store(ray_local, tmp_path):
    from npstune.compress import decompress

    path = write_tiny_search(
        tmp_path,
        use="compression",
        nps={"subspaces": 2, "k": 0.3, "weights": {"per_task": True}},
        search={"generations": 2},
        report={"baselines": ["individual", "nps-w1"]},
    )
    cfg = load_config(path)
    outcome = run_search(cfg)
    rep = outcome.report
    assert rep.row("individual").test["objective"] == pytest.approx(
        1.0
    )  # normalized by itself
    nps = rep.row("nps")
    assert nps.test["normalized_accuracy"] == pytest.approx(
        sum(
            nps.test[f"acc/task{t}"] / rep.row("individual").test[f"acc/task{t}"]
            for t in range(3)
        )
        / 3
    )
    assert len(outcome.best.params) == 3 * 2
    store = cfg.out / "best_store"
    assert (store / "manifest.json").is_file()
    # the store rebuilds the searched candidate's model of task1 exactly as evaluated
    from npstune.search.objective import Objective, build_payload

    obj = Objective(build_payload(cfg))
    cand = obj.space.candidate(outcome.best.params)
    decompress(store, "task1", tmp_path / "task1.safetensors")
    rebuilt = open_checkpoint(tmp_path / "task1.safetensors")
    ((tasks, state),) = [
        (t, {k: v.clone() for k, v in s.items()})
        for t, s in obj.states(cand)
        if t == ["task1"]
    ]
    for k, v in state.items():
        torch.testing.assert_close(rebuilt[k].float(), v.float(), rtol=0, atol=1e-6)


def test_streamed_candidates_pick_the_same_best(ray_local, tmp_path, monkeypatch):
    """One search per candidate path, same seed: the same trials, the same best. The
    streamed search's driver reads the partitions its trials stored in the run's state
    directory for its report, instead of passing over τ again."""
    import npstune.merge.pruning as pruning

    outcomes, said = {}, {}
    driver_passes: list[int] = []
    real = pruning.partitions
    monkeypatch.setattr(
        pruning, "partitions", lambda *a: driver_passes.append(1) or real(*a)
    )
    for how in ("memory", "stream"):
        path = write_tiny_search(
            tmp_path / how, nps={"candidates": how}, search={"generations": 2}
        )
        cfg = load_config(path)
        lines: list[str] = []
        pruning._SKETCHES.clear()
        outcomes[how] = run_search(cfg, echo=lines.append)
        said[how] = [ln for ln in lines if "candidates: " in ln]
        parents, _ = mlflow_runs(cfg.tracking.uri, "tiny")
        assert parents[0].data.params["candidates"] == how
    assert any("ranked in memory, as asked" in ln for ln in said["memory"])
    assert any("streamed from the checkpoints, as asked" in ln for ln in said["stream"])
    mem, st = outcomes["memory"], outcomes["stream"]
    assert mem.best.params == st.best.params and mem.best.value == st.best.value
    assert mem.trials == st.trials == 8
    stored = list((cfg.out / "state" / "sketches").glob("sketches-*.pkl"))
    assert len(stored) == 1  # fusion: one set of checkpoints
    assert driver_passes == []  # the trials computed them, the driver read them
