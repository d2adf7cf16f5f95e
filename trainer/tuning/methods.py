"""The tuning method applied to our Transformer: full, LoRA, QLoRA (4-bit NF4 base) or prompt tuning, via PEFT."""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.tuning.config import LINEAR_MODULES, TuningSection, our_module_name
from trainer.tuning.prompt_tuning import PromptTunedModel
from trainer.tuning.quantize import check_qlora_available, quantize_linear_layers

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def target_modules(section: TuningSection) -> list[str]:
    targets = section.lora.target_modules
    return list(LINEAR_MODULES) if targets == "all-linear" else [our_module_name(t) for t in targets]


def _numel(p: torch.Tensor) -> int:
    # A bitsandbytes 4-bit weight is stored packed (two values per byte); count the values it holds.
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f}%)"


def check_method_supported(section: TuningSection, *, key: str, deepspeed_stage: int | None, cuda: bool) -> None:
    """Combinations that cannot work are refused before any model is built; `key` is the task's section
    name, so the message names the setting the user wrote (`dpo.method`, not another task's)."""
    if section.method == "qlora":
        check_qlora_available(cuda=cuda, key=key)
        if deepspeed_stage == 3:
            raise ValueError(f"{key}.method=qlora with train.deepspeed ZeRO-3 is unsupported: ZeRO-3 partitions "
                             "parameters and cannot shard bitsandbytes 4-bit weights; use ZeRO-2 or no DeepSpeed")
    # Only tasks that pack rows have the switch.
    if section.method == "prompt_tuning" and getattr(section, "packing", False):
        raise ValueError(f"{key}.method=prompt_tuning needs {key}.packing=false: the virtual tokens are prepended to "
                         "each row, so packed examples would share one prompt")


def apply_method(model: nn.Module, section: TuningSection, *, key: str, tokenizer=None,
                 compute_dtype: torch.dtype = torch.float32, base_name: str | None = None,
                 modules_to_save: tuple[str, ...] = ()) -> nn.Module:
    """The model to train: itself (full), a PEFT LoRA model, LoRA over a 4-bit base, or a prompt-tuned wrapper."""
    method = section.method
    if method == "full":
        return model
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if method == "qlora":
            model = quantize_linear_layers(model, compute_dtype=compute_dtype, skip=("output", *modules_to_save))
        lora = LoraConfig(r=section.lora.r, lora_alpha=section.lora.alpha, lora_dropout=section.lora.dropout,
                          target_modules=target_modules(section), bias="none",
                          modules_to_save=list(modules_to_save) or None)
        peft_model = get_peft_model(model, lora)
        # Set after wrapping: PEFT resets it from the base model, which for our Transformer has no name.
        peft_model.peft_config["default"].base_model_name_or_path = base_name
        return peft_model
    if method == "prompt_tuning":
        return PromptTunedModel.create(model, section.prompt_tuning, tokenizer=tokenizer, base_name=base_name)
    raise ValueError(f"{key}.method '{method}' is not one of full, lora, qlora, prompt_tuning")
