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


def _search(
    bench: ZooBench,
    precision: str,
    generations: int | None,
    population: int | None,
) -> dict[str, Any]:
    """One search at ``precision``: its summary row, per-trial timings, generations,
    ledger records and config."""
    from npstune.search import load_config, run_search
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
    o["evaluator.precision"] = precision  # this search's, not the bench's
    path = bench.search_config_path("fusion")
    cfg = load_config(path, **o)
    try:
        t0 = time.perf_counter()
        outcome = run_search(
            cfg, echo=lambda m: print(f"  [search {precision}] {m}", flush=True)
        )
        total = time.perf_counter() - t0
        ledger = Ledger.load(outcome.out / "state" / "ledger.json")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    recs = sorted(ledger.records, key=lambda r: (r.generation, r.index))
    ok = [r for r in recs if r.status == "ok"]

    def metric(name: str) -> list[float]:
        return [r.metrics[name] for r in ok if name in r.metrics]

    build, ev, wall = metric("build_s"), metric("eval_s"), metric("time_total_s")
    overhead = [
        r.metrics["time_total_s"] - r.metrics["build_s"] - r.metrics["eval_s"]
        for r in ok
        if {"time_total_s", "build_s", "eval_s"} <= r.metrics.keys()
    ]
    values = [r.value for r in recs]
    best = max(recs, key=lambda r: r.value) if recs else None
    row = {
        "precision": precision,
        "search": cfg.name,
        "backend": cfg.search.backend,
        "population": cfg.search.population,
        "generations": outcome.generations,
        "evaluations": outcome.trials,
        "failed": len(recs) - len(ok),
        "best_calibration": best.value if best else None,
        "best_trial": f"g{best.generation + 1}#{best.index}" if best else None,
        "evals_to_99pct": evals_to_fraction(values),
        "build_share": (sum(build) / (sum(build) + sum(ev))) if build and ev else None,
        "search_s": round(outcome.search_s, 1),
        "evals_per_hour": round(outcome.trials / outcome.search_s * 3600, 1)
        if outcome.search_s
        else None,
        "total_wall_s": round(total, 1),
    }
    per_trial = [
        {"precision": precision, **_stats(name, xs)}
        for name, xs in (
            ("build (fuse + add), in trial", build),
            ("evaluate, in trial", ev),
            ("trial wall (Ray time_total_s)", wall),
            ("trial overhead (wall − build − evaluate)", overhead),
        )
    ]
    gens = [
        {
            "precision": precision,
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
    return {
        "row": row,
        "per_trial": per_trial,
        "gens": gens,
        "records": ok,
        "cfg": cfg,
        "path": path,
        "overrides": o,
    }


def _evaluators(
    cfg: Any, bench: ZooBench, tasks: list[str], precisions: list[str]
) -> dict[str, Any]:
    """One calibration evaluator of ``cfg`` per precision."""
    from npstune.search.objective import CALIBRATION, make_evaluator

    return {
        p: make_evaluator(
            cfg.model_copy(
                update={"evaluator": cfg.evaluator.model_copy(update={"precision": p})}
            ),
            bench.zoo,
            tasks,
            CALIBRATION,
        )
        for p in precisions
    }


def run(
    bench: ZooBench,
    direct: int,
    generations: int | None = None,
    population: int | None = None,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
) -> tuple[
    dict[str, list[dict[str, Any]]], list[str], dict[str, float], dict[str, Any]
]:
    import torch

    from npstune.search import Objective, build_payload
    from npstune.search.space import METRIC

    searches = {p: _search(bench, p, generations, population) for p in precisions}
    first = searches[precisions[0]]
    cfg = first["cfg"]

    # Direct: the same objective in this process (no Ray), random candidates, at the
    # trial's thread count (what a trial gets) and at every core.
    t1 = time.perf_counter()
    payload = build_payload(cfg, bench.zoo)
    payload_s = time.perf_counter() - t1
    obj = Objective(payload)
    evs = _evaluators(cfg, bench, payload.eval_tasks, list(precisions))
    trial_threads = max(1, int(cfg.resources.cpus_per_trial))
    all_threads = torch.get_num_threads()
    rng = np.random.default_rng(bench.seed)
    cands = [
        obj.space.candidate(obj.space.from_unit(rng.random(obj.space.dim)))
        for _ in range(direct)
    ]
    direct_rows = []
    for p, ev in evs.items():
        for threads in dict.fromkeys((trial_threads, all_threads)):
            torch.set_num_threads(threads)
            ms = [obj.score(c, evaluator=ev) for c in cands]
            direct_rows += [
                {"precision": p, "threads": threads, **_stats(name, xs)}
                for name, xs in (
                    ("build (fuse + add), direct", [m["build_s"] for m in ms]),
                    ("evaluate, direct", [m["eval_s"] for m in ms]),
                )
            ]
    torch.set_num_threads(all_threads)

    # Tolerance: the first search's candidates, each scored again at every precision.
    scores: dict[str, list[float]] = {p: [] for p in precisions}
    for r in first["records"]:
        cand = obj.space.candidate(r.params)
        for p, ev in evs.items():
            scores[p].append(obj.score(cand, evaluator=ev)[METRIC])
    ref = scores[precisions[0]]
    tolerance = []
    best_ref = int(np.argmax(ref)) if ref else None
    for p in precisions[1:]:
        diff = [abs(a - b) for a, b in zip(ref, scores[p])]
        best = int(np.argmax(scores[p])) if ref else None
        tolerance.append(
            {
                "precision": p,
                "against": precisions[0],
                "candidates": len(diff),
                "max_abs_diff": max(diff) if diff else None,
                "mean_abs_diff": mean(diff) if diff else None,
                "best_index_ref": best_ref,
                "best_index": best,
                "same_best": best is not None and best == best_ref,
                # what taking this precision's pick costs, in the reference's scores
                "regret": max(ref) - ref[best] if best is not None else None,
                "rank_corr": spearman(ref, scores[p]),
            }
        )

    summary = [s["row"] for s in searches.values()]
    base_rate = summary[0]["evals_per_hour"]
    for row in summary:
        row["speedup_vs_first"] = (
            round(row["evals_per_hour"] / base_rate, 2)
            if base_rate and row["evals_per_hour"]
            else None
        )
    sections = {
        f"Search cost, {bench.size} zoo": summary,
        "Time per candidate (Ray trials)": [
            r for s in searches.values() for r in s["per_trial"]
        ],
        f"Time per candidate (direct, {direct} random candidates)": direct_rows,
        "Precision tolerance (the first search's candidates re-scored)": tolerance,
        "Generations": [g for s in searches.values() for g in s["gens"]],
    }
    notes = [
        f"search file {Path(first['path']).name} with overrides {first['overrides']} "
        "(evaluator.precision set per search)",
        "build = fuse (subspace thresholds, top-k, scatter) + add onto the base; "
        "evaluate = calibration score of every task; both as the trial measured them",
        "evals_per_hour = evaluations / search_s (the search loop, without Ray start, "
        "payload or report); speedup_vs_first divides by the first precision's",
        f"direct timings run in this process at {trial_threads} thread(s) (what a "
        f"trial gets: resources.cpus_per_trial) and at {all_threads} (every core); "
        "a trial's evaluate is to be compared with the first",
        "tolerance: every calibration score of the first search's candidates, "
        "re-scored "
        "directly at each precision; same_best: the same candidate is the best; "
        "rank_corr: Spearman correlation of the two score lists; regret: the "
        "reference's best score less the reference's score of this precision's pick",
        "evals_to_99pct: evaluations (in generation order) until the running best "
        "reaches 99 % of the final best calibration score",
        f"payload (ranking) built in {payload_s:.1f} s for the direct timings",
    ]
    if bench.size == "small" and not first["overrides"].get("search.generations"):
        total = summary[0]["total_wall_s"]
        verdict = "met" if total <= 300 else "NOT met"
        notes.append(
            f"target: the CI-sized search finishes in ≤ 5 min on 2 cores: "
            f"{total:.0f} s end to end at {precisions[0]} ({verdict})"
        )
    last = summary[-1]
    metrics = {
        "total_wall_s": float(summary[0]["total_wall_s"]),
        "evals_per_hour": float(summary[0]["evals_per_hour"] or 0.0),
        "evals_per_hour_last": float(last["evals_per_hour"] or 0.0),
        "eval_s_mean": first["per_trial"][1]["mean_s"] or 0.0,
    }
    return (
        sections,
        notes,
        metrics,
        {
            "search_file": str(first["path"]),
            "direct_candidates": direct,
            "precisions": list(precisions),
        },
    )


def _ranks(x: list[float]) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing their average rank."""
    _, inv, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    avg = np.cumsum(counts) - (counts - 1) / 2.0
    return avg[inv]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None under 2 values or
    when either list is constant."""
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.search_cost")
    ZooBench.add_arguments(ap)
    ap.add_argument(
        "--direct",
        type=int,
        default=None,
        help="random candidates timed in-process (default 2 quick, 10 full)",
    )
    ap.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="comma-separated evaluator precisions, one search each, side by side "
        "(the first is the reference of the tolerance table)",
    )
    args = ap.parse_args(argv)
    precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    started = time.perf_counter()
    bench = ZooBench.from_args(args)
    direct = args.direct if args.direct is not None else (2 if args.quick else 10)
    sections, notes, metrics, facts = run(
        bench, direct, args.generations, args.population, precisions
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
