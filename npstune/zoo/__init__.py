"""The offline model zoo (DESIGN §7): a real pretrained body and fine-tuned task models.

Build once, then load::

    from npstune.zoo import build_zoo, load_zoo
    zoo = build_zoo("small")          # cached: a second call returns at once
    zoo.base_path                     # HF dir of the pretrained body
    zoo.tasks                         # ["rotten-tomatoes", ...]
    t = zoo.task("election")          # .model_path .head_path .num_classes .labels
    texts, labels = zoo.split("election", "calibration")

The cache lives in ``$NPSTUNE_ZOO_DIR`` or ``~/.cache/npstune/zoo`` and is keyed by a
hash of the recipe, so a changed recipe builds a fresh zoo. The LLM family
(:mod:`npstune.zoo.llm`: SmolLM2-135M-Instruct and three experts) shares the cache.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npstune.zoo.build import build_zoo
from npstune.zoo.core import Zoo, ZooTask, default_cache_dir, load_zoo, zoo_dir
from npstune.zoo.datasets import SPLITS, TASKS
from npstune.zoo.llm import LLM_ZOO_SIZES, build_llm_zoo, llm_zoo_dir, load_llm_zoo
from npstune.zoo.recipe import ZOO_SIZES, ZooRecipe


@dataclass(frozen=True)
class ZooFamily:
    """A zoo family: its recipes by size, and how to build, load and find one."""

    sizes: Mapping[str, Any]
    build: Callable[..., Any]
    load: Callable[..., Any]
    root: Callable[[Any, Path], Path]


#: ``npstune zoo build --family``: the families and their sizes
ZOO_FAMILIES: dict[str, ZooFamily] = {
    "text": ZooFamily(ZOO_SIZES, build_zoo, load_zoo, zoo_dir),
    "llm": ZooFamily(LLM_ZOO_SIZES, build_llm_zoo, load_llm_zoo, llm_zoo_dir),
}

__all__ = [
    "LLM_ZOO_SIZES",
    "ZOO_FAMILIES",
    "ZOO_SIZES",
    "SPLITS",
    "TASKS",
    "Zoo",
    "ZooRecipe",
    "ZooTask",
    "ZooFamily",
    "build_llm_zoo",
    "build_zoo",
    "default_cache_dir",
    "load_llm_zoo",
    "load_zoo",
]
