"""Parameter and FLOP counts from a config alone (for MFU and model cards)."""
from __future__ import annotations

from .config import ModelConfig


def _block_params(cfg: ModelConfig) -> int:
    attn = cfg.dim * cfg.n_heads * cfg.head_dim * 2 + cfg.dim * cfg.n_kv_heads * cfg.head_dim * 2  # wq, wo, wk, wv
    ffn = 3 * cfg.dim * cfg.ffn_dim  # w1, w2, w3
    return attn + ffn + 2 * cfg.dim  # + attention_norm, ffn_norm


def count_params(cfg: ModelConfig, exclude_embeddings: bool = False) -> int:
    """Trainable parameters of `Transformer(cfg)`, a tied head counted once.

    exclude_embeddings drops the token embedding table; an untied LM head is a separate matrix and stays.
    """
    body = cfg.n_layers * _block_params(cfg) + cfg.dim  # + final norm
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    embedding = 0 if exclude_embeddings else cfg.vocab_size * cfg.dim
    return body + head + embedding


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM, appendix B).

    N is every weight a token multiplies by: the blocks, the final norm and the LM head (a tied
    head still does its matmul); the embedding table is a lookup and is not counted.
    """
    n = cfg.n_layers * _block_params(cfg) + cfg.dim + cfg.vocab_size * cfg.dim
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return float(6 * n + attention)
