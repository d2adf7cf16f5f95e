"""Generate the project's offline demo data: pretraining text, SFT chats and DPO pairs about a made-up world.

    python launch/make_demo_data.py --out data/demo [--seed 0]

Writes pretrain.jsonl / pretrain_eval.jsonl ({"text"}), sft.jsonl / sft_eval.jsonl
({"messages": [...]}), dpo.jsonl / dpo_eval.jsonl ({"prompt", "chosen", "rejected"}) and
world.jsonl (the facts every answer is checked against).
"""
from __future__ import annotations

import argparse
import sys

from trainer.data.cli import run_cli
from trainer.data.demo_corpus import write_demo_data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="everything generated is a function of this seed")
    parser.add_argument("--pretrain-docs", type=int, default=8000, help="pretraining documents")
    parser.add_argument("--people", type=int, default=48, help="invented people in the world")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args()
    counts = write_demo_data(args.out, seed=args.seed, n_pretrain_docs=args.pretrain_docs, n_people=args.people,
                             overwrite=args.overwrite)
    for name, rows in counts.items():
        print(f"{args.out}/{name}: {rows} rows")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
