"""The --device path: CPU everywhere, CUDA where present (skipped otherwise)."""

from __future__ import annotations

import pytest
import torch

from npstune.errors import ConfigError
from npstune.merge import merge
from npstune.runtime import resolve_device
from npstune.sparsify.ranked import RankedTaskVector
from tests.tiny import make_set

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="expected cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(
    "method", ["ties", "nps", "magnitude", "dare", "consensus-ties"]
)
def test_cuda_merge_equals_cpu_merge(tmp_path, method):
    bp, mps, _, _ = make_set(tmp_path)
    cpu = merge(bp, mps, method, {}, device="cpu").state
    gpu = merge(bp, mps, method, {}, device="cuda").state
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=0, atol=1e-7)


@pytest.mark.gpu
@cuda
def test_cuda_ranked_candidates_equal_cpu():
    g = torch.Generator().manual_seed(0)
    taus = {
        "a": torch.randn(1000, generator=g),
        "b": torch.round(torch.randn(500, generator=g) * 3) / 3,
    }
    w = torch.rand(8, generator=g) * 2
    cpu = RankedTaskVector(taus, 8).prune(w, 0.1).dense()
    gpu = RankedTaskVector(
        {k: v.cuda() for k, v in taus.items()}, 8, device="cuda"
    ).prune(w, 0.1)
    assert torch.equal(gpu.dense().cpu(), cpu)
