"""The streamed NPS candidate path against the ranked one, and the choice between them.

Both paths must give the same state for every candidate, bit for bit (fusion with one λ
and one per task, compression's per-task states, fp32 and bf16 checkpoints, read
chunks that cut tensors anywhere), so a search picks the same best candidate on either.
"""

from __future__ import annotations

import pytest
import torch

from npstune.search.objective import build_payload
from npstune.search.space import load_config
from npstune.search.stream import (
    GIB,
    StreamPayload,
    choose_path,
    ranked_bytes,
)
from tests.test_search_support import write_tiny_search
from tests.tiny import make_set


def test_memory_estimate_and_choice_hand_checked():
    # 3 task vectors of 10⁶ entries: 2·16·3·10⁶ + 16·10⁶ = 112·10⁶ bytes
    assert ranked_bytes(10**6, 3) == 112 * 10**6
    mem = choose_path("auto", 10**6, 3, available=10**9)
    assert mem.path == "memory" and "ranked in memory" in mem.reason
    assert "0.10 GiB" in mem.reason and "0.9 GiB available" in mem.reason
    # 112 MB > half of 200 MB: streamed
    st = choose_path("auto", 10**6, 3, available=200 * 10**6)
    assert st.path == "stream" and "more than 50%" in st.reason
    # forced either way, whatever the estimate; unknown memory: the fast path
    assert choose_path("stream", 10, 1, available=GIB).path == "stream"
    assert choose_path("memory", 10**9, 8, available=GIB).path == "memory"
    assert choose_path("auto", 10**6, 3, available=None).path == "memory"
    # a 7B × 3 search (6.7e9 entries) on a 24 GiB node cannot be ranked in memory
    assert choose_path("auto", 6_700_000_000, 3, available=24 * GIB).path == "stream"


def _payloads(tmp_path, **sections):
    path = write_tiny_search(tmp_path, **sections)
    cfg = load_config(path)
    out = {}
    for how in ("memory", "stream"):
        c = cfg.model_copy(
            update={"nps": cfg.nps.model_copy(update={"candidates": how})}
        )
        out[how] = build_payload(c)
    assert isinstance(out["stream"], StreamPayload)
    assert out["memory"].candidates == "memory" and out["stream"].candidates == "stream"
    return out


def _states(obj, cand):
    return [(t, {k: v.clone() for k, v in s.items()}) for t, s in obj.states(cand)]


def _random_candidates(space, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.rand(space.dim, generator=g, dtype=torch.float64).tolist()
        yield space.candidate(space.from_unit(x))


def _assert_same(a, b):
    assert [t for t, _ in a] == [t for t, _ in b]
    for (_, sa), (_, sb) in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "sections",
    [
        {},  # fusion: one weight vector, one λ
        {
            "nps": {
                "subspaces": 3,
                "k": {"low": 0.05, "high": 0.9},
                "lam": {"low": 0.2, "high": 2.0},
                "lam_per_task": True,
                "weights": {"per_task": True},
            }
        },
        {"use": "compression", "nps": {"subspaces": 2, "weights": {"per_task": True}}},
    ],
    ids=["fusion", "fusion-per-task", "compression"],
)
def test_streamed_states_equal_the_ranked_ones(tmp_path, monkeypatch, sections):
    import npstune.taskvector as tv

    monkeypatch.setattr(tv, "CHUNK", 7)  # chunks cut tensors, ties and subspaces
    p = _payloads(tmp_path, **sections)
    mem, st = p["memory"].objective(), p["stream"].objective()
    assert p["memory"].frozen == p["stream"].frozen
    for cand in _random_candidates(mem.space, 6, seed=len(sections)):
        _assert_same(_states(mem, cand), _states(st, cand))
        assert mem.bits(cand) == st.bits(cand)
    # the same scores, metric by metric (timings aside)
    cand = mem.space.candidate(mem.space.init_config())
    a, b = mem.score(cand), st.score(cand)
    for key in a:
        if not key.endswith("_s"):
            assert a[key] == b[key], key


def test_a_key_one_task_leaves_unchanged(tmp_path):
    """Compression's one-task states keep every task's keys in scope: a key that one
    fine-tuned model did not change is still part of its τ (zeros), as ranked."""
    from safetensors.torch import load_file, save_file

    path = write_tiny_search(
        tmp_path, use="compression", nps={"subspaces": 2, "k": 0.3}
    )
    cfg = load_config(path)
    base = load_file(cfg.base)
    first = load_file(cfg.models[0])
    key = next(k for k, v in base.items() if v.is_floating_point())
    first[key] = base[key].clone()
    save_file(first, cfg.models[0])
    objs = []
    for how in ("memory", "stream"):
        nps = cfg.nps.model_copy(update={"candidates": how})
        objs.append(build_payload(cfg.model_copy(update={"nps": nps})).objective())
    for cand in _random_candidates(objs[0].space, 4, seed=5):
        _assert_same(_states(objs[0], cand), _states(objs[1], cand))


def test_bf16_checkpoints(tmp_path):
    """bf16 checkpoints: τ in float32, ties everywhere, the state cast once."""
    import yaml

    path = write_tiny_search(tmp_path)
    bp, mps, *_ = make_set(tmp_path / "bf16", dtype=torch.bfloat16)
    raw = yaml.safe_load(path.read_text())
    raw.update(base=str(bp), models=[str(m) for m in mps])
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    objs = []
    for how in ("memory", "stream"):
        nps = cfg.nps.model_copy(update={"candidates": how})
        objs.append(build_payload(cfg.model_copy(update={"nps": nps})).objective())
    for cand in _random_candidates(objs[0].space, 4, seed=3):
        a, b = _states(objs[0], cand), _states(objs[1], cand)
        _assert_same(a, b)
        assert any(v.dtype == torch.bfloat16 for v in a[0][1].values())


def test_bad_candidates_value_is_refused(tmp_path):
    from npstune.errors import ConfigError

    path = write_tiny_search(tmp_path, nps={"candidates": "disk"})
    with pytest.raises(ConfigError, match="candidates"):
        load_config(path)


@pytest.mark.slow
def test_candidates_written_into_the_zoo_evaluators_model(small_zoo, tmp_path):
    """With the zoo's text evaluator, a streamed candidate is written into the
    evaluator's own body (no state of its own, no copy on load), and every score equals
    the ranked path's, whose states the evaluator copies in."""
    import yaml

    raw = {
        "zoo": "small",
        "tasks": small_zoo.tasks[:2],
        "evaluator": {"calibration_examples": 24},
        "nps": {"subspaces": 3},
    }
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    objs = {}
    for how in ("memory", "stream"):
        nps = cfg.nps.model_copy(update={"candidates": how})
        c = cfg.model_copy(update={"nps": nps})
        objs[how] = build_payload(c, small_zoo).objective()
    st = objs["stream"]
    assert st.in_place
    own = st.p.evaluator.targets()
    for cand in _random_candidates(st.space, 3, seed=11):
        ((_, state),) = list(st.states(cand))
        for k in st.plan.delta_keys:  # the body's own memory, not a copy
            assert state[k].data_ptr() == own[k].data_ptr(), k
        a, b = objs["memory"].score(cand), st.score(cand)
        assert {k: v for k, v in a.items() if not k.endswith("_s")} == {
            k: v for k, v in b.items() if not k.endswith("_s")
        }
    # the ranked state and the body the candidate was written into agree bit for bit
    ((_, ref),) = list(objs["memory"].states(cand))
    ((_, got),) = list(st.states(cand))
    for k in st.plan.delta_keys:
        assert torch.equal(ref[k], got[k]), k


def test_an_evaluator_without_targets_gets_a_state_of_its_own(tmp_path):
    p = _payloads(tmp_path)
    st = p["stream"].objective()
    assert not st.in_place  # the callable kind holds no model
    ((_, state),) = list(st.states(st.space.candidate(st.space.init_config())))
    assert all(state[k].device.type == "cpu" for k in st.plan.delta_keys)
