"""Fusion table: every merge method on the same zoo models, test accuracy per task.

Rows: pretrained + heads, individual fine-tuned, averaging, Task Arithmetic, TIES, DARE,
DAREx-q, Fisher, RegMean, Consensus TA, Consensus TIES, TALL masks (one model per task),
magnitude (= NPS with w = 1) and NPS (searched). Every choice (λ, q, λ_t, NPS weights)
is made on the calibration split; the numbers are on the test split, which no choice
sees.

Run: ``python -m benchmarks.fusion [--zoo small|full] [--quick]`` or ``npstune bench
fusion``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import report
from benchmarks.zoo_setup import ZooBench

NAME = "fusion"


def run(
    bench: ZooBench, search: bool = True, reuse: dict[str, dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """All rows of the fusion table, plus notes. Rows in ``reuse`` (method -> row, from
    an earlier run of the same setup) are taken as they are instead of recomputed."""
    from npstune.merge import merge
    from npstune.merge.calibrate import choose_darex_q, choose_lambda, tall_models

    plan, tasks = bench.plan, bench.tasks
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    grids = bench.grids

    reuse = reuse or {}

    def add(name: str, choice: str, per_task: dict[str, float], t0: float) -> None:
        rows.append(bench.row(name, choice, per_task, time.perf_counter() - t0))
        print(f"{name:18s} {choice:28s} mean {rows[-1]['mean']:.4f}", flush=True)

    def reused(name: str) -> bool:
        if name in reuse:
            rows.append(reuse[name])
            print(
                f"{name:18s} {reuse[name]['choice']:28s} mean "
                f"{reuse[name]['mean']:.4f} (earlier run)",
                flush=True,
            )
        return name in reuse

    if not reused("pretrained+heads"):
        t0 = time.perf_counter()
        add("pretrained+heads", "-", bench.test(bench.base_state()), t0)
    if not reused("fine-tuned"):
        t0 = time.perf_counter()
        add("fine-tuned", "individual", bench.finetuned_test(), t0)
    if not reused("averaging"):
        t0 = time.perf_counter()
        add(
            "averaging",
            "-",
            bench.test(merge(plan.base, plan.models, "average").state),
            t0,
        )

    lam_methods: list[tuple[str, str, dict[str, Any], str]] = [
        ("task-arithmetic", "task-arithmetic", {}, "ta"),
        ("ties", "ties", {"k": 0.2}, "ties"),
        ("dare", "dare", {"k": 0.1, "seed": 0}, "ta"),
        ("consensus-ta", "consensus-ta", {}, "ta"),
        ("consensus-ties", "consensus-ties", {}, "ties"),
        ("magnitude", "magnitude", {"k": 0.05}, "magnitude"),
    ]
    for label, method, params, grid in lam_methods:
        if reused(label):
            continue
        t0 = time.perf_counter()
        ch = choose_lambda(plan, method, bench.cal_score, params, grids[grid])
        add(
            label,
            f"λ={ch.value}"
            + "".join(f" {k}={v}" for k, v in params.items() if k != "seed"),
            bench.test(ch.state),
            t0,
        )
    lam_dare = next(
        float(r["choice"].split()[0][2:]) for r in rows if r["method"] == "dare"
    )
    if not reused("darex-q"):
        t0 = time.perf_counter()
        ch = choose_darex_q(
            plan,
            0.1,
            bench.cal_score,
            lam=lam_dare,
            coarse=grids["q_coarse"],
            fine=grids["q_fine"],
        )
        add("darex-q", f"q={ch.value:.3g} k=0.1 λ={lam_dare}", bench.test(ch.state), t0)

    for method in ("fisher", "regmean"):
        if reused(method):
            continue
        t0 = time.perf_counter()
        try:
            st = merge(plan.base, plan.models, method, data=bench.zoo_data()).state
            add(
                method, f"{bench.cal_n or 256} calibration ex./task", bench.test(st), t0
            )
        except Exception as exc:  # noqa: BLE001 - a table row must say why it is missing
            notes.append(f"{method} failed: {exc}")

    if not reused("tall-masks"):
        t0 = time.perf_counter()
        tall = tall_models(plan, bench.cal_task_score, grid=grids["tall"])
        per = {t: bench.test_task(tall[i].state, t) for i, t in enumerate(tasks)}
        add("tall-masks", "λ_t=" + ",".join(str(c.value) for c in tall), per, t0)

    # the NPS row is named after its search space when --search-config picks one, so a
    # resumed table keeps every NPS variant tried (each chosen on calibration data only)
    label = (
        f"nps ({Path(bench.search_config).stem})"
        if bench.search_config
        else "nps (searched)"
    )
    for (
        name
    ) in reuse:  # every earlier NPS row, this one too, in the order they were made
        if name.startswith("nps ("):
            reused(name)
    if search and label not in reuse:
        t0 = time.perf_counter()
        res = bench.nps_search()
        if res is None:
            notes.append(f"{label} skipped: {bench.search_skipped}")
        else:
            state, desc, _ = res
            add(label, desc, bench.test(state), t0)
    return rows, notes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fusion")
    ZooBench.add_arguments(ap)
    ap.add_argument("--no-search", action="store_true", help="skip the NPS search row")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of the results file NAME.json when it was made with "
        "the same zoo, splits and seed; compute only the missing rows",
    )
    args = ap.parse_args(argv)
    started = time.perf_counter()
    bench = ZooBench.from_args(args)
    name = args.name or NAME
    reuse = bench.earlier_rows(name) if args.resume else {}
    rows, notes = run(bench, search=not args.no_search, reuse=reuse)
    best = {r["method"]: r["mean"] for r in rows}
    metrics = {
        "mean_" + "".join(c if c.isalnum() else "_" for c in k): v
        for k, v in best.items()
    }
    report(
        name,
        {f"Fusion, {bench.size} zoo (test accuracy)": rows},
        meta=bench.meta(),
        notes=notes + bench.notes(),
        started=started,
        metrics=metrics,
        out_dir=bench.out_dir,
    )


if __name__ == "__main__":
    main()


__all__: list[Callable[..., Any] | str] = ["run", "main"]
