"""Train a fastText quality classifier from good and bad examples, for the `quality_classifier` step.

    python launch/train_quality_classifier.py --positive good.jsonl --negative bad.jsonl --out models/quality

Examples: .jsonl rows (`--text-field`, default text) or plain text, one example per line; several files
per side allowed. A held-out split (--valid-fraction) is kept out of training; its precision and recall of
the positive class at --threshold are printed and saved with the model (classifier.json). The output
folder appears only when complete and is never replaced.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import guarded  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positive", nargs="+", required=True, help="files of good examples")
    parser.add_argument("--negative", nargs="+", required=True, help="files of bad examples")
    parser.add_argument("--out", required=True, help="model folder to create")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--valid-fraction", type=float, default=0.2)
    parser.add_argument("--threshold", type=float, default=0.5, help="default keep threshold of the step")
    parser.add_argument("--epoch", type=int, default=25)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--word-ngrams", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from model_defs.atomic import atomic_directory, refuse_occupied
    from datapipe.quality import read_examples, train

    refuse_occupied(args.out)
    positive = [t for f in args.positive for t in read_examples(f, args.text_field)]
    negative = [t for f in args.negative for t in read_examples(f, args.text_field)]
    with atomic_directory(args.out) as staging:
        held = train(positive, negative, staging, valid_fraction=args.valid_fraction, threshold=args.threshold,
                     epoch=args.epoch, lr=args.lr, word_ngrams=args.word_ngrams, dim=args.dim, seed=args.seed)
    print(f"trained on {len(positive)} positive / {len(negative)} negative examples "
          f"({args.valid_fraction:.0%} held out); model: {args.out}")
    print(f"held-out at threshold {held.threshold}: precision {held.precision:.3f}  recall {held.recall:.3f}  "
          f"F1 {held.f1:.3f}  accuracy {held.accuracy:.3f}  ({held.positives} positive, {held.negatives} negative)")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
