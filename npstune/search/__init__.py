"""NPS search: search-space files, the objective, cma/nevergrad backends, the Ray Tune
runner with resume, and MLflow tracking through a Tune callback (DESIGN §2, §6).

    from npstune.search import load_config, run_search
    outcome = run_search(load_config("searchspaces/nps-fusion-small.yaml"))

Imports are lazy: ``npstune.search.space`` never pulls in Ray, cma or MLflow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SearchConfig": "npstune.search.space",
    "ParamSpace": "npstune.search.space",
    "Candidate": "npstune.search.space",
    "load_config": "npstune.search.space",
    "load_configs": "npstune.search.space",
    "METRIC": "npstune.search.space",
    "MODE": "npstune.search.space",
    "Objective": "npstune.search.objective",
    "ObjectivePayload": "npstune.search.objective",
    "build_payload": "npstune.search.objective",
    "make_searcher": "npstune.search.backends",
    "run_search": "npstune.search.runner",
    "SearchOutcome": "npstune.search.runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'npstune.search' has no attribute {name!r}")
