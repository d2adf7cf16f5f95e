"""Supervised fine-tuning (full, LoRA, QLoRA, prompt tuning) of one of our checkpoints or a local HF Llama folder.

    accelerate launch [--config_file launch/accelerate/X.yaml] launch/sft.py \
        --config configs/sft_RECIPE.yaml [section.key=value ...] [--resume auto|PATH]
"""
from __future__ import annotations

import sys

from trainer.cli import run_entry_point
from trainer.sft.config import SFTConfig
from trainer.sft.task import run_sft

if __name__ == "__main__":
    sys.exit(run_entry_point(__doc__, SFTConfig, lambda cfg, resume: run_sft(cfg, resume=resume)))
