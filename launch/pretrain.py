"""Pretrain a LLaMA-style model on packed token shards.

    accelerate launch [--config_file launch/accelerate/X.yaml] launch/pretrain.py \
        --config configs/RECIPE.yaml [section.key=value ...] [--resume auto|PATH]
"""
from __future__ import annotations

import sys

from trainer.cli import guarded, run_parser
from trainer.config import load_config
from trainer.pretrain import run_pretraining


def main() -> int:
    args = run_parser(__doc__.splitlines()[1]).parse_intermixed_args()
    cfg = load_config(args.config, args.overrides)
    run_pretraining(cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
