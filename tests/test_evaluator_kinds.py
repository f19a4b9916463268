"""Evaluator registry, evaluator files, data files, the text-classification kind,
`npstune eval --evaluator`, and Fisher / RegMean on a non-zoo evaluator."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from npstune.cli import main
from npstune.errors import ConfigError
from npstune.evaluate.kinds import KINDS, get_kind, kind_names
from npstune.evaluate.records import read_records
from npstune.evaluate.spec import load_evaluator_file, parse_evaluator
from tests.tiny_text import (
    LABELS,
    finetune_bert,
    length_rows,
    make_tiny_bert,
    sentiment_rows,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tc(tmp_path_factory):
    """A tiny BERT base, two fine-tuned bodies + heads, data files and an eval file."""
    d = tmp_path_factory.mktemp("tc")
    base = make_tiny_bert(d / "base")
    sent = sentiment_rows(64, 1)
    ft_s, head_s = finetune_bert(
        base, d / "sentiment", sent, "text", "label", LABELS, 1
    )
    lng = length_rows(64, 2)
    ft_l, head_l = finetune_bert(base, d / "length", lng, "sentence", "y", None, 2)
    write_jsonl(d / "sent-cal.jsonl", sentiment_rows(12, 3))
    write_jsonl(d / "sent-test.jsonl", sentiment_rows(20, 4))
    for name, rows in (
        ("len-cal.csv", length_rows(10, 5)),
        ("len-test.csv", length_rows(18, 6)),
    ):
        with (d / name).open("w", newline="") as fh:
            w = csv.DictWriter(fh, ["sentence", "y"])
            w.writeheader()
            w.writerows(rows)
    spec = {
        "kind": "text-classification",
        "precision": "fp32",  # the hand loops below are fp32, on any CPU
        "max_length": 16,
        "tasks": {
            "sentiment": {
                "data": {"calibration": "sent-cal.jsonl", "test": "sent-test.jsonl"},
                "label_names": LABELS,
                "head": head_s.name,
            },
            "length": {
                "data": {"calibration": "len-cal.csv", "test": "len-test.csv"},
                "text_field": "sentence",
                "label_field": "y",
                "label_names": ["short", "long"],
                "head": head_l.name,
            },
        },
    }
    (d / "eval.yaml").write_text(yaml.safe_dump(spec))
    return {
        "dir": d,
        "base": base,
        "ft": {"sentiment": ft_s, "length": ft_l},
        "heads": {"sentiment": head_s, "length": head_l},
        "spec": spec,
    }


def run(args, capsys) -> tuple[int, str, str]:
    """``npstune ARGS`` in-process: (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _state(path: Path) -> dict[str, torch.Tensor]:
    from npstune.evaluate.hf import read_state

    return read_state(path)


@torch.no_grad()
def _hand_accuracy(model_dir: Path, head: Path, rows, text, label, names) -> float:
    """The plain loop: one example at a time, mean pooling, the head, argmax."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    body = AutoModel.from_pretrained(str(model_dir)).eval()
    h = load_file(str(head))
    right = 0
    for r in rows:
        enc = tok(str(r[text]), return_tensors="pt", truncation=True, max_length=16)
        out = body(**enc).last_hidden_state.mean(1)
        pred = int((out @ h["weight"].T + h["bias"]).argmax(-1))
        y = (
            names.index(r[label])
            if isinstance(r[label], str) and not r[label].isdigit()
            else int(r[label])
        )
        right += int(pred == y)
    return right / len(rows)


# ---- registry ------------------------------------------------------------------------
def test_registry_lists_every_kind_and_refuses_unknown_ones():
    assert {"zoo", "text-classification", "causal-lm", "clip", "callable"} <= set(
        kind_names()
    )
    for name in KINDS:
        assert get_kind(name).name == name
    with pytest.raises(ConfigError, match="unknown evaluator kind 'nope'; valid: "):
        get_kind("nope")


def test_a_plugin_kind_is_one_module_and_an_entry_point(monkeypatch, tmp_path):
    import npstune.evaluate.kinds as kinds

    monkeypatch.setattr(
        kinds, "_plugins", lambda: {"mine": "npstune.evaluate.callable_kind:KIND"}
    )
    assert "mine" in kinds.kind_names()
    assert kinds.get_kind("mine").name == "callable"


# ---- data files ----------------------------------------------------------------------
def test_records_read_jsonl_json_csv_and_parquet_alike(tmp_path):
    rows = [{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with (tmp_path / "d.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    for name in ("d.jsonl", "d.json", "d.csv"):
        assert read_records(tmp_path / name) == rows
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert read_records(tmp_path / "d.parquet") == rows


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "data file not found"),
        ("", "empty split"),
        ('{"text": 1}\nnot json\n', "line 2 is not valid JSON"),
    ],
)
def test_records_errors_name_the_file_task_and_split(tmp_path, content, needle):
    p = tmp_path / "x.jsonl"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError) as exc:
        read_records(p, "quiz", "test")
    msg = str(exc.value)
    assert needle in msg and str(p) in msg and "task 'quiz'" in msg
    assert "\n" not in msg


# ---- the evaluator file --------------------------------------------------------------
def test_evaluator_file_errors_are_one_line(tc, tmp_path):
    spec = json.loads(json.dumps(tc["spec"]))
    spec["tasks"]["sentiment"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"tasks\.sentiment\.bogus: unknown key"):
        parse_evaluator(spec, tc["dir"], "e.yaml")
    with pytest.raises(ConfigError, match="kind: is missing"):
        parse_evaluator({"tasks": {}}, tc["dir"], "e.yaml")
    with pytest.raises(ConfigError, match="no such evaluator file"):
        load_evaluator_file(tmp_path / "none.yaml")
    ef = load_evaluator_file(tc["dir"] / "eval.yaml")
    with pytest.raises(ConfigError, match="needs a model directory"):
        ef.build()


# ---- text-classification -------------------------------------------------------------
def test_text_classification_accuracy_equals_a_hand_loop(tc):
    ef = load_evaluator_file(tc["dir"] / "eval.yaml")
    ev = ef.build(model=tc["base"], batch_size=4, prepare=("test",))
    d = tc["dir"]
    for task, text, label, names, data in (
        ("sentiment", "text", "label", LABELS, read_records(d / "sent-test.jsonl")),
        (
            "length",
            "sentence",
            "y",
            ["short", "long"],
            read_records(d / "len-test.csv"),
        ),
    ):
        ft = tc["ft"][task]
        got = ev.evaluate(_state(ft), task, "test")
        want = _hand_accuracy(ft, tc["heads"][task], data, text, label, names)
        assert got == pytest.approx(want, abs=1e-12)
        assert ev.examples(task, "test") == len(data)
    # the fine-tuned body beats the untrained base on its own task
    base_acc = ev.evaluate(_state(tc["base"]), "sentiment", "test")
    assert ev.evaluate(_state(tc["ft"]["sentiment"]), "sentiment", "test") > base_acc


def test_text_classification_limits_and_checkpoint_heads(tc, tmp_path):
    from transformers import BertForSequenceClassification

    ft = tc["ft"]["sentiment"]
    # a fine-tuned *ForSequenceClassification dir as the head: classifier from it
    cls = BertForSequenceClassification.from_pretrained(str(ft), num_labels=2)
    torch.manual_seed(0)
    cls.classifier.weight.data.normal_()
    cls.save_pretrained(tmp_path / "seqcls")
    spec = json.loads(json.dumps(tc["spec"]))
    spec["tasks"]["sentiment"]["head"] = str(tmp_path / "seqcls")
    ev = parse_evaluator(spec, tc["dir"], "e").build(
        model=tc["base"], max_examples={"test": 7}
    )
    assert ev.examples("sentiment", "test") == 7
    rows = read_records(tc["dir"] / "sent-test.jsonl")[:7]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ft))
    cls.eval()
    with torch.no_grad():
        want = (
            sum(
                int(cls(**tok(r["text"], return_tensors="pt")).logits.argmax())
                == LABELS.index(r["label"])
                for r in rows
            )
            / 7
        )
    # the state is the plain encoder (no "bert." prefix); the head comes from seqcls
    assert ev.evaluate(_state(ft), "sentiment", "test") == pytest.approx(want)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (
            lambda s: s["tasks"]["sentiment"].update(text_field="missing"),
            "has no field 'missing'",
        ),
        (
            lambda s: s["tasks"]["sentiment"].update(label_names=["neg", "pos"]),
            "label 'negative' is not among the label names",
        ),
        (
            lambda s: s["tasks"]["sentiment"]["data"].update(test="nope.jsonl"),
            "nope.jsonl, task 'sentiment', split 'test': data file not found",
        ),
        (lambda s: s["tasks"]["sentiment"].update(head="nohead.safetensors"), "head: "),
        (
            lambda s: s["tasks"]["sentiment"].update(label_names=["a", "b", "c"]),
            "does not fit 3 label names",
        ),
    ],
)
def test_text_classification_bad_input_is_one_clear_line(tc, edit, needle):
    spec = json.loads(json.dumps(tc["spec"]))
    edit(spec)
    with pytest.raises(ConfigError) as exc:
        ev = parse_evaluator(spec, tc["dir"], "e").build(model=tc["base"])
        ev.evaluate(_state(tc["base"]), "sentiment", "test")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_empty_split_is_refused(tc, tmp_path):
    (tc["dir"] / "empty.jsonl").write_text("")
    spec = json.loads(json.dumps(tc["spec"]))
    spec["tasks"]["sentiment"]["data"]["test"] = "empty.jsonl"
    ev = parse_evaluator(spec, tc["dir"], "e").build(model=tc["base"])
    with pytest.raises(
        ConfigError, match="empty.jsonl, task 'sentiment', split 'test': empty split"
    ):
        ev.evaluate(_state(tc["base"]), "sentiment", "test")


# ---- npstune eval --evaluator --------------------------------------------------------
def test_eval_command_prints_the_contract_json(tc, capsys):
    ft = tc["ft"]["sentiment"]
    code, stdout, err = run(
        ["eval", "--model", ft, "--evaluator", tc["dir"] / "eval.yaml", "--json"],
        capsys,
    )
    assert code == 0, err
    out = json.loads(stdout)
    assert set(out) == {"scores", "metrics", "examples", "mean"}
    assert out["metrics"] == {"sentiment": "accuracy", "length": "accuracy"}
    assert out["examples"] == {"sentiment": 20, "length": 18}
    want = _hand_accuracy(
        ft,
        tc["heads"]["sentiment"],
        read_records(tc["dir"] / "sent-test.jsonl"),
        "text",
        "label",
        LABELS,
    )
    assert out["scores"]["sentiment"] == pytest.approx(want)
    assert out["mean"] == pytest.approx(sum(out["scores"].values()) / 2)
    code, stdout, err = run(
        [
            "eval",
            "--model",
            ft,
            "--evaluator",
            tc["dir"] / "eval.yaml",
            "--split",
            "calibration",
            "--tasks",
            "length",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads(stdout)["examples"] == {"length": 10}
    code, _, err = run(["eval", "--model", ft], capsys)
    assert code == 1 and "exactly one of --zoo SIZE or --evaluator" in err
    code, stdout, err = run(
        ["eval", "--model", ft, "--evaluator", tc["dir"] / "eval.yaml"], capsys
    )
    assert code == 0 and "sentiment" in stdout and "accuracy" in stdout


# ---- Fisher and RegMean on a non-zoo evaluator ---------------------------------------
def test_fisher_and_regmean_on_a_text_classification_evaluator(tc, tmp_path, capsys):
    from npstune.merge.data import EvaluatorData, data_for
    from npstune.taskvector import plan_merge

    base = tc["base"] / "model.safetensors"
    models = [tc["ft"]["sentiment"], tc["ft"]["length"]]
    plan = plan_merge(base, models)
    data = data_for(
        None, "cpu", evaluator=str(tc["dir"] / "eval.yaml"), base=str(tc["base"])
    )
    assert isinstance(data, EvaluatorData)
    assert [data.task_of(m, i) for i, m in enumerate(plan.models)] == [
        "sentiment",
        "length",
    ]
    data.examples = 2
    fis = data.fisher(plan.models[0], plan.delta_keys)
    # hand loop: squared gradients of the CE loss of the first two (length-sorted)
    # calibration examples
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    body = AutoModel.from_pretrained(str(models[0]))
    tok = AutoTokenizer.from_pretrained(str(models[0]))
    h = load_file(str(tc["heads"]["sentiment"]))
    rows = read_records(tc["dir"] / "sent-cal.jsonl")
    ids = [tok(r["text"], truncation=True, max_length=16)["input_ids"] for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (len(ids[i]), i))[:2]
    key = "encoder.layer.0.attention.self.query.weight"
    p = dict(body.named_parameters())[key]
    acc = torch.zeros_like(p)
    for i in order:
        x = torch.tensor([ids[i]])
        out = body(input_ids=x).last_hidden_state.mean(1)
        loss = torch.nn.functional.cross_entropy(
            out @ h["weight"].T + h["bias"],
            torch.tensor([LABELS.index(rows[i]["label"])]),
            reduction="sum",
        )
        (g,) = torch.autograd.grad(loss, [p])
        acc += g**2
    torch.testing.assert_close(fis[key], acc / 2, rtol=1e-4, atol=1e-10)
    assert all(bool((f >= 0).all()) for f in fis.values())
    # the merges run from the CLI on the evaluator file and differ from averaging
    outs = {}
    for method in ("fisher", "regmean", "average"):
        out = tmp_path / f"{method}.safetensors"
        code, _, err = run(
            [
                "merge",
                "--method",
                method,
                "--base",
                base,
                "--models",
                *models,
                "--out",
                out,
                "--evaluator",
                tc["dir"] / "eval.yaml",
                "--quiet",
            ],
            capsys,
        )
        assert code == 0, err
        outs[method] = _state(out)
    for method in ("fisher", "regmean"):
        assert all(torch.isfinite(v).all() for v in outs[method].values())
        assert not torch.equal(outs[method][key], outs["average"][key])


# ---- precision -----------------------------------------------------------------------
def test_precision_is_checked_and_resolved(monkeypatch, caplog):
    from npstune.evaluate import hf
    from npstune.search.space import EvaluatorSpec

    with pytest.raises(ConfigError, match=r"^e\.yaml: precision 'fp16': expected one"):
        parse_evaluator({"kind": "zoo", "precision": "fp16"}, ".", "e.yaml")
    assert parse_evaluator(
        {"kind": "zoo", "precision": "bf16"}, ".", "e"
    ).precision == ("bf16")
    assert parse_evaluator({"kind": "zoo"}, ".", "e").precision is None  # -> auto
    spec = EvaluatorSpec.model_validate({"kind": "zoo", "precision": "bf16"})
    assert spec.precision == "bf16" and "precision" not in spec.options
    assert EvaluatorSpec().precision == "auto"
    with pytest.raises(ValueError, match="precision"):
        EvaluatorSpec.model_validate({"kind": "zoo", "precision": "half"})

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # no GPU needed to resolve
    for dev in (cpu, cuda):
        assert hf.autocast_dtype(dev, "fp32") is None
        assert hf.autocast_dtype(dev, "bf16") is torch.bfloat16
    assert hf.autocast_dtype(cuda, "auto") is torch.bfloat16
    for native in (False, True):
        # auto: bf16 where the CPU has it natively; a forced bf16 on a CPU that
        # emulates it is warned about
        monkeypatch.setattr(hf, "cpu_has_bf16", lambda native=native: native)
        hf._warn_emulated.cache_clear()
        assert hf.autocast_dtype(cpu, "auto") is (torch.bfloat16 if native else None)
        assert isinstance(hf.autocast(cpu, "auto"), torch.autocast) == native
        with caplog.at_level("WARNING", logger="npstune.evaluate.hf"):
            caplog.clear()
            assert isinstance(hf.autocast(cpu, "bf16"), torch.autocast)
        assert ("emulated" in caplog.text) == (not native)
    # statistics passes (Fisher, Gram matrices) stay fp32 on a CPU unless forced
    assert hf.stats_precision(cpu, "auto") == "fp32"
    assert hf.stats_precision(cpu, "bf16") == "bf16"
    assert hf.stats_precision(cuda, "auto") == "auto"
    with pytest.raises(ConfigError, match="precision 'fp64'"):
        hf.autocast_dtype(cpu, "fp64")


def test_bf16_runs_the_encoder_in_bf16_and_scores_near_fp32(tc):
    """precision bf16: every encoder Linear computes in bf16 (autocast), the head in
    fp32; fp32 leaves everything fp32; the two accuracies are close."""
    seen: list[torch.dtype] = []

    def hook(module, args, out):
        if isinstance(module, torch.nn.Linear):
            seen.append(out.dtype)

    state = _state(tc["ft"]["sentiment"])
    acc = {}
    for precision in ("fp32", "bf16"):
        spec = {**tc["spec"], "precision": precision}
        ev = parse_evaluator(spec, tc["dir"], "e").build(
            model=tc["base"], prepare=("test",)
        )
        seen.clear()
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            acc[precision] = ev.evaluate(state, "sentiment", "test")
        finally:
            handle.remove()
        want = torch.float32 if precision == "fp32" else torch.bfloat16
        assert seen and set(seen) == {want}
    assert acc["bf16"] == pytest.approx(acc["fp32"], abs=0.1)  # 2 of 20 examples


def test_eval_command_takes_a_precision(tc, capsys):
    ft = tc["ft"]["sentiment"]
    base = ["eval", "--model", ft, "--evaluator", tc["dir"] / "eval.yaml", "--json"]
    code, _, err = run([*base, "--precision", "fp16"], capsys)
    assert code == 2 and "fp16" in err
    scores, dtypes = {}, set()

    def hook(module, args, out):
        if isinstance(module, torch.nn.Linear):
            dtypes.add(out.dtype)

    for p in ("fp32", "bf16"):
        dtypes.clear()
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            code, stdout, err = run([*base, "--precision", p], capsys)
        finally:
            handle.remove()
        assert code == 0, err
        assert dtypes == {torch.float32 if p == "fp32" else torch.bfloat16}
        scores[p] = json.loads(stdout)["scores"]["sentiment"]
    assert scores["bf16"] == pytest.approx(scores["fp32"], abs=0.1)
