"""The fine-tuning method applied to our Transformer: full, LoRA, QLoRA (4-bit NF4 base) or prompt tuning, via PEFT."""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.sft.config import LINEAR_MODULES, SFTSection

# Our (Meta) module names <-> HF Llama's, for target_modules given either way and for adapter export.
HF_MODULE_NAMES: dict[str, str] = {
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
}
HF_PARENT: dict[str, str] = {"attention": "self_attn", "feed_forward": "mlp"}


def our_module_name(name: str) -> str | None:
    if name in HF_MODULE_NAMES:
        return name
    return {hf: ours for ours, hf in HF_MODULE_NAMES.items()}.get(name)


def target_modules(section: SFTSection) -> list[str]:
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


def check_method_supported(section: SFTSection, *, deepspeed_stage: int | None, cuda: bool) -> None:
    """Combinations that cannot work are refused before any model is built."""
    if section.method == "qlora":
        from trainer.sft.quantize import check_qlora_available

        check_qlora_available(cuda=cuda)
        if deepspeed_stage == 3:
            raise ValueError("sft.method=qlora with train.deepspeed ZeRO-3 is unsupported: ZeRO-3 partitions "
                             "parameters and cannot shard bitsandbytes 4-bit weights; use ZeRO-2 or no DeepSpeed")
    if section.method == "prompt_tuning" and section.packing:
        raise ValueError("sft.method=prompt_tuning needs sft.packing=false: the virtual tokens are prepended to "
                         "each row, so packed examples would share one prompt")


def apply_method(model: nn.Module, section: SFTSection, *, tokenizer=None, compute_dtype: torch.dtype = torch.float32,
                 base_name: str | None = None) -> nn.Module:
    """The model to train: itself (full), a PEFT LoRA model, LoRA over a 4-bit base, or a prompt-tuned wrapper."""
    method = section.method
    if method == "full":
        return model
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if method == "qlora":
            from trainer.sft.quantize import quantize_linear_layers

            model = quantize_linear_layers(model, compute_dtype=compute_dtype, skip=("output",))
        lora = LoraConfig(r=section.lora.r, lora_alpha=section.lora.alpha, lora_dropout=section.lora.dropout,
                          target_modules=target_modules(section), bias="none")
        peft_model = get_peft_model(model, lora)
        # Set after wrapping: PEFT resets it from the base model, which for our Transformer has no name.
        peft_model.peft_config["default"].base_model_name_or_path = base_name
        return peft_model
    if method == "prompt_tuning":
        from trainer.sft.prompt_tuning import PromptTunedModel

        return PromptTunedModel.create(model, section.prompt_tuning, tokenizer=tokenizer, base_name=base_name)
    raise ValueError(f"sft.method '{method}' is not one of full, lora, qlora, prompt_tuning")
