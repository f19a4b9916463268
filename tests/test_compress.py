"""The sparse task-vector store: exact rebuilds, integrity checks,
storage accounting, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npstune.checkpoints import open_checkpoint, write_state_dict
from npstune.cli import main
from npstune.compress import (
    codec,
    compress,
    decompress,
    inspect_store,
    read_manifest,
    storage_bits,
)
from npstune.errors import CheckpointError, ConfigError
from npstune.merge import merge
from tests.tiny import make_set

SUFFIX = {"safetensors": ".safetensors", "sharded": "", "torch": ".pt", "hf": ""}


def run_cli(args, capsys):
    """Run ``npstune ARGS`` in-process through the real entry point; (code,
    out, err)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def make_hf(tmp: Path, dtype: torch.dtype, tasks: int = 2):
    """HF-style directories: config.json + model.safetensors (+ a tokenizer file)."""
    bp, mps, base, fts = make_set(tmp, "safetensors", dtype, tasks)
    dirs = []
    for name, state in [("base", base)] + [
        (f"task{i}", ft) for i, ft in enumerate(fts)
    ]:
        d = tmp / f"{name}_hf"
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "tiny"}')
        (d / "vocab.txt").write_text("[PAD]\n")
        write_state_dict(d / "model.safetensors", state)
        dirs.append(d)
    return dirs[0], dirs[1:]


def tensors_bytes(path: Path) -> dict[str, bytes]:
    ck = open_checkpoint(path)
    return {
        k: ck[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for k in ck
    }


def assert_same_output(a: Path, b: Path) -> None:
    """Same keys, dtypes, shapes and bytes; single safetensors files:
    identical files."""
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    assert sorted(ca) == sorted(cb)
    for k in cb:
        assert ca.dtype(k) == cb.dtype(k) and ca.shape(k) == cb.shape(k), k
    assert tensors_bytes(a) == tensors_bytes(b)
    if a.is_file() and a.suffix == ".safetensors":
        assert a.read_bytes() == b.read_bytes()
    if a.is_dir():
        assert sorted(p.name for p in a.iterdir()) == sorted(
            p.name for p in b.iterdir()
        )
        for p in a.iterdir():
            if p.suffix in (".safetensors", ".json", ".txt"):
                assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def roundtrip(tmp: Path, bp, mps, method="nps", params=None, merge_method=None, **kw):
    """Compress, then check every task rebuilds exactly what a single-task merge
    writes."""
    store = tmp / "store"
    m = compress(bp, mps, store, method, params, **kw)
    suffix = SUFFIX[open_checkpoint(bp).form]
    for i, (task, mp) in enumerate(zip(m.tasks, mps)):
        got = decompress(store, task.name, tmp / f"dec_{i}{suffix}")
        want = tmp / f"merge_{i}{suffix}"
        merge(bp, [mp], merge_method or method, task.params, want)
        assert_same_output(got, want)
    return m


# ------------------------------------------------------------------ exact rebuilds
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["safetensors", "sharded", "torch", "hf"])
def test_decompress_is_bit_exact_merge_output_every_form_and_dtype(
    tmp_path, form, dtype
):
    if form == "hf":
        bp, mps = make_hf(tmp_path, dtype)
    else:
        bp, mps, _, _ = make_set(tmp_path, form, dtype, tasks=2)
    m = roundtrip(tmp_path, bp, mps, params={"k": 0.2})
    assert all(t.lossless for t in m.tasks)
    assert [t.kept for t in m.tasks] == [12, 12]  # ⌈0.2·57⌉ each


@pytest.mark.parametrize(
    "method,params,merge_method",
    [
        ("magnitude", {"k": 0.3, "lam": 0.7}, "magnitude"),
        ("magnitude", {"k": 0.3, "scope": "tensor"}, "magnitude"),
        ("dare", {"k": 0.4, "seed": 5}, "dare"),
        ("darex", {"k": 0.3, "q": 0.6, "seed": 1}, "darex"),
        ("ties-trim", {"k": 0.25, "lam": 1.3}, "ties"),
        ("nps", {"k": 0.3, "weights": [2, 0, 1, 1, 0.5, 1, 1, 1.5]}, "nps"),
        (
            "nps",
            {"k": 0.3, "scope": "tensor", "subspaces": 2, "weights": [0.5, 2]},
            "nps",
        ),
        ("nps", {"k": 1.0}, "nps"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_sparse_method_rebuilds_exactly(
    tmp_path, method, params, merge_method, dtype
):
    bp, mps, _, _ = make_set(tmp_path, "safetensors", dtype, tasks=2)
    roundtrip(tmp_path, bp, mps, method, params, merge_method)


def test_per_task_weights_give_each_task_its_row(tmp_path):
    bp, mps, _, _ = make_set(tmp_path, tasks=2)
    w = [1, 1, 1, 1, 1, 1, 1, 1, 2, 0, 2, 0, 2, 0, 2, 0]
    m = roundtrip(tmp_path, bp, mps, params={"k": 0.3, "weights": w})
    assert [t.params["weights"] for t in m.tasks] == [w[:8], w[8:]]


@pytest.mark.parametrize("params", [{"k": 0.01}, {"k": 0.05, "scope": "tensor"}])
def test_tensors_where_k_times_n_is_below_one(tmp_path, params):
    bp, mps, _, _ = make_set(tmp_path, tasks=2)
    m = roundtrip(tmp_path, bp, mps, params=params)
    if (
        params.get("scope") == "tensor"
    ):  # ⌈k·n⌉ per tensor: 1 where k·n < 1 (n = 6, 18, 3)
        kept = {t.key: t.kept for t in m.tasks[0].tensors}
        assert kept == {
            "encoder.0.bias": 1,
            "encoder.0.weight": 2,
            "encoder.1.weight": 1,
            "norm.weight": 1,
        }
    else:  # ⌈0.01·57⌉ = 1 entry in the whole task vector; other tensors keep none
        assert [t.kept for t in m.tasks] == [1, 1]
        assert any(b[3] == "none" for t in m.tasks[0].tensors for b in t.blocks)


def test_many_blocks_per_tensor(tmp_path, monkeypatch):
    import npstune.taskvector as tv

    bp, mps, _, _ = make_set(tmp_path, tasks=2)
    monkeypatch.setattr(tv, "CHUNK", 7)
    m = roundtrip(
        tmp_path, bp, mps, params={"k": 0.3, "weights": [2, 1, 1, 0.5, 1, 1, 1, 0]}
    )
    assert len(m.tasks[0].tensors[1].blocks) == 5  # encoder.0.weight: 30 entries


def _kept_positions(
    store: Path, task: str, out: Path, base: dict
) -> dict[str, torch.Tensor]:
    """Where a task's rebuilt model differs from the base (its kept entries)."""
    got = open_checkpoint(decompress(store, task, out))
    return {k: got[k] != v for k, v in base.items() if v.is_floating_point()}


def test_dare_store_gives_each_task_its_own_mask_for_any_chunk_size(
    tmp_path, monkeypatch
):
    import npstune.taskvector as tv

    # τ is nonzero everywhere, so a rebuilt entry differs from the base iff it was kept
    bp, mps, base, _ = make_set(tmp_path, tasks=2)
    params = {"k": 0.5, "seed": 3}
    m = compress(bp, mps, tmp_path / "store", "dare", params)
    a = _kept_positions(tmp_path / "store", "task0", tmp_path / "a.safetensors", base)
    b = _kept_positions(tmp_path / "store", "task1", tmp_path / "b.safetensors", base)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two tasks, two masks
    # the read chunk size changes the store's blocks, never the masks or the rebuilt
    # bytes
    monkeypatch.setattr(tv, "CHUNK", 7)
    m7 = compress(bp, mps, tmp_path / "store7", "dare", params)
    assert len(m7.tasks[0].tensors[1].blocks) == 5  # encoder.0.weight: 30 entries
    for t in ("task0", "task1"):
        one = decompress(tmp_path / "store", t, tmp_path / f"{t}_1.safetensors")
        seven = decompress(tmp_path / "store7", t, tmp_path / f"{t}_7.safetensors")
        assert one.read_bytes() == seven.read_bytes(), t
    assert [[x.kept for x in t.tensors] for t in m.tasks] == [
        [x.kept for x in t.tensors] for t in m7.tasks
    ]


def test_frozen_and_empty_tensors(tmp_path):
    base = {"a": torch.randn(20), "frozen": torch.randn(6), "empty": torch.zeros(0, 3)}
    ft = {
        "a": base["a"] + torch.randn(20),
        "frozen": base["frozen"].clone(),
        "empty": torch.zeros(0, 3),
    }
    bp = write_state_dict(tmp_path / "b.safetensors", base)
    mp = write_state_dict(tmp_path / "t.safetensors", ft)
    m = roundtrip(tmp_path, bp, [mp], params={"k": 0.25})
    assert [t.key for t in m.tasks[0].tensors] == ["a"] and m.tasks[0].n == 20
    r = inspect_store(tmp_path / "store")
    assert r["n"] == 20 and r["frozen"] == 6


def test_cancellation_and_fp16_overflow_are_stored_as_exceptions(tmp_path):
    # fp32: 1.0 -> 1e-8: o − θ_pre rounds in fp32, so θ_pre + s cannot give o back
    b32 = torch.tensor([1.0, 0.5, -3.0, 2.0])
    f32 = torch.tensor([1e-8, 0.5, -3.0, 2.0])
    # fp16: -40000 -> 40000: the delta 80000 overflows fp16
    b16 = torch.tensor([-40000.0, 1.0, 2.0, 3.0], dtype=torch.float16)
    f16 = torch.tensor([40000.0, 1.0, 2.0, 3.0], dtype=torch.float16)
    for name, b, f in (("f32", b32, f32), ("f16", b16, f16)):
        d = tmp_path / name
        d.mkdir()
        bp = write_state_dict(d / "b.safetensors", {"w": b})
        mp = write_state_dict(d / "t.safetensors", {"w": f})
        m = roundtrip(d, bp, [mp], params={"k": 0.25})
        assert m.tasks[0].exceptions == 1
        out = open_checkpoint(d / "dec_0.safetensors")["w"]
        assert out[0].item() == f[0].item()


def test_negative_zero_in_the_base_matches_the_merge(tmp_path):
    b = torch.tensor([-0.0, 1.0, -0.0, 2.0, 3.0, -0.0])
    f = torch.tensor([-0.0, 1.5, -0.0, 2.0, 3.0, 7.0])
    bp = write_state_dict(tmp_path / "b.safetensors", {"w": b})
    mp = write_state_dict(tmp_path / "t.safetensors", {"w": f})
    roundtrip(tmp_path, bp, [mp], params={"k": 0.5})


def test_lossy_16_bit_values(tmp_path):
    bp, mps, base, fts = make_set(tmp_path, tasks=1)
    store = tmp_path / "store"
    m = compress(bp, mps, store, params={"k": 0.3}, value_dtype="bf16")
    assert not m.tasks[0].lossless
    got = open_checkpoint(decompress(store, "task0", tmp_path / "d.safetensors"))
    want = merge(bp, mps, "nps", {"k": 0.3}).state
    for k, w in want.items():
        changed = w != base[k]
        assert torch.equal(got[k][~changed], w[~changed])  # untouched entries are exact
        delta = (w - base[k]).float()[changed]
        err = (got[k] - w).float()[changed].abs()
        assert bool((err <= delta.abs() * 2**-8 + 1e-6).all()), (
            k
        )  # bf16: 8-bit mantissa


def test_codec_picks_the_smaller_position_coding():
    cctx = __import__("zstandard").ZstdCompressor(level=3)
    g = torch.Generator().manual_seed(0)
    sparse = torch.rand(200_000, generator=g) < 0.01
    dense = torch.rand(200_000, generator=g) < 0.4
    name_s, blob_s = codec.encode_positions(sparse, cctx)
    name_d, blob_d = codec.encode_positions(dense, cctx)
    assert name_s.startswith("gaps") and name_d == "bits"
    for mask, name, blob in ((sparse, name_s, blob_s), (dense, name_d, blob_d)):
        idx = codec.decode_positions(name, blob, mask.numel(), int(mask.sum()), "x")
        assert torch.equal(idx, mask.nonzero().squeeze(1))
    big_gap = torch.zeros(100_000, dtype=torch.bool)
    big_gap[[3, 70_000, 99_999]] = True
    name, blob = codec.encode_positions(big_gap, cctx)
    assert name in ("gaps4", "bits")
    assert codec.decode_positions(name, blob, 100_000, 3, "x").tolist() == [
        3,
        70_000,
        99_999,
    ]


# ------------------------------------------------------------------ integrity
def test_changed_base_is_refused_and_nothing_is_written(tmp_path):
    bp, mps, base, _ = make_set(tmp_path, tasks=1)
    store = tmp_path / "store"
    compress(bp, mps, store, params={"k": 0.2})
    changed = dict(base, **{"norm.weight": base["norm.weight"] + 1})
    write_state_dict(bp, changed)  # same size, other bytes
    out = tmp_path / "d.safetensors"
    with pytest.raises(CheckpointError, match="sha256.*refusing"):
        decompress(store, "task0", out)
    assert not out.exists()


def test_moved_base_is_found_with_base_option_and_checked(tmp_path):
    bp, mps, _, _ = make_set(tmp_path, tasks=1)
    store = tmp_path / "store"
    compress(bp, mps, store, params={"k": 0.2})
    moved = tmp_path / "elsewhere.safetensors"
    bp.rename(moved)
    with pytest.raises(CheckpointError, match="missing; pass --base"):
        decompress(store, "task0", tmp_path / "d.safetensors")
    decompress(store, "task0", tmp_path / "d.safetensors", base=moved)
    with pytest.raises(CheckpointError, match="different sha256.*refusing"):
        decompress(store, "task0", tmp_path / "e.safetensors", base=mps[0])


def test_copy_base_makes_the_store_self_contained(tmp_path):
    bp, mps, _, _ = make_set(tmp_path, "sharded", tasks=1)
    store = tmp_path / "store"
    m = compress(bp, mps, store, params={"k": 0.2}, copy_base=True)
    assert m.base.copied and (store / m.base.path).is_dir()
    want = merge(bp, mps, "nps", {"k": 0.2}, tmp_path / "want")
    import shutil

    shutil.rmtree(bp)
    assert_same_output(decompress(store, "task0", tmp_path / "got"), want.path)
    assert inspect_store(store)["base"]["copied"]


def test_copy_base_given_as_a_shard_index_copies_the_shards(tmp_path):
    bp, mps, _, _ = make_set(tmp_path, "sharded", tasks=1)
    index = bp / "model.safetensors.index.json"
    store = tmp_path / "store"
    m = compress(index, mps, store, params={"k": 0.2}, copy_base=True)
    assert m.base.path == "base/model.safetensors.index.json"
    shards = sorted(p.name for p in bp.glob("*.safetensors"))
    assert (
        len(shards) > 1
        and sorted(p.name for p in (store / "base").glob("*.safetensors")) == shards
    )
    import shutil

    shutil.rmtree(bp)
    got = open_checkpoint(decompress(store, "task0", tmp_path / "got"))
    assert got.form == "sharded" and len(got) == 5


def test_a_model_equal_to_the_base_stores_nothing(tmp_path):
    bp, _, _, _ = make_set(tmp_path, tasks=1)
    m = compress(bp, [bp], tmp_path / "store", params={"k": 0.1})
    assert m.tasks[0].kept == 0 and m.tasks[0].tensors == []
    got = decompress(tmp_path / "store", "base", tmp_path / "d.safetensors")
    assert tensors_bytes(got) == tensors_bytes(bp)


def _corrupt(path: Path, where: str) -> None:
    data = bytearray(path.read_bytes())
    if where == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[:-5]))


@pytest.mark.parametrize(
    "how,needle", [("flip", "checksum mismatch"), ("cut", "truncated")]
)
def test_corrupted_or_truncated_task_file_is_detected_and_named(tmp_path, how, needle):
    bp, mps, _, _ = make_set(tmp_path, tasks=2)
    store = tmp_path / "store"
    compress(bp, mps, store, params={"k": 0.5})
    _corrupt(store / "tasks" / "task1.npsz", how)
    out = tmp_path / "d.safetensors"
    with pytest.raises(CheckpointError, match=needle) as err:
        decompress(store, "task1", out)
    assert "task1.npsz" in str(err.value) and not out.exists()
    with pytest.raises(CheckpointError, match="task1.npsz"):
        inspect_store(store)
    decompress(store, "task0", out)  # the intact task still rebuilds


def test_corrupted_manifest_is_named(tmp_path):
    bp, mps, _, _ = make_set(tmp_path, tasks=1)
    store = tmp_path / "store"
    compress(bp, mps, store, params={"k": 0.2})
    (store / "manifest.json").write_text((store / "manifest.json").read_text()[:-40])
    with pytest.raises(CheckpointError, match="manifest.json"):
        inspect_store(store)


def test_failed_compress_leaves_nothing_and_keeps_an_old_store(tmp_path, monkeypatch):
    bp, mps, _, _ = make_set(tmp_path, tasks=2)
    store = tmp_path / "store"
    compress(bp, mps[:1], store, params={"k": 0.2})
    before = sorted(os.listdir(tmp_path))
    old = (store / "manifest.json").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(codec, "encode_values", boom)
    with pytest.raises(RuntimeError):
        compress(bp, mps, store, params={"k": 0.2})
    assert sorted(os.listdir(tmp_path)) == before
    assert (store / "manifest.json").read_bytes() == old


def test_out_that_is_not_a_store_is_refused(tmp_path):
    bp, mps, _, _ = make_set(tmp_path, tasks=1)
    other = tmp_path / "mydir"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an npstune store"):
        compress(bp, mps, other)
    with pytest.raises(ConfigError, match="does not produce a sparse"):
        compress(bp, mps, tmp_path / "s", "task-arithmetic")


# ------------------------------------------------------------------ accounting
def test_storage_bits_match_the_paper_formulas_hand_computed():
    # T = 3, N = 1000, k = 0.05 (k·N = 50)
    assert storage_bits("finetuned", 3, 1000).paper_bits == 96_000  # 32·3·1000
    assert storage_bits("task-arithmetic", 3, 1000).paper_bits == 32_000  # 32·1000
    assert storage_bits("ties", 3, 1000).paper_bits == 32_000
    assert storage_bits("zero-shot", 3, 1000).paper_bits == 32_000
    assert storage_bits("tall-ties", 3, 1000).paper_bits == 67_000  # 64·1000 + 3·1000
    assert (
        storage_bits("nps", 3, 1000, 0.05).paper_bits == 39_800
    )  # 32000 + 3·(1600+1000)
    assert storage_bits("dare", 3, 1000, 0.05).paper_bits == 39_800
    # EMR: base, τ_uni, 3 one-bit masks, 3 rescalers = 64·1000 + 3·1000 + 32·3
    assert storage_bits("emr", 3, 1000).paper_bits == 67_096
    for one_model in ("tsv-m", "iso-c", "iso-cts", "wudi", "pcb"):
        assert storage_bits(one_model, 3, 1000).paper_bits == 32_000
    # frozen parameters are base-only, counted once, 32 bits each
    s = storage_bits("nps", 3, 1000, 0.05, frozen=10, disk_bytes=4000)
    assert (s.frozen_bits, s.total_bits) == (320, 40_120)
    assert s.ratio == pytest.approx(32_000 / 39_800)
    # k·N not an integer: the kept count ⌈k·N⌉ (⌈0.2·57⌉ = 12)
    assert storage_bits("magnitude", 2, 57, 0.2).paper_bits == 32 * 57 + 2 * (
        32 * 12 + 57
    )
    with pytest.raises(ConfigError, match="needs the keep ratio"):
        storage_bits("nps", 3, 1000)
    with pytest.raises(ConfigError, match="unknown method"):
        storage_bits("zip", 3, 1000)


def test_inspect_json_numbers_equal_the_formulas(tmp_path, capsys):
    bp, mps, _, _ = make_set(tmp_path, tasks=3)
    store = tmp_path / "store"
    compress(bp, mps, store, params={"k": 0.2})
    code, out, _ = run_cli(["inspect", store, "--json"], capsys)
    assert code == 0
    r = json.loads(out)
    # tiny set: N = 6 + 30 + 18 + 3 = 57 float entries; position_ids (4) is base-only
    assert (r["n"], r["frozen"], r["tasks_count"]) == (57, 4, 3)
    per_task = 32 * 12 + 57  # 32·⌈0.2·57⌉ + N
    assert [t["paper_bits"] for t in r["tasks"]] == [per_task] * 3
    assert r["total"]["paper_bits"] == 32 * 57 + 3 * per_task == 3147
    assert r["total"]["frozen_bits"] == 128 and r["total"]["total_bits"] == 3275
    assert r["methods"]["finetuned"]["paper_bits"] == 32 * 3 * 57
    assert r["methods"]["merged"]["paper_bits"] == 32 * 57
    assert r["methods"]["tall-ties"]["paper_bits"] == 64 * 57 + 3 * 57
    sizes = [(store / "tasks" / f"task{i}.npsz").stat().st_size for i in range(3)]
    assert [t["disk_bytes"] for t in r["tasks"]] == sizes
    manifest = (store / "manifest.json").stat().st_size
    assert r["sparse"]["disk_bytes"] == sum(sizes) + manifest
    assert r["total"]["disk_bytes"] == sum(sizes) + manifest + bp.stat().st_size
    code, out, _ = run_cli(["inspect", store], capsys)
    assert code == 0 and "3,147" in out and "task2" in out


# ------------------------------------------------------------------ command line
def test_cli_compress_decompress_equals_cli_merge(tmp_path, capsys):
    bp, mps, _, _ = make_set(tmp_path, tasks=2)
    store = tmp_path / "store"
    code, out, _ = run_cli(
        [
            "compress",
            "--base",
            bp,
            "--models",
            *mps,
            "--out",
            store,
            "--k",
            "0.2",
            "--weights",
            "1,1,1,1,2,2,2,2",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0 and "wrote" in out
    for i in range(2):
        got, want = tmp_path / f"d{i}.safetensors", tmp_path / f"m{i}.safetensors"
        assert (
            run_cli(
                ["decompress", store, "--task", f"task{i}", "--out", got, "--quiet"],
                capsys,
            )[0]
            == 0
        )
        assert (
            run_cli(
                [
                    "merge",
                    "--method",
                    "nps",
                    "--base",
                    bp,
                    "--models",
                    mps[i],
                    "--k",
                    "0.2",
                    "--weights",
                    "1,1,1,1,2,2,2,2",
                    "--out",
                    want,
                    "--quiet",
                ],
                capsys,
            )[0]
            == 0
        )
        assert got.read_bytes() == want.read_bytes()


def _fails(capsys, tmp_path, args, *needles):
    before = set(os.listdir(tmp_path))
    code, _, err = run_cli(args, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, err
    assert all(n in lines[0] for n in needles), lines[0]
    assert set(os.listdir(tmp_path)) == before  # nothing written


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    bp, mps, base, _ = make_set(tmp_path, tasks=1)
    store = tmp_path / "store"
    assert (
        run_cli(
            ["compress", "--base", bp, "--models", *mps, "--out", store, "--quiet"],
            capsys,
        )[0]
        == 0
    )
    out = tmp_path / "o.safetensors"
    _fails(
        capsys,
        tmp_path,
        ["decompress", store, "--task", "nope", "--out", out],
        "nope",
        "task0",
    )
    _fails(
        capsys,
        tmp_path,
        [
            "compress",
            "--base",
            bp,
            "--models",
            *mps,
            "--out",
            tmp_path / "s2",
            "--seed",
            "3",
        ],
        "not a parameter of nps",
    )
    _fails(
        capsys,
        tmp_path,
        [
            "compress",
            "--base",
            bp,
            "--models",
            *mps,
            "--out",
            tmp_path / "s2",
            "--k",
            "1.5",
        ],
        "k",
    )
    _fails(
        capsys,
        tmp_path,
        ["compress", "--base", bp, "--models", *mps, "--out", bp],
        "would overwrite the input",
    )
    write_state_dict(bp, dict(base, **{"norm.weight": base["norm.weight"] * 2}))
    _fails(
        capsys,
        tmp_path,
        ["decompress", store, "--task", "task0", "--out", out],
        "base.safetensors",
        "sha256",
    )
    _corrupt(store / "tasks" / "task0.npsz", "flip")
    _fails(capsys, tmp_path, ["inspect", store], "task0.npsz")


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).with_name("npstune")
    if not exe.exists():
        pytest.skip("console script not installed")
    r = subprocess.run(
        [str(exe), "inspect", str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "not an npstune store" in r.stderr


def test_manifest_records_what_rebuilds_a_task(tmp_path):
    bp, mps, _, _ = make_set(tmp_path, tasks=2)
    compress(bp, mps, tmp_path / "store", "magnitude", {"k": 0.1}, value_dtype="fp16")
    m = read_manifest(tmp_path / "store")
    assert m.method == "magnitude" and m.params["k"] == 0.1 and m.value_dtype == "fp16"
    assert [t.name for t in m.tasks] == ["task0", "task1"]
    assert len(m.base.files) == 1 and len(m.base.files[0].sha256) == 64
    t = m.tasks[0]
    assert sum(x.kept for x in t.tensors) == t.kept == 6  # ⌈0.1·57⌉
    assert all(x.values == "fp16" and x.dtype == "fp32" for x in t.tensors)


def test_models_with_one_file_stem_need_names(tmp_path):
    """Zoo-style layouts (tasks/T/model for every T) share a stem: refused with a clear
    message, stored under the given names when passed."""
    from npstune.compress import compress, decompress

    bp, mps, _, _ = make_set(tmp_path)
    same = []
    for i, m in enumerate(mps[:2]):
        d = tmp_path / f"task{i}"
        d.mkdir()
        same.append(d / "model.safetensors")
        same[-1].write_bytes(Path(m).read_bytes())
    with pytest.raises(ConfigError, match="share the task name 'model'.*pass names"):
        compress(bp, same, tmp_path / "s1")
    with pytest.raises(ConfigError, match="1 names for 2 models"):
        compress(bp, same, tmp_path / "s1", names=["a"])
    m = compress(bp, same, tmp_path / "s2", names=["alpha", "beta"])
    assert [t.name for t in m.tasks] == ["alpha", "beta"]
    decompress(tmp_path / "s2", "beta", tmp_path / "beta.safetensors")
    assert (tmp_path / "beta.safetensors").is_file()
