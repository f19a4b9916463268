"""What every benchmark shares: the results table, machine facts, files and MLflow.

A benchmark builds a list of row dicts and calls :func:`report`, which prints a Markdown
table, writes ``benchmarks/results/NAME.md`` and ``NAME.json`` (rows + machine,
versions, seeds, wall time) and logs the run to MLflow (the working directory's
``sqlite:///mlflow.db`` unless ``MLFLOW_TRACKING_URI`` says otherwise) when MLflow is
installed.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Facts about where a benchmark ran (CPU, cores, memory, library versions)."""
    import numpy
    import torch

    from npstune.evaluate.hf import cpu_has_bf16

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        ),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_has_bf16(),  # what evaluator precision auto decides on
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import npstune

        info["npstune"] = npstune.__version__
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - facts are best effort
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None
) -> str:
    """Rows of dicts as a Markdown table (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident memory of this process (or of its finished children), in MiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def report(
    name: str,
    sections: dict[str, Sequence[dict[str, Any]]],
    *,
    meta: dict[str, Any] | None = None,
    notes: Sequence[str] = (),
    started: float | None = None,
    metrics: dict[str, float] | None = None,
    artifacts: Sequence[Path] = (),
    out_dir: Path | None = None,
) -> Path:
    """Print the tables, write NAME.md / NAME.json,
    log to MLflow. Returns the .md path."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter() - started if started is not None else None
    facts = {"machine": machine(), "wall_s": wall, **(meta or {})}
    parts = [f"# {name}\n"]
    for title, rows in sections.items():
        parts.append(f"## {title}\n\n{markdown_table(rows)}")
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    parts.append(
        "## Run\n\n```json\n" + json.dumps(facts, indent=2, default=str) + "\n```\n"
    )
    text = "\n".join(parts)
    print(text)
    md = out_dir / f"{name}.md"
    md.write_text(text)
    (out_dir / f"{name}.json").write_text(
        json.dumps(
            {"name": name, "sections": sections, "notes": list(notes), **facts},
            indent=2,
            default=str,
        )
    )
    _log_mlflow(name, facts, metrics or {}, [md, out_dir / f"{name}.json", *artifacts])
    return md


def _log_mlflow(
    name: str, facts: dict[str, Any], metrics: dict[str, float], files: Sequence[Path]
) -> None:
    if os.environ.get("NPSTUNE_BENCH_NO_MLFLOW"):
        return
    try:
        from npstune.tracking import log_benchmark
    except ImportError:
        return
    try:
        log_benchmark(
            name,
            params=_flat(facts),
            metrics=metrics,
            artifacts=[str(f) for f in files],
        )
    except Exception as exc:  # noqa: BLE001 - a tracking failure must not lose the results
        print(f"warning: MLflow logging failed: {exc}", file=sys.stderr)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


def timeit(fn, repeat: int = 5, warmup: int = 1, sync=None) -> float:
    """Median wall time of ``fn()`` in seconds; ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before the clock starts and before it stops,
    for asynchronous devices."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]
