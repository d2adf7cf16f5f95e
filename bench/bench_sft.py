"""LoRA SFT throughput and peak memory: ours (the one loop, packed and padded) vs TRL's SFTTrainer
(padding, and TRL's own packing), same model, data, batch size, LoRA shape and steps, in one run.

Every contender runs in its own child process (so peak memory is its own) on the same HF Llama
folder and the same examples. Real tokens are the non-padding tokens the model reads, counted
by a forward pre-hook on the innermost model in every contender alike; throughput is the real
tokens of the steps after warmup over their wall time. Contenders run in `--rounds` rounds that
alternate their order; reported per contender are the median [min-max] over rounds, the ratios
to TRL taken within each round, and the machine's load during each run. Neither side uses
gradient checkpointing (TRL's default is on; it is turned off here). A contender that fails
makes the bench exit non-zero.

    python bench/bench_sft.py                                    # CPU: dim 256, 4 layers, self-instruct data
    python bench/bench_sft.py --device cuda --preset llama3.2-1b --seq-len 2048 --batch-size 8 --precision bf16
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    add_round_args,
    contender_spreads,
    emit_result,
    finish,
    fmt_spread,
    load_summary,
    round_ratio,
    run_rounds,
    run_worker,
    write_json,
)

CONTENDERS = ("ours_packed", "ours_padded", "trl_padded", "trl_packed")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="SFT JSONL (default: ../shared/data/self-instruct-seed-tasks.jsonl, "
                                                "else freshly generated demo chats)")
    p.add_argument("--preset", default=None, help="model_defs preset for the shape (default: --dim/--layers)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads per contender (CPU)")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall clock, or each process's CPU time (steady on a busy machine with --threads 1)")
    p.add_argument("--only", nargs="*", choices=CONTENDERS, default=list(CONTENDERS))
    add_round_args(p)
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args()


# ----------------------------------------------------------------------------- setup (parent)


def prepare(args: argparse.Namespace, work: Path) -> None:
    """A tokenizer, an HF Llama base folder and the chat rows, shared by every contender."""
    from model_defs import ModelConfig, Transformer
    from model_defs.hf import save_hf_model
    from trainer.data.tokenizer import train_tokenizer
    from trainer.export import copy_tokenizer
    from trainer.sft.data import load_conversations

    data = Path(args.data) if args.data else REPO.parent / "shared" / "data" / "self-instruct-seed-tasks.jsonl"
    if not data.is_file():
        from trainer.data.demo_corpus import build_demo_data

        data = work / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in build_demo_data(n_pretrain_docs=10)["sft"]))
    conversations = load_conversations([data])
    (work / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    text = work / "text.jsonl"
    text.write_text("".join(json.dumps({"text": "\n".join(m["content"] for m in c)}) + "\n" for c in conversations))
    train_tokenizer([text], work / "tokenizer", vocab_size=args.vocab_size, overwrite=True)
    if args.preset:
        cfg = ModelConfig.from_preset(args.preset, vocab_size=args.vocab_size, max_seq_len=args.seq_len,
                                      attention="sdpa")
    else:
        cfg = ModelConfig.from_preset("tiny", vocab_size=args.vocab_size, dim=args.dim, n_layers=args.layers,
                                      n_heads=max(1, args.dim // 64), n_kv_heads=max(1, args.dim // 128),
                                      max_seq_len=args.seq_len, attention="sdpa")
    save_hf_model(Transformer(cfg), cfg, work / "base")
    copy_tokenizer(work / "tokenizer", work / "base")


# ----------------------------------------------------------------------------- measuring (children)


class RealTokenMeter:
    """Forward pre-hook: the time each training forward starts and the non-padding tokens it reads. `timer="cpu"`
    reads this process's CPU time instead of the wall clock: with one thread, other processes' load on a shared
    machine does not inflate it."""

    def __init__(self, pad_id: int, timer: str = "wall"):
        self.pad_id, self.events = pad_id, []
        self.clock = time.process_time if timer == "cpu" else time.perf_counter

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
        if module.training and ids is not None:
            self.events.append((self.clock(), int((ids != self.pad_id).sum())))

    def throughput(self, warmup: int) -> tuple[float, int]:
        """Real tokens/s over steps [warmup, last): forward start of step `warmup` to forward start of the last."""
        ev = self.events
        if len(ev) <= warmup + 1:
            raise RuntimeError(f"only {len(ev)} training forwards were seen")
        tokens = sum(n for _, n in ev[warmup:-1])
        return tokens / (ev[-1][0] - ev[warmup][0]), tokens


def model_dim(args: argparse.Namespace) -> int:
    from model_defs import ModelConfig

    return ModelConfig.from_preset(args.preset).dim if args.preset else args.dim


def peak_memory_gb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_ours(args: argparse.Namespace, work: Path, packing: bool) -> dict:
    from accelerate.utils import set_seed

    from trainer.config import load_config
    from trainer.engine import build_accelerator
    from trainer.export import load_pretrained
    from trainer.loop import train
    from trainer.sft.config import SFTConfig
    from trainer.sft.data import load_sft_examples
    from trainer.sft.loader import SFTLoader
    from trainer.sft.objective import sft_objective
    from trainer.tuning.methods import apply_method
    from trainer.chat import load_chat_tokenizer

    cfg = load_config(None, [
        f"model.init_from={work / 'base'}", f"data.tokenizer={work / 'tokenizer'}", f"data.seq_len={args.seq_len}",
        f"sft.train_files=[{work / 'chats.jsonl'}]", f"sft.packing={packing}", f"sft.lora.r={args.lora_r}",
        f"sft.lora.alpha={2 * args.lora_r}", "sft.lora.dropout=0.0", f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.batch_size}", f"train.precision={args.precision}",
        f"train.output_dir={work / ('ours_packed' if packing else 'ours_padded')}", "logging.progress=false",
        "logging.tensorboard=false", f"logging.log_every={args.steps}", "optim.lr=2e-4", "optim.warmup_steps=0",
        "optim.weight_decay=0.0", f"checkpoint.every={10 * args.steps}",
    ], schema=SFTConfig)
    tokenizer = load_chat_tokenizer(cfg, cfg.sft.chat_template)
    examples, _ = load_sft_examples(cfg.sft.train_files, tokenizer, seq_len=args.seq_len)
    accelerator = build_accelerator(cfg, hidden_size=model_dim(args), precision=args.precision)
    set_seed(0)
    base = load_pretrained(cfg.model.init_from)
    meter = RealTokenMeter(tokenizer.pad_token_id, args.timer)
    base.register_forward_pre_hook(meter, with_kwargs=True)
    model = apply_method(base, cfg.sft, key="sft")
    loader = SFTLoader(examples, batch_size=args.batch_size, seq_len=args.seq_len, pad_id=tokenizer.pad_token_id,
                       packing=packing, seed=0)
    train(cfg, accelerator=accelerator, model=model, objective=sft_objective, train_loader=loader,
          precision=args.precision)
    tps, tokens = meter.throughput(args.warmup)
    return {"real_tokens_per_s": tps, "timed_real_tokens": tokens}


def run_trl(args: argparse.Namespace, work: Path, packing: bool) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from trainer.chat import ensure_chat_template

    tokenizer = ensure_chat_template(AutoTokenizer.from_pretrained(work / "tokenizer"), "llama3")
    rows = []
    for line in (work / "chats.jsonl").read_text().splitlines():
        msgs = json.loads(line)["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        rows.append({"prompt": msgs[:last], "completion": msgs[last:last + 1]})
    dataset = datasets.Dataset.from_list(rows)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = LlamaForCausalLM.from_pretrained(work / "base", attn_implementation="sdpa", dtype=torch.float32)
    meter = RealTokenMeter(tokenizer.pad_token_id, args.timer)
    model.model.register_forward_pre_hook(meter, with_kwargs=True)
    config = SFTConfig(
        output_dir=str(work / ("trl_packed" if packing else "trl_padded")), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, learning_rate=2e-4,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_length=args.seq_len, packing=packing,
        completion_only_loss=True, logging_steps=args.steps, save_strategy="no", report_to=[], seed=0,
        bf16=args.precision == "bf16" and dtype == torch.bfloat16, use_cpu=args.device == "cpu",
        dataloader_num_workers=0, disable_tqdm=True,
        # TRL turns gradient checkpointing on by default (SFTConfig, TRL 1.x); ours runs without it, so
        # this side does too: the same work per step on both sides.
        gradient_checkpointing=False,
    )
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
                      task_type="CAUSAL_LM")
    SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora).train()
    tps, tokens = meter.throughput(args.warmup)
    return {"real_tokens_per_s": tps, "timed_real_tokens": tokens}


def worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    name = args.worker
    runner = run_ours if name.startswith("ours") else run_trl
    result = runner(args, work, packing=name.endswith("packed"))
    result["peak_mem_gb"] = peak_memory_gb(args.device)
    emit_result(result)


# ----------------------------------------------------------------------------- driver


def without_only(argv: list[str]) -> list[str]:
    """The command line minus `--only` and its values (each worker is told its own contender)."""
    out, dropping = [], False
    for arg in argv:
        if arg == "--only" or arg.startswith("--only="):
            dropping = arg == "--only"
            continue
        if dropping and not arg.startswith("-"):
            continue
        dropping = False
        out.append(arg)
    return out


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=180)
    forwarded = without_only(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="bench_sft-") as tmp:
        work = Path(tmp)
        prepare(args, work)

        def spawn(name: str) -> dict:
            cmd = [sys.executable, __file__, *forwarded, "--worker", name, "--workdir", str(work)]
            return run_worker(cmd, name, cwd=REPO)

        per_round, failed = run_rounds(args.only, spawn, args.rounds, describe=lambda r: (
            f"{r['real_tokens_per_s']:.0f} real tokens/s, peak {r['peak_mem_gb']:.2f} GB"))

    per = contender_spreads(per_round, {"tokens_per_s": lambda r: r["real_tokens_per_s"],
                                        "peak_gb": lambda r: r["peak_mem_gb"]})
    ratios = {name: {ref: {"throughput": round_ratio(per_round, name, ref, lambda r: r["real_tokens_per_s"]),
                           "peak_memory": round_ratio(per_round, name, ref, lambda r: r["peak_mem_gb"])}
                     for ref in ("trl_padded", "trl_packed") if ref in per}
              for name in per if name.startswith("ours")}
    table = Table(title=f"LoRA SFT, {args.preset or f'dim {args.dim} x {args.layers} layers'}, seq {args.seq_len}, "
                        f"batch {args.batch_size}, {args.steps} steps ({args.warmup} warmup), {args.precision} on "
                        f"{args.device} ({args.timer} time), no gradient checkpointing on either side; median \\[min-max] over "
                        f"{args.rounds} rounds")
    for col in ("contender", "real tokens/s", "peak mem GB", "tok/s vs TRL padded", "tok/s vs TRL packed",
                "mem vs TRL padded", "load (1 min)"):
        table.add_column(col, justify="right")
    for name, s in per.items():
        r = ratios.get(name, {})
        x = lambda ref, key: (fmt_spread(r[ref][key], digits=2, suffix="x")  # noqa: E731
                              if ref in r and r[ref][key] else "-")
        table.add_row(name, fmt_spread(s["tokens_per_s"], digits=0), fmt_spread(s["peak_gb"], digits=2),
                      x("trl_padded", "throughput"), x("trl_packed", "throughput"), x("trl_padded", "peak_memory"),
                      fmt_spread(s["load1"], digits=2))
    console.print(table)
    payload = {"bench": "sft", "args": {k: v for k, v in vars(args).items() if k not in ("worker", "workdir")},
               "contenders": per, "ratios": ratios, "load": load_summary(per_round), "rounds": per_round,
               "failed": sorted(failed)}
    if args.json:
        write_json(args.json, payload)
    finish(failed)


if __name__ == "__main__":
    main()
