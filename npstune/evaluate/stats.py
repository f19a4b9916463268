"""Calibration statistics for data-driven merges (Fisher, RegMean), behind one protocol.

An evaluator that can give gradients or linear-layer inputs implements
:class:`CalibrationStats`; ``npstune.merge.fisher`` / ``regmean`` only ever call these
two methods, so they work with every such kind (the zoo, ``text-classification``,
``causal-lm``):

- ``fisher``: the diagonal empirical Fisher, the mean over examples of
  (∂ loss(x, y) / ∂θ)², one example per backward pass, with the task's own head/loss;
- ``grams``: Σ xᵀx (float64) of the inputs of every ``nn.Linear`` whose weight key is
  asked for, over the non-padding tokens.

``state`` is the model's own checkpoint (keys as in the evaluator's states); ``keys``
the tensor keys wanted; ``examples`` how many calibration examples to use at most.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from npstune.evaluate.base import State

DEFAULT_EXAMPLES = 256


@runtime_checkable
class CalibrationStats(Protocol):
    """Per-task statistics for Fisher / RegMean (see module docstring)."""

    def fisher(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Diagonal empirical Fisher of ``state`` on ``task``'s calibration examples."""
        ...

    def grams(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Σ xᵀx of the inputs of each linear layer whose weight key is in ``keys``."""
        ...


def diagonal_fisher(
    module: nn.Module, names: Mapping[str, str], losses: Iterable[Callable[[], Tensor]]
) -> dict[str, Tensor]:
    """Mean of squared gradients over per-example losses.

    ``names`` maps a state key to the module's parameter name; each element of
    ``losses`` runs one example's forward pass and returns its scalar loss.
    """
    params = dict(module.named_parameters())
    wanted = {k: params[n] for k, n in names.items() if n in params}
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    for p in wanted.values():
        p.requires_grad_(True)
    acc = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in wanted.items()}
    count = 0
    try:
        with torch.enable_grad():
            for loss_fn in losses:
                grads = torch.autograd.grad(
                    loss_fn(), list(wanted.values()), allow_unused=True
                )
                for k, g in zip(wanted, grads):
                    if g is not None:
                        acc[k] += g.detach().float() ** 2
                count += 1
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return {k: (a / max(count, 1)).cpu() for k, a in acc.items()}


def linear_grams(
    module: nn.Module,
    names: Mapping[str, str],
    batches: Iterable[tuple[Callable[[], object], Tensor]],
) -> dict[str, Tensor]:
    """Σ xᵀx (float64) of each listed linear layer's inputs over the masked tokens.

    ``names`` maps a weight's state key to its module's parameter name
    (``"...dense.weight"``); each element of ``batches`` is (run the forward pass,
    token mask [B, L] of the rows that count).
    """
    mods = dict(module.named_modules())
    grams: dict[str, Tensor] = {}
    current: dict[str, Tensor] = {}
    hooks = []
    for key, pname in names.items():
        mod = mods.get(pname.rsplit(".", 1)[0]) if pname.endswith(".weight") else None
        if not isinstance(mod, nn.Linear):
            continue

        def hook(
            _m: nn.Module, inputs: tuple[Tensor, ...], _o: object, key: str = key
        ) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            m = current["mask"]
            if m.numel() == x.shape[0]:
                x = x[m]
            x = x.double()
            g = x.T @ x
            grams[key] = grams[key] + g if key in grams else g

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for run, mask in batches:
                current["mask"] = mask.reshape(-1).bool()
                run()
    finally:
        for h in hooks:
            h.remove()
    return {k: g.cpu() for k, g in grams.items()}
