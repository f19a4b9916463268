"""Run an NPS search: every candidate a Ray Tune trial, tracked, resumable.

Ray: an embedded local instance by default (``ray.init(address="local")`` on this
machine's CPUs); under ``ray job submit`` or with ``RAY_ADDRESS`` set, the running
cluster. Trials ask for ``cpus_per_trial`` CPUs and, when the cluster has GPUs, a share
of one; asking for GPUs the cluster lacks fails at once instead of waiting forever.

Output directory (``output_dir``, default ``npstune_runs/<name>``)::

    state/        run.json (search id, MLflow run id), ledger.json, searcher.pkl
    ray/          Ray Tune's storage (one experiment per attempt)
    search.yaml   the validated config
    results.md/.json, best_candidate.json, best_model/ (or best_store/), *.png

``resume=True`` restores the searcher saved after the last finished generation, forgets
the generation that was in flight (its MLflow child runs are deleted) and continues the
MLflow parent run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from npstune.errors import ConfigError, SearchError, missing
from npstune.fsutil import atomic_write_text

try:  # the search extra: fail with the install hint, not a traceback
    import ray  # noqa: F401
    import ray.tune  # noqa: F401
except ImportError:
    raise missing("search", "ray[tune]") from None

from npstune.search.backends import make_searcher  # noqa: E402
from npstune.search.monitor import Ledger, SearchMonitor, TrialRecord  # noqa: E402
from npstune.search.objective import Payload, build_payload  # noqa: E402
from npstune.search.report import Report, final_report  # noqa: E402
from npstune.search.space import SearchConfig  # noqa: E402
from npstune.search.trial import ObjectiveHandle, run_trial  # noqa: E402

logger = logging.getLogger(__name__)

Echo = Callable[[str], None]


@dataclass
class SearchOutcome:
    """What :func:`run_search` returns."""

    config: SearchConfig
    out: Path
    report: Report | None
    best: TrialRecord | None
    generations: int
    trials: int
    wall_s: float
    search_s: float
    run_id: str | None
    resumed_from: int


@dataclass
class RunInfo:
    """Identity of one search across attempts (kept in ``state/run.json``)."""

    search_id: str
    mlflow_run_id: str | None = None
    attempts: int = 0

    @classmethod
    def load(cls, path: Path) -> RunInfo | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.__dict__))


def run_search(
    cfg: SearchConfig, *, resume: bool = False, echo: Echo | None = None
) -> SearchOutcome:
    """Run (or resume) the search ``cfg`` describes; see the module docstring."""
    say: Echo = echo or logger.info
    t_start = time.perf_counter()
    if os.environ.get("RAY_ADDRESS") and not cfg.out.is_absolute():
        say(
            f"note: output_dir {cfg.out} is relative to this job's working directory, "
            "a temporary copy Ray may delete after the job; use an absolute path on "
            "shared storage to keep the results and to --resume"
        )
    out = cfg.out.resolve()
    state_dir = out / "state"
    if not resume and state_dir.exists():
        say(f"starting a new search in {out} (--resume continues the previous one)")
        shutil.rmtree(state_dir)
        shutil.rmtree(out / "ray", ignore_errors=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    run = RunInfo.load(state_dir / "run.json") or RunInfo(uuid.uuid4().hex[:12])
    run.attempts += 1
    (out / "search.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    )

    zoo = ensure_zoo(cfg, say) if cfg.zoo else None
    payload = build_payload(cfg, zoo, say)
    space = payload.space
    population = cfg.search.population or space.default_population()
    concurrency = cfg.resources.concurrency or population  # the one place it is set
    searcher = make_searcher(
        cfg.search.backend, space, cfg.search, population, concurrency
    )
    inner = getattr(searcher, "searcher", searcher)
    ckpt = state_dir / "searcher.pkl"
    if resume and ckpt.is_file():
        searcher.restore(str(ckpt))
        say(f"resuming after generation {inner.generation}/{cfg.search.generations}")
    elif resume:
        say("no finished generation to resume from: starting at generation 1")
    start_gen = inner.generation
    ledger = (
        Ledger.load(state_dir / "ledger.json")
        if resume
        else Ledger(state_dir / "ledger.json")
    )
    ledger.truncate(start_gen)

    tracker = _tracker(cfg, run, say) if cfg.tracking.enabled else None
    run.mlflow_run_id = tracker.run_id if tracker else None
    run.save(state_dir / "run.json")
    if tracker is not None:
        gone = tracker.discard_from(start_gen)
        if gone:
            say(f"deleted {gone} MLflow child run(s) of the unfinished generation")
        tracker.log_params(_parent_params(cfg, payload, population, concurrency))
    status = "FAILED"
    try:
        t_search = time.perf_counter()
        if start_gen < cfg.search.generations:
            say(
                f"searching: backend {cfg.search.backend}, {space.dim} parameters, "
                f"population {population}, generations "
                f"{start_gen + 1}..{cfg.search.generations}, concurrency {concurrency}"
            )
            _tune(
                cfg,
                payload,
                searcher,
                ledger,
                population,
                concurrency,
                run,
                out,
                tracker,
                say,
            )
        search_s = time.perf_counter() - t_search
        failure = getattr(inner, "failure", None)
        if failure:
            raise SearchError(
                f"the search stopped after generation {inner.generation} of "
                f"{cfg.search.generations}: the optimizer failed ({failure})"
            )
        if inner.generation < cfg.search.generations:
            raise SearchError(
                f"the search stopped after generation {inner.generation} of "
                f"{cfg.search.generations}; rerun with --resume"
            )
        report = final_report(cfg, payload, ledger, zoo, out, say)
        files = _plots(ledger, report, out, say)
        if tracker is not None:
            _log_final(tracker, cfg, report, files)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.finish(status)
    best = ledger.best()
    return SearchOutcome(
        cfg,
        out,
        report,
        best,
        len(ledger.generations),
        len(ledger.records),
        time.perf_counter() - t_start,
        search_s,
        tracker.run_id if tracker else None,
        start_gen,
    )


def ensure_zoo(cfg: SearchConfig, say: Echo) -> Any:
    """The configured zoo, built first (with progress) if it is not there yet."""
    from npstune.zoo import build_zoo, load_zoo

    assert cfg.zoo is not None  # callers ask only for a configured zoo
    try:
        return load_zoo(cfg.zoo, cfg.zoo_cache)
    except ConfigError as exc:
        say(f"{exc}: building it now")
        return build_zoo(cfg.zoo, cfg.zoo_cache, progress=True)


def _tracker(cfg: SearchConfig, run: RunInfo, say: Echo) -> Any:
    from npstune.tracking import MlflowTracker

    t = MlflowTracker(cfg.tracking_uri, cfg.experiment, cfg.name, run.mlflow_run_id)
    say(
        f"MLflow: {'continuing' if t.continued else 'new'} run {t.run_id} in "
        f"experiment {cfg.experiment!r} at {cfg.tracking_uri}"
    )
    return t


def _parent_params(
    cfg: SearchConfig, payload: Payload, population: int, concurrency: int
) -> dict[str, Any]:
    return {
        "use": cfg.use,
        "backend": cfg.search.backend,
        "population": population,
        "generations": cfg.search.generations,
        "seed": cfg.search.seed,
        "sigma0": cfg.search.sigma0,
        "penalty": cfg.search.penalty,
        "method": cfg.method,
        **_space_params(cfg),
        "dim": payload.space.dim,
        **({"candidates": payload.candidates} if payload.candidates else {}),
        "tasks": ",".join(payload.vector_tasks),
        "n": payload.n,
        "concurrency": concurrency,
        "zoo": cfg.zoo,
        "cpus_per_trial": cfg.resources.cpus_per_trial,
        "source": cfg.source,
    }


def _space_params(cfg: SearchConfig) -> dict[str, Any]:
    """The search space as MLflow parameters (the nps: section, or params:)."""
    if cfg.method != "nps":
        return {
            "params": json.dumps(cfg.params, sort_keys=True),
            "per_task": ",".join(cfg.per_task),
            "prune": cfg.prune.model_dump_json(exclude_none=True) if cfg.prune else "",
        }
    return {
        "subspaces": cfg.nps.subspaces,
        "weights_per_task": cfg.nps.weights.per_task,
        "k": cfg.nps.k if isinstance(cfg.nps.k, float) else cfg.nps.k.model_dump_json(),
        "lam": cfg.nps.lam
        if isinstance(cfg.nps.lam, float)
        else cfg.nps.lam.model_dump_json(),
    }


# -----------------------------------------------------------------------------------
# Ray
#: Environment of the embedded local Ray instance, each unless the user set it: no
#: token auth, and trial workers at nice 0 (Ray nices its workers to 15, so a trial
#: yields the cores to any other process; a cluster's workers keep its own setting)
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0"}


def connect_ray(say: Echo | None = None) -> bool:
    """Connect to Ray: the running cluster under a Ray job / ``RAY_ADDRESS``, otherwise
    a fresh local instance on this machine's CPUs. True if this call started it."""
    say = say or logger.info
    try:
        import ray
    except ImportError:
        raise missing("search", "ray[tune]") from None
    if ray.is_initialized():
        say("Ray: using the Ray instance this process already started")
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        say(
            f"Ray: connected to the cluster at {address} "
            f"({ray.cluster_resources().get('CPU', 0):g} CPUs, "
            f"{ray.cluster_resources().get('GPU', 0):g} GPUs)"
        )
    else:
        # The embedded local instance (its processes start now and inherit these)
        # runs without token auth unless the user chose a mode, and its workers (the
        # trials: the search's work) at the driver's priority instead of Ray's nice 15,
        # unless the user set RAY_worker_niceness; the variables are put back at once,
        # so nothing else in this process (a cluster, a job client) sees them changed.
        chosen = {k: os.environ.get(k) for k in LOCAL_RAY_ENV}
        for k, default in LOCAL_RAY_ENV.items():
            os.environ[k] = chosen[k] or default
        try:
            ray.init(
                address="local",
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        finally:
            for k, was in chosen.items():
                if was is None:
                    os.environ.pop(k, None)
        say(f"Ray: started a local instance on {os.cpu_count()} CPUs")
    return True


def trial_resources(cfg: SearchConfig, concurrency: int) -> dict[str, float]:
    """CPUs and GPUs per trial, checked against the cluster (fail fast, never hang)."""
    import ray

    have = ray.cluster_resources()
    cpus, gpus = cfg.resources.cpus_per_trial, cfg.resources.gpus_per_trial
    if cpus > have.get("CPU", 0):
        raise SearchError(
            f"resources.cpus_per_trial {cpus:g} exceeds the Ray cluster's "
            f"{have.get('CPU', 0):g} CPUs; lower it"
        )
    n_gpu = have.get("GPU", 0.0)
    if gpus == "auto":
        # a float local: inferred against gpus' type, min() would be float | "auto"
        share: float = min(1.0, n_gpu / concurrency) if n_gpu else 0.0
        gpus = share
    elif gpus > 0 and n_gpu == 0:
        raise SearchError(
            f"resources.gpus_per_trial {gpus:g} requested but the Ray cluster "
            "has no GPU; set gpus_per_trial: 0 (or auto)"
        )
    elif gpus > n_gpu:
        raise SearchError(
            f"resources.gpus_per_trial {gpus:g} exceeds the cluster's {n_gpu:g} GPUs"
        )
    return {"cpu": cpus, "gpu": gpus}


def _tune(
    cfg: SearchConfig,
    payload: Payload,
    searcher: Any,
    ledger: Ledger,
    population: int,
    concurrency: int,
    run: RunInfo,
    out: Path,
    tracker: Any,
    say: Echo,
) -> None:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then prints nothing
    started = connect_ray(say)
    import ray
    from ray import tune

    from npstune.search.actor_cache import keep_idle_actors

    try:
        res = trial_resources(cfg, concurrency)
        handle = ObjectiveHandle(
            run.search_id,
            (ray.put(payload),),
            max(1, int(cfg.resources.cpus_per_trial)),
        )
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, handle=handle), res
        )
        ckpt = out / "state" / "searcher.pkl"
        monitor = SearchMonitor(
            space=payload.space,
            population=population,
            generations=cfg.search.generations,
            penalty=cfg.search.penalty,
            ledger=ledger,
            checkpoint=lambda: searcher.save(str(ckpt)),
            sinks=[tracker] if tracker is not None else [],
            echo=say,
        )
        tuner = tune.Tuner(
            trainable,
            param_space={},
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=-1,
                reuse_actors=True,
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{run.attempts}",
                storage_path=str(out / "ray"),
                verbose=0,
                callbacks=[monitor],
                failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
            ),
        )
        with keep_idle_actors(
            concurrency
        ):  # no actor restarts at generation boundaries
            tuner.fit()
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- artifacts
def _plots(ledger: Ledger, report: Report, out: Path, say: Echo) -> list[Path]:
    try:
        from npstune.tracking.plots import accuracy_storage_plot, convergence_plot
    except ImportError:
        return []
    mag = report.row("magnitude")
    ref = mag.calibration.get("objective") if mag else None
    files = [
        convergence_plot(ledger, out / "convergence.png", reference=ref),
        accuracy_storage_plot(ledger, report.rows, out / "accuracy_vs_storage.png"),
    ]
    report.files.update(convergence=str(files[0]), accuracy_vs_storage=str(files[1]))
    return files


def _log_final(
    tracker: Any, cfg: SearchConfig, report: Report, plots: list[Path]
) -> None:
    metrics: dict[str, float] = {}
    for row in report.rows:
        for split, vals in (("calibration", row.calibration), ("test", row.test)):
            v = vals.get("objective")
            if v is not None:
                metrics[f"{split}_objective/{row.method}"] = v
    nps = report.row(cfg.method)  # the searched row
    if nps is not None:
        metrics.update(
            {
                f"test_{k}": v
                for k, v in nps.test.items()
                if k in ("objective", "accuracy", "h_score", "normalized_accuracy")
            }
        )
        metrics.update(
            {f"test_{k}": v for k, v in nps.test.items() if k.startswith("acc/")}
        )
        metrics["best_calibration_objective"] = nps.calibration.get(
            "objective", float("nan")
        )
    tracker.log_metrics(metrics)
    files = [Path(cfg.source)] if cfg.source else []
    files += plots + [
        Path(report.files[k])
        for k in ("results_md", "results_json", "best_candidate")
        if k in report.files
    ]
    tracker.log_artifacts(files)
