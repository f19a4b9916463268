"""Searches with the user-data evaluator kinds, through Ray Tune and MLflow.

Real files the test makes: a tiny BERT with two fine-tuned bodies (text-classification)
and a tiny Llama with two fine-tuned experts (causal-lm), each with JSONL/CSV data and
an evaluator file the search file names.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("mlflow")

from npstune.search.runner import run_search  # noqa: E402
from npstune.search.space import load_config  # noqa: E402
from tests.test_search_support import mlflow_runs  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _search(
    tmp: Path,
    name: str,
    base: Path,
    models: list[Path],
    evaluator: str,
    baselines: list[str],
) -> Path:
    cfg = {
        "name": name,
        "use": "fusion",
        "base": str(base),
        "models": [str(m) for m in models],
        "evaluator": evaluator,
        "nps": {"subspaces": 4, "k": 0.3, "lam": {"low": 0.5, "high": 1.5}},
        "search": {"generations": 2, "population": 3, "seed": 3},
        "resources": {"cpus_per_trial": 1},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "report": {"baselines": baselines},
        "output_dir": str(tmp / "out"),
    }
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _check(cfg, outcome, tasks: list[str]) -> None:
    assert outcome.generations == 2 and outcome.trials == 6
    rep = outcome.report
    nps = rep.row("nps")
    assert {f"acc/{t}" for t in tasks} <= set(nps.test)
    assert outcome.best.value == pytest.approx(nps.calibration["objective"])
    parents, children = mlflow_runs(cfg.tracking_uri, cfg.experiment)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = children[parents[0].info.run_id]
    assert len(kids) == 6
    assert all("objective" in k.data.metrics for k in kids)
    assert Path(rep.files["best_model"]).exists()


def test_text_classification_search_through_ray_and_mlflow(ray_local, tmp_path):
    from tests.tiny_text import (
        LABELS,
        finetune_bert,
        length_rows,
        make_tiny_bert,
        sentiment_rows,
        write_jsonl,
    )

    base = make_tiny_bert(tmp_path / "base")
    ft_s, head_s = finetune_bert(
        base, tmp_path / "sentiment", sentiment_rows(48, 1), "text", "label", LABELS, 1
    )
    ft_l, head_l = finetune_bert(
        base, tmp_path / "length", length_rows(48, 2), "sentence", "y", None, 2
    )
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "s-cal.jsonl", sentiment_rows(10, 3))
    write_jsonl(data / "s-test.jsonl", sentiment_rows(12, 4))
    write_jsonl(data / "l-cal.jsonl", length_rows(10, 5))
    write_jsonl(data / "l-test.jsonl", length_rows(12, 6))
    (data / "eval.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "text-classification",
                "max_length": 16,
                "tasks": {
                    "sentiment": {
                        "data": {"calibration": "s-cal.jsonl", "test": "s-test.jsonl"},
                        "label_names": LABELS,
                        "head": str(head_s),
                    },
                    "length": {
                        "data": {"calibration": "l-cal.jsonl", "test": "l-test.jsonl"},
                        "text_field": "sentence",
                        "label_field": "y",
                        "label_names": ["short", "long"],
                        "head": str(head_l),
                    },
                },
            }
        )
    )
    path = _search(
        tmp_path,
        "tc-search",
        base,
        [ft_s, ft_l],
        "data/eval.yaml",
        ["pretrained", "individual", "task-arithmetic"],
    )
    cfg = load_config(path)
    assert cfg.evaluator.kind == "text-classification"
    outcome = run_search(cfg)
    _check(cfg, outcome, ["sentiment", "length"])
    ind = outcome.report.row("individual").test
    assert (
        ind["acc/sentiment"] >= outcome.report.row("pretrained").test["acc/sentiment"]
    )


def _expert(
    base: Path, out: Path, lines: list[str], seed: int, steps: int = 15
) -> Path:
    """Fine-tune the tiny Llama ``base`` a few AdamW steps on ``lines``;
    save to ``out``."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base))
    enc = tok([ln + " <eos>" for ln in lines], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def test_causal_lm_search_through_ray_and_mlflow(ray_local, tmp_path):
    import json

    from tests.tiny_llm import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", seed=0, steps=20)
    colors = _expert(
        base,
        tmp_path / "colors",
        [
            "q : what color is the sky ? a : blue",
            "q : what color is snow ? a : white",
            "q : what color is the grass ? a : green",
        ],
        1,
    )
    sums = _expert(
        base,
        tmp_path / "sums",
        ["one plus one is two", "two plus two is four", "one plus two is three"],
        2,
    )
    data = tmp_path / "data"
    data.mkdir()
    quiz = [
        {
            "prompt": f"q : what color is {x} ? a :",
            "choices": ["blue", "green", "white"],
            "answer": i,
        }
        for x, i in (("the sky", 0), ("the grass", 1), ("snow", 2))
    ]
    gen = [
        {"prompt": p, "answer": a}
        for p, a in (
            ("one plus one is", "two"),
            ("two plus two is", "four"),
            ("one plus two is", "three"),
        )
    ]
    for name, rows in (
        ("quiz.jsonl", quiz),
        ("gen.jsonl", gen),
        ("text.jsonl", [{"text": "the cat sat on the mat"}]),
    ):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluator = {
        "kind": "causal-lm",
        "tasks": {
            "colors": {
                "mode": "choice",
                "data": {"calibration": "quiz.jsonl", "test": "quiz.jsonl"},
            },
            "sums": {
                "mode": "generate",
                "max_new_tokens": 2,
                "data": {"calibration": "gen.jsonl", "test": "gen.jsonl"},
            },
            "text": {
                "mode": "perplexity",
                "data": {"calibration": "text.jsonl", "test": "text.jsonl"},
            },
        },
    }
    (data / "eval.yaml").write_text(yaml.safe_dump(evaluator))
    path = _search(
        tmp_path,
        "lm-search",
        base,
        [colors, sums],
        "data/eval.yaml",
        ["pretrained", "task-arithmetic"],
    )
    cfg = load_config(path)
    assert cfg.evaluator.kind == "causal-lm"
    outcome = run_search(cfg)
    _check(cfg, outcome, ["colors", "sums"])
