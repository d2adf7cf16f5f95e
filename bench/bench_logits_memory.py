"""Peak memory and step time of the LM head + cross-entropy: full logits vs chunked.

The shape that motivates `train.loss_chunking`: a Llama-3 vocabulary (128,256) and 4,096 labelled
tokens, where the full fp32 logits alone are 2.1 GB. One training step is the head's forward,
the summed cross-entropy and backward into the hidden states and the head weight:

  plain    `F.cross_entropy(head(h), labels, reduction="sum")`, the logits of every token at once
  chunked  `trainer.token_logps.label_ce_sum(..., "on")`: chunks of 523 tokens (256 MiB of fp32
           logits), each chunk's gradients formed in forward (no recompute; on CUDA with
           liger-kernel, Liger's fused kernel)

Each contender runs in a child process of its own, in `--rounds` alternating rounds, after an
untimed small warmup step. Peak memory is the child's peak resident set above what it held just
before the timed step (weights, hidden states and labels already allocated), or
`torch.cuda.max_memory_allocated` above the same point on CUDA; the largest tensor autograd saved
for backward (seen through `saved_tensors_hooks`) is reported beside it. Time is wall and process
CPU time of the step (`--timer cpu` ranks by CPU time, which other processes' load does not
inflate; use it with `--threads 1`).

    python bench/bench_logits_memory.py --threads 1 --timer cpu
    python bench/bench_logits_memory.py --device cuda --dim 4096 --tokens 8192

Goal: chunked peak memory <= 0.5x plain, step time <= 1.1x plain. Exit 1 if a contender fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (
    add_round_args,
    emit_result,
    fmt_spread,
    load_summary,
    make_clock,
    round_ratio,
    rss_bytes,
    run_rounds,
    run_worker,
    spread,
    write_json,
)

CONTENDERS = ("plain", "chunked")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--tokens", type=int, default=4096, help="labelled tokens in the micro-batch")
    p.add_argument("--dim", type=int, default=512)
    add_round_args(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall", help="which time the ratio uses")
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch
    import torch.nn.functional as F
    from torch import nn

    from trainer.token_logps import label_ce_sum

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    head = nn.Linear(args.dim, args.vocab, bias=False, device=device)
    h = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device)

    def loss_of(h_, y_):
        if args.worker == "plain":
            return F.cross_entropy(head(h_).float(), y_, reduction="sum")
        return label_ce_sum(h_, y_, head, "on")

    largest = [0]

    def pack(t):
        largest[0] = max(largest[0], t.numel() * t.element_size())
        return t

    loss_of(h[:64], labels[:64]).backward()  # warmup: kernels and thread pools, well below the step's peak
    h.grad = head.weight.grad = None
    now = make_clock("both")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    t0 = now()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(h, labels)
    loss.backward()
    t1 = now()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 - base
    emit_result({"loss": loss.item(), "wall_s": t1[0] - t0[0], "cpu_s": t1[1] - t0[1], "peak_bytes": peak,
                 "largest_saved_bytes": largest[0]})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    passed = ["--vocab", args.vocab, "--tokens", args.tokens, "--dim", args.dim, "--threads", args.threads,
              "--device", args.device]
    per_round, failed = run_rounds(
        list(CONTENDERS), lambda name: run_worker([sys.executable, __file__, "--worker", name, *passed], name,
                                                  cwd=REPO_ROOT),
        args.rounds, describe=lambda res: (f"{res['wall_s']:.2f} s wall, {res['cpu_s']:.2f} s cpu, peak "
                                           f"{res['peak_bytes'] / 2**30:.2f} GiB, largest saved "
                                           f"{res['largest_saved_bytes'] / 2**20:.1f} MiB, loss {res['loss']:.4f}"))
    if failed:
        print(f"error: {', '.join(failed)} failed", file=sys.stderr)
        return 1
    results = {c: [r[c] for r in per_round] for c in CONTENDERS}
    key = "cpu_s" if args.timer == "cpu" else "wall_s"
    summary = {}
    for name, rs in results.items():
        summary[name] = {k: spread([r[k] for r in rs]) for k in ("wall_s", "cpu_s", "peak_bytes")}
        summary[name]["largest_saved_bytes"] = max(r["largest_saved_bytes"] for r in rs)
        summary[name]["load1"] = spread([r["load"]["load1_median"] for r in rs])
    mem_spread = round_ratio(per_round, "chunked", "plain", lambda r: r["peak_bytes"])
    time_spread = round_ratio(per_round, "chunked", "plain", lambda r: r[key])
    losses = [r["loss"] for rs in results.values() for r in rs]
    print(f"\nvocab {args.vocab}, {args.tokens} tokens, dim {args.dim}, {args.device}, threads "
          f"{args.threads or 'default'}; median [min-max] over {args.rounds} rounds")
    for name in CONTENDERS:
        s = summary[name]
        print(f"  {name:8s} step {fmt_spread(s['wall_s'], digits=2)} s wall, {fmt_spread(s['cpu_s'], digits=2)} s cpu, "
              f"peak {fmt_spread(s['peak_bytes'], 2**-30, 2)} GiB, largest saved "
              f"{s['largest_saved_bytes'] / 2**20:.1f} MiB, load {fmt_spread(s['load1'], digits=2)}")
    print(f"  chunked/plain, per round: peak memory {fmt_spread(mem_spread, digits=2, suffix='x')} (goal <= 0.5x), "
          f"step time ({args.timer}) {fmt_spread(time_spread, digits=2, suffix='x')} (goal <= 1.1x); loss spread "
          f"{max(losses) - min(losses):.2e}")
    payload = {"bench": "logits_memory", "args": {k: v for k, v in vars(args).items() if k != "worker"},
               "contenders": summary, "memory_ratio": mem_spread, "time_ratio": time_spread,
               "load": load_summary(per_round), "rounds": per_round}
    print(json.dumps(payload))
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
