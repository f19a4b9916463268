"""The NPS objective: candidate (w, k, λ) -> pruned/merged model -> calibration score.

Everything a candidate does not change is built once, in the driver, into an
:class:`ObjectivePayload`: the task vectors in rank order
(:class:`~npstune.sparsify.ranked.RankedTaskVector`, so the subspace partition is
computed once per task vector), the base's tensors, and the evaluator with its
calibration data tokenized. The payload travels once through Ray's object store; each
worker process keeps the :class:`Objective` built from it in a module-level cache keyed
by the search id (:mod:`npstune.search.trial`), so trials on reused actors start at
once.

A candidate costs one ``fuse`` (threshold lookup + scatter of the kept entries), one add
onto the base, and the evaluation. Uses (DESIGN §2):

- fusion: θ = θ_pre + Σ_t λ_t τ̂_t; objective = mean accuracy over the tasks;
- transfer: θ = θ_pre + λ τ̂_target; objective = H-score of the mean accuracy on the
  pre-tasks and the target accuracy;
- compression: per task θ_t = θ_pre + λ_t τ̂_t on its own task; objective = mean
  normalized accuracy (accuracy / the fine-tuned model's, same split).

Storage bits are the paper's accounting of a sparse per-task store (base, kept values, a
bitmask per task), from :func:`npstune.compress.storage_bits`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from npstune.compress import storage_bits
from npstune.errors import ConfigError, SearchError
from npstune.evaluate import Evaluator, evaluate_many
from npstune.search.space import Candidate, ParamSpace, SearchConfig
from npstune.search.uses import get_use
from npstune.sparsify.ranked import RankedTaskVector, fuse

logger = logging.getLogger(__name__)

CALIBRATION, TEST = "calibration", "test"


# --------------------------------------------------------------------------- evaluators
def make_evaluator(
    cfg: SearchConfig, zoo: Any, tasks: Iterable[str], split: str, device: str = "cpu"
) -> Evaluator:
    """The evaluator of ``cfg`` (any registered kind) for ``split``, data prepared.

    Calibration uses at most ``calibration_examples`` (times ``calibration_fraction``)
    examples per task; the test split at most ``test_examples``. The architecture,
    config and tokenizer come from the evaluator's ``model:`` or the search's base.
    """
    ev = cfg.evaluator
    model = cfg.base or (str(zoo.base_path) if zoo is not None else None)
    return ev.to_file().build(
        model=model,
        device=device,
        batch_size=ev.batch_size,
        max_examples={CALIBRATION: ev.calibration_examples, TEST: ev.test_examples},
        fraction={CALIBRATION: ev.calibration_fraction},
        zoo=zoo,
        tasks=list(tasks),
        prepare=(split,),
        precision=ev.precision,
    )


@dataclass(frozen=True)
class EvaluatorRecipe:
    """How to build a search's evaluator where it is used (a trial's process, on its
    device): what a payload carries instead of an evaluator holding a big model."""

    cfg: SearchConfig
    zoo: Any
    tasks: list[str]
    split: str
    device: str = "cpu"

    def build(self) -> Evaluator:
        return make_evaluator(self.cfg, self.zoo, self.tasks, self.split, self.device)


# ------------------------------------------------------------------------------ payload
@dataclass(kw_only=True)
class Payload:
    """What every trial of any search needs, built once in the driver.

    ``evaluator`` is built in the driver and shipped, or (``recipe`` given: the
    streamed path, whose evaluator holds a model of the checkpoint's size) built on
    first use by :meth:`get_evaluator` in each process and never pickled."""

    use: str  # a name of npstune.search.uses.USES
    space: Any  # ParamSpace (NPS) or MethodSpace
    vector_tasks: list[str]  # the task of each task vector, in order
    eval_tasks: list[str]  # tasks scored by a shared state (fusion, transfer)
    evaluator: Evaluator | None = None
    recipe: EvaluatorRecipe | None = None
    transfer: tuple[list[str], str] | None = None  # (pre tasks, target)
    references: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # split -> task -> acc
    n: int = 0
    base_path: str = ""
    model_paths: list[str] = field(default_factory=list)
    #: how NPS candidates are built: "memory" (ranked), "stream", or "" (any other
    #: method: an in-memory merge read from the checkpoints)
    candidates: str = ""

    def objective(self) -> BaseObjective:
        raise NotImplementedError

    def get_evaluator(self) -> Evaluator:
        """The evaluator, built from the recipe on first use in this process."""
        if self.evaluator is None:
            if self.recipe is None:
                raise SearchError("this payload has neither an evaluator nor a recipe")
            self.evaluator = self.recipe.build()
        return self.evaluator

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.recipe is not None:  # each process builds its own
            state["evaluator"] = None
        return state


@dataclass(kw_only=True)
class MethodPayload(Payload):
    """A search over any registered method's parameters (no per-entry state)."""

    method: str = "nps"

    def objective(self) -> MethodObjective:
        return MethodObjective(self)


@dataclass(kw_only=True)
class ObjectivePayload(Payload):
    """The NPS fast path: every task vector ranked once (see module docstring)."""

    ranked: list[RankedTaskVector]
    base_flat: torch.Tensor  # float32 θ_pre over the delta keys, in ranked order
    base_rest: dict[str, torch.Tensor]  # every other key of the base, as stored
    dtypes: dict[str, torch.dtype]  # the base's dtype of each delta key
    frozen: int = 0

    def objective(self) -> Objective:
        return Objective(self)

    # Pickled as numpy arrays: Ray then maps them straight out of its shared object
    # store (zero copy), so a fresh trial actor gets a full-size payload in well under a
    # second and every actor on a node shares one copy. The tensors are only ever read.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["ranked"] = [_Arrays.of(r) for r in self.ranked]
        state["base_flat"] = _Arrays.wrap(self.base_flat)
        state["base_rest"] = {k: _Arrays.wrap(v) for k, v in self.base_rest.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["ranked"] = [a.restore() for a in state["ranked"]]
        state["base_flat"] = _Arrays.unwrap(state["base_flat"])
        state["base_rest"] = {
            k: _Arrays.unwrap(v) for k, v in state["base_rest"].items()
        }
        self.__dict__.update(state)


class _Arrays:
    """An object whose tensor attributes travel as numpy arrays (see
    ObjectivePayload)."""

    def __init__(self, cls: type[Any], attrs: dict[str, Any]) -> None:
        self.cls, self.attrs = cls, attrs

    @staticmethod
    def wrap(v: Any) -> Any:
        if (
            isinstance(v, torch.Tensor)
            and v.device.type == "cpu"
            and v.dtype != torch.bfloat16
        ):
            return ("__tensor__", v.detach().contiguous().numpy())
        return v

    @staticmethod
    def unwrap(v: Any) -> Any:
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "__tensor__":
            with warnings.catch_warnings():  # read-only shared memory: never written
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(v[1])
        return v

    @classmethod
    def of(cls, obj: Any) -> _Arrays:
        return cls(type(obj), {k: cls.wrap(v) for k, v in vars(obj).items()})

    def restore(self) -> Any:
        cls: Any = self.cls  # mypy reads type[Any].__new__ as type.__new__
        obj = cls.__new__(cls)
        obj.__dict__.update({k: self.unwrap(v) for k, v in self.attrs.items()})
        return obj


def build_payload(
    cfg: SearchConfig, zoo: Any = None, echo: Callable[[str], None] | None = None
) -> Payload:
    """Everything a trial needs, built once: the NPS fast path (every task vector
    ranked once) for ``method: nps``, the generic in-memory merge otherwise."""
    from npstune.taskvector import plan_merge

    say = echo or (lambda s: None)
    t0 = time.perf_counter()
    use = get_use(cfg.use)
    base, models, names = resolve_models(cfg, zoo)
    sel = use.select(cfg, names)
    models, names = [models[i] for i in sel.vectors], [names[i] for i in sel.vectors]
    recipe = EvaluatorRecipe(cfg, zoo, sel.eval_tasks, CALIBRATION)
    common: dict[str, Any] = dict(
        use=cfg.use,
        vector_tasks=names,
        eval_tasks=sel.eval_tasks,
        transfer=sel.transfer,
        base_path=str(base),
        model_paths=[str(m) for m in models],
    )
    plan = plan_merge(base, models)
    if cfg.method != "nps":
        from npstune.search.params import MethodSpace

        space = MethodSpace(
            cfg.method,
            cfg.params,
            cfg.per_task,
            len(models),
            cfg.source or "search",
            cfg.prune,
        )
        payload: Payload = MethodPayload(
            space=space, method=cfg.method, n=plan.n, evaluator=recipe.build(), **common
        )
    else:
        payload = _nps_payload(cfg, plan, names, recipe, common, say)
    if use.needs_references:  # normalization reference: each fine-tuned model
        payload.references[CALIBRATION] = payload.objective().individual(CALIBRATION)
        if payload.recipe is not None:
            payload.evaluator = None  # the driver holds no model during the search
    say(f"objective ready in {time.perf_counter() - t0:.1f} s")
    return payload


def _nps_payload(
    cfg: SearchConfig,
    plan: Any,
    names: list[str],
    recipe: EvaluatorRecipe,
    common: dict[str, Any],
    say: Callable[[str], None],
) -> Payload:
    """The NPS search's payload on the path the memory estimate (or ``nps.candidates``)
    picks: every task vector ranked in RAM, or nothing per entry (streamed)."""
    from npstune.search.stream import StreamPayload, choose_path

    T = len(plan.models)
    choice = choose_path(cfg.nps.candidates, plan.n, T)
    say(f"candidates: {choice.reason}")
    space = ParamSpace(cfg.nps, T)
    if choice.path == "stream":
        base = plan.base
        frozen = sum(
            plan.numel[k] for k in plan.copy_keys if base.dtype(k).is_floating_point
        )
        return StreamPayload(  # the evaluator is built where it runs (a trial)
            space=space,
            n=plan.n,
            frozen=frozen,
            candidates="stream",
            recipe=recipe,
            sketch_dir=str(cfg.out.resolve() / "state" / "sketches"),
            **common,
        )
    ranked = []
    for t, tv in enumerate(plan.task_vectors()):
        ranked.append(RankedTaskVector(tv.to_dict(), cfg.nps.subspaces))
        say(f"ranked task vector {t + 1}/{T} ({names[t]}, n={ranked[-1].n:,})")
    keys = ranked[0].keys
    base_flat = torch.cat([plan.base[k].reshape(-1).float() for k in keys])
    dtypes = {k: plan.base.dtype(k) for k in keys}
    rest = {k: plan.base[k].clone() for k in plan.base.keys() if k not in set(keys)}
    frozen = sum(v.numel() for v in rest.values() if v.is_floating_point())
    return ObjectivePayload(
        space=space,
        ranked=ranked,
        base_flat=base_flat,
        base_rest=rest,
        dtypes=dtypes,
        n=plan.n,
        frozen=frozen,
        candidates="memory",
        evaluator=recipe.build(),
        **common,
    )


def resolve_models(cfg: SearchConfig, zoo: Any) -> tuple[str, list[str], list[str]]:
    """(base path, model paths, task names) from the zoo or the explicit paths."""
    if cfg.models:
        names = list(cfg.tasks) if cfg.tasks else [_stem(m) for m in cfg.models]
        if len(names) != len(cfg.models):
            raise ConfigError(
                f"tasks names {len(names)} tasks for {len(cfg.models)} models"
            )
        base = cfg.base or str(zoo.base_path)
        return str(base), [str(m) for m in cfg.models], names
    names = list(cfg.tasks or zoo.tasks)
    models = [str(zoo.task(t).model_path) for t in names]
    return str(cfg.base or zoo.base_path), models, names


def _stem(path: str) -> str:
    from npstune.checkpoints import checkpoint_name

    return checkpoint_name(path)


# ---------------------------------------------------------------------------- objective
class BaseObjective:
    """What every search's objective shares: the use's scoring of states."""

    p: Any

    def __init__(self, payload: Any) -> None:
        self.p = payload
        self.space = payload.space
        self.use = get_use(payload.use)

    def states(
        self, cand: Any
    ) -> Iterable[tuple[list[str], Mapping[str, torch.Tensor]]]:
        """(tasks to score, state) pairs of a candidate, one at a time."""
        raise NotImplementedError

    def bits(self, cand: Any) -> int:
        """The paper's storage bits of what a candidate keeps."""
        raise NotImplementedError

    def score(
        self,
        cand: Any,
        split: str = CALIBRATION,
        evaluator: Evaluator | None = None,
    ) -> dict[str, float]:
        """Every metric of one candidate (``objective`` is the one searched)."""
        ev = evaluator or self.p.get_evaluator()
        accs: dict[str, float] = {}
        t_build = t_eval = 0.0
        t0 = time.perf_counter()
        for tasks, state in self.states(cand):
            t1 = time.perf_counter()
            t_build += t1 - t0
            accs.update(evaluate_many(ev, state, tasks, split))
            t0 = time.perf_counter()
            t_eval += t0 - t1
        out = self.aggregate(accs, split)
        out.update(storage_bits=float(self.bits(cand)), build_s=t_build, eval_s=t_eval)
        k = getattr(cand, "k", None)
        if k is None and hasattr(cand, "params"):
            k = cand.params.get("k")
        if isinstance(k, (int, float)):
            out["k"] = float(k)
        return out

    def aggregate(self, accs: Mapping[str, float], split: str) -> dict[str, float]:
        """Per-task accuracies -> the use's objective plus its parts."""
        return self.use.aggregate(
            accs, self.p.references.get(split, {}), self.p.transfer
        )

    def score_state(
        self,
        state: Mapping[str, torch.Tensor],
        split: str,
        evaluator: Evaluator | None = None,
    ) -> dict[str, float]:
        """One shared state (pretrained, a merge) scored on every task of the use."""
        tasks = self.use.scored_tasks(self.p.vector_tasks, self.p.eval_tasks)
        return self.aggregate(
            evaluate_many(evaluator or self.p.get_evaluator(), state, tasks, split),
            split,
        )

    def individual(
        self, split: str, evaluator: Evaluator | None = None
    ) -> dict[str, float]:
        """Each fine-tuned model on its own task (transfer: on every scored task)."""
        from npstune.checkpoints import open_checkpoint

        ev = evaluator or self.p.get_evaluator()
        accs: dict[str, float] = {}
        for task, path in zip(self.p.vector_tasks, self.p.model_paths):
            ck = open_checkpoint(path, base=self.p.base_path)
            state = {k: ck[k] for k in ck.keys()}
            accs.update(
                evaluate_many(
                    ev, state, self.use.individual_tasks(task, self.p.eval_tasks), split
                )
            )
        return accs


class Objective(BaseObjective):
    """NPS candidates on the ranked payload; holds the reusable candidate buffers."""

    def __init__(self, payload: ObjectivePayload) -> None:
        super().__init__(payload)
        n = payload.base_flat.numel()
        self._delta = torch.zeros(n, dtype=torch.float32)
        self._theta = torch.empty(n, dtype=torch.float32)

    def state_from_delta(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ_pre + delta on the delta keys, every other key from the base (views)."""
        torch.add(self.p.base_flat, delta, out=self._theta)
        state = dict(self.p.base_rest)
        for k, v in self.p.ranked[0].unflatten(self._theta).items():
            dt = self.p.dtypes[k]
            state[k] = v if dt == torch.float32 else v.to(dt)
        return state

    def states(
        self, cand: Candidate
    ) -> Iterable[tuple[list[str], dict[str, torch.Tensor]]]:
        """Every state is a view of one reused buffer: use each before asking for the
        next."""
        r = self.p.ranked
        if self.use.per_vector_states:
            for t, task in enumerate(self.p.vector_tasks):
                fuse([r[t]], [cand.weights[t]], cand.k, cand.lam[t], out=self._delta)
                yield [task], self.state_from_delta(self._delta)
        else:
            fuse(r, cand.weights, cand.k, list(cand.lam), out=self._delta)
            yield self.p.eval_tasks, self.state_from_delta(self._delta)

    def bits(self, cand: Any) -> int:
        k = cand.k if isinstance(cand, Candidate) else cand
        return nps_bits(len(self.p.ranked), self.p.n, k)


def nps_bits(tasks: int, n: int, k: float) -> int:
    """The paper's storage bits of T NPS-pruned task vectors of n entries at k."""
    return storage_bits("nps", tasks, n, k, frozen=0).paper_bits


class MethodObjective(BaseObjective):
    """Candidates of any registered method: an in-memory merge per state.

    Workers open the checkpoints by path (on a cluster: shared storage).
    """

    def _merge(
        self, models: list[str], params: dict[str, Any], prune: Any = None
    ) -> Mapping[str, Any]:
        from npstune.merge import merge

        state = merge(
            self.p.base_path, models, self.p.method, params, prune=prune
        ).state
        if state is None:
            raise ConfigError(f"method {self.p.method} returns no single model")
        return state

    def _per_task(self, params: dict[str, Any], t: int) -> dict[str, Any]:
        return {
            k: (v[t : t + 1] if k in self.space.per_task else v)
            for k, v in params.items()
        }

    def states(self, cand: Any) -> Iterable[tuple[list[str], Mapping[str, Any]]]:
        if self.use.per_vector_states:
            for t, (task, path) in enumerate(
                zip(self.p.vector_tasks, self.p.model_paths)
            ):
                yield (
                    [task],
                    self._merge(
                        [path],
                        self._per_task(cand.params, t),
                        cand.prune_step(t, len(self.p.model_paths)),
                    ),
                )
        else:
            yield (
                self.p.eval_tasks,
                self._merge(self.p.model_paths, cand.params, cand.prune_step()),
            )

    def bits(self, cand: Any) -> int:
        from npstune.compress import FAMILIES

        fam = self.p.method if self.p.method in FAMILIES else "merged"
        k = cand.params.get("k") if FAMILIES.get(self.p.method) == "sparse" else None
        return storage_bits(fam, len(self.p.model_paths), self.p.n, k).paper_bits
