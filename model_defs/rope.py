"""Rotary position embeddings with HF's scalings (linear, dynamic NTK, llama3, yarn).

Frequencies follow transformers' `ROPE_INIT_FUNCTIONS` operation for operation, so logits
match `LlamaForCausalLM` at fp32 tolerance. The rotation uses HF's `rotate_half` layout
(first half of the head dim paired with the second half), which is the layout HF
checkpoints' q/k weights are stored in, so conversion needs no permutation.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig

# Tables are built lazily up to this length and grown on demand, so a 128k-context preset
# does not pay for a 128k table before it sees a long sequence.
_INITIAL_TABLE_LEN = 8192


def _default_inv_freq(base: float | torch.Tensor, dim: int, device: torch.device | None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def rope_inv_freq(
    cfg: ModelConfig, seq_len: torch.Tensor | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,), attention_scaling) for `cfg`; `seq_len` only matters for dynamic scaling."""
    dim, base, scaling = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "default":
        return _default_inv_freq(base, dim, device), 1.0
    factor = scaling["factor"]
    if rope_type == "linear":
        return _default_inv_freq(base, dim, device) / factor, 1.0
    if rope_type == "dynamic":
        return _dynamic_inv_freq(cfg, seq_len, device), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(cfg, device), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(cfg, device)
    raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported")


def _dynamic_inv_freq(cfg: ModelConfig, seq_len: torch.Tensor | None, device: torch.device | None) -> torch.Tensor:
    factor, dim, max_len = cfg.rope_scaling["factor"], cfg.head_dim, cfg.max_seq_len
    if seq_len is None:
        length: float | torch.Tensor = max_len
    else:
        # A tensor, as in HF's forward-time update, so the base is computed in the same fp32 arithmetic.
        length = torch.maximum(seq_len, torch.tensor(max_len, dtype=seq_len.dtype, device=seq_len.device))
    base = cfg.rope_theta * ((factor * length / max_len) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(base, dim, device)


def _llama3_inv_freq(cfg: ModelConfig, device: torch.device | None) -> torch.Tensor:
    s = cfg.rope_scaling
    inv_freq = _default_inv_freq(cfg.rope_theta, cfg.head_dim, device)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(cfg: ModelConfig, device: torch.device | None) -> tuple[torch.Tensor, float]:
    s, dim, base = cfg.rope_scaling, cfg.head_dim, cfg.rope_theta
    factor = s["factor"]
    original_len = s["original_max_position_embeddings"]

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions[..., None].float() * inv_freq  # (..., head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., head_dim)
    return emb.cos() * scaling, emb.sin() * scaling


class RotaryEmbedding(nn.Module):
    """cos/sin tables as non-persistent fp32 buffers, grown when a longer position is seen."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.dynamic = bool(cfg.rope_scaling) and cfg.rope_scaling["rope_type"] == "dynamic"
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_buffers(min(cfg.max_seq_len, _INITIAL_TABLE_LEN))

    def reset_buffers(self, length: int | None = None, device: torch.device | str | None = None) -> None:
        """(Re)build the tables, e.g. after `to_empty()` from the meta device."""
        length = length or max(int(self.cos.shape[0]), 1)
        device = device if device is not None else self.cos.device
        if torch.device(device).type == "meta":
            self.cos = torch.empty(length, self.cfg.head_dim, device="meta")
            self.sin = torch.empty(length, self.cfg.head_dim, device="meta")
            return
        inv_freq, scaling = rope_inv_freq(self.cfg, device=device)
        self.cos, self.sin = _cos_sin(torch.arange(length, device=device), inv_freq, scaling)

    def forward(
        self, position_ids: torch.Tensor | None, seq_len: int, max_position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin broadcastable to (B, H, T, head_dim), in fp32.

        position_ids: (B, T) or None for 0..seq_len-1; max_position: the largest position present.
        """
        if self.dynamic and max_position + 1 > self.cfg.max_seq_len:
            # NTK base depends on the longest position of this forward (as HF's dynamic update does on a fresh model).
            positions = position_ids if position_ids is not None else torch.arange(seq_len, device=self.cos.device)
            inv_freq = _dynamic_inv_freq(
                self.cfg, torch.tensor(max_position + 1, device=positions.device), positions.device
            )
            cos, sin = _cos_sin(positions, inv_freq, 1.0)
        else:
            if max_position >= self.cos.shape[0]:
                self.reset_buffers(max(max_position + 1, 2 * self.cos.shape[0]))
            if position_ids is None:
                cos, sin = self.cos[:seq_len], self.sin[:seq_len]  # (T, head_dim)
            else:
                cos, sin = self.cos[position_ids], self.sin[position_ids]  # (B, T, head_dim)
        if cos.dim() == 2:
            return cos[None, None], sin[None, None]  # (1, 1, T, head_dim)
        return cos[:, None], sin[:, None]  # (B, 1, T, head_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, head_dim); cos/sin cast to x's dtype as HF does."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
