"""Tiny seeded causal LMs for the fast tests: a Llama and a tokenizer, no downloads.

``make_tiny_llama(dir, seed)`` writes an HF directory (config, ``model.safetensors``,
tokenizer with bos/eos/pad/unk and a chat template) of a 2-layer Llama trained a few
AdamW steps on :data:`CORPUS`; the same seed gives the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")

#: A small corpus of whitespace-separated words (questions, answers, plain sentences).
CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the rug",
    "a bird flew over the tree",
    "the sky is blue and the grass is green",
    "q : what color is the sky ? a : blue",
    "q : what color is the grass ? a : green",
    "q : what color is snow ? a : white",
    "q : what sat on the mat ? a : the cat",
    "one plus one is two",
    "one plus two is three",
    "two plus two is four",
    "two plus three is five",
    "the answer is four",
    "the answer is blue",
    "red green blue white black",
    "<user> what is one plus one ? <assistant> two",
    "<user> what color is the sky ? <assistant> blue",
]

#: The chat template of the tiny tokenizer (user turns, then the assistant tag).
CHAT_TEMPLATE = (
    "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_tokenizer(out: Path, corpus: list[str] | None = None):
    """A word-level tokenizer over ``corpus`` (bos prepended), saved into ``out``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in (corpus or CORPUS) for w in line.split()})
    vocab = {t: i for i, t in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A $B",
        special_tokens=[("<bos>", vocab["<bos>"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def tiny_llama_config(vocab_size: int):
    """The 2-layer, 32-wide Llama config of the tests (tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )


def make_tiny_llama(
    out: str | Path, seed: int = 0, steps: int = 30, lr: float = 1e-2
) -> Path:
    """Write a tiny Llama (random init with ``seed``, ``steps`` AdamW steps) to ``out``.

    Returns the HF directory (``AutoModelForCausalLM`` / ``AutoTokenizer`` loadable).
    """
    out = Path(out)
    tok = make_tokenizer(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than the math
    try:
        model = _train(tok, seed, steps, lr)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    return out


def _train(tok, seed: int, steps: int, lr: float):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok)))
    enc = tok([line + " <eos>" for line in CORPUS], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
