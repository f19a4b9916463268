"""Text classification on the zoo: a body state + the task's own linear head.

Built for searches that score hundreds of candidates: each split is tokenized once,
sorted by length and pre-padded into batches; one model skeleton is kept and each call
only copies the candidate's tensors into it (``load_state_dict``), then runs batched
no-grad inference.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import Tensor, nn

from npstune.errors import ConfigError
from npstune.evaluate.base import State
from npstune.evaluate.stats import (
    DEFAULT_EXAMPLES,
    diagonal_fisher,
    linear_grams,
    mean_gradient,
)
from npstune.zoo import model as zm
from npstune.zoo.core import Zoo
from npstune.zoo.datasets import SPLITS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class TextClassificationEvaluator:
    """Accuracy of a body state on zoo tasks, with each task's fine-tuned head.

    Args:
        zoo: a built :class:`~npstune.zoo.Zoo`.
        device: where inference runs (``"cpu"``, ``"cuda"``, ...).
        batch_size: examples per forward pass.
        max_examples: score only the first N examples of each split (None: all).
        max_len: token limit (default: the zoo recipe's).
        precision: ``auto`` (bf16 autocast on CUDA and on CPUs with native bf16),
            ``fp32`` or ``bf16`` (:func:`npstune.evaluate.hf.autocast_dtype`).
    """

    def __init__(
        self,
        zoo: Zoo,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_examples: int | None = None,
        max_len: int | None = None,
        precision: str = "auto",
    ):
        from npstune.evaluate.kinds import check_precision

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if max_examples is not None and max_examples < 1:
            raise ConfigError(f"max_examples must be >= 1, got {max_examples}")
        self.zoo = zoo
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_examples = max_examples
        self.precision = check_precision(precision)
        self.max_len = max_len or int(zoo.manifest["recipe"]["max_len"])
        body = zm.new_body(zoo.base_path)
        # transformers wraps .to with functools.wraps, which mypy leaves unbound (self)
        self._body = body.to(self.device).eval()  # type: ignore[arg-type]
        self._base_path: Path = zoo.base_path
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._batches: dict[tuple[str, str], zm.Batches] = {}
        self._heads: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def tasks(self) -> list[str]:
        return self.zoo.tasks

    # -- caches ------------------------------------------------------------------------
    def batches(self, task: str, split: str) -> zm.Batches:
        """The tokenized, length-sorted, padded batches of a split (built once)."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        key = (task, split)
        if key not in self._batches:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(str(self._base_path))
            texts, labels = self.zoo.split(task, split)
            if self.max_examples is not None:
                texts, labels = texts[: self.max_examples], labels[: self.max_examples]
            ids = zm.tokenize(self._tokenizer, texts, self.max_len)
            self._batches[key] = zm.Batches.build(
                ids,
                labels,
                self.batch_size,
                self._tokenizer.pad_token_id or 0,
                self.device,
            )
        return self._batches[key]

    def head(self, task: str) -> tuple[Tensor, Tensor]:
        if task not in self._heads:
            w, b = zm.load_head(self.zoo.task(task).head_path)
            self._heads[task] = (w.to(self.device), b.to(self.device))
        return self._heads[task]

    # -- scoring -----------------------------------------------------------------------
    def load_state(self, state: State, source: str = "state") -> None:
        """Copy ``state`` into the kept skeleton (keys checked against the base's)."""
        zm.load_into(self._body, state, source)

    def targets(self) -> dict[str, Tensor]:
        """The body's own tensors by state key: a candidate written there is loaded
        by :meth:`load_state` without a copy."""
        from npstune.evaluate.hf import module_targets

        return module_targets(self._body)

    @torch.inference_mode()
    def _score(self, task: str, split: str) -> float:
        from npstune.evaluate.hf import autocast, fp32_region

        b = self.batches(task, split)
        w, bias = self.head(task)
        correct = 0
        labels = b.labels
        start = 0
        with autocast(self.device, self.precision):  # one weight cast per split
            for ids, mask in b.batches:
                out = self._body(input_ids=ids, attention_mask=mask).last_hidden_state
                with fp32_region(self.device):  # the head in fp32
                    pooled = zm.mean_pool(out.float(), mask)
                    logits = torch.nn.functional.linear(pooled, w, bias)
                n = ids.shape[0]
                correct += int((logits.argmax(-1) == labels[start : start + n]).sum())
                start += n
        return correct / max(1, start)

    def evaluate(self, state: State, task: str, split: str = "test") -> float:
        """Accuracy of ``state`` (body tensors, base keys) on ``task``'s ``split``."""
        self.zoo.task(task)  # a clear error for an unknown task before any work
        self.load_state(state)
        return self._score(task, split)

    def evaluate_many(
        self, state: State, tasks: Iterable[str] | None = None, split: str = "test"
    ) -> dict[str, float]:
        """Accuracy per task, loading ``state`` once (all zoo tasks by default)."""
        names = list(tasks) if tasks is not None else self.zoo.tasks
        for t in names:
            self.zoo.task(t)
        self.load_state(state)
        return {t: self._score(t, split) for t in names}

    # -- calibration statistics (Fisher, RegMean; npstune.evaluate.stats) --------------
    def fisher(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Diagonal empirical Fisher of the task's cross-entropy, one batch a pass
        (build the evaluator with ``batch_size=1`` for one example a pass)."""
        losses = self._losses(state, task, examples, "sum")
        return diagonal_fisher(self._body, {k: k for k in keys}, losses)

    def gradients(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Mean gradient of the task's cross-entropy at ``state``, one batch a pass
        (each batch's mean loss, so the mean over examples for equal batches; one
        example a pass with ``batch_size=1``, as for :meth:`fisher`)."""
        losses = self._losses(state, task, examples, "mean")
        return mean_gradient(self._body, {k: k for k in keys}, losses)

    def _losses(
        self, state: State, task: str, examples: int, reduction: str
    ) -> Iterable[Callable[[], Tensor]]:
        """Load ``state``; then one cross-entropy (``reduction`` over the batch) per
        calibration batch, through the body, mean pooling and the task's head."""
        self.zoo.task(task)
        self.load_state(state)
        w, b = self.head(task)
        body = self._body

        def loss(ids: Tensor, mask: Tensor, y: Tensor) -> Tensor:
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = nn.functional.linear(zm.mean_pool(hidden, mask), w, b)
            return nn.functional.cross_entropy(logits, y, reduction=reduction)

        return (
            functools.partial(loss, ids, mask, y)
            for ids, mask, y in self.batches(task, "calibration").first(examples)
        )

    def grams(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Σ xᵀx of each linear layer's inputs over the non-padding tokens."""
        self.zoo.task(task)
        self.load_state(state)
        body = self._body
        runs = (
            (lambda ids=ids, mask=mask: body(input_ids=ids, attention_mask=mask), mask)
            for ids, mask, _ in self.batches(task, "calibration").first(examples)
        )
        return linear_grams(body, {k: k for k in keys}, runs)

    def on_device(self, device: str) -> TextClassificationEvaluator:
        """The same evaluator on another device (tokenization is redone, once)."""
        return TextClassificationEvaluator(
            self.zoo,
            device=device,
            batch_size=self.batch_size,
            max_examples=self.max_examples,
            max_len=self.max_len,
            precision=self.precision,
        )


def read_body_state(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a body checkpoint: a ``.safetensors`` file or an HF model dir."""
    from npstune.errors import CheckpointError

    p = Path(path)
    if p.is_dir():
        if (p / "model.safetensors").is_file():
            return zm.read_state(p / "model.safetensors")
        raise CheckpointError(f"{p}: no model.safetensors in this directory")
    if p.is_file() and p.suffix == ".safetensors":
        return zm.read_state(p)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    raise CheckpointError(f"{p}: expected a .safetensors file or an HF model directory")


class CheckpointReport(TypedDict):
    """What :func:`evaluate_checkpoint` returns (a plain dict, JSON-ready)."""

    zoo: str
    model: str
    split: str
    accuracy: dict[str, float]
    mean: float
    finetuned: dict[str, float | None]
    normalized: dict[str, float]
    mean_normalized: float | None


def evaluate_checkpoint(
    zoo: Zoo,
    path: str | Path,
    split: str = "test",
    tasks: Iterable[str] | None = None,
    device: str = "cpu",
    precision: str = "auto",
) -> CheckpointReport:
    """Score a body checkpoint on zoo tasks: per-task, mean and normalized accuracy.

    Normalized accuracy is accuracy / the task's fine-tuned accuracy on the same split
    (DESIGN §4). The checkpoint's keys must equal the zoo base's.
    """
    names = list(tasks) if tasks is not None else zoo.tasks
    state = read_body_state(path)
    ev = TextClassificationEvaluator(zoo, device=device, precision=precision)
    ev.load_state(state, str(path))
    acc = {t: ev._score(t, split) for t in (zoo.task(n).name for n in names)}
    ref = {t: zoo.task(t).accuracy.get(f"finetuned_{split}") for t in names}
    norm = {t: acc[t] / r for t, r in ref.items() if r}
    return {
        "zoo": zoo.size,
        "model": str(path),
        "split": split,
        "accuracy": acc,
        "mean": sum(acc.values()) / len(acc),
        "finetuned": ref,
        "normalized": norm,
        "mean_normalized": sum(norm.values()) / len(norm) if norm else None,
    }
