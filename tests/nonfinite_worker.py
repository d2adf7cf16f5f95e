"""Run under a launcher: the loop with NaN injected on chosen micro-batches (tests/test_loop.py)."""
from __future__ import annotations

import sys

import torch

from model_defs import ModelConfig, Transformer
from tests.test_loop import VOCAB, CountingLoader, nan_on
from trainer.config import load_config
from trainer.engine import build_accelerator
from trainer.loop import train

if __name__ == "__main__":
    nan_calls = {int(x) for x in sys.argv[1].split(",")}
    cfg = load_config(None, ["train.max_steps=8", "optim.lr=1e-2", "optim.warmup_steps=2", "logging.progress=false",
                             "logging.tensorboard=false", "train.grad_accum_steps=2", *sys.argv[2:]])
    model_cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB)
    accelerator = build_accelerator(cfg, hidden_size=model_cfg.dim, precision="fp32")
    torch.manual_seed(0)
    train(cfg, accelerator=accelerator, model=Transformer(model_cfg), objective=nan_on(nan_calls),
          train_loader=CountingLoader())
