"""Online RL (GRPO) of one of our checkpoints or an HF Llama folder, with Python reward functions.

    accelerate launch [--config_file launch/accelerate/X.yaml] launch/rl.py \
        --config configs/rl_RECIPE.yaml [section.key=value ...] [--resume auto|PATH]
"""
from __future__ import annotations

import sys

from trainer.cli import run_entry_point
from trainer.rl.config import RLConfig
from trainer.rl.task import run_rl

if __name__ == "__main__":
    sys.exit(run_entry_point(__doc__, RLConfig, lambda cfg, resume: run_rl(cfg, resume=resume)))
