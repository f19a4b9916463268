"""The zoo's task model: a BERT body, mean pooling, a linear head (DESIGN §7).

Shared by the zoo builder (fine-tuning) and the text evaluator (inference), so both pool
and pad exactly the same way.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from npstune.errors import CheckpointError

if TYPE_CHECKING:  # transformers is imported when a body is built
    from transformers import PreTrainedModel

HF_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Attention-mask-weighted mean over tokens: [B, L, H], [B, L] -> [B, H]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each text (with [CLS]/[SEP]), truncated to ``max_len``, unpadded."""
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_len,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return enc["input_ids"]


def pad(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Pad to the longest sequence: (input_ids, attention_mask), both int64 [B, L]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@dataclass
class Batches:
    """Pre-padded, length-sorted inference batches of one split and their labels."""

    batches: list[tuple[Tensor, Tensor]]
    labels: Tensor  # in batch order
    order: list[int]  # example index of each row, in batch order

    @classmethod
    def build(
        cls,
        ids: Sequence[Sequence[int]],
        labels: Sequence[int],
        batch_size: int,
        pad_id: int = 0,
        device: str | torch.device = "cpu",
    ) -> Batches:
        order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
        batches = []
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            a, m = pad([ids[i] for i in chunk], pad_id)
            batches.append((a.to(device), m.to(device)))
        lab = torch.tensor([labels[i] for i in order], dtype=torch.long, device=device)
        return cls(batches, lab, order)

    def first(self, n: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(ids, mask, labels) of the batches holding the first ``n`` rows (batch
        order), the last one cut to fit: the calibration examples statistics use."""
        seen = 0
        for ids, mask in self.batches:
            take = min(ids.shape[0], n - seen)
            if take <= 0:
                return
            yield ids[:take], mask[:take], self.labels[seen : seen + take]
            seen += take


@torch.no_grad()
def pooled_features(body: nn.Module, batches: Batches) -> Tensor:
    """Mean-pooled last hidden states for every row of ``batches`` (batch order)."""
    outs = [
        mean_pool(body(input_ids=a, attention_mask=m).last_hidden_state, m)
        for a, m in batches.batches
    ]
    return torch.cat(outs)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    return (
        float((logits.argmax(-1) == labels).float().mean())
        if len(labels)
        else float("nan")
    )


# --- fine-tuning ----------------------------------------------------------------------
@dataclass
class TrainResult:
    head_weight: Tensor
    head_bias: Tensor
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def finetune(
    body: PreTrainedModel,
    train_ids: Sequence[Sequence[int]],
    train_labels: Sequence[int],
    num_classes: int,
    *,
    epochs: int,
    batch_size: int,
    lr_body: float,
    lr_head: float,
    weight_decay: float,
    warmup: float,
    seed: int,
    pad_id: int = 0,
    progress: Callable[[int], object] | None = None,
) -> TrainResult:
    """Fine-tune ``body`` in place (embeddings and pooler frozen) with a new linear
    head.

    AdamW with a linear warmup/decay schedule; batches are shuffled with a seeded
    generator and padded to their longest text. ``progress(n)`` is called after each
    step.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks and head init
    hidden = body.config.hidden_size
    head = nn.Linear(hidden, num_classes)
    for name, p in body.named_parameters():
        p.requires_grad_(
            not (name.startswith("embeddings.") or name.startswith("pooler."))
        )
    params = [p for p in body.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": params, "lr": lr_body},
            {"params": head.parameters(), "lr": lr_head},
        ],
        weight_decay=weight_decay,
    )
    n = len(train_ids)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    n_warm = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min((s + 1) / n_warm, max(0.0, (total - s) / max(1, total - n_warm))),
    )
    labels = torch.tensor(list(train_labels), dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss()
    body.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).tolist()
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            ids, mask = pad([train_ids[i] for i in idx], pad_id)
            out = body(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = loss_fn(head(mean_pool(out, mask)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(1)
    body.eval()
    for p in body.parameters():
        p.requires_grad_(False)
    return TrainResult(
        head.weight.detach().clone(),
        head.bias.detach().clone(),
        total,
        time.perf_counter() - t0,
        losses,
    )


def fit_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    seed: int,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
) -> nn.Linear:
    """A linear probe on frozen features (full-batch Adam on standardised inputs)."""
    torch.manual_seed(seed)
    mu, sd = features.mean(0), features.std(0).clamp(min=1e-6)
    x = (features - mu) / sd
    lin = nn.Linear(features.shape[1], num_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(lin(x), labels).backward()
            opt.step()
    # fold the standardisation into the layer: W (x - mu)/sd + b
    out = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        out.weight.copy_(lin.weight / sd)
        out.bias.copy_(lin.bias - (lin.weight / sd) @ mu)
    return out


# --- files ----------------------------------------------------------------------------
def safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises several types for a bad header
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc


def save_body(state: Mapping[str, Tensor], base_dir: Path, out_dir: Path) -> None:
    """Write ``state`` as an HF model dir with exactly the base file's keys.

    Keys the base file has but ``state`` lacks (non-persistent buffers such as
    ``embeddings.position_ids``) are copied from the base; extra keys are an error.
    Config and tokenizer files are copied from ``base_dir``.
    """
    base_file = base_dir / "model.safetensors"
    base_keys = safetensors_keys(base_file)
    extra = sorted(set(state) - set(base_keys))
    if extra:
        raise CheckpointError(f"{out_dir}: key {extra[0]!r} is not in the base model")
    out: dict[str, Tensor] = {}
    with safe_open(str(base_file), "pt") as f:
        for k in base_keys:
            out[k] = state[k].detach().contiguous() if k in state else f.get_tensor(k)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out_dir / "model.safetensors", 0o644)
    for name in HF_FILES:
        if (base_dir / name).exists():
            shutil.copyfile(base_dir / name, out_dir / name)


def save_head(path: Path, weight: Tensor, bias: Tensor, labels: Sequence[str]) -> None:
    """A task head: ``weight`` [C, H], ``bias`` [C], label names in the metadata."""
    save_file(
        {"weight": weight.contiguous(), "bias": bias.contiguous()},
        str(path),
        metadata={"format": "pt", "labels": json.dumps(list(labels))},
    )
    os.chmod(path, 0o644)


def load_head(path: Path) -> tuple[Tensor, Tensor]:
    try:
        t = load_file(str(path))
        return t["weight"], t["bias"]
    except Exception as exc:
        raise CheckpointError(
            f"{path}: unreadable task head ({exc}); rebuild the zoo with `npstune zoo "
            "build`"
        ) from exc


def new_body(model_dir: Path) -> PreTrainedModel:
    """An untrained skeleton built from ``model_dir/config.json`` (no weights read)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(model_dir))
    return AutoModel.from_config(config)


def read_state(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file; a corrupt file raises CheckpointError."""
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc


def load_into(
    body: nn.Module, state: Mapping[str, Tensor], source: str = "state"
) -> None:
    """Copy ``state`` into ``body``; keys must match the body's (buffers it doesn't
    persist, e.g. ``embeddings.position_ids``, are accepted and ignored)."""
    own = body.state_dict()
    extra = [k for k in state if k not in own and k not in _IGNORED_BUFFERS]
    missing_ = [k for k in own if k not in state]
    if extra or missing_:
        key = (extra or missing_)[0]
        what = "is not in the base model" if extra else "is missing"
        raise CheckpointError(
            f"{source}: key {key!r} {what} "
            f"({len(extra)} unexpected, {len(missing_)} missing keys)"
        )
    for k, t in own.items():
        if tuple(state[k].shape) != tuple(t.shape):
            from npstune.errors import ShapeMismatchError

            raise ShapeMismatchError(
                f"{source}:{k}: shape {tuple(state[k].shape)} != base {tuple(t.shape)}"
            )
    from npstune.evaluate.hf import copy_into

    with torch.no_grad():  # load_state_dict's copy, less the tensors written in place
        for k, t in own.items():
            copy_into(t, state[k])


_IGNORED_BUFFERS = frozenset({"embeddings.position_ids"})


def load_body(model_dir: Path) -> PreTrainedModel:
    """A body from an HF dir holding ``model.safetensors``, in eval mode."""
    body = new_body(model_dir)
    load_into(body, read_state(Path(model_dir) / "model.safetensors"), str(model_dir))
    return body.eval()
