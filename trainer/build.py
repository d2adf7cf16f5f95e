"""Turn a validated config into the model it describes."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from model_defs import ModelConfig, Transformer
from trainer.config import ConfigError, RunConfig


def model_config_from(cfg: RunConfig) -> ModelConfig:
    overrides = cfg.model.overrides()
    if cfg.train.activation_checkpointing:
        overrides["activation_checkpointing"] = True
    overrides.setdefault("max_seq_len", max(cfg.data.seq_len, _preset_len(cfg)))
    if cfg.model.init_from:
        from model_defs.hf import config_from_hf_folder

        base = config_from_hf_folder(cfg.model.init_from)
        try:
            return ModelConfig.from_dict({**base.to_dict(), **overrides})
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None
    try:
        return ModelConfig.from_preset(cfg.model.preset, **overrides)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def _preset_len(cfg: RunConfig) -> int:
    from model_defs.config import PRESETS

    return PRESETS.get(cfg.model.preset or "", {}).get("max_seq_len", 0)


def build_model(cfg: RunConfig, model_cfg: ModelConfig) -> nn.Module:
    """Random init from the preset, or the weights of a local HF Llama folder."""
    if cfg.model.init_from:
        from model_defs.hf import load_hf_model

        path = Path(cfg.model.init_from)
        if not path.is_dir():
            raise FileNotFoundError(f"model.init_from: {path} is not a folder")
        return load_hf_model(path, config=model_cfg)
    return Transformer(model_cfg)
