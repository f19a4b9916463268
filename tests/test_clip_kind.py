"""The ``clip`` evaluator kind on a tiny random HF CLIP and real images.

The images are real files shipped with matplotlib (``mpl-data``): the Grace Hopper
photo (``sample_data/grace_hopper.jpg``) and crops/flips of it make class "photo";
toolbar icons (``images/*_large.png``) make class "icon"; the matplotlib logo
(``sample_data/logo2.png``), ``sample_data/Minduka_Present_Blue_Pack.png`` and crops/
flips of them make class "logo". Nothing is downloaded.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from npstune.errors import (
    CheckpointError,
    ConfigError,
    MissingDependencyError,
    ShapeMismatchError,
)
from npstune.evaluate.base import evaluation_report
from npstune.evaluate.clip import OPENAI_MEAN, OPENAI_STD
from npstune.evaluate.spec import load_evaluator_file, parse_evaluator

Image = pytest.importorskip("PIL.Image")
transformers = pytest.importorskip("transformers")

SIZE = 32
CLASSES = ["icon", "logo", "photo"]  # sorted folder names
WORDS = [
    "photo",
    "of",
    "picture",
    "an",
    "image",
    "the",
    "icon",
    "logo",
    "toolbar",
    "snapshot",
    "drawing",
]


# ---- fixtures: real images, a tiny CLIP ---------------------------------------------
def _mpl_data() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("matplotlib (whose mpl-data images the test uses) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "mpl-data"


def _real_images() -> dict[str, list[tuple[str, Image.Image]]]:
    """Class -> (file name, image) built from matplotlib's shipped images."""
    mpl = _mpl_data()
    hopper = Image.open(mpl / "sample_data" / "grace_hopper.jpg").convert("RGB")
    flip = Image.Transpose.FLIP_LEFT_RIGHT
    photos = [
        hopper,
        hopper.transpose(flip),
        hopper.crop((0, 0, 300, 300)),
        hopper.crop((128, 100, 384, 500)),
        hopper.transpose(Image.Transpose.ROTATE_90),
        hopper.resize((128, 150)),
    ]
    icons = [Image.open(p) for p in sorted((mpl / "images").glob("*_large.png"))][:8]
    logo = Image.open(mpl / "sample_data" / "logo2.png")
    pack = Image.open(mpl / "sample_data" / "Minduka_Present_Blue_Pack.png")
    logos = [
        logo,
        pack,
        logo.crop((0, 0, 271, 130)),
        logo.transpose(flip),
        pack.transpose(flip),
        pack.crop((20, 20, 108, 100)),
    ]
    assert len(icons) == 8
    return {
        "photo": [(f"p{i}.jpg", im) for i, im in enumerate(photos)],
        "icon": [(f"i{i}.png", im) for i, im in enumerate(icons)],
        "logo": [(f"l{i}.png", im) for i, im in enumerate(logos)],
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """root/{cal,test}/{icon,logo,photo}/..., plus test.csv and cal.jsonl lists."""
    root = tmp_path_factory.mktemp("clipdata")
    rows: dict[str, list[dict[str, str]]] = {"cal": [], "test": []}
    for cls, items in _real_images().items():
        half = len(items) // 2
        for split, part in (("test", items[:half]), ("cal", items[half:])):
            d = root / split / cls
            d.mkdir(parents=True)
            for name, im in part:
                im.save(d / name)
                rows[split].append({"path": f"{split}/{cls}/{name}", "label": cls})
    (root / "test" / "photo" / "notes.txt").write_text("not an image")  # ignored
    with open(root / "test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows(rows["test"])
    (root / "cal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows["cal"]))
    return root


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte -> unicode table (the first 256 CLIP vocabulary entries)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_tokenizer():
    """A CLIP BPE tokenizer with byte tokens plus whole-word merges for ``WORDS``."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        cur = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIPModel + tokenizer saved as an HF directory."""
    from transformers import CLIPConfig, CLIPModel

    tok = _tiny_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            image_size=SIZE,
            patch_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # spread the random features so predictions differ by image
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    d = tmp_path_factory.mktemp("tinyclip")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    return (
        CLIPModel.from_pretrained(clip_dir).to(torch.float32).eval(),
        AutoTokenizer.from_pretrained(clip_dir),
    )


@pytest.fixture(scope="module")
def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model[0].state_dict().items()}


def make(root: Path, cfg: dict, clip_dir: Path, **kw):
    """Build an evaluator from an evaluator mapping whose paths are relative to root."""
    kw.setdefault("precision", "fp32")  # the hand references are fp32, on any CPU
    return parse_evaluator({"kind": "clip", **cfg}, root, "eval.yaml").build(
        model=clip_dir, **kw
    )


# ---- hand-written reference --------------------------------------------------------
def _feat(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hand_pixels(path: Path, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """Shorter side to SIZE (bicubic), center crop, [0, 1], normalise: [3, S, S]."""
    im = Image.open(path)
    im = (im.convert("RGBA") if im.mode == "P" else im).convert("RGB")
    w, h = im.size
    nw, nh = (SIZE, int(SIZE * h / w)) if w <= h else (int(SIZE * w / h), SIZE)
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - SIZE) // 2, (nh - SIZE) // 2
    im = im.crop((left, top, left + SIZE, top + SIZE))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)  # [S, S, 3]
    m = torch.tensor(mean, dtype=torch.float32)
    s = torch.tensor(std, dtype=torch.float32)
    return ((x - m) / s).permute(2, 0, 1)


@torch.no_grad()
def hand_head(model, tok, names, templates) -> torch.Tensor:
    """One prompt at a time (no padding): normalise, mean, renormalise."""
    cols = []
    for c in names:
        embs = []
        for t in templates:
            ids = tok(
                [t.format(c)], truncation=True, max_length=16, return_tensors="pt"
            )
            f = _feat(model.get_text_features(input_ids=ids["input_ids"]))[0]
            embs.append(f / f.norm())
        m = torch.stack(embs).mean(0)
        cols.append(m / m.norm())
    return torch.stack(cols, dim=1)


@torch.no_grad()
def hand_predict(model, files, head) -> torch.Tensor:
    preds = []
    for f in files:
        feat = _feat(model.get_image_features(pixel_values=hand_pixels(f)[None]))[0]
        preds.append(int((100 * feat / feat.norm() @ head).argmax()))
    return torch.tensor(preds)


def _labels_of(files) -> torch.Tensor:
    return torch.tensor([CLASSES.index(Path(f).parent.name) for f in files])


# ---- tests -------------------------------------------------------------------------
def test_accuracy_matches_hand_loop_through_the_evaluator_file(
    data, clip_dir, model, state
):
    templates = ["a photo of a {}.", "an image of the {}."]
    spec = {
        "kind": "clip",
        "templates": templates,
        "tasks": {"mpl": {"data": {"calibration": "cal", "test": "test"}}},
    }
    path = data / "eval.yaml"
    path.write_text(yaml.safe_dump(spec))
    ev = load_evaluator_file(path).build(
        model=clip_dir, prepare=("test",), batch_size=4, precision="fp32"
    )
    splits = ev.tasks_["mpl"].splits
    assert splits.loaded == ("test",)  # prepared at build; calibration not yet
    m, tok = model
    head = hand_head(m, tok, CLASSES, templates)
    torch.testing.assert_close(ev.zero_shot_head("mpl"), head, atol=1e-5, rtol=1e-5)
    for split, folder in (("test", "test"), ("calibration", "cal")):
        files = splits.sources[split].files
        assert sorted(files) == sorted(
            p for p in (data / folder).rglob("*") if p.suffix in (".jpg", ".png")
        )
        pred, labels = hand_predict(m, files, head), _labels_of(files)
        assert torch.equal(ev.predictions(state, "mpl", split), pred)
        assert len(set(pred.tolist())) == 3  # the tiny model is not constant
        acc = int((pred == labels).sum()) / len(labels)
        assert ev.evaluate(state, "mpl", split) == pytest.approx(acc, abs=1e-12)
    report = evaluation_report(ev, state, ["mpl"], "test")
    n_test = len(splits.sources["test"].files)
    assert report["metrics"] == {"mpl": "accuracy"}
    assert report["examples"] == {"mpl": n_test} and n_test == 10
    assert report["mean"] == pytest.approx(ev.evaluate(state, "mpl"))


def test_preprocessing_matches_hf_image_processor(data, clip_dir):
    try:
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil as Proc,
        )
    except ImportError:
        from transformers import CLIPImageProcessor as Proc
    proc = Proc(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    ev = make(data, {"tasks": {"t": {"data": {"test": "test"}}}}, clip_dir)
    images, _ = ev.tasks_["t"].splits["test"]
    files = ev.tasks_["t"].splits.sources["test"].files
    assert images.dtype == torch.uint8 and images.shape == (10, 3, SIZE, SIZE)
    mine = ev._pixels(images)
    ref = torch.stack(
        [
            torch.as_tensor(
                proc(images=[Image.open(f).convert("RGB")], return_tensors="pt")[
                    "pixel_values"
                ][0]
            )
            for f in files
        ]
    ).float()
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)  # same pixels as HF's
    torch.testing.assert_close(mine, torch.stack([hand_pixels(f) for f in files]))


def test_defaults_and_classname_mapping(data, clip_dir, model, tmp_path):
    ev = make(data, {"tasks": {"t": {"data": {"test": "test"}}}}, clip_dir)
    task = ev.tasks_["t"]
    assert list(task.templates) == ["a photo of a {}."]
    assert list(task.classnames) == CLASSES
    assert ev.pixel_norm == (OPENAI_MEAN, OPENAI_STD)
    assert ev.tasks == ["t"] and ev.metric("t") == "accuracy"
    labels = task.splits["test"][1]
    assert labels[:3].tolist() == [0, 1, 2]  # folder order is round-robin over classes
    names = {"icon": "toolbar icon", "logo": "drawing", "photo": "snapshot"}
    tpl = ["a picture of the {}."]
    ev2 = make(
        data,
        {
            "tasks": {
                "t": {"data": {"test": "test"}, "classnames": names, "templates": tpl}
            }
        },
        clip_dir,
    )
    assert list(ev2.tasks_["t"].classnames) == ["toolbar icon", "drawing", "snapshot"]
    torch.testing.assert_close(
        ev2.zero_shot_head("t"),
        hand_head(*model, list(names.values()), tpl),
        atol=1e-5,
        rtol=1e-5,
    )
    as_list = make(
        data,
        {
            "tasks": {
                "t": {
                    "data": {"test": "test"},
                    "templates": tpl,
                    "classnames": list(names.values()),
                }
            }
        },
        clip_dir,
    )
    torch.testing.assert_close(as_list.zero_shot_head("t"), ev2.zero_shot_head("t"))
    # preprocessor_config.json's mean/std win over OpenAI's
    d = tmp_path / "clip"
    shutil.copytree(clip_dir, d)
    (d / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]})
    )
    ev3 = make(data, {"tasks": {"t": {"data": {"test": "test"}}}}, d)
    assert ev3.pixel_norm == ((0.5,) * 3, (0.25,) * 3)
    f = ev3.tasks_["t"].splits.sources["test"].files[0]
    torch.testing.assert_close(
        ev3._pixels(ev3.tasks_["t"].splits["test"][0][:1])[0],
        hand_pixels(f, (0.5,) * 3, (0.25,) * 3),
    )


def test_file_lists_equal_folders(data, clip_dir, state):
    folders = make(
        data,
        {"tasks": {"t": {"data": {"calibration": "cal", "test": "test"}}}},
        clip_dir,
    )
    lists = make(
        data,
        {"tasks": {"t": {"data": {"calibration": "cal.jsonl", "test": "test.csv"}}}},
        clip_dir,
    )
    assert list(lists.tasks_["t"].classnames) == CLASSES
    torch.testing.assert_close(lists.zero_shot_head("t"), folders.zero_shot_head("t"))
    for split in ("calibration", "test"):
        a, b = folders.tasks_["t"].splits, lists.tasks_["t"].splits
        by_file = dict(
            zip(
                a.sources[split].files,
                folders.predictions(state, "t", split).tolist(),
                strict=True,
            )
        )
        assert lists.predictions(state, "t", split).tolist() == [
            by_file[f] for f in b.sources[split].files
        ]
        assert sorted(a.sources[split].files) == sorted(b.sources[split].files)
        assert lists.evaluate(state, "t", split) == folders.evaluate(state, "t", split)
        assert lists.examples("t", split) == folders.examples("t", split) == 10


def test_loading_a_vision_state_changes_features(data, clip_dir, model, state):
    ev = make(data, {"tasks": {"t": {"data": {"test": "test"}}}}, clip_dir)
    head = ev.zero_shot_head("t").clone()
    x = ev._pixels(ev.tasks_["t"].splits["test"][0])
    vision = {
        k: v
        for k, v in state.items()
        if k.startswith(("vision_model.", "visual_projection."))
    }
    assert "visual_projection.weight" in vision and len(vision) < len(state)
    ev.load_state(vision)
    with torch.no_grad():
        before = ev.encode_images(x).clone()
    torch.manual_seed(1)
    other = {k: v + 0.5 * torch.randn_like(v) for k, v in vision.items()}
    text_before = ev.model.text_model.embeddings.token_embedding.weight.clone()
    ev.load_state(other)
    with torch.no_grad():
        after = ev.encode_images(x)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(
        ev.model.visual_projection.weight, other["visual_projection.weight"]
    )
    assert torch.equal(
        ev.model.text_model.embeddings.token_embedding.weight, text_before
    )  # the text tower stays the pretrained model's
    acc_other = ev.evaluate(other, "t")
    assert torch.equal(ev.zero_shot_head("t"), head)  # heads are fixed at build
    full_acc = ev.evaluate(state, "t")  # a full state works too
    assert ev.evaluate(vision, "t") == full_acc
    assert 0.0 <= acc_other <= 1.0
    # checked loading: unknown keys, shape mismatches, missing tower keys
    with pytest.raises(CheckpointError, match=r"key 'visual\.proj' is not in the CLIP"):
        ev.load_state({**vision, "visual.proj": torch.zeros(3)})
    with pytest.raises(ShapeMismatchError, match=r"visual_projection\.weight: shape"):
        ev.load_state({**vision, "visual_projection.weight": torch.zeros(3, 3)})
    with pytest.raises(ShapeMismatchError, match=r"text_projection\.weight: shape"):
        ev.load_state({**vision, "text_projection.weight": torch.zeros(3, 3)})
    short = {k: v for k, v in vision.items() if k != "visual_projection.weight"}
    with pytest.raises(
        CheckpointError, match=r"'visual_projection\.weight' is missing"
    ):
        ev.load_state(short)


def test_limits_and_evaluate_many(data, clip_dir, state):
    ev = make(
        data,
        {
            "tasks": {
                "a": {"data": {"test": "test"}},
                "b": {
                    "data": {"test": "test.csv"},
                    "templates": ["an icon of the {}."],
                },
            }
        },
        clip_dir,
        max_examples={"test": 4},
        tasks=["b", "a"],
        prepare=("test",),
    )
    assert ev.tasks == ["b", "a"]
    assert ev.examples("a", "test") == 4
    assert ev.tasks_["a"].splits["test"][0].shape[0] == 4
    both = ev.evaluate_many(state, ["a", "b"])
    assert both == {"a": ev.evaluate(state, "a"), "b": ev.evaluate(state, "b")}
    assert all(v * 4 == round(v * 4) for v in both.values())


def test_pickles_and_other_image_size(data, clip_dir, state):
    import pickle

    ev = make(
        data, {"tasks": {"t": {"data": {"test": "test"}}}}, clip_dir, prepare=("test",)
    )
    copy = pickle.loads(pickle.dumps(ev))
    assert copy.tasks_["t"].splits.loaded == ("test",)
    assert torch.equal(copy.predictions(state, "t"), ev.predictions(state, "t"))
    big = make(
        data, {"image_size": 48, "tasks": {"t": {"data": {"test": "test"}}}}, clip_dir
    )
    assert big.tasks_["t"].splits["test"][0].shape[-2:] == (48, 48)
    assert 0.0 <= big.evaluate(state, "t") <= 1.0


def _bad(root: Path) -> dict[str, tuple[dict, str]]:
    """name -> (task options, message pattern)."""
    return {
        "empty_folder": (
            {"data": {"test": "empty"}},
            r"data\.test: image folder \S*empty has no images",
        ),
        "empty_class": (
            {"data": {"test": "oneempty"}},
            r"class subfolder \S*oneempty/icon has no images",
        ),
        "missing_image": (
            {"data": {"test": "missing.csv"}},
            r"missing\.csv:2: image file \S*nope\.jpg does not exist",
        ),
        "bad_label": (
            {"data": {"test": "badlabel.csv"}, "classnames": ["photo", "icon"]},
            r"badlabel\.csv:3: label 'dog' is not among the class names",
        ),
        "wrong_length": (
            {"data": {"test": "test"}, "classnames": ["a", "b"]},
            r"classnames: 2 names for 3 class folders",
        ),
        "bad_mapping": (
            {
                "data": {"test": "test"},
                "classnames": {"icon": "i", "logo": "l", "photos": "p"},
            },
            r"classnames: class folder 'photo' has no name",
        ),
        "empty_split": (
            {"data": {"test": "header.csv"}},
            r"header\.csv lists no images \(empty split\)",
        ),
        "missing_path": (
            {"data": {"test": "nowhere"}},
            r"data\.test: data path \S*nowhere does not exist",
        ),
        "mixed_forms": (
            {"data": {"calibration": "cal", "test": "test.csv"}},
            r"calibration is a folder but test is a file list",
        ),
        "bad_list": (
            {"data": {"test": "list.txt"}},
            r"neither an image folder nor a \.csv/\.jsonl file list",
        ),
    }


@pytest.fixture(scope="module")
def bad_root(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty" / "photo").mkdir(parents=True)
    (root / "oneempty" / "icon").mkdir(parents=True)
    shutil.copytree(data / "test" / "photo", root / "oneempty" / "photo")
    shutil.copytree(data / "test", root / "test")
    (root / "missing.csv").write_text("path,label\nnope.jpg,photo\n")
    (root / "badlabel.csv").write_text(
        "path,label\ntest/photo/p0.jpg,photo\ntest/icon/i0.png,dog\n"
    )
    (root / "header.csv").write_text("path,label\n")
    (root / "list.txt").write_text("test/photo/p0.jpg photo\n")
    shutil.copytree(data / "cal", root / "cal")
    shutil.copy(data / "test.csv", root / "test.csv")
    (root / "broken.jpg").write_text("this is not a JPEG")
    (root / "broken.csv").write_text("path,label\nbroken.jpg,photo\n")
    return root


@pytest.mark.parametrize("case", sorted(_bad(Path("."))))
def test_bad_input_is_one_clear_line(case, bad_root, clip_dir):
    task, pattern = _bad(bad_root)[case]
    with pytest.raises(ConfigError, match=pattern) as err:
        make(bad_root, {"tasks": {"pets": task}}, clip_dir)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("eval.yaml: tasks.pets")


def test_bad_input_found_later_or_by_the_file_check(bad_root, clip_dir, state):
    with pytest.raises(
        ConfigError, match=r"data\.test: cannot read image \S*broken\.jpg"
    ):
        make(
            bad_root,
            {"tasks": {"pets": {"data": {"test": "broken.csv"}}}},
            clip_dir,
            prepare=("test",),
        )
    ev = make(bad_root, {"tasks": {"pets": {"data": {"test": "test"}}}}, clip_dir)
    with pytest.raises(ConfigError, match=r"unknown task 'nope'; valid: pets"):
        ev.evaluate(state, "nope")
    with pytest.raises(ConfigError, match=r"task 'pets' has no 'calibration' split"):
        ev.evaluate(state, "pets", "calibration")
    with pytest.raises(ConfigError, match=r"eval\.yaml: unknown task 'cats'"):
        make(
            bad_root,
            {"tasks": {"pets": {"data": {"test": "test"}}}},
            clip_dir,
            tasks=["cats"],
        )
    cases = {
        "tasks.pets.data.valid: unknown key": {"pets": {"data": {"valid": "test"}}},
        "tasks.pets.data: give a calibration or a test split": {"pets": {"data": {}}},
        "template 'a photo' needs one {} for the class name": {
            "pets": {"data": {"test": "test"}, "templates": ["a photo"]}
        },
    }
    for pattern, tasks in cases.items():
        with pytest.raises(ConfigError) as err:
            make(bad_root, {"tasks": tasks}, clip_dir)
        assert pattern in str(err.value) and "\n" not in str(err.value)


def test_backends(data, clip_dir, tmp_path, monkeypatch):
    task = {"tasks": {"t": {"data": {"test": "test"}}}}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(
        ConfigError, match=r"cannot tell the CLIP backend.*open_clip_model"
    ):
        make(data, task, tmp_path)
    with pytest.raises(
        ConfigError, match=r"backend hf needs a Hugging Face CLIP .*'bert'"
    ):
        make(data, {"backend": "hf", **task}, tmp_path)
    ev = make(data, {"backend": "hf", **task}, clip_dir)
    assert type(ev).__name__ == "HFClipEvaluator"

    import builtins

    real = builtins.__import__

    def no_open_clip(name, *a, **k):
        if name == "open_clip":
            raise ImportError("No module named 'open_clip'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_open_clip)
    with pytest.raises(MissingDependencyError, match=r"pip install 'npstune\[clip\]'"):
        make(
            data,
            {"backend": "open_clip", "open_clip_model": "ViT-B-32", **task},
            tmp_path,
        )


def test_zero_shot_head_function_is_shared():
    from npstune.evaluate.clip import zero_shot_head, zero_shot_logits

    torch.manual_seed(0)
    table = torch.randn(5, 4)
    prompts_seen: list[list[str]] = []

    def encode(prompts: list[str]) -> torch.Tensor:
        prompts_seen.append(prompts)
        return torch.stack([table[len(p) % 5] * (1 + len(p)) for p in prompts])

    w = zero_shot_head(encode, ["ab", "c"], ["{}", "x {} y"], batch_size=3)
    assert [len(b) for b in prompts_seen] == [3, 1]  # batched
    ref = []
    for c in ["ab", "c"]:
        e = nn.functional.normalize(encode([c, f"x {c} y"]), dim=-1).mean(0)
        ref.append(nn.functional.normalize(e, dim=-1))
    torch.testing.assert_close(w, torch.stack(ref, 1))
    f = torch.randn(3, 4)
    torch.testing.assert_close(
        zero_shot_logits(f, w), 100 * nn.functional.normalize(f, dim=-1) @ w
    )


def test_bf16_runs_the_image_tower_in_bf16_and_the_logits_in_fp32(data, clip_dir):
    from npstune.evaluate.hf import read_state

    dtypes: set[torch.dtype] = set()

    def hook(module, args, out):
        if isinstance(module, nn.Linear) and isinstance(out, torch.Tensor):
            dtypes.add(out.dtype)

    state = read_state(clip_dir)
    acc = {}
    for precision in ("fp32", "bf16"):
        ev = make(
            data,
            {"tasks": {"t": {"data": {"test": "test"}}}},
            clip_dir,
            precision=precision,
        )
        assert ev.precision == precision
        ev.zero_shot_head("t")  # heads come first, from the fp32 text tower
        dtypes.clear()
        handle = nn.modules.module.register_module_forward_hook(hook)
        try:
            acc[precision] = ev.evaluate(state, "t", "test")
        finally:
            handle.remove()
        assert dtypes == {torch.float32 if precision == "fp32" else torch.bfloat16}
    assert acc["bf16"] == pytest.approx(acc["fp32"], abs=0.2)  # 2 of 10 images
