"""LLM fusion table (the paper's "3 LLM tasks"): merging the LLM zoo's three experts.

The paper merges three Llama-2-7B experts (Chinese, math, code); here the experts are
SmolLM2-135M-Instruct fine-tuned on election tweets, arithmetic word problems and Python
code (:mod:`npstune.zoo.llm`), scored by the zoo's ``causal-lm`` evaluator file. Rows:
the base; each expert on every task (what it gains on its own task and what it costs on
the others); averaging; Task Arithmetic, TIES (k 0.2), DARE (k 0.1) and magnitude
(k 0.05), each with λ on the LLM grid (``benchmarks.zoo_setup.LLM_GRIDS``); NPS searched
through Ray Tune (``searchspaces/nps-llm-fusion[-small].yaml``). Every choice is made on
the calibration split; the numbers are on the test split. The method rows are
``benchmarks.fusion``'s own code, limited to these methods.

Run: ``npstune bench llm-fusion --zoo small|full`` (``--family llm`` is the default and
only choice).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks import fusion
from benchmarks.common import report
from benchmarks.zoo_setup import ZooBench

NAME = "llm_fusion"
METHODS = ("averaging", "task-arithmetic", "ties", "dare", "magnitude", "nps")


def expert_rows(bench: ZooBench, reuse: dict[str, dict[str, Any]]) -> list[dict]:
    """The base and each expert, scored on every task of the table."""
    rows = []
    states = [("base", "-", bench.base_state)]
    states += [
        (f"expert: {t}", "fine-tuned", lambda i=i: bench.model_state(i))
        for i, t in enumerate(bench.tasks)
    ]
    for name, choice, state in states:
        if name in reuse:
            rows.append(reuse[name])
            bench.kept.append(name)
            continue
        t0 = time.perf_counter()
        rows.append(
            bench.row(name, choice, bench.test(state()), time.perf_counter() - t0)
        )
        print(f"{name:18s} mean {rows[-1]['mean']:.4f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.llm_fusion")
    ZooBench.add_arguments(ap, families=("llm",))
    ap.add_argument("--no-search", action="store_true", help="skip the NPS search row")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of the results file when it was made with the same zoo, "
        "splits and seed; compute only the missing rows",
    )
    args = ap.parse_args(argv)
    started = time.perf_counter()
    bench = ZooBench.from_args(args)
    name = args.name or (NAME if bench.size == "small" else f"{NAME}-{bench.size}")
    reuse = bench.earlier_rows(name) if args.resume else {}
    rows = expert_rows(bench, reuse)
    more, notes = fusion.run(
        bench, search=not args.no_search, reuse=reuse, only=METHODS
    )
    rows += more
    report(
        name,
        {f"LLM fusion, {bench.size} LLM zoo (test scores)": rows},
        meta=bench.meta(),
        notes=notes
        + bench.notes()
        + [
            "scores: accuracy (election, python-code: the best-scored of the choices) "
            "and exact match of the first number (arithmetic); normalized = score / "
            "the task's own expert's"
        ],
        started=started,
        metrics={
            "mean_" + "".join(c if c.isalnum() else "_" for c in r["method"]): r["mean"]
            for r in rows
        },
        out_dir=bench.out_dir,
    )


if __name__ == "__main__":
    main()
