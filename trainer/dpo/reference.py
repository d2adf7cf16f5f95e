"""Reference-model strategies: where the frozen reference's log-probabilities come from.

  adapter     LoRA/QLoRA only: the policy with its adapters disabled is the base model; no copy at all
  precompute  one pass before training stores every pair's reference log-probs (see `precompute.py`);
              batches carry them and no reference model exists during training
  offload     a frozen copy kept off the accelerator: in CPU memory, streamed in module by module for its
              forward (Accelerate's `cpu_offload`), or under ZeRO-3 sharded with DeepSpeed parameter offload
  resident    a frozen copy on the device (ZeRO-3: sharded across ranks like the policy)

A frozen copy never receives gradients and never enters the optimizer: its parameters are
`requires_grad=False`, it is not handed to the loop, and its forward runs under `no_grad`.
"""
from __future__ import annotations

import copy

import torch
from accelerate import Accelerator, cpu_offload
from torch import nn

from trainer.dpo.objective import sequence_logps
from trainer.engine import zero_stage

Pair = tuple[torch.Tensor, torch.Tensor]


def _chunk(logps: torch.Tensor) -> Pair:
    chosen, rejected = logps.chunk(2)
    return chosen, rejected


class PrecomputedReference:
    """Reference log-probs that the loader attaches to each batch from the precomputed table."""

    name = "precompute"

    def logps(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> Pair:
        if "ref_chosen_logps" not in batch:
            raise ValueError("reference 'precompute': the batch carries no precomputed reference log-probs")
        return batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()


class AdapterReference:
    """The policy's own base weights: its forward with every LoRA adapter disabled (all ranks together under
    ZeRO-3, since each forward gathers the sharded base weights)."""

    name = "adapter"

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    @torch.no_grad()
    def logps(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> Pair:
        peft_model = self.accelerator.unwrap_model(policy)
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError("reference 'adapter' needs a PEFT model (dpo.method lora or qlora)")
        with peft_model.disable_adapter():
            logps, _ = sequence_logps(policy, batch["input_ids"], batch["labels"])
        return _chunk(logps)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached, gradient-free copy of `model` in eval mode (taken before any adapter is added)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def _deepspeed_engine(model: nn.Module, accelerator: Accelerator, offload_params: bool) -> nn.Module:
    """A ZeRO-3 inference engine for a frozen model: sharded like the policy, no optimizer, optionally with its
    parameters offloaded to CPU memory."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    else:
        zero.pop("offload_param", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


class FrozenCopyReference:
    """A separate frozen reference model, resident on the device or offloaded from it."""

    def __init__(self, model: nn.Module, accelerator: Accelerator, *, offload: bool):
        self.name = "offload" if offload else "resident"
        self.accelerator = accelerator
        model.requires_grad_(False).eval()
        if zero_stage(accelerator) == 3:
            self.model = _deepspeed_engine(model, accelerator, offload_params=offload)
        elif offload:
            # Weights stay in CPU memory; each submodule's are copied to the device just for its forward.
            self.model = cpu_offload(model, execution_device=accelerator.device)
        else:
            self.model = model.to(accelerator.device)

    @torch.no_grad()
    def logps(self, policy: nn.Module | None, batch: dict[str, torch.Tensor]) -> Pair:
        with self.accelerator.autocast():
            logps, _ = sequence_logps(self.model, batch["input_ids"], batch["labels"])
        return _chunk(logps)
