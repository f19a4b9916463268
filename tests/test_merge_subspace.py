"""TSV-M, Iso-C/CTS, WUDI, EMR and PCB: hand-checked numbers, references, invariants."""

from __future__ import annotations

import math

import pytest
import torch

from npstune.checkpoints import open_checkpoint, write_state_dict
from npstune.cli import main
from npstune.errors import ConfigError
from npstune.merge import get_method, merge, orderstats, run_merge
from npstune.merge import pcb as pcb_module
from npstune.merge.iso import iso_cts_sizes
from npstune.merge.orderstats import order_stats
from npstune.merge.pcb import clamp_indices
from npstune.merge.wudi import wudi_solve
from npstune.taskvector import plan_merge
from tests import oracle
from tests.tiny import finetune, make_set, tiny_state

F64 = torch.float64
FLOAT_KEYS = ["encoder.0.bias", "encoder.0.weight", "encoder.1.weight", "norm.weight"]
SVD_METHODS = ["tsv-m", "iso-c", "iso-cts", "wudi"]
ALL_METHODS = [*SVD_METHODS, "pcb", "emr"]


def write_models(tmp_path, base, taus):
    """Checkpoints base and base + τ_t (dicts of tensors, dtype of the base)."""
    bp = write_state_dict(tmp_path / "b.safetensors", base)
    mps = [
        write_state_dict(
            tmp_path / f"m{i}.safetensors",
            {k: base[k] + t[k].to(base[k].dtype) for k in base},
        )
        for i, t in enumerate(taus)
    ]
    return bp, mps


def delta_of(tmp_path, taus, method, params=None, key="w"):
    """Merged Δ of one float64 key (zero base)."""
    base = {key: torch.zeros_like(taus[0], dtype=F64)}
    bp, mps = write_models(tmp_path, base, [{key: t.to(F64)} for t in taus])
    return merge(bp, mps, method, params).state[key]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------ TSV-M
def test_tsv_m_one_task_full_rank_returns_the_task_vector(tmp_path):
    base = {"w": rand(6, 4, seed=1), "b": rand(4, seed=2)}
    tau = {"w": rand(6, 4, seed=3), "b": rand(4, seed=4)}
    bp, mps = write_models(tmp_path, base, [tau])
    got = merge(bp, mps, "tsv-m").state
    torch.testing.assert_close(got["w"] - base["w"], tau["w"], rtol=0, atol=1e-12)
    assert torch.equal(got["b"], base["b"] + tau["b"])


def test_tsv_m_keeps_each_tasks_top_triplets_hand_checked(tmp_path):
    t1 = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    t2 = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # p = 2, r = 1: task 1 keeps 3·e1e1ᵀ, task 2 keeps 2·e2e2ᵀ; Û, V̂ are orthogonal
    want = torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=F64)
    got = delta_of(tmp_path, [t1, t2], "tsv-m")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    got = delta_of(tmp_path, [t1, t2], "tsv-m", {"alpha": 0.5})
    torch.testing.assert_close(got, want / 2, rtol=0, atol=1e-14)
    # a list scales τ_t first (and not Δ): 2·τ1 keeps 6·e1e1ᵀ, 0.5·τ2 keeps 1·e2e2ᵀ
    got = delta_of(tmp_path, [t1, t2], "tsv-m", {"alpha": [2.0, 0.5]})
    torch.testing.assert_close(
        got, torch.diag(torch.tensor([6.0, 1.0], dtype=F64)), rtol=0, atol=1e-14
    )
    # p = 1 < T = 2: r = int(1·(1/2)) = 0 keeps nothing
    got = delta_of(tmp_path, [torch.ones(1, 3), torch.ones(1, 3)], "tsv-m")
    assert torch.equal(got, torch.zeros(1, 3, dtype=F64))


def tsv_fusion_bench(mats):
    """fusion_bench's compute_and_sum_svd_mem_reduction for one key (zero padding)."""
    T = len(mats)
    su = sv = ss = None
    for i, a in enumerate(mats):
        u, s, v = torch.linalg.svd(a, full_matrices=False)
        if i == 0:
            su, ss, sv = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        r = int(s.shape[0] * (1 / T))
        su[:, i * r : (i + 1) * r] = u[:, :r]
        ss[i * r : (i + 1) * r] = s[:r]
        sv[i * r : (i + 1) * r, :] = v[:r, :]
    uu, _, vu = torch.linalg.svd(su, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sv, full_matrices=False)
    return torch.linalg.multi_dot((uu, vu, torch.diag(ss), uv, vv))


@pytest.mark.parametrize("shape", [(7, 5), (4, 9)])
def test_tsv_m_matches_the_zero_padded_reference(tmp_path, shape):
    taus = [rand(*shape, seed=s) for s in range(3)]  # p = 5 or 4, T = 3: r = 1
    got = delta_of(tmp_path, taus, "tsv-m")
    torch.testing.assert_close(got, tsv_fusion_bench(taus), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ Iso-C / Iso-CTS
def test_iso_c_flattens_the_spectrum_of_the_sum(tmp_path):
    taus = [rand(6, 4, seed=s) for s in range(3)]
    s_sum = torch.linalg.svdvals(sum(taus))
    got = delta_of(tmp_path, taus, "iso-c", {"alpha": 1.5})
    sv = torch.linalg.svdvals(got)
    want = torch.full((4,), 1.5 * s_sum.mean().item(), dtype=F64)
    torch.testing.assert_close(sv, want, rtol=0, atol=1e-12)
    u, _, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    torch.testing.assert_close(got, 1.5 * s_sum.mean() * (u @ vh), rtol=0, atol=1e-12)


def test_iso_cts_sizes_add_up_and_follow_fusion_bench():
    for p in range(1, 70):
        for T in (1, 2, 3, 5, 8):
            for f in (0.5, 0.7, 0.8, 0.95, 1.0):
                c, r = iso_cts_sizes(p, T, f)
                assert c + T * r == p and c >= 0 and r >= 0
    assert iso_cts_sizes(768, 8, 0.8) == (616, 19)  # c0 = 614, r = round(19.25)
    assert iso_cts_sizes(10, 2, 0.5) == (6, 2)  # r = round(2.5) = 2: half to even
    assert iso_cts_sizes(14, 2, 0.5) == (6, 4)  # r = round(3.5) = 4
    p = next(p for p in range(1, 200) if int(p * 0.7) != p * 7 // 10)  # double product
    assert iso_cts_sizes(p, 1, 0.7) == (int(p * 0.7), p - int(p * 0.7))
    with pytest.raises(ConfigError, match="negative common size -1; raise common_fr"):
        iso_cts_sizes(3, 2, 0.0)  # c0 = 0, r = round(1.5) = 2, c = 3 − 4


def test_iso_cts_refuses_a_negative_common_size_before_merging(tmp_path):
    taus = [rand(3, 5, seed=s) for s in range(2)]
    with pytest.raises(ConfigError, match=r"b.safetensors:w \(p = 3, T = 2\)"):
        delta_of(tmp_path, taus, "iso-cts", {"common_fraction": 0.1})


def test_iso_cts_hand_checked(tmp_path):
    t1 = torch.diag(torch.tensor([5.0, 1.0, 0.5]))
    t2 = torch.diag(torch.tensor([0.0, 0.0, -2.0]))
    # p = 3, T = 2, f = 0.5: c0 = 1, r = 1, c = 1. Σ = diag(5, 1, −1.5): U_c = e1,
    # S_c = 5.
    # W_1 = diag(0, 1, .5): top e2 (1); W_2 = diag(0, 0, −2): top 2·e3(−e3)ᵀ.
    # s̄ = mean(1, 2, 5) = 8/3; polar(Û)·polar(V̂ᵀ) = Σ u_i v_iᵀ = diag(1, 1, −1)
    p = {"common_fraction": 0.5, "alpha": 0.75}
    got = delta_of(tmp_path, [t1, t2], "iso-cts", p)
    want = 0.75 * 8 / 3 * torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    # Iso-C on the same pair: mean(5, 1.5, 1)·diag(1, 1, −1)
    got = delta_of(tmp_path, [t1, t2], "iso-c")
    want = 7.5 / 3 * torch.diag(torch.tensor([1.0, 1, -1], dtype=F64))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    # f = 0.8: c0 = 2, r = round(0.5) = 0 -> c = 3, no task part: Iso-CTS is Iso-C
    taus = [rand(5, 4, seed=s) for s in range(3)]  # p = 4: c0 = 3, r = round(1/3) = 0
    torch.testing.assert_close(
        delta_of(tmp_path, taus, "iso-cts"),
        delta_of(tmp_path, taus, "iso-c"),
        rtol=0,
        atol=1e-12,
    )


# ------------------------------------------------------------------ WUDI
def adam_by_hand(taus, steps, lr):
    """MERGES §3 literally: per-task gradient, the three Adam lines."""
    kept = [t for t in taus if float((t * t).sum()) > 0]
    x = sum(taus)
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for s in range(1, steps + 1):
        g = sum(2 * (x - t) @ t.T @ t / (t * t).sum() for t in kept)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - (lr / (1 - b1**s)) * m / (v.sqrt() / math.sqrt(1 - b2**s) + eps)
    return x


# (3, 2): the G = Σ τᵀτ/‖τ‖² route; (2, 9): the per-task route
@pytest.mark.parametrize("shape", [(3, 2), (2, 9)])
def test_wudi_equals_a_hand_written_adam_loop(tmp_path, shape):
    taus = [rand(*shape, seed=10 + s) for s in range(2)]
    want = adam_by_hand(taus, 60, 1e-2)
    got = wudi_solve(taus, 60, 1e-2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert (got - sum(taus)).abs().max() > 0.1  # the steps moved X
    # through the engine with the defaults (400 steps, lr 1e-5)
    got = delta_of(tmp_path, taus, "wudi")
    torch.testing.assert_close(got, adam_by_hand(taus, 400, 1e-5), rtol=0, atol=1e-12)


def test_wudi_matches_torch_adam_on_the_autograd_loss():
    taus = torch.stack([rand(3, 2, seed=20 + s) for s in range(3)])
    x = torch.nn.Parameter(taus.sum(0))
    opt = torch.optim.Adam([x], lr=1e-2, weight_decay=0)
    norms = taus.reshape(3, -1).norm(dim=-1) ** 2
    for _ in range(40):  # fusion_bench's get_redundant_task_vector
        loss = torch.sum(
            torch.square((x.unsqueeze(0) - taus) @ taus.transpose(1, 2))
            / norms[:, None, None]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    got = wudi_solve(list(taus), 40, 1e-2)
    torch.testing.assert_close(got, x.detach(), rtol=0, atol=1e-10)


def test_wudi_drops_a_zero_task_vector():
    taus = [rand(3, 2, seed=30), rand(3, 2, seed=31)]
    with_zero = wudi_solve([*taus, torch.zeros(3, 2, dtype=F64)], 50, 1e-2)
    assert torch.isfinite(with_zero).all()
    want = wudi_solve(taus, 50, 1e-2)
    torch.testing.assert_close(with_zero, want, rtol=0, atol=1e-14)
    assert torch.equal(
        wudi_solve([torch.zeros(3, 2, dtype=F64)] * 2, 5, 1e-2),
        torch.zeros(3, 2, dtype=F64),
    )


# ------------------------------------------------------------------ EMR
def test_emr_hand_checked_on_two_tensors(tmp_path):
    base = {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(4, dtype=F64)}
    taus = [
        {"a": torch.tensor([2.0, -1.0]), "b": torch.tensor([1.0, -2.0, 0.0, 4.0])},
        {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([-1.0, -2.0, 0.0, -1.0])},
    ]
    bp, mps = write_models(tmp_path, base, taus)
    res = merge(bp, mps, "emr")
    assert res.state is None
    # b: S = [0, −4, 0, 3] -> γ = [−1, −1, −1, +1] (S = 0 counts as −1)
    uni = res.meta["unified"]
    assert uni["a"].tolist() == [2.0, 3.0]
    assert uni["b"].tolist() == [-1.0, -2.0, 0.0, 4.0]
    masks = res.meta["masks"]
    assert masks["m0"]["b"].tolist() == [False, True, False, True]
    assert masks["m1"]["b"].tolist() == [True, True, False, False]
    assert masks["m0"]["a"].tolist() == [True, False]
    assert masks["m1"]["a"].tolist() == [True, True]
    # λ_t = Σ_keys mean|τ_t| / Σ_keys mean|M_t ⊙ τ_uni|, per-tensor means:
    # λ_1 = (3/2 + 7/4) / (2/2 + 6/4) = 1.3 (a global ratio of sums would give 10/8);
    # λ_2 = (4/2 + 4/4) / (5/2 + 3/4) = 12/13
    lam = res.meta["rescalers"]
    assert lam["m0"] == pytest.approx(1.3, abs=1e-15)
    assert lam["m1"] == pytest.approx(12 / 13, abs=1e-15)
    st = res.meta["states"]
    want = {
        "m0": {"a": [2.6, 0.0], "b": [0.0, -2.6, 0.0, 5.2]},
        "m1": {"a": [24 / 13, 36 / 13], "b": [-12 / 13, -24 / 13, 0.0, 0.0]},
    }
    for name, keys in want.items():
        for k, v in keys.items():
            torch.testing.assert_close(
                st[name][k], torch.tensor(v, dtype=F64), rtol=0, atol=1e-15
            )
    assert res.meta["storage"]["mask_bytes"] == 2 * 1  # 6 entries -> 1 byte per task


def test_emr_models_are_base_plus_rescaled_masked_unified(tmp_path):
    bp, mps, base, fts = make_set(tmp_path)
    res = merge(bp, mps, "emr")
    b, _, t64 = oracle.deltas(base, fts, FLOAT_KEYS)
    total = sum(t64)
    gamma = torch.where(total > 0, 1.0, -1.0).double()
    masks = [t * gamma > 0 for t in t64]
    kept = torch.stack([torch.where(m, t.abs(), 0.0) for m, t in zip(masks, t64)])
    uni = gamma * kept.amax(0)
    assert torch.equal(oracle.flat(res.meta["unified"], FLOAT_KEYS), uni)
    for t, name in enumerate(res.meta["tasks"]):
        assert torch.equal(oracle.flat(res.meta["masks"][name], FLOAT_KEYS), masks[t])
        lam = res.meta["rescalers"][name]
        st = res.meta["states"][name]
        want = oracle.finish(b, lam * torch.where(masks[t], uni, 0.0), torch.float32)
        assert torch.equal(oracle.flat(st, FLOAT_KEYS), want)
        assert torch.equal(st["position_ids"], base["position_ids"])
        assert res.meta["kept"][t] == int(masks[t].sum())
    s = res.meta["storage"]
    assert s["total_bytes"] == 57 * 4 + 3 * math.ceil(57 / 8) + 3 * 4
    # the paper's bits (compress.accounting): θ_pre and τ_uni at 32, masks at 1 bit
    assert s["paper_bits"] == 64 * 57 + 3 * 57 + 32 * 3
    with pytest.raises(ConfigError, match="one model per task"):
        get_method("emr").kernel(None, None)


# ------------------------------------------------------------------ PCB
def pcb_reference(X, ratio, q=1e-4):
    """``PCB_merge`` of duguodong7/pcb-merging on X (T×d), a constant row giving 0."""
    n, d = X.shape

    def normalize(x):
        lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        return torch.nan_to_num((x - lo) / (hi - lo), nan=0.0)

    def clamp(x, a, b):
        s = torch.sort(x, dim=1).values
        lo, hi = s[:, int(d * a)], s[:, int(d * (1 - b) - 1)]
        return torch.clamp(x, lo.unsqueeze(1), hi.unsqueeze(1))

    a = clamp(X.abs(), q, q)
    beta = torch.exp(n * normalize(a) ** 2) * torch.tanh(X * X.sum(0))
    scale = normalize(clamp(beta, 1 - ratio, 0))
    return (torch.sign(X) * a * scale).sum(0) / scale.sum(0).clamp(min=1e-12)


def test_pcb_clamp_indices_hand_checked(tmp_path):
    assert clamp_indices(6, 1e-4, 1e-4) == (0, 4)  # int(5.9994 − 1) = 4: 2nd largest
    assert clamp_indices(10_000, 1e-4, 1e-4) == (1, 9998)
    assert clamp_indices(10, 0.2, 0.2) == (2, 7)
    assert clamp_indices(10, 0.9, 0.0) == (9, 9)
    # so with d = 6 the largest |τ| is clipped to the second largest
    tau = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.25, 0.75])
    got = delta_of(tmp_path, [tau], "pcb", {"ratio": 1.0})
    # −3 is clipped to −2; −0.25 has the lowest β, which min-max maps to 0
    want = torch.tensor([0.5, -2.0, 1.0, 2.0, 0.0, 0.75], dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)


def test_pcb_one_task_ratio_one_is_lambda_times_clipped_tau(tmp_path):
    tau = rand(300, seed=40)
    # int(300·1e-4) = 0, int(299.97 − 1) = 298
    lo, hi = torch.sort(tau.abs()).values[[0, 298]]
    clipped = torch.sign(tau) * tau.abs().clamp(lo, hi)
    want = 1.7 * clipped
    want[tau.abs().argmin()] = 0.0  # the lowest β maps to 0
    got = delta_of(tmp_path, [tau], "pcb", {"ratio": 1.0, "lam": 1.7})
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_pcb_matches_the_repo_function(tmp_path, scope):
    bp, mps, base, fts = make_set(tmp_path, dtype=F64)
    res = merge(bp, mps, "pcb", {"ratio": 0.3, "lam": 1.2, "scope": scope}).state
    b, _, t64 = oracle.deltas(base, fts, FLOAT_KEYS)
    if scope == "global":
        tm = pcb_reference(torch.stack(t64), 0.3)
    else:
        rows = {
            k: torch.stack([(f[k] - base[k]).reshape(-1) for f in fts])
            for k in FLOAT_KEYS
        }
        tm = oracle.flat(
            {k: pcb_reference(x, 0.3) for k, x in rows.items()}, FLOAT_KEYS
        )
    got = oracle.flat(res, FLOAT_KEYS)
    torch.testing.assert_close(got, b + 1.2 * tm, rtol=0, atol=1e-13)


def test_pcb_global_equals_per_tensor_with_a_single_key(tmp_path):
    taus = [rand(40, seed=50 + s) for s in range(3)]
    g = delta_of(tmp_path, taus, "pcb", {"ratio": 0.2})
    t = delta_of(tmp_path, taus, "pcb", {"ratio": 0.2, "scope": "per_tensor"})
    assert torch.equal(g, t)
    alias = delta_of(tmp_path, taus, "pcb", {"ratio": 0.2, "scope": "tensor"})
    assert torch.equal(t, alias)


# COLLECT 0: all four radix levels; 5: a sort after a few; 2**20: a sort after one
@pytest.mark.parametrize("collect", [0, 5, 1 << 20])
def test_pcb_streaming_selection_equals_sorting(collect, monkeypatch):
    monkeypatch.setattr(orderstats, "COLLECT", collect)
    x = rand(5000, seed=60)
    x[:300] = 0.0
    x[300:400] = -0.0
    x[400:600] = x[600:800]  # ties
    x[800:900] *= 1e-300  # subnormal-ish magnitudes
    chunks = [x[i : i + 777] for i in range(0, 5000, 777)]
    ranks = [[0, 1, 299, 300, 450, 2500, 4998, 4999], [0, 17, 4999]]
    got = order_stats(
        lambda: ([c, -c.abs()] for c in chunks), ranks, 5000, in_memory=False
    )
    s0, s1 = torch.sort(x).values, torch.sort(-x.abs()).values
    assert got[0] == [float(s0[r]) for r in ranks[0]]
    assert got[1] == [float(s1[r]) for r in ranks[1]]


def test_pcb_streaming_merge_equals_in_memory_merge(tmp_path, monkeypatch):
    import npstune.taskvector as tv

    bp, mps, _, _ = make_set(tmp_path)
    ref = merge(bp, mps, "pcb", {"ratio": 0.2}).state
    monkeypatch.setattr(tv, "CHUNK", 13)  # several chunks per key
    monkeypatch.setattr(pcb_module, "PASS_BLOCK", 5)  # several blocks per chunk
    monkeypatch.setattr(orderstats, "IN_MEMORY", 0)
    for collect in (0, 1 << 20):
        monkeypatch.setattr(orderstats, "COLLECT", collect)
        got = merge(bp, mps, "pcb", {"ratio": 0.2}).state
        assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_pcb_excluded_keys_keep_the_base(tmp_path):
    bp, mps, base, _ = make_set(tmp_path)
    p = {"exclude_keys": ["encoder.0.weight"], "lam": [1.0, 0.5, 2.0]}
    res = merge(bp, mps, "pcb", p)
    assert torch.equal(res.state["encoder.0.weight"], base["encoder.0.weight"])
    assert not torch.equal(res.state["encoder.1.weight"], base["encoder.1.weight"])


def test_emr_in_memory_keeps_every_task_when_file_names_repeat(tmp_path):
    """A zoo's models are all ``tasks/<task>/model``: the in-memory outputs are keyed by
    the plan's unique task names (model, model#2, …), one per task, not one per file
    name (which kept only the last task's model)."""
    base = tiny_state(0)
    paths = []
    for t in range(3):
        d = tmp_path / f"t{t}"
        d.mkdir()
        paths.append(write_state_dict(d / "model.safetensors", finetune(base, t)))
    bp = write_state_dict(tmp_path / "base.safetensors", base)
    res = merge(bp, paths, "emr")
    names = ["model", "model#2", "model#3"]
    assert res.meta["tasks"] == names
    for part in ("states", "masks", "rescalers"):
        assert list(res.meta[part]) == names, part
    # each task's model is the one EMR makes for that task alone among the same set
    ref = merge(
        bp,
        [
            write_state_dict(tmp_path / f"m{t}.safetensors", finetune(base, t))
            for t in range(3)
        ],
        "emr",
    ).meta
    for name, ref_name in zip(names, ["m0", "m1", "m2"]):
        assert res.meta["rescalers"][name] == ref["rescalers"][ref_name]
        st, want = res.meta["states"][name], ref["states"][ref_name]
        assert all(torch.equal(st[k], want[k]) for k in want)
        assert all(
            torch.equal(res.meta["masks"][name][k], ref["masks"][ref_name][k])
            for k in ref["masks"][ref_name]
        )
    assert (
        len({float(v["encoder.0.weight"].sum()) for v in res.meta["states"].values()})
        == 3
    )


# ------------------------------------------------------------------ invariants
@pytest.mark.parametrize("method", ALL_METHODS)
def test_zero_task_vectors_give_the_base(tmp_path, method):
    bp, _, base, _ = make_set(tmp_path, tasks=1)
    plan = plan_merge(bp, [bp, bp], frozen=False)  # every key through the kernels
    assert set(plan.delta_keys) == set(FLOAT_KEYS)
    res = run_merge(plan, get_method(method))
    for st in res.meta["states"].values() if method == "emr" else [res.state]:
        assert all(torch.equal(st[k], base[k]) for k in base), method


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_lean_read_makes_the_full_reads_task_vectors_fresh_each_time(tmp_path, dtype):
    from npstune.taskvector import FreshTaus

    bp, mps, _, _ = make_set(tmp_path, dtype=dtype)
    plan = plan_merge(bp, mps)
    for key in plan.delta_keys:
        full = plan.read_chunk(key)
        lean = plan.read_chunk(key, lean=True)
        assert isinstance(lean.taus, FreshTaus) and isinstance(lean.taus32, FreshTaus)
        assert len(lean.taus) == len(full.taus) == len(mps)
        assert torch.equal(lean.base, full.base) and torch.equal(
            lean.base_cd, full.base_cd
        )
        for t in range(len(mps)):
            for got, want in (
                (lean.taus[t], full.taus[t]),
                (lean.taus32[t], full.taus32[t]),
            ):
                assert got.dtype == want.dtype and torch.equal(got, want), (key, t)
            first = lean.taus[t]
            first.fill_(7.0)  # the caller's own tensor: the next access is untouched
            assert torch.equal(lean.taus[t], full.taus[t])
        sliced = lean.taus[:]  # a list of fresh tensors
        assert all(torch.equal(a, b) for a, b in zip(sliced, full.taus, strict=True))


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_svd_merges_read_lean_and_give_the_full_reads_bits(tmp_path, method, dtype):
    import dataclasses

    spec = get_method(method)
    assert spec.lean_read and spec.whole_tensor(spec.make_params({}))
    bp, mps, _, _ = make_set(tmp_path, dtype=dtype)
    params = {"steps": 3} if method == "wudi" else {}
    lean = run_merge(plan_merge(bp, mps), spec, params).state
    full_spec = dataclasses.replace(spec, lean_read=False)
    full = run_merge(plan_merge(bp, mps), full_spec, params).state
    assert lean.keys() == full.keys()
    assert all(torch.equal(lean[k], full[k]) for k in full), method


def test_a_lean_read_refuses_nan_naming_the_checkpoint(tmp_path):
    from npstune.errors import CheckpointError

    base = {"w": rand(3, 4, seed=1)}
    bad = {"w": rand(3, 4, seed=2)}
    bad["w"][1, 2] = float("nan")
    bp, mps = write_models(tmp_path, base, [{"w": rand(3, 4, seed=3)}, bad])
    plan = plan_merge(bp, mps)
    with pytest.raises(CheckpointError, match=r"m1\.safetensors:w: tensor holds NaN"):
        plan.read_chunk("w", lean=True)
    with pytest.raises(CheckpointError, match="m1.safetensors:w: tensor holds NaN"):
        merge(bp, mps, "tsv-m")


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_outputs_keep_the_base_dtype(tmp_path, method, dtype):
    bp, mps, base, _ = make_set(tmp_path, dtype=dtype)
    res = merge(bp, mps, method)
    for st in res.meta["states"].values() if method == "emr" else [res.state]:
        for k, v in base.items():
            assert st[k].dtype == v.dtype and st[k].shape == v.shape, (method, k)
            assert torch.isfinite(st[k].double()).all()


@pytest.mark.parametrize(
    "method,params,scale",
    [
        ("tsv-m", {}, 1.0),
        ("tsv-m", {"alpha": 0.5}, 0.5),
        ("iso-c", {"alpha": 2.0}, 2.0),
        ("iso-cts", {}, 1.0),
        ("wudi", {}, 1.0),
    ],
)
def test_non_matrix_and_excluded_keys_get_the_mean(tmp_path, method, params, scale):
    bp, mps, base, fts = make_set(tmp_path)
    p = {**params, "exclude_keys": ["encoder.1.weight"]}
    res = merge(bp, mps, method, p).state
    for k in ("encoder.0.bias", "norm.weight", "encoder.1.weight"):
        t = [f[k].double() - base[k].double() for f in fts]
        mean = (t[0] + t[1] + t[2]) / 3
        want = (base[k].double() + (mean if scale == 1.0 else mean * scale)).float()
        assert torch.equal(res[k], want), (method, k)
    avg = merge(bp, mps, "average").state
    assert not torch.equal(res["encoder.0.weight"], avg["encoder.0.weight"])


def test_tsv_m_per_task_alpha_scales_the_averaged_keys_too(tmp_path):
    bp, mps, base, fts = make_set(tmp_path)
    res = merge(bp, mps, "tsv-m", {"alpha": [1.0, 0.0, 2.0]}).state
    k = "norm.weight"
    t = [f[k].double() - base[k].double() for f in fts]
    want = (base[k].double() + (t[0] + 0.0 * t[1] + 2.0 * t[2]) / 3).float()
    assert torch.equal(res[k], want)
    two = merge(bp, mps[::2], "tsv-m", {"alpha": [1.0, 2.0]}).state
    assert not torch.equal(two[k], res[k])  # T = 3 still averages over 3


@pytest.mark.parametrize(
    "method,params,field",
    [
        ("tsv-m", {"alpha": -1.0}, "alpha"),
        ("iso-c", {"alpha": -0.1}, "alpha"),
        ("pcb", {"ratio": 0.0}, "ratio"),
        ("pcb", {"lam": [1.0, -1.0]}, "lam"),
        ("iso-cts", {"common_fraction": 1.5}, "common_fraction"),
        ("wudi", {"steps": 0}, "steps"),
        ("wudi", {"lr": 0.0}, "lr"),
        ("pcb", {"clip": 0.5}, "clip"),
        ("emr", {"k": 0.1}, "k"),
        ("pcb", {"scope": "row"}, "scope"),
    ],
)
def test_bad_parameters_are_config_errors_naming_the_field(method, params, field):
    with pytest.raises(ConfigError, match=rf"{method}: {field}"):
        get_method(method).make_params(params)


def test_bad_per_task_lists_and_key_names_are_config_errors(tmp_path):
    bp, mps, _, _ = make_set(tmp_path)
    with pytest.raises(ConfigError, match="alpha: expected one value per task"):
        merge(bp, mps, "tsv-m", {"alpha": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="lam: expected one value per task"):
        merge(bp, mps, "pcb", {"lam": [1.0]})
    with pytest.raises(ConfigError, match="exclude_keys: 'encoder.*' is not a key"):
        merge(bp, mps, "wudi", {"exclude_keys": ["encoder.*"]})


# ------------------------------------------------------------------ CLI
def test_cli_tsv_m_and_emr_one_checkpoint_per_task(tmp_path, capsys):
    bp, mps, _, _ = make_set(tmp_path, tasks=2)
    out = tmp_path / "tsv.safetensors"
    main(
        [
            "merge",
            "--method",
            "tsv-m",
            "--base",
            str(bp),
            "--models",
            *map(str, mps),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert "tsv-m" in capsys.readouterr().out
    ck = open_checkpoint(out)
    want = merge(bp, mps, "tsv-m").state
    assert all(torch.equal(ck[k], want[k]) for k in want)
    out_dir = tmp_path / "emr"
    main(
        [
            "merge",
            "--method",
            "emr",
            "--base",
            str(bp),
            "--models",
            *map(str, mps),
            "--out",
            str(out_dir),
            "--quiet",
        ]
    )
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["task0.safetensors", "task1.safetensors"]
    mem = merge(bp, mps, "emr").meta["states"]
    for name in ("task0", "task1"):
        ck = open_checkpoint(out_dir / f"{name}.safetensors")
        assert ck.metadata["npstune_task"] == name
        assert all(torch.equal(ck[k], mem[name][k]) for k in mem[name])
