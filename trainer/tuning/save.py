"""Saving what a tuning run trained: PEFT adapters gathered from every ZeRO stage, in our names and in HF Llama's.

Under ZeRO-3 each rank holds only a slice of every parameter, so reading `state_dict()` on
rank 0 gives empty tensors (the classic empty-adapter-file failure). The adapter's own
parameters, and only those, are gathered with `deepspeed.zero.GatheredParameters` first.

Two folders are written, both loadable with plain `peft.PeftModel.from_pretrained`:
  adapter/     our module names: onto our `Transformer` (what `launch/generate.py` and merging use)
  adapter_hf/  HF Llama names (`model.layers.N.self_attn.q_proj`, ...): onto transformers'
               `LlamaForCausalLM` built from the exported base
"""
from __future__ import annotations

import contextlib
import copy
import json
import re
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

from trainer.atomic import atomic_directory
from trainer.export import export_checkpoint
from trainer.run_folder import is_checkpoint
from trainer.tuning.config import HF_MODULE_NAMES, HF_PARENT

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_OUR_LORA_KEY = re.compile(r"^base_model\.model\.layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])\.(.+)$")


def _zero3_params(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if hasattr(p, "ds_id")]


def gather_trainable_state(accelerator: Accelerator, prepared: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(the unwrapped model, full copies of its trainable parameters on CPU); every rank must call it."""
    # The module itself, not a compiled wrapper whose parameter names carry `_orig_mod.`.
    model = accelerator.unwrap_model(prepared, keep_torch_compile=False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sharded = _zero3_params([p for _, p in named])
    gather = contextlib.nullcontext()
    if sharded:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)
    with gather:
        state = {n: p.detach().to("cpu", torch.float32).clone() for n, p in named}
    empty = [n for n, t in state.items() if t.numel() == 0]
    if empty:
        raise RuntimeError(f"adapter parameter {empty[0]} is empty after gathering; refusing to save it")
    return model, state


def adapter_state(peft_model: nn.Module, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's saved form (adapter name stripped) of the gathered trainable parameters."""
    from peft import get_peft_model_state_dict

    if hasattr(peft_model, "adapter_state"):  # prompt tuning on our model keeps its own table
        return peft_model.adapter_state(trainable)
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model, state_dict=trainable).items()}


def _write_adapter(out_dir: Path, state: dict[str, torch.Tensor], config, tokenizer=None) -> Path:
    """Atomically write adapter_model.safetensors + adapter_config.json (+ the tokenizer)."""
    # The run's own adapter/ and adapter_hf/: a resumed run writes them again.
    with atomic_directory(out_dir, replace=True) as staging:
        save_file(state, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
    return out_dir


def hf_adapter_key(key: str) -> str:
    """'base_model.model.layers.0.attention.wq.lora_A.weight'
    -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'."""
    m = _OUR_LORA_KEY.match(key)
    if m is None:
        raise ValueError(f"adapter key {key} has no HF Llama counterpart")
    layer, parent, module, rest = m.groups()
    return f"base_model.model.model.layers.{layer}.{HF_PARENT[parent]}.{HF_MODULE_NAMES[module]}.{rest}"


def to_hf_adapter(state: dict[str, torch.Tensor], config, base_name: str | None = None):
    """The same LoRA adapter for transformers' LlamaForCausalLM: renamed keys and target_modules."""
    hf_config = copy.deepcopy(config)
    if config.peft_type.value == "LORA":
        hf_state = {hf_adapter_key(k): v for k, v in state.items()}
        hf_config.target_modules = sorted(HF_MODULE_NAMES[m] for m in config.target_modules)
    else:  # prompt tuning: the virtual-token table needs no renaming
        hf_state = dict(state)
    hf_config.task_type = "CAUSAL_LM"
    hf_config.base_model_name_or_path = base_name
    return hf_state, hf_config


def hf_base_of(base_name: str | None) -> str | None:
    """What adapter_hf/ records as its base: the HF folder or Hub id the run started from. One of our
    checkpoints is no model transformers can load, so then none (export the base first)."""
    if not base_name or is_checkpoint(base_name):
        return None
    return base_name


def save_adapters(accelerator: Accelerator, prepared: nn.Module, out_dir: str | Path, tokenizer=None,
                  hf_base_name: str | None = None) -> tuple[Path, Path] | None:
    """Gather the trained adapter and write `out_dir/adapter` and `out_dir/adapter_hf` on rank 0.

    adapter_hf/ records `hf_base_name`, by default the base adapter/ records when transformers can load it.
    """
    model, trainable = gather_trainable_state(accelerator, prepared)
    result = None
    if accelerator.is_main_process:
        config = model.peft_config["default"]
        state = adapter_state(model, trainable)
        if not state:
            raise RuntimeError("the adapter state is empty: no trained adapter parameter was found")
        ours = _write_adapter(Path(out_dir) / "adapter", state, config, tokenizer)
        hf_base = hf_base_name or hf_base_of(config.base_model_name_or_path)
        hf_state, hf_config = to_hf_adapter(state, config, base_name=hf_base)
        theirs = _write_adapter(Path(out_dir) / "adapter_hf", hf_state, hf_config, tokenizer)
        result = (ours, theirs)
    accelerator.wait_for_everyone()
    return result


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: not an adapter folder (no {ADAPTER_CONFIG})")
    return json.loads(path.read_text())


def save_run_outputs(method: str, result, out_dir: str | Path, tokenizer=None) -> None:
    """What a tuning run leaves next to its checkpoints: the adapter (PEFT methods, in our and in HF
    Llama module names) or, for full tuning, the whole model as an HF Llama folder."""
    out_dir = Path(out_dir)
    accelerator = result.accelerator
    if method == "full":
        if accelerator.is_main_process and result.final_checkpoint is not None:
            # The run's own model/: a resumed run exports it again.
            export_checkpoint(result.final_checkpoint, out_dir / "model", tokenizer_dir=out_dir / "tokenizer",
                              overwrite=True)
            accelerator.print(f"tuned model exported to {out_dir / 'model'}")
        accelerator.wait_for_everyone()
        return
    saved = save_adapters(accelerator, result.model, out_dir, tokenizer=tokenizer)
    if saved is not None:
        accelerator.print(f"adapter saved to {saved[0]} (HF module names: {saved[1]})")
