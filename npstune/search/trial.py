"""The Ray Tune trainable of a search, and the per-worker cache of its objective.

Kept apart from :mod:`npstune.search.objective` and light to import (torch and the
objective are imported inside the functions): a trial actor is ready as soon as its
process is, which matters whenever Tune starts one (the first generation; idle actors
are then kept across generations, see :mod:`npstune.search.actor_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from npstune.evaluate import Evaluator
    from npstune.search.objective import BaseObjective as Objective

_CACHE: dict[str, Objective] = {}


@dataclass(frozen=True)
class ObjectiveHandle:
    """What a trial receives: the search id and the payload's object-store reference.

    The reference sits inside a tuple so fetching the handle does not fetch the payload;
    :meth:`objective` fetches it only on a cache miss (once per worker process).
    """

    search_id: str
    refs: tuple[Any, ...]
    threads: int = 1

    def objective(self) -> Objective:
        obj = _CACHE.get(self.search_id)
        if obj is None:
            import ray
            import torch

            payload = ray.get(self.refs[0])
            if torch.cuda.is_available() and ray.get_gpu_ids():
                if payload.evaluator is None and payload.recipe is not None:
                    # built here, straight onto the trial's GPU
                    payload.recipe = replace(payload.recipe, device="cuda")
                else:
                    payload.evaluator = _on_gpu(payload.evaluator, payload.eval_tasks)
            _CACHE.clear()  # one search per worker at a time: bound memory
            obj = _CACHE[self.search_id] = payload.objective()
        return obj


def _on_gpu(ev: Evaluator, tasks: list[str]) -> Evaluator:
    """The evaluator rebuilt on the trial's GPU when its kind can move (``on_device``;
    data are prepared again, once per worker); as it is otherwise."""
    from npstune.search.objective import CALIBRATION

    move = getattr(ev, "on_device", None)
    if not callable(move):
        return ev
    gpu = move("cuda")
    prepare = getattr(gpu, "batches", None)
    if callable(prepare):
        for task in tasks:
            prepare(task, CALIBRATION)
    return gpu


def run_trial(config: dict[str, Any], handle: ObjectiveHandle) -> None:
    """The Ray Tune trainable: score one candidate and report its metrics once, with
    the id of the node it ran on. An npstune error (a checkpoint this node cannot
    open, say) is reported as ``trial_error``, one line naming the node, instead of
    raised: the search records the trial as failed and goes on."""
    import ray
    import torch
    from ray import tune

    from npstune.errors import NpstuneError, first_line

    torch.set_num_threads(max(1, handle.threads))
    ctx = ray.get_runtime_context()
    where = {"node": ctx.get_node_id()}
    try:
        obj = handle.objective()
        metrics: dict[str, Any] = obj.score(obj.space.candidate(config))
    except NpstuneError as exc:
        from npstune.search.space import METRIC

        ip = ray.util.get_node_ip_address()
        # no score: the searcher gives it the penalty, the monitor records the line
        said = {METRIC: float("nan"), "trial_error": f"node {ip}: {first_line(exc)}"}
        tune.report({**where, **said})
        return
    metrics.update(where, generation=float(config.get("generation", -1)))
    tune.report(metrics)
