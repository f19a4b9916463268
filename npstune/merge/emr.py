"""EMR-Merging: one elected task vector, plus a mask and a rescaler per task.

Paper: Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging (NeurIPS
2024), https://arxiv.org/abs/2405.17461 (fusion_bench ``emr_merge``). Every float key,
element by element: S = Σ_t τ_t, γ = +1 where S > 0 else −1 (S = 0 counts as −1);
M_t = [τ_t·γ > 0]; τ_uni = γ·max_t |M_t ⊙ τ_t|; λ_t = Σ_keys mean|τ_t| /
Σ_keys mean|M_t ⊙ τ_uni| (a sum of per-tensor means; 0 if the denominator is 0).
Output: T models θ_t' = θ_pre + λ_t·M_t ⊙ τ_uni (inference needs the task id, as TALL).
Scope: per entry; a statistics pass over every key gives λ, a second pass writes the T
models chunk by chunk (``--out DIR``: one checkpoint per task, named after its model).
Storage: τ_uni + T one-bit masks + T scalars (reported in the result's meta).
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from npstune.checkpoints import CheckpointWriter
from npstune.errors import CheckpointError, ConfigError
from npstune.merge.base import MergeResult, MergeSpec, MethodParams, progress_bar
from npstune.merge.masks import MaskCollector, MaskCounts, MaskSink, tee
from npstune.merge.tsv_m import taus64
from npstune.taskvector import Chunk, MergePlan


class EmrParams(MethodParams):
    """EMR has no hyperparameters."""


def elect(taus: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(τ_uni, masks M_t) of one chunk of every task vector."""
    total = taus[0].clone()
    for t in taus[1:]:
        total += t
    gamma = torch.where(total > 0, 1.0, -1.0).to(total.dtype)
    masks = [t * gamma > 0 for t in taus]
    zero = torch.zeros((), dtype=total.dtype)
    uni = torch.zeros_like(total)
    for t, m in zip(taus, masks):
        uni = torch.maximum(uni, torch.where(m, t.abs(), zero))
    return uni.mul_(gamma), masks


def rescalers(plan: MergePlan, device: str | torch.device = "cpu") -> list[float]:
    """λ_t = Σ_keys mean|τ_t| / Σ_keys mean|M_t ⊙ τ_uni| (pass 1, float64)."""
    tasks = len(plan.models)
    num, den = [0.0] * tasks, [0.0] * tasks
    for key in plan.delta_keys:
        kn, kd = [0.0] * tasks, [0.0] * tasks
        for start, stop in plan.chunks(key):
            taus = taus64(plan.read_chunk(key, start, stop, device))
            uni, masks = elect(taus)
            mag = uni.abs_()
            for t in range(tasks):
                kn[t] += float(taus[t].abs().sum())
                kd[t] += float(torch.where(masks[t], mag, 0.0).sum())
        for t in range(tasks):
            num[t] += kn[t] / plan.numel[key]
            den[t] += kd[t] / plan.numel[key]
    return [n / d if d > 0 else 0.0 for n, d in zip(num, den)]


def storage(plan: MergePlan) -> dict[str, float]:
    """Bytes EMR keeps beside θ_pre: τ_uni (base dtypes), T bit-packed masks, T float32
    rescalers. The paper's 32-bit accounting of the same parts (θ_pre included) is
    ``storage_bits("emr", …)`` in :mod:`npstune.compress.accounting`; ``paper_bits``
    here is that number."""
    from npstune.compress.accounting import storage_bits

    tasks, masks = len(plan.models), len(plan.models) * math.ceil(plan.n / 8)
    uni = sum(
        plan.numel[k] * torch.finfo(plan.base.dtype(k)).bits // 8
        for k in plan.delta_keys
    )
    total = uni + masks + 4 * tasks
    return {
        "unified_bytes": uni,
        "mask_bytes": masks,
        "rescaler_bytes": 4 * tasks,
        "total_bytes": total,
        "vs_task_vectors": total / max(1, tasks * uni),
        "paper_bits": storage_bits("emr", tasks, plan.n).paper_bits,
    }


def task_paths(plan: MergePlan, out: str | Path) -> list[Path]:
    """``out/<model name>`` (plus the base's suffix for single-file forms), checked;
    creates the directory ``out``."""
    out = Path(out)
    names = [m.name for m in plan.models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(
            f"emr: two models are named {dup[0]!r}; their outputs in "
            f"{out} would collide (rename one)"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"emr: --out {out} must be a directory (one model per task)")
    if not out.parent.exists():
        raise CheckpointError(f"{out}: parent directory {out.parent} does not exist")
    suffix = plan.base.path.suffix if plan.base.form in ("safetensors", "torch") else ""
    paths = [out / f"{n}{suffix}" for n in names]
    inputs = {Path(c.path).resolve() for c in (plan.base, *plan.models)}
    clash = [p for p in paths if p.resolve() in inputs]
    if clash:
        raise ConfigError(
            f"emr: output {clash[0]} would overwrite an input; choose another --out"
        )
    out.mkdir(exist_ok=True)
    return paths


class _Memory:
    """An in-memory stand-in for a CheckpointWriter (tensors in ``dtype``, default the
    base's)."""

    def __init__(
        self,
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
        dtype: torch.dtype | None = None,
    ) -> None:
        self.specs, self.dtype = specs, dtype
        self.state: dict[str, torch.Tensor] = {}

    def write(self, key: str, t: torch.Tensor, start: int = 0) -> None:
        shape, dt = self.specs[key]
        full = self.state.setdefault(key, torch.empty(shape, dtype=self.dtype or dt))
        full.view(-1)[start : start + t.numel()] = t.reshape(-1)


def emr_merge(
    plan: MergePlan,
    out: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
    metadata: dict[str, str] | None = None,
    masks: MaskSink | None = None,
) -> MergeResult:
    """Write one EMR model per task into directory ``out`` (or keep them in memory).

    The masks M_t stream to ``masks`` (a :class:`~npstune.merge.masks.MaskSink`) chunk
    by chunk, as the merge engine streams a pruning method's; ``MergeResult.masks``
    counts them per task and key. The meta holds ``rescalers`` and ``kept`` (mask sizes)
    per task and ``storage``; in memory (``out`` None) also ``states``, ``masks`` (bool,
    per task and key) and ``unified`` (τ_uni, float64). ``state`` is None: there are T
    models, not one."""
    t0 = time.perf_counter()
    lams = rescalers(plan, device)
    t_prepare = time.perf_counter() - t0
    # the unique task names (``model``, ``model#2`` … where file names repeat, as every
    # zoo's ``tasks/<task>/model`` does): the in-memory states, masks and rescalers are
    # keyed by them; files (``out``) refuse repeated names
    names, specs = plan.task_names, plan.specs
    meta_out = {"npstune_method": "emr", "npstune_params": "{}", **(metadata or {})}
    delta_keys = set(plan.delta_keys)
    paths = None if out is None else task_paths(plan, out)
    counts = MaskCounts(len(names))
    collector = None
    if paths is None:  # in memory: keep the masks too
        collector = MaskCollector(
            {k: specs[k][0] for k in plan.delta_keys}, plan.task_names
        )
    sink = tee(counts, collector, masks)
    unified = _Memory(specs, torch.float64)
    with ExitStack() as stack:
        writers: list[Any] = (
            [_Memory(specs) for _ in names]
            if paths is None
            else [
                stack.enter_context(
                    CheckpointWriter(
                        p, plan.base, specs, {**meta_out, "npstune_task": name}
                    )
                )
                for p, name in zip(paths, names)
            ]
        )
        for key in progress_bar(plan.keys, progress, "merge emr"):
            if key not in delta_keys:
                for w in writers:
                    w.write(key, plan.base[key], 0)
                continue
            for start, stop in plan.chunks(key):
                chunk = plan.read_chunk(key, start, stop, device)
                uni, ms = elect(taus64(chunk))
                for t, (w, m) in enumerate(zip(writers, ms)):
                    upd = torch.where(m, uni, 0.0).mul_(lams[t]).add_(chunk.base_cd)
                    w.write(key, upd.to(chunk.base.dtype).cpu(), start)
                    sink(t, key, start, m)
                if paths is None:
                    unified.write(key, uni.cpu(), start)
    meta: dict[str, Any] = {
        "method": "emr",
        "params": {},
        "tasks": names,
        "n": plan.n,
        "rescalers": dict(zip(names, lams)),
        "kept": counts.totals(),
        "storage": storage(plan),
        "paths": None if paths is None else [str(p) for p in paths],
        "prepare_s": t_prepare,
        "total_s": time.perf_counter() - t0,
    }
    if paths is None:
        meta["states"] = {n: w.state for n, w in zip(names, writers)}
        assert collector is not None
        meta["masks"] = {n: collector.masks[n] for n in names}
        meta["unified"] = unified.state
    return MergeResult(
        None, None if out is None else Path(out), meta, counts.summary(plan.task_names)
    )


def _runner(
    plan: MergePlan, p: EmrParams, out: str | Path | None, **kw: Any
) -> MergeResult:
    return emr_merge(plan, out, **kw)


def _kernel(ctx: Any, chunk: Chunk) -> torch.Tensor:
    raise ConfigError(
        "emr makes one model per task, not one merged model: use "
        "run_merge / npstune merge --method emr --out DIR, or "
        "npstune.merge.emr.emr_merge"
    )


SPEC = MergeSpec(
    "emr",
    EmrParams,
    kernel=_kernel,
    runner=_runner,
    paper="https://arxiv.org/abs/2405.17461",
    summary="elected τ_uni + per-task mask and rescaler: one model per task",
)
