"""The offline model zoo (DESIGN §7): a real pretrained body and fine-tuned task models.

Build once, then load::

    from npstune.zoo import build_zoo, load_zoo
    zoo = build_zoo("small")          # cached: a second call returns at once
    zoo.base_path                     # HF dir of the pretrained body
    zoo.tasks                         # ["rotten-tomatoes", ...]
    t = zoo.task("election")          # .model_path .head_path .num_classes .labels
    texts, labels = zoo.split("election", "calibration")

The cache lives in ``$NPSTUNE_ZOO_DIR`` or ``~/.cache/npstune/zoo`` and is keyed by a
hash of the recipe, so a changed recipe builds a fresh zoo.
"""

from npstune.zoo.build import build_zoo
from npstune.zoo.core import Zoo, ZooTask, default_cache_dir, load_zoo
from npstune.zoo.datasets import SPLITS, TASKS
from npstune.zoo.recipe import ZOO_SIZES, ZooRecipe

__all__ = [
    "ZOO_SIZES",
    "SPLITS",
    "TASKS",
    "Zoo",
    "ZooRecipe",
    "ZooTask",
    "build_zoo",
    "default_cache_dir",
    "load_zoo",
]
