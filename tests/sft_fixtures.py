"""Tiny tokenizer, data and model builders shared by the chat/SFT tests."""
from __future__ import annotations

import json
from pathlib import Path

from model_defs import ModelConfig, Transformer

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def demo_rows(kind: str, n_pretrain_docs: int = 200) -> list[dict]:
    from trainer.data.demo_corpus import build_demo_data

    return build_demo_data(n_pretrain_docs=n_pretrain_docs)[kind]


def make_tokenizer(folder: Path, vocab_size: int = 400):
    """A byte-level BPE tokenizer with the project's special tokens, trained on demo text."""
    from trainer.data.tokenizer import train_tokenizer

    text = write_jsonl(folder / "text.jsonl", demo_rows("pretrain"))
    return train_tokenizer([text], folder / "tokenizer", vocab_size=vocab_size, overwrite=True)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> Transformer:
    import torch

    torch.manual_seed(seed)
    shape = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256, attention="sdpa")
    shape.update(overrides)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=vocab_size, **shape))
