"""Preference tuning (DPO, IPO, hinge, SimPO, ORPO; full/LoRA/QLoRA) of our checkpoint or an HF Llama folder.

    accelerate launch [--config_file launch/accelerate/X.yaml] launch/dpo.py \
        --config configs/dpo_RECIPE.yaml [section.key=value ...] [--resume auto|PATH]
"""
from __future__ import annotations

import sys

from trainer.cli import run_entry_point
from trainer.dpo.config import DPOConfig
from trainer.dpo.task import run_dpo

if __name__ == "__main__":
    sys.exit(run_entry_point(__doc__, DPOConfig, lambda cfg, resume: run_dpo(cfg, resume=resume)))
