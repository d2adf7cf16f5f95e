"""Pretraining throughput, MFU and peak memory: our trainer vs transformers' Trainer + LlamaForCausalLM.

Same shapes (ours converted to an HF LlamaConfig), same token windows, batch, optimizer
settings and precision. Each side runs in its own fresh process (so peak memory is its
own), alternating ours/HF `--repeats` times; the best run of each side is reported.
Throughput is wall time between the end of step `--warmup` and the end of the last step,
measured the same way on both sides (a per-step timestamp).

    python bench/bench_pretrain.py                          # debug preset, CPU fp32
    python bench/bench_pretrain.py --precision bf16 --preset 125m --seq-len 1024   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Same work as HF: plain causal attention over each window. "masked" also keeps attention inside
# each packed document (what our recipes do by default), which HF's Trainer does not offer.
SIDES = {"ours": "ours (trainer/)", "ours_masked": "ours, document masking", "hf": "HF Trainer"}
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps not timed")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads in each run")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: known GPUs; on CPU 0.166 TFLOP/s per thread fp32)")
    p.add_argument("--side", choices=("ours", "ours_masked", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_data(root: Path) -> Path:
    from trainer.data.demo_corpus import make_world, pretrain_documents
    from trainer.data.prepare import prepare_data
    from trainer.data.tokenizer import train_tokenizer

    texts = pretrain_documents(make_world(seed=0), 4000, random.Random(0))
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
            "logging.tensorboard=false", "optim.warmup_steps=2"]


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_ours(args) -> dict:
    from trainer.config import load_config
    from trainer.pretrain import run_pretraining

    out = Path(args.out)
    masking = "data.document_masking=" + str(args.side == "ours_masked").lower()
    cfg = load_config(None, overrides(args, Path(args.data), out) + [masking])
    # The timed window must not include the final checkpoint write; this side saves one, HF's does not.
    result = run_pretraining(cfg)
    stamps = [r["time"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    return {"elapsed": stamps[-1] - stamps[args.warmup - 1], "steps": len(stamps) - args.warmup,
            "peak_gb": peak_memory_gb(), "world": result.accelerator.num_processes}


def run_hf(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from trainer.build import model_config_from
    from trainer.config import load_config
    from trainer.data.shards import PretrainLoader, TokenShards
    from model_defs.hf import config_to_hf

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

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.time())

    torch.manual_seed(0)
    hf_config = LlamaConfig(**config_to_hf(model_cfg))
    model = LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    targs = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=cfg.optim.lr, lr_scheduler_type="cosine", warmup_steps=cfg.optim.warmup_steps,
        weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1],
        max_grad_norm=cfg.optim.grad_clip, bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        logging_steps=10**9, save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True,
        seed=0)
    Trainer(model=model, args=targs, train_dataset=Windows(args.steps * args.batch_size),
            callbacks=[Stamp()]).train()
    return {"elapsed": stamps[-1] - stamps[args.warmup - 1], "steps": len(stamps) - args.warmup,
            "peak_gb": peak_memory_gb(), "world": 1}


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_hf(args) if args.side == "hf" else run_ours(args)
    print("RESULT " + json.dumps(result))


def main() -> None:
    args = parse_args()
    if args.side:
        return child(args)
    from rich.console import Console
    from rich.table import Table

    from model_defs import flops_per_token
    from trainer.build import model_config_from
    from trainer.config import load_config
    from trainer.metrics import device_peak_tflops

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        console.print("preparing data ...")
        data = make_data(tmp)
        best: dict[str, dict] = {}
        for repeat in range(args.repeats):
            for side in SIDES:
                out = tmp / f"{side}-{repeat}"
                cmd = [sys.executable, __file__, "--side", side, "--data", str(data), "--out", str(out),
                       *sys.argv[1:]]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    raise SystemExit(f"{side} run failed:\n{proc.stderr[-4000:]}")
                r = json.loads(line[len("RESULT "):])
                r["tokens_per_s"] = r["steps"] * args.batch_size * args.seq_len / r["elapsed"]
                console.print(f"  {side} run {repeat + 1}: {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_gb']:.2f} GB")
                if side not in best or r["tokens_per_s"] > best[side]["tokens_per_s"]:
                    best[side] = r
        cfg = load_config(None, overrides(args, data, tmp / "x"))
        from trainer.data.shards import TokenShards

        model_cfg = model_config_from(cfg, data_vocab_size=TokenShards(data / "tokens" / "train").vocab_size)
    fpt = flops_per_token(model_cfg, args.seq_len)
    peak = args.peak_tflops or device_peak_tflops(args.precision) or 0.166 * (args.threads or torch.get_num_threads())
    table = Table(title=f"pretraining, preset {args.preset}, batch {args.batch_size} x {args.seq_len}, "
                        f"{args.precision}, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    for col in ("", "tokens/s", "MFU", "peak memory GB"):
        table.add_column(col, justify="right")
    for side, name in SIDES.items():
        r = best[side]
        table.add_row(name, f"{r['tokens_per_s']:,.0f}", f"{100 * fpt * r['tokens_per_s'] / (peak * 1e12):.2f}%",
                      f"{r['peak_gb']:.2f}")
    table.add_row("ratio ours/HF", f"{best['ours']['tokens_per_s'] / best['hf']['tokens_per_s']:.2f}x", "",
                  f"{best['ours']['peak_gb'] / best['hf']['peak_gb']:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
