"""Generation bookkeeping on the driver: the ledger of trials and a Tune callback.

:class:`SearchMonitor` sees every finished (or finally failed) trial, records it in the
:class:`Ledger` with its value (the penalty when it failed or reported a non-finite
metric, exactly as the searcher saw it), forwards it to the tracking sinks, and at each
generation boundary: summarises the generation, tells the sinks, saves the ledger and,
last, checkpoints the searcher. A killed search therefore resumes from the last
generation whose records are all saved, losing at most the one in flight.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ray.tune import Callback

from npstune.fsutil import atomic_write_text
from npstune.search.space import METRIC, ParamSpace

#: Result keys kept per trial (besides ``acc/<task>``).
KEPT = (
    "objective",
    "accuracy",
    "storage_bits",
    "k",
    "build_s",
    "eval_s",
    "pre_accuracy",
    "target_accuracy",
    "h_score",
    "normalized_accuracy",
    "time_total_s",
)


@dataclass
class TrialRecord:
    """One finished trial: its candidate, metrics, and the value the searcher saw."""

    trial_id: str
    generation: int
    index: int
    params: dict[str, float]
    metrics: dict[str, float]
    value: float
    status: str  # ok | invalid (non-finite metric) | error
    node: str = ""  # the Ray node id the trial ran on ("" in older ledgers)
    error: str = ""  # an error's one line (a trial_error report)


@dataclass
class GenerationSummary:
    """One finished generation (0-based ``generation``)."""

    generation: int
    best: float
    best_so_far: float
    mean: float
    trials: int
    failed: int
    wall_s: float
    best_trial: str


@dataclass
class Ledger:
    """Every recorded trial and generation of a search, saved as JSON in the state
    dir."""

    path: Path
    records: list[TrialRecord] = field(default_factory=list)
    generations: list[GenerationSummary] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Ledger:
        if not path.is_file():
            return cls(path)
        data = json.loads(path.read_text())
        return cls(
            path,
            [TrialRecord(**r) for r in data["records"]],
            [GenerationSummary(**g) for g in data["generations"]],
        )

    def save(self) -> None:
        data = {
            "records": [asdict(r) for r in self.records],
            "generations": [asdict(g) for g in self.generations],
        }
        atomic_write_text(self.path, json.dumps(data, default=float))

    def truncate(self, generations: int) -> None:
        """Forget everything from generation ``generations`` on (an unfinished one)."""
        self.records = [r for r in self.records if r.generation < generations]
        self.generations = [g for g in self.generations if g.generation < generations]

    def best(self) -> TrialRecord | None:
        ok = [r for r in self.records if r.status == "ok"]
        return max(ok, key=lambda r: (r.value, -r.generation, -r.index)) if ok else None


class Sink(Protocol):
    """Receives the monitor's events (the MLflow tracker is one)."""

    def on_trial(self, record: TrialRecord) -> None: ...

    def on_generation(self, summary: GenerationSummary, ledger: Ledger) -> None: ...


class SearchMonitor(Callback):
    """Tune callback: ledger, progress line per generation, sinks, generation
    checkpoints."""

    def __init__(
        self,
        *,
        space: ParamSpace,
        population: int,
        generations: int,
        penalty: float,
        ledger: Ledger,
        checkpoint: Callable[[], None],
        sinks: Sequence[Sink] = (),
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.space, self.population, self.generations = space, population, generations
        self.penalty, self.ledger, self.checkpoint = penalty, ledger, checkpoint
        self.sinks, self.echo = list(sinks), echo
        self._counts: dict[int, int] = {}
        self._t0 = time.perf_counter()

    def on_trial_complete(
        self, iteration: int, trials: list, trial: Any, **info: Any
    ) -> None:
        self._record(trial, error=False)

    def on_trial_error(
        self, iteration: int, trials: list, trial: Any, **info: Any
    ) -> None:
        self._record(trial, error=True)

    def _record(self, trial: Any, error: bool) -> None:
        cfg, result = trial.config, trial.last_result or {}
        g = int(cfg.get("generation", -1))
        metrics = {
            k: float(v)
            for k, v in result.items()
            if (k in KEPT or k.startswith("acc/")) and isinstance(v, (int, float))
        }
        raw = None if error else result.get(METRIC)
        said = str(result.get("trial_error") or "")
        if error or said:
            value, status = self.penalty, "error"
        elif isinstance(raw, (int, float)) and math.isfinite(raw):
            value, status = float(raw), "ok"
        else:
            value, status = self.penalty, "invalid"
        rec = TrialRecord(
            trial.trial_id,
            g,
            int(cfg.get("index", -1)),
            self.space.params_of(cfg),
            metrics,
            value,
            status,
            node=str(result.get("node") or ""),
            error=said,
        )
        if said and self.echo:
            self.echo(f"trial {rec.index + 1} of generation {g + 1} failed: {said}")
        self.ledger.records.append(rec)
        for s in self.sinks:
            s.on_trial(rec)
        self._counts[g] = self._counts.get(g, 0) + 1
        if self._counts[g] >= self.population:
            self._finish(g)

    def _finish(self, g: int) -> None:
        recs = [r for r in self.ledger.records if r.generation == g]
        best = max(recs, key=lambda r: r.value)
        overall = self.ledger.best()
        now = time.perf_counter()
        summary = GenerationSummary(
            generation=g,
            best=best.value,
            best_so_far=overall.value if overall else self.penalty,
            mean=sum(r.value for r in recs) / len(recs),
            trials=len(recs),
            failed=sum(r.status != "ok" for r in recs),
            wall_s=now - self._t0,
            best_trial=best.trial_id,
        )
        self._t0 = now
        self.ledger.generations.append(summary)
        for s in self.sinks:
            s.on_generation(summary, self.ledger)
        self.ledger.save()
        self.checkpoint()  # last: a checkpoint implies everything above is saved
        if self.echo:
            failed = f", {summary.failed} failed" if summary.failed else ""
            self.echo(
                f"generation {g + 1}/{self.generations}: best {summary.best:.4f}, "
                f"best so far {summary.best_so_far:.4f} "
                f"({summary.trials} trials{failed}, {summary.wall_s:.1f} s)"
            )
