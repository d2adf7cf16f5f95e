"""Evaluate a model: perplexity on token shards, BLEU/ROUGE of predictions, lm-eval tasks.

    python launch/evaluate.py --model runs/demo/pretrain/checkpoints/step_00000300 \
        --shards runs/demo/data/tokens/val --seq-len 128
    python launch/evaluate.py --predictions preds.jsonl          # rows {"prediction": .., "reference": ..}
    python launch/evaluate.py --model out/hf --lm-eval-tasks hellaswag --limit 100   # needs .[eval]

--model is anything launch/generate.py takes: a run folder, a checkpoint, an HF Llama folder or an adapter.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.cli import guarded


def read_predictions(path: Path) -> tuple[list[str], list[str]]:
    predictions, references = [], []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prediction", "reference")):
                raise ValueError(f"{path}:{line_no}: needs string fields 'prediction' and 'reference'")
            predictions.append(row["prediction"])
            references.append(row["reference"])
    return predictions, references


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a run folder, one of our checkpoints, an HF Llama folder or an adapter")
    parser.add_argument("--shards", help="a token-shard split folder (prepare_data's OUT/val) for perplexity")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--predictions", help="JSONL of prediction/reference pairs for BLEU and ROUGE")
    parser.add_argument("--lm-eval-tasks", help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args()
    if not (args.shards or args.predictions or args.lm_eval_tasks):
        parser.error("nothing to evaluate: give --shards, --predictions or --lm-eval-tasks")
    if (args.shards or args.lm_eval_tasks) and not args.model:
        parser.error("--shards and --lm-eval-tasks need --model")
    results: dict = {}
    if args.shards:
        from eval.perplexity import shard_perplexity
        from trainer.export import load_model

        model = load_model(args.model)
        results["perplexity"] = shard_perplexity(model, args.shards, args.seq_len, args.batch_size, args.max_batches)
    if args.predictions:
        from eval.text_metrics import bleu, rouge

        predictions, references = read_predictions(Path(args.predictions))
        results["bleu"] = bleu(predictions, references)
        results["rouge"] = rouge(predictions, references)
    if args.lm_eval_tasks:
        from eval.lm_eval_adapter import run_lm_eval

        results["lm_eval"] = run_lm_eval(args.model, args.lm_eval_tasks.split(","), args.batch_size, limit=args.limit)
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
