"""Every merge method: hand-checked numbers, the dense oracle, and invariants."""

from __future__ import annotations

import pytest
import torch

from npstune.checkpoints import write_state_dict
from npstune.errors import ConfigError
from npstune.merge import get_method, merge, method_names
from npstune.merge.consensus import consensus_keep, tall_masks
from npstune.merge.ties import disjoint_mean
from npstune.taskvector import plan_merge
from tests import oracle
from tests.tiny import make_set

FLOAT_KEYS = ["encoder.0.bias", "encoder.0.weight", "encoder.1.weight", "norm.weight"]


def vec_models(tmp_path, base, taus):
    """Write one-tensor checkpoints: base vector and base + τ_t."""
    b = torch.tensor(base, dtype=torch.float32)
    bp = write_state_dict(tmp_path / "b.safetensors", {"w": b})
    mps = [
        write_state_dict(tmp_path / f"m{i}.safetensors", {"w": b + torch.tensor(t)})
        for i, t in enumerate(taus)
    ]
    return bp, mps


def merged_delta(tmp_path, taus, method, params):
    base = [0.0] * len(taus[0])
    bp, mps = vec_models(tmp_path, base, taus)
    return merge(bp, mps, method, params).state["w"].tolist()


# ------------------------------------------------------------- hand-checked numbers
def test_average_and_task_arithmetic_hand_checked(tmp_path):
    taus = [[1.0, -2.0, 4.0], [3.0, 2.0, 0.0]]
    assert merged_delta(tmp_path, taus, "average", {}) == [2.0, 0.0, 2.0]
    assert merged_delta(tmp_path, taus, "task-arithmetic", {"lam": 0.5}) == [
        2.0,
        0.0,
        2.0,
    ]
    assert merged_delta(tmp_path, taus, "task-arithmetic", {}) == pytest.approx(
        [1.2, 0.0, 1.2]
    )


def test_ties_sign_election_and_disjoint_mean_hand_checked(tmp_path):
    taus = [[1.0, -2.0, 3.0, 0.0], [-1.0, -1.0, 1.0, 2.0]]
    # no trim: Σ = [0, -3, 4, 2], elected signs [0, -, +, +]; the zero sum takes the
    # majority sign, sign(0 - 1 + 1 + 1) = + (reference TIES' resolve_zero_signs; it was
    # 0 here before, which merged pos 0 to 0): pos 0 keeps τ1's 1; zeros ignored in the
    # mean
    assert merged_delta(tmp_path, taus, "ties", {"k": 1.0}) == [1.0, -1.5, 2.0, 2.0]
    # k = 0.5 keeps 2 of 4 per task: τ1 -> [0,-2,3,0]; τ2 |.| = [1,1,1,2] -> pos 3 and
    # the earliest 1 (pos 0) -> [-1,0,0,2]; Σ = [-1,-2,3,2]
    assert merged_delta(tmp_path, taus, "ties", {"k": 0.5}) == [-1.0, -2.0, 3.0, 2.0]
    assert merged_delta(tmp_path, taus, "ties", {"k": 0.5, "lam": 2.0}) == [
        -2.0,
        -4.0,
        6.0,
        4.0,
    ]


def test_disjoint_mean_kernel():
    def t():
        return [
            torch.tensor([2.0, -1.0, 0.0]),
            torch.tensor([4.0, 3.0, 0.0]),
            torch.tensor([-6.0, 1.0, 5.0]),
        ]

    # Σ = [0, 3, 5]: pos1 positive: mean(3, 1) = 2; pos2: 5; pos0's zero sum takes the
    # majority sign of this input, sign(0 + 1 + 1) = + (it was 0 before the majority
    # rule): mean(2, 4) = 3
    assert disjoint_mean(t()).tolist() == [3.0, 2.0, 5.0]
    assert disjoint_mean(t(), majority=-1).tolist() == [
        -6.0,
        2.0,
        5.0,
    ]  # a given majority
    assert disjoint_mean(t(), majority=0).tolist() == [0.0, 2.0, 5.0]  # none: stays 0


def write_states(tmp_path, base, taus):
    """Checkpoints from dicts of vectors: base and base + τ_t (float32)."""
    b = {k: torch.tensor(v) for k, v in base.items()}
    bp = write_state_dict(tmp_path / "b.safetensors", b)
    mps = [
        write_state_dict(
            tmp_path / f"m{i}.safetensors", {k: b[k] + torch.tensor(t[k]) for k in b}
        )
        for i, t in enumerate(taus)
    ]
    return bp, mps


@pytest.mark.parametrize("method", ["ties", "consensus-ties"])
def test_ties_zero_sum_takes_the_majority_sign_of_its_scope_hand_checked(
    tmp_path, method
):
    # no trim (k = 1). Σ: a = [2, 3, 4, 0] (signs + + + 0), b = [-2, -3, 0] (- - 0).
    # global scope: Σ signs = 3 - 2 = 1 > 0, so both zero sums elect +; per tensor: a's
    # majority is + (3), b's is - (-2). Then the disjoint mean keeps the agreeing
    # entries: a[3] ∈ {-1, +1} -> +1; b[2] ∈ {2, -2} -> 2 (global) or -2 (per tensor).
    taus = [
        {"a": [1.0, 2.0, 3.0, -1.0], "b": [-1.0, -2.0, 2.0]},
        {"a": [1.0, 1.0, 1.0, 1.0], "b": [-1.0, -1.0, -2.0]},
    ]
    bp, mps = write_states(tmp_path, {"a": [0.0] * 4, "b": [0.0] * 3}, taus)
    params = (
        {"k": 1.0} if method == "ties" else {"k": 1.0, "tall_lam": 0.0, "consensus": 0}
    )
    g = merge(bp, mps, method, {**params, "scope": "global"}).state
    assert g["a"].tolist() == [1.0, 1.5, 2.0, 1.0]
    assert g["b"].tolist() == [-1.0, -1.5, 2.0]
    t = merge(bp, mps, method, {**params, "scope": "tensor"}).state
    assert t["a"].tolist() == [1.0, 1.5, 2.0, 1.0]
    assert t["b"].tolist() == [-1.0, -1.5, -2.0]


def test_ties_majority_over_trimmed_entries_and_a_tied_majority_hand_checked(tmp_path):
    # k = 0.5 keeps 4 of 8 per task (global). |τ1| = [4,4,3,1,1,1,1,1]: pos 0-2 and the
    # earliest 1 (pos 3) -> τ1' = [4,-4,3,-1,0,0,0,0]; |τ2| = [0,4,5,1,1,6,1,1] -> pos
    # 5, 2, 1, then pos 3 -> τ2' = [0,4,-5,1,0,6,0,0]. Σ = [4,0,-2,0,0,6,0,0]: signs
    # + 0 - 0 0 + 0 0, majority sign(2 - 1) = +. Zero sums with kept entries (pos 1:
    # -4|4, pos 3: -1|1) take +; pos 4, 6, 7 kept nothing and stay 0.
    taus = [
        [4.0, -4.0, 3.0, -1.0, 1.0, 1.0, 1.0, 1.0],
        [0.0, 4.0, -5.0, 1.0, 1.0, 6.0, 1.0, 1.0],
    ]
    assert merged_delta(tmp_path, taus, "ties", {"k": 0.5}) == [
        4.0,
        4.0,
        -5.0,
        1.0,
        0.0,
        6.0,
        0.0,
        0.0,
    ]
    # a majority sum of 0 elects nothing: Σ = [2, -2, 0], signs balance -> pos 2 is 0
    (tmp_path / "tied").mkdir()
    got = merged_delta(
        tmp_path / "tied", [[1.0, -1.0, 1.0], [1.0, -1.0, -1.0]], "ties", {"k": 1.0}
    )
    assert got == [1.0, -1.0, 0.0]


def test_consensus_counting_hand_checked(tmp_path):
    taus = [[1.0, 0.0, 2.0, 4.0], [1.0, 3.0, -2.0, 0.0], [0.0, 3.0, 0.0, -1.0]]
    mtl = torch.tensor([2.0, 6.0, 0.0, 3.0])
    masks = tall_masks([torch.tensor(t) for t in taus], mtl, [0.4] * 3)
    # |τ_t| >= 0.4·|MTL − τ_t|
    assert [m.tolist() for m in masks] == [
        [True, False, True, True],  # 1>=.4, 0>=2.4, 2>=.8, 4>=.4
        [True, True, True, False],  # 1>=.4, 3>=1.2, 2>=.8, 0>=1.2
        [False, True, True, False],  # 0>=.8, 3>=1.2, 0>=0, 1>=1.6
    ]
    assert consensus_keep(masks, 2).tolist() == [True, True, True, False]
    got = merged_delta(tmp_path, taus, "consensus-ta", {"lam": 1.0})
    assert got == [2.0, 6.0, 0.0, 0.0]
    got = merged_delta(tmp_path, taus, "consensus-ta", {"lam": 0.5, "consensus": 3})
    assert got == [0.0, 0.0, 0.0, 0.0]


def test_nps_reweighting_and_mask_hand_checked(tmp_path):
    tau = [0.1, -0.5, 0.3, 0.2, -0.4, 0.05, 0.6, -0.7]
    # ranks: {7,6,1,4} form subspace 1, {2,3,0,5} subspace 2; w = [0.5, 2]
    # reweighted |τ'| = [.2,.25,.6,.4,.2,.1,.3,.35]; top 4 -> positions 2,3,7,6
    got = merged_delta(
        tmp_path, [tau], "nps", {"k": 0.5, "subspaces": 2, "weights": [0.5, 2.0]}
    )
    t = torch.tensor(tau)
    want = torch.zeros(8)
    want[[2, 3]] = 2.0 * t[[2, 3]]
    want[[6, 7]] = 0.5 * t[[6, 7]]
    assert torch.equal(torch.tensor(got), want)


def test_nps_with_k_inside_the_first_subspace_is_scaled_magnitude(tmp_path):
    # |τ| = 16 .. 1; M = 4 subspaces of 4 ranks; k = 0.125 keeps 2 entries (|τ| 16 and
    # 15), both in subspace 1. Unless a lower subspace's weight beats w_1 by the
    # magnitude ratio at the boundary (15 / 12 = 1.25 for subspace 2), the mask is
    # magnitude's and NPS is magnitude pruning scaled by λ·w_1 (what the full-zoo fusion
    # search found, README).
    tau = [(-1.0) ** i * (16 - i) for i in range(16)]
    nps = merged_delta(
        tmp_path,
        [tau],
        "nps",
        {"k": 0.125, "subspaces": 4, "weights": [1.5, 1.0, 0.5, 2.0]},
    )
    mag = merged_delta(tmp_path, [tau], "magnitude", {"k": 0.125, "lam": 1.5})
    assert nps == mag == [24.0, -22.5] + [0.0] * 14
    # w_2 / w_1 = 1.3 > 1.25: |τ| 12 (first rank of subspace 2) reweighted to 15.6
    # beats 15
    crossed = merged_delta(
        tmp_path,
        [tau],
        "nps",
        {"k": 0.125, "subspaces": 4, "weights": [1.0, 1.3, 1.0, 1.0]},
    )
    want = [0.0] * 16
    want[0], want[4] = 16.0, 12.0 * 1.3
    assert crossed == pytest.approx(want)


def test_dare_keeps_about_k_and_rescales_by_exactly_one_over_k(tmp_path):
    n = 20_000
    tau = torch.full((n,), 0.3)
    bp, mps = vec_models(tmp_path, [0.0] * n, [tau.tolist()])
    out = merge(bp, mps, "dare", {"k": 0.1, "seed": 7}).state["w"]
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.01
    assert torch.all(
        out[kept] == torch.tensor(0.3, dtype=torch.float64).div(0.1).float()
    )
    out_q = merge(bp, mps, "darex", {"k": 0.1, "q": 0.2, "seed": 7}).state["w"]
    assert torch.equal(out_q != 0, kept)  # same seed, same mask
    assert torch.allclose(out_q[kept], torch.tensor(1.5))
    with pytest.raises(ConfigError, match="q must be in"):
        merge(bp, mps, "darex", {"k": 0.3, "q": 0.2})


@pytest.mark.parametrize("method", ["dare", "darex"])
def test_dare_masks_belong_to_the_task_not_its_position_or_the_chunk_size(
    tmp_path, monkeypatch, method
):
    import npstune.taskvector as tv
    from npstune.merge import MaskCollector, run_merge

    bp, mps, _, _ = make_set(tmp_path, tasks=3)
    params = {"k": 0.5, "seed": 11}

    def masks(models):
        plan = plan_merge(bp, models)
        sink = MaskCollector(
            {k: plan.base.shape(k) for k in plan.delta_keys}, plan.task_names
        )
        state = run_merge(plan, get_method(method), params, masks=sink).state
        return sink.masks, state

    multi, state = masks(mps)
    names = ["task0", "task1", "task2"]
    for i, name in enumerate(
        names
    ):  # task B alone gets B's mask of the multi-task plan
        alone, _ = masks([mps[i]])
        assert all(torch.equal(alone[name][k], multi[name][k]) for k in FLOAT_KEYS), (
            name
        )
    swapped, _ = masks([mps[2], mps[0]])  # and in any position among the models
    assert all(torch.equal(swapped["task2"][k], multi["task2"][k]) for k in FLOAT_KEYS)
    for a, b in [(0, 1), (0, 2), (1, 2)]:  # every task draws its own mask
        assert any(
            not torch.equal(multi[names[a]][k], multi[names[b]][k]) for k in FLOAT_KEYS
        )
    monkeypatch.setattr(tv, "CHUNK", 7)  # read chunks of 7: same masks, same output
    multi7, state7 = masks(mps)
    assert all(
        torch.equal(multi7[n][k], multi[n][k]) for n in names for k in FLOAT_KEYS
    )
    assert all(torch.equal(state7[k], state[k]) for k in state)


def test_bernoulli_masks_do_not_depend_on_the_range_asked_for():
    from npstune.sparsify.random import DRAW_BLOCK, bernoulli_mask

    n = 2 * DRAW_BLOCK + 123
    whole = bernoulli_mask(n, 0.3, seed=5, task="sst", key="w")
    for lo, hi in [(0, 7), (DRAW_BLOCK - 3, DRAW_BLOCK + 3), (1000, n), (n - 1, n)]:
        part = bernoulli_mask(hi - lo, 0.3, seed=5, task="sst", key="w", start=lo)
        assert torch.equal(part, whole[lo:hi])
    assert not torch.equal(whole, bernoulli_mask(n, 0.3, seed=5, task="topic", key="w"))
    assert not torch.equal(whole, bernoulli_mask(n, 0.3, seed=5, task="sst", key="v"))
    assert not torch.equal(whole, bernoulli_mask(n, 0.3, seed=6, task="sst", key="w"))


# ------------------------------------------------------------- oracle on tiny models
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_magnitude_and_nps_match_dense_oracle(tmp_path, dtype, scope):
    bp, mps, base, fts = make_set(tmp_path, dtype=dtype)
    b, t32, t64 = oracle.deltas(base, fts, FLOAT_KEYS)
    w = [1.5, 0.2, 1.0, 0.7, 2.0, 0.0, 1.1, 0.9]
    res = merge(
        bp, mps, "nps", {"k": 0.3, "lam": 0.8, "weights": w, "scope": scope}
    ).state
    total = torch.zeros_like(t64[0])
    for a32, a64 in zip(t32, t64):
        if scope == "global":
            mask, vals = oracle.nps_prune(a32, a64, 0.3, w, 8)
        else:  # per tensor: run the oracle on each tensor's slice
            mask = torch.zeros_like(a32, dtype=torch.bool)
            vals = torch.zeros_like(a64)
            pos = 0
            for k in FLOAT_KEYS:
                n = base[k].numel()
                m_, v_ = oracle.nps_prune(
                    a32[pos : pos + n], a64[pos : pos + n], 0.3, w, 8
                )
                mask[pos : pos + n], vals[pos : pos + n] = m_, v_
                pos += n
        total += torch.where(mask, vals, torch.zeros(()).double())
    want = oracle.finish(b, 0.8 * total, dtype)
    got = oracle.flat(res, FLOAT_KEYS)
    assert torch.equal(got, want)
    assert torch.equal(res["position_ids"], base["position_ids"])


def test_ties_matches_dense_oracle(tmp_path):
    bp, mps, base, fts = make_set(tmp_path)
    b, t32, t64 = oracle.deltas(base, fts, FLOAT_KEYS)
    trimmed = [
        torch.where(oracle.topk_mask(a.abs(), 0.2), v, torch.zeros(()).double())
        for a, v in zip(t32, t64)
    ]
    want = oracle.finish(b, 1.3 * oracle.ties_vector(trimmed), torch.float32)
    got = oracle.flat(merge(bp, mps, "ties", {"lam": 1.3}).state, FLOAT_KEYS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_consensus_ties_uses_the_ties_vector(tmp_path):
    bp, mps, base, fts = make_set(tmp_path)
    b, t32, t64 = oracle.deltas(base, fts, FLOAT_KEYS)
    trimmed = [
        torch.where(oracle.topk_mask(a.abs(), 0.2), v, torch.zeros(()).double())
        for a, v in zip(t32, t64)
    ]
    mtl = oracle.ties_vector(trimmed)
    masks = [v.abs() >= 0.4 * (mtl - v).abs() for v in t64]
    keep = torch.stack(masks).sum(0) >= 2
    want = oracle.finish(
        b, torch.where(keep, mtl, torch.zeros(()).double()), torch.float32
    )
    got = oracle.flat(merge(bp, mps, "consensus-ties", {}).state, FLOAT_KEYS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


# ------------------------------------------------------------- invariants
@pytest.mark.parametrize(
    "method,params",
    [
        ("average", {}),
        ("task-arithmetic", {"lam": 1.0}),
        ("ties", {"k": 1.0}),
        ("magnitude", {"k": 1.0}),
        ("nps", {"k": 1.0}),
        ("dare", {"k": 1.0}),
        ("darex", {"k": 1.0}),
        ("consensus-ta", {"lam": 1.0, "consensus": 1}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_one_model_returns_it(tmp_path, method, params, dtype):
    bp, mps, base, fts = make_set(tmp_path, dtype=dtype, tasks=1)
    got = merge(bp, mps, method, params).state
    for k, v in fts[0].items():
        assert got[k].dtype == v.dtype
        assert torch.equal(got[k], v), (method, k)


def test_zero_task_vectors_give_the_base(tmp_path):
    bp, _, base, _ = make_set(tmp_path, tasks=1)
    for method in (
        "average",
        "task-arithmetic",
        "ties",
        "magnitude",
        "nps",
        "dare",
        "consensus-ties",
    ):
        got = merge(bp, [bp, bp], method).state
        assert all(torch.equal(got[k], base[k]) for k in base), method


@pytest.mark.parametrize("k", [0.01, 0.05, 0.3, 0.77])
def test_kept_count_is_exactly_ceil_k_n(tmp_path, k):
    bp, mps, base, fts = make_set(tmp_path)
    n = sum(base[k_].numel() for k_ in FLOAT_KEYS)
    for method in ("magnitude", "nps"):
        res = merge(bp, mps, method, {"k": k})
        assert res.meta["kept"] == [oracle.K(k, n)] * 3
        assert res.meta["n"] == n


def test_nps_with_unit_weights_equals_magnitude(tmp_path):
    bp, mps, _, _ = make_set(tmp_path)
    for scope in ("global", "tensor"):
        a = merge(bp, mps, "nps", {"k": 0.2, "lam": 0.7, "scope": scope}).state
        b = merge(bp, mps, "magnitude", {"k": 0.2, "lam": 0.7, "scope": scope}).state
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_chunks_equal_whole_tensors(tmp_path, monkeypatch):
    import npstune.taskvector as tv

    bp, mps, _, _ = make_set(tmp_path)
    whole = merge(
        bp, mps, "nps", {"k": 0.1, "weights": [2, 1, 1, 0.5, 1, 1, 1, 0]}
    ).state
    monkeypatch.setattr(tv, "CHUNK", 7)  # every tensor split into many chunks
    plan = plan_merge(bp, mps)
    assert len(list(plan.chunks("encoder.0.weight"))) == 5
    from npstune.merge import run_merge

    chunked = run_merge(
        plan, get_method("nps"), {"k": 0.1, "weights": [2, 1, 1, 0.5, 1, 1, 1, 0]}
    ).state
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


@pytest.mark.parametrize(
    "method,params",
    [
        ("ties", {"k": 0.3}),
        ("magnitude", {"k": 0.1, "lam": 0.7}),
        ("task-arithmetic", {"lam": 0.4}),
        ("nps", {"k": 0.1, "weights": [2, 1, 1, 0.5, 1, 1, 1, 0]}),
        ("consensus-ties", {}),
        ("dare", {"k": 0.3, "seed": 4}),
    ],
)
def test_kernel_blocks_inside_a_read_chunk_change_nothing(
    tmp_path, monkeypatch, method, params
):
    import npstune.merge.base as mb
    import npstune.taskvector as tv

    bp, mps, _, _ = make_set(tmp_path)
    monkeypatch.setattr(tv, "CHUNK", 7)
    monkeypatch.setattr(mb, "KERNEL_BLOCK", 10**9)  # one kernel call per read chunk
    ref = merge(bp, mps, method, params).state
    monkeypatch.setattr(mb, "KERNEL_BLOCK", 3)  # 3 + 3 + 1 elements per read chunk
    got = merge(bp, mps, method, params).state
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_every_registered_method_loads_and_validates():
    names = method_names()
    assert {
        "average",
        "task-arithmetic",
        "ties",
        "dare",
        "darex",
        "magnitude",
        "consensus-ta",
        "consensus-ties",
        "nps",
    } <= set(names)
    spec = get_method("ties")
    assert spec.make_params({}).k == 0.2
    with pytest.raises(ConfigError, match="valid: k, lam, scope"):
        spec.make_params({"density": 0.3})
    with pytest.raises(ConfigError, match="unknown method 'tie'"):
        get_method("tie")
    with pytest.raises(ConfigError, match="k"):
        get_method("magnitude").make_params({"k": 1.5})


def test_nps_weights_shape_is_checked(tmp_path):
    bp, mps, _, _ = make_set(tmp_path)
    with pytest.raises(ConfigError, match="expected 8 values"):
        merge(bp, mps, "nps", {"weights": [1.0, 2.0]})
    per_task = [1.0] * 8 + [0.5] * 8 + [2.0] * 8
    res = merge(bp, mps, "nps", {"weights": per_task, "k": 0.5})
    assert res.meta["kept"] == [res.meta["kept"][0]] * 3


def test_frozen_tensors_are_copied_and_do_not_count_in_n(tmp_path):
    from tests.tiny import finetune, tiny_state

    base = tiny_state(0)
    fts = [finetune(base, t) for t in range(2)]
    for ft in fts:
        ft["encoder.1.weight"] = base[
            "encoder.1.weight"
        ].clone()  # frozen while fine-tuning
    bp = write_state_dict(tmp_path / "b.safetensors", base)
    mps = [
        write_state_dict(tmp_path / f"t{i}.safetensors", ft) for i, ft in enumerate(fts)
    ]
    plan = plan_merge(bp, mps)
    assert "encoder.1.weight" in plan.copy_keys
    assert plan.n == 6 + 30 + 3
    res = merge(bp, mps, "magnitude", {"k": 0.1})
    assert res.meta["kept"] == [4, 4]  # ⌈0.1·39⌉, not ⌈0.1·57⌉
    assert torch.equal(res.state["encoder.1.weight"], base["encoder.1.weight"])
    assert "encoder.1.weight" in plan_merge(bp, mps, frozen=False).delta_keys


@pytest.mark.parametrize("tasks", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_disjoint_mean_matches_stacked_formula_bit_for_bit(tasks, dtype):
    g = torch.Generator().manual_seed(tasks)
    n = 5000
    ts = []
    for _ in range(tasks):
        t = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        t[torch.rand(n, generator=g) < 0.4] = 0.0  # trimmed entries
        t[:50] = torch.tensor([1.0, -1.0], dtype=dtype).repeat(25)
        ts.append(t)
    if tasks > 1:  # sums that cancel to exactly 0: they take the majority sign
        ts[1][50:100] = -ts[0][50:100]
        for t in ts[2:]:
            t[50:100] = 0.0
    # the documented formula, summed left to right in task order
    total = ts[0].clone()
    for t in ts[1:]:
        total = total + t
    elected = torch.sign(total)
    balance = int((elected > 0).sum()) - int((elected < 0).sum())
    any_kept = torch.stack(ts).ne(0).any(0)
    elected[(total == 0) & any_kept] = float((balance > 0) - (balance < 0))
    num = torch.zeros(n, dtype=dtype)
    cnt = torch.zeros(n, dtype=torch.int64)
    for t in ts:
        agree = (torch.sign(t) == elected) & (t != 0)
        num = num + torch.where(agree, t, torch.zeros((), dtype=dtype))
        cnt += agree
    ref = num / cnt.clamp_min(1)
    if tasks <= 3:  # torch's stacked reduction adds up to 3 rows in the same order
        stacked = torch.stack(ts)
        agree = (torch.sign(stacked) == elected) & (stacked != 0)
        zero = torch.zeros((), dtype=dtype)
        assert torch.equal(
            torch.where(agree, stacked, zero).sum(0) / agree.sum(0).clamp_min(1), ref
        )
    got = disjoint_mean([t.clone() for t in ts])
    assert got.dtype == dtype
    assert torch.equal(got, ref)
