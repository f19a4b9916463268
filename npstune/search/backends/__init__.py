"""Search backends: a name -> a factory ``make(space, settings, population,
concurrency)`` returning a ``ray.tune.search.Searcher`` (STYLE §5), imported on first
use.

Both backends hand out one *generation* (``population`` candidates) at a time, tag each
trial config with ``generation`` and ``index``, give failed or non-finite trials the
configured penalty (never dropped: a generation always completes), and save/restore a
versioned state at generation boundaries (the runner calls ``save`` after each one).
Both come wrapped in a ``ConcurrencyLimiter`` (``batch=False``) whose ``max_concurrent``
is the concurrency: Tune sizes its queue of pending trials from it (one pending trial
otherwise, which serialises the trials of a custom searcher).
"""

from __future__ import annotations

import importlib
from typing import Any

from npstune.errors import ConfigError, missing

BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    # name -> (module:factory, optional packages it needs)
    "cma": ("npstune.search.backends.cma:make", ("ray", "cma")),
    "nevergrad": ("npstune.search.backends.nevergrad:make", ("ray", "nevergrad")),
}


def make_searcher(
    name: str, space: Any, settings: Any, population: int, concurrency: int
) -> Any:
    """The searcher of backend ``name`` (ConfigError for an unknown name)."""
    if name not in BACKENDS:
        raise ConfigError(
            f"unknown backend {name!r}; valid: {', '.join(sorted(BACKENDS))}"
        )
    target, needs = BACKENDS[name]
    for pkg in needs:
        try:
            importlib.import_module(pkg)
        except ImportError:
            raise missing("search", pkg) from None
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)(
        space, settings, population, concurrency
    )


__all__ = ["BACKENDS", "make_searcher"]
