"""Score a JSONL of responses with a reward model or any sequence classifier.

    python launch/score.py --model runs/reward --input rows.jsonl --output scored.jsonl
    python launch/score.py --model runs/classify/model --input texts.jsonl --output labelled.jsonl --device cuda --bf16

--model: a reward/classify run folder (its model/, else its newest checkpoint), one of its checkpoints,
or an HF LlamaForSequenceClassification folder. Rows: {"prompt": str | messages, "response": str},
{"messages": [..., assistant turn]} or {"text": str} (see trainer/score.py). Chat rows are rendered as
reward training renders a pair. Each output row is the input row plus, for a one-label model, its score
under --field; for a multi-label classifier, the argmax label's name and every label's logit. The output
appears only once complete; a bad row stops the run, naming file:line, unless --skip-bad-rows.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from trainer.cli import guarded


class RowsPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} rows/s" if task.speed else "- rows/s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a reward/classify run folder, one of its checkpoints, or an HF "
                             "LlamaForSequenceClassification folder")
    parser.add_argument("--input", required=True, help="rows to score (.jsonl, .json, .jsonl.gz)")
    parser.add_argument("--output", required=True, help="JSONL file to write (the input rows plus their scores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model folder's, else the run's)")
    parser.add_argument("--chat-template", default="auto", choices=["auto", "llama3", "chatml"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=None,
                        help="tokens scored per row (default: the run's data.seq_len, else 1024)")
    parser.add_argument("--max-prompt-len", type=int, default=None,
                        help="prompt tokens kept, its end (default: the run's reward.max_prompt_len, else half "
                             "of --max-len); longer rows are cut as reward training cuts them")
    parser.add_argument("--field", default="score", help="output field of a one-label model's score")
    parser.add_argument("--label-field", default="label", help="output field of a classifier's predicted label")
    parser.add_argument("--scores-field", default="scores", help="output field of a classifier's {label: logit}")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="run the model in bfloat16 (for GPUs)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from trainer.data.tokenizer import load_tokenizer
    from trainer.score import (ScoreReport, check_output, find_classifier, length_limits, load_scoring_model,
                               read_score_rows, score_sequences, scored_rows, tokenize_score_rows,
                               write_jsonl_atomic)

    check_output(args.input, args.output, args.overwrite)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else None
    if device is None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    source = find_classifier(args.model)
    max_len, max_prompt_len = length_limits(source, args.max_len, args.max_prompt_len)
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else source.tokenizer
    if tokenizer_dir is None:
        raise FileNotFoundError(f"{args.model}: no tokenizer found beside the model; pass --tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)

    report = ScoreReport()
    fields = [args.field] if source.num_labels == 1 else [args.label_field, args.scores_field]
    rows = read_score_rows(args.input, skip_bad_rows=args.skip_bad_rows, output_fields=fields, report=report)
    seqs = tokenize_score_rows(tokenizer, rows, max_len=max_len, max_prompt_len=max_prompt_len,
                               chat_template=args.chat_template, report=report)

    model = load_scoring_model(source, device, torch.bfloat16 if args.bf16 else torch.float32)
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    console = Console(stderr=True)
    started = time.perf_counter()
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), RowsPerSecond(), TimeRemainingColumn(),
                  console=console, disable=args.no_progress) as progress:
        task = progress.add_task("scoring", total=len(seqs))
        logits = score_sequences(model, seqs, batch_size=args.batch_size, pad_id=pad_id,
                                 advance=lambda n: progress.advance(task, n))
    seconds = time.perf_counter() - started
    write_jsonl_atomic(args.output, scored_rows(rows, logits, source.id2label, field_name=args.field,
                                                label_field=args.label_field, scores_field=args.scores_field))

    rate = len(rows) / max(seconds, 1e-9)
    summary = [f"scored {len(rows)} rows in {seconds:.1f}s ({rate:.1f} rows/s) -> {args.output}"]
    if report.truncated:
        summary.append(f"{report.truncated} cut to --max-len {max_len} / --max-prompt-len {max_prompt_len}")
    if report.skipped:
        summary.append(f"{report.skipped} bad rows skipped (e.g. {report.examples[0]})")
    print(" | ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
