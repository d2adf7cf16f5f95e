"""Turn a validated config into the model it describes."""
from __future__ import annotations

from torch import nn

from model_defs import ModelConfig, Transformer
from model_defs.config import PRESETS
from trainer.config import ConfigError, RunConfig
from trainer.export import load_pretrained, source_model_config


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    """Round the tokenizer's vocabulary up so the embedding and LM-head matmuls stay well aligned."""
    return multiple * ((vocab_size + multiple - 1) // multiple)


def model_config_from(cfg: RunConfig, data_vocab_size: int | None = None) -> ModelConfig:
    """The preset (or the `init_from` model's own shape) with the recipe's field overrides.

    A fresh model takes its vocabulary from the data's tokenizer (padded) unless the recipe sets one.
    """
    overrides = cfg.model.overrides()
    if data_vocab_size is not None and not cfg.model.init_from:
        overrides.setdefault("vocab_size", padded_vocab(data_vocab_size))
    if cfg.train.activation_checkpointing:
        overrides["activation_checkpointing"] = True
    try:
        if cfg.model.init_from:
            return source_model_config(cfg.model.init_from, **overrides)
        preset_len = PRESETS.get(cfg.model.preset or "", {}).get("max_seq_len", 0)
        overrides.setdefault("max_seq_len", max(cfg.data.seq_len, preset_len))
        return ModelConfig.from_preset(cfg.model.preset, **overrides)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None


def build_model(cfg: RunConfig, model_cfg: ModelConfig) -> nn.Module:
    """Random init from the preset, or the weights of one of our checkpoints / a local HF Llama folder."""
    if cfg.model.init_from:
        return load_pretrained(cfg.model.init_from, **cfg.model.overrides(),
                               **({"activation_checkpointing": True} if cfg.train.activation_checkpointing else {}))
    return Transformer(model_cfg)
