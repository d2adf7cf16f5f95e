"""Perplexity of a model on held-out token shards, over every window once (no sampling)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from trainer.objectives import token_cross_entropy


@torch.no_grad()
def shard_perplexity(model: nn.Module, shards_dir: str | Path, seq_len: int, batch_size: int = 8,
                     max_batches: int | None = None, document_masking: bool = True,
                     device: str | torch.device = "cpu") -> dict[str, float]:
    """Token-weighted loss and perplexity over the ordered windows of one split folder."""
    from trainer.data.shards import PretrainLoader, TokenShards

    shards = TokenShards(shards_dir)
    cfg = getattr(model, "cfg", None)
    needed = max(shards.vocab_size, shards.max_token_id + 1)
    if cfg is not None and cfg.vocab_size < needed:
        raise ValueError(f"{shards_dir}: tokens made with a {shards.vocab_size}-token tokenizer (ids up to "
                         f"{shards.max_token_id}) but the model's vocabulary is {cfg.vocab_size}: not this model's data")
    loader = PretrainLoader(shards, batch_size=batch_size, seq_len=seq_len, shuffle=False, validation=True)
    model.eval().to(device)
    loss_sum, tokens = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        kwargs = ({"position_ids": batch["position_ids"].to(device), "document_ids": batch["document_ids"].to(device)}
                  if document_masking else {})
        logits = model(batch["input_ids"].to(device), **kwargs)
        batch_loss, batch_tokens = token_cross_entropy(logits, batch["labels"].to(device))
        loss_sum += batch_loss.item()
        tokens += int(batch_tokens)
    if tokens == 0:
        raise ValueError(f"{shards_dir}: no complete window of {seq_len + 1} tokens to evaluate")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
