"""Transfer table (the NPS paper's LLaVA table, in small): prune a new task's vector on
top of a model that already knows other tasks, and keep both.

"Pretrained" θ_pre' = TIES (k 0.2, λ 1) of every zoo task but the last, scored with
those tasks' zoo heads. θ_pre' is fine-tuned on the last task's train split (the zoo
recipe's hyperparameters, a fresh head) -> θ_new; τ = θ_new − θ_pre'. Each method
applies θ_pre' + λ·prune(τ) at k = 0.05, λ (and DAREx's q, NPS's w) chosen on the
calibration split's H-score = 2·A_old·A_new / (A_old + A_new); numbers are on the test
split.

Rows: θ_pre', full fine-tuning (θ_new), magnitude, DARE, DAREx-q and NPS searched (w and
λ by CMA-ES on the calibration H-score). The NPS search runs in this process (the
``nps-transfer.yaml`` space, :class:`npstune.search.Objective` and the cma backend
driven directly), not through Ray Tune: the search's zoo evaluator would score the new
task with the zoo's head, while here it must use the head trained with θ_new.

Run: ``python -m benchmarks.transfer [--zoo small|full] [--quick]`` or ``npstune bench
transfer``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from benchmarks.common import report
from benchmarks.zoo_setup import ZooBench

NAME = "transfer"
K = 0.05
LAM_GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
LAM_GRID_QUICK = (1.0, 2.0)
SEARCH_SPACE = (
    Path(__file__).resolve().parent.parent / "searchspaces" / "nps-transfer.yaml"
)
QUICK_TRAIN = 128


def h_score(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def finetune_target(
    bench: ZooBench, pre: dict[str, torch.Tensor], target: str, quick: bool, seed: int
) -> tuple[dict[str, torch.Tensor], Any, dict[str, Any]]:
    """θ_pre' fine-tuned on ``target``'s train split with the zoo recipe and a new
    head."""
    from transformers import AutoTokenizer

    from npstune.zoo import model as zm

    recipe = bench.zoo.manifest["recipe"]
    zoo = bench.zoo
    body = zm.new_body(zoo.base_path)
    zm.load_into(body, pre, "θ_pre'")
    tok = AutoTokenizer.from_pretrained(str(zoo.base_path))
    texts, labels = zoo.split(target, "train")
    if quick:
        texts, labels = texts[:QUICK_TRAIN], labels[:QUICK_TRAIN]
    ids = zm.tokenize(tok, texts, int(recipe["max_len"]))
    epochs = 1 if quick else int(recipe["epochs"])
    res = zm.finetune(
        body,
        ids,
        labels,
        zoo.task(target).num_classes,
        epochs=epochs,
        batch_size=int(recipe["batch_size"]),
        lr_body=float(recipe["lr_body"]),
        lr_head=float(recipe["lr_head"]),
        weight_decay=float(recipe["weight_decay"]),
        warmup=float(recipe["warmup"]),
        seed=seed,
        pad_id=tok.pad_token_id or 0,
    )
    sd = body.state_dict()
    new = {
        k: (sd[k].detach().clone().to(v.dtype) if k in sd else v)
        for k, v in pre.items()
    }
    info = {
        "train_examples": len(ids),
        "epochs": epochs,
        "steps": res.steps,
        "finetune_s": round(res.seconds, 1),
    }
    return new, res, info


def nps_search(
    bench: ZooBench,
    pre_path: Path,
    new_path: Path,
    old: list[str],
    target: str,
    k: float,
    generations: int | None,
    population: int | None,
    out: Path,
) -> tuple[dict[str, torch.Tensor], float, str, int]:
    """CMA-ES over (w, λ) of NPS on τ = θ_new − θ_pre', scored in this process by the
    calibration H-score with ``bench.cal`` (which holds the new head).

    Returns (best state, its calibration H-score, a description, evaluations)."""
    from npstune.search import Objective, build_payload, load_config
    from npstune.search.backends import make_searcher
    from npstune.search.objective import CALIBRATION
    from npstune.search.space import METRIC

    o: dict[str, Any] = {
        "zoo": bench.size,
        "base": str(pre_path),
        "models": [str(new_path)],
        "tasks": [target],
        "transfer.target": target,
        "transfer.pre_tasks": list(old),
        "nps.k": k,
        "tracking.enabled": False,
        "output_dir": str(out),
        "evaluator.calibration_examples": bench.cal_n or 1,  # unused: bench.cal scores
    }
    budget = bench.search_budget(generations, population, quick_generations=1)
    budget.pop("tracking.enabled", None)  # tracking is off here anyway
    o.update(budget)
    cfg = load_config(SEARCH_SPACE, **o)
    obj = Objective(build_payload(cfg, bench.zoo))
    pop = cfg.search.population or obj.space.default_population()
    searcher = make_searcher(cfg.search.backend, obj.space, cfg.search, pop, pop)
    evals = 0
    best: tuple[float, dict[str, Any]] | None = (
        None  # the backend's own best is not public
    )
    while True:
        trial = f"t{evals}"
        config = searcher.suggest(trial)
        if not isinstance(config, dict):  # FINISHED (or None: cannot happen serially)
            break
        metrics = obj.score(obj.space.candidate(config), CALIBRATION, bench.cal)
        bench.evals += 1
        evals += 1
        value = float(metrics["objective"])
        if best is None or value > best[0]:  # METRIC is maximised (space.MODE)
            best = (value, dict(config))
        searcher.on_trial_complete(trial, {METRIC: value})
    if best is None:
        raise RuntimeError("the search finished without evaluating a candidate")
    value, params = best
    cand = obj.space.candidate(params)
    state: dict[str, torch.Tensor] = {}
    for _, st in obj.states(cand):  # views of reused buffers: copy
        state = {key: v.clone() for key, v in st.items()}
    w = ",".join(f"{x:.2f}" for x in cand.weights[0])
    desc = (
        f"{evals} evals ({cfg.search.generations} gen × {pop}); w=[{w}] "
        f"λ={cand.lam[0]:.3g} k={cand.k:g} M={cfg.nps.subspaces}"
    )
    return state, value, desc, evals


def run(
    bench: ZooBench,
    k: float = K,
    generations: int | None = None,
    population: int | None = None,
) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """All rows of the transfer table, plus notes and facts for the run record."""
    from npstune.checkpoints import write_state_dict
    from npstune.merge import merge
    from npstune.merge.calibrate import choose_darex_q, choose_lambda
    from npstune.taskvector import plan_merge

    tasks = bench.tasks
    old, target = tasks[:-1], tasks[-1]
    lam_grid = LAM_GRID_QUICK if bench.quick else LAM_GRID
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="npstune-bench-transfer-"))
    try:
        t0 = time.perf_counter()
        pre = merge(
            bench.plan.base, bench.plan.models[:-1], "ties", {"k": 0.2, "lam": 1.0}
        ).state
        assert pre is not None
        pre_path = write_state_dict(tmp / "pre.safetensors", pre)
        new, res, info = finetune_target(bench, pre, target, bench.quick, bench.seed)
        new_path = write_state_dict(tmp / "new.safetensors", new)
        # The target's head is the one trained with θ_new, not the zoo's: put it in both
        # evaluators' head caches (the evaluator loads a task's head once into _heads).
        head = (res.head_weight, res.head_bias)
        for ev in (bench.cal, bench.tst):
            ev._heads[target] = (head[0].to(ev.device), head[1].to(ev.device))
        plan = plan_merge(str(pre_path), [str(new_path)])
        setup_s = time.perf_counter() - t0

        def scores(state: dict[str, torch.Tensor], split: str) -> dict[str, float]:
            ev = bench.cal if split == "calibration" else bench.tst
            accs = ev.evaluate_many(state, tasks, split)
            a_old, a_new = mean(accs[t] for t in old), accs[target]
            return {
                "old": a_old,
                "new": a_new,
                "h": h_score(a_old, a_new),
                "accs": accs,
            }

        def cal_h(state: dict[str, torch.Tensor]) -> float:
            bench.evals += 1
            return scores(state, "calibration")["h"]

        def add(
            method: str,
            choice: str,
            state: dict[str, torch.Tensor],
            t_start: float,
            cal: float | None = None,
        ) -> None:
            s = scores(state, "test")
            r: dict[str, Any] = {"method": method, "choice": choice}
            r.update({t: s["accs"][t] for t in tasks})
            r.update(
                old_acc=s["old"],
                new_acc=s["new"],
                average=(s["old"] + s["new"]) / 2,
                h_score=s["h"],
                calibration_h=cal,
                seconds=round(time.perf_counter() - t_start, 1),
            )
            rows.append(r)
            print(
                f"{method:24s} {choice:28s} old {s['old']:.4f} new {s['new']:.4f} "
                f"H {s['h']:.4f}",
                flush=True,
            )

        t0 = time.perf_counter()
        add(
            "pretrained' (TIES of old)",
            f"k=0.2 λ=1, {len(old)} tasks",
            pre,
            t0,
            cal_h(pre),
        )
        t0 = time.perf_counter()
        add(
            "full fine-tuning",
            f"{info['epochs']} ep, {info['train_examples']} ex",
            new,
            t0,
            cal_h(new),
        )

        t0 = time.perf_counter()
        ch = choose_lambda(plan, "magnitude", cal_h, {"k": k}, lam_grid)
        add("magnitude", f"λ={ch.value} k={k}", ch.state, t0, ch.score)
        t0 = time.perf_counter()
        ch = choose_lambda(plan, "dare", cal_h, {"k": k, "seed": bench.seed}, lam_grid)
        lam_dare = ch.value
        add("dare", f"λ={ch.value} k={k}", ch.state, t0, ch.score)
        t0 = time.perf_counter()
        ch = choose_darex_q(
            plan,
            k,
            cal_h,
            lam=lam_dare,
            seed=bench.seed,
            coarse=bench.grids["q_coarse"],
            fine=bench.grids["q_fine"],
        )
        add("darex-q", f"q={ch.value:.3g} λ={lam_dare} k={k}", ch.state, t0, ch.score)

        t0 = time.perf_counter()
        try:
            st, val, desc, n_evals = nps_search(
                bench,
                pre_path,
                new_path,
                old,
                target,
                k,
                generations,
                population,
                tmp / "search",
            )
            add("nps (searched)", desc, st, t0, val)
        except ImportError as exc:  # the search extra (cma) is not installed
            notes.append(f"NPS (searched) skipped: {exc}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    notes += [
        f"θ_pre' = TIES (k 0.2, λ 1) of {', '.join(old)} with their zoo heads; new "
        f"task {target} fine-tuned from θ_pre' ({info['epochs']} epoch(s), "
        f"{info['train_examples']} train examples, zoo recipe, fresh head); τ = θ_new "
        "− θ_pre'",
        f"every pruned row is θ_pre' + λ·prune(τ) at k = {k}; λ, q and NPS's w chosen "
        "by the calibration H-score; the numbers are test accuracy",
        "old_acc = mean over the old tasks (zoo heads); new_acc = the new task with "
        "its new head; average = (old_acc + new_acc)/2; h_score = "
        "2·old·new/(old + new)",
        "NPS (searched): CMA-ES over the 8 subspace weights and λ (nps-transfer.yaml "
        "bounds) on the calibration H-score, run in-process with the new head (the Ray "
        "search's zoo evaluator would use the zoo's head for the new task); magnitude "
        "= NPS with w = 1",
    ]
    facts = {
        "target": target,
        "old_tasks": old,
        "k": k,
        "lam_grid": list(lam_grid),
        "search_space": SEARCH_SPACE.name,
        "setup_s": round(setup_s, 1),
        **info,
    }
    return rows, notes, facts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.transfer")
    ZooBench.add_arguments(ap)
    ap.add_argument("--k", type=float, default=K, help="keep ratio of the pruned rows")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    bench = ZooBench.from_args(args)
    rows, notes, facts = run(bench, args.k, args.generations, args.population)
    metrics = {
        f"h_{r['method'].split()[0].replace(chr(39), '')}": r["h_score"] for r in rows
    }
    report(
        args.name or NAME,
        {f"Transfer, {bench.size} zoo (test accuracy)": rows},
        meta={**bench.meta(), **facts},
        notes=notes + bench.notes()[:1],
        started=started,
        metrics=metrics,
        out_dir=bench.out_dir,
    )


if __name__ == "__main__":
    main()
