"""The end of a search: the best candidate and the baselines on calibration and test.

Rows (DESIGN §4, every number says its split): the pretrained body (zero-shot with each
task's head), the individual fine-tuned models, registered merge methods (Task
Arithmetic, TIES, ... with the CLI defaults unless the file gives params), magnitude
pruning = NPS with w = 1 at the start k and λ, and the searched NPS candidate. The best
candidate is saved as JSON (with the equivalent ``npstune merge`` command) and as a
model: an HF dir in the base's form (fusion, transfer) or a sparse store (compression).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from npstune.compress import FAMILIES, storage_bits
from npstune.errors import ConfigError, NpstuneError
from npstune.evaluate.base import metric_of
from npstune.search.monitor import Ledger, TrialRecord
from npstune.search.objective import (
    CALIBRATION,
    TEST,
    Payload,
    make_evaluator,
)
from npstune.search.space import Candidate, SearchConfig
from npstune.search.uses import get_use

logger = logging.getLogger(__name__)


@dataclass
class Row:
    """One line of the results table."""

    method: str
    label: str
    calibration: dict[str, float]
    test: dict[str, float]
    bits: int
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """The final table and what was written."""

    use: str
    metric_label: str
    tasks: list[str]
    rows: list[Row]
    best: dict[str, Any] | None
    files: dict[str, str] = field(default_factory=dict)
    #: tasks whose scores are not fractions (a perplexity task's −log perplexity):
    #: printed as they are, and so are the averages over them; the others in %
    plain: list[str] = field(default_factory=list)

    def row(self, method: str) -> Row | None:
        return next((r for r in self.rows if r.method == method), None)

    def markdown(self) -> str:
        """The table as GitHub markdown (accuracies in %, other scores as they are;
        test split unless marked)."""
        extra = list(get_use(self.use).extra_columns)
        fmt = _plain if self.plain else _pct  # averages: plain if any task is

        def cell(t: str, v: float | None) -> str:
            return _plain(v) if t in self.plain else _pct(v)

        head = [
            "method",
            f"calib {self.metric_label}",
            f"test {self.metric_label}",
            *[f"test {e.replace('_accuracy', ' acc')}" for e in extra],
            *[f"test {t}" for t in self.tasks],
            "storage (paper bits)",
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [
                r.label,
                fmt(r.calibration.get("objective")),
                fmt(r.test.get("objective")),
                *[fmt(r.test.get(e)) for e in extra],
                *[cell(t, r.test.get(f"acc/{t}")) for t in self.tasks],
                f"{r.bits:,}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "use": self.use,
            "metric": self.metric_label,
            "tasks": self.tasks,
            "rows": [asdict(r) for r in self.rows],
            "best": self.best,
            "files": self.files,
        }


def _pct(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.2f}"


def _plain(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.4f}"


#: metrics whose scores are fractions in [0, 1]
FRACTIONS = frozenset({"accuracy", "exact_match"})


def final_report(
    cfg: SearchConfig,
    payload: Payload,
    ledger: Ledger,
    zoo: Any,
    out: Path,
    echo: Callable[[str], None] | None = None,
) -> Report:
    """Evaluate the best candidate and the baselines; write results and the best
    model."""
    say = echo or (lambda s: None)
    obj = payload.objective()
    use = obj.use
    tasks = use.scored_tasks(payload.vector_tasks, payload.eval_tasks)
    # the streamed path's evaluator holds a model of the checkpoint's size: the one
    # built for calibration scores the test split too (its data read on first use)
    test_ev = (
        payload.get_evaluator()
        if payload.recipe is not None
        else make_evaluator(cfg, zoo, tasks, TEST)
    )
    if use.needs_references:
        payload.references[TEST] = obj.individual(TEST, test_ev)
    rows: list[Row] = []
    for name in cfg.baselines:
        say(f"baseline {name} ...")
        try:
            rows.append(_baseline(name, cfg, obj, test_ev))
        except NpstuneError:
            raise  # a bad baseline name or params: the user's to fix
        except (
            Exception
        ) as exc:  # an evaluator failing on one model must not sink the run
            logger.warning("baseline %s failed: %s", name, exc)
            say(f"baseline {name} failed ({type(exc).__name__}: {exc}); left out")
    best = ledger.best()
    best_info = None
    if best is not None:
        say("best candidate on the test split ...")
        cand = obj.space.candidate(best.params)
        test = obj.score(cand, TEST, test_ev)
        label = (
            "NPS (searched)"
            if cfg.method == "nps"
            else f"{_pruned(cfg)}{cfg.method} (searched)"
        )
        rows.append(
            Row(
                cfg.method,
                label,
                dict(best.metrics),
                test,
                obj.bits(cand),
                cand.as_dict(),
            )
        )
        best_info = _best_info(cfg, payload, best, cand, test)
    plain = [t for t in tasks if metric_of(test_ev, t) not in FRACTIONS]
    label = use.metric_label.replace("acc", "score") if plain else use.metric_label
    report = Report(payload.use, label, tasks, rows, best_info, plain=plain)
    out.mkdir(parents=True, exist_ok=True)
    if best is not None and best_info is not None:
        (out / "best_candidate.json").write_text(json.dumps(best_info, indent=2) + "\n")
        report.files["best_candidate"] = str(out / "best_candidate.json")
        if cfg.report.save_model:
            say("writing the best model ...")
            report.files["best_model"] = str(_save_model(cfg, payload, obj, cand, out))
    (out / "results.md").write_text(
        f"# {cfg.name}: {cfg.method} {cfg.use} search ({cfg.search.backend})\n\n"
        f"calibration: the search's split; test: held out (DESIGN §1).\n\n"
        + report.markdown()
        + "\n"
    )
    report.files["results_md"] = str(out / "results.md")
    (out / "results.json").write_text(
        json.dumps(report.to_json(), indent=2, default=float) + "\n"
    )
    report.files["results_json"] = str(out / "results.json")
    return report


def _pruned(cfg: SearchConfig, start: bool = False) -> str:
    """``"nps → "`` for a search with a pruning step (``start``: at its start, every
    NPS weight 1)."""
    if cfg.prune is None:
        return ""
    w1 = " w=1" if start and cfg.prune.method == "nps" else ""
    return f"{cfg.prune.method}{w1} → "


def _baseline(name: str, cfg: SearchConfig, obj: Any, test_ev: Any) -> Row:
    p = obj.p
    T, n = len(p.model_paths), p.n
    fam = name if name in FAMILIES else "merged"
    if name == "pretrained":
        from npstune.evaluate.hf import read_state

        pre = read_state(p.base_path)
        return Row(
            name,
            "pretrained (zero-shot heads)",
            obj.score_state(pre, CALIBRATION),
            obj.score_state(pre, TEST, test_ev),
            storage_bits(fam, T, n).paper_bits,
        )
    if name == "individual":
        return Row(
            name,
            obj.use.individual_label,
            obj.aggregate(obj.individual(CALIBRATION), CALIBRATION),
            obj.aggregate(obj.individual(TEST, test_ev), TEST),
            storage_bits("finetuned", T, n).paper_bits,
        )
    if name in ("nps-w1", "defaults"):
        if (name == "nps-w1") != (cfg.method == "nps"):
            raise ConfigError(
                f"report.baselines: {name} is for "
                f"{'method nps' if name == 'nps-w1' else 'method searches'}"
                f" (this search's method is {cfg.method})"
            )
        cand = obj.space.baseline()
        label = (
            f"NPS w=1 (magnitude pruning, k={cand.k:g})"
            if name == "nps-w1"
            else f"{_pruned(cfg, start=True)}{cfg.method} (defaults)"
        )
        return Row(
            name,
            label,
            obj.score(cand),
            obj.score(cand, TEST, test_ev),
            obj.bits(cand),
            cand.as_dict(),
        )
    from npstune.merge import get_method, merge

    spec = get_method(name)
    params = spec.make_params(cfg.report.params.get(name, {}))
    state = merge(p.base_path, p.model_paths, name, params).state
    assert state is not None
    k = getattr(params, "k", None)
    bits = storage_bits(
        fam, T, n, k if FAMILIES.get(name) == "sparse" else None
    ).paper_bits
    label = name + "".join(
        f" {a}={v:g}" for a, v in params.model_dump().items() if isinstance(v, float)
    )
    return Row(
        name,
        label,
        obj.score_state(state, CALIBRATION),
        obj.score_state(state, TEST, test_ev),
        bits,
        params.model_dump(),
    )


def _best_info(
    cfg: SearchConfig,
    payload: Payload,
    best: TrialRecord,
    cand: Candidate,
    test: dict[str, float],
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "search": cfg.name,
        "use": cfg.use,
        "method": cfg.method,
        "trial_id": best.trial_id,
        "generation": best.generation + 1,
        "params": best.params,
        "candidate": cand.as_dict(),
        "tasks": payload.vector_tasks,
        "calibration": best.metrics,
        "test": test,
    }
    if not isinstance(cand, Candidate):  # a method search: the merge's parameters
        return info
    info["subspaces"] = cfg.nps.subspaces
    if len(set(cand.lam)) == 1:
        rows = cand.weights if cfg.nps.weights.per_task else cand.weights[:1]
        weights = ",".join(repr(float(w)) for row in rows for w in row)
        info["merge_command"] = " ".join(
            [
                "npstune merge --method nps",
                "--base",
                shlex.quote(payload.base_path),
                "--models",
                *map(shlex.quote, payload.model_paths),
                f"--k {cand.k!r}",
                f"--lam {cand.lam[0]!r}",
                f"--subspaces {cfg.nps.subspaces}",
                f"--weights {weights}",
                "--out OUT",
            ]
        )
    return info


def _save_model(
    cfg: SearchConfig,
    payload: Payload,
    obj: Any,
    cand: Candidate,
    out: Path,
) -> Path:
    from npstune.checkpoints import CheckpointWriter, open_checkpoint

    base = open_checkpoint(payload.base_path)
    suffix = {"safetensors": ".safetensors", "torch": ".pt"}.get(base.form, "")
    dest = out / f"best_model{suffix}"  # the base's form: HF dir, sharded dir or file
    if not isinstance(cand, Candidate):  # a method search: run the merge once more
        from npstune.merge import merge

        if obj.use.per_vector_states:
            logger.warning("method search for %s: no single model to write", cfg.use)
            return out
        merge(
            base,
            payload.model_paths,
            cfg.method,
            cand.params,
            out=dest,
            prune=cand.prune_step(),
        )
        return dest
    if obj.use.per_vector_states:
        from npstune.compress import compress

        if len(set(cand.lam)) != 1:
            logger.warning("per-task λ: the sparse store takes one λ; not written")
            return out
        dest = out / "best_store"
        weights = [w for row in cand.weights for w in row]
        compress(
            payload.base_path,
            payload.model_paths,
            dest,
            "nps",
            {
                "k": cand.k,
                "lam": cand.lam[0],
                "subspaces": cfg.nps.subspaces,
                "weights": weights,
            },
            names=payload.vector_tasks,  # zoo models are all directories named "model"
        )
        return dest
    _, state = next(iter(obj.states(cand)))
    specs = {k: (base.shape(k), base.dtype(k)) for k in base.keys()}
    meta = {
        "npstune_method": "nps-search",
        "npstune_candidate": json.dumps(cand.as_dict()),
    }
    with CheckpointWriter(dest, base, specs, meta) as w:
        for k in sorted(specs):
            w.write(k, state[k].to(specs[k][1]).contiguous())
    return dest
