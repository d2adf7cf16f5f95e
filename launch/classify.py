"""Fine-tune a text classifier ({text, label} rows: JSONL, CSV or TSV) on our checkpoint or an HF Llama folder.

    accelerate launch [--config_file launch/accelerate/X.yaml] launch/classify.py \
        --config configs/classify_RECIPE.yaml [section.key=value ...] [--resume auto|PATH]
"""
from __future__ import annotations

import sys

from trainer.classify.config import ClassifyConfig
from trainer.classify.task import run_classify
from trainer.cli import run_entry_point

if __name__ == "__main__":
    sys.exit(run_entry_point(__doc__, ClassifyConfig, lambda cfg, resume: run_classify(cfg, resume=resume)))
