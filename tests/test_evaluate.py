"""Evaluators: the text evaluator against a hand-written loop, key checks,
CLIP heads."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from npstune.errors import CheckpointError, ConfigError, ShapeMismatchError
from npstune.evaluate import CallableEvaluator, Evaluator, evaluate_many
from npstune.zoo import model as zm


# ---- fast: interface, pooling, key checks --------------------------------------------
def test_callable_evaluator_is_an_evaluator():
    calls = []

    def fn(state, task, split):
        calls.append((task, split))
        return float(state["w"].sum()) + len(task)

    ev = CallableEvaluator(fn, tasks=["a", "bb"])
    assert isinstance(ev, Evaluator)
    state = {"w": torch.ones(3)}
    assert ev.evaluate(state, "a") == 4.0
    assert ev.evaluate_many(state, split="calibration") == {"a": 4.0, "bb": 5.0}
    assert calls[-1] == ("bb", "calibration")

    class Plain:  # no evaluate_many of its own: the helper loops
        def evaluate(self, state, task, split="test"):
            return 0.5

    assert evaluate_many(Plain(), state, ["x", "y"]) == {"x": 0.5, "y": 0.5}


def test_mean_pool_ignores_padding():
    h = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3).repeat(2, 1, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = zm.mean_pool(h, mask)
    torch.testing.assert_close(out[0], h[0, :2].mean(0))
    torch.testing.assert_close(out[1], h[1].mean(0))


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    return BertModel(cfg).eval()


def test_load_into_checks_keys_by_name(tiny_bert):
    good = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    good["embeddings.position_ids"] = torch.arange(16)[
        None
    ]  # stored by HF files: accepted
    zm.load_into(tiny_bert, good, "m.safetensors")
    renamed = {
        ("bert." + k if k.startswith("encoder.layer.0.output") else k): v
        for k, v in good.items()
    }
    with pytest.raises(
        CheckpointError, match=r"m.safetensors: key 'bert.encoder.layer.0.output"
    ):
        zm.load_into(tiny_bert, renamed, "m.safetensors")
    missing = {k: v for k, v in good.items() if k != "pooler.dense.bias"}
    with pytest.raises(CheckpointError, match="'pooler.dense.bias' is missing"):
        zm.load_into(tiny_bert, missing, "m")
    bad = dict(good, **{"pooler.dense.bias": torch.zeros(9)})
    with pytest.raises(ShapeMismatchError, match=r"m:pooler.dense.bias: shape \(9,\)"):
        zm.load_into(tiny_bert, bad, "m")


# ---- fast: CLIP zero-shot logic on a stand-in model ----------------------------------
class FakeClip(nn.Module):
    """encode_text: bag of token embeddings; encode_image: a linear map
    (the 'visual' tower)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(100, 4)
        self.visual = nn.Linear(6, 4, bias=False)

    def encode_text(self, tokens):
        return self.tok(tokens).sum(1)

    def encode_image(self, x):
        return self.visual(x.flatten(1))


def fake_tokenizer(texts):
    return torch.tensor(
        [
            [hash(w) % 100 for w in t.split()][:3] + [0] * (3 - len(t.split()[:3]))
            for t in texts
        ]
    )


def test_clip_zero_shot_heads_and_accuracy():
    from npstune.evaluate.clip import ClipTask, ClipZeroShotEvaluator

    model = FakeClip()
    images = torch.randn(10, 6)
    templates = ("a {}", "the {} here")
    classes = ["cat", "dog", "car"]
    # Reference: normalize prompt embeddings, mean, renormalize; logits 100 f·W.
    cols = []
    for c in classes:
        e = nn.functional.normalize(
            model.encode_text(fake_tokenizer([t.format(c) for t in templates])), dim=-1
        )
        cols.append(nn.functional.normalize(e.mean(0), dim=-1))
    w = torch.stack(cols, 1)
    with torch.no_grad():
        pred = (
            100 * nn.functional.normalize(model.encode_image(images), dim=-1) @ w
        ).argmax(-1)
    labels = pred.clone()
    labels[:3] = (labels[:3] + 1) % 3  # 7 of 10 right
    task = ClipTask(classes, {"test": (images, labels)}, templates)
    ev = ClipZeroShotEvaluator(
        model, fake_tokenizer, {"t": task}, batch_size=4, precision="fp32"
    )  # the reference above is fp32
    torch.testing.assert_close(ev.zero_shot_head("t"), w)
    state = {
        "visual.weight": model.visual.weight.detach().clone(),
        "logit_scale": torch.ones(()),
    }
    assert ev.evaluate(state, "t") == pytest.approx(0.7)
    zero = {"weight": torch.zeros(4, 6)}  # the tower's own keys work too
    ev.evaluate_many(zero, ["t"])
    assert torch.count_nonzero(model.visual.weight) == 0
    with pytest.raises(CheckpointError, match="'visual.bias'"):
        ev.load_state(
            {"visual.weight": torch.zeros(4, 6), "visual.bias": torch.zeros(4)}
        )
    with pytest.raises(ConfigError, match="unknown task"):
        ev.evaluate(state, "nope")


def test_open_clip_tiny_config(tmp_path):
    pytest.importorskip("open_clip")
    from npstune.evaluate.clip import (
        ClipTask,
        ClipZeroShotEvaluator,
        register_tiny_clip,
    )

    name = register_tiny_clip(tmp_path)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    ev = ClipZeroShotEvaluator.from_open_clip(
        name, {"t": ClipTask(["cat", "dog"], {"test": (images, labels)})}
    )
    state = {f"visual.{k}": v for k, v in ev.model.visual.state_dict().items()}
    assert 0.0 <= ev.evaluate(state, "t") <= 1.0
    assert ev.zero_shot_head("t").shape[1] == 2


def test_clip_missing_extra_is_clear(monkeypatch):
    import builtins

    from npstune.errors import MissingDependencyError
    from npstune.evaluate.clip import import_open_clip

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "open_clip":
            raise ImportError("No module named 'open_clip'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(MissingDependencyError, match=r"pip install 'npstune\[clip\]'"):
        import_open_clip()


# ---- slow: on the real small zoo -----------------------------------------------------
def _hand_loop(zoo, task, model_dir, n):
    """Accuracy on the first n calibration examples, one example at a time,
    no padding."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.base_path)
    body = AutoModel.from_pretrained(model_dir).eval()
    head = load_file(str(zoo.task(task).head_path))
    texts, labels = zoo.split(task, "calibration")
    right = 0
    with torch.no_grad():
        for text, y in zip(texts[:n], labels[:n]):
            enc = tok(text, truncation=True, max_length=64, return_tensors="pt")
            h = body(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).last_hidden_state
            pooled = h[0].mean(0)  # no padding: a plain mean
            logits = head["weight"] @ pooled + head["bias"]
            right += int(logits.argmax()) == y
    return right / n


@pytest.mark.slow
def test_text_evaluator_equals_hand_written_loop(small_zoo):
    from npstune.evaluate import TextClassificationEvaluator
    from npstune.evaluate.text import read_body_state

    n = 24
    ev = TextClassificationEvaluator(small_zoo, max_examples=n, batch_size=8)
    for task in small_zoo.tasks:
        for model_dir in (small_zoo.task(task).model_path, small_zoo.base_path):
            got = ev.evaluate(read_body_state(model_dir), task, "calibration")
            assert got == _hand_loop(small_zoo, task, model_dir, n), (task, model_dir)


@pytest.mark.slow
def test_text_evaluator_reproduces_build_accuracy_and_reuses_skeleton(small_zoo):
    from npstune.evaluate import TextClassificationEvaluator
    from npstune.evaluate.text import read_body_state

    ev = TextClassificationEvaluator(small_zoo)
    body = ev._body
    for task in small_zoo.tasks:
        state = read_body_state(small_zoo.task(task).model_path)
        got = ev.evaluate(state, task, "calibration")
        want = small_zoo.task(task).accuracy["finetuned_calibration"]
        assert abs(got - want) <= 1 / 256, (
            task,
            got,
            want,
        )  # batching may flip a near-tie
        assert ev._body is body
    assert len(ev._batches) == len(small_zoo.tasks)
    with pytest.raises(ConfigError, match="unknown split"):
        ev.evaluate(state, small_zoo.tasks[0], "validation")


@pytest.mark.slow
def test_cli_eval_json_and_key_mismatch(small_zoo, tmp_path, capsys):
    from safetensors.torch import save_file

    from npstune.cli import main
    from npstune.evaluate.text import read_body_state

    task = "election"
    cache = str(small_zoo.root.parent)
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "eval",
                "--zoo",
                "small",
                "--model",
                str(small_zoo.task(task).model_path),
                "--split",
                "calibration",
                "--tasks",
                task,
                "--json",
                "--cache-dir",
                cache,
            ]
        )
        raise SystemExit(0)
    assert exit_.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "calibration" and list(out["accuracy"]) == [task]
    want = small_zoo.task(task).accuracy["finetuned_calibration"]
    assert abs(out["accuracy"][task] - want) <= 1 / 256

    state = read_body_state(small_zoo.base_path)
    state["bert.pooler.dense.weight"] = state.pop("pooler.dense.weight")
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--zoo", "small", "--model", str(bad), "--cache-dir", cache])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "key 'bert.pooler.dense.weight' is not in the base model" in err
