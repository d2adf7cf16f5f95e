"""Supervised fine-tuning (full, LoRA, QLoRA, prompt tuning) of one of our checkpoints or a local HF Llama folder.

    accelerate launch [--config_file launch/accelerate/X.yaml] launch/sft.py \
        --config configs/sft_RECIPE.yaml [section.key=value ...] [--resume auto|PATH]
"""
from __future__ import annotations

import sys

from trainer.cli import guarded, run_parser
from trainer.config import load_config
from trainer.sft.config import SFTConfig
from trainer.sft.run import run_sft


def main() -> int:
    args = run_parser(__doc__.splitlines()[1]).parse_args()
    cfg = load_config(args.config, args.overrides, schema=SFTConfig)
    run_sft(cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
