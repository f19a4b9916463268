"""Search plots (matplotlib, Agg backend): convergence and accuracy vs storage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from npstune.errors import missing


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise missing("search", "matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def convergence_plot(
    ledger: Any,
    path: Path,
    *,
    reference: float | None = None,
    reference_label: str = "NPS w=1 (magnitude)",
    metric: str = "objective",
) -> Path:
    """Every trial's calibration value by generation, the generation best and the best
    so far."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ok = [r for r in ledger.records if r.status == "ok"]
    bad = [r for r in ledger.records if r.status != "ok"]
    ax.scatter(
        [r.generation + 1 for r in ok],
        [r.value for r in ok],
        s=10,
        c="0.65",
        label="trials",
    )
    if bad:
        ax.scatter(
            [r.generation + 1 for r in bad],
            [r.value for r in bad],
            s=14,
            c="tab:red",
            marker="x",
            label="failed (penalty)",
        )
    gens = ledger.generations
    if gens:
        xs = [g.generation + 1 for g in gens]
        ax.plot(
            xs,
            [g.best for g in gens],
            "o-",
            c="tab:blue",
            ms=3,
            label="generation best",
        )
        ax.plot(
            xs,
            [g.best_so_far for g in gens],
            "-",
            c="tab:green",
            lw=2,
            label="best so far",
        )
    if reference is not None:
        ax.axhline(reference, ls="--", c="tab:orange", label=reference_label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel(f"calibration {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def accuracy_storage_plot(
    ledger: Any, rows: Sequence[Any], path: Path, metric: str = "objective"
) -> Path:
    """Calibration value against the paper's storage bits: trials and the table's
    rows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ok = [r for r in ledger.records if r.status == "ok" and "storage_bits" in r.metrics]
    if ok:
        ax.scatter(
            [r.metrics["storage_bits"] / 8e6 for r in ok],
            [r.value for r in ok],
            s=10,
            c="0.65",
            label="NPS trials",
        )
    for i, row in enumerate(rows):
        cal = row.calibration.get(metric) if row.calibration else None
        if cal is None:
            continue
        ax.scatter(
            [row.bits / 8e6], [cal], s=40, marker="o^sDvP*"[i % 7], label=row.label
        )
    ax.set_xscale("log")
    ax.set_xlabel("storage (MB, paper accounting)")
    ax.set_ylabel(f"calibration {metric}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
