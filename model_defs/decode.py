"""Inference-only decoding state for `generate`: fused projections over a static KV cache.

Built per `generate` call from a plain `Transformer` and dropped after it, so the training model's
parameters are never touched and a policy updated between RL rollouts is always read fresh.
What it changes against `Transformer.forward` with a `KVCache`, and why:
  - q/k/v and gate/up are one matmul each over weights concatenated here (2 dispatches per layer
    instead of 5); a column block of a GEMM does not depend on its neighbours, so the logits are
    the same bits as the separate projections' (tests/test_generate.py checks greedy equality);
  - the key mask lives in one preallocated (B, max_len) buffer that a decode step extends in
    place, instead of a (B, 1, T, past + T) mask rebuilt from arange/compare every step;
  - a decode step's largest RoPE position is tracked on the host, so no step syncs to read it;
  - the prompt's final norm and LM head run on its last position only;
  - on CPU (fp32, MKL builds) every projection's weight is packed once for the batch size with
    MKL's packed GEMM (`cblas_sgemm_pack`, exposed as `torch.ops.mkl`; inductor's freezing pass uses
    the same ops): a decode step is a handful of (B, dim) x weight products, and for 8 rows the
    packed LM head (vocab 8192 x 256) took 4.4 ms against `F.linear`'s 7.2 (median of alternating
    rounds on a loaded 2-core machine), with the same bits; the packing is paid once per call.
The math per token is the model's own (its norms, `apply_rotary`, `attend`, the layout rule of
`_padded_layout` for the prompt), so numerics follow the model wherever it changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionLayout, attend, resolve_backend
from .model import Transformer, _padded_layout
from .rope import apply_rotary


def fusable(model: nn.Module) -> bool:
    """True for a plain `Transformer` whose projections are plain, materialized `nn.Linear`s.

    Anything else keeps the module path: a PEFT adapter wraps the projections (their `weight` alone
    would drop the adapter), ZeRO-3 leaves empty parameter shards, prompt tuning prepends embeddings.
    """
    if type(model) is not Transformer:
        return False
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        for lin in (a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3):
            if type(lin) is not nn.Linear or lin.weight.numel() == 0:
                return False
    return type(model.output) is nn.Linear and model.output.weight.numel() > 0


def mkl_packing_available(weight: torch.Tensor) -> bool:
    # Under CPU autocast the module path computes in bf16; the packed fp32 product would not follow it.
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear") and not torch.is_autocast_enabled("cpu"))


class _Projection:
    """x @ weight.T (+ bias); packed for `batch` rows when `pack`. Other row counts (the prompt) take
    `F.linear` on the same weight: `_mkl_linear` falls back to it by itself."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch: int, pack: bool):
        self.weight, self.bias, self.batch = weight.detach(), None if bias is None else bias.detach(), batch
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, batch) if pack else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.batch)


class FusedDecoder:
    """Prefill once, then one token per row per `step`; each returns the last position's logits (B, vocab)."""

    def __init__(self, model: Transformer, attention_mask: torch.Tensor, max_len: int, pack: bool = False):
        cfg = model.cfg
        B, T = attention_mask.shape
        weight = model.output.weight
        if pack and not mkl_packing_available(weight):
            raise ValueError(f"packed projections need fp32 weights on CPU, no autocast and a PyTorch built with "
                             f"MKL (weights: {weight.dtype} on {weight.device})")
        self.model, self.cfg = model, cfg
        self.backend = resolve_backend(cfg.attention, weight.device)
        self.split = (cfg.n_heads + cfg.n_kv_heads, cfg.n_kv_heads)
        self.qkv, self.wo, self.gate_up, self.w2 = [], [], [], []
        for layer in model.layers:
            a, f = layer.attention, layer.feed_forward
            bias = torch.cat([a.wq.bias, a.wk.bias, a.wv.bias]) if a.wq.bias is not None else None
            self.qkv.append(_Projection(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]), bias, B, pack))
            self.wo.append(_Projection(a.wo.weight, a.wo.bias, B, pack))
            self.gate_up.append(_Projection(torch.cat([f.w1.weight, f.w3.weight]), None, B, pack))
            self.w2.append(_Projection(f.w2.weight, None, B, pack))
        self.head = _Projection(weight, model.output.bias, B, pack)
        shape = (B, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(cfg.n_layers)]
        self.keys = torch.zeros(B, max_len, dtype=torch.bool, device=weight.device)
        self.keys[:, :T] = attention_mask
        self.max_len, self.length, self.max_position = max_len, 0, 0

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        _, layout, self.max_position = _padded_layout(B, T, input_ids.device, positions, None, self.keys[:, :T],
                                                      None, self.cfg.sliding_window)
        return self._forward(input_ids, positions, layout)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions (B, 1): the next token of every row and its position."""
        end = self.length + 1
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        self.keys[:, end - 1] = True
        self.max_position += 1  # every row's position grows by one per step
        visible = self.keys[:, :end]
        window = self.cfg.sliding_window
        if window is not None and end > window:
            visible = visible.clone()
            visible[:, :end - window] = False
        return self._forward(tokens, positions, AttentionLayout(mask=visible[:, None, None]))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        m, cfg = self.model, self.cfg
        B, T = ids.shape
        start, end = self.length, self.length + T
        h = m.tok_embeddings(ids)
        cos, sin = m.rope(positions, T, self.max_position)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for i, layer in enumerate(m.layers):
            x = self.qkv[i](layer.attention_norm(h)).view(B, T, -1, cfg.head_dim).transpose(1, 2)
            qk, v = x.split(self.split, dim=1)
            # Queries and keys rotate together: element-wise, so the same bits as one by one, half the operators.
            q, k = apply_rotary(qk, cos, sin).split((cfg.n_heads, cfg.n_kv_heads), dim=1)
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v
            out = attend(q, self.k[i][:, :, :end], self.v[i][:, :, :end], layout, self.backend)
            h = h + self.wo[i](out)
            gate, up = self.gate_up[i](layer.ffn_norm(h)).chunk(2, dim=-1)
            h = h + self.w2[i](F.silu(gate) * up)
        self.length = end
        return self.head(m.norm(h[:, -1]))  # (B, vocab): only the last position is sampled from
