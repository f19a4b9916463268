"""Kind ``text-classification``: a Hugging Face encoder scored with each task's own
head.

```yaml
kind: text-classification
max_length: 128
pooling: mean                  # mean | cls | pooler  (file heads)
tasks:
  sentiment:
    data: {calibration: sst-cal.jsonl, test: sst-test.csv}
    text_field: text
    label_field: label
    label_names: [negative, positive]   # labels are these names or their indices
    head: heads/sentiment.safetensors   # weight [C, H], bias [C] on the pooled output
  topic:
    data: {calibration: topic-cal.parquet, test: topic-test.parquet}
    head: ../finetuned/topic            # a fine-tuned *ForSequenceClassification
    head_keys: ["classifier.*"]         # which of its tensors are the head
```

The evaluated state is the encoder's (the merged body); heads are never merged. A file
head is applied to the pooled last hidden state of ``AutoModel`` (as in the zoo). A
checkpoint head runs ``AutoModelForSequenceClassification`` with the task checkpoint's
config: the body comes from the state (with or without the model's prefix, ``bert.``),
the ``head_keys`` tensors from the task's checkpoint. Splits are tokenized once, sorted
by length and pre-padded; one skeleton per head form is kept and each call only copies
the candidate's tensors in.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from npstune.errors import CheckpointError, ConfigError
from npstune.evaluate.base import State
from npstune.evaluate.hf import autocast, fp32_region, load_into_module, read_state
from npstune.evaluate.kinds import SPLITS, BuildContext, EvaluatorKind, KindOptions
from npstune.evaluate.records import read_records, require
from npstune.evaluate.stats import (
    DEFAULT_EXAMPLES,
    diagonal_fisher,
    linear_grams,
    mean_gradient,
)
from npstune.zoo import model as zm

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class TextTaskSpec(KindOptions):
    """One task of a ``text-classification`` file."""

    data: dict[Literal["calibration", "test"], str] = Field(min_length=1)
    text_field: str = "text"
    label_field: str = "label"
    label_names: list[str] | None = None
    head: str
    head_keys: list[str] = Field(default_factory=lambda: ["classifier.*", "score.*"])


class TextClassificationOptions(KindOptions):
    """The kind's keys: token limit, pooling of file heads, and the tasks."""

    max_length: int = Field(128, ge=2, le=1_000_000)
    pooling: Literal["mean", "cls", "pooler"] = "mean"
    tasks: dict[str, TextTaskSpec] = Field(min_length=1)


@dataclass
class _Head:
    """A task's head: a linear map on the pooled body output, or a full model's head."""

    labels: list[str]
    weight: Tensor | None = None
    bias: Tensor | None = None
    checkpoint: Path | None = None
    tensors: dict[str, Tensor] | None = None  # checkpoint heads: the head's tensors


class TextClassifier:
    """Accuracy of encoder states on labelled text tasks with their own heads."""

    def __init__(self, options: TextClassificationOptions, ctx: BuildContext) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        if ctx.model is None or not (ctx.model / "config.json").is_file():
            raise ConfigError(
                f"{ctx.source}: kind text-classification needs an HF "
                f"model directory with config.json (got {ctx.model})"
            )
        self.o, self.ctx = options, ctx
        self.device = torch.device(ctx.device)
        self.config = AutoConfig.from_pretrained(str(ctx.model))
        self.tokenizer = AutoTokenizer.from_pretrained(str(ctx.model))
        self._body = AutoModel.from_config(self.config).to(self.device).eval()
        self._full: dict[Path, PreTrainedModel] = {}
        self._heads: dict[str, _Head] = {}
        self._batches: dict[tuple[str, str], zm.Batches] = {}
        for t in ctx.tasks if ctx.tasks is not None else self.tasks:
            self._spec(t)
            self.head(t)
            for split in ctx.prepare:
                if split in self._spec(t).data:
                    self.batches(t, split)

    # -- tasks, data and heads ---------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.o.tasks)

    def _spec(self, task: str) -> TextTaskSpec:
        try:
            return self.o.tasks[task]
        except KeyError:
            raise ConfigError(
                f"{self.ctx.source}: unknown task {task!r}; valid: "
                f"{', '.join(self.o.tasks)}"
            ) from None

    def metric(self, task: str) -> str:
        return "accuracy"

    def examples(self, task: str, split: str) -> int:
        return len(self.batches(task, split).labels)

    def head(self, task: str) -> _Head:
        if task not in self._heads:
            self._heads[task] = self._read_head(task)
        return self._heads[task]

    def _read_head(self, task: str) -> _Head:
        spec = self._spec(task)
        path = self.ctx.path(spec.head)
        where = f"{self.ctx.source}, task {task!r}, head"
        if not path.exists():
            raise ConfigError(f"{where}: {path} does not exist")
        if path.is_file() and path.suffix == ".safetensors" and _is_head_file(path):
            w, b = zm.load_head(path)
            names = spec.label_names or _head_labels(path)
            if names is None:
                raise ConfigError(
                    f"{where}: label_names is missing (the head file names no labels)"
                )
            if w.ndim != 2 or b.shape != (w.shape[0],) or len(names) != w.shape[0]:
                raise ConfigError(
                    f"{where}: head {tuple(w.shape)} does not fit "
                    f"{len(names)} label names"
                )
            if w.shape[1] != self.config.hidden_size:
                raise ConfigError(
                    f"{where}: head width {w.shape[1]} != the model's "
                    f"hidden size {self.config.hidden_size}"
                )
            return _Head(list(names), w.to(self.device), b.to(self.device))
        state = read_state(path)
        keys = [
            k for k in state if any(fnmatch.fnmatchcase(k, g) for g in spec.head_keys)
        ]
        if not keys:
            raise ConfigError(
                f"{where}: {path} holds no tensor matching head_keys {spec.head_keys}"
            )
        cfg_dir = path if path.is_dir() else path.parent
        names = spec.label_names or _config_labels(cfg_dir)
        if names is None:
            raise ConfigError(f"{where}: label_names is missing")
        return _Head(list(names), checkpoint=path, tensors={k: state[k] for k in keys})

    def batches(self, task: str, split: str) -> zm.Batches:
        """The tokenized, length-sorted, padded batches of a split (built once)."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        key = (task, split)
        if key not in self._batches:
            spec = self._spec(task)
            if split not in spec.data:
                raise ConfigError(
                    f"{self.ctx.source}, task {task!r}: no {split!r} data file"
                )
            path = self.ctx.path(spec.data[split])
            rows = read_records(path, task, split)
            rows = rows[: self.ctx.limit(split, len(rows))]
            require(rows, [spec.text_field, spec.label_field], path, task, split)
            names = self.head(task).labels
            labels = [
                _label(r[spec.label_field], names, path, task, i)
                for i, r in enumerate(rows, 1)
            ]
            ids = zm.tokenize(
                self.tokenizer,
                [str(r[spec.text_field]) for r in rows],
                self.o.max_length,
            )
            self._batches[key] = zm.Batches.build(
                ids,
                labels,
                self.ctx.batch_size,
                self.tokenizer.pad_token_id or 0,
                self.device,
            )
        return self._batches[key]

    # -- models ------------------------------------------------------------------------
    def _model(self, task: str, state: State) -> PreTrainedModel:
        """The module that scores ``task``, with ``state`` (and its head) loaded."""
        h = self.head(task)
        if h.checkpoint is None:
            load_into_module(self._body, state, "state")
            return self._body
        m = self._full.get(h.checkpoint)
        if m is None:
            from transformers import AutoConfig, AutoModelForSequenceClassification

            d = h.checkpoint if h.checkpoint.is_dir() else h.checkpoint.parent
            cfg = (
                AutoConfig.from_pretrained(str(d))
                if (d / "config.json").is_file()
                else self.config
            )
            cfg.num_labels = len(h.labels)
            m = AutoModelForSequenceClassification.from_config(cfg).to(self.device)
            self._full[h.checkpoint] = m.eval()
        prefix = getattr(m, "base_model_prefix", "")
        own = m.state_dict()
        body = {
            (k if k in own or not prefix else f"{prefix}.{k}"): v
            for k, v in state.items()
        }
        body.update(h.tensors or {})
        load_into_module(m, body, "state")
        return m

    def _logits(
        self, module: nn.Module, task: str, ids: Tensor, mask: Tensor
    ) -> Tensor:
        h = self.head(task)
        if h.checkpoint is not None:
            return module(input_ids=ids, attention_mask=mask).logits
        out = module(input_ids=ids, attention_mask=mask)
        if self.o.pooling == "pooler":
            pooled = out.pooler_output
        elif self.o.pooling == "cls":
            pooled = out.last_hidden_state[:, 0]
        else:
            pooled = zm.mean_pool(out.last_hidden_state, mask)
        assert h.weight is not None
        with fp32_region(self.device):  # the head in fp32
            return nn.functional.linear(pooled.float(), h.weight, h.bias)

    def on_device(self, device: str) -> TextClassifier:
        """The same evaluator on another device (data read and tokenized again)."""
        return TextClassifier(self.o, dataclasses.replace(self.ctx, device=device))

    # -- scoring -----------------------------------------------------------------------
    @torch.inference_mode()
    def _score(self, module: nn.Module, task: str, split: str) -> float:
        b = self.batches(task, split)
        correct, start = 0, 0
        with autocast(self.device, self.ctx.precision):  # one weight cast per split
            for ids, mask in b.batches:
                pred = self._logits(module, task, ids, mask).argmax(-1)
                n = ids.shape[0]
                correct += int((pred == b.labels[start : start + n]).sum())
                start += n
        return correct / max(1, start)

    def evaluate(self, state: State, task: str, split: str = "test") -> float:
        """Accuracy of the encoder ``state`` on ``task``'s ``split``."""
        return self._score(self._model(task, state), task, split)

    def evaluate_many(
        self, state: State, tasks: Iterable[str] | None = None, split: str = "test"
    ) -> dict[str, float]:
        """Accuracy per task (all the file's tasks by default)."""
        names = list(tasks) if tasks is not None else self.tasks
        return {t: self.evaluate(state, t, split) for t in names}

    # -- calibration statistics (Fisher, RegMean) --------------------------------------
    def _examples(
        self, task: str, examples: int
    ) -> Iterable[tuple[Tensor, Tensor, Tensor]]:
        for ids, mask, y in self.batches(task, "calibration").first(examples):
            for i in range(ids.shape[0]):
                n = int(mask[i].sum())
                yield ids[i : i + 1, :n], mask[i : i + 1, :n], y[i : i + 1]

    def _param_names(self, module: nn.Module, keys: Sequence[str]) -> dict[str, str]:
        own = dict(module.named_parameters())
        prefix = getattr(module, "base_model_prefix", "")
        out = {}
        for k in keys:
            name = k if k in own else f"{prefix}.{k}"
            if name in own:
                out[k] = name
        return out

    def fisher(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Diagonal empirical Fisher of the task's cross-entropy
        (one example a pass)."""
        module = self._model(task, state)
        losses = self._losses(module, task, examples)
        return diagonal_fisher(module, self._param_names(module, keys), losses)

    def gradients(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Mean gradient of the task's cross-entropy at ``state`` (one example a pass,
        :meth:`fisher`'s losses)."""
        module = self._model(task, state)
        losses = self._losses(module, task, examples)
        return mean_gradient(module, self._param_names(module, keys), losses)

    def _losses(
        self, module: nn.Module, task: str, examples: int
    ) -> Iterable[Callable[[], Tensor]]:
        """One cross-entropy per calibration example, on ``module`` with the task's
        head (the statistics' per-example losses)."""

        def loss(ids: Tensor, mask: Tensor, y: Tensor) -> Tensor:
            logits = self._logits(module, task, ids, mask)
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        for ids, mask, y in self._examples(task, examples):
            yield functools.partial(loss, ids, mask, y)

    def grams(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Σ xᵀx of each linear layer's inputs over the non-padding tokens."""
        module = self._model(task, state)
        body = module if self.head(task).checkpoint is None else module.base_model

        def runs() -> Iterable[tuple[Any, Tensor]]:
            for i, m, _ in self.batches(task, "calibration").first(examples):
                yield (lambda i=i, m=m: body(input_ids=i, attention_mask=m)), m

        names = self._param_names(module, keys)
        prefix = getattr(module, "base_model_prefix", "")
        if body is not module:  # hooks live on the body: its own parameter names
            names = {k: n.removeprefix(f"{prefix}.") for k, n in names.items()}
        return linear_grams(body, names, runs())


def _is_head_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return set(f.keys()) == {"weight", "bias"}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def _head_labels(path: Path) -> list[str] | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["labels"]) if "labels" in meta else None


def _config_labels(d: Path) -> list[str] | None:
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None
    id2 = cfg.get("id2label")
    if not isinstance(id2, Mapping) or not id2:
        return None
    return [str(id2[k]) for k in sorted(id2, key=lambda x: int(x))]


def _label(value: Any, names: Sequence[str], path: Path, task: str, row: int) -> int:
    """A label as its index: a label name, or an index into the names."""
    s = str(value).strip()
    if s in names:
        return list(names).index(s)
    if isinstance(value, int) or s.lstrip("-").isdigit():
        i = int(s)
        if 0 <= i < len(names):
            return i
    raise ConfigError(
        f"{path}, task {task!r}: record {row}: label {value!r} is not "
        f"among the label names {list(names)}"
    )


def build(options: TextClassificationOptions, ctx: BuildContext) -> TextClassifier:
    """The ``text-classification`` evaluator of an evaluator file."""
    return TextClassifier(options, ctx)


KIND = EvaluatorKind(
    "text-classification",
    TextClassificationOptions,
    build,
    summary="HF encoder + each task's own head (file or fine-tuned checkpoint)",
)
