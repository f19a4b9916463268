"""The ``clip`` evaluator kind: CLIP zero-shot image classification from files.

```yaml
kind: clip
backend: auto            # auto | hf | open_clip (auto: HF if the model dir is a CLIP)
open_clip_model: null    # open_clip only: the model name (e.g. ViT-B-32)
templates: ["a photo of a {}."]   # default prompt templates of every task
image_size: null         # default: the model's (HF: vision_config.image_size)
tasks:
  pets:
    data: {calibration: pets/cal, test: pets/test.csv}
    classnames: null     # default: the sorted subfolder names / list labels
    templates: null      # default: the file's templates
```

A split is an image folder with one subfolder of images per class, or a file list
(``.csv`` with columns ``path,label`` or ``.jsonl`` with those fields; paths relative to
the list). All splits of a task use one form. ``classnames`` is a list (folder form:
one per sorted subfolder; list form: the labels themselves) or a mapping from folder
name / label to the class name put in the prompts.

Heads are built once, at build time, from the pretrained model's text tower
(:func:`npstune.evaluate.clip.zero_shot_head`); images are decoded with PIL, resized
(shorter side, bicubic), center-cropped and cached per split as uint8 [N, 3, S, S],
then normalised per batch (mean/std from ``preprocessor_config.json``, else OpenAI's).
Folder splits list their examples round-robin over the classes (sorted file names
within a class), so ``max_examples`` keeps the classes balanced.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from npstune.errors import CheckpointError, ConfigError, ShapeMismatchError, missing
from npstune.evaluate.base import State
from npstune.evaluate.clip import (
    OPENAI_MEAN,
    OPENAI_STD,
    ClipTask,
    ClipZeroShotEvaluator,
    import_open_clip,
)
from npstune.evaluate.hf import load_into_module, read_state
from npstune.evaluate.kinds import SPLITS, BuildContext, EvaluatorKind, KindOptions

if TYPE_CHECKING:  # transformers is imported when the hf backend is built
    from transformers import CLIPModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
LIST_SUFFIXES = (".csv", ".jsonl")
#: Key prefixes of a Hugging Face ``CLIPModel``'s image tower.
VISION_PREFIXES = ("vision_model.", "visual_projection.")


# ---- options ------------------------------------------------------------------------
def _check_templates(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("give at least one template")
    for t in value:
        try:
            a, b = t.format("<a>"), t.format("<b>")
        except (IndexError, KeyError, ValueError):
            a = b = ""
        if a == b:
            raise ValueError(f"template {t!r} needs one {{}} for the class name")
    return value


def _str(x: Any) -> Any:
    """YAML reads folder names like ``0`` as ints; names are strings."""
    return str(x) if isinstance(x, int) and not isinstance(x, bool) else x


class ClipData(KindOptions):
    """A task's data: per split, an image folder or a ``.csv``/``.jsonl`` file list."""

    calibration: str | None = None
    test: str | None = None

    @model_validator(mode="after")
    def _some_split(self) -> ClipData:
        if self.calibration is None and self.test is None:
            raise ValueError("give a calibration or a test split")
        return self


class ClipTaskOptions(KindOptions):
    """One task: its data, optional class names and prompt templates."""

    data: ClipData
    classnames: list[str] | dict[str, str] | None = None
    templates: list[str] | None = None

    @field_validator("classnames", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if isinstance(v, list):
            v = [_str(x) for x in v]
            dup = [x for i, x in enumerate(v) if x in v[:i]]
            if dup:
                raise ValueError(f"class name {dup[0]!r} appears twice")
        elif isinstance(v, dict):
            v = {_str(k): _str(x) for k, x in v.items()}
        if v is not None and not v:
            raise ValueError("give at least one class name (or leave it out)")
        return v

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[str] | None) -> list[str] | None:
        return _check_templates(v)


class ClipOptions(KindOptions):
    """The ``clip`` kind's keys (see the module docstring)."""

    backend: Literal["auto", "hf", "open_clip"] = "auto"
    open_clip_model: str | None = None
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."])
    image_size: int | None = Field(None, ge=1)
    tasks: dict[str, ClipTaskOptions] = Field(min_length=1)

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        return _check_templates(v) or []


# ---- images -------------------------------------------------------------------------
def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise missing("images", "pillow") from None
    return Image


def preprocess_image(image: Any, size: int) -> Tensor:
    """A PIL image -> uint8 [3, size, size]: RGB, shorter side resized to ``size``
    (bicubic), center crop (CLIP's preprocessing before scaling and normalising)."""
    Image = _pil()
    img = image.convert("RGBA") if image.mode == "P" else image
    img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = size, max(size, int(size * h / w))
    else:
        nw, nh = max(size, int(size * w / h)), size
    img = img.resize((nw, nh), resample=Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(size, size, 3).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, size: int) -> Tensor:
    """Decode ``path`` and :func:`preprocess_image` it."""
    with _pil().open(path) as im:
        return preprocess_image(im, size)


@dataclass(frozen=True)
class SplitSource:
    """One split's examples before decoding: image files and class indices."""

    where: str  # "file: tasks.T.data.split", for messages
    files: tuple[Path, ...]
    labels: tuple[int, ...]


class ImageSplits(Mapping[str, tuple[Tensor, Tensor]]):
    """A task's splits, decoded on first use and cached as (uint8 images, labels).

    Only the first ``counts[split]`` examples are decoded (the context's limits).
    """

    def __init__(
        self,
        sources: Mapping[str, SplitSource],
        image_size: int,
        counts: Mapping[str, int],
    ):
        self.sources = dict(sources)
        self.image_size = int(image_size)
        self.counts = dict(counts)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def __getitem__(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in self._cache:
            self._cache[split] = self._load(split)
        return self._cache[split]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def __contains__(self, split: object) -> bool:
        return split in self.sources

    def size(self, split: str) -> int:
        """How many examples ``split`` scores (without decoding them)."""
        return self.counts[split]

    @property
    def loaded(self) -> tuple[str, ...]:
        """The splits decoded so far."""
        return tuple(self._cache)

    def _load(self, split: str) -> tuple[Tensor, Tensor]:
        src = self.sources[split]  # KeyError for unknown splits, as a Mapping should
        n = self.counts[split]
        Image = _pil()
        s = self.image_size
        images = torch.empty((n, 3, s, s), dtype=torch.uint8)
        for i, f in enumerate(src.files[:n]):
            try:
                images[i] = load_image(f, self.image_size)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ConfigError(
                    f"{src.where}: cannot read image {f} ({why or type(exc).__name__})"
                ) from None
        labels = torch.tensor(src.labels[:n], dtype=torch.long)
        logger.info("clip: %s: %d images at %d px", src.where, n, self.image_size)
        return images, labels


# ---- data files -------------------------------------------------------------------
@dataclass(frozen=True)
class _Raw:
    path: Path
    files: tuple[Path, ...]
    keys: tuple[str, ...]  # folder names or list labels, one per file
    lines: tuple[int, ...]  # list form: the line of each entry (0: folder form)


def _images_in(folder: Path) -> list[Path]:
    def visible(f: Path) -> bool:
        return not any(part.startswith(".") for part in f.relative_to(folder).parts)

    return sorted(
        f
        for f in folder.rglob("*")
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and visible(f)
    )


def _scan_folder(folder: Path, where: str) -> _Raw:
    """One subfolder of images per class; examples round-robin over the classes."""
    subs = sorted(
        d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    per = {d.name: _images_in(d) for d in subs}
    if not any(per.values()):
        raise ConfigError(
            f"{where}: image folder {folder} has no images (expected one "
            "subfolder of images per class)"
        )
    empty = [name for name, files in per.items() if not files]
    if empty:
        raise ConfigError(f"{where}: class subfolder {folder / empty[0]} has no images")
    files: list[Path] = []
    keys: list[str] = []
    for i in range(max(len(v) for v in per.values())):
        for name, imgs in per.items():
            if i < len(imgs):
                files.append(imgs[i])
                keys.append(name)
    return _Raw(folder, tuple(files), tuple(keys), (0,) * len(files))


def _list_rows(path: Path, where: str) -> list[tuple[int, Any, Any]]:
    rows: list[tuple[int, Any, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read file list {path} ({exc})") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not {"path", "label"} <= set(reader.fieldnames or ()):
            raise ConfigError(
                f"{where}: {path}: expected a header with columns "
                f"path,label (got {','.join(reader.fieldnames or ())})"
            )
        for row in reader:
            rows.append((reader.line_num, row.get("path"), row.get("label")))
        return rows
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{where}: {path}:{n}: not valid JSON ({exc.msg})"
            ) from None
        if not isinstance(row, dict):
            raise ConfigError(
                f"{where}: {path}:{n}: expected an object with path and label"
            )
        rows.append((n, row.get("path"), row.get("label")))
    return rows


def _read_list(path: Path, where: str) -> _Raw:
    """A ``.csv``/``.jsonl`` file list: image paths (relative to it) and labels."""
    files, keys, lines = [], [], []
    for n, p, label in _list_rows(path, where):
        if p in (None, "") or label in (None, ""):
            raise ConfigError(f"{where}: {path}:{n}: an entry needs a path and a label")
        f = Path(str(p)).expanduser()
        f = f if f.is_absolute() else path.parent / f
        if not f.is_file():
            raise ConfigError(f"{where}: {path}:{n}: image file {f} does not exist")
        files.append(f)
        keys.append(str(label))
        lines.append(n)
    if not files:
        raise ConfigError(f"{where}: file list {path} lists no images (empty split)")
    return _Raw(path, tuple(files), tuple(keys), tuple(lines))


def _show(names: Sequence[str], k: int = 8) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def _task_data(
    name: str, topts: ClipTaskOptions, ctx: BuildContext
) -> tuple[list[str], dict[str, SplitSource]]:
    """Class names (for prompts) and each split's sources; checks the data's shape."""
    where = f"{ctx.source}: tasks.{name}"
    raw: dict[str, _Raw] = {}
    forms: dict[str, str] = {}
    for split in SPLITS:
        p = getattr(topts.data, split)
        if p is None:
            continue
        path, w = ctx.path(p), f"{where}.data.{split}"
        if path.is_dir():
            raw[split], forms[split] = _scan_folder(path, w), "folder"
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            raw[split], forms[split] = _read_list(path, w), "file list"
        elif path.exists():
            raise ConfigError(
                f"{w}: {path} is neither an image folder nor a .csv/.jsonl file list"
            )
        else:
            raise ConfigError(f"{w}: data path {path} does not exist")
    if len(set(forms.values())) > 1:
        desc = " but ".join(f"{s} is a {f}" for s, f in forms.items())
        raise ConfigError(
            f"{where}.data: {desc}; use one form for all splits of a task"
        )
    folder = "folder" in forms.values()
    found = sorted({k for r in raw.values() for k in r.keys})
    cn, wc = topts.classnames, f"{where}.classnames"
    if cn is None:
        order, names = found, found
    elif isinstance(cn, list):
        if folder and len(cn) != len(found):
            raise ConfigError(
                f"{wc}: {len(cn)} names for {len(found)} class folders ({_show(found)})"
            )
        order, names = (found if folder else list(cn)), list(cn)
    else:
        if folder:
            lack = [k for k in found if k not in cn]
            if lack:
                raise ConfigError(f"{wc}: class folder {lack[0]!r} has no name")
            extra = [k for k in cn if k not in found]
            if extra:
                raise ConfigError(
                    f"{wc}: {extra[0]!r} is not a class folder "
                    f"(folders: {_show(found)})"
                )
        order = found if folder else list(cn)
        names = [cn[k] for k in order]
    index = {k: i for i, k in enumerate(order)}
    sources = {}
    for split, r in raw.items():
        for key, line in zip(r.keys, r.lines, strict=True):
            if key not in index:
                raise ConfigError(
                    f"{where}.data.{split}: {r.path}:{line}: label "
                    f"{key!r} is not among the class names "
                    f"({_show(order)})"
                )
        sources[split] = SplitSource(
            f"{where}.data.{split}", r.files, tuple(index[k] for k in r.keys)
        )
    return names, sources


# ---- the Hugging Face evaluator ---------------------------------------------------
def _features(out: Any) -> Tensor:
    """The projected embeddings from ``get_*_features`` (a tensor, or ``pooler_output``
    in transformers >= 5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


class HFClipEvaluator(ClipZeroShotEvaluator):
    """:class:`~npstune.evaluate.clip.ClipZeroShotEvaluator` on a HF ``CLIPModel``.

    States use the ``CLIPModel`` state-dict names; they must hold the whole image tower
    (``vision_model.*``, ``visual_projection.weight``) and may hold the rest, which is
    checked by name and shape but not loaded: the heads come from the pretrained text
    tower, and the image features do not depend on it.
    """

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: PreTrainedTokenizerBase,
        tasks: Mapping[str, ClipTask],
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        pixel_norm: tuple[Sequence[float], Sequence[float]] | None = None,
        max_length: int | None = None,
        precision: str = "auto",
    ):
        super().__init__(
            model,
            tokenizer,
            tasks,
            device=device,
            batch_size=batch_size,
            prefix="",
            pixel_norm=pixel_norm,
            precision=precision,
        )
        cfg = model.config.text_config
        # transformers types the sub-configs dict | config | None (the __init__
        # arguments); a built CLIPConfig always holds the config objects
        self.max_length = int(
            max_length or cfg.max_position_embeddings  # type: ignore[union-attr]
        )
        self._tower = nn.ModuleDict(
            {
                "vision_model": model.vision_model,
                "visual_projection": model.visual_projection,
            }
        )
        self._shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        tok = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return _features(
            self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            )
        )

    def encode_images(self, pixels: Tensor) -> Tensor:
        kw = {}
        size = self.model.config.vision_config.image_size  # type: ignore[union-attr]
        if pixels.shape[-1] != size:  # (vision_config: see __init__)
            kw["interpolate_pos_encoding"] = True  # image_size: set off the model's
        return _features(self.model.get_image_features(pixel_values=pixels, **kw))

    def load_state(self, state: State, source: str = "state") -> None:
        """Copy the image tower from ``state``, checked by key and shape."""
        vision = {k: v for k, v in state.items() if k.startswith(VISION_PREFIXES)}
        for k, v in state.items():
            if k in vision or k.endswith("position_ids"):
                continue
            if k not in self._shapes:
                raise CheckpointError(f"{source}: key {k!r} is not in the CLIP model")
            if tuple(v.shape) != self._shapes[k]:
                raise ShapeMismatchError(
                    f"{source}:{k}: shape {tuple(v.shape)} != model {self._shapes[k]}"
                )
        load_into_module(self._tower, vision, source)


# ---- build ------------------------------------------------------------------------
def _hf_model_type(model: Path | None) -> str | None:
    cfg = model / "config.json" if model is not None else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        return str(json.loads(cfg.read_text()).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return None


def _backend(options: ClipOptions, ctx: BuildContext) -> str:
    mtype = _hf_model_type(ctx.model)
    if options.backend == "hf" or (options.backend == "auto" and mtype == "clip"):
        if mtype != "clip":
            got = f"model_type {mtype!r}" if mtype else "no config.json"
            raise ConfigError(
                f"{ctx.source}: backend hf needs a Hugging Face CLIP "
                f"directory; {ctx.model} has {got}"
            )
        return "hf"
    if options.backend == "open_clip" or options.open_clip_model:
        return "open_clip"
    raise ConfigError(
        f"{ctx.source}: cannot tell the CLIP backend: {ctx.model} is not "
        "a Hugging Face CLIP directory; set backend: open_clip and "
        "open_clip_model:"
    )


def _norm_from(model: Path) -> tuple[Sequence[float], Sequence[float]]:
    p = model / "preprocessor_config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text())
            return (
                tuple(map(float, cfg["image_mean"])),
                tuple(map(float, cfg["image_std"])),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{p}: cannot read image_mean/image_std ({exc})"
            ) from None
    return OPENAI_MEAN, OPENAI_STD


def _build_hf(
    options: ClipOptions,
    ctx: BuildContext,
    data: Mapping[str, tuple[list[str], list[str], dict[str, SplitSource]]],
) -> ClipZeroShotEvaluator:
    from transformers import AutoTokenizer, CLIPModel

    assert ctx.model is not None
    pretrained = CLIPModel.from_pretrained(str(ctx.model))
    # transformers wraps .to with functools.wraps, which mypy leaves unbound (self)
    model = pretrained.to(torch.float32).eval()  # type: ignore[arg-type]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ctx.model))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(
            f"{ctx.source}: {ctx.model}: no usable tokenizer "
            f"({first or type(exc).__name__})"
        ) from None
    size = options.image_size or int(model.config.vision_config.image_size)
    max_len = int(model.config.text_config.max_position_embeddings)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < max_len:
        max_len = tok_max
    return HFClipEvaluator(
        model,
        tokenizer,
        _tasks(data, size, ctx),
        device=ctx.device,
        batch_size=ctx.batch_size,
        pixel_norm=_norm_from(ctx.model),
        max_length=max_len,
        precision=ctx.precision,
    )


def _build_open_clip(
    options: ClipOptions,
    ctx: BuildContext,
    data: Mapping[str, tuple[list[str], list[str], dict[str, SplitSource]]],
) -> ClipZeroShotEvaluator:
    open_clip = import_open_clip()
    name = options.open_clip_model
    if not name:
        raise ConfigError(
            f"{ctx.source}: backend open_clip needs open_clip_model: (e.g. ViT-B-32)"
        )
    assert ctx.model is not None
    try:
        model = open_clip.create_model(name, pretrained=None)
    except RuntimeError as exc:
        raise ConfigError(f"{ctx.source}: open_clip_model: {exc}") from None
    load_into_module(model, read_state(ctx.model), str(ctx.model))
    size, norm = options.image_size, None
    get_cfg = getattr(open_clip, "get_model_preprocess_cfg", None)
    cfg = get_cfg(model) if callable(get_cfg) else {}
    if cfg.get("mean") and cfg.get("std"):
        norm = (tuple(cfg["mean"]), tuple(cfg["std"]))
    if size is None:
        s = cfg.get("size") or getattr(model.visual, "image_size", None)
        if s is None:
            raise ConfigError(
                f"{ctx.source}: set image_size: (open_clip model {name} does not say)"
            )
        size = int(s[0] if isinstance(s, (tuple, list)) else s)
    return ClipZeroShotEvaluator(
        model,
        open_clip.get_tokenizer(name),
        _tasks(data, size, ctx),
        device=ctx.device,
        batch_size=ctx.batch_size,
        pixel_norm=norm,
        precision=ctx.precision,
    )


def _tasks(
    data: Mapping[str, tuple[list[str], list[str], dict[str, SplitSource]]],
    size: int,
    ctx: BuildContext,
) -> dict[str, ClipTask]:
    out = {}
    for name, (classnames, templates, sources) in data.items():
        counts = {s: ctx.limit(s, len(src.files)) for s, src in sources.items()}
        out[name] = ClipTask(classnames, ImageSplits(sources, size, counts), templates)
    return out


def build(options: ClipOptions, ctx: BuildContext) -> ClipZeroShotEvaluator:
    """A CLIP zero-shot evaluator: data checked, heads built, ``ctx.prepare`` loaded."""
    if ctx.model is None:
        raise ConfigError(f"{ctx.source}: kind clip needs a model directory")
    names = list(ctx.tasks) if ctx.tasks is not None else list(options.tasks)
    unknown = [t for t in names if t not in options.tasks]
    if unknown:
        raise ConfigError(
            f"{ctx.source}: unknown task {unknown[0]!r}; valid: "
            f"{', '.join(options.tasks)}"
        )
    bad = [s for s in ctx.prepare if s not in SPLITS]
    if bad:
        raise ConfigError(
            f"{ctx.source}: unknown split {bad[0]!r} to prepare; valid: "
            f"{', '.join(SPLITS)}"
        )
    backend = _backend(options, ctx)
    data = {}
    for t in names:
        topts = options.tasks[t]
        classnames, sources = _task_data(t, topts, ctx)
        data[t] = (classnames, list(topts.templates or options.templates), sources)
    make = _build_hf if backend == "hf" else _build_open_clip
    ev = make(options, ctx, data)
    for t in names:
        ev.zero_shot_head(t)  # once, from the pretrained text tower
        splits = ev.tasks_[t].splits
        for split in ctx.prepare:
            if split in splits:
                splits[split]
    logger.info("clip: %s backend, %d tasks, heads built", backend, len(names))
    return ev


KIND = EvaluatorKind(
    "clip",
    ClipOptions,
    build,
    summary="CLIP zero-shot image classification: prompt heads from the pretrained "
    "text tower, image folders or file lists (HF CLIPModel or open_clip)",
    needs_model=True,
)
