"""The one attention function and the per-forward layout it needs (causal, masked, or varlen).

Backends:
  sdpa        `F.scaled_dot_product_attention`; with no packing and no padding it is called with
              `is_causal=True` and no mask, which keeps the fused (flash / memory-efficient) kernels.
  eager       explicit softmax(QK^T)V in fp32 softmax; the numerical reference.
  flash_attn  `flash_attn_func` / `flash_attn_varlen_func` (CUDA, fp16/bf16 only); packed documents
              become varlen segments via `cu_seqlens`.
  auto        flash_attn on CUDA when the package imports, else sdpa.
Packed documents never attend across a boundary: sdpa/eager get a block-diagonal causal mask.
A sliding window (Mistral) is a band in that mask, and flash_attn's `window_size` (dense and varlen).
Generation passes an explicit padding + cache mask; that always runs through sdpa (or eager).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, device: torch.device) -> str:
    """The concrete backend for `requested` on `device`; errors when flash_attn cannot run."""
    if requested == "auto":
        return "flash_attn" if device.type == "cuda" and flash_attn_available() else "sdpa"
    if requested == "flash_attn":
        if not flash_attn_available():
            raise ValueError("attention='flash_attn' but the flash_attn package is not importable; "
                             "install it (pip install flash-attn) or set attention='sdpa'")
        if device.type != "cuda":
            raise ValueError(f"attention='flash_attn' needs CUDA tensors, got device {device}; set attention='sdpa'")
    return requested


@dataclass
class AttentionLayout:
    """Who may attend to whom in one forward.

    mask: bool (B, 1, Tq, Tk), True = may attend; None means plain causal over the row.
    cu_seqlens / max_seqlen: document segments over the flattened (B*T) tokens, for flash varlen.
    window: flash_attn only (the mask carries it elsewhere): a query sees at most this many keys, itself included.
    """

    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    window: int | None = None


def window_band(Tq: int, Tk: int, past: int, window: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) bool, True where key j is among the `window` latest keys of query i (at position past + i)."""
    q = torch.arange(past, past + Tq, device=device)[:, None]
    k = torch.arange(Tk, device=device)[None, :]
    return (k <= q) & (q - k < window)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, T, T) from per-token document ids (B, T)."""
    T = document_ids.shape[1]
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return (same_doc & causal)[:, None]


def document_cu_seqlens(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Segment starts over the flattened batch (int32, n_segments+1) and the longest segment."""
    B, T = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]  # every row also starts a segment
    idx = torch.nonzero(starts.flatten(), as_tuple=True)[0]
    cu = torch.cat([idx, torch.tensor([B * T], device=idx.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv*n_rep, T, D), each kv head serving n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, backend: str) -> torch.Tensor:
    """q: (B, H, Tq, D), k/v: (B, Hkv, Tk, D) -> (B, Tq, H*D)."""
    B, H, Tq, D = q.shape
    if backend == "flash_attn" and layout.mask is None:
        out = _flash(q, k, v, layout)  # (B, Tq, H, D)
    elif backend == "eager":
        out = _eager(q, k, v, layout.mask).transpose(1, 2)
    else:
        out = _sdpa(q, k, v, layout.mask).transpose(1, 2)
    return out.reshape(B, Tq, H * D)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    if mask is None:
        if n_rep > 1 and _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=True)
    if n_rep > 1 and _SDPA_HAS_GQA:
        # Decoding passes a mask every step; repeating K/V would copy the whole cache per layer per token.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5  # (B, H, Tq, Tk)
    if mask is None:
        Tq, Tk = scores.shape[-2:]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)  # (B, H, Tq, D)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention='flash_attn' needs fp16/bf16 activations, got {q.dtype}; "
                         "use autocast or a half-precision model, or attention='sdpa'")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D)
    # flash_attn's window counts keys left of the query; ours counts the query too.
    window_size = (-1, -1) if layout.window is None else (layout.window - 1, 0)
    if layout.cu_seqlens is None:
        return flash_attn_func(q, k, v, causal=True, window_size=window_size)
    B, T = q.shape[:2]
    flat = [t.reshape(B * T, *t.shape[2:]) for t in (q, k, v)]  # (B*T, H, D)
    out = flash_attn_varlen_func(
        *flat, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen, causal=True,
        window_size=window_size,
    )
    return out.view(B, T, *out.shape[1:])
