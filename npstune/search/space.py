"""Search-space files: YAML -> a validated, immutable :class:`SearchConfig`.

A file says what NPS searches (subspace weights w, optionally the keep ratio k and the
scaling λ, shared or per task), for which use (fusion, transfer, compression), on which
models (a zoo size, or a base and fine-tuned checkpoint paths) and evaluator, with which
backend, budget, seed, resources and tracking store. Unknown keys, bounds with low >
high, missing models are :class:`~npstune.errors.ConfigError` with a one-line message.

Two conveniences keep the ablation files short: ``extends: other.yaml`` deep-merges this
file over another one (paths relative to this file), and ``sweep: {dotted.key:
[values]}`` expands into one config per combination (:func:`load_configs`).

:class:`ParamSpace` maps the searched quantities to a flat vector: CMA-ES works in the
unit box ``[0, 1]^n`` (so one ``sigma0`` fits every parameter), trials get natural
values.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from npstune.errors import ConfigError, first_line
from npstune.search.backends import BACKENDS  # noqa: E402 - light: a name table
from npstune.search.params import Param, UnitBox  # noqa: E402
from npstune.search.uses import USES  # noqa: E402
from npstune.sparsify import DEFAULT_SUBSPACES

# The file's choices come from their registries (a new use or backend is one entry).
# A Literal built at run time is no static type: type checkers see the names as str.
if TYPE_CHECKING:
    Use = str
    Backend = str
else:
    Use = Literal[tuple(USES)]
    Backend = Literal[tuple(BACKENDS)]

#: The one metric every trial reports and every backend optimises (mode "max").
METRIC = "objective"
MODE = "max"


def default_baselines(use: str, method: str) -> list[str]:
    """Baselines in the final table when a file names none (params: DESIGN §8
    defaults): the use's own, then ``nps-w1`` (NPS with every weight 1 at the start k
    and λ: magnitude pruning at the search's own scale) or ``defaults`` (the searched
    method at its declared defaults). Other names are registered merge methods."""
    from npstune.search.uses import get_use

    return [*get_use(use).baselines, "nps-w1" if method == "nps" else "defaults"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Bounds(_Frozen):
    """A searched scalar: ``low <= init <= high`` (init defaults to the middle)."""

    low: float
    high: float
    init: float | None = None

    @model_validator(mode="after")
    def _check(self) -> Bounds:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("bounds must be finite")
        if self.low > self.high:
            raise ValueError(f"bound low {self.low} > high {self.high}")
        if self.init is not None and not self.low <= self.init <= self.high:
            raise ValueError(f"init {self.init} outside [{self.low}, {self.high}]")
        return self

    @property
    def start(self) -> float:
        return (self.low + self.high) / 2 if self.init is None else self.init


class WeightsSpec(_Frozen):
    """Per-subspace weights w: one vector shared by every task, or one per task."""

    per_task: bool = False
    low: float = Field(0.0, ge=0)
    high: float = Field(2.0, gt=0, le=100)
    init: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> WeightsSpec:
        if self.low > self.high:
            raise ValueError(f"bound low {self.low} > high {self.high}")
        if not self.low <= self.init <= self.high:
            raise ValueError(f"init {self.init} outside [{self.low}, {self.high}]")
        return self


class NpsSpec(_Frozen):
    """What NPS searches: M subspaces, weights, keep ratio k and scaling λ."""

    subspaces: int = Field(DEFAULT_SUBSPACES, ge=1, le=255)
    weights: WeightsSpec = WeightsSpec()
    k: float | Bounds = 0.05
    lam: float | Bounds = 1.0
    lam_per_task: bool = False
    #: how candidates are built: ``memory`` (every task vector ranked in RAM, the
    #: fastest), ``stream`` (from the checkpoints, memory bounded by one model), or
    #: ``auto`` (memory when its estimate fits, see npstune.search.stream)
    candidates: Literal["auto", "memory", "stream"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> NpsSpec:
        # the ranges are the nps method's own declaration (npstune.merge.nps)
        from npstune.merge import get_method
        from npstune.search.params import declared

        decl = declared(get_method("nps").params)
        for name, v in (("k", self.k), ("lam", self.lam)):
            d = decl[name]
            vals = [v] if isinstance(v, (int, float)) else [v.low, v.high]
            for x in vals:
                if (
                    d.low is not None and (x < d.low or (d.low_open and x == d.low))
                ) or (d.high is not None and x > d.high):
                    raise ValueError(
                        f"{name} must lie in {'(' if d.low_open else '['}{d.low:g}, "
                        f"{d.high:g}]"
                    )
        return self


class PruneSpec(_Frozen):
    """A pruning step searched in front of the method (``prune: nps`` or a mapping):
    ``k`` (and DARE's ``q``) fixed or bounds; NPS searches its subspace ``weights``
    (one vector shared by every task, or one per task; bounds as the nps: section's);
    ``scope``, ``subspaces`` and DARE's ``seed`` fixed. Unset values take the pruning
    method's declared defaults; its λ is the merge's, never the pruning's."""

    method: str
    k: float | Bounds | None = None
    q: float | Bounds | None = None
    subspaces: int = Field(DEFAULT_SUBSPACES, ge=1, le=255)
    weights: WeightsSpec | None = None
    scope: Literal["global", "tensor"] | None = None
    seed: int | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, data: Any) -> Any:
        return {"method": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check(self) -> PruneSpec:
        from npstune.merge.preprune import Prune, prune_names

        if self.method not in prune_names():
            raise ValueError(
                f"prune: unknown pruning {self.method!r}; valid: "
                f"{', '.join(prune_names())}"
            )
        takes = set(Prune(self.method).names())
        for name in ("q", "weights", "scope", "seed"):
            if getattr(self, name) is not None and name not in takes:
                raise ValueError(
                    f"prune {self.method}: it takes no {name} "
                    f"(its parameters: {', '.join(sorted(takes))})"
                )
        if "subspaces" in self.model_fields_set and self.method != "nps":
            raise ValueError(f"prune {self.method}: subspaces is for prune nps")
        return self


class EvaluatorSpec(_Frozen):
    """How a candidate is scored: any registered evaluator kind.

    Written inline (``evaluator: {kind: causal-lm, tasks: ...}``) or as the path of an
    evaluator file (``evaluator: eval.yaml``, relative to the search file). Keys that
    are not the search's own (below) are the kind's options, validated by the kind
    (:mod:`npstune.evaluate.kinds`); ``root`` is the directory the kind's relative paths
    resolve against (set by the loader). ``calibration_*``/``test_examples`` limit the
    examples scored per task; ``precision`` is the forward passes' autocast
    (:func:`npstune.evaluate.hf.autocast_dtype`).
    """

    kind: str = "zoo"
    model: str | None = None
    batch_size: int = Field(64, ge=1, le=4096)
    calibration_examples: int | None = Field(None, ge=1)
    calibration_fraction: float = Field(1.0, gt=0, le=1)
    test_examples: int | None = Field(None, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    file: str | None = None
    root: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split_options(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        own = set(cls.model_fields) - {"options"}
        out = {k: v for k, v in data.items() if k in own}
        opts = dict(data.get("options") or {})
        opts.update({k: v for k, v in data.items() if k not in own and k != "options"})
        out["options"] = opts
        return out

    @model_validator(mode="after")
    def _check(self) -> EvaluatorSpec:
        from npstune.evaluate.kinds import get_kind
        from npstune.evaluate.spec import one_line

        kind = get_kind(self.kind)  # ConfigError naming the valid kinds
        try:
            kind.options.model_validate(self.options)
        except ValidationError as exc:
            raise ValueError(one_line(exc)) from None
        return self

    def to_file(self) -> Any:
        """This section as an :class:`~npstune.evaluate.spec.EvaluatorFile`."""
        from npstune.evaluate.spec import parse_evaluator

        data: dict[str, Any] = {"kind": self.kind, **self.options}
        if self.model:
            data["model"] = self.model
        return parse_evaluator(data, self.root or ".", self.file or "evaluator")


class TransferSpec(_Frozen):
    """Transfer: the target task's vector is pruned; score pre-tasks and the target."""

    target: str
    pre_tasks: list[str] = Field(min_length=1)


class SearchSettings(_Frozen):
    """Optimizer and budget. ``sigma0`` is a fraction of each parameter's range."""

    backend: Backend = "cma"
    population: int | None = Field(None, ge=2, le=10_000)
    generations: int = Field(20, ge=1, le=100_000)
    seed: int = Field(1, ge=1, lt=2**31)  # pycma: seed 0 means "random"
    sigma0: float = Field(1 / 6, gt=0, le=1)
    penalty: float = 0.0
    max_failures: int = Field(2, ge=0, le=100)


class ResourcesSpec(_Frozen):
    """Per trial: CPUs (also torch threads) and GPUs; trials in flight (default: the
    population). ``gpus_per_trial: auto`` shares the cluster's GPUs between the trials
    in flight when it has any (fractions below 1), and uses none otherwise."""

    cpus_per_trial: float = Field(1.0, gt=0, le=1024)
    gpus_per_trial: Annotated[float, Field(ge=0, le=64)] | Literal["auto"] = "auto"
    concurrency: int | None = Field(None, ge=1, le=10_000)


class TrackingSpec(_Frozen):
    """MLflow store and experiment (default: sqlite:///mlflow.db in the working dir)."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None


class ReportSpec(_Frozen):
    """The final table: baselines (registered merge methods or the names in
    :func:`default_baselines`) with their params, evaluated on the test split."""

    baselines: list[str] | None = None
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    save_model: bool = True


class SearchConfig(_Frozen):
    """One search, as written in a search-space file (see module docstring)."""

    name: str = Field(min_length=1, pattern=r"^[\w.=,+-]+$")
    use: Use = "fusion"
    zoo: Literal["small", "full"] | None = None
    zoo_cache: str | None = None
    tasks: list[str] | None = None
    base: str | None = None
    models: list[str] | None = None
    evaluator: EvaluatorSpec = EvaluatorSpec()
    transfer: TransferSpec | None = None
    method: str = "nps"
    params: dict[str, Any] = Field(default_factory=dict)
    per_task: list[str] = Field(default_factory=list)
    prune: PruneSpec | None = None
    nps: NpsSpec = NpsSpec()
    search: SearchSettings = SearchSettings()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    report: ReportSpec = ReportSpec()
    output_dir: str | None = None
    source: str | None = None  # the file it came from (set by the loader)

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if self.zoo is None and (not self.base or not self.models):
            raise ValueError(
                "missing model: give zoo: small|full, or base: and models:"
            )
        if (
            self.evaluator.kind == "zoo"
            and self.zoo is None
            and not self.evaluator.options.get("zoo")
        ):
            raise ValueError("evaluator kind zoo needs zoo: small|full")
        from npstune.search.uses import get_use

        if get_use(self.use).needs_section != (self.transfer is not None):
            raise ValueError(
                "use transfer needs a transfer: section (and only it does)"
            )
        if self.models is not None and len(self.models) == 0:
            raise ValueError("missing model: models is empty")
        if self.nps.lam_per_task and isinstance(self.nps.lam, (int, float)):
            raise ValueError("lam_per_task needs lam bounds {low, high}")
        from npstune.merge.registry import method_names

        if self.method not in method_names():
            raise ValueError(
                f"method: unknown method {self.method!r}; valid: "
                f"{', '.join(method_names())}"
            )
        if self.method == "nps" and self.prune is not None:
            raise ValueError(
                "method nps: it is a pruning itself; search it with the nps: "
                "section, or put prune: before another method"
            )
        if self.method == "nps" and (self.params or self.per_task):
            raise ValueError(
                "method nps: its search space is the nps: section, not "
                "params:/per_task:"
            )
        if self.method != "nps":
            if "nps" in self.model_fields_set:
                raise ValueError(
                    f"method {self.method}: the nps: section is for "
                    "method nps; give params: bounds instead"
                )
            from npstune.search.params import MethodSpace

            MethodSpace(
                self.method, self.params, self.per_task, 2, "params", self.prune
            )  # names, types and ranges checked now
        return self

    @property
    def out(self) -> Path:
        """The output directory (``npstune_runs/<name>`` unless given)."""
        return Path(self.output_dir or f"npstune_runs/{self.name}")

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def tracking_uri(self) -> str:
        """``tracking.uri`` if the file sets it, else ``$MLFLOW_TRACKING_URI``, else
        ``sqlite:///mlflow.db`` (so a cluster job can point at a server without
        edits)."""
        if "uri" in self.tracking.model_fields_set:
            return self.tracking.uri
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.uri

    @property
    def baselines(self) -> list[str]:
        given = self.report.baselines  # [] is none at all; unset, the defaults
        return list(
            default_baselines(self.use, self.method) if given is None else given
        )

    def with_overrides(self, **values: Any) -> SearchConfig:
        """A copy with dotted keys replaced (``search.backend="nevergrad"``),
        validated."""
        data = self.model_dump(mode="json")
        for key, v in values.items():
            _set_dotted(data, key.replace("__", "."), v)
        return _validate(data, self.source or "<config>")


# ------------------------------------------------------------------------------ loading
def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such search-space file") from None
    except (OSError, yaml.YAMLError) as exc:
        first = first_line(exc)
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    parent = data.pop("extends", None)
    if parent is not None:
        base = _read_yaml((path.parent / str(parent)).resolve())
        base.pop("sweep", None)
        data = _deep_merge(base, data)
    return data


def _deep_merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def _validate(data: dict[str, Any], where: str) -> SearchConfig:
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as exc:
        found: dict[str, list[tuple[str, str]]] = {}
        for e in exc.errors():
            # drop union-branch names (float, Bounds, function-after[...]) from the path
            parts = [str(x) for x in e["loc"]]
            loc = ".".join(p for p in parts if not _BRANCH.match(p)) or "config"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            found.setdefault(loc, []).append((e["type"], msg))
        problems = []
        for loc, errs in found.items():
            # a mapping given where "a number or {low, high}" is allowed: the number
            # branch's complaint is noise next to the mapping's own problem
            keep = [m for t, m in errs if not (len(errs) > 1 and t in _NOISE)] or [
                errs[0][1]
            ]
            problems += [f"{loc}: {m}" for m in keep]
        raise ConfigError(f"{where}: " + "; ".join(dict.fromkeys(problems))) from None


_BRANCH = re.compile(r"^(float|int|str|bool|Bounds|constrained-\w+|[a-z-]+\[.*\])$")
_NOISE = {"float_type", "float_parsing", "int_type", "int_parsing", "literal_error"}


def load_configs(path: str | Path, **overrides: Any) -> list[SearchConfig]:
    """Every search a file describes: one, or one per ``sweep`` combination.

    A sweep variant is named ``<name>-<key>=<value>...`` and writes under
    ``<output_dir>/<variant>``; all variants share the MLflow experiment. A key that
    starts with ``@`` is an axis of *overlays*: each value is a mapping of dotted keys
    set together (``@merge: [{label: ta, method: task-arithmetic, params: {...}}]``;
    ``label`` names the value).
    """
    path = Path(path)
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    data["source"] = str(path)
    _resolve_evaluator(data, path)
    sweep = data.pop("sweep", None) or {}
    if not isinstance(sweep, dict) or not all(
        isinstance(v, list) and v for v in sweep.values()
    ):
        raise ConfigError(
            f"{path}: sweep: expected a mapping of dotted keys to value lists"
        )
    for key, v in overrides.items():
        if v is not None:
            _set_dotted(data, key, v)
    if not sweep:
        return [_check_paths(_validate(data, str(path)), path)]
    out = []
    keys = list(sweep)
    out_dir = data.get("output_dir") or f"npstune_runs/{data['name']}"
    data.setdefault("tracking", {}).setdefault("experiment", data["name"])
    for key in keys:
        if key.startswith("@") and not all(isinstance(v, dict) for v in sweep[key]):
            raise ConfigError(
                f"{path}: sweep.{key}: an overlay axis takes mappings of dotted keys"
            )
    for combo in itertools.product(*(sweep[k] for k in keys)):
        variant = copy.deepcopy(data)
        label = "-".join(
            f"{k.split('.')[-1].lstrip('@')}={_short(v)}" for k, v in zip(keys, combo)
        )
        for k, v in zip(keys, combo):
            if k.startswith("@"):
                for dk, dv in v.items():
                    if dk != "label":
                        _set_dotted(variant, dk, copy.deepcopy(dv))
            else:
                _set_dotted(variant, k, v)
        variant["name"] = f"{data['name']}-{label}"
        variant["output_dir"] = str(Path(out_dir) / label)
        out.append(_check_paths(_validate(variant, f"{path} [{label}]"), path))
    return out


def load_config(path: str | Path, **overrides: Any) -> SearchConfig:
    """The single search a file describes (ConfigError if it holds a sweep)."""
    cfgs = load_configs(path, **overrides)
    if len(cfgs) != 1:
        raise ConfigError(
            f"{path}: holds a sweep of {len(cfgs)} searches; use load_configs"
        )
    return cfgs[0]


def _short(v: Any) -> str:
    if isinstance(v, dict):  # an overlay or a section: its label, method or name
        return str(v.get("label") or v.get("method") or v.get("name") or "value")
    return f"{v:g}" if isinstance(v, float) else str(v)


def _resolve_evaluator(data: dict[str, Any], path: Path) -> None:
    """``evaluator: FILE`` -> the file's keys; set ``root`` for relative paths."""
    ev = data.get("evaluator")
    if isinstance(ev, str):
        ev_path = (path.parent / ev).resolve()
        try:
            loaded = yaml.safe_load(ev_path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: evaluator file {ev_path} not found") from None
        except (OSError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "error"
            raise ConfigError(f"{ev_path}: not valid YAML ({first})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{ev_path}: expected a mapping with kind: and tasks:")
        data["evaluator"] = {
            **loaded,
            "file": str(ev_path),
            "root": str(ev_path.parent),
        }
    elif isinstance(ev, dict):
        ev.setdefault("root", str(path.resolve().parent))


def _check_paths(cfg: SearchConfig, path: Path) -> SearchConfig:
    for p in ([cfg.base] if cfg.base else []) + list(cfg.models or []):
        if not Path(p).exists():
            raise ConfigError(f"{path}: missing model: {p} does not exist")
    return cfg


# -------------------------------------------------------------------------- the vector
@dataclass(frozen=True)
class Candidate:
    """One NPS candidate: a weight row per task vector, keep ratio, λ per task
    vector."""

    weights: tuple[tuple[float, ...], ...]
    k: float
    lam: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "weights": [list(r) for r in self.weights],
            "k": self.k,
            "lam": list(self.lam),
        }


class ParamSpace(UnitBox):
    """The searched quantities of ``nps`` over ``tasks`` task vectors as a flat vector.

    Names: ``w{m}`` (shared) or ``t{t}_w{m}`` (per task), ``k``, ``lam`` or
    ``t{t}_lam``.
    """

    def __init__(self, nps: NpsSpec, tasks: int) -> None:
        self.nps, self.tasks = nps, tasks
        M, ws = nps.subspaces, nps.weights
        params: list[Param] = []
        rows = range(tasks) if ws.per_task else [None]
        for t in rows:
            prefix = "" if t is None else f"t{t}_"
            params += [
                Param(f"{prefix}w{m}", ws.low, ws.high, ws.init) for m in range(M)
            ]
        if isinstance(nps.k, Bounds):
            params.append(Param("k", nps.k.low, nps.k.high, nps.k.start))
        if isinstance(nps.lam, Bounds):
            lam = nps.lam
            names = [f"t{t}_lam" for t in range(tasks)] if nps.lam_per_task else ["lam"]
            params += [Param(n, lam.low, lam.high, lam.start) for n in names]
        super().__init__(params)

    def candidate(self, config: Mapping[str, Any]) -> Candidate:
        """Natural values (a trial's config) -> the candidate they describe."""
        M, nps = self.nps.subspaces, self.nps
        if nps.weights.per_task:
            rows = [
                tuple(float(config[f"t{t}_w{m}"]) for m in range(M))
                for t in range(self.tasks)
            ]
        else:
            rows = [tuple(float(config[f"w{m}"]) for m in range(M))] * self.tasks
        k = float(config["k"]) if isinstance(nps.k, Bounds) else float(nps.k)
        if isinstance(nps.lam, Bounds):
            lam = (
                tuple(float(config[f"t{t}_lam"]) for t in range(self.tasks))
                if nps.lam_per_task
                else (float(config["lam"]),) * self.tasks
            )
        else:
            lam = (float(nps.lam),) * self.tasks
        return Candidate(tuple(rows), k, lam)

    def baseline(self) -> Candidate:
        """Plain magnitude pruning at the start k and λ: every weight 1."""
        c = self.candidate(self.init_config())
        return Candidate(
            tuple((1.0,) * self.nps.subspaces for _ in range(self.tasks)), c.k, c.lam
        )
