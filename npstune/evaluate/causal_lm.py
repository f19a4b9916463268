"""Kind ``causal-lm``: score a causal language model's state on prompt/answer tasks.

```yaml
kind: causal-lm
chat_template: false       # true: prompts go through the tokenizer's chat template
max_length: 512            # optional: tokens of prompt + continuation (prompt cut left)
dtype: float32             # float32 | bfloat16 | float16 | auto (the checkpoint's)
tasks:
  quiz:
    mode: choice           # choice | generate | perplexity
    data: {calibration: quiz-cal.jsonl, test: quiz-test.jsonl}
    length_normalize: false  # choice only: divide by the choice's length in characters
    max_new_tokens: 16       # generate only
    answer_regex: null       # generate only: compare this match (group 1 if any)
```

Modes (records are JSONL/JSON/CSV/Parquet rows):

- ``choice`` ``{"prompt", "choices", "answer"}``: each choice is scored by the sum of
  its tokens' log-probabilities after the prompt (prompt and choice tokenized
  separately and concatenated, as lm-evaluation-harness does); the highest wins, ties
  to the lowest index. Metric: accuracy.
- ``generate`` ``{"prompt", "answer"}``: greedy decoding, exact match of the stripped
  generation (or of its ``answer_regex`` match) with the stripped answer.
- ``perplexity`` ``{"text"}``: ``evaluate`` returns -mean NLL over all predicted tokens
  of the split (= -log perplexity, higher is better); ``report_value`` the perplexity.

One model skeleton is kept; each call copies the candidate's tensors into it. A split
is read, tokenized and pre-padded into batches once, then cached.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from npstune.errors import ConfigError, first_line
from npstune.evaluate.base import State
from npstune.evaluate.hf import (
    autocast,
    fp32_region,
    load_into_module,
    module_targets,
    stats_precision,
)
from npstune.evaluate.kinds import SPLITS, BuildContext, EvaluatorKind, KindOptions
from npstune.evaluate.records import read_records, require
from npstune.evaluate.stats import (
    DEFAULT_EXAMPLES,
    diagonal_fisher,
    linear_grams,
    mean_gradient,
)

logger = logging.getLogger(__name__)

Mode = Literal["choice", "generate", "perplexity"]

#: The metric each mode reports.
METRICS = {"choice": "accuracy", "generate": "exact_match", "perplexity": "perplexity"}

#: The fields each mode's records need.
FIELDS = {
    "choice": ("prompt", "choices", "answer"),
    "generate": ("prompt", "answer"),
    "perplexity": ("text",),
}

#: Mode-specific keys: key -> (its mode, its default).
_MODE_KEYS: dict[str, tuple[str, Any]] = {
    "length_normalize": ("choice", False),
    "max_new_tokens": ("generate", 16),
    "answer_regex": ("generate", None),
}


# ---- options -------------------------------------------------------------------------
class TaskData(KindOptions):
    """A task's data files, one per split (relative to the evaluator file)."""

    calibration: str | None = None
    test: str | None = None

    @model_validator(mode="after")
    def _some(self) -> TaskData:
        if self.calibration is None and self.test is None:
            raise ValueError("give at least one of calibration:, test:")
        return self


class CausalLMTask(KindOptions):
    """One task of a ``causal-lm`` evaluator file."""

    mode: Mode
    data: TaskData
    length_normalize: bool = False
    max_new_tokens: int = Field(16, ge=1)
    answer_regex: str | None = None

    @model_validator(mode="after")
    def _mode_keys(self) -> CausalLMTask:
        for key, (mode, default) in _MODE_KEYS.items():
            if self.mode != mode and getattr(self, key) != default:
                raise ValueError(
                    f"{key} applies to mode {mode} only "
                    f"(this task's mode is {self.mode})"
                )
        if self.answer_regex is not None:
            try:
                re.compile(self.answer_regex)
            except re.error as exc:
                raise ValueError(
                    f"answer_regex: not a valid regular expression ({exc})"
                ) from None
        return self


class CausalLMOptions(KindOptions):
    """The ``causal-lm`` keys of an evaluator file (see the module docstring)."""

    chat_template: bool = False
    max_length: int | None = Field(None, ge=2)
    #: the dtype the model is held and run in; ``auto``: the checkpoint's own (what a
    #: 7B search holds once per trial: bf16 is half the memory of fp32)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    tasks: dict[str, CausalLMTask] = Field(min_length=1)

    @model_validator(mode="after")
    def _room(self) -> CausalLMOptions:
        if self.max_length is None:
            return self
        for name, t in self.tasks.items():
            if t.mode == "generate" and t.max_new_tokens >= self.max_length:
                raise ValueError(
                    f"max_length ({self.max_length}) must exceed "
                    f"max_new_tokens ({t.max_new_tokens}) of task {name}"
                )
        return self


# ---- prepared splits -----------------------------------------------------------------
@dataclass(frozen=True)
class _Batch:
    """Padded token rows; ``target[b, t]``: position t's prediction of ``ids[b, t+1]``
    counts."""

    index: Tensor  # [B] the rows' positions in the split's row list
    ids: Tensor  # [B, L]
    mask: Tensor  # [B, L] attention mask (1 = token)
    target: Tensor  # [B, L-1] bool


@dataclass
class _Split:
    """A task's split, read and tokenized once.

    ``rows`` are the scored sequences (prompt + continuation, or a text) and ``starts``
    the position of each row's first scored token. ``gold`` gives, per example, the row
    whose loss Fisher/RegMean use (the correct choice, the answer, the text).
    """

    n: int
    rows: list[list[int]]
    starts: list[int]
    gold: list[int]
    batches: list[_Batch] = field(default_factory=list)
    # choice: [n, K] row index per choice (-1: none), divisors, answer indices
    choice_rows: Tensor | None = None
    norms: Tensor | None = None
    answers: Tensor | None = None
    # generate: prompt ids batched with left padding, and the expected answers
    prompt_batches: list[_Batch] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)


def _where(path: Path, task: str, split: str) -> str:
    return f"{path}, task {task!r}, split {split!r}"


def _choices(value: Any, where: str, i: int) -> list[str]:
    """A record's choices as strings (a list, or a JSON list in a CSV cell)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(
                f"{where}: record {i}: choices must be a list "
                f"(or a JSON list), got {value!r}"
            ) from None
    if not isinstance(value, (list, tuple)):
        raise ConfigError(
            f"{where}: record {i}: choices must be a list, got {type(value).__name__}"
        )
    if not value:
        raise ConfigError(f"{where}: record {i}: choices is empty")
    out = []
    for j, c in enumerate(value):
        if isinstance(c, bool) or not isinstance(c, (str, int, float)):
            raise ConfigError(f"{where}: record {i}: choice {j} is not a string")
        out.append(str(c))
    return out


def _answer_index(value: Any, k: int, where: str, i: int) -> int:
    """A record's answer as a choice index in [0, k)."""
    a: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        a = value
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        a = int(value)
    elif isinstance(value, float) and value.is_integer():
        a = int(value)
    if a is None:
        raise ConfigError(
            f"{where}: record {i}: answer must be a choice index, got {value!r}"
        )
    if not 0 <= a < k:
        raise ConfigError(
            f"{where}: record {i}: answer index {a} is out of range for {k} choices"
        )
    return a


def _right_batches(
    rows: Sequence[Sequence[int]],
    starts: Sequence[int],
    index: Sequence[int],
    batch_size: int,
    pad: int,
    device: torch.device,
) -> list[_Batch]:
    """Rows ``index`` sorted by length (longest first), right-padded into batches."""
    order = sorted(index, key=lambda r: -len(rows[r]))
    out = []
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        width = max(len(rows[r]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        target = torch.zeros((len(chunk), max(width - 1, 0)), dtype=torch.bool)
        for b, r in enumerate(chunk):
            n = len(rows[r])
            ids[b, :n] = torch.tensor(rows[r], dtype=torch.long)
            mask[b, :n] = 1
            target[b, starts[r] - 1 : n - 1] = True
        out.append(
            _Batch(
                torch.tensor(chunk, dtype=torch.long, device=device),
                ids.to(device),
                mask.to(device),
                target.to(device),
            )
        )
    return out


def _left_batches(
    prompts: Sequence[Sequence[int]], batch_size: int, pad: int, device: torch.device
) -> list[_Batch]:
    """Prompts sorted by length, left-padded into batches (for generation)."""
    order = sorted(range(len(prompts)), key=lambda r: -len(prompts[r]))
    out = []
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        width = max(len(prompts[r]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, r in enumerate(chunk):
            n = len(prompts[r])
            ids[b, width - n :] = torch.tensor(prompts[r], dtype=torch.long)
            mask[b, width - n :] = 1
        out.append(
            _Batch(
                torch.tensor(chunk, dtype=torch.long, device=device),
                ids.to(device),
                mask.to(device),
                torch.zeros((len(chunk), 0), dtype=torch.bool),
            )
        )
    return out


def _is_causal(config: Any) -> bool:
    """Whether an HF config describes a model ``AutoModelForCausalLM`` should load."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return False
    classes: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        classes.update([v] if isinstance(v, str) else v)
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        return any(
            a in classes or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs
        )
    return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def load_causal_lm(
    path: Path, device: torch.device, dtype: str = "float32"
) -> tuple[Any, Any]:
    """(model in ``dtype`` on ``device``, tokenizer) of an HF dir (``auto``: the
    checkpoint's dtype); one-line ConfigErrors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not path.is_dir():
        raise ConfigError(
            f"{path}: not a model directory; kind causal-lm needs an "
            "AutoModelForCausalLM checkpoint directory"
        )
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{path}: cannot read the model config ({first_line(exc)})"
        ) from None
    if not _is_causal(config):
        archs = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise ConfigError(
            f"{path}: not a causal language model (architectures: "
            f"{archs}); kind causal-lm needs an AutoModelForCausalLM "
            "checkpoint"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype="auto" if dtype == "auto" else getattr(torch, dtype),
            local_files_only=True,
        )
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{path}: cannot load the model or tokenizer ({first_line(exc)})"
        ) from None
    # transformers wraps .to with functools.wraps, which mypy leaves unbound (self)
    return model.to(device).eval(), tok  # type: ignore[arg-type]


# ---- the evaluator -------------------------------------------------------------------
class CausalLMEvaluator:
    """Scores states of one causal LM architecture on ``choice``/``generate``/
    ``perplexity`` tasks (see the module docstring); also gives Fisher and Gram
    statistics (:class:`~npstune.evaluate.stats.CalibrationStats`).

    Args:
        options: the validated evaluator-file keys.
        ctx: model directory, data root, device, batch size and example limits.
    """

    def __init__(self, options: CausalLMOptions, ctx: BuildContext):
        if ctx.model is None:
            raise ConfigError(f"{ctx.source}: kind causal-lm needs a model directory")
        if ctx.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {ctx.batch_size}")
        self.options = options
        self.ctx = ctx
        self.model_dir = Path(ctx.model)
        self.device = torch.device(ctx.device)
        self.precision = ctx.precision
        self._model, self._tok = load_causal_lm(
            self.model_dir, self.device, options.dtype
        )
        tok = self._tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._pad = int(pad) if pad is not None else 0
        limit = options.max_length
        if limit is None:
            limit = getattr(self._model.config, "max_position_embeddings", None)
        self.max_length: int | None = int(limit) if limit else None
        if options.chat_template and not getattr(tok, "chat_template", None):
            raise ConfigError(
                f"{ctx.source}: chat_template: true, but the tokenizer "
                f"of {self.model_dir} has no chat template"
            )
        self._splits: dict[tuple[str, str], _Split] = {}
        names = list(ctx.tasks) if ctx.tasks is not None else self.tasks
        for t in names:
            self._task(t)
        for t in names:
            for s in ctx.prepare:
                self.split(t, s)

    @property
    def tasks(self) -> list[str]:
        """The task names of the evaluator file."""
        return list(self.options.tasks)

    def metric(self, task: str) -> str:
        """``accuracy`` (choice), ``exact_match`` (generate) or ``perplexity``."""
        return METRICS[self._task(task).mode]

    def report_value(self, task: str, score: float) -> float:
        """The value people read: perplexity = exp(-score) for perplexity tasks."""
        if self._task(task).mode == "perplexity":
            return math.exp(-score)
        return float(score)

    def examples(self, task: str, split: str) -> int:
        """How many examples ``task``'s ``split`` scores (after the limits)."""
        return self.split(task, split).n

    # -- prompts and data --------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """A prompt's token ids: plain (default special tokens) or chat-templated."""
        return self._encode_prompts([prompt])[0]

    def _encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        tok = self._tok
        if self.options.chat_template:
            texts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": p}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                for p in prompts
            ]
            ids = tok(texts, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompts)["input_ids"]
        first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        # an empty context predicts from bos/eos, as lm-evaluation-harness does
        return [list(x) if len(x) or first is None else [int(first)] for x in ids]

    def _task(self, task: str) -> CausalLMTask:
        t = self.options.tasks.get(task)
        if t is None:
            raise ConfigError(
                f"{self.ctx.source}: unknown task {task!r}; valid: "
                f"{', '.join(self.tasks)}"
            )
        return t

    def split(self, task: str, split: str) -> _Split:
        """``task``'s ``split``, read, tokenized and batched (once)."""
        t = self._task(task)
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        key = (task, split)
        if key not in self._splits:
            rel = getattr(t.data, split)
            if rel is None:
                raise ConfigError(
                    f"{self.ctx.source}: task {task!r} has no {split} "
                    f"data (data: {split}: is not set)"
                )
            path = self.ctx.path(rel)
            recs = read_records(path, task, split)
            recs = recs[: self.ctx.limit(split, len(recs))]
            require(recs, FIELDS[t.mode], path, task, split)
            prep = {
                "choice": self._prep_choice,
                "generate": self._prep_generate,
                "perplexity": self._prep_text,
            }[t.mode]
            self._splits[key] = prep(recs, _where(path, task, split), t)
            logger.info(
                "causal-lm: %s/%s: %d examples, %d rows",
                task,
                split,
                self._splits[key].n,
                len(self._splits[key].rows),
            )
        return self._splits[key]

    def _cut(self, prompt: list[int], cont: list[int]) -> tuple[list[int], int]:
        """prompt + cont within max_length (cut from the left), and cont's start."""
        full, start = prompt + cont, len(prompt)
        over = len(full) - self.max_length if self.max_length else 0
        if over > 0:
            full, start = full[over:], max(1, start - over)
        return full, start

    def _prep_choice(
        self, recs: list[dict[str, Any]], where: str, t: CausalLMTask
    ) -> _Split:
        choices = [_choices(r["choices"], where, i) for i, r in enumerate(recs, 1)]
        answers = [
            _answer_index(r["answer"], len(c), where, i)
            for i, (r, c) in enumerate(zip(recs, choices), 1)
        ]
        prompts = self._encode_prompts([str(r["prompt"]) for r in recs])
        flat = [c for cs in choices for c in cs]
        conts = self._tok(flat, add_special_tokens=False)["input_ids"]
        rows: list[list[int]] = []
        starts: list[int] = []
        seen: dict[tuple[tuple[int, ...], int], int] = {}
        k = max(len(c) for c in choices)
        idx = torch.full((len(recs), k), -1, dtype=torch.long)
        norms = torch.ones((len(recs), k), dtype=torch.float64)
        pos = 0
        for i, cs in enumerate(choices):
            for j, c in enumerate(cs):
                cont = list(conts[pos])
                pos += 1
                if not cont:
                    raise ConfigError(
                        f"{where}: record {i + 1}: choice {j} ({c!r}) has no tokens"
                    )
                full, start = self._cut(prompts[i], cont)
                r = seen.setdefault((tuple(full), start), len(rows))
                if r == len(rows):  # identical (prompt, choice) rows are scored once
                    rows.append(full)
                    starts.append(start)
                idx[i, j] = r
                if t.length_normalize:
                    norms[i, j] = float(max(len(c), 1))
        gold = [int(idx[i, a]) for i, a in enumerate(answers)]
        return _Split(
            n=len(recs),
            rows=rows,
            starts=starts,
            gold=gold,
            batches=self._batches(rows, starts, range(len(rows))),
            choice_rows=idx.to(self.device),
            norms=norms.to(self.device),
            answers=torch.tensor(answers, dtype=torch.long, device=self.device),
        )

    def _prep_generate(
        self, recs: list[dict[str, Any]], where: str, t: CausalLMTask
    ) -> _Split:
        prompts = self._encode_prompts([str(r["prompt"]) for r in recs])
        if self.max_length:
            room = self.max_length - t.max_new_tokens
            prompts = [p[-room:] for p in prompts]
        targets = [str(r["answer"]) for r in recs]
        answers = self._tok(targets, add_special_tokens=False)["input_ids"]
        rows, starts = [], []
        for p, a in zip(prompts, answers):
            full, start = self._cut(p, list(a))
            rows.append(full)
            starts.append(start)
        return _Split(
            n=len(recs),
            rows=rows,
            starts=starts,
            gold=[i for i, (r, s) in enumerate(zip(rows, starts)) if len(r) > s],
            prompt_batches=_left_batches(
                prompts, self.ctx.batch_size, self._pad, self.device
            ),
            targets=targets,
        )

    def _prep_text(
        self, recs: list[dict[str, Any]], where: str, t: CausalLMTask
    ) -> _Split:
        ids = self._tok([str(r["text"]) for r in recs])["input_ids"]
        rows = [list(x)[: self.max_length] if self.max_length else list(x) for x in ids]
        cut = sum(len(x) > len(r) for x, r in zip(ids, rows))
        if cut:
            logger.warning(
                "causal-lm: %s: %d texts cut to max_length %d tokens",
                where,
                cut,
                self.max_length,
            )
        if sum(max(len(r) - 1, 0) for r in rows) == 0:
            raise ConfigError(f"{where}: no text has two or more tokens to score")
        starts = [1] * len(rows)
        keep = [i for i, r in enumerate(rows) if len(r) >= 2]
        return _Split(
            n=len(recs),
            rows=rows,
            starts=starts,
            gold=keep,
            batches=self._batches(rows, starts, keep),
        )

    def _batches(
        self, rows: Sequence[Sequence[int]], starts: Sequence[int], index: Iterable[int]
    ) -> list[_Batch]:
        return _right_batches(
            rows, starts, list(index), self.ctx.batch_size, self._pad, self.device
        )

    # -- scoring -----------------------------------------------------------------------
    def on_device(self, device: str) -> CausalLMEvaluator:
        """The same evaluator on another device (data read and tokenized again)."""
        import dataclasses

        return CausalLMEvaluator(
            self.options, dataclasses.replace(self.ctx, device=device)
        )

    def load_state(self, state: State, source: str = "state") -> None:
        """Copy ``state`` (the checkpoint's keys; tied ``lm_head`` may be absent)."""
        load_into_module(self._model, state, source)

    def targets(self) -> dict[str, Tensor]:
        """The model's own tensors by state key (on its device, in its dtype): a
        candidate written there is loaded by :meth:`load_state` without a copy."""
        return module_targets(self._model)

    def _autocast(self, stats: bool = False) -> contextlib.AbstractContextManager[Any]:
        """The forward passes' autocast (:func:`npstune.evaluate.hf.autocast`); the
        statistics passes (``stats``: Fisher, Gram matrices) at
        :func:`~npstune.evaluate.hf.stats_precision`."""
        p = stats_precision(self.device, self.precision) if stats else self.precision
        return autocast(self.device, p)

    @torch.inference_mode()
    def _row_logprobs(self, sp: _Split) -> Tensor:
        """Per row, the sum of its scored tokens' log-probabilities (float64)."""
        sums = torch.zeros(len(sp.rows), dtype=torch.float64, device=self.device)
        with self._autocast():  # entered once: the weights are cast once per split
            for b in sp.batches:
                if b.target.numel() == 0:
                    continue
                # logits only where some row is scored: the vocabulary projection
                # of every prompt position is most of a small model's forward
                cols = b.target.any(0).nonzero()[:, 0]
                logits = self._model(
                    input_ids=b.ids, attention_mask=b.mask, logits_to_keep=cols
                ).logits
                if logits.shape[1] == cols.numel():
                    target, nxt = b.target[:, cols], b.ids[:, 1:][:, cols]
                else:  # a model that ignores logits_to_keep gives every position
                    target, nxt, logits = b.target, b.ids[:, 1:], logits[:, :-1]
                with fp32_region(self.device):
                    picked = logits[target].float().log_softmax(-1)
                lp = picked.gather(-1, nxt[target][:, None])[:, 0].double()
                owner = torch.arange(b.ids.shape[0], device=self.device)[:, None]
                per = torch.zeros(
                    b.ids.shape[0], dtype=torch.float64, device=self.device
                )
                per.index_add_(0, owner.expand_as(target)[target], lp)
                sums[b.index] = per
        return sums

    def _choice_scores(self, sp: _Split) -> Tensor:
        """[n, K] each choice's (normalised) score; -inf where an example has fewer."""
        assert sp.choice_rows is not None and sp.norms is not None
        sums = self._row_logprobs(sp)
        ext = torch.cat([sums, sums.new_full((1,), -math.inf)])
        return ext[sp.choice_rows] / sp.norms  # index -1 picks the -inf

    @torch.inference_mode()
    def _generate(self, sp: _Split, t: CausalLMTask) -> list[str]:
        """Greedy generations of the split's prompts, in the data's order."""
        gc = copy.deepcopy(self._model.generation_config)
        gc.do_sample, gc.num_beams = False, 1
        gc.temperature = gc.top_p = gc.top_k = None
        gc.max_new_tokens = t.max_new_tokens
        gc.pad_token_id = self._pad
        if gc.eos_token_id is None:
            gc.eos_token_id = self._tok.eos_token_id
        out: list[str] = [""] * sp.n
        with self._autocast():  # entered once: the weights are cast once per split
            for b in sp.prompt_batches:
                gen = self._model.generate(
                    input_ids=b.ids, attention_mask=b.mask, generation_config=gc
                )
                texts = self._tok.batch_decode(
                    gen[:, b.ids.shape[1] :], skip_special_tokens=True
                )
                for i, text in zip(b.index.tolist(), texts):
                    out[i] = text
        return out

    @staticmethod
    def _extract(text: str, pattern: re.Pattern[str] | None) -> str | None:
        if pattern is None:
            return text.strip()
        m = pattern.search(text)
        if m is None:
            return None
        return ((m.group(1) if pattern.groups else m.group(0)) or "").strip()

    def _predict(self, task: str, split: str) -> tuple[float, list[Any]]:
        """(score, per-example predictions) of the loaded state."""
        t = self._task(task)
        sp = self.split(task, split)
        if t.mode == "choice":
            assert sp.answers is not None
            pred = self._choice_scores(sp).argmax(1)  # the first maximum: lowest index
            acc = float((pred == sp.answers).double().mean())
            return acc, pred.tolist()
        if t.mode == "generate":
            gens = self._generate(sp, t)
            pat = re.compile(t.answer_regex) if t.answer_regex is not None else None
            hits = [
                self._extract(g, pat) == a.strip() for g, a in zip(gens, sp.targets)
            ]
            return sum(hits) / sp.n, gens
        sums = self._row_logprobs(sp)
        counts = torch.tensor(
            [len(r) - s for r, s in zip(sp.rows, sp.starts)],
            dtype=torch.float64,
            device=self.device,
        ).clamp_min(0)
        per = (-sums / counts.clamp_min(1)).tolist()
        return float(sums.sum() / counts.sum()), per

    def evaluate(self, state: State, task: str, split: str = "test") -> float:
        """``state``'s score on ``task``'s ``split`` (accuracy, exact match or -log
        perplexity; higher is better)."""
        self._task(task)
        self.load_state(state)
        return self._predict(task, split)[0]

    def evaluate_many(
        self, state: State, tasks: Iterable[str] | None = None, split: str = "test"
    ) -> dict[str, float]:
        """Score per task, loading ``state`` once (all tasks by default)."""
        names = list(tasks) if tasks is not None else self.tasks
        for t in names:
            self._task(t)
        self.load_state(state)
        return {t: self._predict(t, split)[0] for t in names}

    def predictions(self, state: State, task: str, split: str = "test") -> list[Any]:
        """Per example: the chosen index (choice), the generation (generate), or the
        text's mean NLL (perplexity)."""
        self._task(task)
        self.load_state(state)
        return self._predict(task, split)[1]

    def choice_scores(
        self, state: State, task: str, split: str = "test"
    ) -> list[list[float]]:
        """Per example, each choice's score (log-likelihood, / characters if
        ``length_normalize``) — what the argmax runs over."""
        if self._task(task).mode != "choice":
            raise ConfigError(f"task {task!r} is not a choice task")
        self.load_state(state)
        sp = self.split(task, split)
        assert sp.choice_rows is not None
        scores, has = self._choice_scores(sp).tolist(), (sp.choice_rows >= 0).tolist()
        return [[s for s, h in zip(row, hs) if h] for row, hs in zip(scores, has)]

    # -- calibration statistics --------------------------------------------------------
    def _param_names(self, keys: Sequence[str]) -> dict[str, str]:
        """State key -> parameter name (tied keys -> the parameter they share)."""
        params = dict(self._model.named_parameters())
        by_ptr = {p.data_ptr(): n for n, p in params.items()}
        own = self._model.state_dict(keep_vars=True)
        out = {}
        for k in keys:
            if k in params:
                out[k] = k
            elif k in own:
                name = by_ptr.get(own[k].data_ptr())
                if name is not None:
                    out[k] = name
            else:
                raise ConfigError(f"{self.model_dir}: key {k!r} is not in the model")
        return out

    def _gold(self, task: str, examples: int) -> tuple[_Split, list[int]]:
        if examples < 1:
            raise ConfigError(f"examples must be >= 1, got {examples}")
        sp = self.split(task, "calibration")
        return sp, sp.gold[:examples]

    def fisher(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Diagonal empirical Fisher on calibration examples, one per backward pass.

        The loss is the mean NLL of the example's scored tokens: the correct choice
        (choice), the answer after the prompt (generate), the text (perplexity).
        """
        losses = self._losses(state, task, examples)
        return diagonal_fisher(self._model, self._param_names(keys), losses)

    def gradients(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Mean loss gradient at ``state`` over calibration examples, one per backward
        pass, with :meth:`fisher`'s per-example loss."""
        losses = self._losses(state, task, examples)
        return mean_gradient(self._model, self._param_names(keys), losses)

    def _losses(
        self, state: State, task: str, examples: int
    ) -> Iterator[Callable[[], Tensor]]:
        """Load ``state``; then one loss per calibration example (the statistics'
        per-example losses, :meth:`_row_loss`)."""
        self._task(task)
        self.load_state(state)
        sp, gold = self._gold(task, examples)
        return (functools.partial(self._row_loss, sp, r) for r in gold)

    def _row_loss(self, sp: _Split, r: int) -> Tensor:
        ids = torch.tensor([sp.rows[r]], dtype=torch.long, device=self.device)
        with self._autocast(stats=True):
            logits = self._model(input_ids=ids).logits
        s = sp.starts[r]
        lp = logits[0, s - 1 : -1].float().log_softmax(-1)
        return -lp.gather(-1, ids[0, s:, None]).mean()

    def grams(
        self,
        state: State,
        task: str,
        keys: Sequence[str],
        examples: int = DEFAULT_EXAMPLES,
    ) -> dict[str, Tensor]:
        """Σ xᵀx of each asked linear layer's inputs over the non-padding tokens of the
        calibration examples' sequences (prompt + correct choice / answer, or text)."""
        self._task(task)
        self.load_state(state)
        self._param_names(keys)  # unknown keys are errors
        sp, gold = self._gold(task, examples)
        batches = self._batches(sp.rows, sp.starts, gold)

        def runs() -> Iterator[tuple[Callable[[], object], Tensor]]:
            for b in batches:

                def run(b: _Batch = b) -> object:
                    with self._autocast(stats=True):
                        return self._model(input_ids=b.ids, attention_mask=b.mask)

                yield run, b.mask

        return linear_grams(self._model, {k: k for k in keys}, runs())


def build(options: CausalLMOptions, ctx: BuildContext) -> CausalLMEvaluator:
    """The ``causal-lm`` evaluator of an evaluator file."""
    return CausalLMEvaluator(options, ctx)


KIND = EvaluatorKind(
    "causal-lm",
    CausalLMOptions,
    build,
    summary="causal LMs: multiple-choice log-likelihood, greedy generation exact "
    "match, perplexity",
    needs_model=True,
)
