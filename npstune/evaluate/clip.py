"""CLIP zero-shot classification (DESIGN §9), as in the paper's vision experiments.

Only the image tower is merged; each task's head comes from the pretrained text tower:
for every class, the prompt embeddings ("a photo of a {c}." ...) are L2-normalised,
averaged and renormalised, giving W [D, C]; logits = 100 · normalize(f_img) · W.

The core works with any module that has ``encode_image`` / ``encode_text`` and a
tokenizer returning a token tensor; :meth:`ClipZeroShotEvaluator.from_open_clip` builds
one from open_clip (the optional ``clip`` extra, imported lazily).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from npstune.errors import CheckpointError, ConfigError, missing
from npstune.evaluate.base import State

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")


def import_open_clip() -> Any:
    """Import open_clip; MissingDependencyError if the ``clip`` extra is absent.

    On CPU torch the torchvision release that matches torch 2.13 is a CUDA build whose
    import fails with "operator torchvision::nms does not exist"; declaring the two op
    schemas it wants first lets torchvision, timm and open_clip import (DESIGN §9).
    """
    try:
        import open_clip
    except ImportError:
        raise missing("clip", "open_clip_torch") from None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm",
                                                                   "open_clip")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)  # the library must outlive this call
        import open_clip
    return open_clip


_KEEP: list[Any] = []

TINY_CLIP_NAME = "npstune-tiny-clip"
TINY_CLIP_CONFIG = {  # 3.4M params, random weights, forward in ~0.1 s (DESIGN §9)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}


def register_tiny_clip(directory: str | Path) -> str:
    """Register the tiny test config with open_clip (no download); return its name."""
    open_clip = import_open_clip()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(d)
    return TINY_CLIP_NAME


@dataclass
class ClipTask:
    """Class names, prompt templates and labelled image splits of one task."""

    classnames: Sequence[str]
    splits: Mapping[str, tuple[Tensor, Tensor]]  # split -> (images [N,3,H,W], labels [N])
    templates: Sequence[str] = field(default_factory=lambda: DEFAULT_TEMPLATES)


class ClipZeroShotEvaluator:
    """Accuracy of an image-tower state with zero-shot heads from class-name prompts.

    Args:
        model: a CLIP model with ``encode_image``, ``encode_text`` and a ``visual`` tower.
        tokenizer: ``tokenizer(list_of_str) -> LongTensor`` (open_clip's tokenizer).
        tasks: task name -> :class:`ClipTask`.
        prefix: the key prefix of the image tower in full-model states (``"visual."``);
            states may use the prefixed keys or the tower's own.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], Tensor],
                 tasks: Mapping[str, ClipTask], device: str | torch.device = "cpu",
                 batch_size: int = 64, prefix: str = "visual."):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tasks_ = dict(tasks)
        self.batch_size = batch_size
        self.prefix = prefix
        self._heads: dict[str, Tensor] = {}

    @classmethod
    def from_open_clip(cls, model_name: str, tasks: Mapping[str, ClipTask],
                       pretrained: str | None = None, **kw: Any) -> ClipZeroShotEvaluator:
        """Build the model and tokenizer with open_clip (``pretrained=None``: no download)."""
        open_clip = import_open_clip()
        model = open_clip.create_model(model_name, pretrained=pretrained)
        return cls(model, open_clip.get_tokenizer(model_name), tasks, **kw)

    @property
    def tasks(self) -> list[str]:
        return list(self.tasks_)

    def _task(self, name: str) -> ClipTask:
        try:
            return self.tasks_[name]
        except KeyError:
            raise ConfigError(f"unknown task {name!r}; valid: {', '.join(self.tasks_)}") from None

    @torch.no_grad()
    def zero_shot_head(self, task: str) -> Tensor:
        """W [D, C]: per class, the mean of normalised prompt embeddings, renormalised."""
        if task not in self._heads:
            t = self._task(task)
            cols = []
            for c in t.classnames:
                tokens = self.tokenizer([tpl.format(c) for tpl in t.templates]).to(self.device)
                emb = nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
                cols.append(nn.functional.normalize(emb.mean(0), dim=-1))
            self._heads[task] = torch.stack(cols, dim=1)
        return self._heads[task]

    def load_state(self, state: State, source: str = "state") -> None:
        """Load an image-tower state (keys with or without ``prefix``), checked by name."""
        tower = self.model.visual
        own = tower.state_dict()
        p = self.prefix
        st = {k[len(p):] if p and k.startswith(p) else k: v for k, v in state.items()
              if not p or k.startswith(p) or k in own}
        extra = [k for k in st if k not in own]
        missing_ = [k for k in own if k not in st]
        if extra or missing_:
            key = p + (extra or missing_)[0]
            raise CheckpointError(f"{source}: key {key!r} "
                                  f"{'is not in the image tower' if extra else 'is missing'}")
        tower.load_state_dict(st, strict=True)

    @torch.no_grad()
    def _score(self, task: str, split: str) -> float:
        t = self._task(task)
        if split not in t.splits:
            raise ConfigError(f"task {task!r} has no {split!r} split")
        images, labels = t.splits[split]
        w = self.zero_shot_head(task)
        correct = 0
        for s in range(0, len(labels), self.batch_size):
            x = images[s:s + self.batch_size].to(self.device)
            f = nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
            logits = 100.0 * f @ w
            correct += int((logits.argmax(-1).cpu() == labels[s:s + self.batch_size]).sum())
        return correct / max(1, len(labels))

    def evaluate(self, state: State, task: str, split: str = "test") -> float:
        self._task(task)
        self.zero_shot_head(task)  # heads come from the pretrained text tower, built first
        self.load_state(state)
        return self._score(task, split)

    def evaluate_many(self, state: State, tasks: Iterable[str] | None = None,
                      split: str = "test") -> dict[str, float]:
        names = list(tasks) if tasks is not None else self.tasks
        for t in names:
            self.zero_shot_head(t)
        self.load_state(state)
        return {t: self._score(t, split) for t in names}
