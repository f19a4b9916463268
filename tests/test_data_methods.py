"""Fisher, RegMean and calibration choices on pinned statistics (no zoo needed)."""

from __future__ import annotations

import pytest
import torch

from npstune.checkpoints import write_state_dict
from npstune.errors import ConfigError
from npstune.merge import merge
from npstune.merge.calibrate import (
    choose_darex_q,
    choose_lambda,
    choose_scale,
    delta_of,
    direction,
    scaled,
    tall_models,
)
from npstune.merge.regmean import regmean_solve
from npstune.taskvector import plan_merge
from tests.tiny import make_set


def test_fisher_with_equal_fishers_equals_averaging(tmp_path):
    bp, mps, base, fts = make_set(tmp_path)
    plan = plan_merge(bp, mps)
    ones = [{k: torch.full(base[k].shape, 0.7) for k in plan.delta_keys} for _ in mps]
    got = merge(bp, mps, "fisher", data={"fisher": ones}).state
    want = merge(bp, mps, "average").state
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-7)


def test_fisher_weights_each_entry_hand_checked(tmp_path):
    b = write_state_dict(tmp_path / "b.safetensors", {"w": torch.zeros(3)})
    m1 = write_state_dict(
        tmp_path / "m1.safetensors", {"w": torch.tensor([1.0, 1.0, 1.0])}
    )
    m2 = write_state_dict(
        tmp_path / "m2.safetensors", {"w": torch.tensor([4.0, 4.0, 4.0])}
    )
    f = [{"w": torch.tensor([1.0, 3.0, 0.0])}, {"w": torch.tensor([1.0, 1.0, 0.0])}]
    got = merge(b, [m1, m2], "fisher", data={"fisher": f}).state["w"]
    # (1·1 + 1·4)/2 = 2.5; (3·1 + 1·4)/4 = 1.75; both zero -> plain mean 2.5
    assert got.tolist() == [2.5, 1.75, 2.5]


def test_fisher_needs_data(tmp_path):
    bp, mps, _, _ = make_set(tmp_path)
    with pytest.raises(ConfigError, match="needs calibration data"):
        merge(bp, mps, "fisher")


def test_regmean_single_layer_equals_closed_form_least_squares():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(50, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = [x.T @ x for x in xs]
    got = regmean_solve(grams, ws, alpha=1.0)
    # least squares: min_W Σ_t ||X_t Wᵀ − X_t W_tᵀ||²  <=>  stack the problems
    X = torch.cat(xs)
    Y = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    want = torch.linalg.lstsq(X, Y).solution.T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # α < 1 shrinks off-diagonals: with α = 0 each input dim is merged independently
    diag = regmean_solve(grams, ws, alpha=0.0)
    d = torch.stack([torch.diagonal(gm) for gm in grams])  # T × in
    want0 = sum(d[t] * ws[t] for t in range(3)) / d.sum(0)
    torch.testing.assert_close(diag, want0, rtol=1e-9, atol=1e-9)


def test_regmean_merge_uses_grams_for_linear_weights_and_averages_the_rest(tmp_path):
    bp, mps, base, fts = make_set(tmp_path)
    plan = plan_merge(bp, mps)
    g = torch.Generator().manual_seed(1)
    grams = []
    for _ in mps:
        x = torch.randn(30, 5, generator=g, dtype=torch.float64)
        grams.append({"encoder.0.weight": x.T @ x})
    got = merge(bp, mps, "regmean", {"alpha": 1.0}, data={"gram": grams}).state
    want_w = regmean_solve(
        [gm["encoder.0.weight"] for gm in grams],
        [f["encoder.0.weight"] for f in fts],
        1.0,
    )
    torch.testing.assert_close(
        got["encoder.0.weight"], want_w.float(), rtol=1e-5, atol=1e-6
    )
    avg = merge(bp, mps, "average").state
    for k in ("encoder.0.bias", "encoder.1.weight", "norm.weight"):
        torch.testing.assert_close(got[k], avg[k], rtol=0, atol=1e-6)
    assert plan.n > 0


def _score_against(target):
    """A calibration 'accuracy' that peaks when the merged weights equal ``target``."""

    def score(state):
        return -sum(
            float(((state[k].double() - target[k].double()) ** 2).sum()) for k in target
        )

    return score


def test_choose_lambda_finds_the_grid_point_closest_to_the_target(tmp_path):
    bp, mps, base, fts = make_set(tmp_path)
    plan = plan_merge(bp, mps)
    d = direction(plan, "task-arithmetic")
    target = scaled(plan, d, 0.7)
    ch = choose_lambda(plan, "task-arithmetic", _score_against(target))
    assert ch.value == 0.7 and len(ch.tried) == 15
    ties = choose_lambda(
        plan, "ties", _score_against(scaled(plan, direction(plan, "ties"), 1.3))
    )
    assert ties.value == 1.3 and [lam for lam, _ in ties.tried][0] == 0.8


@pytest.mark.parametrize(
    "method,params,scale",
    [
        ("tsv-m", {}, "alpha"),
        ("iso-c", {}, "alpha"),
        ("iso-cts", {"common_fraction": 0.8}, "alpha"),
        ("pcb", {"ratio": 0.3}, "lam"),
    ],
)
def test_rescaling_the_scale_one_direction_is_the_merge_at_that_scale(
    tmp_path, method, params, scale
):
    """What the fusion table's α / λ grids rely on: a scalar α (TSV-M, Iso-C/CTS) or λ
    (PCB) multiplies the whole Δ, averaged keys included, so one merge at 1 rescaled
    is the merge at any α (to the base dtype's rounding)."""
    bp, mps, base, fts = make_set(tmp_path)
    plan = plan_merge(bp, mps)
    d = direction(plan, method, params, scale)
    for a in (0.4, 2.5):
        want = merge(bp, mps, method, {**params, scale: a}).state
        got = scaled(plan, d, a)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    target = _score_against(scaled(plan, d, 0.6))
    ch = choose_lambda(plan, method, target, params, (0.3, 0.6, 1.0), scale=scale)
    assert ch.value == 0.6 and [a for a, _ in ch.tried] == [0.3, 0.6, 1.0]


def test_choose_scale_on_a_merged_state_without_a_scale(tmp_path):
    """WUDI has no scale: its merged state's Δ (delta_of) is rescaled from outside,
    and λ = 1 gives that state back bit for bit."""
    bp, mps, base, fts = make_set(tmp_path)
    plan = plan_merge(bp, mps)
    st = merge(bp, mps, "wudi", {"steps": 5}).state
    d = delta_of(plan, st)
    assert all(torch.equal(v, scaled(plan, d, 1.0)[k]) for k, v in st.items())
    ch = choose_scale(plan, d, _score_against(scaled(plan, d, 0.5)), (0.5, 1.0))
    assert ch.value == 0.5
    with pytest.raises(ConfigError):  # no α to set on WUDI: refused, not ignored
        direction(plan, "wudi", {"steps": 5}, "alpha")


def test_darex_q_search_stays_in_range_and_refines(tmp_path):
    bp, mps, base, fts = make_set(tmp_path)
    plan = plan_merge(bp, mps)
    s1 = direction(plan, "darex", {"k": 0.2, "q": 1.0, "seed": 0})
    target = scaled(plan, s1, 1 / 0.45)
    ch = choose_darex_q(plan, 0.2, _score_against(target))
    qs = [q for q, _ in ch.tried]
    assert min(qs) >= 0.2 and max(qs) <= 1.0
    assert abs(ch.value - 0.45) < 0.05
    assert len(qs) > 5  # coarse grid plus refinement


def test_tall_models_pick_a_lambda_per_task(tmp_path):
    bp, mps, base, fts = make_set(tmp_path)
    plan = plan_merge(bp, mps)

    def score_task(state, t):  # each task wants to be close to its own fine-tuned model
        return _score_against({k: fts[t][k] for k in plan.delta_keys})(state)

    choices = tall_models(plan, score_task)
    assert len(choices) == 3
    for ch in choices:
        assert ch.value in (0.2, 0.3, 0.4, 0.5, 0.6) and len(ch.tried) == 5
        assert ch.score == max(s for _, s in ch.tried)


@pytest.mark.slow
def test_fisher_and_regmean_from_the_small_zoo(small_zoo):
    from npstune.merge.data import zoo_data

    plan = plan_merge(
        small_zoo.base_path, [small_zoo.task(t).model_path for t in small_zoo.tasks[:2]]
    )
    data = zoo_data(small_zoo, examples=4)
    assert data.task_of(plan.models[1]) == small_zoo.tasks[1]
    fis = data.fisher(plan.models[0], plan.delta_keys)
    assert set(fis) <= set(plan.delta_keys) and all(
        bool((f >= 0).all()) for f in fis.values()
    )
    assert sum(float(f.sum()) for f in fis.values()) > 0
    grams = data.grams(plan.models[0], plan.delta_keys)
    q = "encoder.layer.0.attention.self.query.weight"
    assert grams[q].shape == (384, 384)
    torch.testing.assert_close(grams[q], grams[q].T)  # symmetric PSD
    assert float(torch.linalg.eigvalsh(grams[q]).min()) > -1e-6 * float(
        grams[q].diagonal().max()
    )
    st = merge(
        plan.base,
        plan.models,
        "regmean",
        data={"gram": [grams, data.grams(plan.models[1], plan.delta_keys)]},
    ).state
    assert all(bool(torch.isfinite(v.float()).all()) for v in st.values())
