"""Saved searcher state, shared by every backend: one version, one check, atomic files.

A backend's ``get_state`` returns a dict with ``version`` (:data:`STATE_VERSION`),
``backend``, ``names`` (the search space's parameter names) and ``population``, plus its
optimizer; :func:`check_state` refuses a state of another backend, version, space or
population, so ``--resume`` never continues a different search.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

from npstune.errors import SearchError
from npstune.fsutil import atomic_write_bytes

STATE_VERSION = 1


def value_or_penalty(raw: Any, penalty: float) -> float:
    """A reported metric, or ``penalty`` when it is missing, NaN or infinite (both
    backends: a failed trial is never dropped, so a generation always completes)."""
    try:
        v = float(raw)
    except (TypeError, ValueError):
        return float(penalty)
    return v if math.isfinite(v) else float(penalty)


def check_state(
    state: dict[str, Any], backend: str, names: list[str], population: int
) -> None:
    """Refuse a saved searcher state of another backend, version,
    space or population."""
    if state.get("version") != STATE_VERSION or state.get("backend") != backend:
        raise SearchError(
            f"searcher state is not a {backend} v{STATE_VERSION} state "
            f"(got {state.get('backend')} v{state.get('version')})"
        )
    if state["names"] != list(names) or state["population"] != population:
        raise SearchError(
            "searcher state belongs to another search space or population;"
            " start without --resume"
        )


def read_state(checkpoint_path: str) -> dict[str, Any]:
    """Unpickle a saved searcher state; SearchError naming the file if unreadable."""
    try:
        return pickle.loads(Path(checkpoint_path).read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise SearchError(
            f"{checkpoint_path}: unreadable searcher state ({exc})"
        ) from exc


def write_state(checkpoint_path: str, state: dict[str, Any]) -> None:
    """Pickle ``state`` to ``checkpoint_path`` atomically
    (a kill leaves the old file)."""
    atomic_write_bytes(checkpoint_path, pickle.dumps(state))
