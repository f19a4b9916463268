"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

# ---- zoo fixtures (owner: zoo/evaluate) ----------------------------------------------------
# `small_zoo` builds the real small zoo once per session into the normal cache
# ($NPSTUNE_ZOO_DIR or ~/.cache/npstune/zoo), so later runs, the CLI and CI reuse it.
# `zoo_sources` fetches the pinned source archives into the same cache.


@pytest.fixture(scope="session")
def small_zoo():
    from npstune.zoo import build_zoo

    return build_zoo("small", progress=False)


@pytest.fixture(scope="session")
def zoo_sources():
    from npstune.zoo.core import default_cache_dir
    from npstune.zoo.recipe import ZOO_SIZES
    from npstune.zoo.sources import fetch_sources

    return fetch_sources(default_cache_dir(), ZOO_SIZES["full"].sources)


# ---- end of zoo fixtures ---------------------------------------------------------------------
