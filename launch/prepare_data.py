"""Tokenize text into packed token shards for pretraining (OUT/train, OUT/val).

    python launch/prepare_data.py --tokenizer tokenizers/mine --out data/mine corpus.txt more.jsonl

Inputs: .txt/.md (one document per blank-line separated block; see --text-mode),
.jsonl/.json[.gz] (one JSON object per line, text in --text-field), .parquet, or a folder
written by datasets' save_to_disk. Each document becomes BOS + tokens + EOS.
"""
from __future__ import annotations

import argparse
import sys

from trainer.data.cli import run_cli
from trainer.data.sources import TEXT_MODES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="text/jsonl/parquet files or save_to_disk folders")
    parser.add_argument("--tokenizer", required=True, help="HF-format tokenizer folder")
    parser.add_argument("--out", required=True, help="output folder; gets train/ and val/ with shards + index.json")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for val/")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    parser.add_argument("--num-proc", type=int, default=None, help="tokenizer processes")
    parser.add_argument("--text-field", default="text", help="field/column holding the text (jsonl, parquet, datasets)")
    parser.add_argument("--text-mode", choices=TEXT_MODES, default="paragraph",
                        help="plain text files: paragraph = blank-line separated blocks, line = one per line, "
                             "file = whole file")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000,
                        help="start a new shard once one holds this many tokens (cut at document ends)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) malformed rows instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args()

    from trainer.data.prepare import prepare_data, print_report

    report = prepare_data(args.inputs, args.tokenizer, args.out, val_fraction=args.val_fraction,
                          num_proc=args.num_proc, text_field=args.text_field, shard_tokens=args.shard_tokens,
                          skip_bad_rows=args.skip_bad_rows, seed=args.seed, text_mode=args.text_mode,
                          overwrite=args.overwrite)
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
