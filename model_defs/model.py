"""The LLaMA-style decoder: RMSNorm, grouped-query attention with RoPE, SwiGLU, pre-norm blocks.

Module names follow Meta's reference (`tok_embeddings`, `layers[i].attention.wq`, ...), so the
HF conversion in `hf.py` is a rename table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionLayout, attend, document_cu_seqlens, document_mask, resolve_backend, window_band
from .config import ModelConfig
from .kv_cache import KVCache
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics regardless of the activation dtype; the scale is applied after casting back, as HF does.
        return self._norm(x.float()).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: AttentionLayout,
        backend: str,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, k, v)  # (B, Hkv, past + T, hd)
        return self.wo(attend(q, k, v, layout, backend))  # (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention = Attention(cfg, layer_id)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: AttentionLayout,
        backend: str,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, layout, backend, kv_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only LM. `forward` returns logits (B, T, vocab) or final-normed hidden states (B, T, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        resolve_backend(cfg.attention, torch.device("cuda"))  # fail at build time if flash_attn is missing
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the embedding table (again after `load_state_dict(assign=True)`)."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """HF Llama's init: every Linear/Embedding weight ~ N(0, init_std), biases and norms at 0 and 1;
        rebuilds RoPE tables.

        No residual-scaled output projections, so a fresh model matches `LlamaForCausalLM`'s init.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.rope.reset_buffers(device=buffer_device)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        *,
        return_hidden: bool = False,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or hidden states (B, T, dim) with `return_hidden`.

        position_ids (B, T): RoPE positions; without `document_ids`, a new document starts wherever
            they reset to 0. document_ids (B, T): tokens attend only within their run of equal ids
            (positions restart at 0 per run when `position_ids` is not given).
        attention_mask (B, past + T), 1 = real token: hides padded keys (positions then count real
            tokens only, unless given). kv_cache: incremental decoding, as `model_defs.generate` does.
        inputs_embeds (B, T, dim): embeddings to use instead of `input_ids` (soft prompts, prompt tuning).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, dim)
        B, T = h.shape[:2]
        backend = resolve_backend(self.cfg.attention, h.device)
        if attention_mask is not None or kv_cache is not None:
            position_ids, layout, max_position = _padded_layout(B, T, h.device, position_ids, document_ids,
                                                                attention_mask, kv_cache, self.cfg.sliding_window)
        else:
            position_ids, layout, max_position = _packed_layout(B, T, h.device, position_ids, document_ids, backend,
                                                                self.cfg.sliding_window)

        cos, sin = self.rope(position_ids, T, max_position)  # (B|1, 1, T, head_dim)
        # Cast once for all layers to the dtype q/k will have (the autocast dtype under autocast).
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        cos, sin = cos.to(dtype), sin.to(dtype)
        recompute = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h = checkpoint(layer, h, cos, sin, layout, backend, use_reentrant=False)
            else:
                h = layer(h, cos, sin, layout, backend, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        h = self.norm(h)
        return h if return_hidden else self.output(h)  # (B, T, dim) | (B, T, vocab)


def _packed_layout(
    B: int, T: int, device: torch.device, position_ids: torch.Tensor | None, document_ids: torch.Tensor | None,
    backend: str,
    window: int | None = None,
) -> tuple[torch.Tensor | None, AttentionLayout, int]:
    """Training path: plain causal rows, or packed documents that must not see each other.

    A sliding `window` shorter than the row adds a band to the mask (flash_attn takes it as `window_size`).
    """
    window = window if window is not None and window < T else None
    if position_ids is None and document_ids is None:
        if window is None:
            return None, AttentionLayout(), T - 1  # the mask-free fast path
        if backend == "flash_attn":
            return None, AttentionLayout(window=window), T - 1
        return None, AttentionLayout(mask=window_band(T, T, 0, window, device)[None, None]), T - 1
    for name, t in (("position_ids", position_ids), ("document_ids", document_ids)):
        if t is not None and t.shape != (B, T):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, T)} like the input tokens")
    if document_ids is not None:
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    else:
        starts = position_ids == 0
        starts[:, 0] = True
    runs = starts.cumsum(dim=1)  # (B, T) run index; runs of equal ids are one document
    if position_ids is None:
        idx = torch.arange(T, device=device).expand(B, T)
        position_ids = idx - torch.where(starts, idx, 0).cummax(dim=1).values  # offset within the document
    # One host sync for both facts this forward needs.
    packed, max_position = torch.stack([(runs[:, -1] > 1).any().long(), position_ids.max()]).tolist()
    if backend == "flash_attn":
        if not packed:
            return position_ids, AttentionLayout(window=window), max_position
        cu_seqlens, max_seqlen = document_cu_seqlens(runs)
        return position_ids, AttentionLayout(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=window), max_position
    if not packed:
        mask = None if window is None else window_band(T, T, 0, window, device)[None, None]
        return position_ids, AttentionLayout(mask=mask), max_position
    mask = document_mask(runs)
    if window is not None:
        mask = mask & window_band(T, T, 0, window, device)
    return position_ids, AttentionLayout(mask=mask), max_position


def _padded_layout(
    B: int,
    T: int,
    device: torch.device,
    position_ids: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    kv_cache: KVCache | None,
    window: int | None = None,
) -> tuple[torch.Tensor, AttentionLayout, int]:
    """Decoding path: causal over [cache + new tokens], hiding padded keys and keys outside the `window`.

    Left padding keeps each row's real tokens contiguous, so cache slots are as far apart as positions.
    """
    past = kv_cache.length if kv_cache is not None else 0
    if document_ids is not None:
        raise ValueError("document_ids cannot be combined with attention_mask/kv_cache")
    if attention_mask is None:
        attention_mask = torch.ones(B, past + T, dtype=torch.bool, device=device)
    if attention_mask.shape != (B, past + T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)} "
                         "(cached + new positions)")
    if position_ids is None:
        if past:
            raise ValueError("position_ids are required when decoding with a non-empty kv_cache")
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # real tokens count from 0
    q_abs = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
    k_abs = torch.arange(past + T, device=device)[None, :]  # (1, past + T)
    visible = attention_mask.bool()[:, None, :] & (k_abs <= q_abs)  # (B, T, past + T)
    if window is not None:
        visible = visible & (q_abs - k_abs < window)
    # A padded query attends to itself: a fully masked row would make NaNs that leak through V.
    visible = visible | (k_abs == q_abs)
    return position_ids, AttentionLayout(mask=visible[:, None]), int(position_ids.max())
