#!/usr/bin/env bash
# The whole pipeline on a laptop CPU, on data this project generates itself (no downloads):
# demo data -> tokenizer -> token shards -> pretraining -> generation.
# Everything lands under runs/demo/ (override with RUN=...). About ten minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/demo}
# One process on a laptop; the same command takes --config_file launch/accelerate/<profile>.yaml.
LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. demo data: pretraining text, instructions and preference pairs about a made-up world"
python launch/make_demo_data.py --out "$RUN/data/raw" --overwrite

step "2. tokenizer (byte-level BPE) and packed token shards"
python launch/train_tokenizer.py "$RUN/data/raw/pretrain.jsonl" --out "$RUN/data/tokenizer" \
    --vocab-size 1024 --overwrite
python launch/prepare_data.py "$RUN/data/raw/pretrain.jsonl" --tokenizer "$RUN/data/tokenizer" \
    --out "$RUN/data/tokens" --val-fraction 0.05 --overwrite

step "3. pretraining (validation loss and perplexity are printed every 100 steps)"
rm -rf "$RUN/pretrain"
"${LAUNCH[@]}" launch/pretrain.py --config configs/demo_cpu.yaml \
    data.path="$RUN/data/tokens" data.tokenizer="$RUN/data/tokenizer" train.output_dir="$RUN/pretrain"
