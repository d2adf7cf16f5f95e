"""Pretraining throughput, MFU and peak memory: our trainer vs transformers' Trainer + LlamaForCausalLM.

Same shapes (ours converted to an HF LlamaConfig), same token windows, batch, optimizer
settings and precision. Each side runs in its own fresh process (so peak memory is its
own), in `--rounds` rounds alternating the order; reported per side are the median
[min-max] over rounds of tokens/s, MFU and peak memory, per round the ratios ours/HF, and
the machine's load during every run. A side that fails makes the bench exit non-zero.
Throughput is the time between the end of step `--warmup` and the end of the last step,
measured the same way on both sides (a clock reading once per step), on the wall clock or, with
`--timer cpu`, on the process's CPU time (what a shared machine's load does not inflate).

The `*_compiled` sides run the same with `torch.compile` (ours: `train.compile=true`; the Trainer:
its own `torch_compile=True`). Each compiled run starts with an empty inductor cache and compiles in
its own process (`TORCHINDUCTOR_COMPILE_THREADS=1`, so CPU time counts the compile), and every side
also reports its time to the last step from the start of the run (model build and compile included):
what a bench-sized run pays before compiling can amortize.

    python bench/bench_pretrain.py                          # debug preset, CPU fp32
    python bench/bench_pretrain.py --threads 1 --timer cpu --only ours hf ours_compiled hf_compiled
    python bench/bench_pretrain.py --precision bf16 --preset llama3.2-1b --seq-len 2048 --vocab-size 128256  # GPU
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

# Same work as HF: plain causal attention over each window. "masked" also keeps attention inside
# each packed document (what our recipes do by default), which HF's Trainer does not offer.
SIDES = {"ours": "ours (trainer/)", "ours_masked": "ours, document masking", "hf": "HF Trainer",
         "ours_compiled": "ours, train.compile", "hf_compiled": "HF Trainer, torch_compile"}
# The compiled sides are opt-in: each costs a compile per round, and the Trainer's `torch_compile` side
# compiles no graph inside this bench's worker yet (it fails, by the check below, rather than report
# eager figures as compiled; docs/limitations.md).
DEFAULT_SIDES = ("ours", "ours_masked", "hf")
# Each side's ratio is over the Trainer run the same way (compiled over compiled) when the bench has it.
PEERS = {"ours": ("hf",), "ours_masked": ("hf",), "ours_compiled": ("hf_compiled", "hf")}
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import (
    add_round_args,
    clocked,
    contender_spreads,
    emit_result,
    finish,
    fmt_spread,
    load_summary,
    make_clock,
    round_ratio,
    run_rounds,
    run_worker,
    write_json,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps not timed")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="model vocabulary (default: the tokenizer's 2048, padded); e.g. 128256 for Llama-3's")
    p.add_argument("--documents", type=int, default=4000, help="demo-corpus documents to tokenize")
    p.add_argument("--only", nargs="*", choices=tuple(SIDES), default=None, help=f"contenders (default: {' '.join(DEFAULT_SIDES)})")
    add_round_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads in each run")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall clock, or the process's CPU time (steady under a shared machine's load)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: known GPUs; on CPU 0.166 TFLOP/s per thread fp32)")
    p.add_argument("--side", choices=tuple(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_data(root: Path, documents: int = 4000) -> Path:
    from trainer.data.demo_corpus import make_world, pretrain_documents
    from trainer.data.prepare import prepare_data
    from trainer.data.tokenizer import train_tokenizer

    texts = pretrain_documents(make_world(seed=0), documents, random.Random(0))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train_tokenizer([corpus], root / "tokenizer", kind="bpe", vocab_size=2048)
    prepare_data([corpus], root / "tokenizer", root / "tokens", val_fraction=0.01, num_proc=1, show_progress=False)
    return root


def overrides(args, data: Path, out: Path) -> list[str]:
    return [f"data.path={data / 'tokens'}", f"data.tokenizer={data / 'tokenizer'}", f"data.seq_len={args.seq_len}",
            f"model.preset={args.preset}", f"model.max_seq_len={args.seq_len}", f"train.output_dir={out}",
            f"train.max_steps={args.steps}", f"train.micro_batch_size={args.batch_size}",
            f"train.precision={args.precision}", "checkpoint.every=0", "logging.progress=false",
            "logging.tensorboard=false", "optim.warmup_steps=2"] + (
                [f"model.vocab_size={args.vocab_size}"] if args.vocab_size else [])


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timing(args, marks: list[float], start: float) -> dict:
    """Steady-state time over the steps after `--warmup` and the time from `start` to the last step.

    `marks` holds one clock reading per step at the same point of each step's cycle (a step's end, or
    the next batch's request: the same interval), so the window has `len(marks) - warmup` steps."""
    if len(marks) < args.warmup + 2:
        raise RuntimeError(f"only {len(marks)} steps were timed; --steps must exceed --warmup + 1")
    return {"elapsed": marks[-1] - marks[args.warmup], "steps": len(marks) - 1 - args.warmup,
            "to_last_step": marks[-1] - start}


def check_compiled(args) -> None:
    """A `*_compiled` side that compiled nothing would time eager under a compiled label (the Trainer
    hands back its model unwrapped after training, so dynamo's own count of graphs is what tells)."""
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    if compiled != args.side.endswith("_compiled"):
        raise RuntimeError(f"side {args.side}: the trained model is {'' if compiled else 'not '}compiled")


def run_ours(args) -> dict:
    from trainer import pretrain
    from trainer.config import load_config

    now = make_clock(args.timer)
    start = now()
    marks: list[float] = []
    # Replaced where the task looks it up: a reading at each batch request is one per optimizer step,
    # taken before the final checkpoint write (this side saves one, HF's does not).
    pretrain.PretrainLoader = clocked(pretrain.PretrainLoader, marks, now)
    masking = "data.document_masking=" + str(args.side == "ours_masked").lower()
    compiled = "train.compile=" + str(args.side == "ours_compiled").lower()
    cfg = load_config(None, overrides(args, Path(args.data), Path(args.out)) + [masking, compiled])
    result = pretrain.run_pretraining(cfg)
    check_compiled(args)
    # The loop asks for one batch past the last step only if it has one more to run; a batch
    # request after the last step would not be a step's end.
    marks = marks[:args.steps]
    return {**timing(args, marks, start), "peak_gb": peak_memory_gb(), "world": result.accelerator.num_processes}


def run_hf(args) -> dict:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from model_defs.hf import config_to_hf
    from trainer.build import model_config_from
    from trainer.config import load_config
    from trainer.data.shards import PretrainLoader, TokenShards

    data = Path(args.data)
    cfg = load_config(None, overrides(args, data, Path(args.out)))
    shards = TokenShards(data / "tokens" / "train")
    model_cfg = model_config_from(cfg, data_vocab_size=shards.vocab_size)
    loader = iter(PretrainLoader(shards, batch_size=1, seq_len=args.seq_len, seed=0))

    class Windows(torch.utils.data.Dataset):
        """The same [T+1] windows our loader serves; HF shifts labels itself, so it gets T+1 tokens."""

        def __init__(self, n):
            self.rows = []
            for _ in range(n):
                b = next(loader)
                self.rows.append(torch.cat([b["input_ids"][0], b["labels"][0, -1:]]))

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {"input_ids": self.rows[i][:-1], "labels": self.rows[i][:-1]}

    now = make_clock(args.timer)
    start = now()
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(now())

    torch.manual_seed(0)
    hf_config = LlamaConfig(**config_to_hf(model_cfg))
    model = LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    targs = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=cfg.optim.lr, lr_scheduler_type="cosine", warmup_steps=cfg.optim.warmup_steps,
        weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1],
        max_grad_norm=cfg.optim.grad_clip, bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        logging_steps=10**9, save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True,
        seed=0, torch_compile=args.side == "hf_compiled")
    hf_trainer = Trainer(model=model, args=targs, train_dataset=Windows(args.steps * args.batch_size),
                         callbacks=[Stamp()])
    hf_trainer.train()
    check_compiled(args)
    # Readings at step ends; with the start in front they line up with ours (a reading as step i starts).
    return {**timing(args, [start] + stamps[:-1], start), "peak_gb": peak_memory_gb(), "world": 1}


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_hf(args) if args.side == "hf" else run_ours(args)
    emit_result(result)


def spawn(args, data: Path, tmp: Path, side: str, index: list[int]) -> dict:
    index[0] += 1
    out = tmp / f"{side}-{index[0]}"
    cmd = [sys.executable, __file__, "--side", side, "--data", str(data), "--out", str(out), *sys.argv[1:]]
    # A fresh inductor cache per run: a compiled run pays its compile every time, as a user's first run does.
    env = {"PYTHONPATH": str(REPO_ROOT), "TORCHINDUCTOR_CACHE_DIR": str(out) + "-inductor",
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    r = run_worker(cmd, side, cwd=REPO_ROOT, env=env)
    r["tokens_per_s"] = r["steps"] * args.batch_size * args.seq_len / r["elapsed"]
    return r


def fmt_ratio(ratios: dict, key: str) -> str:
    return fmt_spread(ratios[key], digits=2, suffix="x") if ratios.get(key) else "-"


def main() -> None:
    args = parse_args()
    if args.side:
        return child(args)
    from rich.console import Console
    from rich.table import Table

    from model_defs import flops_per_token
    from trainer.build import model_config_from
    from trainer.config import load_config
    from trainer.data.shards import TokenShards
    from trainer.metrics import device_peak_tflops

    console = Console(width=160)
    sides = args.only or list(DEFAULT_SIDES)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        console.print("preparing data ...")
        data = make_data(tmp, args.documents)
        counter = [0]
        per_round, failed = run_rounds(
            sides, lambda side: spawn(args, data, tmp, side, counter), args.rounds,
            describe=lambda r: f"{r['tokens_per_s']:,.0f} tokens/s, {r['to_last_step']:.1f} s to the last step, "
                               f"peak {r['peak_gb']:.2f} GB")
        cfg = load_config(None, overrides(args, data, tmp / "x"))
        model_cfg = model_config_from(cfg, data_vocab_size=TokenShards(data / "tokens" / "train").vocab_size)
    fpt = flops_per_token(model_cfg, args.seq_len)
    peak = args.peak_tflops or device_peak_tflops(args.precision) or 0.166 * (args.threads or torch.get_num_threads())
    mfu = lambda r: fpt * r["tokens_per_s"] / (peak * 1e12)
    per = contender_spreads(per_round, {"tokens_per_s": lambda r: r["tokens_per_s"], "mfu": mfu,
                                        "peak_gb": lambda r: r["peak_gb"], "to_last_step": lambda r: r["to_last_step"]})
    ratios = {}
    for side in sides:
        peer = next((p for p in PEERS.get(side, ()) if p in sides), None)
        if peer is not None:
            ratios[side] = {"over": peer,
                            "throughput": round_ratio(per_round, side, peer, lambda r: r["tokens_per_s"]),
                            "to_last_step": round_ratio(per_round, side, peer, lambda r: r["to_last_step"]),
                            "peak_memory": round_ratio(per_round, side, peer, lambda r: r["peak_gb"])}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({args.threads or 'all'} threads)"
    table = Table(title=f"pretraining, preset {args.preset} ({model_cfg.dim}x{model_cfg.n_layers}, vocab "
                        f"{model_cfg.vocab_size}), batch {args.batch_size} x {args.seq_len}, {args.precision}, "
                        f"{device}, {args.timer} time; median \\[min-max] over {args.rounds} rounds; ratios over "
                        "the Trainer run alike (compiled over compiled when run)")
    for col in ("", "tokens/s", "MFU %", "s to last step", "peak memory GB", "x HF tokens/s", "x HF time to last",
                "x HF memory", "load (1 min)"):
        table.add_column(col, justify="right")
    for side, s in per.items():
        rt = ratios.get(side, {})
        ratio = partial(fmt_ratio, rt)
        table.add_row(SIDES[side], fmt_spread(s["tokens_per_s"], digits=0), fmt_spread(s["mfu"], 100, 2),
                      fmt_spread(s["to_last_step"], digits=1), fmt_spread(s["peak_gb"], digits=2),
                      ratio("throughput"), ratio("to_last_step"), ratio("peak_memory"),
                      fmt_spread(s["load1"], digits=2))
    console.print(table)
    payload = {"bench": "pretrain", "args": {k: v for k, v in vars(args).items() if k not in ("side", "data", "out")},
               "device": device, "flops_per_token": fpt, "peak_tflops": peak, "model": {"dim": model_cfg.dim, "n_layers": model_cfg.n_layers, "vocab_size": model_cfg.vocab_size},
               "contenders": per, "ratios_over_hf": ratios, "load": load_summary(per_round), "rounds": per_round,
               "failed": sorted(failed)}
    if args.json:
        write_json(args.json, payload)
    finish(failed)


if __name__ == "__main__":
    main()
