"""The merge engine: one method = typed params + an optional global pass + a chunk
kernel.

A method's ``prepare(inputs, params)`` runs the streaming statistics passes a global
method needs (thresholds, partitions) and returns a context; its ``kernel(ctx, chunk)``
maps one chunk of every task vector to the merged delta of that chunk (compute dtype),
and a pruning method returns each task's keep mask of the chunk with it
(:class:`~npstune.merge.masks.KernelOut`). The engine walks keys in sorted order and
chunks in row-major order — the position order every tie-break uses — adds the delta to
the base, casts to the base's dtype and writes it, and streams the masks to an optional
sink (``run_merge(..., masks=sink)``), so memory stays near a chunk per checkpoint
whatever the model size.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from npstune.checkpoints import CheckpointWriter
from npstune.errors import ConfigError
from npstune.merge.masks import Block, KernelOut, MaskCounts, MaskSink, tee
from npstune.taskvector import Chunk, MergePlan

if TYPE_CHECKING:
    from npstune.merge.preprune import Prune

Scope = Literal["global", "tensor"]


class MethodParams(BaseModel):
    """Base of every method's parameters: immutable, unknown fields are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


P = TypeVar("P", bound=MethodParams)


@dataclass
class MergeInputs:
    """What a method's global pass may read: the plan, a device, optional data."""

    plan: MergePlan
    device: str | torch.device = "cpu"
    data: Any = None  # data-driven methods (Fisher, RegMean): an evaluator / zoo

    @property
    def tasks(self) -> int:
        return len(self.plan.models)

    def joint_scores(
        self, tasks: list[int] | None = None
    ) -> Callable[[], Iterator[tuple[torch.Tensor, ...]]]:
        """A re-iterable source of (|τ_t| for t in ``tasks``) chunk tuples, reading the
        base once per chunk for all the tasks (for
        :func:`~npstune.sparsify.select_streams`)."""
        ts = list(range(self.tasks)) if tasks is None else tasks
        return lambda: self.plan.joint_score_chunks(ts, None, self.device)


@dataclass(frozen=True)
class MergeSpec(Generic[P]):
    """Ties a method's name, params, passes and paper together."""

    name: str
    params: type[P]
    kernel: Callable[[Any, Chunk], torch.Tensor | KernelOut]
    prepare: Callable[[MergeInputs, P], Any] = lambda inputs, p: p
    paper: str = ""
    summary: str = ""
    #: methods that rank within a tensor get whole tensors instead of chunks
    whole_tensor: Callable[[P], bool] = lambda p: False
    needs_data: bool = False
    #: the kernel gives the same values on any split of a read chunk into consecutive
    #: blocks (so the engine may work through a read chunk in cache-sized blocks)
    blockwise: bool = True
    #: a method with outputs of its own (EMR: one model per task) replaces the engine:
    #: ``runner(plan, params, out, device=, progress=, metadata=, masks=) ->
    #: MergeResult``
    runner: Callable[..., MergeResult] | None = None
    #: whole-tensor kernels that take each τ_t once, in order (the SVD merges, WUDI):
    #: the engine reads their tensors lean (``MergePlan.read_chunk(lean=True)``), the
    #: models' reads kept and each τ_t made when the kernel asks for it
    lean_read: bool = False

    def make_params(self, values: dict[str, Any] | MethodParams | None = None) -> P:
        """Validate ``values`` against this method's params
        (ConfigError on bad input)."""
        if isinstance(values, self.params):
            return values
        try:
            return self.params.model_validate(dict(values or {}))
        except ValidationError as exc:
            problems: dict[str, list[str]] = {}
            for e in exc.errors():
                # the field and list positions; union branches' type tags dropped
                parts = [
                    str(x)
                    for i, x in enumerate(e["loc"])
                    if i == 0 or isinstance(x, int)
                ]
                loc = ".".join(parts) or "params"
                msg = e["msg"]
                if e["type"] == "extra_forbidden":
                    valid = ", ".join(sorted(self.params.model_fields)) or "none"
                    msg = f"not a parameter of {self.name} (valid: {valid})"
                problems.setdefault(loc, []).append(msg)
            said = []
            for loc, msgs in problems.items():
                # a value of one union branch's type: its own complaint, not the
                # other branches' "should be a valid list/number"
                real = [m for m in msgs if not m.startswith("Input should be a valid")]
                said.append(f"{loc}: {'; '.join(dict.fromkeys(real or msgs))}")
            raise ConfigError(f"{self.name}: " + "; ".join(said)) from None


@dataclass
class MergeResult:
    """What a merge returns: the merged state (in memory) or the path written, plus
    meta.

    ``masks`` summarises the keep masks of a pruning method: ``{task name: {key: kept
    entries}}`` (task names as ``plan.task_names``); None for methods that keep no mask.
    The masks themselves stream to ``run_merge(..., masks=sink)``."""

    state: dict[str, torch.Tensor] | None
    path: Path | None
    meta: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, dict[str, int]] | None = None


def run_merge(
    plan: MergePlan,
    spec: MergeSpec[Any],
    params: dict[str, Any] | MethodParams | None = None,
    out: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    data: Any = None,
    progress: bool = False,
    metadata: dict[str, str] | None = None,
    out_format: OutFormat = "model",
    masks: MaskSink | None = None,
    prune: Prune | None = None,
) -> MergeResult:
    """Merge ``plan``'s models with ``spec`` into ``out`` (or into memory when ``out``
    is None).

    ``prune``: a pruning step in front of the method
    (:class:`~npstune.merge.preprune.Prune`, e.g. ``Prune("nps", {"k": 0.1})``): the
    method merges the pruned task vectors; ``meta["prune"]`` reports what it kept.

    ``out_format="adapter"`` (``average``/``task-arithmetic`` of LoRA adapters only)
    writes the merge as one exact PEFT LoRA adapter directory instead of a full model.
    ``masks``: a :class:`~npstune.merge.masks.MaskSink` that receives every task's keep
    mask of every merged block, in position order (pruning methods; see
    :mod:`npstune.merge.masks` for which mask each method reports).
    """
    p = spec.make_params(params)
    if out_format not in OUT_FORMATS:
        raise ConfigError(
            f"--out-format {out_format!r}: expected one of {', '.join(OUT_FORMATS)}"
        )
    if out_format == "adapter":
        adapter_weights(spec.name, p, len(plan.models))  # refuse other methods first
        if out is None:
            raise ConfigError(
                "--out-format adapter needs an output directory (out=...)"
            )
        from npstune.checkpoints.adapter import check_adapter_out, check_combinable

        check_adapter_out(out)
        check_combinable(plan.models)
    if prune is not None:
        from npstune.merge.preprune import check_prunable

        check_prunable(spec)
        if out_format == "adapter":
            raise ConfigError(
                "--prune with --out-format adapter: a pruned merge is not low rank"
            )
        metadata = {  # describe() validates: bad pruning parameters fail here
            **(metadata or {}),
            "npstune_prune": json.dumps(prune.describe(), sort_keys=True),
        }
    if spec.needs_data and data is None:
        raise ConfigError(
            f"{spec.name} needs calibration data: pass --zoo SIZE (or data=...)"
        )
    t0 = time.perf_counter()
    if prune is not None:
        from npstune.merge.preprune import pruned_plan

        plan = pruned_plan(plan, prune, device)
    if spec.runner is not None:
        res = spec.runner(
            plan,
            p,
            out,
            device=device,
            progress=progress,
            metadata=metadata,
            masks=masks,
        )
        if prune is not None:
            res.meta["prune"] = plan.report()  # type: ignore[attr-defined]
        return res
    inputs = MergeInputs(plan, device, data)
    ctx = spec.prepare(inputs, p)
    t_prepare = time.perf_counter() - t0
    whole = spec.whole_tensor(p)
    on_cpu = torch.device(device).type == "cpu"
    block = KERNEL_BLOCK if spec.blockwise and on_cpu else None
    state: dict[str, torch.Tensor] | None = None if out is not None else {}
    meta_out = {"npstune_method": spec.name, "npstune_params": p.model_dump_json()}
    meta_out.update(metadata or {})
    counts = MaskCounts(len(plan.models))
    sink = tee(counts, masks)
    seen_masks = False

    def merge_key(key: str, write: Callable[[str, torch.Tensor, int], None]) -> None:
        # a function of its own: its last block (the chunk read and the merged values,
        # a whole tensor for whole-tensor methods) is freed before the next key's read
        nonlocal seen_masks
        for blk in merged_blocks(plan, spec, ctx, key, whole, device, block):
            write(key, blk.merged.cpu(), blk.start)
            for t, m in enumerate(blk.masks):
                sink(t, key, blk.start, m)
            seen_masks |= bool(blk.masks)

    def produce(write: Callable[[str, torch.Tensor, int], None]) -> None:
        keys = plan.keys
        bar = progress_bar(keys, progress, f"merge {spec.name}")
        delta_keys = set(plan.delta_keys)
        for key in bar:
            if key not in delta_keys:
                write(key, plan.base[key], 0)
                continue
            merge_key(key, write)

    if out is None:
        assert state is not None
        shapes = plan.specs

        def to_memory(key: str, t: torch.Tensor, start: int) -> None:
            shape, dtype = shapes[key]
            if start == 0 and t.numel() == math.prod(shape):
                state[key] = t.reshape(shape).clone()
            else:
                full = state.setdefault(key, torch.empty(shape, dtype=dtype))
                full.view(-1)[start : start + t.numel()] = t.reshape(-1)

        produce(to_memory)
    elif out_format == "adapter":
        rank = _write_adapter(plan, spec, p, ctx, out, whole, device, block, meta_out)
    else:
        with CheckpointWriter(out, plan.base, plan.specs, meta_out) as writer:
            produce(writer.write)
    meta = {
        "method": spec.name,
        "out_format": out_format,
        "params": p.model_dump(),
        "tasks": [m.name for m in plan.models],
        "n": plan.n,
        "prepare_s": t_prepare,
        "total_s": time.perf_counter() - t0,
    }
    if hasattr(ctx, "report"):  # a method's own figures (consensus: the kept consensus)
        meta.update(ctx.report())
    elif seen_masks:  # kept entries per task, from the masks the engine streamed
        kept = counts.totals()
        meta["kept"] = kept
        meta["density"] = [k / plan.n if plan.n else 0.0 for k in kept]
    if out_format == "adapter":
        meta["rank"] = rank
    if prune is not None:
        meta["prune"] = plan.report()  # type: ignore[attr-defined]
    return MergeResult(
        state,
        Path(out) if out is not None else None,
        meta,
        counts.summary(plan.task_names) if seen_masks else None,
    )


OutFormat = Literal["model", "adapter"]
OUT_FORMATS: tuple[str, ...] = ("model", "adapter")

#: methods whose merge of LoRA adapters is again low rank: each task's weight on B·A
ADAPTER_METHODS: dict[str, Callable[[Any, int], list[float]]] = {
    "average": lambda p, tasks: [1.0 / tasks] * tasks,
    "task-arithmetic": lambda p, tasks: [float(p.lam)] * tasks,
}


def adapter_weights(method: str, params: Any, tasks: int) -> list[float]:
    """Per-task weights w_t of Σ_t w_t·B_t·A_t for ``--out-format adapter``."""
    if method not in ADAPTER_METHODS:
        raise ConfigError(
            f"--out-format adapter: method {method!r} does not keep a "
            f"low-rank result; allowed: {', '.join(ADAPTER_METHODS)}"
        )
    return ADAPTER_METHODS[method](params, tasks)


def _write_adapter(
    plan: MergePlan,
    spec: MergeSpec[Any],
    p: MethodParams,
    ctx: Any,
    out: str | os.PathLike[str],
    whole: bool,
    device: str | torch.device,
    block: int | None,
    metadata: dict[str, str],
) -> dict[str, int]:
    """Write the merge as one LoRA adapter; full tensors (``modules_to_save``) get the
    method's merged values, exactly as the full-model output holds them."""
    from npstune.checkpoints.adapter import check_combinable, write_combined_adapter

    adapters = check_combinable(plan.models)
    delta = set(plan.delta_keys)

    def full_value(key: str) -> torch.Tensor:
        if key not in delta:
            return plan.base[key]
        shape, dtype = plan.base.shape(key), plan.base.dtype(key)
        t = torch.empty(plan.numel[key], dtype=dtype)
        blocks = merged_blocks(plan, spec, ctx, key, whole, device, block)
        for blk in blocks:
            t[blk.start : blk.stop] = blk.merged.cpu()
        return t.reshape(shape)

    weights = adapter_weights(spec.name, p, len(adapters))
    cfg = write_combined_adapter(
        out, adapters, weights, delta, full_value, str(plan.base.path), metadata
    )
    return {"r": int(cfg["r"]), **{k: int(v) for k, v in cfg["rank_pattern"].items()}}


#: Elements per kernel call in a merge: a 4 Mi-element read is worked through in blocks
#: whose float64 temporaries stay in the CPU's L2 cache (the prepare passes, bound by
#: reads and histograms, keep the big chunks).
KERNEL_BLOCK = 1 << 18


def merged_blocks(
    plan: MergePlan,
    spec: MergeSpec[Any],
    ctx: Any,
    key: str,
    whole: bool,
    device: str | torch.device = "cpu",
    block: int | None = None,
) -> Iterator[Block]:
    """The merged values of one delta tensor, block by block, in position order: a
    :class:`~npstune.merge.masks.Block` (start, stop, chunk, θ_base + delta in the
    base's dtype on ``device``, the per-task keep masks). One block when ``whole``; else
    one per read chunk, or per ``block`` elements of it when ``block`` is given."""
    n = plan.numel[key]
    for start, stop in [(0, n)] if whole and n else plan.chunks(key):
        chunk = plan.read_chunk(key, start, stop, device, lean=whole and spec.lean_read)
        step = stop - start if whole or not block else block
        for lo in range(0, stop - start, step):
            c = chunk if step >= stop - start else chunk.slice(lo, lo + step)
            out = spec.kernel(ctx, c)
            delta, masks = (
                (out.delta, out.masks) if isinstance(out, KernelOut) else (out, ())
            )
            yield Block(c.start, c.stop, c, (c.base_cd + delta).to(c.base.dtype), masks)


def progress_bar(items: list[str], enabled: bool, desc: str) -> Any:
    """``items`` wrapped in a tqdm bar over tensors when ``enabled``."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False)
