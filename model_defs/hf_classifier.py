"""Conversion to and from HF `LlamaForSequenceClassification` folders (config.json + safetensors).

The trunk converts as a causal LM's does in `hf.py` (`model.*` <-> `body.*`); the head is
`score.weight` under the same name on both sides. There is no `lm_head.weight`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .atomic import atomic_directory
from .classifier import SequenceClassifier
from .config import ModelConfig
from .hf import (
    CLASSIFIER_ARCHITECTURE,
    SAFE_SINGLE,
    config_from_hf,
    config_to_hf,
    read_safetensors_folder,
    state_dict_from_hf,
    state_dict_to_hf,
)

SCORE = "score.weight"


def is_hf_classifier_folder(folder: str | os.PathLike) -> bool:
    """True when `folder/config.json` names `LlamaForSequenceClassification` among its architectures."""
    config_path = Path(folder) / "config.json"
    return config_path.is_file() and _is_classifier_config(json.loads(config_path.read_text()))


def _is_classifier_config(hf_config: dict[str, Any]) -> bool:
    return CLASSIFIER_ARCHITECTURE in (hf_config.get("architectures") or [])


# ----------------------------------------------------------------------------- weights


def _headless(cfg: ModelConfig) -> ModelConfig:
    # hf.py's renames for a tied config neither expect nor write `lm_head.weight`: a trunk without a head.
    return dataclasses.replace(cfg, tie_embeddings=True)


def classifier_state_dict_from_hf(hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename an HF LlamaForSequenceClassification state dict to a `SequenceClassifier`'s."""
    hf_state = dict(hf_state_dict)
    if "lm_head.weight" in hf_state:
        raise ValueError("unexpected weight 'lm_head.weight' in an HF sequence classifier checkpoint")
    score = hf_state.pop(SCORE, None)
    if score is None:
        raise ValueError(f"HF sequence classifier checkpoint is missing weight(s): {SCORE}")
    trunk = state_dict_from_hf(hf_state, _headless(cfg))
    del trunk["output.weight"]  # the tied config's alias of the embedding table, not a weight of ours
    return {**{f"body.{k}": v for k, v in trunk.items()}, SCORE: score}


def classifier_state_dict_to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a `SequenceClassifier` state dict to HF LlamaForSequenceClassification names."""
    trunk = {k.removeprefix("body."): v for k, v in state_dict.items() if k.startswith("body.")}
    unexpected = sorted(k for k in state_dict if not k.startswith("body.") and k != SCORE)
    if unexpected:
        raise ValueError(f"unexpected weight {unexpected[0]!r} in a SequenceClassifier state dict "
                         "(pass the unwrapped model, not a PEFT/DDP/compiled wrapper)")
    if SCORE not in state_dict:
        raise ValueError(f"state dict is missing weight(s): {SCORE}")
    if "tok_embeddings.weight" in trunk:
        trunk["output.weight"] = trunk["tok_embeddings.weight"]  # dropped again by the tied rename
    return {**state_dict_to_hf(trunk, _headless(cfg)), SCORE: state_dict[SCORE]}


# ----------------------------------------------------------------------------- folders


def load_hf_classifier(
    folder: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", **overrides: Any
) -> tuple[SequenceClassifier, dict[str, Any]]:
    """A `SequenceClassifier` from a local HF LlamaForSequenceClassification folder, and its config.json
    dict (id2label, label2id, pad_token_id, ... as stored: id2label keys are strings).

    num_labels is the row count of `score.weight`. dtype None keeps the stored dtype; `overrides`
    set ModelConfig fields, as in `load_hf_model`.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found (expected an HF model folder)")
    hf_config = json.loads(config_path.read_text())
    if not _is_classifier_config(hf_config):
        what = " / ".join(hf_config.get("architectures") or []) or "model whose config.json names no architecture"
        raise ValueError(f"{folder} holds a {what}, not a {CLASSIFIER_ARCHITECTURE}"
                         + ("; load it with model_defs.hf.load_hf_model" if what.endswith("ForCausalLM") else ""))
    try:
        cfg = config_from_hf(hf_config, **overrides)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    hf_state = read_safetensors_folder(folder)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    state = classifier_state_dict_from_hf(hf_state, cfg)
    num_labels = state[SCORE].shape[0]
    id2label = hf_config.get("id2label")
    if id2label is not None and len(id2label) != num_labels:
        raise ValueError(f"{config_path}: id2label has {len(id2label)} labels but {SCORE} has {num_labels} rows")
    with torch.device("meta"):
        model = SequenceClassifier(cfg, num_labels)
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    model.body.rope.reset_buffers(device=device)
    return model, hf_config


def save_hf_classifier(
    model: SequenceClassifier,
    out_dir: str | os.PathLike,
    id2label: dict[int, str] | None = None,
    pad_token_id: int | None = None,
    replace: bool = False,
    **hf_config_extra: Any,
) -> Path:
    """Write config.json + model.safetensors that `AutoModelForSequenceClassification` loads.

    id2label: names for labels 0..num_labels-1 (default LABEL_0, LABEL_1, ... as HF names them).
    pad_token_id: what HF scores by (the last token that is not padding); HF refuses batches of more
    than one row without it. The folder is written whole or not at all; an occupied `out_dir` is
    refused unless `replace`. Pass the unwrapped model (after PEFT `merge_and_unload()`).
    """
    id2label = {i: f"LABEL_{i}" for i in range(model.num_labels)} if id2label is None else dict(id2label)
    if sorted(id2label) != list(range(model.num_labels)):
        raise ValueError(f"id2label keys {sorted(id2label)} must be exactly 0..{model.num_labels - 1} (num_labels)")
    if len(set(id2label.values())) != len(id2label):
        raise ValueError(f"id2label names must be distinct, got {list(id2label.values())}")
    hf_state = {k: v.detach().to("cpu").contiguous()
                for k, v in classifier_state_dict_to_hf(model.state_dict(), model.cfg).items()}
    config = config_to_hf(
        model.cfg,
        architectures=[CLASSIFIER_ARCHITECTURE],
        num_labels=model.num_labels,
        id2label={str(i): name for i, name in sorted(id2label.items())},
        label2id={name: i for i, name in sorted(id2label.items())},
        pad_token_id=pad_token_id,
        torch_dtype=str(hf_state["model.embed_tokens.weight"].dtype).removeprefix("torch."),
        **hf_config_extra,
    )
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, replace=replace) as tmp:
        save_file(hf_state, tmp / SAFE_SINGLE, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
