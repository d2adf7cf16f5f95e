"""Where a generation call's time goes: ours (fused decoder), ours through the modules, or transformers.

Builds the model and prompts exactly as `bench_generate.py` does (same flags), warms every side up, then
profiles one `generate` call per side under torch.profiler. Prints per side the operator self time per
generated step split into matmuls (the weight-streaming part every side pays alike), attention,
element-wise / reductions and the rest, then the top operators of `--side`.

    python bench/profile_generate.py --threads 1
    python bench/profile_generate.py --threads 1 --preset tiny --side ours-module
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench_generate import parse_args, prepare
from bench.profile_pretrain import categorize


def main(argv=None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--side", choices=("ours", "ours-module", "transformers"), default="ours",
                     help="whose top operators to list")
    own.add_argument("--top", type=int, default=15)
    mine, rest = own.parse_known_args(argv)
    side, top = mine.side, mine.top
    args = parse_args(rest)  # bench_generate.py's flags: the same model, prompts and settings
    device, dtype, _, _, _, sides = prepare(args)
    print(f"{args.preset}, batch {args.batch}, prompts <= {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{device} {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} thread(s); "
          "operator self time per generated step (prefill included):")
    tables = {}
    for name, fn in sides.items():
        fn()  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        events = prof.key_averages()
        shares = categorize(events)
        total = sum(shares.values())
        parts = ", ".join(f"{k} {1000 * v / args.new_tokens:.2f}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
        print(f"  {name:13s} {1000 * total / args.new_tokens:6.2f} ms: {parts}")
        tables[name] = events
    print(tables[side].table(sort_by="self_cpu_time_total", row_limit=top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
