"""Smoke tests of the benchmark modules on the small zoo: ``--quick`` runs whose written
JSON tables are checked for shape and invariants (never timings). One test per
module."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

QUICK = ["--zoo", "small", "--quick", "--calibration", "16", "--test", "16"]


@pytest.fixture
def no_mlflow(monkeypatch, all_cores):
    """No MLflow logging; every core for torch (the runs are zoo-sized)."""
    monkeypatch.setenv("NPSTUNE_BENCH_NO_MLFLOW", "1")


def _load(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.md").is_file()
    assert data["name"] == name and data["machine"]["cores"] >= 1 and data["wall_s"] > 0
    from npstune.evaluate.hf import cpu_has_bf16

    assert data["machine"]["cpu_bf16"] is cpu_has_bf16()  # what precision auto uses
    return data


def _unit(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0


# ---- transfer ------------------------------------------------------------------------
@pytest.mark.slow
def test_transfer_quick(small_zoo, no_mlflow, tmp_path):
    from benchmarks import transfer

    transfer.main([*QUICK, "--out-dir", str(tmp_path)])
    data = _load(tmp_path, "transfer")
    ((title, rows),) = data["sections"].items()
    assert "Transfer" in title
    methods = [r["method"] for r in rows]
    assert methods == [
        "pretrained' (TIES of old)",
        "full fine-tuning",
        "magnitude",
        "dare",
        "darex-q",
        "nps (searched)",
    ]
    tasks = data["tasks"]
    assert data["target"] == tasks[-1] and data["old_tasks"] == tasks[:-1]
    for r in rows:
        for c in [*tasks, "old_acc", "new_acc", "average", "h_score"]:
            assert _unit(r[c]), (r["method"], c, r[c])
        lo, hi = sorted((r["old_acc"], r["new_acc"]))
        assert lo - 1e-9 <= r["h_score"] <= hi + 1e-9
        assert r["average"] == pytest.approx((lo + hi) / 2)
        assert r["old_acc"] == pytest.approx(
            sum(r[t] for t in tasks[:-1]) / (len(tasks) - 1)
        )
        assert r["new_acc"] == pytest.approx(r[tasks[-1]])
        assert r["calibration_h"] is None or _unit(r["calibration_h"])


# ---- fusion --------------------------------------------------------------------------
@pytest.mark.slow
def test_fusion_quick_and_resume(small_zoo, no_mlflow, tmp_path):
    from benchmarks import fusion

    # WUDI's 400 default steps take minutes on 2 cores: 20 here (the row says so)
    args = [*QUICK, "--out-dir", str(tmp_path), "--no-search", "--wudi-steps", "20"]
    fusion.main(args)
    data = _load(tmp_path, "fusion")
    (rows,) = data["sections"].values()
    methods = [r["method"] for r in rows]
    assert methods[:3] == ["pretrained+heads", "fine-tuned", "averaging"]
    assert {
        "task-arithmetic",
        "ties",
        "dare",
        "darex-q",
        "consensus-ta",
        "consensus-ties",
        "magnitude",
        "fisher",
        "regmean",
        "tall-masks",
        "tsv-m",
        "iso-c",
        "iso-cts",
        "pcb",
        "wudi",
        "wudi (λ on cal)",
        "emr",
    } <= set(methods)
    assert len(methods) == len(set(methods))
    tasks = data["tasks"]
    for r in rows:
        assert all(_unit(r[t]) for t in tasks), r["method"]
        assert r["mean"] == pytest.approx(sum(r[t] for t in tasks) / len(tasks))
        assert r["normalized"] > 0 and r["seconds"] >= 0
    assert rows[1]["normalized"] == pytest.approx(1.0)
    from benchmarks.zoo_setup import (
        QUICK_GRIDS,
    )  # magnitude's λ from its own (wider) grid

    by = {r["method"]: r for r in rows}

    def chosen(method: str) -> list[str]:  # "λ=1.0 k=0.05" -> ["1.0", "0.05"]
        words = by[method]["choice"].split()
        return [w.split("=", 1)[1] for w in words if "=" in w][:2]

    assert float(chosen("magnitude")[0]) in QUICK_GRIDS["magnitude"]
    for m in ("tsv-m", "iso-c", "iso-cts"):  # α from the α grid, on calibration
        assert by[m]["choice"].startswith("α=")
        assert float(chosen(m)[0]) in QUICK_GRIDS["alpha"]
    assert by["iso-cts"]["choice"].endswith(" common_fraction=0.8")
    lam, ratio = map(float, chosen("pcb"))  # "λ=… ratio=…"
    assert lam in QUICK_GRIDS["pcb_lam"] and ratio in QUICK_GRIDS["pcb_ratio"]
    assert by["wudi"]["choice"] == "steps=20 lr=1e-05"  # no scale: nothing chosen
    assert by["wudi (λ on cal)"]["choice"].endswith(" on Δ(steps=20 lr=1e-05)")
    assert float(chosen("wudi (λ on cal)")[0]) in QUICK_GRIDS["ta"]
    # EMR: no parameter; one rescaler per task, each task on its own model
    assert by["emr"]["choice"].startswith("no params; λ_t=")
    lams = by["emr"]["choice"].split("λ_t=")[1].split(",")
    assert len(lams) == len(tasks) and all(float(v) > 0 for v in lams)
    # NPS rows of earlier searches (the default one and a named variant), as --resume
    # finds them
    path = tmp_path / "fusion.json"
    data = json.loads(path.read_text())
    (key,) = data["sections"]
    nps = [
        dict(rows[-1], method=m, choice="earlier search")
        for m in ("nps (searched)", "nps (nps-fusion-m16)")
    ]
    data["sections"][key] = rows = rows + nps
    path.write_text(json.dumps(data))
    # --resume with the same setup reuses every row, NPS rows too even with --no-search
    fusion.main([*args, "--resume"])
    again = _load(tmp_path, "fusion")
    assert list(again["sections"].values())[0] == rows
    assert again["calibration_evaluations"] == 0
    # each kept row says where it was measured: the earlier file's commit and machine
    git = data["machine"]["git"]
    assert set(again["resumed_rows"]) == {r["method"] for r in rows}
    assert all(v["git"] == git for v in again["resumed_rows"].values())
    (note,) = [x for x in again["notes"] if x.startswith("kept from an earlier run")]
    assert f"at git {git} on " in note and "nps (nps-fusion-m16)" in note
    # other WUDI steps: only the two WUDI rows are made again (in their places)
    fusion.main([*args[:-1], "10", "--resume"])
    third = list(_load(tmp_path, "fusion")["sections"].values())[0]
    assert [r["method"] for r in third] == [r["method"] for r in rows]
    for old, new in zip(rows, third):
        if old["method"].startswith("wudi"):
            assert "steps=10 lr=1e-05" in new["choice"]
        else:
            assert new == old


# ---- compression ---------------------------------------------------------------------
@pytest.mark.slow
def test_compression_quick(small_zoo, no_mlflow, tmp_path):
    from benchmarks import compression

    compression.main([*QUICK, "--out-dir", str(tmp_path)])
    data = _load(tmp_path, "compression")
    main, curve = data["sections"].values()
    methods = [r["method"] for r in main]
    assert methods[0] == "fine-tuned" and methods[-1] == "nps (searched)"
    assert {"task-arithmetic", "ties", "tall+ties", "emr", "magnitude", "dare"} <= set(
        methods
    )
    by = {r["method"]: r for r in main}
    assert by["fine-tuned"]["normalized"] == pytest.approx(1.0)
    assert by["fine-tuned"]["paper_bits_vs_ft"] == pytest.approx(1.0)
    # EMR: base + τ_uni + T one-bit masks + T 32-bit rescalers (the accounting's one
    # formula), its own model per task; no store on disk
    from npstune.compress import storage_bits

    n, T = data["n"], len(data["tasks"])
    emr = by["emr"]
    assert emr["paper_bits"] == storage_bits("emr", T, n).paper_bits
    assert emr["paper_bits"] == by["tall+ties"]["paper_bits"] + 32 * T
    assert emr["disk_bytes"] is None and emr["k"] is None
    assert emr["choice"].startswith("no params; λ_t=") and _unit(emr["mean_acc"])
    assert 0 < emr["normalized"] and emr["paper_bits_vs_ft"] < 1.0
    assert any(note.startswith("emr keeps τ_uni") for note in data["notes"])
    for m in (
        "magnitude",
        "dare",
        "nps (searched)",
    ):  # sparse rows: a real store, fewer bits
        assert by[m]["disk_bytes"] > 0 and by[m]["paper_bits_vs_ft"] < 1.0
    assert all(_unit(r["mean_acc"]) for r in main)
    assert len(curve) >= 2 and (tmp_path / "compression_curve.png").is_file()

    # --resume keeps every row it finds (the searched one too, with --no-search) and
    # computes only the missing ones: here EMR and the curve's first point, which the
    # same deterministic code gives again exactly
    path = tmp_path / "compression.json"
    cut = json.loads(path.read_text())
    cut_main, cut_curve = cut["sections"].values()
    cut_main[:] = [r for r in cut_main if r["method"] != "emr"]
    del cut_curve[0]
    path.write_text(json.dumps(cut))
    compression.main([*QUICK, "--out-dir", str(tmp_path), "--resume", "--no-search"])
    again = _load(tmp_path, "compression")
    main2, curve2 = again["sections"].values()
    assert sorted(r["method"] for r in main2) == sorted(methods)
    assert {r["method"]: r for r in main2} == by
    # every row kept but the two computed again and the fine-tuned reference (always
    # measured: it normalizes the others)
    kept = set(again["resumed_rows"])
    again_made = {"emr", "fine-tuned", f"{curve[0]['method']} at k={curve[0]['k']}"}
    assert not again_made & kept
    assert "nps (searched)" in kept and len(kept) == len(main) + len(curve) - 3
    assert any(x.startswith("kept from an earlier run") for x in again["notes"])
    assert sorted(curve2, key=lambda r: (r["k"], r["method"])) == sorted(
        curve, key=lambda r: (r["k"], r["method"])
    )


# ---- ablations -----------------------------------------------------------------------
@pytest.mark.slow
def test_ablations_quick(small_zoo, no_mlflow, tmp_path):
    from benchmarks import ablations

    # One sweep keeps the smoke short (each search starts fresh Ray trial actors): the
    # backend sweep covers both optimizers; the others run the same code path.
    ablations.main([*QUICK, "--sweep", "backend", "--out-dir", str(tmp_path)])
    data = _load(tmp_path, "ablations")
    summary, runs = data["sections"].values()
    assert [r["value"] for r in summary] == ["cma", "nevergrad"]  # quick: 2 values
    assert {r["sweep"] for r in summary} == {"backend"}
    assert len(runs) == 2 and {r["seed"] for r in runs} == {1}  # quick: one seed
    for r in summary:
        assert r["seeds"] == 1 and r["calibration_std"] == 0 and r["test_std"] == 0
        for c in ("calibration_mean", "test_mean", "magnitude_test"):
            assert _unit(r[c]), (r["sweep"], r["value"], c, r[c])
        assert r["trials"] == 4  # quick: one generation of 4


@pytest.mark.slow
def test_ablations_share_and_resume(small_zoo, no_mlflow, tmp_path, monkeypatch):
    """A config that appears in two sweeps (M = 8 = the default, k = 0.05 = the default)
    is searched once; a run stopped mid-way keeps its finished searches in
    NAME.partial.json and --resume runs only the rest. run_search is replaced by a
    recorder (no search)."""
    import types

    import npstune.search
    import npstune.search.runner
    from benchmarks import ablations

    calls: list[str] = []
    fail_at = {"n": None}

    def fake_search(cfg, echo=None):
        if fail_at["n"] is not None and len(calls) == fail_at["n"]:
            raise KeyboardInterrupt
        calls.append(cfg.name)
        score = 0.5 + 0.01 * cfg.nps.subspaces + cfg.nps.k  # depends on the config only
        row = types.SimpleNamespace(
            calibration={"objective": score}, test={"objective": score - 0.1}
        )
        rep = types.SimpleNamespace(row=lambda m: row)
        return types.SimpleNamespace(report=rep, trials=4, generations=1)

    monkeypatch.setattr(npstune.search, "run_search", fake_search)
    monkeypatch.setattr(npstune.search.runner, "connect_ray", lambda echo: False)
    argv = [
        *QUICK,
        "--sweep",
        "subspaces",
        "--sweep",
        "keep-ratio",
        "--values",
        "4",
        "--out-dir",
        str(tmp_path),
    ]
    partial = tmp_path / "ablations.partial.json"

    fail_at["n"] = 3
    with pytest.raises(KeyboardInterrupt):
        ablations.main(argv)
    assert len(calls) == 3 and not (tmp_path / "ablations.json").exists()
    assert len(json.loads(partial.read_text())["runs"]) == 3

    # --finished-only: the table of the three finished searches, nothing searched, the
    # other four named in the notes; the partial file stays for the real resume
    calls.clear()
    fail_at["n"] = None
    with pytest.raises(SystemExit):  # it only tabulates what --resume finds
        ablations.main([*argv, "--finished-only"])
    ablations.main([*argv, "--resume", "--finished-only"])
    assert calls == [] and partial.exists()
    early = _load(tmp_path, "ablations")
    assert [r["run"] for r in list(early["sections"].values())[1]] == ["resumed"] * 3
    (todo,) = [x for x in early["notes"] if x.startswith("not run yet")]
    assert todo.count(" seed ") == 4 and "keep-ratio" in todo
    (tmp_path / "ablations.json").unlink()

    calls.clear()
    ablations.main([*argv, "--resume"])
    # 4 + 4 variants, one config in both sweeps, 3 done before: 7 - 3 = 4 searches
    assert len(calls) == 4 and not partial.exists()
    data = _load(tmp_path, "ablations")
    summary, runs = data["sections"].values()
    assert [r["run"] for r in runs] == ["resumed"] * 3 + ["ran"] * 3 + [
        "shared (subspaces 8)",
        "ran",
    ]
    by = {(r["sweep"], r["value"]): r for r in runs}
    assert by[("keep-ratio", 0.05)]["config"] == by[("subspaces", 8)]["config"]
    assert by[("keep-ratio", 0.05)]["test"] == by[("subspaces", 8)]["test"]
    assert len({r["config"] for r in runs}) == 7
    # seconds: a shared search is counted once (in the sweep that ran it)
    srow = {(r["sweep"], r["value"]): r for r in summary}
    assert srow[("keep-ratio", 0.05)]["seconds"] == 0

    assert (tmp_path / "ablations_sweeps.png").stat().st_size > 0

    calls.clear()  # a full rerun with --resume reuses everything from NAME.json
    ablations.main([*argv, "--resume"])
    assert calls == []
    runs2 = list(_load(tmp_path, "ablations")["sections"].values())[1]
    assert [r["run"] for r in runs2] == ["resumed"] * 6 + [
        "shared (subspaces 8)",
        "resumed",
    ]
    assert [(r["config"], r["test"]) for r in runs2] == [
        (r["config"], r["test"]) for r in runs
    ]


@pytest.mark.slow
def test_ablation_variants_quick(small_zoo, tmp_path):
    """Every sweep file gives 2 values x 1 seed in quick mode (no search run)."""
    from benchmarks.ablations import SWEEPS, _get, variants
    from benchmarks.zoo_setup import ZooBench

    bench = ZooBench("small", quick=True, calibration=32, test=64)
    assert bench.meta()["zoo_ready_s"] >= 0  # reported in every zoo benchmark's JSON
    for sweep, (_, key) in SWEEPS.items():
        cfgs = variants(bench, sweep, tmp_path, None, None, None)
        assert len(cfgs) == 2, sweep
        assert len({_get(c, key) for c in cfgs}) == 2
        assert all(
            c.search.seed == 1
            and c.search.generations == 1
            and c.search.population == 4
            and c.zoo == "small"
            for c in cfgs
        )
        assert all(c.evaluator.calibration_examples == 32 for c in cfgs)


# ---- search_cost ---------------------------------------------------------------------
@pytest.mark.slow
def test_search_cost_quick(small_zoo, no_mlflow, tmp_path):
    from benchmarks import search_cost

    search_cost.main([*QUICK, "--out-dir", str(tmp_path), "--precisions", "fp32,bf16"])
    data = _load(tmp_path, "search_cost")
    summary, trial, direct, tolerance, gens = data["sections"].values()
    assert [s["precision"] for s in summary] == ["fp32", "bf16"]
    for s in summary:
        assert s["evaluations"] == s["population"] * s["generations"] == 8
        assert 1 <= s["evals_to_99pct"] <= s["evaluations"]
        assert _unit(s["best_calibration"]) and 0 <= s["build_share"] <= 1
        assert s["total_wall_s"] >= s["search_s"] > 0
        assert s["evals_per_hour"] == pytest.approx(
            s["evaluations"] / s["search_s"] * 3600, rel=0.01
        )
    assert summary[0]["speedup_vs_first"] == 1.0
    assert [r["quantity"].split(",")[0] for r in trial[:2]] == [
        "build (fuse + add)",
        "evaluate",
    ]
    assert (
        {r["precision"] for r in trial}
        == {r["precision"] for r in direct}
        == {
            "fp32",
            "bf16",
        }
    )
    from npstune.search import load_config

    small = Path(search_cost.__file__).parents[1] / "searchspaces/nps-fusion-small.yaml"
    trial_threads = int(load_config(small).resources.cpus_per_trial)
    assert trial_threads in {r["threads"] for r in direct}  # what a trial gets
    for r in trial + direct:
        assert r["count"] > 0 and 0 <= r["min_s"] <= r["mean_s"] <= r["max_s"]
    (tol,) = tolerance
    assert (tol["precision"], tol["against"], tol["candidates"]) == ("bf16", "fp32", 8)
    assert 0 <= tol["mean_abs_diff"] <= tol["max_abs_diff"] <= 1
    assert tol["same_best"] == (tol["best_index"] == tol["best_index_ref"])
    assert tol["regret"] >= 0 and (tol["regret"] == 0 or not tol["same_best"])
    assert [g["generation"] for g in gens if g["precision"] == "fp32"] == [1, 2]
    fp32 = [g for g in gens if g["precision"] == "fp32"]
    assert fp32[1]["best_so_far"] >= fp32[0]["best_so_far"]
    assert all(_unit(g["best"]) for g in gens)


def test_spearman_by_hand():
    from benchmarks.search_cost import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(3**0.5 / 2)
    assert spearman([1, 1], [1, 2]) is None  # a constant list has no ranking
    assert spearman([1], [1]) is None


def test_evals_to_fraction():
    from benchmarks.search_cost import evals_to_fraction

    assert evals_to_fraction([]) is None
    assert evals_to_fraction([0.5, 0.6, 0.7, 0.7]) == 3
    assert evals_to_fraction([0.9, 0.5, 0.905]) == 1  # 0.9 >= 0.99 * 0.905


# ---- speed ---------------------------------------------------------------------------
def test_speed_candidates_and_peer_tiny(no_mlflow, tmp_path):
    from benchmarks import speed

    out = tmp_path / "out"
    args = [
        "--sizes",
        "300000",
        "--peer-shape",
        "32,2,64,256",
        "--scratch",
        str(tmp_path / "s"),
        "--out-dir",
        str(out),
    ]
    # emr: one output per task, all removed; wudi:steps=2 passes --param steps=2
    methods = "wudi:steps=2,ties,emr"
    speed.main(
        ["--parts", "candidates,peer", "--peer-methods", methods, "--keep", *args]
    )
    # --keep keeps the synthesized models only: every merge's output is gone
    assert sorted(p.name for p in (tmp_path / "s" / "peer").iterdir()) == [
        "base",
        "ft_a",
        "ft_b",
    ]
    data = _load(out, "speed")
    (cand,) = [
        v for k, v in data["sections"].items() if k.startswith("NPS candidate build")
    ]
    assert (
        cand[0]["identical"] is True
        and cand[0]["b_over_c"] > 0
        and cand[0]["c_over_a"] > 0
    )
    (peer,) = [v for k, v in data["sections"].items() if k.startswith("Peer workload")]
    assert [r["tool"] for r in peer] == [
        "floor (read 3, write 1; safetensors)",
        "npstune wudi (steps=2)",
        "npstune ties",
        "npstune emr",
    ]
    assert all(r["rc"] == 0 and r["wall_s"] > 0 and r["rss_mib"] > 0 for r in peer)
    assert all(list(r) == list(speed.PEER_COLUMNS) for r in peer)
    assert peer[0]["time_vs_floor"] == 1 and peer[2]["rss_vs_ties"] == 1
    assert set(data["part_notes"]) == {"candidates", "peer"}
    first = data["part_notes"]["peer"]
    # re-running one part replaces its notes and table, keeps the other's (the
    # in-process part is re-run: the peer part's three subprocesses are the slow half of
    # this test)
    speed.main(["--parts", "candidates", *args])
    again = _load(out, "speed")
    assert again["part_notes"]["peer"] == first
    notes = again["part_notes"]["candidates"]
    assert len(notes) == 1 and notes[0].startswith("ran ")
    assert [k for k in again["sections"] if k.startswith("Peer workload")] == [
        k for k in data["sections"] if k.startswith("Peer workload")
    ]
    assert sum(k.startswith("NPS candidate build") for k in again["sections"]) == 1
    assert not (tmp_path / "s").exists()  # scratch removed
    with pytest.raises(SystemExit):
        speed.main(["--parts", "peers", *args])
    with pytest.raises(SystemExit):
        speed.main(["--parts", "peer", "--peer-methods", "ties,nope", *args])
    with pytest.raises(SystemExit):
        speed.main(["--parts", "peer", "--peer-methods", "nope:steps=4", *args])


def test_speed_engine_part_tiny(no_mlflow, tmp_path):
    """The engine part: the floor then each method, for every layout × dtype, each
    ratio against the floor of its own (layout, dtype); the models are deleted."""
    from benchmarks import speed
    from npstune.merge.registry import method_names

    assert set(speed.ENGINE_METHODS) <= set(method_names())  # every default runs
    big = speed.engine_layouts(150_000_000)
    assert (len(big["many"]), len(big["few"])) == (2288, 6)  # 150e6 // 65536, // 25e6
    assert set(big["few"].values()) == {(5000, 5000)}
    tiny = speed.engine_layouts(200_000)
    assert set(tiny["few"].values()) == {(223, 223)} and len(tiny["few"]) == 4
    out = tmp_path / "out"
    speed.main(
        [
            "--parts",
            "engine",
            "--engine-methods",
            "task-arithmetic,ties",
            "--engine-entries",
            "200000",
            "--scratch",
            str(tmp_path / "s"),
            "--out-dir",
            str(out),
        ]
    )
    data = _load(out, "speed")
    (rows,) = [v for k, v in data["sections"].items() if k.startswith("Engine:")]
    assert [(r["layout"].split()[0], r["dtype"], r["tool"]) for r in rows] == [
        (layout, dt, tool)
        for layout in ("many", "few")
        for dt in ("float32", "bfloat16")
        for tool in (
            "floor (read 3, write 1; safetensors)",
            "npstune task-arithmetic",
            "npstune ties",
        )
    ]
    assert rows[0]["layout"] == "many (3 × 256×256)"
    assert rows[3]["entries"] == 3 * 65536
    assert all(r["rc"] == 0 and r["wall_s"] > 0 for r in rows)
    for g in range(0, len(rows), 3):
        floor, ta, ties = rows[g : g + 3]
        assert floor["time_vs_floor"] == pytest.approx(1.0)
        assert ta["time_vs_floor"] == pytest.approx(ta["wall_s"] / floor["wall_s"])
        assert ties["time_vs_ties"] == pytest.approx(1.0)
    assert not (tmp_path / "s").exists()  # no --keep: scratch and models are gone


def test_speed_extrapolates_an_iterative_method_to_its_default_steps():
    from benchmarks import speed

    def row(tool, wall, rss, rc=0):
        return {
            **dict.fromkeys(speed.PEER_COLUMNS),
            "tool": tool,
            "rc": rc,
            "wall_s": wall,
            "cpu_s": 2 * wall,
            "rss_mib": rss,
        }

    specs = ["ties", "wudi:steps=4", "wudi:steps=12", "wudi:steps=20:lr=0.1"]
    rows = [
        row("t", 9.0, 5.0),
        row("a", 30.0, 100.0),
        row("b", 70.0, 90.0),
        row("c", 1.0, 1.0),
    ]
    (got,) = speed.extrapolate_steps(rows, specs)
    # 5 s per step from (4, 30 s) to (12, 70 s): 30 + (400 - 4)·5 = 2010 s
    assert got["tool"] == "npstune wudi (steps=400, extrapolated)"
    assert got["wall_s"] == 2010 and got["cpu_s"] == 4020 and got["rss_mib"] == 100
    assert got["note"].startswith("not measured") and "5.0 s per step" in got["note"]
    assert list(got) == list(speed.PEER_COLUMNS)
    # one finished step count (the other failed) gives no row
    rows[2]["rc"] = 1
    assert speed.extrapolate_steps(rows, specs) == []
    assert speed.method_spec("wudi:steps=4:lr=1e-5") == ("wudi", ["steps=4", "lr=1e-5"])
    assert speed._tool("wudi:steps=4") == "npstune wudi (steps=4)"


def test_speed_run_measured_timeout(monkeypatch, tmp_path):
    """A child past the timeout is killed: rc 124, no ratios, a note; the others keep
    theirs."""
    import sys

    from benchmarks import speed

    info = speed._run_measured(
        [sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5
    )
    assert info["timed_out"] is True and info["rc"] == 124 and info["rss_mib"] > 0
    # a child imports this checkout's npstune, whatever the editable install points at
    monkeypatch.chdir(tmp_path)  # not the checkout: no import from the working dir
    root = str(Path(speed.__file__).resolve().parent.parent)
    check = (
        "import importlib.util as u, sys; "
        f"sys.exit(0 if u.find_spec('npstune').origin.startswith({root!r}) else 3)"
    )
    assert speed._run_measured([sys.executable, "-c", check])["rc"] == 0
    rows = [
        speed._peer_row("floor", {"rc": 0, "wall_s": 2.0, "rss_mib": 100.0}, 9),
        speed._peer_row("npstune ties", {"rc": 0, "wall_s": 4.0, "rss_mib": 50.0}, 9),
        speed._peer_row("npstune wudi", info, 0.5),
    ]
    speed._ratios(rows)
    assert rows[1]["time_vs_floor"] == 2 and rows[1]["rss_vs_floor"] == 0.5
    assert rows[1]["time_vs_ties"] == 1
    assert rows[2]["wall_s"] is None and rows[2]["time_vs_ties"] is None
    assert rows[2]["note"].startswith("timed out")
    # how far a run got and why it failed, from a stderr with a tqdm bar
    err = (
        "merge x:  10%|#  | 3/30 [00:02<00:18]\rmerge x:  13%|#  | 4/30 [00:03<00:17]\r"
    )
    assert speed._progress(err) == "4/30" and speed._progress("no bar") is None
    assert (
        speed._last_message("Traceback\nValueError: bad\n" + err) == "ValueError: bad"
    )
