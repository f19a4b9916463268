"""Model Grafting and Model Tailor: hand-checked scores, masks and compensation, the
gradient statistic, and end to end on a tiny Llama (run_merge and the CLI)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from npstune.checkpoints import write_state_dict
from npstune.errors import ConfigError
from npstune.evaluate.hf import read_state
from npstune.evaluate.stats import CalibrationStats, GradientStats
from npstune.merge import MaskCollector, merge, run_merge
from npstune.merge.data import EvaluatorData, data_for
from npstune.merge.grafting import signed_threshold
from npstune.merge.registry import get_method
from npstune.merge.tailor import compensate, fused_scores
from npstune.sparsify import keep_count
from npstune.taskvector import plan_merge
from tests.test_causal_lm import QUIZ_CAL, QUIZ_TEST, write_jsonl
from tests.tiny import make_set
from tests.tiny_llm import make_tiny_llama


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: one thread is much faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(tmp_path: Path, tau: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    """A zero base and one model θ = τ."""
    base = write_state_dict(
        tmp_path / "base.safetensors", {k: torch.zeros_like(v) for k, v in tau.items()}
    )
    return base, write_state_dict(tmp_path / "task.safetensors", tau)


def _masks(bp, mps, method, params, data):
    plan = plan_merge(bp, mps)
    sink = MaskCollector(
        {k: plan.base.shape(k) for k in plan.delta_keys}, plan.task_names
    )
    res = run_merge(plan, get_method(method), params, data=data, masks=sink)
    return res, [sink.masks[n] for n in plan.task_names]


# ---- Tailor: scores, mask, compensation ----------------------------------------------
TAU = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
FISHER = torch.tensor([[4.0, 0.5, 40.0], [0.1, 9.0, 2.0]])


def test_tailor_scores_and_mask_hand_checked(tmp_path):
    # a = |τ| = [1, 2, 0.5, 3, 0, 1], Σa = 7.5, mean 1.25
    # c = ½Fτ² = [2, 1, 5, 0.45, 0, 1], Σc = 9.45, mean 1.575
    # β = 0.5: S = 0.5·a/1.25 + 0.5·c/1.575 = 0.4·a + (20/63)·c
    want = [
        0.4 + 40 / 63,  # 1.0349
        0.8 + 20 / 63,  # 1.1175
        0.2 + 100 / 63,  # 1.7873
        1.2 + 9 / 63,  # 1.3429
        0.0,
        0.4 + 20 / 63,  # 0.7175
    ]
    got = fused_scores(TAU.reshape(-1), FISHER.reshape(-1), 0.5 / 1.25, 0.5 / 1.575)
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    bp, mp = _pair(tmp_path, {"w": TAU})
    data = {"fisher": [{"w": FISHER}]}
    cases = {
        # k = 0.5: ⌈3⌉ entries. Fused: entries 2, 3, 1
        0.5: [[False, True, True], [True, False, False]],
        # β = 0 is magnitude: 3, 1, then 0 and 5 tie at 1 -> the earlier, 0
        0.0: [[True, True, False], [True, False, False]],
        # β = 1 is sensitivity: 2, 0, then 1 and 5 tie at 1 -> 1
        1.0: [[True, True, True], [False, False, False]],
    }
    for beta, mask in cases.items():
        params = {"k": 0.5, "beta": beta, "compensate": False}
        res, masks = _masks(bp, [mp], "tailor", params, data)
        want_mask = torch.tensor(mask)
        assert torch.equal(masks[0]["w"], want_mask), beta
        assert torch.equal(res.state["w"], torch.where(want_mask, TAU, 0.0))
        assert res.meta["kept"] == [3] and res.masks == {"task": {"w": 3}}
    # per-tensor scope: the same here (one tensor); λ scales
    res = merge(
        bp,
        [mp],
        "tailor",
        {"k": 0.5, "scope": "tensor", "compensate": False, "lam": 2},
        data=data,
    )
    assert torch.equal(
        res.state["w"], 2 * torch.where(torch.tensor(cases[0.5]), TAU, 0.0)
    )


def _least_squares(delta, mask, x):
    """Per row: min over d (zero off the row's mask) of ‖X_Sᵀ d_S − Xᵀ δ‖ (numpy)."""
    out = np.zeros_like(delta)
    for r in range(delta.shape[0]):
        s = np.flatnonzero(mask[r])
        if s.size:
            sol, *_ = np.linalg.lstsq(x[s].T, x.T @ delta[r], rcond=None)
            out[r, s] = sol
    return out


def test_compensation_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(5, 7, generator=g, dtype=torch.float64)
    x = torch.randn(7, 40, generator=g, dtype=torch.float64)  # in × tokens
    mask = torch.rand(5, 7, generator=g) < 0.4
    mask[0] = True  # nothing removed: unchanged
    mask[1] = False  # nothing kept: zero
    mask[2, :] = False
    mask[2, 3] = True  # one kept entry
    gram = x @ x.T
    got = compensate(delta, mask, gram, damp=0.0)
    want = _least_squares(delta.numpy(), mask.numpy(), x.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-10)
    assert torch.equal(got[0], delta[0]) and not got[1].any()
    assert not got[~mask].any()
    # rows solved one at a time (a 1-byte budget) give the same values
    torch.testing.assert_close(compensate(delta, mask, gram, 0.0, budget=1), got)
    # it strictly reduces the layer's output error ‖(ΔW' − ΔW) X‖, damped or not
    plain = torch.where(mask, delta, 0.0)
    err = lambda d: float(torch.linalg.norm((d - delta) @ x))  # noqa: E731
    for damp in (0.0, 0.01, 0.5):
        assert err(compensate(delta, mask, gram, damp)) < err(plain)
    # a float32 τ and an fp32 Gram give the float64 result too
    got32 = compensate(delta.float(), mask, gram.float(), 0.0)
    assert got32.dtype == torch.float64
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-4, atol=1e-4)


def test_compensation_guards_singular_and_empty_grams():
    delta = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    # inputs only ever on the first feature: G_SS singular without damping
    x = torch.zeros(3, 4, dtype=torch.float64)
    x[0] = 1.0
    got = compensate(delta, mask, x @ x.T, damp=0.0)
    # as good as least squares; the pseudo-inverse takes the least-norm correction,
    # so the entry no input reaches keeps its τ (lstsq's least-norm d would zero it)
    want = _least_squares(delta.numpy(), mask.numpy(), x.numpy())
    err = lambda d: float(np.linalg.norm((d - delta.numpy()) @ x.numpy()))  # noqa: E731
    assert err(got.numpy()) == pytest.approx(err(want), abs=1e-12)
    assert got.tolist() == [[1.0, 2.0, 0.0]]
    assert torch.isfinite(compensate(delta, mask, x @ x.T, damp=0.01)).all()
    zero = compensate(delta, mask, torch.zeros(3, 3), damp=0.01)
    assert torch.equal(zero, torch.where(mask, delta, 0.0))


def test_tailor_compensates_linear_weights_only(tmp_path):
    bp, mps, base, fts = make_set(tmp_path, tasks=2)
    plan = plan_merge(bp, mps)
    g = torch.Generator().manual_seed(3)
    grams, fishers = [], []
    for _ in mps:
        x = torch.randn(5, 30, generator=g, dtype=torch.float64)
        grams.append({"encoder.0.weight": x @ x.T})
        fishers.append(
            {k: torch.rand(base[k].shape, generator=g) for k in plan.delta_keys}
        )
    data = {"fisher": fishers, "gram": grams}
    p = {"k": 0.4, "damp": 0.0}
    res, masks = _masks(bp, mps, "tailor", p, data)
    plain, pmasks = _masks(bp, mps, "tailor", {**p, "compensate": False}, data)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(masks, pmasks) for k in a)
    n = plan.n
    assert plain.meta["kept"] == [keep_count(0.4, n)] * 2
    key = "encoder.0.weight"
    want = sum(
        compensate(ft[key] - base[key], m[key], gm[key], 0.0)
        for ft, m, gm in zip(fts, masks, grams)
    )
    torch.testing.assert_close(
        res.state[key], (base[key].double() + want).float(), rtol=1e-6, atol=1e-6
    )
    assert not torch.equal(res.state[key], plain.state[key])
    for k in ("encoder.0.bias", "encoder.1.weight", "norm.weight"):  # no Gram
        assert torch.equal(res.state[k], plain.state[k])
        want_k = base[k] + sum(
            torch.where(m[k], ft[k] - base[k], 0.0) for ft, m in zip(fts, masks)
        )
        torch.testing.assert_close(res.state[k], want_k, rtol=0, atol=1e-6)


# ---- the exact top-k rule under ties -------------------------------------------------
def test_exact_count_under_ties(tmp_path):
    tau = {"a": torch.ones(2, 5), "b": torch.full((7,), -1.0)}  # 17 equal magnitudes
    bp, mp = _pair(tmp_path, tau)
    ones = {k: torch.ones_like(v) for k, v in tau.items()}
    grad = {"gradient": [lambda state: {}]}
    for k in (0.1, 0.3, 0.5, 1.0):
        K = keep_count(k, 17)
        want_a = torch.arange(10) < K  # ties: the earlier position (a before b)
        want_b = torch.arange(7) < K - 10
        for method, params, data in (
            ("tailor", {"k": k, "compensate": False}, {"fisher": [ones]}),
            ("grafting", {"k": k, "steps": 0}, grad),
            ("grafting", {"k": k, "steps": 1}, grad),  # zero gradient: unchanged
        ):
            res, masks = _masks(bp, [mp], method, params, data)
            assert res.meta["kept"] == [K], (method, k)
            assert torch.equal(masks[0]["a"].reshape(-1), want_a), (method, k)
            assert torch.equal(masks[0]["b"], want_b), (method, k)


def test_signed_threshold_matches_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.randn(40, generator=g)
        x[::6] = x[1]  # ties
        x[2], x[3] = 0.0, -0.0
        K = int(torch.randint(0, 41, (1,), generator=g))
        cur = signed_threshold(lambda x=x: [x[:15], x[15:]], K).cursor()
        got = torch.cat([cur.mask(x[:15]), cur.mask(x[15:])])
        want = torch.zeros(40, dtype=torch.bool)
        want[torch.sort(x, descending=True, stable=True).indices[:K]] = True
        assert torch.equal(got, want)


# ---- Grafting on a hand-made quadratic loss ------------------------------------------
def test_grafting_moves_the_mask_to_the_entries_that_reduce_the_loss(tmp_path):
    tau = torch.tensor([3.0, 2.0, 1.0, 0.5])
    target = torch.tensor([0.0, 2.0, 1.0, 0.0])  # L = ½‖θ − θ*‖²: keep 1 and 2
    bp, mp = _pair(tmp_path, {"w": tau})
    seen = []

    def grad(state):
        w = state["w"].float()
        seen.append(w.clone())
        return {"w": w - target}

    loss = lambda w: 0.5 * float(((w - target) ** 2).sum())  # noqa: E731
    p = {"k": 0.5, "steps": 20, "lr": 10.0, "bias": 3.0}
    res, masks = _masks(bp, [mp], "grafting", p, {"gradient": [grad]})
    # the first gradient is taken at θ_pre + σ(±b)·τ, s = +b on the top-k of |τ|
    s0 = torch.tensor([3.0, 3.0, -3.0, -3.0])
    torch.testing.assert_close(seen[0], torch.sigmoid(s0) * tau)
    assert len(seen) == 20
    assert masks[0]["w"].tolist() == [False, True, True, False]
    assert torch.equal(res.state["w"], target) and loss(res.state["w"]) == 0
    magnitude = merge(bp, [mp], "magnitude", {"k": 0.5}).state["w"]
    assert loss(magnitude) > 0
    # by hand, the first step: s −= lr·λ·g ⊙ τ ⊙ σ'(s)
    sig = torch.sigmoid(s0)
    s1 = s0 - 10.0 * (seen[0] - target) * tau * sig * (1 - sig)
    torch.testing.assert_close(seen[1], torch.sigmoid(s1) * tau)
    # and the output differs from the base only on kept entries (λ = 1: θ_ft there)
    assert torch.equal(res.state["w"][~masks[0]["w"]], torch.zeros(2))


def test_grafting_without_steps_is_magnitude_top_k(tmp_path):
    bp, mps, _, _ = make_set(tmp_path)
    calls = []
    data = {"gradient": [lambda s: calls.append(1) or {}] * 3}
    for scope in ("global", "tensor"):
        p = {"k": 0.3, "lam": 0.7, "scope": scope}
        got, gm = _masks(bp, mps, "grafting", {**p, "steps": 0}, data)
        want, wm = _masks(bp, mps, "magnitude", p, None)
        assert got.meta["kept"] == want.meta["kept"] and got.masks == want.masks
        for a, b in zip(gm, wm):
            assert all(torch.equal(a[k], b[k]) for k in b)
        assert all(torch.equal(got.state[k], want.state[k]) for k in want.state)
    assert calls == []


# ---- bad input -----------------------------------------------------------------------
def test_bad_input_gives_clear_config_errors(tmp_path):
    bp, mps, _, _ = make_set(tmp_path, tasks=2)
    for method in ("grafting", "tailor"):
        for k in (0, 1.5, -0.1):
            with pytest.raises(ConfigError, match=rf"^{method}: k: "):
                merge(bp, mps, method, {"k": k}, data={})
        with pytest.raises(ConfigError, match="needs calibration data"):
            merge(bp, mps, method)
    with pytest.raises(ConfigError, match="damp"):
        merge(bp, mps, "tailor", {"damp": -1}, data={})
    with pytest.raises(ConfigError, match="data has no 'gradient' statistics"):
        merge(bp, mps, "grafting", data={"fisher": []})
    with pytest.raises(ConfigError, match="gradient: expected 2 entries, got 1"):
        merge(bp, mps, "grafting", data={"gradient": [lambda s: {}]})
    with pytest.raises(ConfigError, match="one callable"):
        merge(bp, mps, "grafting", data={"gradient": [1, 2]})
    with pytest.raises(ConfigError, match="data has no 'fisher' statistics"):
        merge(bp, mps, "tailor", data={"gram": [{}, {}]})
    fis = {"fisher": [{}, {}]}
    with pytest.raises(ConfigError, match="data has no 'gram' statistics"):
        merge(bp, mps, "tailor", data=fis)
    merge(bp, mps, "tailor", {"compensate": False}, data=fis)  # no Gram needed
    with pytest.raises(ConfigError, match="gives no calibration statistics"):
        EvaluatorData(object())

    class FisherOnly:  # calibration statistics, but no gradients
        tasks = ["a", "b"]

        def fisher(self, state, task, keys, examples=256):
            return {}

        def grams(self, state, task, keys, examples=256):
            return {}

    with pytest.raises(ConfigError, match="gives no loss gradients; grafting needs"):
        merge(bp, mps, "grafting", data=EvaluatorData(FisherOnly()))
    inf = {
        "gradient": [lambda s: {"encoder.0.weight": torch.full((6, 5), math.inf)}] * 2
    }
    with pytest.raises(ConfigError, match="encoder.0.weight: the loss gradient is not"):
        merge(bp, mps, "grafting", {"steps": 1}, data=inf)


# ---- the gradient statistic and end to end on a tiny Llama ---------------------------
@pytest.fixture(scope="module")
def llm_pair(tmp_path_factory):
    """A tiny Llama 'base' (10 steps) and its continuation 'quiz' (30 steps, same
    init), plus a causal-lm evaluator file with one choice task."""
    d = tmp_path_factory.mktemp("llm")
    base = make_tiny_llama(d / "base", seed=0, steps=10)
    ft = make_tiny_llama(d / "quiz", seed=0, steps=30)
    write_jsonl(d / "quiz-cal.jsonl", QUIZ_CAL)
    write_jsonl(d / "quiz-test.jsonl", QUIZ_TEST)
    spec = {
        "kind": "causal-lm",
        "precision": "fp32",
        "tasks": {
            "quiz": {
                "mode": "choice",
                "data": {"calibration": "quiz-cal.jsonl", "test": "quiz-test.jsonl"},
            }
        },
    }
    (d / "eval.yaml").write_text(yaml.safe_dump(spec))
    return {"dir": d, "base": base, "ft": ft, "eval": d / "eval.yaml"}


def test_causal_lm_gradients_match_a_hand_loop(llm_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = data_for(None, "cpu", evaluator=str(llm_pair["eval"]), base=llm_pair["base"])
    ev = data.evaluator
    assert isinstance(ev, GradientStats) and isinstance(ev, CalibrationStats)
    keys = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    state = read_state(llm_pair["ft"])
    got = ev.gradients(state, "quiz", keys, examples=2)
    model = AutoModelForCausalLM.from_pretrained(llm_pair["ft"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(llm_pair["ft"])
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(params[k]) for k in keys}
    for r in QUIZ_CAL[:2]:
        p = tok(r["prompt"])["input_ids"]
        ids = p + tok(r["choices"][r["answer"]], add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        lp = model(input_ids=x).logits[0, len(p) - 1 : -1].log_softmax(-1)
        loss = -lp.gather(-1, x[0, len(p) :, None]).mean()
        for k, gk in zip(keys, torch.autograd.grad(loss, [params[k] for k in keys])):
            acc[k] += gk / 2
    for k in keys:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], acc[k], rtol=1e-4, atol=1e-8)
    # one example: the Fisher is the square of the gradient (the same loss)
    one = ev.gradients(state, "quiz", keys, examples=1)
    fis = ev.fisher(state, "quiz", keys, examples=1)
    for k in keys:
        torch.testing.assert_close(fis[k], one[k] ** 2, rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in ev._model.parameters())


def test_both_methods_end_to_end_on_a_tiny_llama(llm_pair):
    plan = plan_merge(llm_pair["base"], [llm_pair["ft"]])
    data = data_for(None, "cpu", evaluator=str(llm_pair["eval"]), base=llm_pair["base"])
    data.examples = 2
    base = read_state(llm_pair["base"])
    ft = read_state(llm_pair["ft"])
    K = keep_count(0.1, plan.n)
    for method, params in (
        ("grafting", {"k": 0.1, "steps": 2, "examples": 2}),
        ("tailor", {"k": 0.1}),
    ):
        sink = MaskCollector(
            {k: plan.base.shape(k) for k in plan.delta_keys}, plan.task_names
        )
        res = run_merge(plan, get_method(method), params, data=data, masks=sink)
        assert res.meta["kept"] == [K] and sum(res.masks["quiz"].values()) == K
        mask = sink.masks["quiz"]
        changed = 0
        for k, v in res.state.items():
            assert torch.isfinite(v).all()
            if k not in mask:
                assert torch.equal(v, base[k])
                continue
            m = mask[k]
            assert torch.equal(v[~m], base[k][~m]), (method, k)  # only kept entries
            changed += int((v != base[k]).sum())
            if method == "grafting":  # λ = 1: the fine-tuned values there
                torch.testing.assert_close(v[m], ft[k][m], rtol=0, atol=1e-6)
        assert 0 < changed <= K


def test_cli_merges_with_an_evaluator_file(llm_pair, tmp_path, capsys):
    from npstune.cli import main

    def run(args):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = run(["methods", "--json"])
    rows = {r["name"]: r for r in json.loads(out)}
    for name in ("grafting", "tailor"):
        assert rows[name]["needs_data"] and rows[name]["paper"].startswith("https://")
    base = read_state(llm_pair["base"])
    for method, extra in (
        ("tailor", []),
        ("grafting", ["--param", "steps=1", "--param", "examples=2"]),
    ):
        dest = tmp_path / f"{method}.safetensors"
        code, out, err = run(
            [
                "merge",
                "--method",
                method,
                "--base",
                llm_pair["base"],
                "--models",
                llm_pair["ft"],
                "--out",
                dest,
                "--k",
                "0.1",
                "--evaluator",
                llm_pair["eval"],
                "--quiet",
                *extra,
            ]
        )
        assert code == 0, err
        summary = json.loads(out.split("  ", 1)[1])
        merged = read_state(dest)
        assert set(merged) == set(base)
        diff = sum(int((merged[k] != base[k]).sum()) for k in base)
        assert 0 < diff <= summary["kept"][0]
    code, _, err = run(
        [
            "merge",
            "--method",
            "tailor",
            "--base",
            llm_pair["base"],
            "--models",
            llm_pair["ft"],
            "--out",
            tmp_path / "x.safetensors",
        ]
    )
    assert code != 0 and "needs calibration data" in err


def test_text_classification_gradients_and_grafting(tmp_path):
    from tests.tiny_text import (
        LABELS,
        finetune_bert,
        make_tiny_bert,
        sentiment_rows,
    )
    from tests.tiny_text import write_jsonl as write_rows

    base = make_tiny_bert(tmp_path / "base")
    ft, head = finetune_bert(
        base,
        tmp_path / "sentiment",
        sentiment_rows(16, 1),
        "text",
        "label",
        LABELS,
        1,
        steps=5,
    )
    write_rows(tmp_path / "cal.jsonl", sentiment_rows(6, 2))
    spec = {
        "kind": "text-classification",
        "precision": "fp32",
        "max_length": 16,
        "tasks": {
            "sentiment": {
                "data": {"calibration": "cal.jsonl"},
                "label_names": LABELS,
                "head": head.name,
            }
        },
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(spec))
    data = data_for(None, "cpu", evaluator=str(tmp_path / "eval.yaml"), base=str(base))
    ev = data.evaluator
    assert isinstance(ev, GradientStats)
    state = read_state(ft)
    keys = ["encoder.layer.0.attention.self.query.weight", "pooler.dense.bias"]
    one = ev.gradients(state, "sentiment", keys, examples=1)
    fis = ev.fisher(state, "sentiment", keys, examples=1)
    key = keys[0]
    assert float(one[key].abs().sum()) > 0
    torch.testing.assert_close(fis[key], one[key] ** 2, rtol=1e-5, atol=1e-12)
    two = ev.gradients(state, "sentiment", keys, examples=2)
    assert not torch.equal(two[key], one[key])
    plan = plan_merge(base / "model.safetensors", [ft])
    res = run_merge(
        plan, get_method("grafting"), {"k": 0.05, "steps": 2, "examples": 2}, data=data
    )
    assert res.meta["kept"] == [keep_count(0.05, plan.n)]
