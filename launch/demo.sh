#!/usr/bin/env bash
# The whole pipeline on a laptop CPU, on data this project generates itself (no downloads):
# demo data -> tokenizer -> token shards -> pretraining -> LoRA SFT (before/after generations)
# -> merged export -> preference tuning on the SFT model's own wrong answers (held-out accuracy before/after)
# -> a reward model on reward pairs (a wrong value, an answer about something else, an answer that runs on)
# -> a comparison report of base, SFT and DPO with the reward model and a pairwise judge (launch/compare.py).
# (No GRPO stage: on this demo it does not raise held-out accuracy; docs/rl.md#figures.)
# Everything lands under runs/demo/ (override with RUN=...). A few minutes on 2 cores.
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

step "4. LoRA SFT of the pretrained model on the demo's instruction chats (assistant tokens only, packed)"
rm -rf "$RUN/sft"
"${LAUNCH[@]}" launch/sft.py --config configs/demo_sft_cpu.yaml \
    model.init_from="$RUN/pretrain" data.tokenizer="$RUN/data/tokenizer" train.output_dir="$RUN/sft" \
    "sft.train_files=[$RUN/data/raw/sft.jsonl]" "sft.val_files=[$RUN/data/raw/sft_eval.jsonl]"

step "5. before / after SFT: the same questions to the pretrained model and to the fine-tuned one"
PROMPTS=(--prompt "What is 18 + 10?" --prompt "Count from 22 to 27."
         --prompt "Which color does Gaimvom like best?" --prompt "What is the age of Vouso?")
echo "-- before (pretrained only)"; python launch/generate.py --model "$RUN/pretrain" "${PROMPTS[@]}" --max-new-tokens 40
echo "-- after (LoRA SFT)";        python launch/generate.py --model "$RUN/sft" "${PROMPTS[@]}" --max-new-tokens 40

step "6. merge the LoRA adapter into the base: a plain HF Llama folder (transformers, vLLM, lm-eval load it)"
python launch/export_hf.py --adapter "$RUN/sft/adapter" "$RUN/sft/model"

step "7. preference tuning (ORPO) on the SFT model's own mistakes: it answers the pair questions, each wrong answer is rejected against the correct one (held-out accuracy before -> after)"
rm -rf "$RUN/onpolicy" "$RUN/dpo"
mkdir -p "$RUN/onpolicy"
for split in dpo dpo_eval; do
    python launch/synthesize.py onpolicy --questions "$RUN/data/raw/$split.jsonl" --reference-key chosen \
        --model "$RUN/sft/model" --out "$RUN/onpolicy/$split" --max-tokens 48 --batch-size 64 --chunk-size 256 \
        --no-progress
done
"${LAUNCH[@]}" launch/dpo.py --config configs/demo_dpo_cpu.yaml \
    model.init_from="$RUN/sft/model" \
    "dpo.train_files=[$RUN/onpolicy/dpo/pairs.jsonl]" "dpo.val_files=[$RUN/onpolicy/dpo_eval/pairs.jsonl]" \
    train.output_dir="$RUN/dpo"

step "8. reward model: a score head on the SFT model's trunk, LoRA, the reward pairs (held-out accuracy before -> after)"
rm -rf "$RUN/reward"
"${LAUNCH[@]}" launch/reward.py --config configs/demo_reward_cpu.yaml \
    model.init_from="$RUN/sft/model" \
    "reward.train_files=[$RUN/data/raw/reward.jsonl]" "reward.val_files=[$RUN/data/raw/reward_eval.jsonl]" \
    train.output_dir="$RUN/reward"

step "9. what each stage did: base -> SFT -> DPO side by side (raw-text facts, sums, chat answers, held-out pairs, judges)"
# Judges on the 95 held-out questions, each stage against the one before: the reward model of stage 8, and
# the SFT model as a pairwise judge (a 1M-parameter judge: it shows the plumbing, not a verdict to trust).
rm -rf "$RUN/compare"
python launch/compare.py "$RUN/pretrain" "$RUN/sft" "$RUN/dpo" --labels base,sft,dpo --out "$RUN/compare" \
    --tasks eval/tasks/demo --pairs "made_up=$RUN/data/raw/dpo_eval.jsonl" \
    --pairs "own_answers=$RUN/onpolicy/dpo_eval/pairs.jsonl" --ifeval eval/prompts/ifeval_demo.jsonl \
    --raw-sample "Durmin lives in" --chat-sample "Where does Durmin live?" --chat-sample "What is 18 + 10?" \
    --judge-prompts "$RUN/data/raw/dpo_eval.jsonl" --judge "$RUN/sft/model" --reward-judge "$RUN/reward" \
    --judge-against previous

step "done: everything is under $RUN (metrics.jsonl, summary.json and tensorboard/ in each stage's folder; $RUN/compare/report.md)"
