"""LLM transfer table (the paper's LLaVA table, in small): learn a new skill, keep the
instruct base's own abilities.

θ_pre is the LLM zoo's SmolLM2-135M-Instruct; its "pre-trained tasks" are what it does
zero-shot (``--old``, default sentiment, which no expert is trained on, and python-code
next-line choice, 0.58 against 0.25 by chance); the new skill is one expert's task
(``--new``, default arithmetic: the base scores 0). τ = θ_new − θ_pre of that expert.
Rows: the base, full fine-tuning (θ_new), and at k = 0.1 of τ's entries: DARE,
magnitude, NPS (searched through Ray Tune, ``use: transfer``: w and λ by CMA-ES on the
calibration H-score), Model Grafting (a mask learnt on the new task's loss) and Model
Tailor (salience × sensitivity, compensated). Every method's λ is chosen on the
calibration split's H-score = 2·A_old·A_new / (A_old + A_new) (grafting and tailor:
their Δ at λ = 1, rescaled); the numbers are on the test split.

Run: ``npstune bench llm-transfer --zoo small|full``.
"""

from __future__ import annotations

import argparse
import time
from statistics import mean
from typing import Any

from benchmarks.common import report
from benchmarks.transfer import h_score
from benchmarks.zoo_setup import ZooBench

NAME = "llm_transfer"
K = 0.1
GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
GRID_QUICK = (1.0, 1.5)


def run(
    bench: ZooBench,
    new: str,
    old: list[str],
    search: bool = True,
    graft_steps: int = 5,
    examples: int = 32,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the table (every choice on the calibration H-score), and notes."""
    from npstune.merge.data import EvaluatorData
    from npstune.taskvector import plan_merge

    zoo = bench.zoo
    plan = plan_merge(zoo.base_path, [zoo.task(new).model_path])
    tasks = [*old, new]
    grid = GRID_QUICK if bench.quick else GRID
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def scores(state: Any, split: str) -> dict[str, float]:
        ev = bench.cal if split == "calibration" else bench.tst
        return ev.evaluate_many(state, tasks, split)

    def cal_h(state: Any) -> float:
        bench.evals += 1
        s = scores(state, "calibration")
        return h_score(mean(s[t] for t in old), s[new])

    def add(method: str, choice: str, state: Any, t0: float) -> None:
        s = scores(state, "test")
        a_old = mean(s[t] for t in old)
        rows.append(
            {
                "method": method,
                "choice": choice,
                **{t: s[t] for t in tasks},
                "old_avg": a_old,
                "new": s[new],
                "avg": (a_old + s[new]) / 2,
                "h_score": h_score(a_old, s[new]),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        r = rows[-1]
        print(f"{method:14s} {choice:28s} H {r['h_score']:.4f}", flush=True)

    t0 = time.perf_counter()
    add("base", "-", {k: plan.base[k] for k in plan.base.keys()}, t0)
    t0 = time.perf_counter()
    m = plan.models[0]
    add("fine-tuned", "full fine-tuning", {k: m[k] for k in m.keys()}, t0)
    data = EvaluatorData(bench.cal, examples)
    methods: list[tuple[str, str, dict[str, Any]]] = [
        ("dare", "dare", {"k": K, "seed": 0}),
        ("magnitude", "magnitude", {"k": K}),
        ("grafting", "grafting", {"k": K, "steps": graft_steps, "examples": examples}),
        ("tailor", "tailor", {"k": K}),
    ]
    for label, method, params in methods:
        t0 = time.perf_counter()
        try:
            ch = choose_lambda_data(plan, method, cal_h, params, grid, data)
        except Exception as exc:  # noqa: BLE001 - a table row must say why it is missing
            notes.append(f"{label} failed: {exc}")
            continue
        desc = f"λ={ch.value} " + " ".join(
            f"{k}={v}" for k, v in params.items() if k != "seed"
        )
        add(label, desc, ch.state, t0)
    if search:
        t0 = time.perf_counter()
        res = nps_search(bench, new, old)
        if res is None:
            notes.append(f"nps skipped: {bench.search_skipped}")
        else:
            state, desc = res
            add("nps (searched)", desc, state, t0)
    return rows, notes


def choose_lambda_data(
    plan: Any,
    method: str,
    score: Any,
    params: dict[str, Any],
    grid: tuple[float, ...],
    data: Any,
) -> Any:
    """:func:`~npstune.merge.calibrate.choose_lambda` that also gives the methods
    that learn from data their calibration data (one merge at λ = 1, rescaled per
    grid point)."""
    from npstune.merge.base import run_merge
    from npstune.merge.calibrate import choose_scale, delta_of
    from npstune.merge.registry import get_method

    spec = get_method(method)
    merged = run_merge(
        plan, spec, {**params, "lam": 1.0}, data=data if spec.needs_data else None
    ).state
    assert merged is not None
    return choose_scale(plan, delta_of(plan, merged), score, grid)


def nps_search(bench: ZooBench, new: str, old: list[str]) -> tuple[Any, str] | None:
    """NPS on the new task's vector through Ray Tune (``use: transfer``)."""
    out = bench.nps_search(
        "transfer",
        models=[str(bench.zoo.task(new).model_path)],
        **{"transfer.target": new, "transfer.pre_tasks": old},
        **{"evaluator.tasks": bench.search_evaluator(tasks=[*old, new])["tasks"]},
    )
    if out is None:
        return None
    state, desc, _ = out
    return state, desc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llm_transfer")
    ZooBench.add_arguments(ap, families=("llm",))
    ap.add_argument("--new", default="arithmetic", help="the new skill (an expert)")
    ap.add_argument(
        "--old",
        default="sentiment,python-code",
        help="the base's own abilities kept (comma-separated tasks)",
    )
    ap.add_argument("--no-search", action="store_true", help="skip the NPS search row")
    ap.add_argument(
        "--graft-steps", type=int, default=5, help="Model Grafting's gradient steps"
    )
    ap.add_argument(
        "--examples",
        type=int,
        default=32,
        help="calibration examples per gradient/Fisher/Gram (grafting, tailor)",
    )
    args = ap.parse_args(argv)
    started = time.perf_counter()
    bench = ZooBench.from_args(args)
    old = [t for t in args.old.split(",") if t]
    name = args.name or (NAME if bench.size == "small" else f"{NAME}-{bench.size}")
    rows, notes = run(
        bench, args.new, old, not args.no_search, args.graft_steps, args.examples
    )
    report(
        name,
        {f"LLM transfer, {bench.size} LLM zoo, new task {args.new}": rows},
        meta={**bench.meta(), "new": args.new, "old": old, "k": K},
        notes=notes
        + [
            "test split only for the reported numbers; λ (and NPS's w) chosen on the "
            "calibration split's H-score",
            f"grafting: {args.graft_steps} gradient steps of {args.examples} "
            f"calibration examples; tailor: Fisher and Gram on {args.examples}",
        ],
        started=started,
        metrics={
            "h_" + "".join(c if c.isalnum() else "_" for c in r["method"]): r["h_score"]
            for r in rows
        },
        out_dir=bench.out_dir,
    )


if __name__ == "__main__":
    main()
