"""Pretrain a LLaMA-style model on packed token shards.

    accelerate launch [--config_file launch/accelerate/X.yaml] launch/pretrain.py \
        --config configs/RECIPE.yaml [section.key=value ...] [--resume auto|PATH]
"""
from __future__ import annotations

import sys

from trainer.cli import run_entry_point
from trainer.config import RunConfig
from trainer.pretrain import run_pretraining

if __name__ == "__main__":
    sys.exit(run_entry_point(__doc__, RunConfig, lambda cfg, resume: run_pretraining(cfg, resume=resume)))
