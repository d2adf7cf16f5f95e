"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimSection


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Decay matrices only: norms, biases (any 1-D tensor) and, unless asked, embeddings are exempt."""
    embedding_params = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
    }
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # tied embeddings/LM head appear twice
        exempt = param.ndim < 2 or (id(param) in embedding_params and not decay_embeddings)
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class FiniteStepAdamW(torch.optim.AdamW):
    """AdamW that leaves weights AND moments untouched when any gradient is non-finite.

    The guard sits in the optimizer because that is the one call every engine makes at the
    step boundary: plain PyTorch, DDP, and DeepSpeed ZeRO-0, whose fp32 path hands gradients
    straight to it (ZeRO-1/2/3 and fp16 loss scaling detect overflow themselves and then do not
    call it). Setting lr to 0 is not enough: the moments would still take in the gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads and not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            self.skipped_steps += 1
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    # DeepSpeed drops empty groups (e.g. no decayed matrix when only a soft prompt trains), which would
    # leave the LambdaLR with more lambdas than the optimizer has groups.
    groups = [g for g in param_groups(model, cfg.weight_decay, cfg.decay_embeddings) if g["params"]]
    # One fused kernel per step instead of a Python loop over tensors (CPU and CUDA alike).
    return FiniteStepAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=cfg.fused)


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    )
