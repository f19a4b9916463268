"""Compression table: storage (paper bits, real bytes) against normalized accuracy.

One row per method at k = 0.05: fine-tuned (T full models), Task Arithmetic and TIES
(one merged model, λ chosen on calibration data), TALL+TIES (base, TIES vector, T masks;
λ_t chosen per task), EMR (base, unified vector τ_uni, T masks and T rescalers; no
parameters, each task's own model θ_pre + λ_t·M_t ⊙ τ_uni on its own test split; its
bytes in the base dtypes are a note, as no EMR store is written), and the
sparse-per-task methods (each task keeps θ_pre + τ̂_t):
magnitude (= NPS with w = 1), DARE, and NPS with weights searched on calibration data.
Sparse rows also give the bytes ``npstune compress`` writes (lossless values). A second
table sweeps k for magnitude and DARE: accuracy against storage. Normalized accuracy is
each task's test accuracy over its own fine-tuned model's.

Run: ``python -m benchmarks.compression [--zoo small|full] [--quick] [--resume]``;
``--resume`` keeps the rows of an earlier results file of the same setup.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

from benchmarks.common import RESULTS, report
from benchmarks.zoo_setup import ZooBench

NAME = "compression"
K = 0.05
K_CURVE = (0.01, 0.03, 0.05, 0.1, 0.2, 0.3)


def per_task_sparse(
    bench: ZooBench, method: str, params: dict[str, Any]
) -> dict[str, float]:
    """Each task's own pruned model θ_pre + τ̂_t on its own test split."""
    from npstune.merge import merge
    from npstune.sparsify import task_weight_rows

    accs = {}
    for t, task in enumerate(bench.tasks):
        p = dict(params)
        if (
            p.get("weights") and "subspaces" in p
        ):  # T·M task-major rows: task t's own row
            p["weights"] = task_weight_rows(
                p["weights"], len(bench.tasks), p["subspaces"]
            )[t]
        st = merge(bench.plan.base, [bench.plan.models[t]], method, p).state
        accs[task] = bench.test_task(st, task)
    return accs


def disk_bytes(bench: ZooBench, method: str, params: dict[str, Any]) -> int:
    """Bytes of the task files + manifest ``npstune compress`` writes
    (lossless values)."""
    from npstune.compress import compress, inspect_store

    tmp = Path(tempfile.mkdtemp(prefix="npstune-bench-store-"))
    try:
        compress(
            bench.plan.base.path,
            [m.path for m in bench.plan.models],
            tmp / "store",
            method,
            params,
            names=bench.tasks,
        )
        info = inspect_store(tmp / "store")
        return int(info["sparse"]["disk_bytes"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(
    bench: ZooBench,
    search: bool = True,
    name: str = NAME,
    reuse: dict[str, list[dict[str, Any]]] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], list[str], list[Path]]:
    """Both tables. ``reuse`` holds an earlier run's sections (same zoo, splits and
    seed, :meth:`ZooBench.earlier_sections`): a row found there by method (by
    method and k in the curve) is kept, not recomputed."""
    from npstune.compress import storage_bits
    from npstune.merge.calibrate import choose_lambda, tall_models
    from npstune.merge.emr import emr_merge
    from npstune.merge.emr import storage as emr_storage

    T, n = len(bench.tasks), bench.plan.n
    frozen = sum(bench.plan.numel[k] for k in bench.plan.copy_keys)
    ft = bench.finetuned_test()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    main_title = f"Storage vs accuracy at k={K}, {bench.size} zoo"
    curve_title = "Accuracy-vs-storage curve"
    reuse = reuse or {}
    old_rows = {r["method"]: r for r in reuse.get(main_title, [])}
    old_curve = {(r["method"], r["k"]): r for r in reuse.get(curve_title, [])}

    def reused(method: str) -> bool:
        if method in old_rows:
            rows.append(old_rows[method])
            bench.kept.append(method)
            print(f"{method:16s} (earlier run)", flush=True)
        return method in old_rows

    def add(
        method: str,
        family: str,
        accs: dict[str, float],
        k: float | None = None,
        disk: int | None = None,
        choice: str = "",
    ) -> None:
        sb = storage_bits(family, T, n, k, frozen=frozen, disk_bytes=disk)
        rows.append(
            {
                "method": method,
                "choice": choice,
                "k": k,
                "paper_bits": sb.paper_bits,
                "paper_bits_vs_ft": sb.paper_bits / (32 * T * n),
                "disk_bytes": disk,
                "mean_acc": mean(accs.values()),
                "normalized": mean(accs[t] / ft[t] for t in accs),
            }
        )
        print(
            f"{method:16s} bits {sb.paper_bits:.3e} normalized "
            f"{rows[-1]['normalized']:.4f}",
            flush=True,
        )

    add(
        "fine-tuned",
        "finetuned",
        ft,
        disk=sum(bench.plan.models[t].weights.stat().st_size for t in range(T)),
    )
    for method, grid in (("task-arithmetic", "ta"), ("ties", "ties")):
        if reused(method):
            continue
        ch = choose_lambda(bench.plan, method, bench.cal_score, None, bench.grids[grid])
        add(method, "merged", bench.test(ch.state), choice=f"λ={ch.value}")
    if not reused("tall+ties"):
        tall = tall_models(
            bench.plan, bench.cal_task_score, mtl="ties", grid=bench.grids["tall"]
        )
        add(
            "tall+ties",
            "tall",
            {t: bench.test_task(tall[i].state, t) for i, t in enumerate(bench.tasks)},
            choice="λ_t=" + ",".join(str(c.value) for c in tall),
        )
        del tall
    if not reused("emr"):
        emr = emr_merge(bench.plan)  # in memory: T models, keyed by plan.task_names
        states, names = emr.meta["states"], bench.plan.task_names
        add(
            "emr",
            "emr",
            {t: bench.test_task(states[u], t) for t, u in zip(bench.tasks, names)},
            choice="no params; λ_t="
            + ",".join(f"{emr.meta['rescalers'][u]:.3g}" for u in names),
        )
        del emr, states
    notes.append(
        f"emr keeps τ_uni, {T} one-bit masks and {T} float32 rescalers beside θ_pre: "
        f"{emr_storage(bench.plan)['total_bytes']} bytes in the base dtypes "
        "(npstune.merge.emr.storage); no EMR store is written, so its disk_bytes "
        "is empty"
    )
    # each task's accuracy of the sparse rows at k = K, which the curve's k = K point
    # needs again (same method, k and seed: the same numbers)
    at_k: dict[tuple[str, float], dict[str, float]] = {}
    for method, params in (
        ("magnitude", {"k": K}),
        ("dare", {"k": K, "seed": bench.seed}),
    ):
        if reused(method):
            continue
        at_k[method, K] = per_task_sparse(bench, method, params)
        add(method, "sparse", at_k[method, K], K, disk_bytes(bench, method, params))
    if not reused("nps (searched)") and search:
        res = bench.nps_search("compression")
        if res is None:
            notes.append(f"NPS (searched) skipped: {bench.search_skipped}")
        else:
            _, desc, outcome = res
            cand = _candidate(outcome)
            params = {
                "k": cand["k"],
                "weights": [w for row in cand["weights"] for w in row],
                "subspaces": len(cand["weights"][0]),
            }
            add(
                "nps (searched)",
                "sparse",
                per_task_sparse(bench, "nps", params),
                cand["k"],
                disk_bytes(bench, "nps", params),
                choice=desc,
            )

    curve: list[dict[str, Any]] = []
    for k in K_CURVE[1:4] if bench.quick else K_CURVE:
        for method in ("magnitude", "dare"):
            if (method, k) in old_curve:
                curve.append(old_curve[method, k])
                bench.kept.append(f"{method} at k={k}")
                continue
            accs = at_k.get((method, k)) or per_task_sparse(
                bench,
                method,
                {"k": k, **({"seed": bench.seed} if method == "dare" else {})},
            )
            sb = storage_bits("sparse", T, n, k, frozen=frozen)
            curve.append(
                {
                    "method": method,
                    "k": k,
                    "paper_bits": sb.paper_bits,
                    "paper_bits_vs_ft": sb.paper_bits / (32 * T * n),
                    "normalized": mean(accs[t] / ft[t] for t in accs),
                }
            )
    plot = _plot(curve, rows, (bench.out_dir or RESULTS) / f"{name}_curve.png")
    return (
        {main_title: rows, curve_title: curve},
        notes,
        [plot] if plot else [],
    )


def _candidate(outcome: Any) -> dict[str, Any]:
    """The best candidate the search wrote: weights (one row per task), k, λ."""
    import json

    return json.loads(Path(outcome.report.files["best_candidate"]).read_text())[
        "candidate"
    ]


def _plot(
    curve: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path
) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({c["method"] for c in curve}):
        pts = [c for c in curve if c["method"] == method]
        ax.plot(
            [p["paper_bits_vs_ft"] for p in pts],
            [p["normalized"] for p in pts],
            "o-",
            label=method,
        )
    for r in rows:
        ax.scatter([r["paper_bits_vs_ft"]], [r["normalized"]], marker="x")
        ax.annotate(r["method"], (r["paper_bits_vs_ft"], r["normalized"]), fontsize=7)
    ax.set_xlabel("storage (paper bits / fine-tuned bits)")
    ax.set_ylabel("normalized accuracy")
    ax.set_title("Accuracy vs storage")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compression")
    ZooBench.add_arguments(ap)
    ap.add_argument("--no-search", action="store_true")
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
    reuse = bench.earlier_sections(name) if args.resume else {}
    sections, notes, files = run(
        bench, search=not args.no_search, name=name, reuse=reuse
    )
    report(
        name,
        sections,
        meta=bench.meta(),
        notes=notes + bench.notes(),
        started=started,
        artifacts=files,
        out_dir=bench.out_dir,
    )


if __name__ == "__main__":
    main()
