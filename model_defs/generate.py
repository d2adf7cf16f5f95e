"""Batched autoregressive generation with a KV cache, for left-padded prompts."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .kv_cache import KVCache
from .model import Transformer


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Next token per row from logits (B, V): greedy at temperature 0, else top-k / nucleus sampling.

    `generator` may be one generator per row: each row then draws from its own stream, so a row's
    tokens do not depend on which other rows share its batch (reproducible per item)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the tokens ranked above it already reach top_p; the top token always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if isinstance(generator, Sequence):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
        return torch.cat([torch.multinomial(probs[i:i + 1], num_samples=1, generator=g)[0]
                          for i, g in enumerate(generator)])
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_left_padded(mask: torch.Tensor) -> None:
    if not bool(mask.any(dim=1).all()):
        raise ValueError("attention_mask has a row with no real tokens")
    # Left padding: once a row turns real it stays real.
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must be left-padded (zeros only before the first real token)")


@torch.no_grad()
def generate(
    model: Transformer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue each prompt row; returns (B, T_prompt + n_new) with n_new <= max_new_tokens.

    Prompts are left-padded (attention_mask 0 on padding); positions come from the mask, so a
    padded row yields the same tokens as that row alone. A row that emits a stop token is
    finished and gets `pad_token_id` afterwards; generation ends early once every row is finished.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    B, T = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    _check_left_padded(mask)

    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T); padding sits at 0 and is masked anyway
    tokens = input_ids
    # What the model reads: finished rows' padding may lie outside the vocabulary, so feed id 0 there.
    fed = input_ids
    stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache = None
    if use_cache:
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.cfg, B, T + max_new_tokens, dtype=dtype, device=device)

    for step in range(max_new_tokens):
        if cache is not None and step > 0:
            hidden = model(fed[:, -1:], position_ids=positions[:, -1:], attention_mask=mask, kv_cache=cache,
                           return_hidden=True)
        else:
            hidden = model(fed, position_ids=positions, attention_mask=mask, kv_cache=cache, return_hidden=True)
        logits = model.output(hidden[:, -1])  # (B, vocab): only the last position is needed
        next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        fed = torch.cat([fed, next_token.masked_fill(finished, 0)[:, None]], dim=1)
        next_token = next_token.masked_fill(finished, pad_token_id)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        finished |= torch.isin(next_token, stop)
        if bool(finished.all()):
            break
    return tokens
