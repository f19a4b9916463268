"""Search cost: where an NPS fusion search spends its time (DESIGN §4).

One NPS fusion search (``nps-fusion-small`` on the small zoo, ``nps-fusion`` on the
full) through Ray Tune. From its ledger: time per candidate split into build (fuse + add
onto the base, ``build_s``) and evaluate (``eval_s``) as each trial measured them, the
trial's wall time with Ray's overhead (``time_total_s``), evaluations to reach 99 % of
the final best calibration score, generations, and total wall time. A second measurement
scores N random candidates in this process (no Ray) with
:class:`npstune.search.Objective` on the same payload, so build / evaluate are also
timed without trial overhead.

Run: ``python -m benchmarks.search_cost [--zoo small|full] [--quick]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from statistics import mean, median
from typing import Any

import numpy as np

from benchmarks.common import report
from benchmarks.zoo_setup import ZooBench

NAME = "search_cost"


def evals_to_fraction(values: list[float], frac: float = 0.99) -> int | None:
    """1-based count of evaluations after which the running best reaches ``frac`` of the
    final best (values in evaluation order); None when there are none."""
    if not values:
        return None
    final = max(values)
    target = frac * final if final >= 0 else final / frac
    best = -float("inf")
    for i, v in enumerate(values, 1):
        best = max(best, v)
        if best >= target:
            return i
    return len(values)


def _stats(name: str, xs: list[float]) -> dict[str, Any]:
    return {
        "quantity": name,
        "mean_s": mean(xs) if xs else None,
        "median_s": median(xs) if xs else None,
        "min_s": min(xs) if xs else None,
        "max_s": max(xs) if xs else None,
        "count": len(xs),
    }


def run(
    bench: ZooBench,
    direct: int,
    generations: int | None = None,
    population: int | None = None,
) -> tuple[
    dict[str, list[dict[str, Any]]], list[str], dict[str, float], dict[str, Any]
]:
    from npstune.search import Objective, build_payload, load_config, run_search
    from npstune.search.monitor import Ledger

    out = Path(tempfile.mkdtemp(prefix="npstune-bench-search-cost-"))
    o: dict[str, Any] = {
        "zoo": bench.size,
        "output_dir": str(out / "search"),
        "evaluator.calibration_examples": bench.cal_n,
        "evaluator.test_examples": bench.test_n,
        "report.save_model": False,
        "report.baselines": ["nps-w1"],
        "tracking.experiment": "npstune-benchmarks",
    }
    o.update(bench.search_budget(generations, population, quick_generations=2))
    path = bench.search_config_path("fusion")
    cfg = load_config(path, **o)
    try:
        t0 = time.perf_counter()
        outcome = run_search(cfg, echo=lambda m: print(f"  [search] {m}", flush=True))
        total = time.perf_counter() - t0
        ledger = Ledger.load(outcome.out / "state" / "ledger.json")
        recs = sorted(ledger.records, key=lambda r: (r.generation, r.index))
        ok = [r for r in recs if r.status == "ok"]
        build = [r.metrics["build_s"] for r in ok if "build_s" in r.metrics]
        ev = [r.metrics["eval_s"] for r in ok if "eval_s" in r.metrics]
        wall = [r.metrics["time_total_s"] for r in ok if "time_total_s" in r.metrics]
        overhead = [
            r.metrics["time_total_s"] - r.metrics["build_s"] - r.metrics["eval_s"]
            for r in ok
            if {"time_total_s", "build_s", "eval_s"} <= r.metrics.keys()
        ]
        values = [r.value for r in recs]
        n99 = evals_to_fraction(values)
        best = max(values) if values else None
        per_trial = [
            _stats("build (fuse + add), in trial", build),
            _stats("evaluate, in trial", ev),
            _stats("trial wall (Ray time_total_s)", wall),
            _stats("trial overhead (wall − build − evaluate)", overhead),
        ]

        # Direct: the same objective in this process, random candidates (no Ray).
        t1 = time.perf_counter()
        payload = build_payload(cfg, bench.zoo)
        payload_s = time.perf_counter() - t1
        obj = Objective(payload)
        rng = np.random.default_rng(bench.seed)
        d_build, d_eval = [], []
        for _ in range(direct):
            cand = obj.space.candidate(obj.space.from_unit(rng.random(obj.space.dim)))
            m = obj.score(cand)
            d_build.append(m["build_s"])
            d_eval.append(m["eval_s"])
        direct_rows = [
            _stats("build (fuse + add), direct", d_build),
            _stats("evaluate, direct", d_eval),
        ]

        summary = [
            {
                "search": cfg.name,
                "backend": cfg.search.backend,
                "population": cfg.search.population
                or payload.space.default_population(),
                "generations": outcome.generations,
                "evaluations": outcome.trials,
                "failed": len(recs) - len(ok),
                "dim": payload.space.dim,
                "n": payload.n,
                "tasks": len(payload.vector_tasks),
                "best_calibration": best,
                "evals_to_99pct": n99,
                "build_share": (sum(build) / (sum(build) + sum(ev)))
                if build and ev
                else None,
                "search_s": round(outcome.search_s, 1),
                "total_wall_s": round(total, 1),
                "payload_s": round(payload_s, 1),
            }
        ]
        gens = [
            {
                "generation": g.generation + 1,
                "best": g.best,
                "best_so_far": g.best_so_far,
                "mean": g.mean,
                "trials": g.trials,
                "failed": g.failed,
                "wall_s": round(g.wall_s, 2),
            }
            for g in ledger.generations
        ]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    sections = {
        f"Search cost, {bench.size} zoo": summary,
        "Time per candidate (Ray trials)": per_trial,
        f"Time per candidate (direct, {direct} random candidates)": direct_rows,
        "Generations": gens,
    }
    notes = [
        f"search file {Path(path).name} with overrides {o}",
        "build = fuse (subspace thresholds, top-k, scatter) + add onto the base; "
        "evaluate = calibration accuracy of every task; both as the trial measured "
        "them",
        "evals_to_99pct: evaluations (in generation order) until the running best "
        "reaches 99 % of the final best calibration score",
        "total_wall_s includes Ray start, payload build (ranking), the search and the "
        "final test report (baselines cut to magnitude; no best model written)",
    ]
    if bench.size == "small" and not o.get("search.generations"):
        verdict = "met" if total <= 300 else "NOT met"
        notes.append(
            f"target: the CI-sized search finishes in ≤ 5 min on 2 cores: "
            f"{total:.0f} s end to end ({verdict})"
        )
    metrics = {
        "total_wall_s": total,
        "search_s": outcome.search_s,
        "build_s_mean": per_trial[0]["mean_s"] or 0.0,
        "eval_s_mean": per_trial[1]["mean_s"] or 0.0,
        "evals_to_99pct": float(n99 or 0),
    }
    return (
        sections,
        notes,
        metrics,
        {"search_file": str(path), "direct_candidates": direct},
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.search_cost")
    ZooBench.add_arguments(ap)
    ap.add_argument(
        "--direct",
        type=int,
        default=None,
        help="random candidates timed in-process (default 2 quick, 10 full)",
    )
    args = ap.parse_args(argv)
    started = time.perf_counter()
    bench = ZooBench.from_args(args)
    direct = args.direct if args.direct is not None else (2 if args.quick else 10)
    sections, notes, metrics, facts = run(
        bench, direct, args.generations, args.population
    )
    report(
        args.name or NAME,
        sections,
        meta={**bench.meta(), **facts},
        notes=notes,
        started=started,
        metrics=metrics,
        out_dir=bench.out_dir,
    )


if __name__ == "__main__":
    main()
