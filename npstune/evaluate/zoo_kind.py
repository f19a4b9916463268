"""Kind ``zoo``: the offline zoo's text tasks (body + each task's fine-tuned head).

The zoo comes from the search (``zoo: small|full``) or the evaluator file
(``zoo: small``); see :class:`~npstune.evaluate.text.TextClassificationEvaluator`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from npstune.errors import ConfigError
from npstune.evaluate.kinds import BuildContext, EvaluatorKind, KindOptions


class ZooOptions(KindOptions):
    """Which zoo (default: the search's), and its token limit (default:
    the recipe's)."""

    zoo: Literal["small", "full"] | None = None
    zoo_cache: str | None = None
    max_len: int | None = Field(None, ge=2)


def build(options: ZooOptions, ctx: BuildContext) -> object:
    """A zoo evaluator with ``ctx.prepare``'s splits tokenized and the heads loaded.

    Calibration scores the same number of examples in every task: the smallest
    calibration split (or ``max_examples``), times ``fraction``.
    """
    from npstune.evaluate.text import TextClassificationEvaluator

    zoo = ctx.zoo
    if zoo is None:
        if options.zoo is None:
            raise ConfigError(f"{ctx.source}: evaluator kind zoo needs zoo: small|full")
        from npstune.zoo import load_zoo

        zoo = load_zoo(options.zoo, options.zoo_cache)
    tasks = list(ctx.tasks) if ctx.tasks is not None else list(zoo.tasks)
    split = ctx.prepare[0] if ctx.prepare else None
    n = ctx.max_examples.get(split) if split else None
    if split == "calibration":
        sizes = [len(zoo.split(t, split)[1]) for t in tasks]
        n = min([n or s for s in sizes] + sizes)
        n = max(1, math.floor(n * ctx.fraction.get(split, 1.0) + 1e-9))
    ev = TextClassificationEvaluator(
        zoo,
        device=ctx.device,
        batch_size=ctx.batch_size,
        max_examples=n,
        max_len=options.max_len,
        precision=ctx.precision,
    )
    for t in tasks:  # tokenize and load heads now: workers never touch the zoo files
        for s in ctx.prepare:
            ev.batches(t, s)
        ev.head(t)
    return ev


KIND = EvaluatorKind(
    "zoo",
    ZooOptions,
    build,
    summary="the offline zoo's text tasks (MiniLM body + task heads)",
    needs_model=False,
)
