"""Search spaces over any registered merge method's declared parameters.

The method's pydantic Params class is the one source of names, types and ranges: a
search file names ``method:`` and gives, per parameter, a fixed value or bounds
``{low, high, init}`` (defaults: the declared range when both ends are inclusive, and
the declared default as the start). ``per_task: [name, ...]`` searches one value per
task for parameters the method accepts as a per-task list. Integers are rounded.

:class:`UnitBox` is the flat-vector view every backend uses (CMA-ES works in
``[0, 1]^n`` so one ``sigma0`` fits every parameter; trials get natural values).
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, SupportsFloat, cast

import numpy as np
from annotated_types import Ge, Gt, Le, Lt

from npstune.errors import ConfigError


@dataclass(frozen=True)
class Param:
    """One searched scalar, with natural bounds and start value."""

    name: str
    low: float
    high: float
    init: float
    integer: bool = False


class UnitBox:
    """A list of :class:`Param` as a flat vector in the unit box."""

    def __init__(self, params: list[Param]) -> None:
        self.params = params
        self.names = [p.name for p in params]
        self._low = np.array([p.low for p in params])
        self._span = np.array([p.high - p.low for p in params])

    @property
    def dim(self) -> int:
        return len(self.params)

    def default_population(self) -> int:
        """CMA-ES's default λ = 4 + ⌊3 ln n⌋."""
        return 4 + int(3 * math.log(max(self.dim, 1)))

    def x0(self) -> np.ndarray:
        """The start point in the unit box."""
        return self.to_unit(self.init_config())

    def to_unit(self, config: Mapping[str, float]) -> np.ndarray:
        x = np.array([float(config[n]) for n in self.names])
        span = np.where(self._span > 0, self._span, 1.0)
        return np.clip((x - self._low) / span, 0.0, 1.0)

    def from_unit(self, x: Sequence[float] | np.ndarray) -> dict[str, float]:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        return {n: float(v) for n, v in zip(self.names, self._low + x * self._span)}

    def init_config(self) -> dict[str, float]:
        return {p.name: p.init for p in self.params}

    def params_of(self, config: Mapping[str, Any]) -> dict[str, float]:
        """Only the searched values of a trial config (drops bookkeeping keys)."""
        return {n: float(config[n]) for n in self.names if n in config}


# ---------------------------------------------------------------- declared parameters
@dataclass(frozen=True)
class Declared:
    """What a method declares about one parameter."""

    name: str
    numeric: bool
    integer: bool
    per_task: bool  # accepts a per-task list
    low: float | None
    high: float | None
    low_open: bool
    high_open: bool
    default: Any


def _types(ann: Any) -> set[Any]:
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_types(a) for a in typing.get_args(ann)))
    if origin in (list, tuple, Sequence):
        return {list}
    if origin is typing.Annotated:
        return _types(typing.get_args(ann)[0])
    return {ann}


def _bound(value: object) -> float:
    """A numeric field bound as a float (annotated_types types the bounds as the
    comparison protocols SupportsGe etc.; method params bound numbers)."""
    return float(cast(SupportsFloat, value))


def declared(params_cls: type) -> dict[str, Declared]:
    """Each field of a method's Params class: type, range, per-task, default."""
    out = {}
    for name, f in params_cls.model_fields.items():  # type: ignore[attr-defined]
        kinds = _types(f.annotation)
        low = high = None
        lo_open = hi_open = False
        for m in f.metadata:
            if isinstance(m, Ge):
                low = _bound(m.ge)
            elif isinstance(m, Gt):
                low, lo_open = _bound(m.gt), True
            elif isinstance(m, Le):
                high = _bound(m.le)
            elif isinstance(m, Lt):
                high, hi_open = _bound(m.lt), True
        numeric = bool(kinds & {float, int}) and bool not in kinds
        out[name] = Declared(
            name,
            numeric,
            int in kinds and float not in kinds,
            list in kinds,
            low,
            high,
            lo_open,
            hi_open,
            f.default,
        )
    return out


@dataclass(frozen=True)
class MethodCandidate:
    """One candidate of a method search: the method's full parameter values, and the
    pruning step in front of it (``{"method", "params"}``; None: no pruning)."""

    params: dict[str, Any]
    prune: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**self.params, **({"prune": self.prune} if self.prune else {})}

    def prune_step(self, task: int | None = None, tasks: int = 1) -> Any:
        """The :class:`~npstune.merge.preprune.Prune` for a merge (``task``: task
        ``task``'s own weight row when the weights are one row per task)."""
        if self.prune is None:
            return None
        from npstune.merge.preprune import Prune

        params = dict(self.prune["params"])
        w, m = params.get("weights"), params.get("subspaces")
        if (
            task is not None
            and w is not None
            and m
            and tasks > 1
            and len(w) == tasks * m
        ):
            params["weights"] = w[task * m : (task + 1) * m]
        return Prune(self.prune["method"], params)


class MethodSpace(UnitBox):
    """The searched parameters of ``method`` over ``tasks`` task vectors.

    Names: ``NAME`` (shared) or ``t{t}_NAME`` (per task).
    """

    def __init__(
        self,
        method: str,
        params: Mapping[str, Any],
        per_task: Sequence[str],
        tasks: int,
        where: str = "search",
        prune: Any = None,
    ) -> None:
        from npstune.merge import get_method

        self.method, self.tasks = method, tasks
        self.prune = prune  # a PruneSpec (npstune.search.space) or None
        self.spec = get_method(method)
        decl = declared(self.spec.params)
        self.fixed: dict[str, Any] = {}
        searched: list[Param] = []
        self.per_task = set(per_task)
        for name in [*params, *per_task]:
            if name not in decl:
                raise ConfigError(
                    f"{where}: method {method} has no parameter "
                    f"{name!r}; valid: {', '.join(decl) or '(none)'}"
                )
        for name in self.per_task:
            if not decl[name].per_task:
                raise ConfigError(
                    f"{where}: per_task: {method}'s {name} takes one "
                    "value, not one per task"
                )
        for name, value in params.items():
            d = decl[name]
            if isinstance(value, Mapping):
                searched += self._bounds(d, value, where)
            elif name in self.per_task:
                raise ConfigError(
                    f"{where}: params.{name}: per_task needs bounds {{low, high}}"
                )
            else:
                self.fixed[name] = value
        for name in self.per_task - set(params):  # per-task with declared bounds
            searched += self._bounds(decl[name], {}, where)
        if prune is not None:
            searched += self._prune_params(prune, where)
        if not searched:
            raise ConfigError(
                f"{where}: params: give bounds {{low, high}} for at least "
                f"one of {method}'s parameters "
                f"({', '.join(n for n, d in decl.items() if d.numeric)})"
            )
        super().__init__(searched)
        self.spec.make_params(self._values(self.init_config()))  # the start is valid
        if prune is not None:
            self.candidate(self.init_config()).prune_step().resolved()
        if prune is not None:
            from npstune.merge.preprune import check_prunable

            check_prunable(self.spec)

    def _prune_params(self, prune: Any, where: str) -> list[Param]:
        """The searched values of the pruning step: ``prune_k`` (``prune_q``) when
        given bounds, NPS's weights ``prune_w{m}`` / ``prune_t{t}_w{m}``."""
        from npstune.merge.preprune import Prune

        decl = declared(Prune(prune.method).spec.params)
        out: list[Param] = []
        for name in ("k", "q"):
            b = getattr(prune, name)
            if b is not None and not isinstance(b, (int, float)):
                d = decl[name]
                ps = self._bounds(
                    d,
                    {"low": b.low, "high": b.high, "init": b.start},
                    where,
                    label=f"prune.{name}",
                    owner=f"the {prune.method} pruning's",
                )
                out += [Param(f"prune_{p.name}", p.low, p.high, p.init) for p in ps]
        if prune.method == "nps":
            ws = prune.weights or _default_weights()
            rows = range(self.tasks) if ws.per_task else [None]
            for t in rows:
                pre = "prune_" if t is None else f"prune_t{t}_"
                out += [
                    Param(f"{pre}w{m}", ws.low, ws.high, ws.init)
                    for m in range(prune.subspaces)
                ]
        return out

    def _prune_values(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        pr = self.prune
        if pr is None:
            return None
        vals: dict[str, Any] = {}
        for name in ("k", "q"):
            b = getattr(pr, name)
            if b is None:
                continue
            vals[name] = (
                float(b)
                if isinstance(b, (int, float))
                else float(config[f"prune_{name}"])
            )
        for name in ("scope", "seed"):
            if getattr(pr, name) is not None:
                vals[name] = getattr(pr, name)
        if pr.method == "nps":
            M = pr.subspaces
            ws = pr.weights or _default_weights()
            rows = (
                [
                    [float(config[f"prune_t{t}_w{m}"]) for m in range(M)]
                    for t in range(self.tasks)
                ]
                if ws.per_task
                else [[float(config[f"prune_w{m}"]) for m in range(M)]]
            )
            vals["subspaces"] = M
            vals["weights"] = [w for row in rows for w in row]
        return {"method": pr.method, "params": vals}

    def _bounds(
        self,
        d: Declared,
        value: Mapping[str, Any],
        where: str,
        label: str | None = None,
        owner: str | None = None,
    ) -> list[Param]:
        label = label or f"params.{d.name}"
        owner = owner or f"{self.method}'s"
        if not d.numeric:
            raise ConfigError(
                f"{where}: {label}: not a numeric parameter of "
                f"{self.method}; give a fixed value"
            )
        extra = set(value) - {"low", "high", "init"}
        if extra:
            raise ConfigError(
                f"{where}: params.{d.name}: unknown key "
                f"{sorted(extra)[0]!r} (expected low, high, init)"
            )
        rng = (
            f"{'(' if d.low_open else '['}{d.low}, {d.high}"
            f"{')' if d.high_open else ']'}"
        )
        low = value.get("low", None if d.low_open else d.low)
        high = value.get("high", None if d.high_open else d.high)
        if low is None or high is None:
            raise ConfigError(
                f"{where}: params.{d.name}: give low and high (declared range {rng})"
            )
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ConfigError(
                f"{where}: params.{d.name}: bounds [{low}, {high}] are "
                "not finite with low <= high"
            )
        for v in (low, high):
            if (d.low is not None and (v < d.low or (d.low_open and v == d.low))) or (
                d.high is not None and (v > d.high or (d.high_open and v == d.high))
            ):
                raise ConfigError(
                    f"{where}: {label}: bound {v:g} is outside "
                    f"{owner} declared range {rng}"
                )
        init = value.get("init")
        if init is None:
            init = (
                d.default
                if isinstance(d.default, (int, float))
                and low <= float(d.default) <= high
                else (low + high) / 2
            )
        init = float(init)
        if not low <= init <= high:
            raise ConfigError(
                f"{where}: params.{d.name}: init {init:g} outside [{low:g}, {high:g}]"
            )
        names = (
            [f"t{t}_{d.name}" for t in range(self.tasks)]
            if d.name in self.per_task
            else [d.name]
        )
        return [Param(n, low, high, init, d.integer) for n in names]

    def _values(self, config: Mapping[str, Any]) -> dict[str, Any]:
        vals: dict[str, Any] = dict(self.fixed)
        for p in self.params:
            if p.name.startswith("prune_"):  # the pruning step's (_prune_values)
                continue
            v: Any = float(config[p.name])
            vals[p.name] = int(round(v)) if p.integer else v
        for name in self.per_task:
            vals[name] = [vals.pop(f"t{t}_{name}") for t in range(self.tasks)]
        return vals

    def candidate(self, config: Mapping[str, Any]) -> MethodCandidate:
        """Natural values (a trial's config) -> the method's parameter values."""
        return MethodCandidate(self._values(config), self._prune_values(config))

    def baseline(self) -> MethodCandidate:
        """The method at its declared defaults (and the file's fixed values), after
        the pruning step at its start with every NPS weight 1 (magnitude pruning)."""
        prune = self._prune_values(
            {**self.init_config(), **{n: 1.0 for n in self.names if "_w" in n}}
        )
        return MethodCandidate(self.spec.make_params(self.fixed).model_dump(), prune)


def _default_weights() -> Any:
    from npstune.search.space import WeightsSpec

    return WeightsSpec()
