"""Fusion table: every merge method on the same zoo models, test accuracy per task.

Rows: pretrained + heads, individual fine-tuned, averaging, Task Arithmetic, TIES, DARE,
DAREx-q, Fisher, RegMean, Consensus TA, Consensus TIES, TALL masks (one model per task),
magnitude (= NPS with w = 1), TSV-M, Iso-C, Iso-CTS (α on the ``alpha`` grid; Iso-CTS
with common_fraction 0.8), PCB (ratio ρ and λ on the ``pcb_ratio`` × ``pcb_lam`` grid;
clip 1e-4, global scope), WUDI at its defaults (400 Adam steps, lr 1e-5; WUDI has no
scale; ``--wudi-steps`` changes the count, which the row's choice names, for short smoke
runs), ``wudi (λ on cal)`` (a λ on the ``ta`` grid on top of that same Δ: not WUDI's
own definition, labelled apart; its seconds include the shared merge), EMR (no
parameters, one model per task: each task scored with its own model, as TALL masks) and
NPS (searched). Every choice (λ, α, ρ, q, λ_t, NPS weights) is made on the calibration
split; the numbers are on the test split, which no choice sees. λ and α scale the
method's whole Δ linearly, so each grid merges once and rescales (calibrate.py).

Run: ``python -m benchmarks.fusion [--zoo small|full] [--quick]`` or ``npstune bench
fusion``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from benchmarks.common import report
from benchmarks.zoo_setup import ZooBench

NAME = "fusion"


def run(
    bench: ZooBench,
    search: bool = True,
    reuse: dict[str, dict[str, Any]] | None = None,
    wudi_steps: int | None = None,
    only: Collection[str] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """All rows of the fusion table, plus notes. Rows in ``reuse`` (method -> row, from
    an earlier run of the same setup) are taken as they are instead of recomputed.
    ``wudi_steps``: WUDI's Adam steps (None: its default, 400). ``only``: the rows to
    make (method labels; ``"nps"`` for the searched row), None for all."""
    from npstune.merge import merge
    from npstune.merge.calibrate import (
        choose_darex_q,
        choose_lambda,
        choose_scale,
        delta_of,
        tall_models,
    )
    from npstune.merge.emr import emr_merge
    from npstune.merge.wudi import WudiParams

    plan, tasks = bench.plan, bench.tasks
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    grids = bench.grids

    reuse = dict(reuse or {})

    def add(
        name: str,
        choice: str,
        per_task: dict[str, float],
        t0: float,
        extra_s: float = 0.0,
    ) -> None:
        rows.append(
            bench.row(name, choice, per_task, time.perf_counter() - t0 + extra_s)
        )
        print(f"{name:18s} {choice:28s} mean {rows[-1]['mean']:.4f}", flush=True)

    def skip(name: str) -> bool:  # not asked for, or taken from the earlier run
        if only is not None and name.split(" (")[0] not in only:
            return True
        return reused(name)

    def reused(name: str) -> bool:
        if name in reuse:
            rows.append(reuse[name])
            bench.kept.append(name)
            print(
                f"{name:18s} {reuse[name]['choice']:28s} mean "
                f"{reuse[name]['mean']:.4f} (earlier run)",
                flush=True,
            )
        return name in reuse

    if not skip("pretrained+heads"):
        t0 = time.perf_counter()
        add("pretrained+heads", "-", bench.test(bench.base_state()), t0)
    if not skip("fine-tuned"):
        t0 = time.perf_counter()
        add("fine-tuned", "individual", bench.finetuned_test(), t0)
    if not skip("averaging"):
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
        if skip(label):
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
    if not skip("darex-q"):
        lam_dare = next(
            float(r["choice"].split()[0][2:]) for r in rows if r["method"] == "dare"
        )
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
        if skip(method):
            continue
        t0 = time.perf_counter()
        try:
            st = merge(plan.base, plan.models, method, data=bench.zoo_data()).state
            add(
                method, f"{bench.cal_n or 256} calibration ex./task", bench.test(st), t0
            )
        except Exception as exc:  # noqa: BLE001 - a table row must say why it is missing
            notes.append(f"{method} failed: {exc}")

    if not skip("tall-masks"):
        t0 = time.perf_counter()
        tall = tall_models(plan, bench.cal_task_score, grid=grids["tall"])
        per = {t: bench.test_task(tall[i].state, t) for i, t in enumerate(tasks)}
        add("tall-masks", "λ_t=" + ",".join(str(c.value) for c in tall), per, t0)

    # α scales the whole Δ (matrix and averaged keys alike, MERGES.md §1-2): one merge
    # at α = 1, rescaled per grid point
    for method, params in (
        ("tsv-m", {}),
        ("iso-c", {}),
        ("iso-cts", {"common_fraction": 0.8}),
    ):
        if skip(method):
            continue
        t0 = time.perf_counter()
        ch = choose_lambda(
            plan, method, bench.cal_score, params, grids["alpha"], scale="alpha"
        )
        add(
            method,
            f"α={ch.value}" + "".join(f" {k}={v}" for k, v in params.items()),
            bench.test(ch.state),
            t0,
        )

    if not skip("pcb"):  # λ is linear in τ_m: one merge per ratio ρ
        t0 = time.perf_counter()
        pcb = max(
            (
                (
                    choose_lambda(
                        plan, "pcb", bench.cal_score, {"ratio": r}, grids["pcb_lam"]
                    ),
                    r,
                )
                for r in grids["pcb_ratio"]
            ),
            key=lambda cr: cr[0].score,  # the first ratio on a tie
        )
        add("pcb", f"λ={pcb[0].value} ratio={pcb[1]}", bench.test(pcb[0].state), t0)
        del pcb

    # WUDI's Δ has no scale: the defaults row is WUDI itself; the λ row rescales the
    # same merge (made once for both rows)
    wudi_p = WudiParams(**({} if wudi_steps is None else {"steps": wudi_steps}))
    wudi_lam, wudi_desc = "wudi (λ on cal)", f"steps={wudi_p.steps} lr={wudi_p.lr:g}"
    for name, desc in (("wudi", wudi_desc), (wudi_lam, f" on Δ({wudi_desc})")):
        if name in reuse and not reuse[name]["choice"].endswith(desc):
            del reuse[name]  # an earlier run with other WUDI steps: recompute
    wudi: dict[str, Any] = {}

    def wudi_state() -> Any:
        if not wudi:
            t = time.perf_counter()
            wudi["state"] = merge(
                plan.base, plan.models, "wudi", wudi_p.model_dump()
            ).state
            wudi["s"] = time.perf_counter() - t
        return wudi["state"]

    if not skip("wudi"):
        t0 = time.perf_counter()
        add("wudi", wudi_desc, bench.test(wudi_state()), t0)
    if not skip(wudi_lam):
        merged_before = bool(wudi)
        t0 = time.perf_counter()
        d = delta_of(plan, wudi_state())
        ch = choose_scale(plan, d, bench.cal_score, grids["ta"])
        del d
        add(
            wudi_lam,
            f"λ={ch.value} on Δ({wudi_desc})",
            bench.test(ch.state),
            t0,
            wudi["s"] if merged_before else 0.0,
        )
    wudi.clear()

    if not skip("emr"):  # one model per task, each on its own task
        t0 = time.perf_counter()
        res = emr_merge(plan)
        states = res.meta["states"]  # keyed by plan.task_names (unique)
        per = {t: bench.test_task(states[u], t) for t, u in zip(tasks, plan.task_names)}
        lams = ",".join(f"{res.meta['rescalers'][u]:.3g}" for u in plan.task_names)
        del res, states
        add("emr", f"no params; λ_t={lams}", per, t0)

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
        if name.startswith("nps (") and (only is None or "nps" in only):
            reused(name)
    if search and label not in reuse and (only is None or "nps" in only):
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
        "--wudi-steps",
        type=int,
        default=None,
        help="WUDI's Adam steps (default: WUDI's own, 400; minutes on 2 cores); the "
        "row's choice names the count",
    )
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
    rows, notes = run(
        bench, search=not args.no_search, reuse=reuse, wudi_steps=args.wudi_steps
    )
    best = {r["method"]: r["mean"] for r in rows}
    metrics = {
        "mean_" + "".join(c if c.isascii() and c.isalnum() else "_" for c in k): v
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
