"""Calibration statistics for the data-driven merges (Fisher, RegMean), from the zoo.

:class:`ZooData` maps each model of a merge to its zoo task, loads it into a body, and
computes per-task statistics on at most ``examples`` calibration examples:

- diagonal (empirical) Fisher: mean over examples of (∂ log p(y|x) / ∂θ)², one example
  per backward pass, with the task's own head;
- RegMean Gram matrices: Σ xᵀx of the inputs of every ``nn.Linear`` of the body, over
  the non-padding tokens.

Merges can also be given precomputed statistics (``{"fisher": [...]}`` /
``{"gram": [...]}``), which is how the tests pin the formulas down.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from npstune.checkpoints import LazyCheckpoint
from npstune.errors import ConfigError

DEFAULT_EXAMPLES = 256


class ZooData:
    """Zoo-backed calibration data for a merge (the ``data`` of data-driven methods)."""

    def __init__(self, zoo: Any, device: str | torch.device = "cpu", examples: int = DEFAULT_EXAMPLES):
        from npstune.evaluate import TextClassificationEvaluator

        self.zoo = zoo
        self.examples = examples
        self.evaluator = TextClassificationEvaluator(zoo, device=device, batch_size=1,
                                                     max_examples=examples)

    def task_of(self, model: LazyCheckpoint) -> str:
        """The zoo task a checkpoint was fine-tuned for (by path, then by name)."""
        path = Path(model.path).resolve()
        for name in self.zoo.tasks:
            mp = Path(self.zoo.task(name).model_path).resolve()
            if path == mp or path.is_relative_to(mp) or mp.is_relative_to(path):
                return name
        if model.name in self.zoo.tasks:
            return model.name
        raise ConfigError(f"{model.path}: not a model of the {self.zoo.size} zoo "
                          f"(tasks: {', '.join(self.zoo.tasks)})")

    def _body(self, model: LazyCheckpoint) -> nn.Module:
        body = self.evaluator._body
        self.evaluator.load_state({k: model[k] for k in model.keys()}, str(model.path))
        return body

    def fisher(self, model: LazyCheckpoint, keys: list[str]) -> dict[str, Tensor]:
        """Diagonal empirical Fisher of ``model`` on its task's calibration examples."""
        task = self.task_of(model)
        body = self._body(model)
        w, b = self.evaluator.head(task)
        batches = self.evaluator.batches(task, "calibration")
        params = dict(body.named_parameters())
        wanted = {k: params[k] for k in keys if k in params}
        for p in body.parameters():
            p.requires_grad_(False)
        for p in wanted.values():
            p.requires_grad_(True)
        fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in wanted.items()}
        from npstune.zoo.model import mean_pool

        count = 0
        with torch.enable_grad():
            for i, (ids, mask) in enumerate(batches.batches):
                label = batches.labels[i : i + ids.shape[0]]
                logits = nn.functional.linear(
                    mean_pool(body(input_ids=ids, attention_mask=mask).last_hidden_state, mask), w, b)
                loss = nn.functional.cross_entropy(logits, label, reduction="sum")
                grads = torch.autograd.grad(loss, list(wanted.values()), allow_unused=True)
                for (k, _), g in zip(wanted.items(), grads):
                    if g is not None:
                        fisher[k] += g.float() ** 2
                count += ids.shape[0]
        for p in wanted.values():
            p.requires_grad_(False)
        return {k: f / max(count, 1) for k, f in fisher.items()}

    def grams(self, model: LazyCheckpoint, keys: list[str]) -> dict[str, Tensor]:
        """Σ xᵀx of the inputs of each linear layer whose weight key is in ``keys``."""
        task = self.task_of(model)
        body = self._body(model)
        batches = self.evaluator.batches(task, "calibration")
        grams: dict[str, Tensor] = {}
        hooks = []
        current: dict[str, Tensor] = {}
        for name, mod in body.named_modules():
            key = f"{name}.weight"
            if isinstance(mod, nn.Linear) and key in keys:
                def hook(_m, inputs, _out, key=key):
                    x = inputs[0].reshape(-1, inputs[0].shape[-1])[current["mask"]].double()
                    grams[key] = grams.get(key, 0) + x.T @ x
                hooks.append(mod.register_forward_hook(hook))
        try:
            with torch.no_grad():
                for ids, mask in batches.batches:
                    current["mask"] = mask.reshape(-1).bool()
                    body(input_ids=ids, attention_mask=mask)
        finally:
            for h in hooks:
                h.remove()
        return grams


def stats_for(data: Any, kind: str, plan: Any) -> list[Mapping[str, Tensor]]:
    """Per-model statistics ``kind`` ("fisher"/"gram"): precomputed or from the zoo."""
    if isinstance(data, Mapping):
        if kind not in data:
            raise ConfigError(f"data has no {kind!r} statistics")
        stats = list(data[kind])
        if len(stats) != len(plan.models):
            raise ConfigError(f"{kind}: expected {len(plan.models)} entries, got {len(stats)}")
        return stats
    fn = data.fisher if kind == "fisher" else data.grams
    return [fn(m, plan.delta_keys) for m in plan.models]


def data_for(zoo_size: str | None, device: Any = "cpu") -> ZooData:
    """The ``--zoo SIZE`` data of ``npstune merge --method fisher|regmean``."""
    if not zoo_size:
        raise ConfigError("this method needs calibration data: pass --zoo small|full")
    from npstune.zoo import load_zoo

    return ZooData(load_zoo(zoo_size), device=device)
