"""Weight-decay grouping, the warmup + cosine schedule and DeepSpeed "auto" filling."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.config import ConfigError
from trainer.engine import DS_CONFIG_DIR, fill_ds_auto, load_ds_config
from trainer.optim import lr_multiplier, param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.norm_weight = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied


def test_no_decay_on_norms_biases_embeddings():
    model = Toy()
    decay, no_decay = param_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert decay_ids == {id(model.proj.weight)}
    assert no_decay_ids == {id(model.proj.bias), id(model.norm_weight), id(model.emb.weight)}
    assert no_decay["weight_decay"] == 0.0
    decay, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert id(model.emb.weight) in {id(p) for p in decay["params"]}


def test_schedule_shape():
    warmup, total, floor = 10, 110, 0.1
    values = [lr_multiplier(s, warmup, total, floor) for s in range(total + 5)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values[:10], values[1:10]))
    assert all(a >= b for a, b in zip(values[10:total], values[11:total]))
    assert values[60] == pytest.approx(floor + (1 - floor) * 0.5)
    assert values[total] == pytest.approx(floor) and values[-1] == pytest.approx(floor)


@pytest.mark.parametrize("name", sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
def test_every_ds_config_fills_completely(name):
    filled = fill_ds_auto(load_ds_config(name), micro_batch_size=4, grad_accum_steps=2, world_size=2,
                          grad_clip=1.0, precision="bf16", hidden_size=64)
    assert filled["train_batch_size"] == 16
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert "auto" not in str(filled)


def test_unknown_ds_config_named():
    with pytest.raises(ConfigError, match="zero9"):
        load_ds_config("zero9")
