"""Fusion table: every merge method on the same zoo models, test accuracy per task.

Rows: pretrained + heads, individual fine-tuned, averaging, Task Arithmetic, TIES, DARE,
DAREx-q, Fisher, RegMean, Consensus TA, Consensus TIES, TALL masks (one model per task),
magnitude (= NPS with w = 1) and NPS (searched). Every choice (λ, q, λ_t, NPS weights) is
made on the calibration split; the numbers are on the test split, which no choice sees.

Run: ``python -m benchmarks.fusion [--zoo small|full] [--quick]`` or ``npstune bench fusion``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import report
from benchmarks.zoo_setup import ZooBench

NAME = "fusion"


def run(bench: ZooBench, search: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """All rows of the fusion table, plus notes."""
    from npstune.merge import merge
    from npstune.merge.calibrate import choose_darex_q, choose_lambda, tall_models

    plan, tasks = bench.plan, bench.tasks
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    grids = bench.grids

    def add(name: str, choice: str, per_task: dict[str, float], t0: float) -> None:
        rows.append(bench.row(name, choice, per_task, time.perf_counter() - t0))
        print(f"{name:18s} {choice:28s} mean {rows[-1]['mean']:.4f}", flush=True)

    t0 = time.perf_counter()
    add("pretrained+heads", "-", bench.test(bench.base_state()), t0)
    t0 = time.perf_counter()
    add("fine-tuned", "individual", bench.finetuned_test(), t0)
    t0 = time.perf_counter()
    add("averaging", "-", bench.test(merge(plan.base, plan.models, "average").state), t0)

    lam_methods: list[tuple[str, str, dict[str, Any], str]] = [
        ("task-arithmetic", "task-arithmetic", {}, "ta"),
        ("ties", "ties", {"k": 0.2}, "ties"),
        ("dare", "dare", {"k": 0.1, "seed": 0}, "ta"),
        ("consensus-ta", "consensus-ta", {}, "ta"),
        ("consensus-ties", "consensus-ties", {}, "ties"),
        ("magnitude", "magnitude", {"k": 0.05}, "ta"),
    ]
    for label, method, params, grid in lam_methods:
        t0 = time.perf_counter()
        ch = choose_lambda(plan, method, bench.cal_score, params, grids[grid])
        add(label, f"λ={ch.value}" + "".join(f" {k}={v}" for k, v in params.items() if k != "seed"),
            bench.test(ch.state), t0)
    t0 = time.perf_counter()
    lam_dare = next(float(r["choice"].split()[0][2:]) for r in rows if r["method"] == "dare")
    ch = choose_darex_q(plan, 0.1, bench.cal_score, lam=lam_dare, coarse=grids["q_coarse"],
                        fine=grids["q_fine"])
    add("darex-q", f"q={ch.value:.3g} k=0.1 λ={lam_dare}", bench.test(ch.state), t0)

    for method in ("fisher", "regmean"):
        t0 = time.perf_counter()
        try:
            st = merge(plan.base, plan.models, method, data=bench.zoo_data()).state
            add(method, f"{bench.cal_n or 256} calibration ex./task", bench.test(st), t0)
        except Exception as exc:  # noqa: BLE001 - a table row must say why it is missing
            notes.append(f"{method} failed: {exc}")

    t0 = time.perf_counter()
    tall = tall_models(plan, bench.cal_task_score, grid=grids["tall"])
    per = {t: bench.test_task(tall[i].state, t) for i, t in enumerate(tasks)}
    add("tall-masks", "λ_t=" + ",".join(str(c.value) for c in tall), per, t0)

    if search:
        t0 = time.perf_counter()
        res = bench.nps_search()
        if res is None:
            notes.append("NPS (searched) skipped: npstune.search is not available")
        else:
            state, desc, _ = res
            add("nps (searched)", desc, bench.test(state), t0)
    return rows, notes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fusion")
    ZooBench.add_arguments(ap)
    ap.add_argument("--no-search", action="store_true", help="skip the NPS search row")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    bench = ZooBench.from_args(args)
    rows, notes = run(bench, search=not args.no_search)
    best = {r["method"]: r["mean"] for r in rows}
    metrics = {f"mean_{k.replace(' ', '_').replace('(', '').replace(')', '')}": v for k, v in best.items()}
    report(args.name or NAME, {f"Fusion, {bench.size} zoo (test accuracy)": rows},
           meta=bench.meta(), notes=notes + bench.notes(), started=started, metrics=metrics,
           out_dir=bench.out_dir)


if __name__ == "__main__":
    main()


__all__: list[Callable[..., Any] | str] = ["run", "main"]
