"""A tiny HF BERT encoder, labelled text tasks as data files, and fine-tuned copies.

Everything is made in the test (random init, a hand-written vocab, a few AdamW steps):
no downloads, a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

POS = ["good", "great", "fine", "nice", "happy", "love", "best", "super"]
NEG = ["bad", "awful", "poor", "sad", "hate", "worst", "ugly", "dull"]
FILL = ["the", "a", "movie", "food", "day", "is", "was", "very", "it", "this"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS, *NEG, *FILL]
LABELS = ["negative", "positive"]


def sentiment_rows(n: int, seed: int) -> list[dict[str, object]]:
    """``{"text", "label"}`` rows: the label is the sentiment the text's words carry."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randrange(2)
        words = [rng.choice(POS if y else NEG) for _ in range(2)]
        words += [rng.choice(FILL) for _ in range(rng.randrange(2, 6))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": LABELS[y]})
    return rows


def length_rows(n: int, seed: int) -> list[dict[str, object]]:
    """A second task: is the text short (< 5 words) or long? Labels as indices."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(2, 9)
        rows.append(
            {
                "sentence": " ".join(rng.choice(FILL + POS) for _ in range(k)),
                "y": int(k >= 5),
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_bert(d: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT encoder with its tokenizer, saved as an HF directory."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    t = Tokenizer(
        models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]")
    )
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok = BertTokenizerFast(
        tokenizer_object=t,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def finetune_bert(
    base: Path,
    out: Path,
    rows: list[dict[str, object]],
    text: str,
    label: str,
    names: list[str] | None,
    seed: int,
    steps: int = 30,
) -> tuple[Path, Path]:
    """Fine-tune body + a mean-pool linear head; save the body dir and the head file."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    body = AutoModel.from_pretrained(str(base))
    ys = [names.index(r[label]) if names else int(r[label]) for r in rows]  # type: ignore[arg-type]
    head = torch.nn.Linear(32, 2)
    opt = torch.optim.AdamW([*body.parameters(), *head.parameters()], lr=1e-3)
    enc = tok([str(r[text]) for r in rows], padding=True, return_tensors="pt")
    y = torch.tensor(ys)
    body.train()
    for _ in range(steps):
        h = body(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        ).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        logits = head((h * m).sum(1) / m.sum(1))
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    body.eval()
    body.save_pretrained(out)
    tok.save_pretrained(out)
    head_path = out.parent / f"{out.name}-head.safetensors"
    save_file(
        {
            "weight": head.weight.detach().contiguous(),
            "bias": head.bias.detach().contiguous(),
        },
        str(head_path),
    )
    return out, head_path
