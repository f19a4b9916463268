"""Storage accounting for every method, in one function (DESIGN §3).

The paper's formulas, for ``T`` tasks and ``N`` merged parameters per model at 32 bits:

- fine-tuned models (one per task):               ``32·T·N``
- one merged model (TA, TIES, averaging, ...):     ``32·N``
- TALL masks + TIES (base, τ_MTL, T bitmasks):     ``64·N + T·N``
- EMR (base, τ_uni, T bitmasks, T rescalers):     ``64·N + T·N + 32·T``
- sparse per task (NPS, magnitude, DARE):          ``32·N + T·(32·k·N + N)``

``k·N`` is the kept count ``⌈k·N⌉`` of DESIGN §2 (equal to ``k·N`` whenever that is an
integer), so every result is an exact integer. Frozen parameters (outside the task
vectors: frozen while fine-tuning, filtered out, integer buffers) are stored once by
every method; they are reported apart as base-only bits (32 per parameter) and added
only to ``total_bits``. Optionally the real bytes on disk are put beside the paper's
bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from npstune.errors import ConfigError
from npstune.sparsify import keep_count

#: Accounting family of every method name the CLI, the benchmarks and the paper use.
FAMILIES: dict[str, str] = {
    "finetuned": "finetuned",
    "fine-tuned": "finetuned",
    "individual": "finetuned",
    "merged": "merged",
    "zero-shot": "merged",
    "pretrained": "merged",
    "average": "merged",
    "averaging": "merged",
    "task-arithmetic": "merged",
    "ties": "merged",
    "fisher": "merged",
    "regmean": "merged",
    "consensus-ta": "merged",
    "consensus-ties": "merged",
    "tall-ties": "tall",
    "tall": "tall",
    "tall-masks": "tall",
    "tsv-m": "merged",
    "iso-c": "merged",
    "iso-cts": "merged",
    "wudi": "merged",
    "pcb": "merged",
    "emr": "emr",
    "nps": "sparse",
    "magnitude": "sparse",
    "dare": "sparse",
    "darex": "sparse",
    "ties-trim": "sparse",
    "sparse": "sparse",
}


@dataclass(frozen=True)
class StorageBits:
    """Bits one method needs for ``tasks`` models of ``n`` merged
    (+ ``frozen``) params."""

    method: str
    family: str
    tasks: int
    n: int
    k: float | None
    frozen: int
    paper_bits: int
    disk_bytes: int | None = None

    @property
    def frozen_bits(self) -> int:
        """Base-only parameters, stored once at 32 bits."""
        return 32 * self.frozen

    @property
    def total_bits(self) -> int:
        """Paper bits plus the base-only (frozen) bits."""
        return self.paper_bits + self.frozen_bits

    @property
    def ratio(self) -> float | None:
        """Bits on disk / paper bits (None when no disk size was given)."""
        if self.disk_bytes is None or self.paper_bits == 0:
            return None
        return 8 * self.disk_bytes / self.paper_bits

    def as_dict(self) -> dict[str, object]:
        """JSON-ready numbers (every bit count an exact integer)."""
        return {
            "method": self.method,
            "family": self.family,
            "tasks": self.tasks,
            "n": self.n,
            "k": self.k,
            "frozen": self.frozen,
            "paper_bits": self.paper_bits,
            "frozen_bits": self.frozen_bits,
            "total_bits": self.total_bits,
            "disk_bytes": self.disk_bytes,
            "ratio": self.ratio,
        }


def storage_bits(
    method: str,
    tasks: int,
    n: int,
    k: float | None = None,
    *,
    frozen: int = 0,
    disk_bytes: int | None = None,
) -> StorageBits:
    """The paper's storage bits of ``method`` (any name in :data:`FAMILIES`).

    Args:
        method: a method name, e.g. ``"nps"``, ``"ties"``, ``"finetuned"``,
            ``"tall-ties"``.
        tasks: number of tasks T (>= 1).
        n: merged parameters per model N (the task vectors' entries).
        k: keep ratio; required by the sparse methods (NPS, magnitude, DARE).
        frozen: parameters outside the task vectors, stored once (base-only).
        disk_bytes: real size on disk, to report the ratio against the paper's bits.
    """
    family = FAMILIES.get(method)
    if family is None:
        raise ConfigError(
            f"storage accounting: unknown method {method!r}; "
            f"valid: {', '.join(sorted(FAMILIES))}"
        )
    if tasks < 1 or n < 0 or frozen < 0:
        raise ConfigError(
            f"storage accounting: need tasks >= 1, n >= 0, frozen >= 0; "
            f"got tasks={tasks}, n={n}, frozen={frozen}"
        )
    if family == "finetuned":
        bits = 32 * tasks * n
    elif family == "merged":
        bits = 32 * n
    elif family == "tall":
        bits = 64 * n + tasks * n
    elif family == "emr":
        bits = 64 * n + tasks * n + 32 * tasks
    else:
        if k is None:
            raise ConfigError(f"storage accounting: {method} needs the keep ratio k")
        bits = 32 * n + tasks * (32 * keep_count(k, n) + n)
    return StorageBits(method, family, tasks, n, k, frozen, bits, disk_bytes)


__all__ = ["FAMILIES", "StorageBits", "storage_bits"]
