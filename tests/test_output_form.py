"""The output's form follows the ``--out`` name, whatever the base's form.

``.safetensors`` -> one safetensors file; ``.bin``/``.pt``/``.pth`` -> a torch state
dict; a directory (existing, ``DIR/`` or no suffix) -> an HF directory for an HF base,
the base's shard layout for a sharded base, else a directory holding
``model.safetensors``. One writer rule, so merge, decompress and write_state_dict agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from npstune.checkpoints import (
    CheckpointWriter,
    open_checkpoint,
    output_form,
    write_state_dict,
)
from npstune.cli import cli
from npstune.merge import merge
from tests.tiny import finetune, make_set

BASES = ["safetensors", "sharded", "torch", "hf"]
OUTS = ["o.safetensors", "o.bin", "o.pt", "o.pth", "odir", "slash/", "existing.d"]


@pytest.fixture(scope="module")
def hf_set(tmp_path_factory):
    """A tiny Llama HF directory (with an extra tokenizer file) and two fine-tunes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=20,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp / "base")
    (tmp / "base" / "tokenizer.json").write_text("{}")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mps = [
        write_state_dict(tmp / f"ft{t}.safetensors", finetune(base, t))
        for t in range(2)
    ]
    return tmp / "base", mps


def inputs(form: str, tmp: Path, hf_set) -> tuple[Path, list[Path]]:
    """A base of ``form`` and two fine-tuned models (in ``tmp/in``)."""
    if form == "hf":
        return hf_set
    (tmp / "in").mkdir()
    bp, mps, _, _ = make_set(tmp / "in", form=form, tasks=2)
    return bp, mps


def out_path(tmp: Path, name: str) -> str:
    """``tmp/name`` as the user would type it (``existing.d`` is made first)."""
    if name == "existing.d":
        (tmp / name).mkdir()
    return str(tmp / name.rstrip("/")) + ("/" if name.endswith("/") else "")


def check_output(
    out: str, base_form: str, bp: Path, want: dict[str, torch.Tensor]
) -> None:
    """``out`` has the form its name names and holds ``want`` (read by peer tools)."""
    p = Path(out)
    if p.name.endswith(".safetensors"):
        assert p.is_file()
        got = load_file(p)
        assert open_checkpoint(p).form == "safetensors"
    elif p.suffix in (".bin", ".pt", ".pth"):
        assert p.is_file()
        got = torch.load(p, weights_only=True)
        assert open_checkpoint(p).form == "torch"
    else:
        assert p.is_dir()
        files = sorted(f.name for f in p.iterdir())
        if base_form == "hf":
            from transformers import LlamaForCausalLM

            assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(files)
            assert open_checkpoint(p).form == "hf"
            got = LlamaForCausalLM.from_pretrained(p).state_dict()
        elif base_form == "sharded":
            index = json.loads((p / "model.safetensors.index.json").read_text())
            base_index = json.loads((bp / "model.safetensors.index.json").read_text())
            assert index["weight_map"] == base_index["weight_map"]
            got = {}
            for shard in sorted(set(index["weight_map"].values())):
                got.update(load_file(p / shard))
        else:
            assert files == ["model.safetensors"]
            got = load_file(p / "model.safetensors")
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    if base_form != "hf":
        assert set(got) == set(want)


@pytest.mark.parametrize("out_name", OUTS)
@pytest.mark.parametrize("base_form", BASES)
def test_cli_output_form_follows_the_out_name(tmp_path, hf_set, base_form, out_name):
    bp, mps = inputs(base_form, tmp_path, hf_set)
    out = out_path(tmp_path, out_name)
    args = [
        "merge",
        "--method",
        "task-arithmetic",
        "--lam",
        "0.5",
        "--base",
        str(bp),
        "--models",
        *map(str, mps),
        "--out",
        out,
        "--quiet",
    ]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    want = merge(bp, mps, "task-arithmetic", {"lam": 0.5}).state
    check_output(out, base_form, bp, want)
    assert not list(Path(out).parent.glob(".*npstune-tmp*"))


@pytest.mark.parametrize("out_name", OUTS)
@pytest.mark.parametrize("base_form", BASES)
def test_library_output_form_follows_the_out_name(
    tmp_path, hf_set, base_form, out_name
):
    bp, mps = inputs(base_form, tmp_path, hf_set)
    out = out_path(tmp_path, out_name)
    res = merge(bp, mps, "ties", {"k": 0.5}, out)
    assert res.path == Path(out)
    check_output(out, base_form, bp, merge(bp, mps, "ties", {"k": 0.5}).state)


def test_output_form_rule(tmp_path):
    bp, _, _, _ = make_set(tmp_path, "safetensors", tasks=1)
    (tmp_path / "t").mkdir()
    tp, _, _, _ = make_set(tmp_path / "t", "torch", tasks=1)
    st, pt = open_checkpoint(bp), open_checkpoint(tp)
    (tmp_path / "d.safetensors").mkdir()
    (tmp_path / "plain").write_bytes(b"")
    table = {  # name -> (form for a safetensors base, form for a torch base)
        "x.safetensors": ("safetensors", "safetensors"),
        "x.SafeTensors": ("safetensors", "safetensors"),
        "x.bin": ("torch", "torch"),
        "x.pth": ("torch", "torch"),
        "newdir": ("sharded", "sharded"),
        "newdir/": ("sharded", "sharded"),
        "d.safetensors": ("sharded", "sharded"),  # an existing directory stays one
        "x.weights": ("safetensors", "torch"),  # unknown suffix: the base's form
        "plain": ("safetensors", "torch"),  # existing file, no suffix: the base's form
    }
    for name, forms in table.items():
        out = str(tmp_path / name) + ("/" if name.endswith("/") else "")
        assert (output_form(out, st), output_form(out, pt)) == forms, name


def test_writer_users_follow_the_name_too(tmp_path):
    """write_state_dict(like=...) and decompress go through the same writer rule."""
    from npstune.compress import compress, decompress

    bp, mps, base, fts = make_set(tmp_path, "safetensors", tasks=1)
    ck = open_checkpoint(bp)
    p = write_state_dict(tmp_path / "w.pt", fts[0], like=ck)
    back = torch.load(p, weights_only=True)
    assert all(torch.equal(back[k], fts[0][k]) for k in fts[0])
    compress(bp, mps, tmp_path / "store", "nps", {"k": 0.2})
    want = merge(bp, mps, "nps", {"k": 0.2}).state
    got = decompress(tmp_path / "store", "task0", tmp_path / "dec.bin")
    back = torch.load(got, weights_only=True)
    assert all(torch.equal(back[k], want[k]) for k in want)
    got = decompress(tmp_path / "store", "task0", tmp_path / "decdir")
    back = load_file(Path(got) / "model.safetensors")
    assert all(torch.equal(back[k], want[k]) for k in want)
    specs = {k: (ck.shape(k), ck.dtype(k)) for k in ck.keys()}
    with CheckpointWriter(tmp_path / "cw.pt", ck, specs) as w:
        assert w.form == "torch"
        for k in specs:
            w.write(k, ck[k])
    assert torch.load(tmp_path / "cw.pt", weights_only=True).keys() == set(specs)
