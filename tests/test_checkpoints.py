"""Checkpoint forms round-trip; bad input fails with one line naming file/key;
nothing written."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from npstune.checkpoints import open_checkpoint, write_state_dict
from npstune.cli import main
from npstune.errors import CheckpointError, ConfigError, ShapeMismatchError
from npstune.merge import merge
from npstune.taskvector import TaskVector, plan_merge
from tests.tiny import make_set, tiny_state


def run_cli(args, capsys):
    """Run ``npstune ARGS`` in-process; return (exit code, stdout, stderr)."""
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------ forms
@pytest.mark.parametrize("form", ["safetensors", "sharded", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_form_reads_back_the_same_tensors(tmp_path, form, dtype):
    bp, mps, base, fts = make_set(tmp_path, form=form, dtype=dtype, tasks=1)
    ck = open_checkpoint(bp)
    assert ck.form == form
    assert list(ck.keys()) == sorted(base)
    for k, v in base.items():
        assert ck.shape(k) == tuple(v.shape) and ck.dtype(k) == v.dtype
        assert torch.equal(ck[k], v)
        if v.numel() > 3:
            assert torch.equal(ck.read(k, 1, 3), v.reshape(-1)[1:3])


def test_sharded_merge_output_keeps_the_shard_layout(tmp_path):
    bp, mps, base, fts = make_set(tmp_path, form="sharded", tasks=2)
    out = tmp_path / "merged"
    res = merge(bp, mps, "task-arithmetic", {"lam": 1.0}, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((bp / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1
    mem = merge(bp, mps, "task-arithmetic", {"lam": 1.0}).state
    back = open_checkpoint(out)
    assert res.path == out
    assert all(torch.equal(back[k], mem[k]) for k in mem)
    # peer tool: safetensors reads every shard we wrote
    for shard in set(index["weight_map"].values()):
        for k, v in load_file(out / shard).items():
            assert torch.equal(v, mem[k])


def test_at_most_one_shard_open_per_checkpoint(tmp_path):
    bp, mps, _, _ = make_set(tmp_path, form="sharded", tasks=2)
    plan = plan_merge(bp, mps)
    seen = []
    for key in plan.keys:
        plan.read_chunk(key) if key in plan.delta_keys else plan.base[key]
        seen.append(max(c.open_files() for c in [plan.base, *plan.models]))
    assert max(seen) == 1


def test_streaming_writer_output_loads_in_safetensors(tmp_path):
    state = tiny_state(3, torch.bfloat16)
    p = write_state_dict(tmp_path / "x.safetensors", state)
    ref = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, ref)
    assert load_file(p).keys() == load_file(ref).keys()
    assert all(torch.equal(load_file(p)[k], state[k]) for k in state)


def _tiny_bert(path, seed):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=12,
    )
    model = BertModel(cfg)
    model.save_pretrained(path)
    return model


def test_hf_dir_in_hf_dir_out_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModel

    base = _tiny_bert(tmp_path / "base", 0)
    ft = _tiny_bert(tmp_path / "ft", 0)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ft.save_pretrained(tmp_path / "ft")
    (tmp_path / "base" / "vocab.txt").write_text("[PAD]\n")
    out = tmp_path / "merged"
    merge(tmp_path / "base", [tmp_path / "ft"], "magnitude", {"k": 1.0}, out)
    assert (out / "config.json").is_file() and (out / "vocab.txt").is_file()
    loaded = AutoModel.from_pretrained(out)
    ref = AutoModel.from_pretrained(tmp_path / "ft")
    sd, rd = loaded.state_dict(), ref.state_dict()
    assert all(torch.equal(sd[k], rd[k]) for k in rd)
    assert base is not None


# ------------------------------------------------------------------ task vectors
def test_task_vector_arithmetic_and_apply(tmp_path):
    bp, mps, base, fts = make_set(tmp_path, tasks=2)
    t0 = TaskVector.from_checkpoints(bp, mps[0])
    t1 = TaskVector.from_checkpoints(bp, mps[1])
    assert "position_ids" not in t0.keys  # integer buffers are not part of τ
    s = t0 + t1
    d = (t0 - t1) * 2.0
    for k in t0.keys:
        want = (fts[0][k] - base[k]) + (fts[1][k] - base[k])
        torch.testing.assert_close(s.to_dict()[k], want)
        torch.testing.assert_close(d.to_dict()[k], 2 * (fts[0][k] - fts[1][k]))
    applied = t0.apply_to(base)
    assert all(torch.equal(applied[k], fts[0][k]) for k in base)


def test_include_exclude_filters(tmp_path):
    bp, mps, base, fts = make_set(tmp_path, tasks=1)
    plan = plan_merge(bp, mps, exclude=["encoder.1.*"])
    assert "encoder.1.weight" in plan.copy_keys
    out = merge(bp, mps, "task-arithmetic", {"lam": 1.0}, exclude=["encoder.1.*"]).state
    assert torch.equal(out["encoder.1.weight"], base["encoder.1.weight"])
    assert torch.equal(out["encoder.0.weight"], fts[0]["encoder.0.weight"])


# ------------------------------------------------------------------ bad input
def _merge_args(bp, mps, out, *extra):
    return [
        "merge",
        "--method",
        "ties",
        "--base",
        str(bp),
        "--models",
        *map(str, mps),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def assert_fails(capsys, tmp_path, args, *needles):
    before = set(os.listdir(tmp_path))
    code, out, err = run_cli(args, capsys)
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert set(os.listdir(tmp_path)) == before  # nothing written
    return lines[0]


def test_key_in_one_checkpoint_only(tmp_path, capsys):
    bp, mps, base, fts = make_set(tmp_path, tasks=1)
    extra = dict(fts[0], **{"extra.weight": torch.ones(2)})
    odd = write_state_dict(tmp_path / "odd.safetensors", extra)
    assert_fails(
        capsys,
        tmp_path,
        _merge_args(bp, [odd], tmp_path / "o.safetensors"),
        "odd.safetensors:extra.weight",
        "not in base",
    )
    missing = {k: v for k, v in fts[0].items() if k != "norm.weight"}
    miss = write_state_dict(tmp_path / "miss.safetensors", missing)
    assert_fails(
        capsys,
        tmp_path,
        _merge_args(bp, [miss], tmp_path / "o.safetensors"),
        "miss.safetensors:norm.weight",
        "missing",
    )


def test_shape_mismatch(tmp_path, capsys):
    bp, mps, base, fts = make_set(tmp_path, tasks=1)
    bad = dict(fts[0], **{"norm.weight": torch.ones(4)})
    p = write_state_dict(tmp_path / "bad.safetensors", bad)
    line = assert_fails(
        capsys,
        tmp_path,
        _merge_args(bp, [p], tmp_path / "o.safetensors"),
        "bad.safetensors:norm.weight",
        "(4,)",
        "(3,)",
    )
    assert "shape" in line
    with pytest.raises(ShapeMismatchError):
        plan_merge(bp, [p])


def test_float_versus_non_float(tmp_path, capsys):
    bp, mps, base, fts = make_set(tmp_path, tasks=1)
    bad = dict(fts[0], **{"norm.weight": torch.ones(3, dtype=torch.int32)})
    p = write_state_dict(tmp_path / "int.safetensors", bad)
    assert_fails(
        capsys,
        tmp_path,
        _merge_args(bp, [p], tmp_path / "o.safetensors"),
        "int.safetensors:norm.weight",
        "torch.int32",
    )


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_tensor(tmp_path, capsys, bad_value):
    bp, mps, base, fts = make_set(tmp_path, tasks=1)
    bad = {k: v.clone() for k, v in fts[0].items()}
    bad["encoder.1.weight"][1, 2] = bad_value
    p = write_state_dict(tmp_path / "nan.safetensors", bad)
    assert_fails(
        capsys,
        tmp_path,
        _merge_args(bp, [p], tmp_path / "o.safetensors"),
        "nan.safetensors:encoder.1.weight",
        "NaN or Inf",
    )


def test_truncated_safetensors(tmp_path, capsys):
    bp, mps, base, fts = make_set(tmp_path, tasks=1)
    data = mps[0].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 10])
    assert_fails(
        capsys,
        tmp_path,
        _merge_args(bp, [cut], tmp_path / "o.safetensors"),
        "cut.safetensors",
        "truncated",
    )
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        open_checkpoint(junk)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_torch_file_that_would_execute_code(tmp_path, capsys):
    bp, _, _, _ = make_set(tmp_path, form="torch", tasks=1)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"norm.weight": _Evil()}, f)
    assert_fails(
        capsys,
        tmp_path,
        _merge_args(bp, [evil], tmp_path / "o.pt"),
        "evil.pt",
        "execute code",
    )


@pytest.mark.parametrize("k", ["0", "1.5", "-0.2"])
def test_k_outside_unit_interval(tmp_path, capsys, k):
    bp, mps, _, _ = make_set(tmp_path, tasks=1)
    assert_fails(
        capsys,
        tmp_path,
        _merge_args(bp, mps, tmp_path / "o.safetensors", "--k", k),
        "k",
    )


def test_no_models_and_output_equal_to_input(tmp_path, capsys):
    bp, mps, _, _ = make_set(tmp_path, tasks=1)
    code, _, err = run_cli(
        [
            "merge",
            "--method",
            "ties",
            "--base",
            str(bp),
            "--out",
            str(tmp_path / "o.safetensors"),
        ],
        capsys,
    )
    assert code != 0 and "--models" in err
    with pytest.raises(ConfigError, match="no models"):
        plan_merge(bp, [])
    assert_fails(
        capsys, tmp_path, _merge_args(bp, mps, mps[0]), "would overwrite the input"
    )
    assert_fails(
        capsys, tmp_path, _merge_args(bp, mps, bp), "would overwrite the input"
    )


def test_option_of_another_method_is_refused(tmp_path, capsys):
    bp, mps, _, _ = make_set(tmp_path, tasks=1)
    args = [
        "merge",
        "--method",
        "average",
        "--base",
        str(bp),
        "--models",
        str(mps[0]),
        "--out",
        str(tmp_path / "o.safetensors"),
        "--k",
        "0.3",
    ]
    assert_fails(capsys, tmp_path, args, "not a parameter of average")


def test_cli_merge_writes_what_the_library_computes(tmp_path, capsys):
    bp, mps, base, fts = make_set(tmp_path, tasks=3)
    out = tmp_path / "merged.safetensors"
    code, stdout, _ = run_cli(
        _merge_args(bp, mps, out, "--k", "0.3", "--lam", "1.2"), capsys
    )
    assert code == 0 and "wrote" in stdout
    want = merge(bp, mps, "ties", {"k": 0.3, "lam": 1.2}).state
    got = load_file(out)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # nps with per-task weights through the CLI (T·M values, task-major)
    w = ",".join(["1"] * 8 + ["0.5"] * 8 + ["2"] * 8)
    args = [
        "merge",
        "--method",
        "nps",
        "--base",
        str(bp),
        "--models",
        *map(str, mps),
        "--out",
        str(tmp_path / "nps.safetensors"),
        "--weights",
        w,
        "--k",
        "0.1",
        "--quiet",
    ]
    assert run_cli(args, capsys)[0] == 0
    want = merge(
        bp, mps, "nps", {"k": 0.1, "weights": [1.0] * 8 + [0.5] * 8 + [2.0] * 8}
    ).state
    got = load_file(tmp_path / "nps.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
