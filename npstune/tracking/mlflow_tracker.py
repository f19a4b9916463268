"""MLflow tracking of a search: a parent run per search, a child run per trial.

Parent run: the search's settings as params, the search-space file, ``best_so_far``,
``generation_best`` and ``generation_mean`` with ``step = generation``, and at the end
the best candidate's test metrics and the artifacts (plots, results table, best
candidate). Child run per trial: its parameters (w, k, λ), generation, calibration
metrics and storage bits. A resumed search continues its parent run (its id is kept in
the search's state directory) and deletes the child runs of the generation that was
lost.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from npstune.errors import SearchError, missing

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
GEN_TAG = "npstune.generation"


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise missing("search", "mlflow") from None
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


class MlflowTracker:
    """Logs one search to MLflow (see module docstring); a sink of SearchMonitor.

    Args:
        uri: tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``, ...).
        experiment: experiment name (created if missing).
        run_name: the parent run's name.
        run_id: an existing parent run to continue (a resumed search), or None.
    """

    def __init__(
        self, uri: str, experiment: str, run_name: str, run_id: str | None = None
    ) -> None:
        self.uri = uri
        self.client = _client(uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                exp.experiment_id
                if exp is not None
                else self.client.create_experiment(experiment)
            )
            if exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                # MLflow 3's UI opens an untagged experiment on its GenAI overview
                # (traces); this tag makes it open the runs table users compare in
                self.client.set_experiment_tag(
                    self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                )
        except Exception as exc:  # MLflow raises many types for a bad store
            raise SearchError(
                f"MLflow tracking store {uri}: {exc}".splitlines()[0]
            ) from exc
        self.run_id = self._continue(run_id) if run_id else None
        if self.run_id is None:
            run = self.client.create_run(
                self.experiment_id, run_name=run_name, tags={"npstune.kind": "search"}
            )
            self.run_id = run.info.run_id
        self.continued = run_id is not None and self.run_id == run_id

    def _continue(self, run_id: str) -> str | None:
        try:
            run = self.client.get_run(run_id)
        except Exception:
            logger.warning(
                "MLflow run %s not found in %s: starting a new one", run_id, self.uri
            )
            return None
        if run.info.lifecycle_stage == "deleted":
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    # -- search events
    # -------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters of the parent run (a continued run keeps the values it has)."""
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def discard_from(self, generation: int) -> int:
        """Delete child runs of generations >= ``generation`` (lost when killed)."""
        gone = 0
        for run in self.children():
            g = int(run.data.tags.get(GEN_TAG, -1))
            if g >= generation:
                self.client.delete_run(run.info.run_id)
                gone += 1
        return gone

    def children(self) -> list[Any]:
        """Every child run (trial) of this search, oldest first."""
        out, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'",
                max_results=1000,
                page_token=token,
                order_by=["attributes.start_time ASC"],
            )
            out.extend(page)
            token = page.token
            if not token:
                return out

    def on_trial(self, record: Any) -> None:
        from mlflow.entities import Metric, Param

        tags = {
            PARENT_TAG: self.run_id,
            GEN_TAG: str(record.generation),
            "npstune.trial_id": record.trial_id,
            "npstune.status": record.status,
        }
        run = self.client.create_run(
            self.experiment_id,
            tags=tags,
            run_name=f"g{record.generation:03d}-{record.index:02d}",
        )
        ts = int(time.time() * 1000)
        params = [Param(k, f"{v:.6g}") for k, v in record.params.items()]
        params.append(Param("generation", str(record.generation)))
        metrics = [
            Metric(k, v, ts, 0) for k, v in record.metrics.items() if math.isfinite(v)
        ]
        metrics.append(Metric("value", record.value, ts, 0))
        self.client.log_batch(run.info.run_id, metrics=metrics, params=params)
        self.client.set_terminated(
            run.info.run_id, "FINISHED" if record.status == "ok" else "FAILED"
        )

    def on_generation(self, summary: Any, ledger: Any) -> None:
        from mlflow.entities import Metric

        ts, g = int(time.time() * 1000), summary.generation
        self.client.log_batch(
            self.run_id,
            metrics=[
                Metric("best_so_far", summary.best_so_far, ts, g),
                Metric("generation_best", summary.best, ts, g),
                Metric("generation_mean", summary.mean, ts, g),
                Metric("generation_failed", float(summary.failed), ts, g),
                Metric("generation_wall_s", summary.wall_s, ts, g),
            ],
        )

    # -- end
    # -----------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [
            Metric(k, float(v), ts, 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        for i in range(0, len(ms), 500):
            self.client.log_batch(self.run_id, metrics=ms[i : i + 500])

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        for p in paths:
            if Path(p).is_file():
                self.client.log_artifact(self.run_id, str(p))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


#: The experiment tag MLflow 3's UI reads to choose an experiment's first page.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def log_benchmark(
    name: str,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    artifacts: Iterable[str | Path] = (),
    *,
    uri: str | None = None,
    experiment: str = "npstune-benchmarks",
) -> str:
    """One finished MLflow run for a benchmark (``uri``: ``$MLFLOW_TRACKING_URI`` or
    ``sqlite:///mlflow.db``); returns its run id."""
    import os

    from npstune.tracking import DEFAULT_URI

    tr = MlflowTracker(
        uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI, experiment, name
    )
    tr.client.set_tag(tr.run_id, "npstune.kind", "benchmark")
    tr.log_params(params or {})
    tr.log_metrics(metrics or {})
    tr.log_artifacts(Path(a) for a in artifacts)
    tr.finish()
    assert tr.run_id is not None
    return tr.run_id
