"""Log-probabilities of labelled tokens without materializing the [tokens x vocab] logits.

A Llama-3 vocabulary (128,256) at 8K tokens makes 4 GB of fp32 logits, plus as much again for
their gradient and for log-softmax's saved output. Here the caller selects the hidden states of
the LABELLED positions first (most SFT and DPO tokens carry no label), and the LM head then runs
over chunks of them inside `torch.utils.checkpoint`: each chunk's logits live only while that
chunk is computed, in forward and again in backward, where they are recomputed. The price is one
extra head matmul per step, except for the summed cross-entropy (causal LM, SFT) through a plain
`nn.Linear` head: there each chunk's gradients are formed during forward (`_GradInForwardCESum`), so
nothing is recomputed, at the cost of holding one weight-sized fp32 gradient from forward to backward.

The head is always CALLED (`head(h_chunk)`), never read (`head.weight @ h`): under DeepSpeed
ZeRO-3 a weight exists only inside its module's forward, which gathers it; under PEFT, LoRA or
QLoRA the module's forward is what applies the adapter or dequantizes.

`train.loss_chunking` chooses:
  auto  chunk when the labelled tokens' fp32 logits would exceed one chunk (`CHUNK_BYTES`, 256 MiB:
        more than 523 labelled tokens at 128K vocab, 2,097 at 32K); below that the plain head over
        the labelled positions is as small and skips the recompute.
  on    always chunk.
  off   the model's own full logits, as before this module existed.

On CUDA, with `liger-kernel` installed, the causal-LM cross-entropy sum goes through Liger's fused
linear cross-entropy instead (`pip install liger-kernel`): it never holds more than a chunk of
logits and needs no recompute. It reads the head's weight directly, so it is skipped under ZeRO-3,
for heads that are not a plain `nn.Linear` (LoRA on the head, QLoRA), and for per-row sums (DPO).
"""
from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LossChunking = Literal["auto", "on", "off"]
CHUNKING_MODES = ("auto", "on", "off")
# One chunk's fp32 logits; backward holds about three such buffers at once (logits, softmax, gradient).
CHUNK_BYTES = 256 * 2**20


def lm_head_of(model: nn.Module) -> nn.Module:
    """The LM head (`output`) under any wrapper we train through: torch.compile, DDP / DeepSpeed /
    Accelerate (`.module`), PEFT (`get_base_model()`), our `PromptTunedModel` (`.output`)."""
    current = model
    for _ in range(16):
        if isinstance(getattr(current, "_orig_mod", None), nn.Module):
            current = current._orig_mod
        elif isinstance(getattr(current, "module", None), nn.Module):
            current = current.module
        elif hasattr(current, "get_base_model"):
            base = current.get_base_model()
            if base is current:
                break
            current = base
        else:
            break
    head = getattr(current, "output", None)
    if not isinstance(head, nn.Module):
        raise TypeError(f"no LM head (`output`) found on {type(model).__name__}")
    return head


def vocab_size_of(head: nn.Module) -> int:
    # `out_features`, not `weight.shape`: a ZeRO-3 weight is an empty placeholder outside forward.
    size = getattr(head, "out_features", None)
    if size is None:
        size = getattr(head.weight, "ds_shape", head.weight.shape)[0]
    return int(size)


def chunk_tokens_for(vocab_size: int, budget_bytes: int | None = None) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay within `budget_bytes` (default `CHUNK_BYTES`)."""
    budget = CHUNK_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (4 * vocab_size))


def use_chunks(chunking: LossChunking, n_tokens: int, vocab_size: int) -> bool:
    if chunking not in CHUNKING_MODES:
        raise ValueError(f"loss_chunking: '{chunking}' is not one of {', '.join(CHUNKING_MODES)}")
    if chunking == "auto":
        return n_tokens > chunk_tokens_for(vocab_size)
    return chunking == "on"


def _zero3(head: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in head.parameters(recurse=True))


def _max_over_ranks(n: int, head: nn.Module, device: torch.device) -> int:
    """Under ZeRO-3 every head call all-gathers its weight, a collective: all ranks must call it equally
    often, in forward and in the backward recompute, whatever their own number of labelled tokens."""
    if not (_zero3(head) and dist.is_available() and dist.is_initialized()):
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _chunk_logps(head: nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V)
    return -F.cross_entropy(logits, labels, reduction="none")  # (n,)


def label_logps(h: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunking: LossChunking = "on",
                *, chunk_tokens: int | None = None) -> torch.Tensor:
    """log p(label) under `head` for each labelled position: h (N, dim), labels (N,) -> (N,) fp32.

    Pass only labelled positions (`h[mask]`, `labels[mask]`). With chunking the head runs over
    `chunk_tokens` positions at a time (default: `CHUNK_BYTES` of fp32 logits) and backward
    recomputes each chunk; gradients reach `h` and the head's parameters as in the plain path.
    """
    n, vocab = h.size(0), vocab_size_of(head)
    n_ref = _max_over_ranks(n, head, h.device)
    if not use_chunks(chunking, n_ref, vocab):
        return _chunk_logps(head, h, labels)
    size = chunk_tokens or chunk_tokens_for(vocab)
    n_chunks = max(1, math.ceil(n_ref / size))
    recompute = torch.is_grad_enabled()
    out = []
    for i in range(n_chunks):
        # Past this rank's own tokens the slices are empty: the call only keeps ZeRO-3 ranks in step.
        h_i, y_i = h[i * size:(i + 1) * size], labels[i * size:(i + 1) * size]
        if recompute:
            out.append(checkpoint(_chunk_logps, head, h_i, y_i, use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(_chunk_logps(head, h_i, y_i))
    return torch.cat(out)  # (N,)


@functools.cache
def _liger_loss_class():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss


def _liger_ce_sum(h: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor | None:
    """Liger's fused linear cross-entropy sum where it applies (see the module docstring), else None."""
    if not h.is_cuda or type(head) is not nn.Linear or head.bias is not None or _zero3(head):
        return None
    loss_class = _liger_loss_class()
    if loss_class is None:
        return None
    weight = head.weight
    if torch.is_autocast_enabled("cuda"):
        # Same precision as the plain path, whose head matmul autocast runs in the low dtype.
        dtype = torch.get_autocast_dtype("cuda")
        h, weight = h.to(dtype), weight.to(dtype)
    else:
        h = h.to(weight.dtype)
    return loss_class(reduction="sum")(weight, h, labels).float()


class _GradInForwardCESum(torch.autograd.Function):
    """Summed cross-entropy of `h @ weight.T` whose gradients are computed chunk by chunk DURING forward: a sum's
    gradient is the same whatever scalar multiplies it later, so backward only scales what forward kept. Each
    chunk's logits live once, for the three matmuls the plain path needs too (logits, grad of h, grad of the
    weight), and none is recomputed. What stays from forward to backward is one weight-sized fp32 gradient and
    one h-sized gradient. Plain torch, every device (Liger's kernel does the same in Triton on CUDA)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] \
            else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.size(0), size):
            h_i, y_i = h[start:start + size], labels[start:start + size]
            logits = (h_i @ weight.t()).float()  # under autocast the matmul runs in its dtype, as head(h) would
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y_i[:, None]).squeeze(1)).sum()
            # d(sum CE)/d(logits) = softmax - one-hot, formed in place in the logits buffer.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(y_i.numel(), device=y_i.device), y_i] -= 1.0
            grad_logits = grad_logits.to(torch.promote_types(h.dtype, weight.dtype)
                                         if not torch.is_autocast_enabled(h.device.type)
                                         else torch.get_autocast_dtype(h.device.type))
            if grad_h is not None:
                grad_h[start:start + size] = (grad_logits @ weight.to(grad_logits.dtype)).to(h.dtype)
            if grad_w is not None:
                grad_w += (grad_logits.t() @ h_i.to(grad_logits.dtype)).float()
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad_out if ctx.has[0] else None  # a 0-dim factor keeps h's dtype
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_h, grad_w, None, None


def _grad_in_forward_ce_sum(h: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                            chunk_tokens: int | None) -> torch.Tensor | None:
    """The CE sum with gradients formed in forward, where it applies: training (grad enabled), a plain
    `nn.Linear` head without bias (it reads the weight; LoRA/QLoRA heads are called instead), not ZeRO-3."""
    if not torch.is_grad_enabled() or type(head) is not nn.Linear or head.bias is not None or _zero3(head):
        return None
    if not (h.requires_grad or head.weight.requires_grad):
        return None
    size = chunk_tokens or chunk_tokens_for(head.out_features)
    return _GradInForwardCESum.apply(h, head.weight, labels, size)


def label_ce_sum(h: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunking: LossChunking = "on",
                 *, chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of labelled positions: h (N, dim), labels (N,); Liger's kernel on CUDA
    when installed and chunking applies, else `-label_logps(...).sum()`."""
    if use_chunks(chunking, h.size(0), vocab_size_of(head)):
        fused = _liger_ce_sum(h, labels, head)
        if fused is None:
            fused = _grad_in_forward_ce_sum(h, labels, head, chunk_tokens)
        if fused is not None:
            return fused
    return -label_logps(h, labels, head, chunking, chunk_tokens=chunk_tokens).sum()
