"""Train a byte-level BPE or SentencePiece tokenizer and save it in Hugging Face format.

    python launch/train_tokenizer.py --kind bpe --vocab-size 8192 --out tokenizers/mine corpus.txt more.jsonl

Inputs: .txt/.md (one document per blank-line separated block; see --text-mode),
.jsonl/.json[.gz] (one JSON object per line, text in --text-field), .parquet, or a folder
written by datasets' save_to_disk.
"""
from __future__ import annotations

import argparse
import sys

from trainer.data.cli import run_cli
from trainer.data.sources import TEXT_MODES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="text/jsonl/parquet files or save_to_disk folders")
    parser.add_argument("--out", required=True, help="output folder (HF format; AutoTokenizer.from_pretrained loads it)")
    parser.add_argument("--kind", choices=("bpe", "sentencepiece"), default="bpe",
                        help="bpe: byte-level BPE (tokenizers); sentencepiece: SentencePiece BPE with byte fallback")
    parser.add_argument("--vocab-size", type=int, default=32000, help="entries including the special tokens")
    parser.add_argument("--text-field", default="text", help="field/column holding the text (jsonl, parquet, datasets)")
    parser.add_argument("--text-mode", choices=TEXT_MODES, default="paragraph",
                        help="plain text files: paragraph = blank-line separated blocks, line = one per line, "
                             "file = whole file")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) malformed rows instead of failing")
    parser.add_argument("--num-proc", type=int, default=None, help="processes for reading inputs")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args()

    from trainer.data.tokenizer import train_tokenizer

    tok = train_tokenizer(args.inputs, args.out, kind=args.kind, vocab_size=args.vocab_size,
                          text_field=args.text_field, text_mode=args.text_mode, skip_bad_rows=args.skip_bad_rows,
                          num_proc=args.num_proc, overwrite=args.overwrite)
    short = f" (asked for {args.vocab_size}; the corpus has no more merges to learn)" if len(tok) < args.vocab_size else ""
    print(f"saved {args.kind} tokenizer with {len(tok)} tokens{short} to {args.out} "
          f"(bos {tok.bos_token_id}, eos {tok.eos_token_id}, pad {tok.pad_token_id})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
