"""Ablations of the NPS fusion search: Ray Tune sweeps over one setting at a time.

The sweeps are the files in ``searchspaces/ablations/`` (each extends nps-fusion.yaml and
sweeps one key plus ``search.seed``): subspace count M ∈ {1, 2, 4, 8, 16}, calibration
size {1/4, 1/2, 1} of the calibration examples, keep ratio k ∈ {0.01 .. 0.3}, backend cma
vs nevergrad. Every variant is one :func:`npstune.search.run_search` (calibration split
only); the table gives, per value, mean ± std over the seeds of the best candidate's
calibration and test mean accuracy, with magnitude (w = 1 at the same k, λ init) on test
for reference. ``--quick``: one seed, one generation, population 4, 2 values per sweep.

Run: ``python -m benchmarks.ablations [--zoo small|full] [--quick] [--sweep subspaces]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import yaml

from benchmarks.common import report
from benchmarks.zoo_setup import ZooBench

NAME = "ablations"
ROOT = Path(__file__).resolve().parent.parent / "searchspaces" / "ablations"
SWEEPS = {  # name -> (file, swept key)
    "subspaces": ("subspaces.yaml", "nps.subspaces"),
    "calibration-size": ("calibration-size.yaml", "evaluator.calibration_fraction"),
    "keep-ratio": ("keep-ratio.yaml", "nps.k"),
    "backend": ("backend.yaml", "search.backend"),
}
SEED_KEY = "search.seed"


def _get(cfg: Any, dotted: str) -> Any:
    node: Any = cfg.model_dump(mode="json")
    for part in dotted.split("."):
        node = node[part]
    return node


def _ms(vals: list[float]) -> tuple[float, float]:
    return mean(vals), (stdev(vals) if len(vals) > 1 else 0.0)


def variants(bench: ZooBench, sweep: str, out: Path, seeds: int | None,
             generations: int | None, population: int | None,
             n_values: int | None = None) -> list[Any]:
    """The sweep's configs for this zoo, cut down to the values and seeds to run."""
    from npstune.search import load_configs

    file, key = SWEEPS[sweep]
    path = ROOT / file
    sweep_spec = yaml.safe_load(path.read_text())["sweep"]
    values = list(sweep_spec[key])
    seed_list = list(sweep_spec.get(SEED_KEY, [1]))
    if bench.quick:
        values, seed_list = values[:2], seed_list[:1]
    if n_values is not None:
        values = values[:n_values]
    if seeds is not None:
        seed_list = seed_list[:seeds]
    o: dict[str, Any] = {
        "zoo": bench.size,
        "output_dir": str(out / sweep),
        "evaluator.calibration_examples": bench.cal_n,
        "evaluator.test_examples": bench.test_n,
        "report.baselines": ["magnitude"],
        "report.save_model": False,
        "tracking.experiment": "npstune-benchmarks-ablations",
    }
    o.update(bench.search_budget(generations, population, quick_generations=1))
    cfgs = load_configs(path, **o)
    return [c for c in cfgs if _get(c, key) in values and _get(c, SEED_KEY) in seed_list]


def run(bench: ZooBench, sweeps: list[str], seeds: int | None = None,
        generations: int | None = None, population: int | None = None,
        n_values: int | None = None
        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(summary rows: mean ± std per value, per-run rows, notes)."""
    import ray

    from npstune.search import run_search
    from npstune.search.runner import connect_ray

    out = Path(tempfile.mkdtemp(prefix="npstune-bench-ablations-"))
    runs: list[dict[str, Any]] = []
    started_ray = connect_ray(lambda m: print(f"  [ray] {m}", flush=True))  # once for all
    try:
        for sweep in sweeps:
            key = SWEEPS[sweep][1]
            for cfg in variants(bench, sweep, out, seeds, generations, population, n_values):
                t0 = time.perf_counter()
                outcome = run_search(cfg, echo=lambda m: print(f"  [{cfg.name}] {m}", flush=True))
                rep = outcome.report
                nps = rep.row("nps") if rep else None
                mag = rep.row("magnitude") if rep else None
                r = {"sweep": sweep, "value": _get(cfg, key), "seed": cfg.search.seed,
                     "calibration": nps.calibration.get("objective") if nps else None,
                     "test": nps.test.get("objective") if nps else None,
                     "magnitude_test": mag.test.get("objective") if mag else None,
                     "trials": outcome.trials, "generations": outcome.generations,
                     "seconds": round(time.perf_counter() - t0, 1)}
                runs.append(r)
                print(f"{sweep:17s} {str(r['value']):9s} seed {r['seed']}: calib "
                      f"{r['calibration']} test {r['test']} ({r['seconds']} s)", flush=True)
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
            rs = [r for r in runs if r["sweep"] == sweep and r["value"] == v
                  and r["calibration"] is not None and r["test"] is not None]
            if not rs:
                continue
            cm, cs = _ms([r["calibration"] for r in rs])
            tm, ts = _ms([r["test"] for r in rs])
            mags = [r["magnitude_test"] for r in rs if r["magnitude_test"] is not None]
            rows.append({"sweep": sweep, "value": v, "seeds": len(rs),
                         "calibration_mean": cm, "calibration_std": cs,
                         "test_mean": tm, "test_std": ts,
                         "magnitude_test": mean(mags) if mags else None,
                         "trials": sum(r["trials"] for r in rs),
                         "seconds": round(sum(r["seconds"] for r in rs), 1)})
    notes = [
        "each value: the best candidate of each seed's search (by calibration mean "
        "accuracy); mean ± std (sample std, 0 with one seed) over seeds of its calibration "
        "and test mean accuracy; magnitude_test = w = 1 at the same k and λ init, on test",
        "searches use the calibration split only; test numbers come from the search's "
        "final report",
    ]
    return rows, runs, notes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ablations")
    ZooBench.add_arguments(ap)
    ap.add_argument("--sweep", action="append", choices=list(SWEEPS),
                    help="run only this sweep (repeatable; default all)")
    ap.add_argument("--seeds", type=int, default=None, help="first N seeds of each sweep")
    ap.add_argument("--values", type=int, default=None,
                    help="first N values of each sweep (quick: 2)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    bench = ZooBench.from_args(args)
    sweeps = args.sweep or list(SWEEPS)
    rows, runs, notes = run(bench, sweeps, args.seeds, args.generations, args.population,
                            args.values)
    metrics = {f"test_{r['sweep']}_{r['value']}": r["test_mean"] for r in rows}
    meta = {**bench.meta(), "sweeps": sweeps, "generations": args.generations,
            "population": args.population, "values": args.values, "seeds": args.seeds}
    report(args.name or NAME,
           {f"Ablations, {bench.size} zoo (mean ± std over seeds)": rows, "Runs": runs},
           meta=meta, notes=notes, started=started, metrics=metrics, out_dir=bench.out_dir)


if __name__ == "__main__":
    main()
