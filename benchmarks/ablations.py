"""Ablations of the NPS fusion search: Ray Tune sweeps over one setting at a time.

The sweeps are the files in ``searchspaces/ablations/`` (each extends nps-fusion.yaml
and sweeps one key plus ``search.seed``): subspace count M ∈ {1, 2, 4, 8, 16},
calibration size {1/4, 1/2, 1} of the calibration examples, keep ratio k ∈ {0.01 ..
0.3}, backend cma vs nevergrad. Every variant is one :func:`npstune.search.run_search`
(calibration split only); the table gives, per value, mean ± std over the seeds of the
best candidate's calibration and test mean accuracy, with magnitude (w = 1 at the same
k, λ init) on test for reference. ``--quick``: one seed, one generation, population 4, 2
values per sweep.

A variant whose search config equals one already run (the default M = 8, k = 0.05, full
calibration, cma appears in every sweep) is searched once and shared. Each finished
search is written to ``NAME.partial.json`` at once; ``--resume`` keeps the searches
found there (or in an earlier ``NAME.json``) whose config is the same, so a stopped run
loses at most the search in flight.

Run: ``python -m benchmarks.ablations [--zoo small|full] [--quick] [--sweep subspaces]
[--resume [--finished-only]]``; ``--finished-only`` runs nothing and tabulates the
finished searches of a stopped run, naming the others in the notes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import yaml

from benchmarks.common import RESULTS, report
from benchmarks.zoo_setup import ZooBench

NAME = "ablations"
#: the swept "key" of the prune-before-merge sweep: its cells cross two overlay axes
PRUNE_MERGE = "prune → method"
ROOT = Path(__file__).resolve().parent.parent / "searchspaces" / "ablations"
SWEEPS = {  # name -> (file, swept key)
    "subspaces": ("subspaces.yaml", "nps.subspaces"),
    "calibration-size": ("calibration-size.yaml", "evaluator.calibration_fraction"),
    "keep-ratio": ("keep-ratio.yaml", "nps.k"),
    "backend": ("backend.yaml", "search.backend"),
    "prune-before-merge": ("prune-before-merge.yaml", PRUNE_MERGE),
}
SEED_KEY = "search.seed"


def _get(cfg: Any, dotted: str) -> Any:
    if dotted == PRUNE_MERGE:  # a method search's cell: "<pruning> → <method>"
        return f"{cfg.prune.method if cfg.prune else 'none'} → {cfg.method}"
    node: Any = cfg.model_dump(mode="json")
    for part in dotted.split("."):
        node = node[part]
    return node


def fingerprint(cfg: Any) -> str:
    """Hash of a search config without the fields that only name it (name, source file,
    output dir): two variants with one fingerprint run the same search."""
    d = cfg.model_dump(mode="json")
    for k in ("name", "source", "output_dir"):
        d.pop(k, None)
    if d.get("prune") is None:  # configs from before the prune: section hash alike
        d.pop("prune", None)
    d.get("nps", {}).pop("candidates", None)  # how, not what: the same results
    return hashlib.sha1(
        json.dumps(d, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


def earlier_runs(paths: list[Path], zoo_recipe: Any) -> dict[str, dict[str, Any]]:
    """Finished searches (fingerprint -> run row) of earlier partial or final results
    files made on the same zoo recipe; rows from other recipes or older formats are
    skipped."""
    done: dict[str, dict[str, Any]] = {}
    for path in paths:
        if not path.exists():
            continue
        old = json.loads(path.read_text())
        if old.get("zoo_recipe") != zoo_recipe:
            print(f"--resume: {path} was made on another zoo recipe; not reused")
            continue
        runs = old.get("runs") or old.get("sections", {}).get("Runs", [])
        for r in runs:
            if r.get("config") and r.get("calibration") is not None:
                done.setdefault(r["config"], r)
    return done


def _ms(vals: list[float]) -> tuple[float, float]:
    return mean(vals), (stdev(vals) if len(vals) > 1 else 0.0)


def variants(
    bench: ZooBench,
    sweep: str,
    out: Path,
    seeds: int | None,
    generations: int | None,
    population: int | None,
    n_values: int | None = None,
) -> list[Any]:
    """The sweep's configs for this zoo, cut down to the values and seeds to run."""
    from npstune.search import load_configs

    file, key = SWEEPS[sweep]
    path = ROOT / file
    sweep_spec = yaml.safe_load(path.read_text())["sweep"]
    seed_list = list(sweep_spec.get(SEED_KEY, [1]))
    values = (
        [
            f"{p.get('label', 'none')} → {m['method']}"
            for m in sweep_spec["@merge"]
            for p in sweep_spec["@prune"]
        ]
        if key == PRUNE_MERGE
        else list(sweep_spec[key])
    )
    if bench.quick:  # quick defaults: 2 values, 1 seed (--values / --seeds override)
        n_values = 2 if n_values is None else n_values
        seeds = 1 if seeds is None else seeds
    if n_values is not None:
        values = values[:n_values]
    if seeds is not None:
        seed_list = seed_list[:seeds]
    o: dict[str, Any] = {
        "zoo": bench.size,
        "output_dir": str(out / sweep),
        "evaluator.calibration_examples": bench.cal_n,
        "evaluator.test_examples": bench.test_n,
        "report.save_model": False,
        "tracking.experiment": "npstune-benchmarks-ablations",
    }
    if key != PRUNE_MERGE:  # method searches keep their file's [defaults]
        o["report.baselines"] = ["nps-w1"]
    o.update(bench.search_budget(generations, population, quick_generations=1))
    cfgs = load_configs(path, **o)
    return [
        c for c in cfgs if _get(c, key) in values and _get(c, SEED_KEY) in seed_list
    ]


def run(
    bench: ZooBench,
    sweeps: list[str],
    seeds: int | None = None,
    generations: int | None = None,
    population: int | None = None,
    n_values: int | None = None,
    *,
    done: dict[str, dict[str, Any]] | None = None,
    checkpoint: Path | None = None,
    finished_only: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(summary rows: mean ± std per value, per-run rows, notes). ``done``: finished
    searches by config fingerprint, reused instead of run; ``checkpoint``: file that
    gets every run row as soon as its search ends; ``finished_only``: run no search,
    tabulate the finished ones and name the others in the notes."""
    import ray

    from npstune.search import run_search
    from npstune.search.runner import connect_ray

    out = Path(tempfile.mkdtemp(prefix="npstune-bench-ablations-"))
    runs: list[dict[str, Any]] = []
    done = dict(
        done or {}
    )  # fingerprint -> finished search (earlier runs and this one)
    first: dict[str, dict[str, Any]] = {}  # fingerprint -> its first row in this table
    skipped: dict[str, str] = {}  # with finished_only: the searches not run
    recipe = bench.meta()["zoo_recipe"]
    started_ray = connect_ray(
        lambda m: print(f"  [ray] {m}", flush=True)
    )  # once for all
    try:
        for sweep in sweeps:
            key = SWEEPS[sweep][1]
            for cfg in variants(
                bench, sweep, out, seeds, generations, population, n_values
            ):
                fp = fingerprint(cfg)
                value = _get(cfg, key)
                if fp in first or fp in done:
                    if fp in first:  # the same search config earlier in this table
                        prev = first[fp]
                        how = f"shared ({prev['sweep']} {prev['value']})"
                    else:
                        prev, how = done[fp], "resumed"
                    r = {**prev, "sweep": sweep, "value": value, "run": how}
                    first.setdefault(fp, r)
                    runs.append(r)
                    print(
                        f"{sweep:17s} {str(value):9s} seed {r['seed']}: {how}",
                        flush=True,
                    )
                    continue
                if finished_only:  # each distinct search named once
                    skipped.setdefault(fp, f"{sweep} {value} seed {cfg.search.seed}")
                    continue
                t0 = time.perf_counter()
                outcome = run_search(
                    cfg,
                    echo=lambda m, name=cfg.name: print(f"  [{name}] {m}", flush=True),
                )
                rep = outcome.report
                # the searched row (the last of the method's name) and its start: NPS
                # w = 1, or the method at its defaults after the pruning's start
                nps = None
                if rep and cfg.method == "nps":
                    nps = rep.row("nps")
                elif rep:  # a method search: its baseline may carry its name too
                    nps = next(
                        (r for r in reversed(rep.rows) if r.method == cfg.method), None
                    )
                mag = (
                    rep.row("nps-w1" if cfg.method == "nps" else "defaults")
                    if rep
                    else None
                )
                r = {
                    "sweep": sweep,
                    "value": value,
                    "seed": cfg.search.seed,
                    "calibration": nps.calibration.get("objective") if nps else None,
                    "test": nps.test.get("objective") if nps else None,
                    "magnitude_test": mag.test.get("objective") if mag else None,
                    "trials": outcome.trials,
                    "generations": outcome.generations,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "run": "ran",
                    "config": fp,
                }
                runs.append(r)
                first[fp] = done[fp] = r
                if checkpoint is not None:
                    checkpoint.parent.mkdir(parents=True, exist_ok=True)
                    checkpoint.write_text(
                        json.dumps(  # every distinct search so far
                            {"zoo_recipe": recipe, "runs": list(done.values())},
                            indent=1,
                            default=str,
                        )
                    )
                print(
                    f"{sweep:17s} {str(r['value']):9s} seed {r['seed']}: calib "
                    f"{r['calibration']} test {r['test']} ({r['seconds']} s)",
                    flush=True,
                )
    finally:
        if started_ray:
            ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)

    rows: list[dict[str, Any]] = []
    for sweep in sweeps:
        values: list[Any] = []
        for r in runs:
            if r["sweep"] == sweep and r["value"] not in values:
                values.append(r["value"])
        for v in values:
            rs = [
                r
                for r in runs
                if r["sweep"] == sweep
                and r["value"] == v
                and r["calibration"] is not None
                and r["test"] is not None
            ]
            if not rs:
                continue
            cm, cs = _ms([r["calibration"] for r in rs])
            tm, ts = _ms([r["test"] for r in rs])
            mags = [r["magnitude_test"] for r in rs if r["magnitude_test"] is not None]
            rows.append(
                {
                    "sweep": sweep,
                    "value": v,
                    "seeds": len(rs),
                    "calibration_mean": cm,
                    "calibration_std": cs,
                    "test_mean": tm,
                    "test_std": ts,
                    "magnitude_test": mean(mags) if mags else None,
                    "trials": sum(r["trials"] for r in rs),
                    "seconds": round(
                        sum(
                            r["seconds"]
                            for r in rs
                            if not r["run"].startswith("shared")
                        ),
                        1,
                    ),
                }
            )
    notes = [
        "each value: the best candidate of each seed's search (by calibration mean "
        "accuracy); mean ± std (sample std, 0 with one seed) over seeds of its "
        "calibration and test mean accuracy; magnitude_test = w = 1 at the same k and "
        "λ init, on test",
        "searches use the calibration split only; test numbers come from the search's "
        "final report",
        "run: ran = searched here; shared (sweep value) = the same search config as "
        "that row, searched once; resumed = taken from an earlier run with the same "
        "config (--resume); seconds: search time, a shared search counted once",
    ]
    if skipped:
        notes.append(
            "not run yet (--finished-only tabulates the finished searches): "
            + "; ".join(skipped.values())
        )
    return rows, runs, notes


def prune_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prune-before-merge cells as one row per merge method, one column per
    pruning: ``test (calibration)``, and the gain of NPS pruning over none."""
    cells = [r for r in rows if r["sweep"] == "prune-before-merge"]
    out: dict[str, dict[str, Any]] = {}
    for r in cells:
        prune, method = str(r["value"]).split(" → ")
        row = out.setdefault(method, {"merge": method})
        row[prune] = f"{r['test_mean']:.4f} ({r['calibration_mean']:.4f})"
        row[f"_{prune}"] = r["test_mean"]
    table = []
    for row in out.values():
        if "_none" in row and "_nps" in row:
            row["nps_minus_none"] = round(row["_nps"] - row["_none"], 4)
        table.append({k: v for k, v in row.items() if not k.startswith("_")})
    return table


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per sweep: test mean ± std over seeds of the best candidate per value,
    its calibration mean, and magnitude (w = 1) on test. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    if not sweeps:
        return None
    fig, axes = plt.subplots(
        1, len(sweeps), figsize=(3.6 * len(sweeps), 3.4), squeeze=False
    )
    for ax, sweep in zip(axes[0], sweeps):
        rs = [r for r in rows if r["sweep"] == sweep]
        x = list(range(len(rs)))
        ax.errorbar(
            x,
            [r["test_mean"] for r in rs],
            yerr=[r["test_std"] for r in rs],
            fmt="o-",
            capsize=3,
            label="NPS, test",
        )
        ax.plot(
            x,
            [r["calibration_mean"] for r in rs],
            "s:",
            alpha=0.7,
            label="NPS, calibration",
        )
        if all(r["magnitude_test"] is not None for r in rs):
            ax.plot(
                x, [r["magnitude_test"] for r in rs], "x--", label="magnitude, test"
            )
        ax.set_xticks(x, [str(r["value"]) for r in rs])
        n = max(r["seeds"] for r in rs)
        ax.set_title(f"{sweep} ({n} seed{'s' if n != 1 else ''})")
        ax.set_xlabel(SWEEPS[sweep][1])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean accuracy")
    axes[0][0].legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ablations")
    ZooBench.add_arguments(ap)
    ap.add_argument(
        "--sweep",
        action="append",
        choices=list(SWEEPS),
        help="run only this sweep (repeatable; default all)",
    )
    ap.add_argument(
        "--seeds", type=int, default=None, help="first N seeds of each sweep"
    )
    ap.add_argument(
        "--values",
        type=int,
        default=None,
        help="first N values of each sweep (quick: 2)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the searches of NAME.partial.json / NAME.json with the same "
        "config instead of running them again",
    )
    ap.add_argument(
        "--finished-only",
        action="store_true",
        help="with --resume: run no search; tabulate the finished ones and name the "
        "rest in the notes (a table of a stopped run)",
    )
    args = ap.parse_args(argv)
    if args.finished_only and not args.resume:
        ap.error("--finished-only needs --resume (it tabulates finished searches)")
    started = time.perf_counter()
    bench = ZooBench.from_args(args)
    sweeps = args.sweep or list(SWEEPS)
    name = args.name or NAME
    out_dir = bench.out_dir or RESULTS
    checkpoint = out_dir / f"{name}.partial.json"
    done = (
        earlier_runs([checkpoint, out_dir / f"{name}.json"], bench.meta()["zoo_recipe"])
        if args.resume
        else {}
    )
    if done:
        print(f"--resume: {len(done)} finished searches reused", flush=True)
    try:
        rows, runs, notes = run(
            bench,
            sweeps,
            args.seeds,
            args.generations,
            args.population,
            args.values,
            done=done,
            checkpoint=checkpoint,
            finished_only=args.finished_only,
        )
    except BaseException:
        if checkpoint.exists():
            print(
                f"stopped; finished searches are in {checkpoint}: run again with "
                "--resume to keep them",
                flush=True,
            )
        raise
    metrics = {
        "test_"
        + "".join(c if c.isalnum() else "_" for c in f"{r['sweep']}_{r['value']}"): r[
            "test_mean"
        ]
        for r in rows
    }
    sections: dict[str, list[dict[str, Any]]] = {
        f"Ablations, {bench.size} zoo (mean ± std over seeds)": rows
    }
    pivot = prune_table(rows)
    if pivot:
        sections["Prune before merge (test mean accuracy; calibration in brackets)"] = (
            pivot
        )
        notes.append(
            "prune before merge: each cell is one method search on the calibration "
            "split (the merge's own λ/α, and the pruning's k and NPS weights where it "
            "has them, searched with one CMA-ES budget); magnitude_test of those rows "
            "is the method at its defaults after the pruning's start (NPS: w = 1)"
        )
    sections["Runs"] = runs
    meta = {
        **bench.meta(),
        "sweeps": sweeps,
        "generations": args.generations,
        "population": args.population,
        "values": args.values,
        "seeds": args.seeds,
    }
    figure = plot(rows, out_dir / f"{name}_sweeps.png")
    report(
        name,
        sections,
        meta=meta,
        notes=notes,
        started=started,
        metrics=metrics,
        out_dir=bench.out_dir,
        artifacts=[figure] if figure else [],
    )
    if not args.finished_only:  # a table of a stopped run: the rest still to come
        checkpoint.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
