"""Conversion to and from Hugging Face causal-LM checkpoints (config.json + safetensors):
`LlamaForCausalLM`, `Qwen2ForCausalLM` and `MistralForCausalLM`.

The three share one layout (Qwen2 adds q/k/v biases, Mistral a sliding window), and the model
keeps HF's rotate_half RoPE layout, so weights convert by renaming only.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_directory
from .config import ROPE_SCALING_KEYS, ModelConfig
from .model import Transformer

_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_PER_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.q_proj.bias": "attention.wq.bias",
    "self_attn.k_proj.bias": "attention.wk.bias",
    "self_attn.v_proj.bias": "attention.wv.bias",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OUR_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
# Older exports saved RoPE frequencies; they are recomputed from the config.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
_SUPPORTED_ROPE_TYPES = ("default", *ROPE_SCALING_KEYS)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_SAVED_FILE = re.compile(
    r"(generation_)?config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
# Loaded by hf_classifier.py; named here so load_hf_model can turn such a folder away.
CLASSIFIER_ARCHITECTURE = "LlamaForSequenceClassification"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_BIASES = tuple(k for k in _PER_LAYER if k.endswith(".bias"))


# ----------------------------------------------------------------------------- config


def config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
    """ModelConfig from an HF Llama, Qwen2 or Mistral config (a `config.json` dict or a `PretrainedConfig`).

    Anything our model would compute differently (another architecture, Llama biases, per-layer
    windows, an unknown RoPE type, a non-SiLU activation, an odd head_dim) is a ValueError naming the key.
    """
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"config key model_type={model_type!r} is not supported "
                         f"(supported: {', '.join(map(repr, ARCHITECTURES))})")
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if d.get(key, ok) != ok:
            raise ValueError(f"config key {key}={d[key]!r} is not supported (expected {ok!r})")
    sliding_window = None
    if model_type == "mistral":
        sliding_window = d.get("sliding_window")
    elif model_type == "qwen2" and d.get("use_sliding_window"):
        # Qwen2 windows only the layers past max_window_layers; our blocks all attend alike.
        raise ValueError(f"config key use_sliding_window={d['use_sliding_window']!r} is not supported "
                         "(expected false)")
    if d.get("attention_dropout") or 0.0:
        raise ValueError(f"config key attention_dropout={d['attention_dropout']!r} is not supported (expected 0.0)")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise ValueError(f"config key {key} is missing")
    n_heads = d["num_attention_heads"]
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim != d["hidden_size"] // n_heads:
        raise ValueError(f"config key head_dim={head_dim} is not supported (must equal hidden_size // "
                         f"num_attention_heads = {d['hidden_size'] // n_heads})")
    rope_theta, rope_scaling = _rope_from_hf(d)
    fields = dict(
        vocab_size=d["vocab_size"],
        dim=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        ffn_dim=d["intermediate_size"],
        norm_eps=d.get("rms_norm_eps", 1e-6),  # HF's default, not ours
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=d.get("max_position_embeddings", 2048),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=d.get("initializer_range", 0.02),
        family=model_type,
        qkv_bias=model_type == "qwen2",
        sliding_window=sliding_window,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`.
    key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    params = dict(d.get(key) or {})
    rope_theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config key {key}.rope_type={rope_type!r} is not supported "
                         f"(supported: {', '.join(_SUPPORTED_ROPE_TYPES)})")
    partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"config key {key}.partial_rotary_factor={partial!r} is not supported (expected 1.0)")
    if rope_type == "default":
        return rope_theta, None
    if rope_type == "yarn" and params.get("factor") is None and "original_max_position_embeddings" in params:
        params["factor"] = d["max_position_embeddings"] / params["original_max_position_embeddings"]
    required, optional = ROPE_SCALING_KEYS[rope_type]
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"config key {key}.{unknown[0]} is not supported for rope_type {rope_type!r}")
    return rope_theta, {"rope_type": rope_type, **params}


def config_to_hf(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    """config.json contents for the family's `*ForCausalLM`; `extra` adds keys such as bos/eos/pad_token_id.

    RoPE is written as `rope_theta` + `rope_scaling`, which both transformers 4.x and 5.x read.
    """
    d = {
        "architectures": [ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if cfg.family == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    elif cfg.family == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    else:
        d.update(sliding_window=cfg.sliding_window)
    d.update(extra)
    return d


# ----------------------------------------------------------------------------- weights


def state_dict_from_hf(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename an HF Llama/Qwen2/Mistral state dict to ours; unknown or missing keys are a ValueError naming them."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state_dict.items():
        if name.endswith(_IGNORED_HF_SUFFIXES):
            continue
        if name in _TOP_LEVEL:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # a tied checkpoint may still carry a copy; the embedding table is authoritative
            out[_TOP_LEVEL[name]] = tensor
            continue
        m = _HF_LAYER_KEY.fullmatch(name)
        if (m is None or m.group(2) not in _PER_LAYER or int(m.group(1)) >= cfg.n_layers
                or (m.group(2) in _BIASES and not cfg.qkv_bias)):
            raise ValueError(f"unexpected weight {name!r} in an HF {cfg.family} checkpoint with {cfg.n_layers} layers")
        out[f"layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}"] = tensor
    if cfg.tie_embeddings and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    missing = sorted(_expected_keys(cfg) - set(out))
    if missing:
        hf_names = {v: k for k, v in _TOP_LEVEL.items()}
        names = [hf_names.get(k) or _hf_layer_name(k) for k in missing]
        raise ValueError(f"HF checkpoint is missing weight(s): {', '.join(names[:5])}"
                         + (f" (+{len(names) - 5} more)" if len(names) > 5 else ""))
    return out


def state_dict_to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename our state dict to HF names; a tied LM head is left out, as HF saves it."""
    ours_to_hf_top = {v: k for k, v in _TOP_LEVEL.items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        if name in ours_to_hf_top:
            out[ours_to_hf_top[name]] = tensor
            continue
        out[_hf_layer_name(name)] = tensor
    missing = sorted(_expected_keys(cfg) - set(state_dict))
    if missing:
        raise ValueError(f"state dict is missing weight(s): {', '.join(missing[:5])}")
    return out


def _hf_layer_name(name: str) -> str:
    ours_to_hf = {v: k for k, v in _PER_LAYER.items()}
    m = _OUR_LAYER_KEY.fullmatch(name)
    if m is None or m.group(2) not in ours_to_hf:
        raise ValueError(f"unexpected weight {name!r} in a model_defs state dict "
                         "(pass the unwrapped model, not a DDP/compiled wrapper)")
    return f"model.layers.{m.group(1)}.{ours_to_hf[m.group(2)]}"


def _expected_keys(cfg: ModelConfig) -> set[str]:
    keys = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    per_layer = [v for k, v in _PER_LAYER.items() if cfg.qkv_bias or k not in _BIASES]
    keys |= {f"layers.{i}.{k}" for i in range(cfg.n_layers) for k in per_layer}
    return keys


# ----------------------------------------------------------------------------- folders


def load_hf_model(
    folder: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", **overrides: Any
) -> Transformer:
    """A `Transformer` from a local HF Llama/Qwen2/Mistral folder (config.json + single or sharded safetensors).

    dtype None keeps the stored dtype. `overrides` set ModelConfig fields such as attention or
    activation_checkpointing.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found (expected an HF model folder)")
    hf_config = json.loads(config_path.read_text())
    if CLASSIFIER_ARCHITECTURE in (hf_config.get("architectures") or []):
        raise ValueError(f"{folder} holds a {CLASSIFIER_ARCHITECTURE}, not a causal LM; "
                         "load it with model_defs.hf_classifier.load_hf_classifier")
    try:
        cfg = config_from_hf(hf_config, **overrides)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    hf_state = read_safetensors_folder(folder)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    state = state_dict_from_hf(hf_state, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    model.tie_weights()
    model.rope.reset_buffers(device=device)
    return model


def read_safetensors_folder(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    folder = Path(folder)
    index = folder / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: key weight_map is missing or not a mapping")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{folder / shard} (listed in {index}) not found")
            state.update(load_file(folder / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ValueError(f"{index}: weight {missing[0]!r} is not in its listed shard")
        return state
    if (folder / SAFE_SINGLE).is_file():
        return load_file(folder / SAFE_SINGLE)
    raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {folder} (only safetensors checkpoints are read)")


def save_hf_model(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    max_shard_size: int | str | None = None,
    **hf_config_extra: Any,
) -> Path:
    """Write config.json + safetensors (+ index when sharded) that `AutoModelForCausalLM` loads.

    max_shard_size: bytes, or a string like "2GB" / "500MB"; None writes one file. The folder
    is written whole or not at all; an existing `out_dir` is replaced only when it holds nothing
    but an earlier save's files, and refused otherwise. Pass an unwrapped model (not
    DDP/compiled) or its state dict.
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    hf_state = {k: v.detach().to("cpu").contiguous() for k, v in state_dict_to_hf(state, cfg).items()}
    dtype = next(iter(hf_state.values())).dtype
    config = config_to_hf(cfg, torch_dtype=str(dtype).removeprefix("torch."), **hf_config_extra)
    shards = _split_shards(hf_state, _parse_size(max_shard_size))

    out_dir = Path(out_dir)
    # A whole new folder, so an earlier save with another shard count leaves no stale shards.
    with atomic_directory(out_dir, replace=_holds_only_saved_files(out_dir)) as tmp:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            name = SAFE_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in hf_state.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _holds_only_saved_files(folder: Path) -> bool:
    """Replacing such a folder loses nothing that another save would not write again."""
    return folder.is_dir() and all(p.is_file() and _SAVED_FILE.fullmatch(p.name) for p in folder.iterdir())


def _parse_size(size: int | str | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if m is None:
        raise ValueError(f"max_shard_size={size!r} is not a size like '2GB' or '500MB'")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def _split_shards(state: dict[str, torch.Tensor], limit: int | None) -> list[dict[str, torch.Tensor]]:
    if limit is None:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards
