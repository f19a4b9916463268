"""Calibration statistics for data-driven merges (Fisher, RegMean, Tailor, Grafting),
behind two protocols.

An evaluator that can give gradients or linear-layer inputs implements
:class:`CalibrationStats`; ``npstune.merge.fisher`` / ``regmean`` / ``tailor`` only ever
call these two methods, so they work with every such kind (the zoo,
``text-classification``, ``causal-lm``):

- ``fisher``: the diagonal empirical Fisher, the mean over examples of
  (∂ loss(x, y) / ∂θ)², one example per backward pass, with the task's own head/loss;
- ``grams``: Σ xᵀx (float64) of the inputs of every ``nn.Linear`` whose weight key is
  asked for, over the non-padding tokens.

Methods that optimise over θ (``npstune.merge.grafting``) also need the loss gradient
at a state of their choosing, :class:`GradientStats` (the same kinds):

- ``gradients``: the mean over examples of ∂ loss(x, y) / ∂θ at ``state``, with the
  same per-example losses as ``fisher`` (so ``fisher`` is the mean of the squares of
  what ``gradients`` averages).

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


@runtime_checkable
class GradientStats(Protocol):
    """The mean loss gradient at a given state (see module docstring)."""

    def gradients(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Mean over ``task``'s calibration examples of ∂loss/∂θ at ``state``
        (float32, one tensor per key of ``keys`` the model has)."""
        ...


def diagonal_fisher(
    module: nn.Module, names: Mapping[str, str], losses: Iterable[Callable[[], Tensor]]
) -> dict[str, Tensor]:
    """Mean of squared gradients over per-example losses.

    ``names`` maps a state key to the module's parameter name; each element of
    ``losses`` runs one example's forward pass and returns its scalar loss.
    """
    return _gradient_mean(module, names, losses, square=True)


def mean_gradient(
    module: nn.Module, names: Mapping[str, str], losses: Iterable[Callable[[], Tensor]]
) -> dict[str, Tensor]:
    """Mean of the gradients over per-example losses (float32, on the CPU); the
    arguments as for :func:`diagonal_fisher`."""
    return _gradient_mean(module, names, losses, square=False)


def _gradient_mean(
    module: nn.Module,
    names: Mapping[str, str],
    losses: Iterable[Callable[[], Tensor]],
    square: bool,
) -> dict[str, Tensor]:
    """Mean over ``losses`` of g² (``square``) or g, g = ∂loss/∂θ, one backward pass
    per loss, accumulated in float32; the parameters' ``requires_grad`` flags are put
    back afterwards."""
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
                        g = g.detach().float()
                        acc[k] += g**2 if square else g
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
