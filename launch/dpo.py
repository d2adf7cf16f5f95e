"""Preference tuning (DPO, IPO, hinge, SimPO, ORPO; full/LoRA/QLoRA) of our checkpoint or an HF Llama folder.

    accelerate launch [--config_file launch/accelerate/X.yaml] launch/dpo.py \
        --config configs/dpo_RECIPE.yaml [section.key=value ...] [--resume auto|PATH]
"""
from __future__ import annotations

import sys

from trainer.cli import guarded, run_parser
from trainer.config import load_config
from trainer.dpo.config import DPOConfig
from trainer.dpo.run import run_dpo


def main() -> int:
    args = run_parser(__doc__.splitlines()[1]).parse_args()
    cfg = load_config(args.config, args.overrides, schema=DPOConfig)
    run_dpo(cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
