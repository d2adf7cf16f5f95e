"""PPO's critic: a scalar head on the policy's own trunk, trained jointly with it.

Why a head and not a separate critic model: the rollout already runs the policy's forward over every
completion for the old log-probs, and the update runs it again; a head reads the same hidden states, so
values cost one Linear, no second model, optimizer or ZeRO engine. It is a submodule of the policy
(`value_head`), so the loop's checkpoints hold it and resume restores it like any other weight; under
LoRA/QLoRA it is a PEFT `modules_to_save` module, trained in full beside the adapter.

The policy's exported outputs leave it out (an HF Llama folder has no place for it): the run writes it
next to them as `value_head/value_head.safetensors`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from trainer.atomic import atomic_directory

VALUE_HEAD = "value_head"
VALUE_HEAD_DIR = "value_head"  # the run folder's value_head/value_head.safetensors


def add_value_head(model: nn.Module) -> None:
    """A dim -> 1 bias-free head on a plain Transformer, zero-initialized: before any update every state is
    worth 0, so the first advantages are the plain returns rather than a random head's noise."""
    if hasattr(model, VALUE_HEAD):
        raise ValueError(f"the policy already has a '{VALUE_HEAD}' module")
    head = nn.Linear(model.cfg.dim, 1, bias=False)
    nn.init.zeros_(head.weight)
    setattr(model, VALUE_HEAD, head.to(device=model.output.weight.device, dtype=model.output.weight.dtype))


def value_head_of(model: nn.Module) -> nn.Module:
    """The value head under any wrapper the loop trains through (torch.compile, DDP / DeepSpeed / Accelerate,
    PEFT); under PEFT it is the `modules_to_save` wrapper, which runs the trained copy."""
    current = model
    for _ in range(16):
        head = current._modules.get(VALUE_HEAD)
        if head is not None:
            return head
        if isinstance(getattr(current, "_orig_mod", None), nn.Module):
            current = current._orig_mod
        elif isinstance(getattr(current, "module", None), nn.Module):
            current = current.module
        elif hasattr(current, "get_base_model") and current.get_base_model() is not current:
            current = current.get_base_model()
        else:
            break
    raise TypeError("rl.algorithm ppo needs the policy's value head (none found on the model)")


def split_value_head(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the policy's weights, the value head's) of a state dict, by key."""
    head = {k: v for k, v in state.items() if VALUE_HEAD in k.split(".")}
    return {k: v for k, v in state.items() if k not in head}, head


def save_value_head(state: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """`out_dir/value_head/value_head.safetensors` as the single key `weight` (1, dim), written whole or not
    at all; the run's own folder, so a resumed run writes it again."""
    if len(state) != 1:
        raise ValueError(f"expected one value head weight, found {sorted(state) or 'none'}")
    weight = next(iter(state.values())).detach().to("cpu", torch.float32).contiguous()
    with atomic_directory(out_dir / VALUE_HEAD_DIR, replace=True) as staging:
        save_file({"weight": weight}, str(staging / "value_head.safetensors"), metadata={"format": "pt"})
    return out_dir / VALUE_HEAD_DIR
