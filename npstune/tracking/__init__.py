"""Experiment tracking: MLflow runs, metrics, curves and artifacts (DESIGN §5).

The only place npstune talks to MLflow. Searches use :class:`MlflowTracker` as a sink of
:class:`~npstune.search.monitor.SearchMonitor` (a Ray Tune callback); kernels and
searchers never import MLflow. Plots (matplotlib, Agg) live in :mod:`.plots`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_URI", "MlflowTracker", "log_benchmark", "ui_command"]

DEFAULT_URI = "sqlite:///mlflow.db"


def ui_command(uri: str) -> str:
    """How to open the MLflow UI on ``uri`` (a server's URL is opened as it is)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def __getattr__(
    name: str,
) -> Any:  # lazy: importing npstune.tracking does not import mlflow
    if name in ("MlflowTracker", "log_benchmark"):
        from npstune.tracking import mlflow_tracker

        return getattr(mlflow_tracker, name)
    raise AttributeError(f"module 'npstune.tracking' has no attribute {name!r}")
