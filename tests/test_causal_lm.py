"""Kind ``causal-lm``: every mode against hand-written loops on a tiny trained Llama."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from npstune.errors import ConfigError
from npstune.evaluate.base import evaluation_report
from npstune.evaluate.causal_lm import CausalLMEvaluator
from npstune.evaluate.hf import read_state
from npstune.evaluate.spec import load_evaluator_file, parse_evaluator
from npstune.evaluate.stats import CalibrationStats
from tests.tiny_llm import make_tiny_llama

Q = "q : what color is the {} ? a :"

QUIZ_TEST = [
    {
        "prompt": Q.format("sky"),
        "choices": ["blue", "green", "white", "red"],
        "answer": 0,
    },
    {"prompt": Q.format("grass"), "choices": ["blue", "green", "white"], "answer": 1},
    {
        "prompt": "q : what color is snow ? a :",
        "choices": ["white", "black"],
        "answer": 0,
    },
    {
        "prompt": "q : what sat on the mat ? a :",
        "choices": ["the dog", "the cat", "a bird flew"],
        "answer": 1,
    },
    {
        "prompt": "one plus two is",
        "choices": ["three", "four", "five", "two"],
        "answer": 0,
    },
    {"prompt": "the answer is", "choices": ["four", "blue sky"], "answer": 1},
    {"prompt": "", "choices": ["the cat", "one"], "answer": 0},
]
QUIZ_CAL = [
    {"prompt": "two plus two is", "choices": ["four", "five"], "answer": 0},
    {"prompt": "the dog sat on the", "choices": ["mat", "rug", "tree"], "answer": 1},
    {"prompt": Q.format("sky"), "choices": ["green", "blue"], "answer": 1},
]
GEN_PROMPTS = [
    Q.format("sky"),
    Q.format("grass"),
    "one plus one is",
    "the cat sat on",
    "q : what sat on the mat ? a :",
    "two plus",
]
TEXTS = [
    "the cat sat on the mat",
    "the sky is blue and the grass is green",
    "one plus two is three",
    "a bird sat on the cat",
    "blue",
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: one thread is much faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llm") / "a", seed=0)


@pytest.fixture(scope="module")
def llm_b(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llm") / "b", seed=1, steps=10)


@pytest.fixture(scope="module")
def hand(llm):
    """The reference model and tokenizer, loaded by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(llm)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "quiz-test.jsonl", QUIZ_TEST)
    write_jsonl(d / "quiz-cal.jsonl", QUIZ_CAL)
    # a CSV choice file: choices as a JSON list, answers as strings
    write_csv(
        d / "quiz.csv",
        [
            {
                "prompt": r["prompt"],
                "choices": json.dumps(r["choices"]),
                "answer": str(r["answer"]),
            }
            for r in QUIZ_TEST
        ],
    )
    write_jsonl(d / "text-test.jsonl", [{"text": t} for t in TEXTS])
    write_csv(d / "text-cal.csv", [{"text": t} for t in reversed(TEXTS)])
    write_jsonl(
        d / "gen-cal.jsonl", [{"prompt": p, "answer": "blue"} for p in GEN_PROMPTS[:3]]
    )
    return d


def make(
    root: Path, model: Path, spec_tasks: dict[str, Any], batch_size: int = 3, **kw: Any
) -> CausalLMEvaluator:
    opts = {k: kw.pop(k) for k in ("chat_template", "max_length") if k in kw}
    kw.setdefault("precision", "fp32")  # the hand loops are fp32, on any CPU
    spec = parse_evaluator(
        {"kind": "causal-lm", "tasks": spec_tasks, **opts}, root, "eval.yaml"
    )
    return spec.build(model=model, batch_size=batch_size, **kw)


QUIZ = {
    "mode": "choice",
    "data": {"calibration": "quiz-cal.jsonl", "test": "quiz-test.jsonl"},
}
TEXT = {
    "mode": "perplexity",
    "data": {"calibration": "text-cal.csv", "test": "text-test.jsonl"},
}


# ---- hand-written references ---------------------------------------------------------
def prompt_ids(tok, prompt: str, chat: bool = False) -> list[int]:
    if chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    return ids or [tok.bos_token_id]


def loglik(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, one plain forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = logits.log_softmax(-1)
    return float(sum(lp[t - 1, ids[t]] for t in range(start, len(ids))))


def hand_choice(hand, rows, norm: bool = False, chat: bool = False):
    model, tok = hand
    scores, picks = [], []
    for r in rows:
        p = prompt_ids(tok, r["prompt"], chat)
        ss = []
        for c in r["choices"]:
            cont = tok(c, add_special_tokens=False)["input_ids"]
            s = loglik(model, p + cont, len(p))
            ss.append(s / len(c) if norm else s)
        best = 0
        for j, s in enumerate(ss):
            if s > ss[best]:
                best = j
        scores.append(ss)
        picks.append(best)
    acc = sum(p == r["answer"] for p, r in zip(picks, rows)) / len(rows)
    return scores, picks, acc


def hand_generate(hand, prompts: list[str], n: int) -> list[str]:
    model, tok = hand
    out = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def hand_nll(hand, texts: list[str], limit: int | None = None) -> tuple[float, int]:
    model, tok = hand
    total, count = 0.0, 0
    for t in texts:
        ids = tok(t)["input_ids"][:limit]
        total -= loglik(model, ids, 1)
        count += len(ids) - 1
    return total, count


# ---- modes ---------------------------------------------------------------------------
@pytest.mark.parametrize("norm", [False, True])
def test_choice_matches_hand_loop(llm, hand, data, norm):
    task = {**QUIZ, "length_normalize": norm}
    ev = make(data, llm, {"quiz": task})
    state = read_state(llm)
    scores, picks, acc = hand_choice(hand, QUIZ_TEST, norm)
    got = ev.choice_scores(state, "quiz")
    assert [len(s) for s in got] == [len(r["choices"]) for r in QUIZ_TEST]
    for g, h in zip(got, scores):
        assert g == pytest.approx(h, abs=1e-4)
    assert ev.predictions(state, "quiz") == picks
    assert ev.evaluate(state, "quiz") == pytest.approx(acc)
    assert ev.metric("quiz") == "accuracy" and ev.examples("quiz", "test") == 7
    # the same data as CSV (JSON-list choices, string answers), one example per batch
    ev1 = make(
        data, llm, {"quiz": {**task, "data": {"test": "quiz.csv"}}}, batch_size=1
    )
    assert ev1.predictions(state, "quiz") == picks


def test_bf16_scores_choices_in_bf16_near_fp32(llm, data):
    dtypes: set[torch.dtype] = set()

    def hook(module, args, out):
        if isinstance(module, torch.nn.Linear):
            dtypes.add(out.dtype)

    state = read_state(llm)
    got = {}
    for precision in ("fp32", "bf16"):
        ev = make(data, llm, {"quiz": QUIZ}, precision=precision)
        dtypes.clear()
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            got[precision] = ev.choice_scores(state, "quiz")
        finally:
            handle.remove()
        assert dtypes == {torch.float32 if precision == "fp32" else torch.bfloat16}
    for a, b in zip(got["fp32"], got["bf16"]):
        assert b == pytest.approx(a, rel=0.05, abs=0.05)


def test_choice_tie_goes_to_lowest_index(llm, hand, data, tmp_path):
    rows = [
        {"prompt": Q.format("sky"), "choices": ["green", "green", "blue"], "answer": 1},
        {"prompt": "the answer is", "choices": ["four", "four"], "answer": 0},
    ]
    write_jsonl(tmp_path / "tie.jsonl", rows)
    ev = make(tmp_path, llm, {"tie": {"mode": "choice", "data": {"test": "tie.jsonl"}}})
    state = read_state(llm)
    s = ev.choice_scores(state, "tie")
    assert s[0][0] == s[0][1] and s[1][0] == s[1][1]
    picks = ev.predictions(state, "tie")
    assert picks[1] == 0
    assert picks[0] in (0, 2)  # never the later copy of the tie
    assert picks == hand_choice(hand, rows)[1]
    assert ev.evaluate(state, "tie") == pytest.approx(0.5)  # row 0's answer is the copy


def test_generate_matches_hand_loop(llm, hand, tmp_path):
    n = 4
    gens = hand_generate(hand, GEN_PROMPTS, n)
    assert any(g.strip() for g in gens)
    rows = [
        {"prompt": p, "answer": f"  {g} " if i % 2 == 0 else "zzz"}
        for i, (p, g) in enumerate(zip(GEN_PROMPTS, gens))
    ]
    write_csv(tmp_path / "gen.csv", rows)
    firsts = [g.split()[0] if g.split() else "zzz" for g in gens]
    write_jsonl(
        tmp_path / "gen-re.jsonl",
        [
            {"prompt": p, "answer": f if i < 3 else "zzz"}
            for i, (p, f) in enumerate(zip(GEN_PROMPTS, firsts))
        ],
    )
    base = {"mode": "generate", "max_new_tokens": n}
    ev = make(
        tmp_path,
        llm,
        {
            "gen": {**base, "data": {"test": "gen.csv"}},
            "gre": {**base, "data": {"test": "gen-re.jsonl"}, "answer_regex": r"(\S+)"},
            "none": {**base, "data": {"test": "gen.csv"}, "answer_regex": "qqq"},
        },
    )
    state = read_state(llm)
    assert ev.predictions(state, "gen") == gens  # batched, left-padded == one by one
    assert ev.evaluate(state, "gen") == pytest.approx(3 / 6)
    want = (
        sum(
            bool(re.search(r"\S+", g)) and f == re.search(r"\S+", g).group(0)
            for g, f in zip(gens[:3], firsts[:3])
        )
        / 6
    )
    assert ev.evaluate(state, "gre") == pytest.approx(want)
    assert ev.evaluate(state, "none") == 0.0
    assert ev.metric("gen") == "exact_match"
    assert ev.report_value("gen", 0.5) == 0.5


def test_perplexity_matches_hand_loop(llm, hand, data):
    ev = make(data, llm, {"text": TEXT})
    state = read_state(llm)
    total, count = hand_nll(hand, TEXTS)
    ppl = math.exp(total / count)
    score = ev.evaluate(state, "text")
    assert score == pytest.approx(-math.log(ppl), rel=1e-5)
    assert ev.report_value("text", score) == pytest.approx(ppl, rel=1e-5)
    assert ev.metric("text") == "perplexity"
    per = ev.predictions(state, "text")
    assert per[-1] == pytest.approx(hand_nll(hand, TEXTS[-1:])[0], rel=1e-5)
    # max_length cuts every text to its first tokens; calibration reads CSV
    ev4 = make(data, llm, {"text": TEXT}, max_length=4)
    t4, c4 = hand_nll(hand, TEXTS, limit=4)
    assert ev4.evaluate(state, "text") == pytest.approx(-t4 / c4, rel=1e-5)
    tc, cc = hand_nll(hand, TEXTS[::-1])
    cal = ev.evaluate(state, "text", "calibration")
    assert cal == pytest.approx(-tc / cc, rel=1e-5)


def test_chat_template_changes_the_prompt(llm, hand, data):
    _, tok = hand
    plain = make(data, llm, {"quiz": QUIZ})
    chat = make(data, llm, {"quiz": QUIZ}, chat_template=True)
    p = QUIZ_TEST[0]["prompt"]
    ids_plain, ids_chat = plain.encode_prompt(p), chat.encode_prompt(p)
    assert ids_plain == tok(p)["input_ids"] and ids_plain[0] == tok.bos_token_id
    assert (
        ids_chat
        == tok(f"<user> {p} <assistant>", add_special_tokens=False)["input_ids"]
    )
    assert tok.bos_token_id not in ids_chat
    state = read_state(llm)
    scores, picks, acc = hand_choice(hand, QUIZ_TEST, chat=True)
    got = chat.choice_scores(state, "quiz")
    for g, h in zip(got, scores):
        assert g == pytest.approx(h, abs=1e-4)
    assert chat.evaluate(state, "quiz") == pytest.approx(acc)
    assert got != plain.choice_scores(state, "quiz")


def test_loading_another_state_changes_the_score(llm, llm_b, data):
    ev = make(data, llm, {"text": TEXT, "quiz": QUIZ})
    a, b = read_state(llm), read_state(llm_b)
    assert "lm_head.weight" not in a  # tied: saved once, still loads
    sa = ev.evaluate_many(a, split="test")
    sb = ev.evaluate_many(b)
    assert sa["text"] != pytest.approx(sb["text"], rel=1e-3)
    assert ev.choice_scores(a, "quiz") != ev.choice_scores(b, "quiz")
    other = make(data, llm_b, {"text": TEXT, "quiz": QUIZ})
    assert other.evaluate(b, "text") == pytest.approx(sb["text"], rel=1e-6)
    assert ev.evaluate(a, "text") == pytest.approx(sa["text"], rel=1e-6)
    full = {**a, "lm_head.weight": a["model.embed_tokens.weight"]}
    assert ev.evaluate(full, "text") == pytest.approx(sa["text"], rel=1e-6)


def test_evaluation_report(llm, data):
    ev = make(
        data,
        llm,
        {
            "quiz": QUIZ,
            "text": TEXT,
            "gen": {
                "mode": "generate",
                "max_new_tokens": 3,
                "data": {"calibration": "gen-cal.jsonl"},
            },
        },
    )
    state = read_state(llm)
    rep = evaluation_report(ev, state, ["quiz", "text", "gen"], "calibration")
    assert rep["metrics"] == {
        "quiz": "accuracy",
        "text": "perplexity",
        "gen": "exact_match",
    }
    assert rep["examples"] == {"quiz": 3, "text": 5, "gen": 3}
    raw = ev.evaluate(state, "text", "calibration")
    assert rep["scores"]["text"] == pytest.approx(math.exp(-raw))
    assert rep["scores"]["text"] > 1
    assert 0 <= rep["scores"]["quiz"] <= 1 and 0 <= rep["scores"]["gen"] <= 1
    assert rep["mean"] == pytest.approx(sum(rep["scores"].values()) / 3)


# ---- calibration statistics ----------------------------------------------------------
KEYS = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.norm.weight",
    "model.embed_tokens.weight",
    "lm_head.weight",
]


def hand_fisher(model, seqs: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    names = {
        k: "model.embed_tokens.weight" if k == "lm_head.weight" else k for k in KEYS
    }
    acc = {k: torch.zeros_like(params[n]) for k, n in names.items()}
    for ids, start in seqs:
        model.zero_grad()
        x = torch.tensor([ids])
        lp = model(input_ids=x).logits[0, start - 1 : -1].log_softmax(-1)
        loss = -lp.gather(-1, x[0, start:, None]).mean()
        loss.backward()
        for k, n in names.items():
            acc[k] += params[n].grad ** 2
    model.zero_grad()
    return {k: v / len(seqs) for k, v in acc.items()}


def test_fisher_matches_hand_loop(llm, hand, data):
    model, tok = hand
    # auto: the statistics passes stay fp32 on a CPU, even one with native bf16
    ev = make(data, llm, {"quiz": QUIZ, "text": TEXT}, precision="auto")
    assert isinstance(ev, CalibrationStats)
    state = read_state(llm)
    quiz = []
    for r in QUIZ_CAL[:2]:
        p = tok(r["prompt"])["input_ids"]
        quiz.append(
            (
                p
                + tok(r["choices"][r["answer"]], add_special_tokens=False)["input_ids"],
                len(p),
            )
        )
    texts = [(tok(t)["input_ids"], 1) for t in TEXTS[::-1][:2]]
    for task, seqs in (("quiz", quiz), ("text", texts)):
        got = ev.fisher(state, task, KEYS, examples=2)
        want = hand_fisher(model, seqs)
        assert set(got) == set(KEYS)
        for k in KEYS:
            assert (
                got[k].shape
                == state[
                    "model.embed_tokens.weight" if k == "lm_head.weight" else k
                ].shape
            )
            assert got[k].dtype == torch.float32 and bool((got[k] >= 0).all())
            assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-10), (task, k)
        assert float(got["model.norm.weight"].sum()) > 0
    assert all(not p.requires_grad or p.grad is None for p in ev._model.parameters())


def test_fisher_generate_uses_the_answer(llm, hand, data):
    model, tok = hand
    ev = make(
        data,
        llm,
        {"gen": {"mode": "generate", "data": {"calibration": "gen-cal.jsonl"}}},
    )
    seqs = []
    for p in GEN_PROMPTS[:2]:
        ids = tok(p)["input_ids"]
        seqs.append(
            (ids + tok("blue", add_special_tokens=False)["input_ids"], len(ids))
        )
    got = ev.fisher(read_state(llm), "gen", KEYS, examples=2)
    want = hand_fisher(model, seqs)
    for k in KEYS:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-10), k


def test_grams_match_hand_computation(llm, hand, data):
    model, tok = hand
    # padded batches; auto: the statistics passes stay fp32 on a CPU
    ev = make(data, llm, {"quiz": QUIZ}, batch_size=2, precision="auto")
    keys = [
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
        "model.norm.weight",
    ]
    got = ev.grams(read_state(llm), "quiz", keys, examples=3)
    assert set(got) == {"model.layers.1.mlp.down_proj.weight", "lm_head.weight"}
    mods = dict(model.named_modules())
    for key, width in (
        ("model.layers.1.mlp.down_proj.weight", 64),
        ("lm_head.weight", 32),
    ):
        seen = []
        h = mods[key.rsplit(".", 1)[0]].register_forward_hook(
            lambda m, i, o, seen=seen: seen.append(i[0][0].double())
        )
        want = torch.zeros(width, width, dtype=torch.float64)
        with torch.no_grad():
            for r in QUIZ_CAL:
                p = tok(r["prompt"])["input_ids"]
                c = tok(r["choices"][r["answer"]], add_special_tokens=False)[
                    "input_ids"
                ]
                model(input_ids=torch.tensor([p + c]))
                want += seen[-1].T @ seen[-1]
        h.remove()
        assert got[key].dtype == torch.float64 and got[key].shape == (width, width)
        # padded batches and one-row forwards round differently in float32 (seen:
        # 4.8e-5 on entries up to 243): the absolute tolerance follows the scale
        scale = float(want.abs().max())
        assert torch.allclose(got[key], want, rtol=1e-5, atol=1e-6 * scale), key


# ---- errors --------------------------------------------------------------------------
BAD_RECORDS = {
    "missing-field": (
        [{"prompt": "a", "choices": ["x"]}],
        r"record 1 has no field "
        r"'answer'",
    ),
    "out-of-range": (
        [
            {"prompt": "a", "choices": ["one", "two"], "answer": 0},
            {"prompt": "a", "choices": ["one", "two"], "answer": 5},
        ],
        r"record 2: answer index 5 is out of range for 2 choices",
    ),
    "no-choices": (
        [{"prompt": "a", "choices": [], "answer": 0}],
        r"record 1: choices is empty",
    ),
    "empty": ([], r"empty split"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_records_are_one_line_errors(llm, tmp_path, case):
    rows, pattern = BAD_RECORDS[case]
    write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError, match=pattern) as err:
        make(
            tmp_path,
            llm,
            {"q": {"mode": "choice", "data": {"test": "bad.jsonl"}}},
            prepare=("test",),
        )
    msg = str(err.value)
    assert "bad.jsonl" in msg and "task 'q'" in msg and "\n" not in msg


def test_bad_requests_and_files(llm, data, tmp_path):
    state = read_state(llm)
    with pytest.raises(
        ConfigError, match=r"nope\.jsonl.*task 'q'.*data file not found"
    ):
        make(
            data,
            llm,
            {"q": {"mode": "choice", "data": {"test": "nope.jsonl"}}},
            prepare=("test",),
        )
    write_csv(tmp_path / "gen.csv", [{"prompt": "a", "reply": "b"}])
    ev = make(tmp_path, llm, {"g": {"mode": "generate", "data": {"test": "gen.csv"}}})
    with pytest.raises(ConfigError, match=r"gen\.csv.*record 1 has no field 'answer'"):
        ev.evaluate(state, "g")
    ev = make(data, llm, {"quiz": QUIZ})
    with pytest.raises(ConfigError, match=r"unknown split 'train'; valid: calibration"):
        ev.evaluate(state, "quiz", "train")
    with pytest.raises(ConfigError, match=r"unknown task 'nope'; valid: quiz"):
        ev.evaluate(state, "nope")
    with pytest.raises(ConfigError, match=r"unknown task 'nope'"):
        make(data, llm, {"quiz": QUIZ}, tasks=["nope"])
    only_test = {"mode": "choice", "data": {"test": "quiz-test.jsonl"}}
    with pytest.raises(ConfigError, match=r"task 'quiz' has no calibration data"):
        make(data, llm, {"quiz": only_test}).evaluate(state, "quiz", "calibration")


@pytest.mark.parametrize(
    "task, pattern",
    [
        (
            {**QUIZ, "mode": "generate", "length_normalize": True},
            r"tasks\.q: length_normalize applies to mode choice only",
        ),
        (
            {**QUIZ, "max_new_tokens": 4},
            r"tasks\.q: max_new_tokens applies to mode "
            r"generate only \(this task's mode is choice\)",
        ),
        (
            {**TEXT, "answer_regex": "x"},
            r"tasks\.q: answer_regex applies to mode generate",
        ),
        (
            {**QUIZ, "mode": "generate", "answer_regex": "("},
            r"answer_regex: not a valid",
        ),
        ({**QUIZ, "mode": "rank"}, r"tasks\.q\.mode"),
        ({**QUIZ, "shots": 5}, r"tasks\.q\.shots: unknown key"),
        (
            {"mode": "choice", "data": {"train": "x.jsonl"}},
            r"tasks\.q\.data\.train: "
            r"unknown key",
        ),
    ],
)
def test_bad_options(data, task, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        parse_evaluator({"kind": "causal-lm", "tasks": {"q": task}}, data, "eval.yaml")
    assert str(err.value).startswith("eval.yaml: ")


def test_not_a_causal_lm(tmp_path, data):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(bert)
    with pytest.raises(ConfigError) as err:
        make(data, bert, {"quiz": QUIZ})
    assert str(err.value) == (
        f"{bert}: not a causal language model (architectures: BertModel); kind "
        "causal-lm needs an AutoModelForCausalLM checkpoint"
    )
    with pytest.raises(ConfigError, match="not a model directory"):
        make(data, tmp_path / "absent", {"quiz": QUIZ})


def test_chat_template_needs_a_template(llm, data, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(llm, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError,
        match=r"chat_template: true, but the tokenizer of "
        r".*bare has no chat template",
    ):
        make(data, bare, {"quiz": QUIZ}, chat_template=True)
    make(data, bare, {"quiz": QUIZ})  # fine without the template


# ---- evaluator files -----------------------------------------------------------------
def test_build_through_the_evaluator_file(llm, tmp_path):
    d = tmp_path / "evals"
    (d / "data").mkdir(parents=True)
    write_jsonl(d / "data" / "quiz-cal.jsonl", QUIZ_CAL)
    write_jsonl(d / "data" / "quiz-test.jsonl", QUIZ_TEST)
    write_jsonl(d / "data" / "text-cal.jsonl", [{"text": t} for t in TEXTS])
    spec = {
        "kind": "causal-lm",
        "batch_size": 2,
        "chat_template": False,
        "max_length": 64,
        "tasks": {
            "quiz": {
                "mode": "choice",
                "length_normalize": True,
                "data": {
                    "calibration": "data/quiz-cal.jsonl",
                    "test": "data/quiz-test.jsonl",
                },
            },
            "text": {
                "mode": "perplexity",
                "data": {"calibration": "data/text-cal.jsonl"},
            },
        },
    }
    path = d / "eval.yaml"
    path.write_text(yaml.safe_dump(spec))
    ef = load_evaluator_file(path)
    assert ef.kind == "causal-lm" and ef.batch_size == 2
    ev = ef.build(model=llm, prepare=("calibration",), max_examples={"calibration": 2})
    assert isinstance(ev, CausalLMEvaluator) and ev.tasks == ["quiz", "text"]
    assert ev.ctx.batch_size == 2 and ev.max_length == 64
    assert set(ev._splits) == {("quiz", "calibration"), ("text", "calibration")}
    state = read_state(llm)
    for f in ("quiz-cal.jsonl", "text-cal.jsonl"):
        (d / "data" / f).unlink()  # prepared at build: the files are no longer read
    scores = ev.evaluate_many(state, split="calibration")
    assert set(scores) == {"quiz", "text"} and scores["text"] < 0
    assert ev.examples("quiz", "calibration") == 2
    assert ev.examples("quiz", "test") == 7  # the limit is per split
    # only the named tasks are prepared
    write_jsonl(d / "data" / "quiz-cal.jsonl", QUIZ_CAL)
    ev2 = ef.build(model=llm, prepare=("calibration",), tasks=["quiz"])
    assert set(ev2._splits) == {("quiz", "calibration")}
