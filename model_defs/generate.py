"""Batched autoregressive generation with a KV cache, for left-padded prompts."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .decode import FusedDecoder, fusable, mkl_packing_available
from .kv_cache import KVCache
from .model import Transformer

# Packing reads every weight once more than the decode steps do; below this many steps it does not pay.
PACK_MIN_NEW_TOKENS = 4
# Where the fused decoder is the default: measured faster on CPU (bench/README.md "Generation"). Elsewhere
# it is unmeasured and its concatenated weights cost a transient copy of the projections, so fused=True opts in.
FUSED_BY_DEFAULT = ("cpu",)
# Steps between the host syncs that ask whether every row has stopped: on an accelerator a sync stalls the
# queue, so up to k-1 steps past the last stop are computed and cut off; on CPU a sync costs nothing.
STOP_CHECK_EVERY = {"cpu": 1}
STOP_CHECK_EVERY_ACCELERATOR = 8


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
    fused: bool | None = None,
    pack: bool | None = None,
) -> torch.Tensor:
    """Continue each prompt row; returns (B, T_prompt + n_new) with n_new <= max_new_tokens.

    Prompts are left-padded (attention_mask 0 on padding); positions come from the mask, so a
    padded row yields the same tokens as that row alone. A row that emits a stop token is
    finished and gets `pad_token_id` afterwards; generation ends early once every row is finished.

    With `use_cache`, a plain `Transformer` on CPU decodes through `FusedDecoder` (fused and, for fp32,
    MKL-packed projections; the same tokens); `fused=True/False` chooses on any device, `pack` the
    packing (default: on CPU fp32 from PACK_MIN_NEW_TOKENS new tokens). Wrapped models (PEFT, ZeRO-3
    shards, prompt tuning) always take the module path with `KVCache`. `use_cache=False` recomputes
    the whole sequence every step: the reference.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if fused and not (use_cache and fusable(model)):
        raise ValueError("fused=True needs use_cache and a plain Transformer with plain nn.Linear projections")
    B, T = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    _check_left_padded(mask)

    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T); padding sits at 0 and is masked anyway
    if fused is None:
        fused = device.type in FUSED_BY_DEFAULT and fusable(model)
    if use_cache and fused:
        if pack is None:
            pack = max_new_tokens >= PACK_MIN_NEW_TOKENS and mkl_packing_available(model.output.weight)
        forward = _fused_forward(model, input_ids, mask, positions, T + max_new_tokens, pack)
    else:
        forward = _module_forward(model, input_ids, mask, positions, T + max_new_tokens, use_cache)
    # Filled in place: the per-step torch.cat of the token, mask and position rows copied them whole each step.
    tokens = torch.full((B, T + max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=device)
    tokens[:, :T] = input_ids
    stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    finished_at = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)  # step of a row's stop token
    check_every = STOP_CHECK_EVERY.get(device.type, STOP_CHECK_EVERY_ACCELERATOR)
    logits = forward(None)
    for step in range(max_new_tokens):
        next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        # What the model reads: finished rows' padding may lie outside the vocabulary, so feed id 0 there.
        fed = next_token.masked_fill(finished, 0)
        tokens[:, T + step] = next_token.masked_fill(finished, pad_token_id)
        if len(stop):
            stops_now = torch.isin(next_token, stop) & ~finished
            finished_at.masked_fill_(stops_now, step)
            finished |= stops_now
            # The only host sync of the loop, and only when stop tokens can end rows.
            due = (step + 1) % check_every == 0 or step + 1 == max_new_tokens
            if due and bool(finished.all()):
                return tokens[:, :T + int(finished_at.max()) + 1]
        if step + 1 < max_new_tokens:
            logits = forward(fed[:, None])
    return tokens


def _fused_forward(model: Transformer, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                   max_len: int, pack: bool):
    """forward(None) runs the prompt, forward(next (B, 1)) one step; both return next-token logits (B, vocab)."""
    decoder = FusedDecoder(model, mask, max_len, pack=pack)
    last = positions[:, -1:]

    def forward(fed: torch.Tensor | None) -> torch.Tensor:
        nonlocal last
        if fed is None:
            return decoder.prefill(input_ids, positions)
        last = last + 1
        return decoder.step(fed, last)
    return forward


def _module_forward(model: Transformer, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                    max_len: int, use_cache: bool):
    """The same contract over `model.forward`: with a `KVCache`, or recomputing the whole sequence (the reference)."""
    B = input_ids.shape[0]
    cache = None
    if use_cache:
        cache = KVCache(model.cfg, B, max_len, dtype=next(model.parameters()).dtype, device=input_ids.device)
    state = {"fed": input_ids, "mask": mask, "positions": positions}

    def forward(fed: torch.Tensor | None) -> torch.Tensor:
        s = state
        if fed is not None:
            s["fed"] = torch.cat([s["fed"], fed], dim=1)
            s["mask"] = torch.cat([s["mask"], torch.ones_like(fed, dtype=torch.bool)], dim=1)
            s["positions"] = torch.cat([s["positions"], s["positions"][:, -1:] + 1], dim=1)
        if cache is not None and fed is not None:
            hidden = model(fed, position_ids=s["positions"][:, -1:], attention_mask=s["mask"], kv_cache=cache,
                           return_hidden=True)
        else:
            hidden = model(s["fed"], position_ids=s["positions"], attention_mask=s["mask"], kv_cache=cache,
                           return_hidden=True)
        return model.output(hidden[:, -1])  # (B, vocab): only the last position is needed
    return forward
