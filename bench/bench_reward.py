"""Reward-model training step time, throughput and peak memory: our reward task vs TRL's RewardTrainer.

Both contenders train the same scalar-head model (one HF `LlamaForSequenceClassification` folder, which
we load into our `SequenceClassifier` and transformers loads as itself) with the Bradley-Terry loss, on
the same preference pairs in the same order (no shuffling on either side), the same micro-batch of pairs
per step, the same length limit, precision, optimizer (fused AdamW, no weight decay, clip 1.0), no
gradient checkpointing, and for `--method lora` the same LoRA (rank, alpha, no dropout, every linear
layer of the trunk; the head trained in full). TRL is handed the exact token ids our reward task trains
on (`chosen_ids`/`rejected_ids`: prompt + response through our chat template and length limits), so every
step of both sees the same rows, padded to the batch's longest (on GPU ours rounds that up to a multiple of 8).

The pairs are synthetic with controlled lengths: slices of the demo corpus's token stream (a prompt of
`--max-prompt-len`/2 to `--max-prompt-len` tokens, responses filling 1/2 to all of what remains of
`--seq-len`), decoded to text and written as `{"prompt", "chosen", "rejected"}` JSONL.

Each contender runs in its own process (so its peak memory is its own), `--rounds` times, alternating
which goes first. Step time is the median over the timed steps (after `--warmup`) of the time from one
step to the next (ours: the loop's pair loader is wrapped and read at every batch request; TRL: a
callback at every step end), read on two clocks: wall time, and the process's CPU time, which other
processes' load on a shared machine does not inflate (compare CPU times with `--threads 1`). Reported
per contender: median [min-max] over rounds of step time and pairs/s on both clocks; peak memory (CPU:
peak resident set above the post-import baseline; GPU: `max_memory_allocated`) by the end of the timed
steps and over the whole run (ours also saves a checkpoint and exports model/ after training, TRL saves
nothing); the whole run's time; and per round the ratios ours/TRL, as median [min-max]. The 1-minute
load average is sampled every 2 s during every run. A contender that fails stops the bench with a
non-zero exit. `--json PATH` writes every figure.

    python bench/bench_reward.py --threads 1 --rounds 3                 # full tuning, CPU fp32
    python bench/bench_reward.py --threads 1 --rounds 3 --method lora
    python bench/bench_reward.py --device cuda --preset 125m --precision bf16 --seq-len 1024 --max-prompt-len 512
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
    clocked,
    emit_result,
    finish,
    fmt_spread,
    make_clock,
    peak_bytes,
    rss_bytes,
    run_rounds,
    run_worker,
    spread,
    work_folder,
    write_json,
)

CONTENDERS = ("ours", "trl")
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
# Flags a worker needs, forwarded from the driver.
WORKER_FLAGS = ("method", "preset", "vocab_size", "batch_pairs", "seq_len", "max_prompt_len", "lora_r", "warmup",
                "steps", "precision", "threads", "lr")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("full", "lora"), default="full")
    p.add_argument("--preset", default="debug", help="model_defs preset for the model's shape (vocab: the tokenizer's)")
    p.add_argument("--vocab-size", type=int, default=2048,
                   help="tokenizer to train (the demo corpus fills about 980); the model takes the tokenizer's size")
    p.add_argument("--batch-pairs", type=int, default=8, help="preference pairs per step (2x rows per forward)")
    p.add_argument("--seq-len", type=int, default=256, help="longest prompt + response (data.seq_len, TRL max_length)")
    p.add_argument("--max-prompt-len", type=int, default=128)
    p.add_argument("--pairs", type=int, default=None,
                   help="pairs written (default: enough for every step, so no epoch wraps)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r), --method lora")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run (at least 1)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; figures are median [min-max] over them")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument("--exact-memory", action="store_true",
                   help="CPU: run the workers with MALLOC_MMAP_THRESHOLD_=65536, so glibc maps every allocation over "
                        "64 KiB and unmaps it when freed: peak RSS then follows live memory instead of what the heap "
                        "keeps, but every step pays page faults (use it for the memory figures, not the times)")
    p.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--workdir", default=None, help="keep inputs and run folders here (default: a temp folder)")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.max_prompt_len >= args.seq_len:
        p.error("--max-prompt-len must be below --seq-len")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (TRL's first step has no reading before it)")
    if args.pairs is None:
        args.pairs = (args.warmup + args.steps + 1) * args.batch_pairs
    return args


# ----------------------------------------------------------------------------- shared inputs (driver)


def reward_overrides(args: argparse.Namespace, work: Path, out: Path, max_steps: int) -> list[str]:
    """Our reward task's settings; the driver tokenizes the pairs with them too, for TRL."""
    lora = [f"reward.lora.r={args.lora_r}", f"reward.lora.alpha={2 * args.lora_r}", "reward.lora.dropout=0.0",
            f"reward.lora.target_modules=[{','.join(TARGETS)}]"]
    return [f"model.init_from={work / 'base'}", f"data.tokenizer={work / 'tokenizer'}", f"data.seq_len={args.seq_len}",
            "data.shuffle=false", f"train.output_dir={out}", f"train.max_steps={max_steps}",
            f"train.micro_batch_size={args.batch_pairs}", f"train.precision={args.precision}", "train.seed=0",
            f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.weight_decay=0.0", "logging.tensorboard=false",
            "logging.progress=false", "checkpoint.keep_last=1", f"reward.train_files=[{work / 'pairs.jsonl'}]",
            f"reward.max_prompt_len={args.max_prompt_len}", "reward.chat_template=llama3",
            f"reward.method={args.method}"] + (lora if args.method == "lora" else [])


def prepare_inputs(args: argparse.Namespace, work: Path) -> dict:
    """Tokenizer, pairs JSONL, the base classifier folder, and the token rows TRL trains on; their stats."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from model_defs import ModelConfig, SequenceClassifier
    from model_defs.hf_classifier import save_hf_classifier
    from trainer.config import load_config
    from trainer.data.demo_corpus import build_demo_data
    from trainer.data.tokenizer import train_tokenizer
    from trainer.reward.config import RewardConfig
    from trainer.reward.task import load_reward_data

    demo = build_demo_data(n_pretrain_docs=1500)
    write = lambda path, rows: path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write(work / "text.jsonl", demo["pretrain"])
    train_tokenizer([work / "text.jsonl"], work / "tokenizer", vocab_size=args.vocab_size, overwrite=True)
    tokenizer = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    stream = np.asarray(tokenizer("\n".join(r["text"] for r in demo["pretrain"]),
                                  add_special_tokens=False)["input_ids"])
    rng = np.random.default_rng(0)
    room = args.seq_len - args.max_prompt_len

    def text(lo: int, hi: int) -> str:
        n = int(rng.integers(lo, hi + 1))
        start = int(rng.integers(0, len(stream) - n))
        return tokenizer.decode(stream[start:start + n].tolist()).strip()

    rows = []
    while len(rows) < args.pairs:
        row = {"prompt": text(args.max_prompt_len // 2, args.max_prompt_len),
               "chosen": text(room // 2, room), "rejected": text(room // 2, room)}
        if row["prompt"] and row["chosen"] and row["rejected"] and row["chosen"] != row["rejected"]:
            rows.append(row)
    write(work / "pairs.jsonl", rows)

    # Our reward task's own reading of those pairs: what both contenders train on.
    cfg = load_config(None, reward_overrides(args, work, work / "unused", 1), schema=RewardConfig)
    data = load_reward_data(cfg)
    pairs, chat_tokenizer = data.payload.train, data.tokenizer
    write(work / "trl_pairs.jsonl", [{"chosen_ids": np.concatenate([p.prompt, p.chosen]).tolist(),
                                      "rejected_ids": np.concatenate([p.prompt, p.rejected]).tolist()}
                                     for p in pairs])
    torch.manual_seed(0)
    model_cfg = ModelConfig.from_preset(args.preset, vocab_size=len(chat_tokenizer),
                                        max_seq_len=max(args.seq_len, 256))
    model = SequenceClassifier(model_cfg, num_labels=1)
    save_hf_classifier(model, work / "base", pad_token_id=chat_tokenizer.pad_token_id)

    # Per-step shapes (the same for both: same order, same rows, padding to each batch's longest row).
    lengths = [(len(p.prompt) + len(p.chosen), len(p.prompt) + len(p.rejected)) for p in pairs]
    steps = args.warmup + args.steps
    batches = [lengths[i * args.batch_pairs:(i + 1) * args.batch_pairs] for i in range(steps)]
    real = [sum(c + r for c, r in b) for b in batches]
    padded = [2 * len(b) * max(max(c, r) for c, r in b) for b in batches]
    timed = slice(args.warmup, steps)
    stats = {"pairs": len(pairs), "truncated": data.payload.train_report.truncated,
             "pad_id": chat_tokenizer.pad_token_id, "vocab": len(chat_tokenizer),
             "params": sum(p.numel() for p in model.parameters()),
             "row_tokens_mean": statistics.mean(x for pair in lengths for x in pair),
             "real_tokens_per_step": statistics.mean(real[timed]),
             "padded_tokens_per_step": statistics.mean(padded[timed])}
    (work / "inputs.json").write_text(json.dumps(stats))
    return stats


# ----------------------------------------------------------------------------- workers


def run_ours(args: argparse.Namespace, work: Path) -> dict:
    import shutil

    import trainer.reward.task as reward_task
    from trainer.config import load_config
    from trainer.reward.config import RewardConfig

    out = work / "runs" / "ours"
    shutil.rmtree(out, ignore_errors=True)
    marks: list[tuple[float, float, float]] = []
    baseline = rss_bytes()
    # Replaced where the task looks it up.
    reward_task.PairLoader = clocked(reward_task.PairLoader, marks, step_clock(baseline))
    # One step more than TRL: its last interval needs the next batch request to close it (untimed).
    cfg = load_config(None, reward_overrides(args, work, out, args.warmup + args.steps + 1), schema=RewardConfig)
    start = time.perf_counter()
    reward_task.run_reward(cfg)
    total = time.perf_counter() - start
    # Readings at batch requests: interval k is step k + 1, so steps warmup+1 .. warmup+steps are kept.
    return {**step_times(marks, args.warmup, args.steps), "peak_bytes": peak_bytes(baseline),
            "total_s": total}


def run_trl(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from trainer.chat import ensure_chat_template

    inputs = json.loads((work / "inputs.json").read_text())
    tokenizer = ensure_chat_template(AutoTokenizer.from_pretrained(str(work / "tokenizer")), "llama3")
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(inputs["pad_id"])  # ours pads (and HF scores) by it
    dataset = Dataset.from_list([json.loads(line) for line in (work / "trl_pairs.jsonl").read_text().splitlines()])
    cuda = torch.cuda.is_available()
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    marks: list[tuple[float, float, float]] = []
    baseline = rss_bytes()
    now = step_clock(baseline)

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append(now())

    start = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(str(work / "base"), dtype=torch.float32,
                                                               attn_implementation="sdpa")
    config = RewardConfig(
        output_dir=str(work / "runs" / "trl"), per_device_train_batch_size=args.batch_pairs,
        max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, max_length=args.seq_len, bf16=bf16, use_cpu=not cuda,
        # TRL turns gradient checkpointing on by default; ours runs without it, so TRL does too.
        gradient_checkpointing=False, train_sampling_strategy="sequential", report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=list(HF_TARGETS),
                      task_type="SEQ_CLS") if args.method == "lora" else None  # SEQ_CLS trains `score` in full
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=lora, callbacks=[StepClock()])
    if len(trainer.train_dataset) != inputs["pairs"]:
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {inputs['pairs']} pairs")
    trainer.train()
    total = time.perf_counter() - start
    # Readings at step ends: interval k is step k + 2, so skipping warmup - 1 keeps steps warmup+1 onwards.
    return {**step_times(marks, args.warmup - 1, args.steps), "peak_bytes": peak_bytes(baseline),
            "total_s": total}


def step_clock(baseline: int):
    """A reading at each step boundary: (wall s, process CPU s, peak memory so far as `peak_bytes` gives it)."""
    clock = make_clock("both")
    return lambda: (*clock(), peak_bytes(baseline))


def step_times(marks: list[tuple[float, float, float]], skip: int, steps: int) -> dict:
    """Per-step wall and CPU seconds of `steps` steps after the first `skip` intervals between `step_clock`
    readings, their medians, and the peak memory by the end of the last timed step: below the run's peak
    when that falls after training (saving, export), not in the steps."""
    pairs = list(zip(marks, marks[1:]))[skip:skip + steps]
    if len(pairs) != steps:
        raise RuntimeError(f"{len(marks)} step readings give {len(pairs)} timed steps, not {steps}")
    wall, cpu = [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs]
    return {"steps_s": wall, "cpu_steps_s": cpu, "step_s": statistics.median(wall),
            "cpu_step_s": statistics.median(cpu), "peak_by_last_step_bytes": pairs[-1][1][2]}


def worker(args: argparse.Namespace) -> None:
    import torch

    # Every library either side uses, imported before the memory baseline, so each figure is the run's own.
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401

    import trainer.reward.task  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    result = run_ours(args, work) if args.worker == "ours" else run_trl(args, work)
    emit_result({"run": args.worker, "threads": torch.get_num_threads(), **result})


# ----------------------------------------------------------------------------- driver


def spawn(args: argparse.Namespace, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--workdir", args.workdir]
    for flag in WORKER_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    env = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}
    if args.exact_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return run_worker(cmd, name, cwd=REPO_ROOT, env=env)  # run_rounds samples the load around it


def summarize(args: argparse.Namespace, rounds: list[dict[str, dict]]) -> dict:
    per = {}
    for name in args.only:
        runs = [r[name] for r in rounds]
        per[name] = {"step_s": spread([r["step_s"] for r in runs]),
                     "cpu_step_s": spread([r["cpu_step_s"] for r in runs]),
                     "pairs_per_s": spread([args.batch_pairs / r["step_s"] for r in runs]),
                     "cpu_pairs_per_s": spread([args.batch_pairs / r["cpu_step_s"] for r in runs]),
                     "peak_bytes": spread([r["peak_bytes"] for r in runs]),
                     "train_peak_bytes": spread([r["peak_by_last_step_bytes"] for r in runs]),
                     "total_s": spread([r["total_s"] for r in runs]),
                     "load1": spread([r["load"]["load1_median"] for r in runs]),
                     "load1_max": max(r["load"]["load1_max"] for r in runs)}
    ratios = {}
    if set(CONTENDERS) <= set(args.only):
        def ratio(key: str, top: str, bottom: str) -> dict:
            return spread([r[top][key] / r[bottom][key] for r in rounds])

        # Throughput is the inverse of step time: TRL's step over ours.
        ratios = {"throughput": ratio("step_s", "trl", "ours"), "cpu_throughput": ratio("cpu_step_s", "trl", "ours"),
                  "peak_memory": ratio("peak_bytes", "ours", "trl"),
                  "train_peak_memory": ratio("peak_by_last_step_bytes", "ours", "trl")}
    return {"contenders": per, "ratios_ours_over_trl": ratios}


def report(args: argparse.Namespace, inputs: dict, summary: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads or 'all'} thread(s)"
    method = f"LoRA r={args.lora_r}" if args.method == "lora" else "full"
    table = Table(title=escape(
        f"Reward model step ({method}), {args.preset} {inputs['params'] / 1e6:.1f}M params, {args.batch_pairs} "
        f"pairs/step, seq <= {args.seq_len} ({inputs['real_tokens_per_step']:.0f} real / "
        f"{inputs['padded_tokens_per_step']:.0f} padded tokens per step), {precision}, {where}"
        f"{', glibc mmap threshold 64 KiB (--exact-memory)' if args.exact_memory else ''}; "
        f"median [min-max] over {args.rounds} rounds of {args.steps} timed steps"))
    for col in ("contender", "step ms (wall)", "step ms (CPU)", "pairs/s (wall)", "pairs/s (CPU)",
                "peak MiB (steps)", "peak MiB (run)", "whole run s", "load (1 min)"):
        table.add_column(col, justify="right")
    labels = {"ours": "ours (reward task)", "trl": "TRL RewardTrainer"}
    for name, s in summary["contenders"].items():
        table.add_row(labels[name], fmt_spread(s["step_s"], 1000, 0), fmt_spread(s["cpu_step_s"], 1000, 0),
                      fmt_spread(s["pairs_per_s"], digits=2), fmt_spread(s["cpu_pairs_per_s"], digits=2),
                      fmt_spread(s["train_peak_bytes"], 2**-20, 0), fmt_spread(s["peak_bytes"], 2**-20, 0),
                      fmt_spread(s["total_s"]),
                      fmt_spread(s["load1"], digits=2) + f", max {s['load1_max']:.2f}")
    console = Console(width=200)
    console.print(table)
    ratios = summary["ratios_ours_over_trl"]
    if ratios:
        x = lambda key: fmt_spread(ratios[key], digits=2, suffix="x")  # noqa: E731
        console.print(escape(f"ours/TRL, per round, median [min-max]: throughput (wall) {x('throughput')}, "
                             f"throughput (CPU time) {x('cpu_throughput')}, peak memory in the steps "
                             f"{x('train_peak_memory')}, over the whole run {x('peak_memory')}; "
                             "goal: throughput >= 1.5x"))


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    work, tmp = work_folder(args.workdir, "bench-reward-")
    args.workdir = str(work)
    inputs = prepare_inputs(args, work)
    print(f"inputs: {json.dumps(inputs)}", flush=True)
    rounds, failed = run_rounds(args.only, lambda name: spawn(args, name), args.rounds, describe=lambda r: (
        f"{1000 * r['step_s']:.0f} ms/step wall, {1000 * r['cpu_step_s']:.0f} ms/step CPU, "
        f"peak {r['peak_bytes'] / 2**20:.0f} MiB"))
    finish(failed)  # the figures below compare both contenders in every round
    summary = summarize(args, rounds)
    report(args, inputs, summary)
    out = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "workdir")}, "inputs": inputs,
           **summary, "rounds": rounds}
    print(json.dumps(out))
    if args.json:
        write_json(args.json, out)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
