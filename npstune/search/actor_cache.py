"""Keep every trial actor alive across CMA-ES generation boundaries.

Ray Tune reuses a finished trial's actor only for a trial that is already pending, plus
at most one spare (``_ObjectCache(may_keep_one=True)``). A generational searcher has
nothing pending while it waits for the last trial of a generation, so with W trials in
flight W − 1 actors are stopped at every boundary, each holding its CPUs until it has
exited, and replacements are started for the next generation: with 2 workers that cost
a third of the trial time on the small zoo and more than the trial itself on a 2-second
synthetic trial (``benchmarks/search_overhead.py``; 115 % → 7 % with this patch).

:func:`keep_idle_actors` lets Tune's controller keep up to ``n`` idle actors instead
(``n`` = trials in flight). The end of the experiment still flushes them all. The cache
is a private part of Ray Tune (checked against the pinned ray 2.60): if its shape is
not the one expected, nothing is patched and Tune behaves as usual.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from ray.tune.utils.object_cache import _ObjectCache

log = logging.getLogger(__name__)


def _spare_cache(base: type, keep: int) -> type:
    class SpareActorCache(base):
        """Tune's actor cache that keeps up to ``keep`` idle actors between trials."""

        def cache_object(self, key: Any, obj: Any) -> bool:
            if self._num_cached_objects < keep:
                self._cached_objects[key].append(obj)
                self._num_cached_objects += 1
                return True
            return super().cache_object(key, obj)

        def flush_cached_objects(self, force_all: bool = False) -> Iterator[Any]:
            if not force_all and self._num_cached_objects <= keep:
                return iter(())
            return super().flush_cached_objects(force_all=force_all)

    return SpareActorCache


@contextlib.contextmanager
def keep_idle_actors(n: int) -> Iterator[bool]:
    """Within the block, Tune controllers keep up to ``n`` idle trial actors.

    Yields whether the patch is in place (False: ``n`` < 2 or an unexpected Ray)."""
    if n < 2:
        yield False
        return
    try:
        from ray.tune.execution import tune_controller
        from ray.tune.utils.object_cache import _ObjectCache

        probe = _ObjectCache(may_keep_one=True)
        ok = (
            getattr(tune_controller, "_ObjectCache", None) is _ObjectCache
            and hasattr(probe, "_cached_objects")
            and hasattr(probe, "_num_cached_objects")
        )
    except Exception:  # noqa: BLE001 - any other Ray: leave Tune as it is
        ok = False
    if not ok:
        log.debug("Ray Tune's actor cache is not the expected one; not patched")
        yield False
        return
    # patching a class of Ray's module is the point here: mypy refuses any assignment
    # to a class name ("Cannot assign to a type")
    spare = cast("type[_ObjectCache]", _spare_cache(_ObjectCache, n))
    tune_controller._ObjectCache = spare  # type: ignore[misc]
    try:
        yield True
    finally:
        tune_controller._ObjectCache = _ObjectCache  # type: ignore[misc]
