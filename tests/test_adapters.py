"""PEFT LoRA adapters as checkpoints: τ = B·A·scale per layer, merges, adapter outputs.

Adapters are written by hand in PEFT's on-disk format (``adapter_config.json`` +
``adapter_model.safetensors`` with PEFT key names), so ``peft`` is not needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from npstune.checkpoints import AdapterCheckpoint, open_checkpoint, write_state_dict
from npstune.cli import main
from npstune.errors import CheckpointError, ConfigError
from npstune.merge import get_method, merge, run_merge
from npstune.taskvector import TaskVector, plan_merge

P = "base_model.model."
LAYERS = 2
F64 = torch.float64


def run_cli(args, capsys):
    """Run ``npstune ARGS`` in-process; return (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny Llama saved with save_pretrained (fp32, untied lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("llama") / "base"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    """An adapter directory exactly as PEFT saves one."""
    cfg = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "inference_mode": True,
    }
    cfg.update(config)
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def llama_adapter(
    path: Path,
    base: Path,
    seed: int,
    r: int = 4,
    alpha: float = 8.0,
    modules=("q_proj", "v_proj"),
    embed: bool = False,
    head: bool = False,
    ranks: dict[str, int] | None = None,
    alphas: dict[str, float] | None = None,
    rslora: bool = False,
    adapter_name: str | None = None,
    **config,
):
    """A random LoRA adapter over the tiny Llama: (path, {base key: exact Δ, f64})."""
    ck = open_checkpoint(base)
    g = torch.Generator().manual_seed(seed)
    tensors, want = {}, {}
    tag = f".{adapter_name}" if adapter_name else ""

    def scale(rank: int, al: float) -> float:
        return al / math.sqrt(rank) if rslora else al / rank

    for i in range(LAYERS):
        for m in modules:
            mod = f"model.layers.{i}.self_attn.{m}"
            rk, al = (ranks or {}).get(m, r), (alphas or {}).get(m, alpha)
            out_f, in_f = ck.shape(f"{mod}.weight")
            a = torch.randn(rk, in_f, generator=g) * 0.5
            b = torch.randn(out_f, rk, generator=g) * 0.5
            tensors[f"{P}{mod}.lora_A{tag}.weight"] = a
            tensors[f"{P}{mod}.lora_B{tag}.weight"] = b
            want[f"{mod}.weight"] = b.double() @ a.double() * scale(rk, al)
    if embed:
        n, dim = ck.shape("model.embed_tokens.weight")
        a = torch.randn(r, n, generator=g) * 0.5
        b = torch.randn(dim, r, generator=g) * 0.5
        tensors[f"{P}model.embed_tokens.lora_embedding_A{tag}"] = a
        tensors[f"{P}model.embed_tokens.lora_embedding_B{tag}"] = b
        delta = (b.double() @ a.double()).T * scale(r, alpha)
        want["model.embed_tokens.weight"] = delta
    if head:
        h = ck["lm_head.weight"]
        saved = h + 0.05 * torch.randn(h.shape, generator=g)
        name = "lm_head.weight"
        if adapter_name:  # the raw (unsaved) PEFT state-dict form
            name = f"lm_head.modules_to_save{tag}.weight"
        tensors[P + name] = saved
        want["lm_head.weight"] = saved.double() - h.double()
        config.setdefault("modules_to_save", ["lm_head"])
    pats = {}
    if ranks:
        pats["rank_pattern"] = ranks
    if alphas:
        pats["alpha_pattern"] = alphas
    targets = list(modules) + (["embed_tokens"] if embed else [])
    write_adapter(
        path,
        tensors,
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=targets,
        **pats,
        **config,
    )
    return path, want


def dense(base: Path, want: dict[str, torch.Tensor], out: Path) -> Path:
    """The adapter's dense equivalent θ_pre + Δ as a full safetensors checkpoint."""
    ck = open_checkpoint(base)
    state = {
        k: ((ck[k].double() + want[k]).to(ck.dtype(k)) if k in want else ck[k])
        for k in ck.keys()
    }
    return write_state_dict(out, state)


def no_output(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def close(
    got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-12, atol: float = 1e-14
) -> None:
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ reading
@pytest.mark.parametrize("adapter_name", [None, "default"])
def test_task_vector_is_b_a_scale_on_targeted_keys_and_zero_elsewhere(
    tmp_path, llama, adapter_name
):
    ad, want = llama_adapter(
        tmp_path / "ad", llama, 1, embed=True, head=True, adapter_name=adapter_name
    )
    ck = open_checkpoint(ad, base=llama)
    assert isinstance(ck, AdapterCheckpoint) and ck.form == "adapter"
    base = open_checkpoint(llama)
    assert list(ck.keys()) == list(base.keys())
    assert set(ck.lora) == {k for k in want if "proj" in k or "embed" in k}
    assert set(ck.full) == {"lm_head.weight"}
    for k in base.keys():
        got = ck.delta(k, dtype=F64).reshape(base.shape(k))
        if k in want:
            close(got, want[k])
        else:
            assert not got.any(), k
        assert ck.shape(k) == base.shape(k) and ck.dtype(k) == base.dtype(k)
    # chunks that start and stop inside rows are slices of the whole
    for k in ("model.layers.1.self_attn.v_proj.weight", "model.embed_tokens.weight"):
        close(ck.delta(k, 5, 77, F64), want[k].reshape(-1)[5:77])
        # θ_ft = θ_pre + Δ, rounded once to the base's dtype
        assert torch.equal(ck[k], (base[k].double() + want[k]).float())
    # the plan: untouched keys are frozen (copied), targeted ones take part
    plan = plan_merge(llama, [ad])
    assert set(plan.delta_keys) == set(want)
    tv = TaskVector.from_checkpoints(llama, ad).to_dict()
    for k in want:
        close(tv[k], want[k].float(), rtol=1e-6, atol=1e-9)


def test_rslora_rank_pattern_and_alpha_pattern(tmp_path, llama):
    ad, want = llama_adapter(
        tmp_path / "ad",
        llama,
        2,
        r=4,
        alpha=6.0,
        rslora=True,
        ranks={"v_proj": 2},
        alphas={"q_proj": 3.0},
    )
    ck = open_checkpoint(ad, base=llama)
    q = ck.lora["model.layers.0.self_attn.q_proj.weight"]
    v = ck.lora["model.layers.0.self_attn.v_proj.weight"]
    assert (q.rank, q.scale) == (4, 3.0 / 2.0)
    assert (v.rank, v.scale) == (2, 6.0 / math.sqrt(2))
    for k, w in want.items():
        close(ck.delta(k, dtype=F64).reshape(w.shape), w)


def plain_base(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A plain state dict: a GPT-2 style Conv1D weight [in, out], a linear with bias,
    a conv and a norm."""
    g = torch.Generator().manual_seed(5)
    state = {
        "h.0.attn.c_attn.weight": torch.randn(5, 6, generator=g),
        "h.0.fc.weight": torch.randn(6, 5, generator=g),
        "h.0.fc.bias": torch.randn(6, generator=g),
        "h.0.conv.weight": torch.randn(6, 3, 3, 3, generator=g),
        "h.0.ln.weight": torch.randn(5, generator=g),
    }
    return write_state_dict(tmp_path / "base.safetensors", state), state


def test_fan_in_fan_out_lora_bias_and_conv(tmp_path):
    bp, state = plain_base(tmp_path)
    g = torch.Generator().manual_seed(6)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    a1, b1 = rnd(2, 5), rnd(6, 2)  # Conv1D: in 5, out 6, stored [5, 6]
    a2, b2, bb = rnd(2, 5), rnd(6, 2), rnd(6)
    a3, b3 = rnd(2, 3, 3, 3), rnd(6, 2, 1, 1)
    fifo = write_adapter(
        tmp_path / "fifo",
        {
            f"{P}h.0.attn.c_attn.lora_A.weight": a1,
            f"{P}h.0.attn.c_attn.lora_B.weight": b1,
        },
        r=2,
        lora_alpha=3,
        fan_in_fan_out=True,
        target_modules=["c_attn"],
    )
    other = write_adapter(
        tmp_path / "other",
        {
            f"{P}h.0.fc.lora_A.weight": a2,
            f"{P}h.0.fc.lora_B.weight": b2,
            f"{P}h.0.fc.lora_B.bias": bb,
            f"{P}h.0.conv.lora_A.weight": a3,
            f"{P}h.0.conv.lora_B.weight": b3,
        },
        r=2,
        lora_alpha=3,
        lora_bias=True,
        target_modules=["fc", "conv"],
    )
    s = 1.5
    ck1, ck2 = open_checkpoint(fifo, base=bp), open_checkpoint(other, base=bp)
    assert sorted(ck1.lora) == ["h.0.attn.c_attn.weight"] and not ck1.bias
    assert sorted(ck2.lora) == ["h.0.conv.weight", "h.0.fc.weight"]
    assert sorted(ck2.bias) == ["h.0.fc.bias"]
    for ck in (ck1, ck2):
        assert not ck.delta("h.0.ln.weight").any()

    def d(ck, k):
        return ck.delta(k, dtype=F64).reshape(state[k].shape)

    close(d(ck1, "h.0.attn.c_attn.weight"), (b1.double() @ a1.double()).T * s)
    close(
        ck1.delta("h.0.attn.c_attn.weight", 7, 23, F64),
        d(ck1, "h.0.attn.c_attn.weight").reshape(-1)[7:23],
    )
    close(d(ck2, "h.0.fc.weight"), b2.double() @ a2.double() * s)
    close(d(ck2, "h.0.fc.bias"), bb.double() * s)
    conv = (b3.double().flatten(1) @ a3.double().flatten(1)).reshape(6, 3, 3, 3) * s
    close(d(ck2, "h.0.conv.weight"), conv)
    close(ck2.delta("h.0.conv.weight", 30, 100, F64), conv.reshape(-1)[30:100])


def test_fan_in_fan_out_on_a_linear_shaped_weight_is_a_shape_error(tmp_path):
    bp, _ = plain_base(tmp_path)
    g = torch.Generator().manual_seed(7)
    ad = write_adapter(
        tmp_path / "ad",
        {
            f"{P}h.0.fc.lora_A.weight": torch.randn(2, 5, generator=g),
            f"{P}h.0.fc.lora_B.weight": torch.randn(6, 2, generator=g),
        },
        r=2,
        lora_alpha=2,
        fan_in_fan_out=True,
        target_modules=["fc"],
    )
    match = r"ad:.*h\.0\.fc\.lora_A\.weight.*\(5, 6\).*h\.0\.fc\.weight.*\(6, 5\)"
    with pytest.raises(CheckpointError, match=match):
        plan_merge(bp, [ad])


def test_adapter_model_bin_and_key_prefix_matching(tmp_path):
    """``adapter_model.bin`` reads the same; targets match with a leading prefix added
    or removed (an adapter of LlamaForCausalLM over a base saved without ``model.``)."""
    g = torch.Generator().manual_seed(8)
    state = {
        "layers.0.q_proj.weight": torch.randn(4, 3, generator=g),
        "norm.weight": torch.randn(3, generator=g),
    }
    bp = write_state_dict(tmp_path / "base.safetensors", state)
    a, b = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g)
    ad = tmp_path / "ad"
    ad.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save(
        {
            f"{P}model.layers.0.q_proj.lora_A.weight": a,
            f"{P}model.layers.0.q_proj.lora_B.weight": b,
        },
        ad / "adapter_model.bin",
    )
    ck = open_checkpoint(ad, base=bp)
    assert set(ck.lora) == {"layers.0.q_proj.weight"}
    want = (b.double() @ a.double()).view(-1)
    close(ck.delta("layers.0.q_proj.weight", dtype=F64), want)


def test_bf16_base_task_vector_stays_exact(tmp_path):
    """θ_ft rounded to bf16 loses a small Δ; the plan uses the adapter's exact Δ."""
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(8, 8, generator=g) * 4).to(torch.bfloat16)
    bp = write_state_dict(tmp_path / "base.safetensors", {"l.weight": w})
    a = torch.randn(2, 8, generator=g) * 1e-2
    b = torch.randn(8, 2, generator=g) * 1e-2
    ad = write_adapter(
        tmp_path / "ad",
        {f"{P}l.lora_A.weight": a, f"{P}l.lora_B.weight": b},
        r=2,
        lora_alpha=2,
        target_modules=["l"],
    )
    plan = plan_merge(bp, [ad])
    chunk = plan.read_chunk("l.weight")
    exact = (b.double() @ a.double()).reshape(-1).float()
    assert torch.equal(chunk.taus32[0], exact) and torch.equal(chunk.taus[0], exact)
    rounded = plan.models[0].read("l.weight").float() - w.reshape(-1).float()
    assert not torch.allclose(rounded, exact, rtol=1e-3, atol=0)  # what rounding gives
    got = merge(bp, [ad], "task-arithmetic", {"lam": 1.0}).state["l.weight"]
    assert torch.equal(got, (w.float() + exact.reshape(8, 8)).to(torch.bfloat16))


def test_unbound_adapter_uses_a_local_base_model_name_or_path(tmp_path, llama):
    ad, want = llama_adapter(
        tmp_path / "ad", llama, 3, base_model_name_or_path=str(llama)
    )
    ck = open_checkpoint(ad)
    k = "model.layers.0.self_attn.q_proj.weight"
    close(ck.delta(k, dtype=F64).reshape(want[k].shape), want[k])
    far, _ = llama_adapter(
        tmp_path / "far", llama, 3, base_model_name_or_path="org/not-here"
    )
    with pytest.raises(CheckpointError, match="far: a LoRA adapter needs its base"):
        open_checkpoint(far).shape(k)


# ------------------------------------------------------------------ merges
@pytest.mark.parametrize(
    "method,params,opts",
    [
        ("task-arithmetic", {"lam": 0.7}, ["--lam", "0.7"]),
        ("ties", {"k": 0.5, "lam": 1.0}, ["--k", "0.5", "--lam", "1.0"]),
    ],
)
def test_merge_of_adapters_equals_merge_of_their_dense_equivalents(
    tmp_path, llama, capsys, method, params, opts
):
    a1, w1 = llama_adapter(tmp_path / "a1", llama, 11, embed=True, head=True)
    a2, w2 = llama_adapter(
        tmp_path / "a2", llama, 12, r=2, alpha=4.0, modules=("q_proj", "k_proj")
    )
    d1 = dense(llama, w1, tmp_path / "d1.safetensors")
    d2 = dense(llama, w2, tmp_path / "d2.safetensors")
    assert plan_merge(llama, [a1, a2]).n == plan_merge(llama, [d1, d2]).n
    outs = {}
    for name, models in (("ad", [a1, a2]), ("dn", [d1, d2])):
        out = tmp_path / f"{name}.safetensors"
        code, _, err = run_cli(
            [
                "merge",
                "--method",
                method,
                "--base",
                llama,
                "--models",
                *models,
                "--out",
                out,
                "--quiet",
                *opts,
            ],
            capsys,
        )
        assert code == 0, err
        outs[name] = load_file(out)
    base = open_checkpoint(llama)
    assert outs["ad"].keys() == outs["dn"].keys()
    assert not torch.equal(outs["ad"]["lm_head.weight"], base["lm_head.weight"])
    for k, v in outs["dn"].items():
        close(outs["ad"][k], v, rtol=0, atol=1e-6)
    # a mixed merge: an adapter beside a full fine-tuned model
    mixed = merge(llama, [a1, d2], method, params).state
    ref = merge(llama, [d1, d2], method, params).state
    for k, v in ref.items():
        close(mixed[k], v, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "method,opts,weight",
    [
        ("average", [], 0.5),
        ("task-arithmetic", ["--lam", "0.8"], 0.8),
    ],
)
def test_out_format_adapter_round_trips(tmp_path, llama, capsys, method, opts, weight):
    a1, w1 = llama_adapter(
        tmp_path / "a1", llama, 21, embed=True, head=True, ranks={"v_proj": 2}
    )
    a2, w2 = llama_adapter(
        tmp_path / "a2", llama, 22, r=2, alpha=3.0, embed=True, head=True, rslora=True
    )
    out = tmp_path / "merged"
    code, _, err = run_cli(
        [
            "merge",
            "--method",
            method,
            "--base",
            llama,
            "--models",
            a1,
            a2,
            "--out",
            out,
            "--out-format",
            "adapter",
            "--quiet",
            *opts,
        ],
        capsys,
    )
    assert code == 0, err
    files = sorted(p.name for p in out.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6 and not cfg["use_rslora"]
    assert cfg["fan_in_fan_out"] is False and cfg["modules_to_save"] == ["lm_head"]
    assert cfg["target_modules"] == ["q_proj", "v_proj", "embed_tokens"]
    assert cfg["base_model_name_or_path"] == "tiny-llama"
    v0 = r"model\.layers\.0\.self_attn\.v_proj"
    assert cfg["rank_pattern"][v0] == 4 and cfg["alpha_pattern"][v0] == 4
    tensors = load_file(out / "adapter_model.safetensors")
    layer0 = f"{P}model.layers.0.self_attn"
    assert tensors[f"{layer0}.q_proj.lora_A.weight"].shape == (6, 16)
    assert tensors[f"{layer0}.v_proj.lora_B.weight"].shape == (8, 4)
    assert tensors[f"{P}model.embed_tokens.lora_embedding_A"].shape == (6, 50)
    assert f"{P}lm_head.weight" in tensors
    # read back as an adapter: its dense model is the dense merge
    back = open_checkpoint(out, base=llama)
    assert isinstance(back, AdapterCheckpoint)
    params = {"lam": 0.8} if method == "task-arithmetic" else {}
    want = merge(llama, [a1, a2], method, params).state
    for k, v in want.items():
        close(back[k], v, rtol=0, atol=1e-6)
    # and its task vector is Σ w_t Δ_t
    for k in w1:
        close(
            back.delta(k, dtype=F64).reshape(w1[k].shape),
            weight * (w1[k] + w2[k]),
            rtol=1e-6,
            atol=1e-7,
        )


def test_out_format_adapter_is_refused_for_other_methods_and_non_adapters(
    tmp_path, llama, capsys
):
    a1, w1 = llama_adapter(tmp_path / "a1", llama, 31)
    a2, _ = llama_adapter(tmp_path / "a2", llama, 32)
    out = tmp_path / "merged"

    def fails(method: str, *models) -> str:
        code, _, err = run_cli(
            [
                "merge",
                "--method",
                method,
                "--base",
                llama,
                "--models",
                *models,
                "--out",
                out,
                "--out-format",
                "adapter",
            ],
            capsys,
        )
        assert code == 1 and err.count("\n") == 1 and no_output(out)
        return err

    err = fails("ties", a1, a2)
    assert "'ties'" in err and "allowed: average, task-arithmetic" in err
    d1 = dense(llama, w1, tmp_path / "d1.safetensors")
    assert "d1.safetensors is not a LoRA adapter" in fails("average", a1, d1)
    a3, _ = llama_adapter(tmp_path / "a3", llama, 33, modules=("q_proj",))
    err = fails("average", a1, a3)
    assert "v_proj" in err and "same keys" in err
    plan = plan_merge(llama, [a1, a2])
    with pytest.raises(ConfigError, match="allowed: average, task-arithmetic"):
        run_merge(plan, get_method("magnitude"), None, out, out_format="adapter")
    assert no_output(out)
    file_out = tmp_path / "merged.safetensors"
    with pytest.raises(ConfigError, match="an adapter is a directory"):
        run_merge(plan, get_method("average"), None, file_out, out_format="adapter")
    assert no_output(file_out)


def test_compress_reads_adapters_like_merge(tmp_path, llama):
    from npstune.compress import compress, decompress

    a1, _ = llama_adapter(tmp_path / "a1", llama, 51, embed=True)
    a2, _ = llama_adapter(tmp_path / "a2", llama, 52, head=True)
    store = tmp_path / "store"
    m = compress(llama, [a1, a2], store, "magnitude", {"k": 0.3})
    assert [t.name for t in m.tasks] == ["a1", "a2"]
    for task, ad in zip(m.tasks, (a1, a2)):
        dest = tmp_path / f"{task.name}.safetensors"
        got = open_checkpoint(decompress(store, task.name, dest))
        want = merge(llama, [ad], "magnitude", {"k": 0.3}).state
        assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------ mismatches
CASES = {  # defect -> text its error must show
    "missing-key": "model.layers.5.self_attn.q_proj.weight",
    "shape": "(17, 16)",
    "config-rank": "r=8",
    "ab-rank": "rank 3",
    "dora": "DoRA",
    "ia3": "IA3",
}


def _broken(tmp_path: Path, case: str) -> Path:
    """An adapter over the tiny Llama with one defect."""
    g = torch.Generator().manual_seed(40)
    mod = "model.layers.0.self_attn.q_proj"
    a, b = torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g)
    cfg: dict = {}
    if case == "missing-key":
        mod = "model.layers.5.self_attn.q_proj"
    elif case == "shape":
        b = torch.randn(17, 4, generator=g)
    elif case == "config-rank":
        cfg = {"r": 8}
    elif case == "ab-rank":
        b = torch.randn(16, 3, generator=g)
    elif case == "dora":
        cfg = {"use_dora": True}
    elif case == "ia3":
        cfg = {"peft_type": "IA3"}
    tensors = {f"{P}{mod}.lora_A.weight": a, f"{P}{mod}.lora_B.weight": b}
    return write_adapter(tmp_path / f"bad-{case}", tensors, **cfg)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mismatch_is_one_line_naming_adapter_and_key_and_writes_nothing(
    tmp_path, llama, capsys, case
):
    bad = _broken(tmp_path, case)
    good, _ = llama_adapter(tmp_path / "good", llama, 41)
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(
        [
            "merge",
            "--method",
            "task-arithmetic",
            "--base",
            llama,
            "--models",
            good,
            bad,
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert f"bad-{case}" in err and CASES[case] in err, err
    if case in ("missing-key", "shape", "config-rank", "ab-rank"):
        assert "lora_" in err  # names the adapter's tensor key
    if case == "shape":
        assert "(16, 16)" in err  # and the base's shape
    assert no_output(out)


# ------------------------------------------------------------------ peft cross-check
def test_peft_merge_and_unload_gives_the_same_dense_weights(tmp_path, llama):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 2},
        use_rslora=True,
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "ad")
    merged = pm.merge_and_unload().state_dict()
    ck = open_checkpoint(tmp_path / "ad", base=llama)
    for k in ck.keys():
        close(ck[k], merged[k], rtol=3e-7, atol=1e-6)  # peft adds in fp32: 1 ulp
