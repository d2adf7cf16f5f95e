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
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench_generate import build, parse_args, prompts, run_ours, run_theirs
from bench.profile_pretrain import categorize


def main(argv=None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--side", choices=("ours", "ours-module", "transformers"), default="ours",
                     help="whose top operators to list")
    own.add_argument("--top", type=int, default=15)
    mine, rest = own.parse_known_args(argv)
    side, top = mine.side, mine.top
    args = parse_args(rest)  # bench_generate.py's flags: the same model, prompts and settings
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    with tempfile.TemporaryDirectory(prefix="profile-generate-") as tmp:
        cfg, ours, theirs = build(args, Path(tmp) / "model", device, dtype)
    ids, mask = prompts(args, cfg.vocab_size, device)
    sides = {"ours": lambda: run_ours(ours, ids, mask, args, 0),
             "ours-module": lambda: run_ours(ours, ids, mask, args, 0, fused=False),
             "transformers": lambda: run_theirs(theirs, ids, mask, args, 0)}
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
