"""Where the command line gets every name it offers: each function asks one registry.

The CLI retypes no method, backend, kind or benchmark name; its choices and help lists
call these when they are shown or checked (never at import, so ``npstune --help`` does
not import torch or Ray).
"""

from __future__ import annotations


def merge_methods() -> list[str]:
    """``npstune merge --method``: the merge registry (built-ins and plugins)."""
    from npstune.merge.registry import method_names

    return method_names()


def data_methods() -> list[str]:
    """Merge methods that need calibration data (``--zoo`` / ``--evaluator``)."""
    from npstune.merge.registry import get_method

    return [n for n in merge_methods() if get_method(n).needs_data]


def methods_with(field: str) -> list[str]:
    """Merge methods whose parameters include ``field`` (``lam``, ``q``, ...)."""
    from npstune.merge.registry import get_method

    return [n for n in merge_methods() if field in get_method(n).params.model_fields]


def adapter_methods() -> list[str]:
    """Methods that ``--out-format adapter`` can write exactly."""
    from npstune.merge.base import ADAPTER_METHODS

    return list(ADAPTER_METHODS)


def sparse_methods() -> list[str]:
    """``npstune compress --method``: the store's method table."""
    from npstune.compress.store import SPARSE_METHODS

    return list(SPARSE_METHODS)


def sparse_methods_with(field: str) -> list[str]:
    """Compress methods whose merge method takes parameter ``field``."""
    from npstune.compress.store import SPARSE_METHODS
    from npstune.merge.registry import get_method

    return [
        n
        for n, m in SPARSE_METHODS.items()
        if field in get_method(m).params.model_fields
    ]


def value_dtypes() -> list[str]:
    """``npstune compress --value-dtype``: the store's 16-bit value types."""
    from npstune.compress.manifest import DTYPES

    return [n for n, d in DTYPES.items() if d.itemsize == 2]


def search_backends() -> list[str]:
    """``npstune search --backend``: the search backend table."""
    from npstune.search.backends import BACKENDS

    return sorted(BACKENDS)


def evaluator_kinds() -> list[str]:
    """Evaluator kinds (built-ins and plugins)."""
    from npstune.evaluate.kinds import kind_names

    return kind_names()


def precisions() -> list[str]:
    """``npstune eval --precision``: the evaluators' forward-pass precisions."""
    from npstune.evaluate.kinds import PRECISIONS

    return list(PRECISIONS)


def splits() -> list[str]:
    """The evaluation splits an evaluator scores."""
    from npstune.evaluate.kinds import SPLITS

    return list(SPLITS)


def zoo_sizes() -> list[str]:
    """The offline zoo's sizes (every family has the same)."""
    from npstune.zoo import ZOO_FAMILIES

    return sorted({s for f in ZOO_FAMILIES.values() for s in f.sizes})


def zoo_families() -> list[str]:
    """``npstune zoo build --family``: the zoo families."""
    from npstune.zoo import ZOO_FAMILIES

    return list(ZOO_FAMILIES)


def benchmarks() -> list[str]:
    """``npstune bench NAME``: the benchmark table (``benchmarks.BENCHMARKS``)."""
    from benchmarks import BENCHMARKS

    return list(BENCHMARKS)


def prune_methods() -> list[str]:
    """``npstune merge --prune``: the pruning steps a merge can run first."""
    from npstune.merge.preprune import prune_names

    return prune_names()


def prunable_methods() -> list[str]:
    """Merge methods that take ``--prune`` (those that merge task vectors)."""
    return [n for n in merge_methods() if n not in data_methods()]
