"""Export a training checkpoint (ZeRO shards or plain) as an HF Llama/Qwen2/Mistral folder for transformers.

    python launch/export_hf.py runs/demo/pretrain/checkpoints/step_00000300 exported/demo [--dtype bf16]
    python launch/export_hf.py --adapter runs/demo/sft/adapter exported/demo-sft   # merge a LoRA into its base
"""
from __future__ import annotations

import argparse
import sys

import torch

from trainer.cli import guarded
from trainer.export import export_checkpoint, export_merged

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?",
                        help="a checkpoint folder (OUTPUT/checkpoints/step_XXXXXXXX) or a run folder (its newest); "
                             "with --adapter: the base (checkpoint, run folder or HF folder; default: the "
                             "adapter's own base)")
    parser.add_argument("out", help="output folder, written whole or not at all")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export at OUT (never a folder holding other files, the source "
                             "or the current directory)")
    parser.add_argument("--adapter", help="an SFT run's adapter/ folder (LoRA/QLoRA) to merge into the base")
    parser.add_argument("--tokenizer", help="tokenizer folder to include (default: the run's data.tokenizer, "
                                            "or the adapter's tokenizer)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: fp32)")
    parser.add_argument("--max-shard-size", default=None, help='split safetensors, e.g. "2GB"')
    parser.add_argument("--verbose", action="store_true", help="show the libraries' warnings (hidden by default)")
    args = parser.parse_args()
    from trainer.quiet import set_verbosity

    set_verbosity(args.verbose)
    if args.adapter:
        out = export_merged(args.adapter, args.out, base=args.checkpoint, tokenizer_dir=args.tokenizer,
                            dtype=DTYPES.get(args.dtype), max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite)
        print(f"merged {args.adapter} into {args.checkpoint or 'its base'} -> {out}")
        return 0
    if args.checkpoint is None:
        parser.error("a checkpoint folder is required (or --adapter)")
    out = export_checkpoint(args.checkpoint, args.out, tokenizer_dir=args.tokenizer,
                            dtype=DTYPES.get(args.dtype), max_shard_size=args.max_shard_size,
                            overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
