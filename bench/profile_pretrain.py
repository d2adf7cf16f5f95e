"""Where a pretraining step's time goes: ours (trainer/) or transformers' Trainer, under torch.profiler.

Runs one side of `bench_pretrain.py` (same data, shapes and settings) and profiles `--steps` optimizer steps
after `--warmup`, stepping the profiler at every batch request (ours: the loop's loader is wrapped; HF: a
callback at each step end). Prints the time per step split into model arithmetic (matmuls, attention,
element-wise and reductions), the optimizer, the loss and the rest (framework: data, host syncs, metrics),
then the top operators by self CPU time.

    python bench/profile_pretrain.py --side ours --threads 1
    python bench/profile_pretrain.py --side hf --threads 1 --precision bf16
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import bench.bench_pretrain as bp

# Operator name fragments -> the share they are reported under, first match wins.
CATEGORIES = (
    # A step range's own time: everything outside operators (Python, data, metrics, host syncs).
    ("framework (outside operators)", ("ProfilerStep",)),
    ("optimizer", ("Optimizer.", "adam", "_foreach", "clip_grad", "fused_adam")),
    ("attention", ("attention", "flash", "sdpa")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkl_linear")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("element-wise / reductions", ("aten::",)),
)


def categorize(events) -> dict[str, float]:
    """Self CPU seconds per category over every operator event."""
    out: dict[str, float] = defaultdict(float)
    for e in events:
        name = e.key
        category = next((c for c, parts in CATEGORIES if any(p.lower() in name.lower() for p in parts)), "other")
        out[category] += e.self_cpu_time_total / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=("ours", "ours_masked", "hf"), default="ours")
    p.add_argument("--preset", default="debug")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    schedule = torch.profiler.schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = bp.make_data(tmp, documents=1500)
        run = argparse.Namespace(preset=args.preset, seq_len=args.seq_len, batch_size=args.batch_size,
                                 steps=args.warmup + args.steps + 1, warmup=args.warmup, precision=args.precision,
                                 vocab_size=None, side=args.side, data=str(data), out=str(tmp / "run"))
        with prof:
            if args.side == "hf":
                import transformers

                stepper = transformers.TrainerCallback()
                stepper.on_step_end = lambda *a, **k: prof.step()
                original_init = transformers.Trainer.__init__

                def init(self, *a, callbacks=None, **k):
                    original_init(self, *a, callbacks=[*(callbacks or []), stepper], **k)

                transformers.Trainer.__init__ = init
                result = bp.run_hf(run)
            else:
                from trainer import pretrain

                base = pretrain.PretrainLoader

                class Stepped(base):
                    def __iter__(self):
                        for batch in super().__iter__():
                            prof.step()
                            yield batch

                pretrain.PretrainLoader = Stepped
                result = bp.run_ours(run)
    events = prof.key_averages()
    shares = categorize(events)
    total = sum(shares.values())
    wall = result["elapsed"] / result["steps"]
    print(f"{args.side}: {args.preset}, batch {args.batch_size} x {args.seq_len}, {args.precision}, "
          f"{torch.get_num_threads()} thread(s); {wall * 1000:.0f} ms per step (wall, whole run)")
    print(f"profiled operator self time: {1000 * total / args.steps:.0f} ms per step")
    for name, seconds in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {1000 * seconds / args.steps:8.1f} ms/step  {100 * seconds / total:5.1f}%")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
