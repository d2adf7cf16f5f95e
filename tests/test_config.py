"""Config layering, validation that reports every problem with its key and origin."""
from __future__ import annotations

import pytest

from trainer.config import ConfigError, RunConfig, load_config, save_resolved


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_yaml_cli(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 50\n  micro_batch_size: 4\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(path, ["train.max_steps=7", "optim.betas=[0.8, 0.9]"])
    assert cfg.train.max_steps == 7  # CLI beats YAML
    assert cfg.train.micro_batch_size == 4  # YAML beats defaults
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.grad_accum_steps == RunConfig().train.grad_accum_steps  # defaults


def test_all_problems_reported_at_once_with_origin_and_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  max_stpes: 50\n  micro_batch_size: -1\noptim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["logging.log_evry=3"])
    lines = str(err.value).splitlines()
    assert len(lines) == 4, lines
    text = str(err.value)
    assert f"{path}: train: unknown key 'max_stpes' (did you mean 'max_steps'?)" in text
    assert f"{path}: train.micro_batch_size:" in text
    assert f"{path}: optim.lr:" in text
    assert "command line: logging: unknown key 'log_evry' (did you mean 'log_every'?)" in text


def test_unknown_section_and_model_field(tmp_path):
    path = write(tmp_path, "trian:\n  max_steps: 1\nmodel:\n  n_layer: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "unknown key 'trian' (did you mean 'train'?)" in text
    assert "unknown key 'n_layer' (did you mean 'n_layers'?)" in text


def test_model_fields_pass_through(tmp_path):
    cfg = load_config(None, ["model.preset=tiny", "model.n_layers=3", "model.attention=eager"])
    assert cfg.model.overrides() == {"n_layers": 3, "attention": "eager"}


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=3", "model.dim=32"])
    path = save_resolved(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg
