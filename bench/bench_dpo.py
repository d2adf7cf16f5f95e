"""DPO step throughput and peak memory: each of our reference strategies vs TRL's DPOTrainer, and our SFT run.

Every run uses the same base weights (one HF Llama folder, loaded by us and by transformers),
the same tokenizer and chat template, the same preference pairs (the project's demo pairs),
the same LoRA settings (rank, alpha, dropout, target modules) and the same batch of pairs per
step. Each run is its own process, so peak memory is that run's own: GPU
`max_memory_allocated`, or on CPU the peak resident set size above what the process held once
every library was imported. Step time is the median over the timed steps (warmup steps are
dropped) of the time from one batch request to the next, i.e. a whole optimizer step (ours:
the loop's loader is wrapped; TRL: a callback at each step end); `--timer cpu` counts this
process's CPU time instead of wall time, which other processes' load on a shared machine does
not inflate (use it with `--threads 1`). Runs go in `--rounds` rounds alternating their order;
reported are the median [min-max] over rounds, the ratios taken within each round and the
machine's load during each run. Neither side uses gradient checkpointing (TRL's default is on;
turned off here). A run that fails makes the bench exit non-zero.

    python bench/bench_dpo.py --threads 1 --timer cpu          # CPU, debug-sized model, shared machine
    python bench/bench_dpo.py --device cuda --preset llama3.2-1b --seq-len 2048 --max-prompt-len 1024 --precision bf16

Reported: pairs/s and its ratio to TRL's (goal: precompute and adapter >= 1.3x), peak memory
and its ratio to our SFT run on the same model and rows (goal: precompute and adapter <= 1.1x).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    add_round_args,
    clocked,
    contender_spreads,
    emit_result,
    finish,
    fmt_spread,
    load_summary,
    make_clock,
    peak_bytes,
    round_ratio,
    rss_bytes,
    run_rounds,
    run_worker,
    work_folder,
    write_json,
)

OURS = ("precompute", "adapter", "offload", "resident")
RUNS = ("sft", *OURS, "trl")
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug", help="model_defs preset for the base model's shape")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer (and embedding) size")
    p.add_argument("--batch-pairs", type=int, default=8, help="preference pairs per step (2x rows per forward)")
    p.add_argument("--seq-len", type=int, default=128, help="longest prompt + response")
    p.add_argument("--max-prompt-len", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=12, help="timed steps per run")
    add_round_args(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | auto (bf16 on GPU, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall clock, or this process's CPU time (steady on a busy machine with --threads 1)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    p.add_argument("--workdir", default=None, help="keep inputs and run folders here (default: a temp folder)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


# ----------------------------------------------------------------------------- shared inputs


def prepare_inputs(args: argparse.Namespace, work: Path) -> None:
    """Tokenizer, preference pairs (prompt/chosen/rejected JSONL), SFT conversations of the same rows, base model."""
    import torch

    from model_defs import ModelConfig, Transformer
    from model_defs.hf import save_hf_model
    from trainer.data.demo_corpus import build_demo_data
    from trainer.data.tokenizer import train_tokenizer

    if (work / "base" / "config.json").is_file():
        return
    demo = build_demo_data(n_pretrain_docs=1500)
    write = lambda path, rows: path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write(work / "text.jsonl", demo["pretrain"])
    train_tokenizer([work / "text.jsonl"], work / "tokenizer", vocab_size=args.vocab_size, overwrite=True)
    write(work / "pairs.jsonl", demo["dpo"])
    # Our SFT on the same rows the DPO forward sees: every chosen and every rejected conversation.
    write(work / "sft.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r[side]}]}
                               for r in demo["dpo"] for side in ("chosen", "rejected")])
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset, vocab_size=args.vocab_size, max_seq_len=max(args.seq_len, 256))
    save_hf_model(Transformer(cfg), cfg, work / "base")


# ----------------------------------------------------------------------------- workers


def _common_overrides(args: argparse.Namespace, work: Path, name: str, batch_rows: int) -> list[str]:
    return [f"model.init_from={work / 'base'}", f"data.tokenizer={work / 'tokenizer'}", f"data.seq_len={args.seq_len}",
            f"train.output_dir={work / 'runs' / name}", f"train.max_steps={args.warmup + args.steps}",
            f"train.micro_batch_size={batch_rows}", f"train.precision={args.precision}", "train.seed=0",
            "optim.lr=1e-4", "optim.warmup_steps=0", "logging.tensorboard=false", "logging.progress=false",
            "checkpoint.keep_last=1"]


def run_ours(args: argparse.Namespace, work: Path, name: str) -> dict:
    import shutil

    from trainer.config import load_config

    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    lora = ["method=lora", f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}", "lora.dropout=0.0",
            f"lora.target_modules=[{','.join(TARGETS)}]"]
    marks: list[float] = []
    now = make_clock(args.timer)
    baseline = rss_bytes()
    start = time.perf_counter()
    if name == "sft":
        import trainer.sft.task as sft_task
        from trainer.sft.config import SFTConfig
        from trainer.sft.task import run_sft

        # Replaced where the task looks it up.
        sft_task.SFTLoader = clocked(sft_task.SFTLoader, marks, now)

        cfg = load_config(None, _common_overrides(args, work, name, 2 * args.batch_pairs) + [
            f"sft.train_files=[{work / 'sft.jsonl'}]", "sft.packing=false", "sft.chat_template=llama3"]
            + [f"sft.{x}" for x in lora], schema=SFTConfig)
        run_sft(cfg)
    else:
        import trainer.dpo.task as dpo_task
        from trainer.dpo.config import DPOConfig
        from trainer.dpo.task import run_dpo

        dpo_task.PairLoader = clocked(dpo_task.PairLoader, marks, now)

        cfg = load_config(None, _common_overrides(args, work, name, args.batch_pairs) + [
            f"dpo.train_files=[{work / 'pairs.jsonl'}]", f"dpo.max_prompt_len={args.max_prompt_len}",
            "dpo.chat_template=llama3", f"dpo.reference={name}",
            f"dpo.reference_cache_dir={work / 'runs' / (name + '-cache')}"] + [f"dpo.{x}" for x in lora],
            schema=DPOConfig)
        run_dpo(cfg)
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(marks, marks[1:])][args.warmup:]
    return {"step_s": statistics.median(steps), "peak_bytes": peak_bytes(baseline), "total_s": total}


def run_trl(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trainer.chat import ensure_chat_template

    bf16 = args.precision == "bf16" or (args.precision == "auto" and torch.cuda.is_available())
    tokenizer = ensure_chat_template(AutoTokenizer.from_pretrained(str(work / "tokenizer")), "llama3")
    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    baseline = rss_bytes()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(work / "base"), dtype=torch.float32)
    marks: list[float] = []
    now = make_clock(args.timer)

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append(now())

    config = DPOConfig(output_dir=str(work / "runs" / "trl"), per_device_train_batch_size=args.batch_pairs,
                       max_steps=args.warmup + args.steps, learning_rate=1e-4, warmup_steps=0,
                       lr_scheduler_type="cosine",
                       max_length=args.seq_len, beta=0.1, loss_type=["sigmoid"], bf16=bf16,
                       use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", logging_steps=1,
                       disable_tqdm=True, dataloader_num_workers=0, seed=0, max_grad_norm=1.0,
                       # On by default in TRL's DPOConfig (1.x); ours runs without it, so this side does too.
                       gradient_checkpointing=False)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=list(HF_TARGETS),
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[StepClock()])
    trainer.train()
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(marks, marks[1:])][max(args.warmup - 1, 0):]
    return {"step_s": statistics.median(steps), "peak_bytes": peak_bytes(baseline), "total_s": total}


def worker(args: argparse.Namespace) -> None:
    import torch

    # Import every library any run uses before the memory baseline, so each run's figure is its own.
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    result = run_trl(args, work) if args.worker == "trl" else run_ours(args, work, args.worker)
    emit_result({"run": args.worker, **result})


# ----------------------------------------------------------------------------- orchestration


def spawn(args: argparse.Namespace, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--workdir", args.workdir]
    for flag in ("preset", "vocab_size", "batch_pairs", "seq_len", "max_prompt_len", "lora_r", "warmup", "steps",
                 "precision", "threads", "timer"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    return run_worker(cmd, name, cwd=REPO_ROOT, env={"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None)


def report(args: argparse.Namespace, per_round: list[dict[str, dict]], failed: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or torch.get_num_threads()
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({threads} threads)"
    where += f", {args.timer} time"
    per = contender_spreads(per_round, {"step_s": lambda r: r["step_s"],
                                        "pairs_per_s": lambda r: args.batch_pairs / r["step_s"],
                                        "peak_gb": lambda r: r["peak_bytes"] / 2**30,
                                        "total_s": lambda r: r["total_s"]})
    ratios = {name: {"throughput_over_trl": round_ratio(per_round, "trl", name, lambda r: r["step_s"]),
                     "peak_memory_over_sft": round_ratio(per_round, name, "sft", lambda r: r["peak_bytes"])}
              for name in per if name in OURS}
    table = Table(title=f"DPO step, {args.preset} + LoRA r={args.lora_r}, {args.batch_pairs} pairs/step, "
                        f"seq <= {args.seq_len}, {where}, no gradient checkpointing on either side; "
                        f"median \\[min-max] over {args.rounds} rounds")
    for col in ("run", "step ms", "pairs/s", "x TRL pairs/s", "peak MiB", "x SFT peak", "whole run s", "load (1 min)"):
        table.add_column(col, justify="right")
    x = lambda s: fmt_spread(s, digits=2, suffix="x") if s else "-"  # noqa: E731
    for name in RUNS:
        if name not in per:
            continue
        s, r = per[name], ratios.get(name, {})
        table.add_row(name, fmt_spread(s["step_s"], 1000), fmt_spread(s["pairs_per_s"]) if name != "sft" else "-",
                      x(r.get("throughput_over_trl")), fmt_spread(s["peak_gb"], 1024, 0),
                      x(r.get("peak_memory_over_sft")), fmt_spread(s["total_s"]), fmt_spread(s["load1"], digits=2))
    Console(width=180).print(table)
    payload = {"bench": "dpo", "args": {k: v for k, v in vars(args).items() if k not in ("worker", "workdir")},
               "contenders": per, "ratios": ratios, "load": load_summary(per_round), "rounds": per_round,
               "failed": sorted(failed)}
    if args.json:
        write_json(args.json, payload)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        sys.exit(f"error: unknown run(s) {', '.join(unknown)} (choose from {', '.join(RUNS)})")
    work, tmp = work_folder(args.workdir, "bench-dpo-")
    args.workdir = str(work)
    prepare_inputs(args, work)
    per_round, failed = run_rounds(runs, lambda name: spawn(args, name), args.rounds, describe=lambda r: (
        f"{1000 * r['step_s']:.1f} ms/step, peak {r['peak_bytes'] / 2**20:.0f} MiB"))
    report(args, per_round, failed)
    if tmp is not None:
        tmp.cleanup()
    finish(failed)


if __name__ == "__main__":
    main()
