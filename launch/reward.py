"""Train a reward model (Bradley-Terry on preference pairs) on one of our checkpoints or an HF Llama folder.

    accelerate launch [--config_file launch/accelerate/X.yaml] launch/reward.py \
        --config configs/reward_RECIPE.yaml [section.key=value ...] [--resume auto|PATH]
"""
from __future__ import annotations

import sys

from trainer.cli import run_entry_point
from trainer.reward.config import RewardConfig
from trainer.reward.task import run_reward

if __name__ == "__main__":
    sys.exit(run_entry_point(__doc__, RewardConfig, lambda cfg, resume: run_reward(cfg, resume=resume)))
