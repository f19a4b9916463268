"""CLIP zero-shot classification (DESIGN §9), as in the paper's vision experiments.

Only the image tower is merged; each task's head comes from the pretrained text tower:
for every class, the prompt embeddings ("a photo of a {c}." ...) are L2-normalised,
averaged and renormalised, giving W [D, C]; logits = 100 · normalize(f_img) · W.

The head and scoring code lives here once: :func:`zero_shot_head` and
:func:`zero_shot_logits` take plain callables, and :class:`ClipZeroShotEvaluator` works
with any module that has ``encode_image`` / ``encode_text`` and a tokenizer returning a
token tensor; :meth:`ClipZeroShotEvaluator.from_open_clip` builds one from open_clip
(the optional ``clip`` extra, imported lazily). The ``clip`` evaluator kind
(:mod:`npstune.evaluate.clip_kind`) subclasses it for Hugging Face ``CLIPModel`` dirs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from npstune.errors import CheckpointError, ConfigError, missing
from npstune.evaluate.base import State
from npstune.evaluate.hf import autocast, fp32_region
from npstune.evaluate.kinds import check_precision

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")
#: OpenAI CLIP's pixel mean and std (RGB, on [0, 1] pixels).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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
        roots = ("torchvision", "timm", "open_clip")
        for name in [m for m in sys.modules if m.split(".")[0] in roots]:
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
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}


def register_tiny_clip(directory: str | Path) -> str:
    """Register the tiny test config with open_clip (no download); return its name."""
    open_clip = import_open_clip()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(d)
    return TINY_CLIP_NAME


@torch.no_grad()
def zero_shot_head(
    encode_prompts: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> Tensor:
    """W [D, C]: per class, the mean of its L2-normalised prompt embeddings,
    renormalised.

    ``encode_prompts(texts) -> [len(texts), D]`` embeds a batch of prompts; the prompts
    are every template formatted with every class name, ``batch_size`` at a time.
    """
    if not classnames or not templates:
        raise ConfigError("a zero-shot head needs at least one class and one template")
    prompts = [tpl.format(c) for c in classnames for tpl in templates]
    step = max(1, batch_size)
    emb = torch.cat(
        [
            nn.functional.normalize(
                encode_prompts(prompts[s : s + step]).float(), dim=-1
            )
            for s in range(0, len(prompts), step)
        ]
    )
    mean = emb.view(len(classnames), len(templates), -1).mean(1)
    return nn.functional.normalize(mean, dim=-1).T.contiguous()


def zero_shot_logits(features: Tensor, head: Tensor) -> Tensor:
    """``100 · normalize(features) · W`` for image features [N, D] and a head [D, C]."""
    return 100.0 * nn.functional.normalize(features.float(), dim=-1) @ head


def normalize_pixels(
    images: Tensor, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """uint8 images [N, 3, H, W] -> float32 on [0, 1], normalised per channel."""
    x = images.to(torch.float32) / 255.0
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class OpenClipModel(Protocol):
    """What the default model adapters use: open_clip's ``CLIP`` API."""

    visual: nn.Module

    def encode_text(self, text: Tensor) -> Tensor: ...

    def encode_image(self, image: Tensor) -> Tensor: ...


@dataclass
class ClipTask:
    """Class names, prompt templates and labelled image splits of one task.

    ``splits`` maps a split to ``(images [N, 3, H, W], labels [N])``; float images are
    used as given, uint8 images are scaled and normalised per batch (see
    :class:`ClipZeroShotEvaluator`'s ``pixel_norm``). Any mapping works, e.g. one that
    loads a split on first use.
    """

    classnames: Sequence[str]
    splits: Mapping[str, tuple[Tensor, Tensor]]
    templates: Sequence[str] = field(default_factory=lambda: DEFAULT_TEMPLATES)


class ClipZeroShotEvaluator:
    """Accuracy of an image-tower state with zero-shot heads from class-name prompts.

    Args:
        model: a CLIP model with ``encode_image``, ``encode_text`` and a ``visual``
            tower.
        tokenizer: ``tokenizer(list_of_str) -> LongTensor`` (open_clip's tokenizer).
        tasks: task name -> :class:`ClipTask`.
        prefix: the key prefix of the image tower in full-model states (``"visual."``);
            states may use the prefixed keys or the tower's own.
        pixel_norm: ``(mean, std)`` applied to uint8 images (default: OpenAI CLIP's).

    Subclasses adapt other model APIs by overriding :meth:`encode_prompts`,
    :meth:`encode_images` and :meth:`load_state`. ``precision`` (``auto``, ``fp32``,
    ``bf16``) is the image tower's autocast (:func:`npstune.evaluate.hf.autocast`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Any],
        tasks: Mapping[str, ClipTask],
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        prefix: str = "visual.",
        pixel_norm: tuple[Sequence[float], Sequence[float]] | None = None,
        precision: str = "auto",
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.precision = check_precision(precision)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tasks_ = dict(tasks)
        self.batch_size = batch_size
        self.prefix = prefix
        mean, std = pixel_norm or (OPENAI_MEAN, OPENAI_STD)
        self.pixel_norm = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
        self._heads: dict[str, Tensor] = {}

    @classmethod
    def from_open_clip(
        cls,
        model_name: str,
        tasks: Mapping[str, ClipTask],
        pretrained: str | None = None,
        **kw: Any,
    ) -> ClipZeroShotEvaluator:
        """Build the model and tokenizer with open_clip (``pretrained=None``: no
        download)."""
        open_clip = import_open_clip()
        model = open_clip.create_model(model_name, pretrained=pretrained)
        return cls(model, open_clip.get_tokenizer(model_name), tasks, **kw)

    @property
    def tasks(self) -> list[str]:
        return list(self.tasks_)

    def metric(self, task: str) -> str:
        """Every CLIP task reports top-1 accuracy."""
        self._task(task)
        return "accuracy"

    def examples(self, task: str, split: str) -> int:
        """How many examples ``task``'s ``split`` scores."""
        splits = self._task(task).splits
        if split not in splits:
            self._split(task, split)  # raises the clear error
        size = getattr(splits, "size", None)  # lazy splits count without loading
        return int(size(split)) if callable(size) else len(splits[split][1])

    def _task(self, name: str) -> ClipTask:
        try:
            return self.tasks_[name]
        except KeyError:
            raise ConfigError(
                f"unknown task {name!r}; valid: {', '.join(self.tasks_)}"
            ) from None

    def _split(self, task: str, split: str) -> tuple[Tensor, Tensor]:
        t = self._task(task)
        if split not in t.splits:
            raise ConfigError(
                f"task {task!r} has no {split!r} split; it has: "
                f"{', '.join(t.splits) or 'none'}"
            )
        return t.splits[split]

    # -- model adapters (override for other CLIP APIs) --------------------------------
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Text embeddings [len(prompts), D] of the (pretrained) text tower."""
        model = cast(OpenClipModel, self.model)  # the API these adapters assume
        return model.encode_text(self.tokenizer(prompts).to(self.device))

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Image embeddings [N, D] of preprocessed pixels [N, 3, H, W]."""
        return cast(OpenClipModel, self.model).encode_image(pixels)

    def zero_shot_head(self, task: str) -> Tensor:
        """W [D, C] of ``task``, built on first use (see :func:`zero_shot_head`)."""
        if task not in self._heads:
            t = self._task(task)
            self._heads[task] = zero_shot_head(
                self.encode_prompts,
                list(t.classnames),
                list(t.templates),
                self.batch_size,
            )
        return self._heads[task]

    def load_state(self, state: State, source: str = "state") -> None:
        """Load an image-tower state (keys with or without ``prefix``), checked by
        name."""
        tower = cast(OpenClipModel, self.model).visual
        own = tower.state_dict()
        p = self.prefix
        st = {
            k[len(p) :] if p and k.startswith(p) else k: v
            for k, v in state.items()
            if not p or k.startswith(p) or k in own
        }
        extra = [k for k in st if k not in own]
        missing_ = [k for k in own if k not in st]
        if extra or missing_:
            key = p + (extra or missing_)[0]
            what = "is not in the image tower" if extra else "is missing"
            raise CheckpointError(f"{source}: key {key!r} {what}")
        tower.load_state_dict(st, strict=True)

    # -- scoring ----------------------------------------------------------------------
    def _pixels(self, images: Tensor) -> Tensor:
        x = images.to(self.device)
        if x.dtype == torch.uint8:
            return normalize_pixels(x, *self.pixel_norm)
        return x

    @torch.no_grad()
    def _predict(self, task: str, split: str) -> tuple[Tensor, Tensor]:
        images, labels = self._split(task, split)
        w = self.zero_shot_head(task)
        preds = []
        with autocast(self.device, self.precision):  # one weight cast per split
            for s in range(0, len(labels), self.batch_size):
                x = self._pixels(images[s : s + self.batch_size])
                f = self.encode_images(x)
                with fp32_region(self.device):
                    preds.append(zero_shot_logits(f.float(), w).argmax(-1).cpu())
        empty = torch.zeros(0, dtype=torch.long)
        return (torch.cat(preds) if preds else empty), labels

    def _score(self, task: str, split: str) -> float:
        pred, labels = self._predict(task, split)
        return float((pred == labels.to(pred.dtype)).sum()) / max(1, len(labels))

    def predictions(self, state: State, task: str, split: str = "test") -> Tensor:
        """The predicted class index [N] of every example of ``task``'s ``split``."""
        self.zero_shot_head(task)
        self.load_state(state)
        return self._predict(task, split)[0]

    def evaluate(self, state: State, task: str, split: str = "test") -> float:
        self._task(task)
        self.zero_shot_head(task)  # heads come from the pretrained text tower: first
        self.load_state(state)
        return self._score(task, split)

    def evaluate_many(
        self, state: State, tasks: Iterable[str] | None = None, split: str = "test"
    ) -> dict[str, float]:
        names = list(tasks) if tasks is not None else self.tasks
        for t in names:
            self.zero_shot_head(t)
        self.load_state(state)
        return {t: self._score(t, split) for t in names}
